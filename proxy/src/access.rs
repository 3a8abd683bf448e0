//! One record per proxied connection (or inbound HBONE stream): it counts the connection in
//! the traffic metrics and writes the connection's one access-log line when it ends.
//!
//! This is the only place that writes an access line, so its field set is fixed here and
//! documented in docs/operations.md ("Access log"); tests and dashboards parse it. Optional
//! fields (`src.identity`, `dst.identity`, `dst.service`, `dst.vip`) are absent when they do
//! not apply; every other field is on every line.
//!
//! On a data-path worker the line is not written when the connection ends but kept, with the
//! figures of that moment, and written with the worker's other waiting lines when it runs out
//! of work and is about to sleep, when [`DEFER_MAX`] are waiting, or when the oldest has
//! waited [`DEFER_DELAY`] ([`idle`]; the agent's workers call these functions through their
//! hooks, `workers::Hooks`). Formatting a line through tracing-subscriber costs a few µs with
//! the caches cold, as they are at the end of each new connection; written together, the
//! lines share warm caches, and a worker that sleeps between connections writes them when it
//! has nothing else to do (ARCHITECTURE.md, "A new connection's user-space work"). Elsewhere
//! (the control plane, tests) a line is written at once.

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::context::PodContext;
use crate::identity::Identity;
use crate::metrics::{PodSeries, ProxyMetrics, Text, TrafficLabels, TrafficSeries};
use crate::service::ServiceName;

/// A socket address written as `SocketAddr`'s `Display` writes it, in one piece: std writes an
/// IPv4 address as seven pieces through `fmt`, ~1,500 instructions an address, three of them
/// on every access line (callgrind, 2026-12-05). IPv6 addresses are written by std.
pub struct Addr(pub SocketAddr);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(a) = self.0 else {
            return fmt::Display::fmt(&self.0, f);
        };
        // The longest: "255.255.255.255:65535".
        let mut buf = [0u8; 21];
        let mut len = 0;
        let mut put = |s: &str| {
            buf[len..len + s.len()].copy_from_slice(s.as_bytes());
            len += s.len();
        };
        let [a0, a1, a2, a3] = a.ip().octets();
        let mut digits = itoa::Buffer::new();
        put(digits.format(a0));
        for o in [a1, a2, a3] {
            put(".");
            put(digits.format(o));
        }
        put(":");
        put(digits.format(a.port()));
        // As std does with a width or precision: pad the whole address.
        f.pad(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
    }
}

/// How a connection ended; each has its own message.
#[derive(Debug)]
pub enum End {
    /// Relayed until both sides finished, or until one failed (`error`).
    Complete {
        sent: u64,
        recv: u64,
        error: Option<String>,
    },
    /// It never reached its destination: the connect failed, no endpoint, HBONE refused it.
    Failed(String),
    /// This agent refused it before any attempt: not an address of this pod, an unacceptable
    /// CONNECT, or an authorization policy.
    Refused(String),
}

impl End {
    /// The end of a relay that returned (bytes source → destination, destination → source) or
    /// failed mid-way (the bytes of a failed relay are not known).
    pub fn relayed(result: std::io::Result<(u64, u64)>) -> Self {
        match result {
            Ok((sent, recv)) => End::Complete {
                sent,
                recv,
                error: None,
            },
            Err(e) => End::Complete {
                sent: 0,
                recv: 0,
                error: Some(e.to_string()),
            },
        }
    }

    fn message(&self) -> &'static str {
        match self {
            End::Complete { .. } => "connection complete",
            End::Failed(_) => "connection failed",
            End::Refused(_) => "connection refused",
        }
    }
}

/// One connection's access line and (once counted) its traffic series.
pub struct ConnRecord<'a> {
    direction: &'static str,
    protocol: &'static str,
    src_addr: SocketAddr,
    src_identity: Option<Arc<str>>,
    src_workload: Option<Text>,
    dst_addr: Option<SocketAddr>,
    dst_identity: Option<Arc<str>>,
    dst_workload: Option<Text>,
    dst_service: Option<Arc<str>>,
    dst_vip: Option<SocketAddr>,
    pod: &'a PodContext,
    start: Instant,
    counted: Option<TrafficSeries>,
    ended: bool,
}

