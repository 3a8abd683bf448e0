//! Data-path workers: each proxied connection lives, from accept to close, on one thread.
//!
//! Why not tokio's multi-threaded runtime for the data path: there an HBONE connection's
//! driver task and the relay tasks of its streams land on different workers, and every chunk
//! relayed wakes a task on the other thread (a futex wake, a context switch, and the h2
//! streams mutex taken from both sides); idle workers are also woken to steal whatever was
//! just scheduled. Here every worker is a single-threaded runtime on its own thread. A
//! connection accepted by a listener stays on the listener's worker while that worker is no
//! more loaded than the others, else goes to the least loaded ([`Workers::place`]: a
//! sequential client's next connection finds the thread it just used awake, concurrent
//! connections spread; a connection whose client half-closed stops counting, [`closing`],
//! unless it goes on to download, [`sent_to_client`]). Everything it spawns (the HBONE
//! connection it opens, an inbound connection's streams) runs on that same worker, and the
//! HBONE client pool keeps separate connections per worker ([`current`]), so a chunk
//! crosses no thread boundary between the app's socket and the TLS socket. Concurrent
//! connections are spread over the workers, so several connections still use every core;
//! one connection uses one.
//!
//! A pod's listeners are spread over the workers too (their accept loops are never held up by
//! the control plane); the control plane stays on the agent's main runtime.
//!
//! A worker with nothing to do polls for a short while before it sleeps (`spin`, see
//! [`Workers::start`]): a connection's next chunk often follows within microseconds, and a
//! thread put to sleep in `epoll_wait` has to be woken for it, which on a virtual machine
//! whose idle vCPUs halt is a trip through the hypervisor at every hop of a round trip.
//! `ambit_worker_polls_total` counts, per worker, the polls that ended in an event and those
//! that ended in sleep. Each time a worker runs out of work, once its polling is over, it
//! calls the `idle` hook it was started with ([`Hooks`]): the agent writes the access and log
//! lines a worker kept then, before it sleeps (`ambit_agent::log::WORKER_HOOKS`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_common::sys;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

thread_local! {
    /// (the `Workers`' id, the worker's index) on a worker thread.
    static WORKER: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
    /// On a worker thread that polls before parking: its runtime's epoll instance and how
    /// long to poll it.
    static SPIN: RefCell<Option<Spin>> = const { RefCell::new(None) };
    /// On a worker thread, the hook it calls each time it runs out of work ([`Idle`]).
    static IDLE: Cell<Option<Idle>> = const { Cell::new(None) };
}

/// Called on a worker thread each time it has run out of work, after its polling (if it
/// polls): with `true` when it is about to sleep (nothing came), `false` when the polling
/// found an event and it goes on at once. It runs on the data path: it must be short.
pub type Idle = fn(sleeps: bool);

/// What each worker thread calls besides running its runtime ([`Workers::start_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Hooks {
    /// On the thread, before its first task.
    pub started: Option<fn()>,
    /// Each time it runs out of work ([`Idle`]).
    pub idle: Option<Idle>,
    /// On the thread, once its runtime and the tasks still on it have been dropped.
    pub ended: Option<fn()>,
}

