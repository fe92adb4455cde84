//! Preview URLs against a real server: HTTP and WebSocket forwarded into a port of a `network: none`
//! sandbox, and the walls around it (opt-in per port, other tenants, signed tokens, the per-sandbox cap).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::server::{call, create, new_key, DataDir, Server};
use serde_json::{json, Value};

/// A server in the sandbox on `port`: answers every GET with the request's path and Host header, and
/// echoes WebSocket-style upgraded bytes back (a `101` then an echo loop).
fn echo_server(port: u16) -> Vec<String> {
    let script = format!(
        r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(64)
def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk: return
        data += chunk
    head = data.split(b"\r\n\r\n")[0].decode()
    lines = head.split("\r\n"); path = lines[0].split(" ")[1]
    headers = {{l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}}
    if headers.get("upgrade", "").lower() == "websocket":
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while True:
            chunk = c.recv(4096)
            if not chunk: break
            c.sendall(chunk)
        return
    if path.startswith("/missing"):
        c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nno such page")
        c.close()
        return
    seen = "credentials:" + ",".join(h for h in ("x-api-key", "x-access-token", "authorization") if h in headers)
    body = ("path=" + path + " host=" + headers.get("host", "") + " " + seen).encode()
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#
    );
    vec!["python3".into(), "-c".into(), script]
}

fn raw_get(server: &Server, path: &str, key: Option<&str>) -> (u16, String) {
    let mut request = ureq::get(&format!("{}{path}", server.base)).timeout(Duration::from_secs(30));
    if let Some(key) = key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    match request.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// Waits until the program in the sandbox listens (502 port_closed until then).
fn wait_listening(server: &Server, key: &str, id: &str, port: u16) {
    common::poll_until(Duration::from_secs(20), "the sandbox's server listening", || {
        raw_get(server, &format!("/v1/sandboxes/{id}/ports/{port}/"), Some(key)).0 == 200
    });
}

#[test]
fn http_and_websocket_reach_an_opted_in_port_of_a_network_none_sandbox_without_credentials_leaking() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = new_key(dir.path(), "alice", "user");
    let sandbox = create(
        &server,
        &alice,
        json!({"cmd": echo_server(8000), "ports": [8000]}),
    );
    let id = sandbox["id"].as_str().unwrap();
    wait_listening(&server, &alice, id, 8000);

    let (status, body) = raw_get(
        &server,
        &format!("/v1/sandboxes/{id}/ports/8000/some/page?q=1"),
        Some(&alice),
    );
    assert_eq!(status, 200, "{body}");
    let host = server.base.trim_start_matches("http://");
    assert_eq!(
        body,
        format!("path=/some/page?q=1 host={host} credentials:"),
        "path, query and Host kept; key removed"
    );

    // The sandbox's own error answers pass unchanged (the API's error shaping is for its own answers).
    let (status, body) = raw_get(
        &server,
        &format!("/v1/sandboxes/{id}/ports/8000/missing"),
        Some(&alice),
    );
    assert_eq!((status, body.as_str()), (404, "no such page"));

    // A WebSocket upgrade: the 101 comes back and bytes flow both ways.
    websocket_echo(host, id, &alice, b"ping through the wall");
}

/// A WebSocket upgrade through the port route of sandbox `id`'s port 8000: asserts the 101 and that
/// `text` comes back.
fn websocket_echo(host: &str, id: &str, key: &str, text: &[u8]) {
    let mut stream = TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "GET /v1/sandboxes/{id}/ports/8000/ws HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(text).unwrap();
    let mut echoed = vec![0u8; text.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, text);
}

#[test]
fn ports_not_opted_in_other_tenants_and_bad_tokens_are_refused() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = new_key(dir.path(), "alice", "user");
    let mallory = new_key(dir.path(), "mallory", "user");
    let sandbox = create(
        &server,
        &alice,
        json!({"cmd": echo_server(8000), "ports": [8000]}),
    );
    let id = sandbox["id"].as_str().unwrap();
    wait_listening(&server, &alice, id, 8000);

    // Not opted in: even the owner cannot reach another port (here: nothing there; the answer is the same).
    let (status, body) = raw_get(&server, &format!("/v1/sandboxes/{id}/ports/8001/"), Some(&alice));
    assert_eq!(status, 409, "{body}");
    // Another tenant: exactly a missing sandbox.
    let (status, theirs) = raw_get(
        &server,
        &format!("/v1/sandboxes/{id}/ports/8000/"),
        Some(&mallory),
    );
    let (_, missing) = raw_get(
        &server,
        "/v1/sandboxes/sb_000000000000/ports/8000/",
        Some(&mallory),
    );
    assert_eq!(status, 404);
    assert_eq!(theirs.replace(id, "ID"), missing.replace("sb_000000000000", "ID"));
    // No credential at all.
    assert_eq!(
        raw_get(&server, &format!("/v1/sandboxes/{id}/ports/8000/"), None).0,
        401
    );
    // Mallory cannot sign a URL for it either.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/preview-urls", server.base),
        Some(&mallory),
        Some(json!({"port": 8000})),
    );
    assert_eq!(status, 404);

    // A signed URL works without a key, for its sandbox and port only, and not once tampered with.
    let (status, signed) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/preview-urls", server.base),
        Some(&alice),
        Some(json!({"port": 8000, "ttl_s": 60})),
    );
    assert_eq!(status, 200, "{signed}");
    let path = signed["path"].as_str().unwrap();
    let (status, body) = raw_get(&server, path, None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("path=/ host="),
        "the token is not passed on: {body}"
    );
    let other_port = path.replace("/ports/8000/", "/ports/8001/");
    assert_eq!(raw_get(&server, &other_port, None).0, 401);
    let tampered = format!("{}0", path);
    assert_eq!(raw_get(&server, &tampered, None).0, 401);
    let token = path.split("tartarus_token=").nth(1).unwrap();
    let expires: i64 = token.split('.').next().unwrap().parse().unwrap();
    let later = path.replace(&expires.to_string(), &(expires + 1_000_000).to_string());
    assert_eq!(
        raw_get(&server, &later, None).0,
        401,
        "a changed expiry breaks the MAC"
    );

    // Opting in is the server's: the label cannot be set by hand, and port 0 is refused.
    let (status, _) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&alice),
        Some(json!({"labels": {"tartarus.ports": "22"}})),
    );
    assert_eq!(status, 422);
    let (status, _) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&alice),
        Some(json!({"ports": [0]})),
    );
    assert_eq!(status, 422);
}

