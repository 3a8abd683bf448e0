//! Tier "load": 1,000 concurrent proxied connections, then 20,000 churned ones, through one
//! pod pair (HBONE on one node). Every byte must come back; afterwards the agent's file
//! descriptors return to their baseline, every connection it opened it also closed, no stream
//! or connection is left counted as open (no task leak), and RSS comes back near its baseline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONCURRENT: usize = 1_000;
const CHURNED: usize = 20_000;
const CHURN_PARALLEL: usize = 64;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A socket created inside `ns` (it keeps that namespace), connected from the runtime.
async fn connect(
    ns: &ambit_common::netns::Netns,
    dst: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = ns
        .run(tokio::net::TcpSocket::new_v4)
        .map_err(std::io::Error::other)??;
    tokio::time::timeout(Duration::from_secs(20), sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Sends `payload`, half-closes, reads everything back; true if identical.
async fn echo(mut s: tokio::net::TcpStream, payload: &[u8]) -> std::io::Result<bool> {
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(payload.len());
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(back == payload)
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    let tag = format!("conn-{i:06}|");
    tag.bytes().cycle().take(len).collect()
}

#[test]
fn a_thousand_concurrent_and_twenty_thousand_churned_connections_deliver_everything_and_leak_nothing()
 {
    let mut node = Node::new("1.0.0").unwrap();
    // Pooled HBONE connections opened for the burst are released soon after it.
    node.agent_args = vec!["--pool-idle-timeout".into(), "1s".into()];
    node.start_agent().unwrap();
    let a = node.add_pod("load-client").unwrap();
    let b = node.add_pod("load-server").unwrap();
    let pid = node.agent_pid().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_ns = b.ns.open();
    let listener = server_ns
        .run(|| std::net::TcpListener::bind(("0.0.0.0", 7400)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let dst = SocketAddr::new(b.ip, 7400);
    let client_ns = Arc::new(a.ns.open());

    rt.block_on(async {
        // The app in pod b: echoes every connection until its peer half-closes.
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        // Warm-up: the pooled HBONE connection and the certificate exist.
        assert!(echo(connect(&client_ns, dst).await.unwrap(), b"warm").await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let base_fds = fds(pid);
        let base_rss = node.agent_rss_kib().unwrap();

        // 1,000 at once: all connected and exchanging before any closes.
        let start = Instant::now();
        let barrier = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
        let peak_fds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let (ns, barrier, peak) = (client_ns.clone(), barrier.clone(), peak_fds.clone());
                tokio::spawn(async move {
                    let mut s = connect(&ns, dst).await?;
                    let data = payload(i, 16 << 10);
                    s.write_all(&data[..1]).await?;
                    let mut first = [0u8; 1];
                    s.read_exact(&mut first).await?;
                    // Every connection is open and proxied now.
                    if barrier.wait().await.is_leader() {
                        peak.store(fds(pid), std::sync::atomic::Ordering::Relaxed);
                    }
                    s.write_all(&data[1..]).await?;
                    s.shutdown().await?;
                    let mut back = vec![first[0]];
                    s.read_to_end(&mut back).await?;
                    Ok::<bool, std::io::Error>(back == data)
                })
            })
            .collect();
        let mut delivered = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(true) => delivered += 1,
                Ok(false) => panic!("a concurrent connection's bytes came back altered"),
                Err(e) => panic!("a concurrent connection failed: {e}\n{}", tail(&node.agent_log())),
            }
        }
        assert_eq!(delivered, CONCURRENT);
        let concurrent_took = start.elapsed();
        let peak_fds = peak_fds.load(std::sync::atomic::Ordering::Relaxed);
        let peak_rss = node.agent_rss_kib().unwrap();
        assert!(
            peak_fds >= base_fds + CONCURRENT,
            "the agent did not hold {CONCURRENT} connections at once ({base_fds} -> {peak_fds} fds)"
        );

        // 20,000 churned: 64 at a time, each a new connection.
        let start = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..CHURN_PARALLEL)
            .map(|_| {
                let (ns, next) = (client_ns.clone(), next.clone());
                tokio::spawn(async move {
                    let mut ok = 0;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= CHURNED {
                            return Ok::<usize, std::io::Error>(ok);
                        }
                        let s = connect(&ns, dst).await?;
                        if !echo(s, &payload(i, 64)).await? {
                            return Err(std::io::Error::other(format!("connection {i} altered")));
                        }
                        ok += 1;
                    }
                })
            })
            .collect();
        let mut churned = 0;
        for w in workers {
            churned += w
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("churn failed: {e}\n{}", tail(&node.agent_log())));
        }
        assert_eq!(churned, CHURNED);
        let churn_took = start.elapsed();

        // Back to baseline: descriptors, and every opened connection closed, no open streams.
        let settled = wait_for(Duration::from_secs(30), || fds(pid) <= base_fds + 2);
        let after_fds = fds(pid);
        let m = node.scrape("/metrics", 15020);
        let opened = sum(&m, "istio_tcp_connections_opened_total", &[]);
        let closed = sum(&m, "istio_tcp_connections_closed_total", &[]);
        let streams = sum(&m, "ambit_hbone_streams_open", &[]);
        let after_rss = node.agent_rss_kib().unwrap();
        eprintln!(
            "load: {CONCURRENT} concurrent in {concurrent_took:?} (agent fds {base_fds} -> {peak_fds}, RSS {base_rss} -> {peak_rss} KiB); \
             {CHURNED} churned in {churn_took:?} ({:.0}/s); after: {after_fds} fds, RSS {after_rss} KiB; \
             connections opened {opened}, closed {closed}, streams open {streams}",
            CHURNED as f64 / churn_took.as_secs_f64()
        );
        assert!(settled.is_ok(), "agent fds stayed at {after_fds} (baseline {base_fds})");
        assert_eq!(opened, closed, "connections opened but never closed (task leak)");
        assert!(opened >= 2.0 * (CONCURRENT + CHURNED) as f64, "opened {opened}");
        assert_eq!(streams, 0.0, "HBONE streams still counted open");
        // Memory follows the load back down (the agent trims its heap on every reconcile
        // pass): within half the baseline again, where glibc alone stayed at twice it.
        let settled_rss = wait_for(Duration::from_secs(10), || {
            node.agent_rss_kib().is_some_and(|r| r <= base_rss + base_rss / 2)
        });
        assert!(
            settled_rss.is_ok(),
            "RSS stayed at {} KiB after the load (baseline {base_rss} KiB, peak {peak_rss} KiB)",
            node.agent_rss_kib().unwrap_or(0)
        );
    });
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