/// What a polling worker needs before it parks.
struct Spin {
    /// Its runtime's epoll instance.
    epoll: OwnedFd,
    /// How long to poll it.
    window: Duration,
    /// Its counters: `[event, slept]`.
    polls: [Counter; 2],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PollLabels {
    worker: String,
    /// `event` (one came while polling: the worker did not sleep) or `slept` (none came in
    /// the window).
    outcome: String,
}

const OUTCOMES: [&str; 2] = ["event", "slept"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

/// Tells the `Workers` of one process apart (tests run several).
static IDS: AtomicUsize = AtomicUsize::new(0);

/// The index of the data-path worker running the caller, if any.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get).map(|(_, i)| i)
}

/// Where proxied connections run.
pub struct Workers {
    /// At least one.
    handles: Vec<Handle>,
    /// The workers' threads, waited for when dropped.
    threads: Vec<std::thread::JoinHandle<()>>,
    id: usize,
    next: AtomicUsize,
    stop: CancellationToken,
    polls: Family<PollLabels, Counter>,
    /// Per worker, the connections placed on it that are not closing (see [`closing`]); also
    /// `ambit_worker_connections`.
    load: Arc<[Gauge]>,
    connections: Family<WorkerLabels, Gauge>,
}

tokio::task_local! {
    /// The load a connection placed by [`Workers::run`] adds to its worker, until the
    /// connection ends or [`closing`] gives it back (and [`sent_to_client`] takes it again).
    static LOAD: RefCell<Load>;
}

/// One connection's share of its worker's load; given back when dropped.
struct Load {
    load: Arc<[Gauge]>,
    worker: usize,
    /// Counted in `load` now (not from [`closing`] until [`sent_to_client`] sees a download).
    counted: bool,
    /// Bytes sent to the client since it half-closed.
    after_close: usize,
}

impl Load {
    fn new(load: Arc<[Gauge]>, worker: usize) -> Self {
        load[worker].inc();
        Self {
            load,
            worker,
            counted: true,
            after_close: 0,
        }
    }

    fn set_counted(&mut self, counted: bool) {
        if std::mem::replace(&mut self.counted, counted) == counted {
            return;
        }
        if counted {
            self.load[self.worker].inc();
        } else {
            self.load[self.worker].dec();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.set_counted(false);
    }
}

/// Bytes a connection sends to its client after the client half-closed before it counts
/// again ([`sent_to_client`]): past what the answer to a last request usually is, well
/// short of a download.
pub const DOWNLOAD_AFTER_CLOSE: usize = 256 << 10;

/// Called by a connection placed by [`Workers::run`] once its client has finished sending
/// (half-closed): from then on it no longer counts toward its worker's load. A client that
/// closes and at once opens its next connection (the common pattern of short requests) would
/// otherwise find the worker it just used loaded, and the new connection would be handed to
/// another, sleeping, worker. Elsewhere (a task not placed by `run`), nothing.
pub fn closing() {
    let _ = LOAD.try_with(|l| l.borrow_mut().set_counted(false));
}

/// Called by a connection placed by [`Workers::run`] for each chunk it writes to its client:
/// one that half-closed but still receives more than [`DOWNLOAD_AFTER_CLOSE`] bytes (a
/// download behind a request sent with a half-close) counts toward its worker's load again,
/// so concurrent downloads are spread as concurrent connections are. Elsewhere, nothing.
pub fn sent_to_client(n: usize) {
    let _ = LOAD.try_with(|l| {
        let mut l = l.borrow_mut();
        if !l.counted {
            l.after_close += n;
            if l.after_close > DOWNLOAD_AFTER_CLOSE {
                l.set_counted(true);
            }
        }
    });
}

impl Workers {
    /// `n` (at least one) worker threads named `ambit-data-<i>`, each running a single-threaded
    /// runtime until the returned value is dropped. A worker that runs out of work polls its
    /// runtime's events for up to `spin` before it sleeps (zero: it sleeps at once); the
    /// polling yields the CPU at every turn, so a thread runnable on the same CPU (often the
    /// app the worker waits for) is not held up by it.
    pub fn start(n: usize, spin: Duration) -> io::Result<Self> {
        Self::start_with(n, spin, Hooks::default())
    }

