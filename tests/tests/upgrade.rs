//! Tier "upgrade": a planned agent restart the way the DaemonSet rolls (`maxSurge: 1`): the new
//! agent starts beside the old one, takes over the plugin socket, re-adopts every pod and binds
//! the same in-pod ports (SO_REUSEPORT); then the old one gets SIGTERM and drains. Under a
//! steady load of new connections between two captured pods, none may fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_tests::*;

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
    // Four clients, each one new connection at a time.
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            let ns = client.ns.open();
            std::thread::spawn(move || {
                // Bounded: at most 120 s, and the test stops it much earlier.
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                    let r = ns.run(|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    });
                    match r.map_err(std::io::Error::other).and_then(|r| r) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
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
    let status = node.terminate_agent(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}");
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
        "surge upgrade: {ok} connections succeeded ({} while both agents ran, {} after the old one left), {failed} failed",
        before_term - at_second_start,
        ok - after_term
    );
    assert_eq!(
        failed,
        0,
        "failed connections: {:?}",
        errors.lock().unwrap()
    );

    // New pods are captured by the new agent through the same socket.
    let late = node.add_pod("late").unwrap();
    assert!(node.recorded_pods().contains(&late.container_id));
    assert!(node.log_of("new").contains(&late.container_id));
    drop(second);
}
