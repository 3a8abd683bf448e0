//! The agent's plugin socket under hostile input: non-root peers, descriptors that are not
//! network namespaces, garbage, truncated and oversized frames. After each, the agent still
//! serves a valid request.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use ambit_common::protocol::{self, PodInfo, Request, Response};
use ambit_tests::*;
use sendfd::SendWithFd;

fn read_response(s: &mut UnixStream) -> Response {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let mut body = vec![0; protocol::frame_len(h).unwrap()];
    s.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

fn pod(id: &str) -> PodInfo {
    PodInfo {
        container_id: id.into(),
        ifname: "eth0".into(),
        namespace: "default".into(),
        name: id.into(),
        uid: String::new(),
        ips: vec![],
        annotations: Default::default(),
        netns_path: "/proc/self/ns/net".into(),
        rules: None,
    }
}

fn still_serves(node: &Node) {
    let r = protocol::call(
        &node.socket(),
        &Request::Status,
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(r.ok, "agent stopped serving: {r:?}");
}

#[test]
fn hostile_clients_are_refused_and_the_agent_keeps_serving() {
    let mut node = Node::new("1.0.0").unwrap();
    node.start_agent().unwrap();
    let sock = node.socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the plugin socket must be private to root");

    // An fd that is not a network namespace.
    let file = std::fs::File::open("/etc/hostname").unwrap();
    let frame = protocol::encode(&Request::Add {
        pod: Box::new(pod("cfile")),
    })
    .unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    let n = s.send_with_fd(&frame, &[file.as_raw_fd()]).unwrap();
    s.write_all(&frame[n..]).unwrap();
    let r = read_response(&mut s);
    assert!(
        !r.ok
            && r.error
                .as_deref()
                .unwrap()
                .contains("not a network namespace"),
        "{r:?}"
    );

    // Another namespace type (uts) is refused too.
    let uts = std::fs::File::open("/proc/self/ns/uts").unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    let n = s.send_with_fd(&frame, &[uts.as_raw_fd()]).unwrap();
    s.write_all(&frame[n..]).unwrap();
    assert!(!read_response(&mut s).ok);

    // Add without an fd, and a non-add with an fd.
    let r = protocol::call(
        &sock,
        &Request::Add {
            pod: Box::new(pod("cnofd")),
        },
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!r.ok && r.error.unwrap().contains("exactly one descriptor"));
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let r = protocol::call(
        &sock,
        &Request::Status,
        Some(std::os::fd::AsFd::as_fd(&ns)),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(!r.ok && r.error.unwrap().contains("only add"));

    // Garbage JSON in a well-formed frame.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&[0, 0, 0, 5]).unwrap();
    s.write_all(b"\xff\x00{{x").unwrap();
    assert!(!read_response(&mut s).ok);

    // An oversized length header.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let r = read_response(&mut s);
    assert!(!r.ok && r.error.unwrap().contains("exceeds"));

    // A truncated frame: the client goes away mid-message.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&[0, 0, 1, 0]).unwrap();
    s.write_all(b"{\"op\":").unwrap();
    drop(s);

    // Unknown operation.
    let mut s = UnixStream::connect(&sock).unwrap();
    let body = br#"{"op":"format_disk"}"#;
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    assert!(!read_response(&mut s).ok);

    still_serves(&node);
    assert!(
        node.recorded_pods().is_empty(),
        "a refused request recorded a pod"
    );

    // A non-root peer is refused by SO_PEERCRED even when the file mode would let it in.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "import socket,struct,json\n\
         s=socket.socket(socket.AF_UNIX); s.connect({:?})\n\
         b=json.dumps({{'op':'status'}}).encode()\n\
         try: s.sendall(struct.pack('>I',len(b))+b)\n\
         except BrokenPipeError: pass  # the agent may refuse before reading\n\
         h=s.recv(4); print(s.recv(struct.unpack('>I',h)[0]).decode())",
        sock.to_str().unwrap()
    );
    let out = run_ok(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        &script,
    ]))
    .unwrap();
    let r: Response = serde_json::from_str(out.trim()).unwrap();
    assert!(
        !r.ok && r.error.unwrap().contains("uid is not allowed"),
        "{out}"
    );
    still_serves(&node);
}