    /// As [`Workers::start`], and each worker calls `hooks`. Dropping the returned value
    /// stops the workers and waits (at most [`STOP_WAIT`]) for their threads to end, so what
    /// their last tasks and hooks left (kept log lines, written by `ended` and thread-local
    /// destructors) is done before the process exits.
    pub fn start_with(n: usize, spin: Duration, hooks: Hooks) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let polls = Family::<PollLabels, Counter>::default();
        let connections = Family::<WorkerLabels, Gauge>::default();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(poll_before_park)
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            let polls = polls.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ambit-data-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some((id, i))));
                    IDLE.with(|h| h.set(hooks.idle));
                    if let Some(started) = hooks.started {
                        started();
                    }
                    if !spin.is_zero() {
                        let _in_runtime = rt.enter();
                        match runtime_epoll() {
                            Ok(epoll) => SPIN.with(|s| {
                                // Created on the worker's thread (the counters it alone
                                // updates are allocated apart from the other workers'), and
                                // only for a worker that polls.
                                let polls = OUTCOMES.map(|outcome| {
                                    polls
                                        .get_or_create(&PollLabels {
                                            worker: i.to_string(),
                                            outcome: outcome.into(),
                                        })
                                        .clone()
                                });
                                *s.borrow_mut() = Some(Spin {
                                    epoll,
                                    window: spin,
                                    polls,
                                })
                            }),
                            Err(e) => warn!("worker {i} sleeps without polling first: {e}"),
                        }
                    }
                    rt.spawn(anchor_timers());
                    rt.block_on(stop.cancelled());
                    // Dropping the runtime cancels what still runs on it (the process is
                    // ending: the agent drained its connections before).
                    drop(rt);
                    if let Some(ended) = hooks.ended {
                        ended();
                    }
                })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            threads,
            id,
            next: AtomicUsize::new(0),
            stop,
            polls,
            load: (0..n.max(1))
                .map(|i| {
                    let worker = i.to_string();
                    connections.get_or_create(&WorkerLabels { worker }).clone()
                })
                .collect(),
            connections,
        })
    }

    /// Registers the workers' polling counters (none when they do not poll).
    pub fn register_metrics(&self, r: &mut Registry) {
        r.register(
            "ambit_worker_polls",
            "Times a data-path worker ran out of work and polled before sleeping, by outcome: event (one came while it polled, so it did not sleep), slept (none came within --worker-spin-us)",
            self.polls.clone(),
        );
        r.register(
            "ambit_worker_connections",
            "Connections on a data-path worker that count toward its load when a new connection is placed: open, except those whose client has half-closed and that only finish (one that goes on to download counts)",
            self.connections.clone(),
        );
    }

    /// How many connections count toward `worker`'s load now.
    #[cfg(test)]
    pub(crate) fn load_of(&self, worker: usize) -> usize {
        self.load[worker].get() as usize
    }

    /// The next worker in turn.
    fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Runs the future `make` returns as a task of the next worker in turn (created on that
    /// worker, so the sockets it registers belong to that worker's runtime).
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handles[self.next()].spawn(async move { make().await });
    }

    /// The worker a new connection goes to: the calling worker while it is no more loaded
    /// than any other (no hand-off, and the thread is awake), else the least loaded, ties
    /// going to the workers in turn; and whether that is the calling worker.
    fn place(&self) -> (usize, bool) {
        let load = |j: usize| self.load[j].get();
        let n = self.handles.len();
        let start = self.next();
        let least = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&j| load(j))
            .unwrap_or(start);
        match WORKER.with(Cell::get) {
            Some((id, here)) if id == self.id && load(here) <= load(least) => (here, true),
            _ => (least, false),
        }
    }

    /// Runs `serve(tcp)` on a worker ([`Workers::place`]). A socket accepted on another
    /// thread is taken off that thread's runtime and registered with the worker's; one that
    /// cannot move is closed (the error is logged): its peer sees the connection end, as for
    /// a failed accept.
    pub fn run<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (i, here) = self.place();
        let load = RefCell::new(Load::new(self.load.clone(), i));
        if here {
            tokio::spawn(LOAD.scope(load, serve(tcp)));
            return;
        }
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!("handing a connection to a worker failed: {e}");
                return;
            }
        };
        self.handles[i].spawn(LOAD.scope(load, async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => debug!("registering a connection with its worker failed: {e}"),
            }
        }));
    }

    /// Has every worker call its [`Idle`] hook on its own thread as before a sleep (`true`),
    /// and waits (at most [`STOP_WAIT`]) until all have: what the workers keep until they run
    /// out of work (the agent's access lines) is written when this returns. For an orderly
    /// stop: without it a worker writes its last kept lines when it next parks or ends, which
    /// can come after the agent's own last line.
    pub async fn flush(&self) {
        let mut done = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let (tx, rx) = tokio::sync::oneshot::channel();
            h.spawn(async move {
                if let Some(idle) = IDLE.with(Cell::get) {
                    idle(true);
                }
                let _ = tx.send(());
            });
            done.push(rx);
        }
        let _ = tokio::time::timeout(STOP_WAIT, async {
            for rx in done {
                let _ = rx.await;
            }
        })
        .await;
    }
}