#[test]
fn a_closed_port_is_a_clear_502_and_a_flood_of_connections_is_capped_without_harming_a_neighbour() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = new_key(dir.path(), "alice", "user");
    let bob = new_key(dir.path(), "bob", "user");
    // Alice's server accepts connections and never answers them.
    let stalling = r#"
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 8000)); s.listen(1024)
held = []
while True:
    c, _ = s.accept(); held.append(c)
"#;
    let alice_box = create(
        &server,
        &alice,
        json!({"cmd": ["python3", "-c", stalling], "ports": [8000, 8001]}),
    );
    let alice_id = alice_box["id"].as_str().unwrap().to_string();
    let (status, body) = raw_get(
        &server,
        &format!("/v1/sandboxes/{alice_id}/ports/8001/"),
        Some(&alice),
    );
    assert_eq!(status, 502, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["error"]["code"], "port_closed");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nothing listens on port 8001"));

    let bob_box = create(&server, &bob, json!({"cmd": echo_server(8000), "ports": [8000]}));
    let bob_id = bob_box["id"].as_str().unwrap().to_string();
    wait_listening(&server, &bob, &bob_id, 8000);

    // 140 requests into Alice's stalling port at once: at most 128 are forwarded, the rest get 429 at once.
    let host = server.base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..140 {
        let mut stream = TcpStream::connect(&host).unwrap();
        write!(
            stream,
            "GET /v1/sandboxes/{alice_id}/ports/8000/ HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice}\r\n\r\n"
        )
        .unwrap();
        held.push(stream);
    }
    // Which requests are beyond the cap is the scheduler's choice: look at every connection.
    for stream in &held {
        stream.set_nonblocking(true).unwrap();
    }
    let mut answers: Vec<Vec<u8>> = vec![Vec::new(); held.len()];
    common::poll_until(Duration::from_secs(30), "12 requests refused with 429", || {
        for (stream, answer) in held.iter_mut().zip(answers.iter_mut()) {
            let mut chunk = [0u8; 512];
            if let Ok(n) = stream.read(&mut chunk) {
                answer.extend_from_slice(&chunk[..n]);
            }
        }
        answers.iter().filter(|a| a.starts_with(b"HTTP/1.1 429")).count() >= 12
    });
    let others: Vec<String> = answers
        .iter()
        .filter(|a| !a.is_empty() && !a.starts_with(b"HTTP/1.1 429"))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        others.is_empty(),
        "the forwarded requests still wait on the stalling server: {others:?}"
    );
    // Bob's sandbox is still served at once.
    let (status, body) = raw_get(
        &server,
        &format!("/v1/sandboxes/{bob_id}/ports/8000/x"),
        Some(&bob),
    );
    assert_eq!(status, 200, "{body}");
}

/// The same through a microVM: the guest has no NIC at all (network none); the port is reached over the
/// agent's channel (an exec of the port connector in the guest), HTTP and a WebSocket both ways, and a
/// closed port is the same clear 502.
#[test]
fn http_and_websocket_reach_an_opted_in_port_of_a_microvm_sandbox() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = new_key(dir.path(), "alice", "user");
    let sandbox = create(
        &server,
        &alice,
        json!({"cmd": echo_server(8000), "ports": [8000, 8001], "runtime": "microvm"}),
    );
    assert_eq!(sandbox["runtime"], "microvm", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap();
    wait_listening(&server, &alice, id, 8000);
    let (status, body) = raw_get(
        &server,
        &format!("/v1/sandboxes/{id}/ports/8000/in/the/guest?q=2"),
        Some(&alice),
    );
    assert_eq!(status, 200, "{body}");
    let host = server.base.trim_start_matches("http://");
    assert_eq!(body, format!("path=/in/the/guest?q=2 host={host} credentials:"));
    let (status, body) = raw_get(&server, &format!("/v1/sandboxes/{id}/ports/8001/"), Some(&alice));
    assert_eq!(status, 502, "{body}");

    websocket_echo(host, id, &alice, b"ping through two walls");
}