impl<'a> ConnRecord<'a> {
    /// A connection `src_addr` opened, seen by `pod`'s listener; `direction` is `outbound` or
    /// `inbound`, `protocol` `hbone` or `tcp`. Its duration counts from now.
    pub fn new(
        pod: &'a PodContext,
        direction: &'static str,
        protocol: &'static str,
        src_addr: SocketAddr,
    ) -> Self {
        Self {
            direction,
            protocol,
            src_addr,
            src_identity: None,
            src_workload: None,
            dst_addr: None,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            dst_vip: None,
            pod,
            start: Instant::now(),
            counted: None,
            ended: false,
        }
    }

    /// The client's address.
    pub fn src_addr(&self) -> SocketAddr {
        self.src_addr
    }

    /// `hbone` or `tcp`: how the connection is carried beyond the pod.
    pub fn protocol(&mut self, protocol: &'static str) -> &mut Self {
        self.protocol = protocol;
        self
    }

    /// Where the connection goes (for a Service, the chosen endpoint).
    pub fn dst(&mut self, addr: SocketAddr) -> &mut Self {
        self.dst_addr = Some(addr);
        self
    }

    pub fn src_identity(&mut self, id: &Identity) -> &mut Self {
        self.src_identity = Some(id.uri().clone());
        self
    }

    pub fn dst_identity(&mut self, id: &Identity) -> &mut Self {
        self.dst_identity = Some(id.uri().clone());
        self
    }

    pub fn workloads(&mut self, src: &Text, dst: &Text) -> &mut Self {
        self.src_workload = Some(src.clone());
        self.dst_workload = Some(dst.clone());
        self
    }

    /// The Service called and, outbound, the VIP and port the app called.
    pub fn service(&mut self, service: Option<&ServiceName>, vip: Option<SocketAddr>) -> &mut Self {
        self.dst_service = service.map(|s| s.hostname.clone());
        self.dst_vip = vip;
        self
    }

    /// Counts the connection as opened under `labels`; `series` is the pod's, which keeps the
    /// label set's counters so they are removed with the pod ([`ProxyMetrics::series`]).
    pub fn count(
        &mut self,
        metrics: &ProxyMetrics,
        labels: TrafficLabels,
        series: &Mutex<PodSeries>,
    ) {
        let s = metrics.series(labels, series);
        s.opened.inc();
        self.counted = Some(s);
    }

    /// Counts the connection as closed (if counted) and writes its access line.
    pub fn end(mut self, end: End) {
        self.finish(end);
    }

    fn finish(&mut self, end: End) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let (sent, recv) = match &end {
            End::Complete { sent, recv, .. } => (*sent, *recv),
            End::Failed(_) | End::Refused(_) => (0, 0),
        };
        if let Some(s) = &self.counted {
            // Istio's meaning: `received` is source → destination (what `sent` is here).
            s.closed.inc();
            s.received_bytes.inc_by(sent);
            s.sent_bytes.inc_by(recv);
        }
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        let message = end.message();
        let error = match end {
            End::Complete { error, .. } => error.unwrap_or_default(),
            End::Failed(e) | End::Refused(e) => e,
        };
        let line = Line {
            direction: self.direction,
            protocol: self.protocol,
            src_addr: self.src_addr,
            src_identity: self.src_identity.take(),
            src_workload: self.src_workload.take(),
            dst_workload: self.dst_workload.take(),
            dst_addr: self.dst_addr,
            dst_identity: self.dst_identity.take(),
            dst_service: self.dst_service.take(),
            dst_vip: self.dst_vip,
            pod: self.pod.name.as_str().into(),
            namespace: self.pod.namespace.as_str().into(),
            sent,
            recv,
            duration_ms: self.start.elapsed().as_millis() as u64,
            error,
            message,
        };
        let mut line = Some(line);
        let _ = DEFERRED.try_with(|d| {
            if let Ok(mut d) = d.try_borrow_mut()
                && let Some(d) = d.as_mut()
                && let Some(l) = line.take()
            {
                d.push(l);
            }
        });
        if let Some(l) = line {
            l.write();
        }
    }
}