/// The epoll instance of the runtime the caller is in: the one a socket registered with the
/// runtime is in.
fn runtime_epoll() -> io::Result<OwnedFd> {
    let (probe, _peer) = tokio::net::UnixDatagram::pair()?;
    sys::epoll_watching(probe.as_fd())?
        .ok_or_else(|| io::Error::other("the runtime's epoll instance was not found"))
}

/// Called by a worker's runtime before its thread sleeps: polls the runtime's events for up
/// to the worker's `spin`, yielding the CPU between polls, and returns as soon as one is ready
/// (the runtime then collects it without sleeping) or the time is up.
///
/// The time is fixed. A window adapted to the idle spells by the kernel's haltpoll rule
/// (doubling while spells end within the maximum, halving while they outlast it) was
/// measured and lost the whole latency gain: once a worker stops polling, the other threads'
/// wake-ups land on halted vCPUs again, spells lengthen, and the window shrinks further
/// (ARCHITECTURE.md, "What the data path does per byte").
///
/// Then it calls the worker's [`Idle`] hook, if any, with whether it sleeps.
fn poll_before_park() {
    let sleeps = SPIN.with(|s| {
        let Some(spin) = &*s.borrow() else {
            return true;
        };
        let start = Instant::now();
        loop {
            if sys::readable_now(spin.epoll.as_fd()) {
                spin.polls[0].inc();
                return false;
            }
            if start.elapsed() >= spin.window {
                spin.polls[1].inc();
                return true;
            }
            std::thread::yield_now();
        }
    });
    if let Some(idle) = IDLE.with(Cell::get) {
        idle(sleeps);
    }
}

/// How far ahead a worker always has a timer ([`anchor_timers`]).
const TIMER_ANCHOR: Duration = Duration::from_secs(1);

/// Keeps a timer at most [`TIMER_ANCHOR`] ahead on the worker's runtime, for as long as it
/// runs.
///
/// Why: tokio's time driver wakes its own thread through the runtime's eventfd whenever a
/// timer is registered that is due earlier than the wake-up the driver last planned
/// (`reregister` in tokio's `runtime/time`), and an idle worker plans none. Every new
/// connection registers one (the CONNECT's answer on the client side, the connect to the app
/// on the destination side, both `connect_timeout`, 10 s), so every connection cost a `write`
/// to the worker's own eventfd and an extra turn of its event loop (strace: one per connection
/// on each agent, ARCHITECTURE.md). With this timer never more than a second away, a timeout
/// of more than a second is never the earliest. Costs one wake-up a second of an idle worker.
async fn anchor_timers() {
    loop {
        tokio::time::sleep(TIMER_ANCHOR).await;
    }
}

