//! Tier "hostile": port 15008 against peers that misbehave on purpose — a TLS handshake that
//! never finishes (slowloris), TLS 1.2 only, a CONNECT with oversized headers, and a flood of
//! streams on one connection. Each ends with a clear refusal or a bounded close, and the pod
//! keeps being served to well-behaved peers afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_tests::mesh::*;
use ambit_tests::*;

const TD: &str = "cluster1";

#[test]
fn port_15008_withstands_slowloris_tls12_oversized_headers_and_stream_floods() {
    let m = MeshPod::start("hostile", TD, &[]);
    let (node, b, ca) = (&m.node, &m.b, &m.ca);
    let _app = echo_server(&b.ns.open(), 7500, 1);
    let hbone = SocketAddr::new(b.ip, 15008);
    let probe = node.ns.open();
    let good = ca.valid_leaf(&format!("spiffe://{TD}/ns/default/sa/tester"));
    let app = format!("{}:7500", b.ip);

    // Slowloris: a TCP connection that never sends a ClientHello, and one that stops halfway
    // through it. The server closes both on its handshake deadline (10 s); the read below
    // would fail the test only if nothing happened for 30 s.
    let stalled: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut s = connect_in(&probe, hbone).unwrap();
            if i == 1 {
                // The first bytes of a TLS record header: handshake, TLS 1.0 legacy version.
                s.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
            }
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    for mut s in stalled {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => {
                // An alert may come first; then the close.
                assert!(buf[0] == 0x15, "unexpected {n} bytes: {:?}", &buf[..n]);
                let _ = s.read(&mut buf);
            }
            Err(e) => assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "the stalled handshake was not closed: {e}"
            ),
        }
    }
    eprintln!(
        "slowloris: both stalled handshakes closed after {:?}",
        started.elapsed()
    );
    // Closed by the handshake deadline, not by anything else.
    wait_for(Duration::from_secs(5), || {
        node.agent_log()
            .matches("HBONE handshake timed out")
            .count()
            >= 2
    })
    .unwrap_or_else(|_| {
        panic!(
            "the stalled handshakes were not timed out:\n{}",
            node.agent_log()
        )
    });

    // TLS 1.2 only: refused at the handshake.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls_connect = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        let config = Arc::new(probe_client_config(Some(&good), versions).unwrap());
        let tcp = connect_in(&probe, hbone).unwrap();
        tcp.set_nonblocking(true).unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        })
    };
    let err = tls_connect(&[&rustls::version::TLS12])
        .map(|_| ())
        .expect_err("a TLS 1.2 handshake was accepted");
    assert!(
        err.to_string().to_lowercase().contains("version"),
        "TLS 1.2: {err}"
    );

    // Oversized headers, then a flood of streams, on one good connection.
    let tls = tls_connect(&[&rustls::version::TLS13]).unwrap();
    let (statuses, big) = rt.block_on(async move {
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let connect = |extra: usize| {
            let mut r = http::Request::builder().method("CONNECT").uri(app.as_str());
            if extra > 0 {
                r = r.header("x-padding", "a".repeat(extra));
            }
            r.body(()).unwrap()
        };
        // 100 KiB of headers: beyond the server's 64 KiB limit.
        let big = async {
            let (resp, _) = send
                .clone()
                .ready()
                .await?
                .send_request(connect(100 << 10), true)?;
            resp.await
        };
        let big = tokio::time::timeout(Duration::from_secs(10), big).await;
        // 1,000 streams at once to a port with an app that answers one connection: the
        // server admits at most 200 at a time (flow of SETTINGS), answers every one.
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let send = send.clone();
            let req = connect(0);
            tasks.push(tokio::spawn(async move {
                let (resp, _) = send.ready().await?.send_request(req, true)?;
                resp.await.map(|r| r.status().as_u16())
            }));
        }
        let mut statuses = std::collections::BTreeMap::<String, usize>::new();
        for t in tasks {
            let key = match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(Ok(s))) => s.to_string(),
                Ok(Ok(Err(e))) => format!(
                    "error: {}",
                    e.reason().map_or("other".into(), |r| format!("{r:?}"))
                ),
                Ok(Err(e)) => panic!("task: {e}"),
                Err(_) => "no answer in 30 s".into(),
            };
            *statuses.entry(key).or_default() += 1;
        }
        (
            statuses,
            big.map(|r| r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())),
        )
    });
    // Oversized headers: the answer README promises, 431, not just any failure.
    assert_eq!(big, Ok(Ok(431)), "oversized headers");
    // Every stream of the flood got an answer (no other reset, no h2 error, no hang): 200 for
    // the connections the app took (its one accept, and what its backlog held before it
    // closed), 503 for the rest, or REFUSED_STREAM. The last is HTTP/2's "not processed, safe
    // to retry" (RFC 9113 §8.7; Ambit's client retries it) and h2 sends it when a stream
    // arrives at the 200-stream limit, which a client that keeps under the limit still meets:
    // when the server's reset of a stream (its app connection failed) crosses the client's
    // own reset of it, the server counts the stream until its reset is written, the client
    // not at all (seen in CI and under CPU load: ~100 streams answered 200 and reset both
    // ways, then ~50 refused).
    let answered = |k: &str| statuses.get(k).copied().unwrap_or(0);
    let refused = "error: REFUSED_STREAM";
    assert!(
        statuses
            .keys()
            .all(|k| k == "200" || k == "503" || k == refused)
            && statuses.contains_key("200"),
        "answers to the flood: {statuses:?}"
    );
    assert_eq!(statuses.values().sum::<usize>(), 1000);
    eprintln!("oversized headers: {big:?}; flood of 1000 streams: {statuses:?}");
    // Refused means never processed: the agent took up exactly the streams it answered with a
    // status (one access record each, once their relay ended), none of the refused ones.
    let records = || {
        let dst = format!("dst.addr={}:7500 ", b.ip);
        node.agent_log()
            .lines()
            .filter(|l| l.contains("access: connection ") && l.contains(&dst))
            .filter(|l| l.contains("direction=\"inbound\"") && l.contains("protocol=\"hbone\""))
            .count()
    };
    let processed = answered("200") + answered("503");
    let _ = wait_for(Duration::from_secs(10), || records() >= processed);
    assert_eq!(
        records(),
        processed,
        "streams the agent processed, against those answered 200 or 503 ({statuses:?})"
    );

    // The pod is still served to a well-behaved peer.
    assert_eq!(
        hbone_attempt(
            &probe,
            hbone,
            Some(&good),
            "CONNECT",
            &format!("{}:7501", b.ip)
        )
        .unwrap(),
        HboneOutcome::Status(503),
        "after all that, a normal CONNECT gets its normal answer"
    );
    let log = node.agent_log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn inbound_hbone_connections_end_on_a_stalled_preface_idleness_and_the_client_s_certificate_expiry()
{
    use tokio::io::AsyncReadExt;
    let m = MeshPod::start("bounds", TD, &["--inbound-idle-timeout", "2s"]);
    let (node, b, ca) = (&m.node, &m.b, &m.ca);
    let _app = echo_server(&b.ns.open(), 7600, 1);
    let hbone = SocketAddr::new(b.ip, 15008);
    let probe = node.ns.open();
    let uri = format!("spiffe://{TD}/ns/default/sa/tester");
    let good = ca.valid_leaf(&uri);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Every wait below is a bound on a close that must come, not a measurement.
    let bound = Duration::from_secs(30);
    rt.block_on(async {
        // 1. TLS completes, the HTTP/2 preface never comes: closed at the handshake deadline.
        let mut tls = tls_to(&probe, hbone, &good).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(bound, async {
            loop {
                // (The server's SETTINGS is not sent before the client's preface.)
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "a connection without HTTP/2 preface stayed open"
        );

        // 2. HTTP/2 up, no stream: closed once idle for --inbound-idle-timeout (GOAWAY).
        let tls = tls_to(&probe, hbone, &good).await;
        let (_send, conn) = h2::client::handshake(tls).await.unwrap();
        // It ends (GOAWAY then close; the client may see its last write fail on the closed
        // socket), and the log below says why: idleness.
        let ended = tokio::time::timeout(bound, conn).await;
        assert!(
            matches!(&ended, Ok(Ok(())))
                || matches!(&ended, Ok(Err(e)) if e.is_io() || e.is_go_away()),
            "an idle connection was not closed: {ended:?}"
        );

        // 3. A stream open for longer than the idle timeout keeps the connection; the
        //    client's certificate expiring ends it, stream included.
        let now = std::time::SystemTime::now();
        let short = ca.leaf(
            &uri,
            now - Duration::from_secs(60),
            now + Duration::from_secs(6),
        );
        let tls = tls_to(&probe, hbone, &short).await;
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("{}:7600", b.ip))
            .body(())
            .unwrap();
        let (resp, mut body) = send
            .ready()
            .await
            .unwrap()
            .send_request(req, false)
            .unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let ended = tokio::time::timeout(bound, conn).await;
        assert!(
            ended.is_ok(),
            "the connection outlived the client's certificate"
        );
        body.send_data(bytes::Bytes::from_static(b"late"), true)
            .expect_err("the stream must be gone with its connection");
    });
    // Each close is logged with its cause (the stream's access line is written as its task
    // ends, just after the connection's).
    let logged = |log: &str| {
        log.contains("HBONE handshake timed out (HTTP/2 preface)")
            && log.contains("HBONE connection idle: closing")
            && log.contains("HBONE connection closed: the client's certificate expired")
            && log.contains("streams=1")
            && log.lines().any(|l| {
                l.contains("connection complete")
                    && l.contains("closed: the client's certificate expired")
            })
    };
    wait_for(Duration::from_secs(5), || logged(&node.agent_log()))
        .unwrap_or_else(|_| panic!("a cause is missing from the log:\n{}", node.agent_log()));
}