/// One access line's fields, owned (a line may wait for its worker to run out of work).
struct Line {
    direction: &'static str,
    protocol: &'static str,
    src_addr: SocketAddr,
    src_identity: Option<Arc<str>>,
    src_workload: Option<Text>,
    dst_workload: Option<Text>,
    dst_addr: Option<SocketAddr>,
    dst_identity: Option<Arc<str>>,
    dst_service: Option<Arc<str>>,
    dst_vip: Option<SocketAddr>,
    pod: Box<str>,
    namespace: Box<str>,
    sent: u64,
    recv: u64,
    duration_ms: u64,
    error: String,
    message: &'static str,
}

impl Line {
    fn write(&self) {
        tracing::info!(target: "access",
            direction = self.direction,
            protocol = self.protocol,
            src.addr = %Addr(self.src_addr),
            src.identity = self.src_identity.as_ref().map(tracing::field::display),
            src.workload = %self.src_workload.as_deref().unwrap_or(crate::metrics::UNKNOWN),
            dst.workload = %self.dst_workload.as_deref().unwrap_or(crate::metrics::UNKNOWN),
            dst.addr = self.dst_addr.map(|a| tracing::field::display(Addr(a))),
            dst.identity = self.dst_identity.as_ref().map(tracing::field::display),
            dst.service = self.dst_service.as_deref(),
            dst.vip = self.dst_vip.map(|a| tracing::field::display(Addr(a))),
            pod = %&*self.pod,
            namespace = %&*self.namespace,
            bytes_sent = self.sent,
            bytes_recv = self.recv,
            duration_ms = self.duration_ms,
            error = self.error.as_str(),
            "{}", self.message);
    }
}

/// The most lines a worker keeps waiting.
pub const DEFER_MAX: usize = 16;

/// The longest a line waits while its worker keeps working.
pub const DEFER_DELAY: Duration = Duration::from_millis(50);

thread_local! {
    /// On a data-path worker, its waiting lines.
    static DEFERRED: RefCell<Option<Deferred>> = const { RefCell::new(None) };
}

/// Lines kept to be written together.
#[derive(Default)]
struct Deferred {
    lines: Vec<Line>,
    /// When the oldest came.
    since: Option<Instant>,
}

impl Deferred {
    fn push(&mut self, line: Line) {
        if self.lines.is_empty() {
            self.lines.reserve_exact(DEFER_MAX);
            self.since = Some(Instant::now());
        }
        self.lines.push(line);
        if self.lines.len() >= DEFER_MAX || self.overdue() {
            self.write();
        }
    }

    fn overdue(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= DEFER_DELAY)
    }

    fn write(&mut self) {
        for l in self.lines.drain(..) {
            l.write();
        }
        self.since = None;
    }
}

/// From now on, this thread keeps its access lines to write them in [`idle`] (a data-path
/// worker's `started` hook).
pub fn defer_on_this_thread() {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Deferred::default()));
}

/// The worker ran out of work (`sleeps`: and is about to sleep): writes its waiting lines if
/// it sleeps or they have waited [`DEFER_DELAY`] (part of a worker's `idle` hook).
pub fn idle(sleeps: bool) {
    let _ = DEFERRED.try_with(|d| {
        // Written inside the borrow, keeping the list's allocation: a record ended while the
        // lines are written (none is, today) would find the cell taken and write at once.
        if let Ok(mut d) = d.try_borrow_mut()
            && let Some(d) = d.as_mut()
            && (sleeps || d.overdue())
        {
            d.write();
        }
    });
}