/// How long dropping [`Workers`] waits for their threads to end.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        // Bounded: std's `join` has no timeout, and a worker held up (a task whose drop
        // blocks) must not hold up the agent's exit.
        let deadline = Instant::now() + STOP_WAIT;
        for t in std::mem::take(&mut self.threads) {
            // Dropped by a task of a worker: that thread ends after this returns.
            if t.thread().id() == std::thread::current().id() {
                continue;
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Waits (at most 5 s, checking every millisecond) for `done`; for the crate's tests.
#[cfg(test)]
pub(crate) async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..5000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("not seen within 5 s: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Every connection runs on one worker thread from start to end, including what it spawns,
    /// and, placed from outside the workers, successive connections go to successive idle
    /// workers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_and_what_it_spawns_stay_on_one_worker() {
        let workers = Workers::start(3, Duration::ZERO).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..6 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            workers.run(tcp, move |mut tcp| async move {
                let accepted_on = (current(), std::thread::current().id());
                // A task the connection spawns, as an HBONE connection spawns its driver.
                let spawned = tokio::spawn(async { (current(), std::thread::current().id()) })
                    .await
                    .unwrap();
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await.unwrap();
                let ended_on = (current(), std::thread::current().id());
                // Before the echo: the client starts the next connection only after it.
                tx.send((accepted_on, spawned, ended_on)).unwrap();
                tcp.write_all(&b).await.unwrap();
            });
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"x", "the connection works on its worker");
            // Placement follows the load: the next connection is placed once this one has
            // ended and given its load back (its worker may still be finishing it).
            let idle = || workers.load.iter().all(|l| l.get() == 0);
            until("the connection's load given back", idle).await;
        }
        drop(tx);
        let mut order = Vec::new();
        let mut threads = HashSet::new();
        while let Some((a, s, e)) = rx.recv().await {
            assert!(a.0.is_some(), "ran on a worker, not the caller's runtime");
            assert_eq!(a, s, "a spawned task runs on its connection's worker");
            assert_eq!(a, e, "a connection never moves to another thread");
            order.push(a.0.unwrap());
            threads.insert(a.1);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2], "idle workers are taken in turn");
        assert_eq!(threads.len(), 3);
        assert_eq!(current(), None, "the caller is not a worker");
    }

    /// A listener on one of `workers` that places each of `n` connections with
    /// [`Workers::run`]. By its client's first byte a connection is `o` (open: the client
    /// keeps sending), `c` (the client half-closes after it: [`closing`]) or `d` (the same,
    /// then a download: [`DOWNLOAD_AFTER_CLOSE`] bytes to the client, and one more once the
    /// stage is 1). Each reports its worker when placed (a `d` again after its last byte) and
    /// stays open until the stage is 2. Returns the address, the listener's worker, the
    /// reports and the stage.
    async fn placement_listener(
        workers: &Arc<Workers>,
        n: usize,
    ) -> (
        std::net::SocketAddr,
        usize,
        tokio::sync::mpsc::UnboundedReceiver<usize>,
        tokio::sync::watch::Sender<u8>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (placed_tx, placed) = tokio::sync::mpsc::unbounded_channel();
        let (stage_tx, stage) = tokio::sync::watch::channel(0u8);
        let (on_tx, on) = tokio::sync::oneshot::channel();
        let w = workers.clone();
        workers.spawn(move || async move {
            let _ = on_tx.send(current());
            let listener = TcpListener::from_std(listener).unwrap();
            for _ in 0..n {
                let (tcp, _) = listener.accept().await.unwrap();
                let (placed_tx, mut stage) = (placed_tx.clone(), stage.clone());
                w.run(tcp, move |mut tcp| async move {
                    let mut first = [0u8; 1];
                    tcp.read_exact(&mut first).await.unwrap();
                    if first[0] != b'o' {
                        let mut rest = Vec::new();
                        tcp.read_to_end(&mut rest).await.unwrap();
                        closing();
                    }
                    if first[0] == b'd' {
                        sent_to_client(DOWNLOAD_AFTER_CLOSE);
                        placed_tx.send(current().unwrap()).unwrap();
                        let _ = stage.wait_for(|s| *s >= 1).await;
                        sent_to_client(1);
                    }
                    placed_tx.send(current().unwrap()).unwrap();
                    let _ = stage.wait_for(|s| *s >= 2).await;
                });
            }
        });
        (addr, on.await.unwrap().unwrap(), placed, stage_tx)
    }

    /// A client of [`placement_listener`]: sends `byte`, half-closes unless it is `o`, and
    /// returns the worker its connection was placed on (the connection stays open in
    /// `clients`).
    async fn placed(
        addr: std::net::SocketAddr,
        byte: u8,
        clients: &mut Vec<TcpStream>,
        reports: &mut tokio::sync::mpsc::UnboundedReceiver<usize>,
    ) -> usize {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&[byte]).await.unwrap();
        if byte != b'o' {
            c.shutdown().await.unwrap();
        }
        clients.push(c);
        reports.recv().await.unwrap()
    }

    /// A listener on a worker keeps a new connection on its own worker while that worker is
    /// no more loaded than the other; a connection whose client half-closed ([`closing`])
    /// no longer counts, one still sending does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_connection_stays_on_the_accepting_worker_unless_it_is_loaded() {
        let workers = Arc::new(Workers::start(2, Duration::ZERO).unwrap());
        let (addr, here, mut reports, stage) = placement_listener(&workers, 5).await;
        let mut clients = Vec::new();
        let mut place = async |byte| placed(addr, byte, &mut clients, &mut reports).await;
        // Nothing placed yet: the listener's own worker.
        assert_eq!(place(b'c').await, here, "an idle worker keeps it");
        // The first is still open but closing: it does not count.
        assert_eq!(place(b'c').await, here, "closing connections do not count");
        // This one keeps sending (not half-closed): it counts...
        assert_eq!(place(b'o').await, here);
        // ...so the next goes to the other, idle, worker.
        assert_eq!(place(b'o').await, 1 - here, "a loaded worker hands off");
        // Even again: the listener's worker.
        assert_eq!(place(b'o').await, here);
        stage.send(2).unwrap();
    }

    /// A connection whose client half-closed counts again once it has sent its client more
    /// than [`DOWNLOAD_AFTER_CLOSE`] bytes: concurrent downloads behind half-closed requests
    /// spread over the workers like other concurrent connections.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_closed_connection_that_keeps_downloading_counts_again() {
        let workers = Arc::new(Workers::start(2, Duration::ZERO).unwrap());
        let (addr, here, mut reports, stage) = placement_listener(&workers, 4).await;
        let mut clients = Vec::new();
        // Half-closed, and no more sent to its client than the answer to a last request.
        assert_eq!(placed(addr, b'd', &mut clients, &mut reports).await, here);
        // It does not count: the listener's worker is no more loaded than the other.
        assert_eq!(placed(addr, b'o', &mut clients, &mut reports).await, here);
        assert_eq!(
            placed(addr, b'o', &mut clients, &mut reports).await,
            1 - here
        );
        // One byte more to its client: a download, it counts again (2 against 1)...
        stage.send(1).unwrap();
        assert_eq!(reports.recv().await.unwrap(), here);
        // ...so the next goes to the other worker, though the two are even without it.
        assert_eq!(
            placed(addr, b'o', &mut clients, &mut reports).await,
            1 - here,
            "a download behind a half-close counts"
        );
        stage.send(2).unwrap();
    }

    /// Worker 0's polls that ended in `outcome`.
    fn polls(workers: &Workers, outcome: &str) -> u64 {
        workers
            .polls
            .get_or_create(&PollLabels {
                worker: "0".into(),
                outcome: outcome.into(),
            })
            .get()
    }

    /// A client of a connection the workers echo byte by byte, after calling `first` on the
    /// worker.
    async fn echoed(workers: &Workers, first: fn()) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        workers.run(tcp, move |mut tcp| async move {
            first();
            let mut b = [0u8; 1];
            while tcp.read_exact(&mut b).await.is_ok() {
                if tcp.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        client
    }

    /// The runtime calls the poll each time a spinning worker runs out of work, and counts it
    /// (ending in an event or in sleep). A worker that does not spin counts nothing.
    #[tokio::test]
    async fn spinning_workers_poll_each_time_they_run_out_of_work_and_count_it() {
        for spin in [Duration::from_micros(50), Duration::ZERO] {
            let workers = Workers::start(1, spin).unwrap();
            let count = |outcome: &str| polls(&workers, outcome);
            let polled = || count("event") + count("slept");
            let mut client = echoed(&workers, || {}).await;
            for byte in *b"abc" {
                let before = polled();
                client.write_all(&[byte]).await.unwrap();
                let mut b = [0u8; 1];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], byte);
                if !spin.is_zero() {
                    // Having echoed, the worker waits for the next byte: out of work, it
                    // polled before sleeping.
                    until("a poll after the echo", || polled() > before).await;
                }
            }
            if spin.is_zero() {
                assert_eq!(
                    OUTCOMES.map(count),
                    [0, 0],
                    "a worker without spin polls nothing"
                );
            }
        }
    }

    /// Calls of the idle hook in the test below: `[went on, about to sleep]`.
    static IDLE_CALLS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    fn count_idle(sleeps: bool) {
        IDLE_CALLS[usize::from(sleeps)].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls of the `started` and `ended` hooks in the test below.
    static STARTS_ENDS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    fn count_start() {
        STARTS_ENDS[0].fetch_add(1, Ordering::Relaxed);
    }

    fn count_end() {
        STARTS_ENDS[1].fetch_add(1, Ordering::Relaxed);
    }

    /// A worker calls its idle hook every time it runs out of work, once its polling is over:
    /// `false` exactly when the polling found an event, `true` exactly when it goes to sleep
    /// (every time, for a worker that does not poll); it calls `started` once as it starts
    /// and `ended` once as it ends; and dropping the workers waits for their threads to end.
    #[tokio::test]
    async fn workers_tell_their_idle_hook_each_time_they_run_out_of_work_whether_they_sleep() {
        let calls = || IDLE_CALLS.each_ref().map(|c| c.load(Ordering::Relaxed));
        for spin in [Duration::from_millis(100), Duration::ZERO] {
            let before = calls();
            let hooks = Hooks {
                started: Some(count_start),
                idle: Some(count_idle),
                ended: Some(count_end),
            };
            let starts_ends = STARTS_ENDS.each_ref().map(|c| c.load(Ordering::Relaxed));
            let workers = Workers::start_with(1, spin, hooks).unwrap();
            let ended = ENDED.load(Ordering::Relaxed);
            let count = |outcome: &str| polls(&workers, outcome);
            let mut client = echoed(&workers, || {
                AT_END.with(|e| *e.borrow_mut() = Some(AtThreadEnd));
            })
            .await;
            let delta = || {
                let now = calls();
                [now[0] - before[0], now[1] - before[1]]
            };
            // Bytes sent back to back, each within the window of the worker's polling (on a
            // loaded machine the client can miss the window a few times: bounded retries).
            for byte in (0..50).map(|i| b'a' + i) {
                client.write_all(&[byte]).await.unwrap();
                let mut b = [0u8; 1];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], byte);
                if byte >= b'e' && (spin.is_zero() || delta()[0] > 0) {
                    break;
                }
            }
            // Then nothing: the worker goes to sleep, and says so first.
            until("the worker tells its hook it sleeps", || delta()[1] > 0).await;
            if spin.is_zero() {
                assert_eq!(delta()[0], 0, "a worker that does not poll always sleeps");
            } else {
                // Each call as the polling ended (read together once the worker is asleep;
                // its one-second timer can wake it between two readings).
                until("one call per poll, with its outcome", || {
                    delta() == [count("event") as usize, count("slept") as usize]
                })
                .await;
                assert!(
                    delta()[0] > 0,
                    "bytes sent back to back came while it polled"
                );
            }
            drop(client);
            drop(workers);
            assert_eq!(
                ENDED.load(Ordering::Relaxed),
                ended + 1,
                "the worker's thread-local values were not dropped when the workers were"
            );
            assert_eq!(
                STARTS_ENDS.each_ref().map(|c| c.load(Ordering::Relaxed)),
                starts_ends.map(|n| n + 1),
                "started and ended hooks, once each"
            );
        }
    }

    /// The idle hook's calls made from a task rather than as a worker parked: (the
    /// `Workers`' id, the worker's index, `sleeps`).
    static FLUSHED: std::sync::Mutex<Vec<(usize, usize, bool)>> = std::sync::Mutex::new(Vec::new());

    fn record_flush(sleeps: bool) {
        if tokio::task::try_id().is_some() {
            let (id, i) = WORKER.with(Cell::get).expect("on a worker thread");
            FLUSHED.lock().unwrap().push((id, i, sleeps));
        }
    }

    /// `flush` has every worker call its idle hook on its own thread, as before a sleep, and
    /// returns once all have: with it, what the hook writes is out when `flush` returns.
    #[tokio::test]
    async fn flush_has_each_worker_call_its_idle_hook_on_its_thread_before_it_returns() {
        let hooks = Hooks {
            idle: Some(record_flush),
            ..Hooks::default()
        };
        let workers = Workers::start_with(2, Duration::ZERO, hooks).unwrap();
        let calls = || {
            let mut v: Vec<_> = FLUSHED
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.0 == workers.id)
                .map(|c| (c.1, c.2))
                .collect();
            v.sort();
            v
        };
        assert_eq!(calls(), []);
        workers.flush().await;
        assert_eq!(calls(), [(0, true), (1, true)]);
        workers.flush().await;
        assert_eq!(calls(), [(0, true), (0, true), (1, true), (1, true)]);
    }

    /// Thread-local values of worker threads dropped (the test below).
    static ENDED: AtomicUsize = AtomicUsize::new(0);

    struct AtThreadEnd;

    impl Drop for AtThreadEnd {
        fn drop(&mut self) {
            ENDED.fetch_add(1, Ordering::Relaxed);
        }
    }

    thread_local! {
        static AT_END: RefCell<Option<AtThreadEnd>> = const { RefCell::new(None) };
    }

    /// Workers started with a spin find their runtime's epoll instance — the one watching the
    /// connections they serve (without it they would sleep at once, with only a warning in the
    /// log) — and serve connections as before; started without one they do not look for it.
    #[tokio::test]
    async fn workers_that_spin_have_their_runtimes_epoll() {
        for spin in [Duration::from_micros(50), Duration::ZERO] {
            let workers = Workers::start(2, spin).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            for _ in 0..2 {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (tcp, _) = listener.accept().await.unwrap();
                workers.run(tcp, |mut tcp| async move {
                    // 0: not armed; 1: armed with the epoll watching this connection; 2: armed
                    // with another.
                    let armed = SPIN.with(|s| {
                        s.borrow().as_ref().map_or(0, |spin| {
                            if sys::epoll_watches(spin.epoll.as_raw_fd(), tcp.as_raw_fd()) {
                                1
                            } else {
                                2
                            }
                        })
                    });
                    tcp.write_all(&[armed]).await.unwrap();
                });
                let mut b = [9u8; 1];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], u8::from(!spin.is_zero()), "spin {spin:?}");
            }
        }
    }

    /// The eventfd through which the calling worker's runtime is woken (the one its epoll
    /// instance watches).
    fn runtime_eventfd() -> std::os::fd::RawFd {
        let epoll = runtime_epoll().unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let n = e.file_name().to_str()?.parse().ok()?;
                let is_eventfd =
                    std::fs::read_link(e.path()).ok()?.as_os_str() == "anon_inode:[eventfd]";
                (is_eventfd && sys::epoll_watches(epoll.as_raw_fd(), n)).then_some(n)
            })
            .next()
            .expect("the runtime's eventfd")
    }

    /// How many times eventfd `fd` has been written: its counter, which tokio's waker never
    /// reads back (edge-triggered, it needs no reset).
    fn eventfd_count(fd: std::os::fd::RawFd) -> u64 {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let hex = info
            .lines()
            .find_map(|l| l.strip_prefix("eventfd-count:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    }

    /// A connection's timeout does not wake its worker through the runtime's own eventfd
    /// ([`anchor_timers`]): a hundred connections' worth of 10 s timeouts, each registered
    /// after the worker's runtime parked with no other timeout of its own, write it not once.
    #[tokio::test]
    async fn a_connections_timeout_does_not_wake_its_worker_through_the_eventfd() {
        let workers = Workers::start(1, Duration::ZERO).unwrap();
        let writes = workers.handles[0]
            .spawn(async {
                let eventfd = runtime_eventfd();
                // Settled: the anchor registered, the spawn's own wake-up behind.
                tokio::task::yield_now().await;
                let before = eventfd_count(eventfd);
                for _ in 0..100 {
                    // As a connection: a 10 s timeout around something pending once...
                    let pending_once = tokio::task::yield_now();
                    let _ = tokio::time::timeout(Duration::from_secs(10), pending_once).await;
                    // ...then the runtime parks (without sleeping) with that timeout gone.
                    tokio::task::yield_now().await;
                }
                eventfd_count(eventfd) - before
            })
            .await
            .unwrap();
        assert_eq!(writes, 0, "writes to the worker's eventfd");
    }
}
