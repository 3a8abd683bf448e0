//! Tier "upgrade": a planned agent restart the way the DaemonSet rolls (`maxSurge: 1`): the new
//! agent starts beside the old one, takes over the plugin socket, re-adopts every pod and binds
//! the same in-pod ports (SO_REUSEPORT); then the old one gets SIGTERM and drains. Under a
//! steady load of new connections between two captured pods, none may fail. And the drain's
//! race with an HBONE client: a CONNECT that crossed the draining agent's GOAWAY is served or
//! refused retryably, never lost with its connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_tests::mesh::*;
use ambit_tests::*;

const TD: &str = "cluster1";

struct Stop(Option<std::process::Child>);
impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_surge_upgrade_hands_over_without_failing_a_new_connection() {
    let mut node = Node::new("1.0.0").unwrap();
    node.agent_args = vec!["--drain-timeout".into(), "2s".into()];
    node.start_agent().unwrap();
    let client = node.add_pod("client").unwrap();
    let server = node.add_pod("server").unwrap();
    let dst = SocketAddr::new(server.ip, 8080);
    // An echo server answering as many connections as the load makes.
    echo_forever(&server.ns.open(), 8080);

    // Steady load of new connections from the client pod, 1 byte echoed on each.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    // Where the upgrade stands, for the failures' report: 0 one agent, 1 both agents,
    // 2 the old one draining, 3 the old one gone.
    let phase = Arc::new(AtomicUsize::new(0));
    // Four clients, each one new connection at a time.
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, errors, phase) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
                phase.clone(),
            );
            let ns = client.ns.open();
            std::thread::spawn(move || {
                // Bounded: at most 120 s, and the test stops it much earlier.
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                    let r = ns.run(|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
                        // The client's address names a failed connection in the report, to be
                        // looked for in the agents' access lines.
                        let at = s.local_addr()?;
                        let failed =
                            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{at}: {e}"));
                        s.set_read_timeout(Some(Duration::from_secs(5)))
                            .map_err(failed)?;
                        s.write_all(b"x").map_err(failed)?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b).map_err(failed)?;
                        Ok(())
                    });
                    match r.map_err(std::io::Error::other).and_then(|r| r) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            let at = phase.load(Ordering::Relaxed);
                            errors.lock().unwrap().push(format!("phase {at}: {e}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(10), || ok.load(Ordering::Relaxed) >= 50).unwrap();

    // The new agent: it re-adopts both pods while the old one still serves them.
    let at_second_start = ok.load(Ordering::Relaxed);
    let second = Stop(Some(node.start_second_agent("new", 25020).unwrap()));
    phase.store(1, Ordering::Relaxed);
    wait_for(Duration::from_secs(20), || {
        let ns = node.ns.open();
        http(
            &ns,
            "127.0.0.1:25021".parse().unwrap(),
            "GET",
            "/healthz/ready",
        )
        .is_ok_and(|(st, _)| st == 200)
    })
    .unwrap_or_else(|_| panic!("the new agent is not ready:\n{}", node.log_of("new")));
    let before_term = ok.load(Ordering::Relaxed);
    // The old agent goes: it drains, and leaves the socket (now the new agent's) in place.
    phase.store(2, Ordering::Relaxed);
    let status = node.terminate_agent(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}");
    phase.store(3, Ordering::Relaxed);
    let old_log = node.agent_log();
    assert!(
        old_log.contains("the plugin socket now belongs to another agent"),
        "{old_log}"
    );
    assert!(node.socket().exists());
    let after_term = ok.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(10), || {
        ok.load(Ordering::Relaxed) >= after_term + 50
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "surge upgrade: {ok} connections succeeded ({} while both agents ran, {} after the old one left), {failed} failed; queued connections moved off a closed listener (client pod / server pod): {} / {}",
        before_term - at_second_start,
        ok - after_term,
        migrated(&client.ns.open()),
        migrated(&server.ns.open()),
    );
    assert_eq!(
        failed,
        0,
        "failed connections (phase 0 one agent, 1 both, 2 the old one draining, 3 it is gone): \
         {:?}\n--- queued connections moved off a closed listener (client pod / server pod): \
         {} / {}\n--- the old agent's log:\n{}\n--- the new agent's log:\n{}",
        errors.lock().unwrap(),
        migrated(&client.ns.open()),
        migrated(&server.ns.open()),
        above_debug(&node.agent_log()),
        above_debug(&node.log_of("new"))
    );

    // New pods are captured by the new agent through the same socket.
    let late = node.add_pod("late").unwrap();
    assert!(node.recorded_pods().contains(&late.container_id));
    assert!(node.log_of("new").contains(&late.container_id));
    drop(second);
}

/// The kernel's counts of requests moved off a closed listener to another of its SO_REUSEPORT
/// group (`net.ipv4.tcp_migrate_req`) in the namespace `ns`: `TCPMigrateReqSuccess` and
/// `TCPMigrateReqFailure` (a failure is a reset the client sees).
fn migrated(ns: &ambit_common::netns::Netns) -> String {
    // `/proc/thread-self`: `/proc/self/net` is the main thread's namespace, not this one's.
    let netstat = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let text = match netstat {
        Ok(t) => t,
        Err(e) => return format!("(netstat unreadable: {e})"),
    };
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
        return "(no TcpExt in netstat)".into();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| n.starts_with("TCPMigrateReq"))
        .map(|(n, v)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A draining agent sends GOAWAY on its inbound HBONE connections; a client may already have
/// sent a CONNECT on one (it has not read the GOAWAY yet). That stream must be served, or
/// refused with GOAWAY / REFUSED_STREAM (which the client retries elsewhere) — never lost
/// with a connection the agent closed under it, which fails the client's app (what the
/// surge-upgrade test above caught, rarely, as "Connection reset by peer"). Here the client
/// is held still from before the SIGTERM until its CONNECT is queued, so the crossing is
/// certain: the drain must wait for the connection's GOAWAY exchange, however long the client
/// takes within `--drain-timeout`.
#[test]
fn a_draining_agent_serves_or_refuses_a_connect_that_crossed_its_goaway() {
    // Bound in this order so that they drop as `MeshPod` does: the pod first, the files last.
    let MeshPod {
        shared: _shared,
        ca,
        mut node,
        b,
    } = MeshPod::start("crossing", TD, &["--drain-timeout", "20s"]);
    echo_forever(&b.ns.open(), 7700);
    let hbone = SocketAddr::new(b.ip, 15008);
    let leaf = ca.valid_leaf(&format!("spiffe://{TD}/ns/default/sa/tester"));
    let tcp = connect_in(&node.ns.open(), hbone).unwrap();
    // A second handle on the socket: it tells when the agent's answer to SIGTERM has arrived
    // unread.
    let unread = tcp.try_clone().unwrap();
    let connect = || {
        http::Request::builder()
            .method("CONNECT")
            .uri(format!("{}:7700", b.ip))
            .body(())
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(node.agent_pid().unwrap() as i32);
    let agent_log = || node.agent_log();
    let outcome = rt.block_on(async {
        let tls = tls_over(tcp, hbone, &leaf).await;
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        // The connection is driven until `hold` is set, then left unpolled (nothing read,
        // nothing written) until it is cleared.
        let (hold, mut held) = tokio::sync::watch::channel(false);
        let (still, mut stilled) = tokio::sync::mpsc::channel::<()>(1);
        let driver = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            loop {
                tokio::select! {
                    r = &mut conn => return r,
                    _ = held.wait_for(|h| *h) => {}
                }
                let _ = still.send(()).await;
                let _ = held.wait_for(|h| !*h).await;
            }
        });
        // One stream served and finished first: the connection is up, and the agent has no
        // stream open when it is told to stop.
        let (resp, mut body) = send
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(connect(), false)
            .unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        body.send_data(bytes::Bytes::from_static(b"a"), true)
            .unwrap();
        drop(body);
        wait_for_async(Duration::from_secs(10), || {
            agent_log()
                .lines()
                .any(|l| l.contains("access: connection ") && l.contains(":7700"))
        })
        .await
        .unwrap_or_else(|_| panic!("the first stream did not end:\n{}", agent_log()));

        hold.send(true).unwrap();
        stilled.recv().await.unwrap();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut peek = [0u8; 1];
        // Something arrives: the GOAWAY (or, from an agent that does not wait, the close).
        wait_for_async(Duration::from_secs(10), || {
            !matches!(unread.peek(&mut peek), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .await
        .unwrap_or_else(|_| panic!("nothing arrived after SIGTERM:\n{}", agent_log()));
        // An agent that does not wait for the connection ends its drain now; give it the
        // chance (bounded), then check it did not take it.
        let _ = wait_for_async(Duration::from_secs(2), || agent_log().contains("drained:")).await;
        assert!(
            !agent_log().contains("drained:"),
            "the drain ended while an HBONE connection had not finished its GOAWAY exchange:\n{}",
            agent_log()
        );
        // The CONNECT is queued before the client reads the GOAWAY: it crosses it.
        let (resp, mut body) = send
            .ready()
            .await
            .unwrap()
            .send_request(connect(), false)
            .unwrap();
        hold.send(false).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = resp.await?;
            body.send_data(bytes::Bytes::from_static(b"b"), true)?;
            let (status, mut echo) = (resp.status(), resp.into_body());
            let mut got = Vec::new();
            while let Some(chunk) = echo.data().await {
                got.extend_from_slice(&chunk?);
            }
            Ok::<_, h2::Error>((status, got))
        })
        .await
        .expect("no answer to the crossing CONNECT within 10 s");
        let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
        outcome
    });
    match &outcome {
        // Served: the app got the stream's byte and answered it.
        Ok(served) => assert_eq!(*served, (http::StatusCode::OK, b"b".to_vec())),
        Err(e) => assert!(
            e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM),
            "the crossing CONNECT was lost, neither served nor refused retryably: {e:?}\n{}",
            node.agent_log()
        ),
    }
    println!("the crossing CONNECT: {outcome:?}");
    let status = node.terminate_agent(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    let log = node.agent_log();
    assert!(
        log.contains("drained: 0 proxied connections and 0 inbound HBONE connections still open"),
        "the connection did not end by its GOAWAY exchange:\n{log}"
    );
}

/// A test agent's log without its DEBUG and TRACE lines (every frame of every connection).
fn above_debug(log: &str) -> String {
    log.lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect::<Vec<_>>()
        .join("\n")
}