/// Writes this thread's waiting lines and stops keeping them (a worker's `ended` hook: its
/// thread-local values may be dropped after the log's, too late to format a line).
pub fn stop_deferring() {
    let taken = DEFERRED
        .try_with(|d| d.try_borrow_mut().ok().and_then(|mut d| d.take()))
        .ok()
        .flatten();
    if let Some(mut lines) = taken {
        lines.write();
    }
}

impl Drop for ConnRecord<'_> {
    /// A record dropped unfinished belongs to a connection cut when its pod was released (its
    /// task was cancelled): it is still counted closed and logged, with the bytes unknown.
    fn drop(&mut self) {
        self.finish(End::Complete {
            sent: 0,
            recv: 0,
            error: Some("closed: the pod's proxy stopped".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Peer;

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A plain fmt subscriber, without time, writing into `sink`.
    fn into_sink(sink: &Sink) -> impl tracing::Subscriber + Send + Sync + 'static {
        let writer = sink.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish()
    }

    fn lines(f: impl FnOnce()) -> Vec<String> {
        let sink = Sink::default();
        tracing::subscriber::with_default(into_sink(&sink), f);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        out.lines().map(str::to_owned).collect()
    }

    const ALWAYS: [&str; 12] = [
        "direction=",
        "protocol=",
        "src.addr=",
        "src.workload=",
        "dst.workload=",
        "pod=",
        "namespace=",
        "bytes_sent=",
        "bytes_recv=",
        "duration_ms=",
        "error=",
        "access",
    ];

    fn pod() -> PodContext {
        PodContext {
            name: "reviews-1".into(),
            namespace: "shop".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    #[test]
    fn every_end_writes_one_line_with_the_fixed_fields_and_counts_a_counted_connection_once() {
        let pod = pod();
        let metrics = ProxyMetrics::default();
        let series = Mutex::new(PodSeries::default());
        let src: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let to: SocketAddr = "10.0.1.7:9080".parse().unwrap();
        let labels = TrafficLabels::new("source", &Peer::unknown(), &Peer::unknown(), true, "-");
        let out = lines(|| {
            let mut r = ConnRecord::new(&pod, "outbound", "hbone", src);
            r.dst(to)
                .workloads(&"reviews-1".into(), &"ratings-1".into());
            r.count(&metrics, labels.clone(), &series);
            r.end(End::Complete {
                sent: 5,
                recv: 7,
                error: None,
            });
            ConnRecord::new(&pod, "outbound", "tcp", src).end(End::Failed("boom".into()));
            ConnRecord::new(&pod, "inbound", "tcp", src).end(End::Refused("no".into()));
            // Dropped unfinished: the pod went away with the connection open.
            let mut r = ConnRecord::new(&pod, "inbound", "hbone", src);
            r.count(&metrics, labels.clone(), &series);
            drop(r);
        });
        assert_eq!(out.len(), 4, "{out:#?}");
        for l in &out {
            for f in ALWAYS {
                assert!(l.contains(f), "{f} missing from {l}");
            }
        }
        assert!(out[0].contains("connection complete"), "{}", out[0]);
        assert!(
            out[0].contains("dst.addr=10.0.1.7:9080 ")
                && out[0].contains("src.workload=reviews-1 dst.workload=ratings-1")
                && out[0].contains("bytes_sent=5 bytes_recv=7"),
            "{}",
            out[0]
        );
        assert!(out[1].contains("connection failed") && out[1].contains("error=\"boom\""));
        assert!(out[2].contains("connection refused") && out[2].contains("error=\"no\""));
        assert!(
            out[3].contains("connection complete")
                && out[3].contains("closed: the pod's proxy stopped"),
            "{}",
            out[3]
        );
        // Two counted records: each opened and closed exactly once.
        assert_eq!(metrics.opened.get_or_create(&labels).get(), 2);
        assert_eq!(metrics.closed.get_or_create(&labels).get(), 2);
        assert_eq!(metrics.received_bytes.get_or_create(&labels).get(), 5);
        assert_eq!(metrics.sent_bytes.get_or_create(&labels).get(), 7);
        assert_eq!(series.lock().unwrap().len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn an_address_is_written_as_std_writes_it(
            v4 in proptest::prelude::any::<[u8; 4]>(),
            v6 in proptest::prelude::any::<[u16; 8]>(),
            port in proptest::prelude::any::<u16>(),
            scope in proptest::prelude::any::<u32>(),
        ) {
            let v6 = std::net::SocketAddrV6::new(v6.into(), port, 0, scope);
            for a in [SocketAddr::from((v4, port)), v6.into()] {
                proptest::prop_assert_eq!(Addr(a).to_string(), a.to_string());
                proptest::prop_assert_eq!(format!("{:>48}|{:<30}|", Addr(a), Addr(a)), format!("{a:>48}|{a:<30}|"));
            }
        }
    }

    #[test]
    fn the_widest_ipv4_address_fits() {
        let a: SocketAddr = "255.255.255.255:65535".parse().unwrap();
        assert_eq!(Addr(a).to_string(), "255.255.255.255:65535");
        let a: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(Addr(a).to_string(), "0.0.0.0:0");
    }

    /// The series a registry exports, as text.
    fn exported(metrics: &ProxyMetrics) -> String {
        let mut r = prometheus_client::registry::Registry::default();
        metrics.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    /// A connection still open when its pod is released ends after the pod's series were
    /// removed: it is logged, but no series comes back (it would be exported for a pod that
    /// is gone, and never removed). Other pods' series stay.
    #[test]
    fn a_connection_ending_after_its_pod_was_released_brings_no_series_back() {
        let pod = pod();
        let metrics = ProxyMetrics::default();
        let (gone, stays) = (
            Mutex::new(PodSeries::default()),
            Mutex::new(PodSeries::default()),
        );
        let src: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let peer = |w: &'static str| Peer {
            workload: w.into(),
            ..Peer::unknown()
        };
        let labels =
            |w: &'static str| TrafficLabels::new("source", &peer(w), &Peer::unknown(), true, "-");
        let out = lines(|| {
            let mut open = ConnRecord::new(&pod, "outbound", "hbone", src);
            open.count(&metrics, labels("leaving"), &gone);
            let mut other = ConnRecord::new(&pod, "outbound", "hbone", src);
            other.count(&metrics, labels("staying"), &stays);
            other.end(End::Complete {
                sent: 1,
                recv: 2,
                error: None,
            });
            let before = exported(&metrics);
            assert!(
                before.contains("source_workload=\"leaving\"")
                    && before.contains("source_workload=\"staying\""),
                "{before}"
            );
            // The pod is released (PodProxy's drop), then its connection ends.
            metrics.forget(&std::mem::take(&mut *gone.lock().unwrap()));
            open.end(End::Complete {
                sent: 3,
                recv: 4,
                error: None,
            });
        });
        assert_eq!(out.len(), 2, "both connections logged: {out:#?}");
        let after = exported(&metrics);
        assert!(
            !after.contains("source_workload=\"leaving\""),
            "the released pod's series came back:\n{after}"
        );
        assert!(
            after.contains("istio_tcp_connections_closed_total{")
                && after.contains("source_workload=\"staying\""),
            "the other pod's series must stay:\n{after}"
        );
        assert!(gone.lock().unwrap().is_empty());
    }

    /// Two pods with one label set (a pod re-created under its name before the old one's
    /// release): the first release leaves the series to the other, which goes on counting
    /// into it; the last release removes it.
    #[test]
    fn a_label_set_two_pods_share_goes_with_the_last_of_them() {
        let pod = pod();
        let metrics = ProxyMetrics::default();
        let (old, new) = (
            Mutex::new(PodSeries::default()),
            Mutex::new(PodSeries::default()),
        );
        let src: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let labels = TrafficLabels::new("source", &Peer::unknown(), &Peer::unknown(), true, "-");
        let closed = |m: &ProxyMetrics| {
            exported(m)
                .lines()
                .find(|l| l.starts_with("istio_tcp_connections_closed_total{"))
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        lines(|| {
            for cache in [&old, &new] {
                let mut r = ConnRecord::new(&pod, "outbound", "hbone", src);
                r.count(&metrics, labels.clone(), cache);
                r.end(End::Failed("x".into()));
            }
            metrics.forget(&std::mem::take(&mut *old.lock().unwrap()));
            assert_eq!(
                closed(&metrics).as_deref(),
                Some("2"),
                "{}",
                exported(&metrics)
            );
            let mut r = ConnRecord::new(&pod, "outbound", "hbone", src);
            r.count(&metrics, labels.clone(), &new);
            r.end(End::Failed("y".into()));
            assert_eq!(
                closed(&metrics).as_deref(),
                Some("3"),
                "{}",
                exported(&metrics)
            );
            metrics.forget(&std::mem::take(&mut *new.lock().unwrap()));
            assert_eq!(closed(&metrics), None, "{}", exported(&metrics));
        });
    }

    /// On a data-path worker a line waits: not written when its connection ends, nor while
    /// the worker still has work, but when it is about to sleep, when DEFER_MAX wait, or when
    /// the oldest has waited DEFER_DELAY; in the order the connections ended, each as it
    /// would have been written at once (the figures of its end), and none twice. Once the
    /// worker stops deferring (it ends), what waited is written and the rest goes at once.
    #[test]
    fn on_a_worker_lines_wait_for_it_to_run_out_of_work_and_are_written_as_they_were() {
        let pod = pod();
        let src: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let record = |error: &str| {
            let mut r = ConnRecord::new(&pod, "outbound", "hbone", src);
            r.dst("10.0.1.7:9080".parse().unwrap())
                .workloads(&"reviews-1".into(), &"ratings-1".into());
            r.end(End::Complete {
                sent: 5,
                recv: 7,
                error: Some(error.into()),
            });
        };
        let at_once = lines(|| record("e0"));
        assert_eq!(at_once.len(), 1);

        let sink = Sink::default();
        let subscriber = into_sink(&sink);
        let written = || {
            let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            out.lines().map(str::to_owned).collect::<Vec<_>>()
        };
        let overdue = || {
            DEFERRED.with(|d| {
                d.borrow_mut().as_mut().unwrap().since = Some(Instant::now() - DEFER_DELAY)
            })
        };
        tracing::subscriber::with_default(subscriber, || {
            defer_on_this_thread();
            record("e0");
            assert!(written().is_empty(), "written when the connection ended");
            idle(false);
            assert!(written().is_empty(), "written while the worker had work");
            idle(true);
            assert_eq!(written(), at_once, "not written as at once, or not once");
            idle(true);
            assert_eq!(written().len(), 1, "written twice");

            for i in 1..DEFER_MAX {
                record(&format!("e{i}"));
            }
            assert_eq!(written().len(), 1);
            record(&format!("e{DEFER_MAX}"));
            let out = written();
            assert_eq!(out.len(), 1 + DEFER_MAX, "DEFER_MAX lines waited");
            for (i, l) in out.iter().enumerate() {
                assert!(
                    l.ends_with(&format!("error=\"e{i}\"")),
                    "out of order: {out:#?}"
                );
            }

            record("late");
            idle(false);
            assert_eq!(written().len(), 2 + DEFER_MAX - 1);
            overdue();
            idle(false);
            assert_eq!(
                written().len(),
                2 + DEFER_MAX,
                "an overdue line still waits"
            );
            record("late too");
            overdue();
            record("after");
            assert_eq!(
                written().len(),
                4 + DEFER_MAX,
                "an overdue line still waits"
            );

            record("at the end");
            stop_deferring();
            assert_eq!(
                written().len(),
                5 + DEFER_MAX,
                "a waiting line lost at the end"
            );
            record("after the end");
            assert_eq!(written().len(), 6 + DEFER_MAX, "deferred after the end");
        });
    }
}
