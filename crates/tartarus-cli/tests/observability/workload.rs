//! A small generated workload that makes a real server record every metric a standalone server can:
//! warm-pool hits and misses, every sandbox operation, an admission rejection, a start failure (a dead
//! letter), a timeout kill (an enforcement action), tool calls with a replay and a divergence, a blob.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::server::{call, create, exec, new_key, wait_for, Server};

/// The tenant the workload's user key belongs to: `/metrics` must never name it.
pub const TENANT: &str = "tenant-obs-secretive";
/// The tool the workload declares: `/metrics` must never name it.
pub const TOOL: &str = "tool-obs-secretive";

/// The text of `GET /metrics`.
pub fn scrape(base: &str) -> String {
    ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// The value of the first series whose line starts with `series` (name and labels as rendered), if any.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{', ',']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `GET /metrics` until `done` holds for it; panics after `limit` with the last text.
pub fn poll_metrics(base: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = scrape(base);
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never got there:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An upstream HTTP tool on loopback that answers every request with 200 and a small JSON body.
fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/tool", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut length, mut line) = (0usize, String::new());
            let _ = reader.read_line(&mut line);
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let answer = r#"{"ok":true}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    url
}

/// One tool call over sandbox `id`'s gateway socket from the host side (the socket identifies the
/// sandbox, so this is what a process inside sends); returns the HTTP status.
fn tool_call(data_dir: &Path, id: &str, key: &str, body: &str) -> u16 {
    let socket = data_dir.join("gateway").join(id).join("gateway.sock");
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "POST /v1/tools/{TOOL} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn delete(server: &Server, id: &str) {
    let (status, body) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{body}");
}

/// Runs the workload against `server` (started with `--warm-pool 1` over `data_dir`). Everything it
/// starts has ended when it returns.
pub fn standalone(server: &Server, data_dir: &Path) {
    let user = new_key(data_dir, TENANT, "user");
    // Warm pool: once the pool holds its one sandbox, three creates at once take it (a hit) and find the
    // pool empty while it refills (misses).
    poll_metrics(&server.base, Duration::from_secs(30), |t| {
        value(t, "tartarus_pool_ready_sandboxes{template=\"none\"}") == Some(1.0)
    });
    let creates: Vec<_> = (0..3)
        .map(|_| {
            let (base, key) = (server.base.clone(), user.clone());
            std::thread::spawn(move || {
                call(
                    "POST",
                    &format!("{base}/v1/sandboxes"),
                    Some(&key),
                    Some(json!({})),
                )
            })
        })
        .collect();
    let ids: Vec<String> = creates
        .into_iter()
        .map(|t| {
            let (status, record) = t.join().unwrap();
            assert_eq!(status, 201, "{record}");
            record["id"].as_str().unwrap().to_string()
        })
        .collect();
    let id = &ids[0];
    let (status, out) = exec(server, &user, id, json!({"cmd": ["echo", "hi"]}));
    assert_eq!(status, 200, "{out}");
    for op in ["pause", "resume"] {
        let (status, body) = call(
            "POST",
            &format!("{}/v1/sandboxes/{id}/{op}", server.base),
            Some(&user),
            None,
        );
        assert_eq!(status, 200, "{op}: {body}");
    }
    // Effects: a tool called twice under one key (a replay), once more with another body (a divergence),
    // and a blob.
    let tool = json!({"name": TOOL, "kind": "http", "url": upstream(), "timeout_s": 5});
    let (status, body) = call(
        "POST",
        &format!("{}/v1/tools", server.base),
        Some(&server.admin),
        Some(tool),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(tool_call(data_dir, id, "order-1", r#"{"n":1}"#), 200);
    assert_eq!(tool_call(data_dir, id, "order-1", r#"{"n":1}"#), 200);
    assert_eq!(tool_call(data_dir, id, "order-1", r#"{"n":2}"#), 409);
    let put = ureq::put(&format!("{}/v1/blobs", server.base))
        .set("Authorization", &format!("Bearer {user}"))
        .send_bytes(&[7u8; 5000])
        .unwrap();
    assert_eq!(put.status(), 201);
    // Admission: a user key may not ask for egress (the built-in security judge refuses it).
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&user),
        Some(json!({"network": "egress"})),
    );
    assert_eq!(status, 403, "{body}");
    // A start failure (a dead letter) and a timeout kill (an enforcement action).
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&user),
        Some(json!({"cmd": ["/nonexistent/command"]})),
    );
    assert_eq!(status, 422, "{body}");
    let timed = create(
        server,
        &user,
        json!({"cmd": ["sleep", "60"], "timeout_s": 1, "timeout_grace_s": 0}),
    );
    let timed = timed["id"].as_str().unwrap();
    wait_for(server, timed, |r: &Value| r["status"] == "killed");
    for id in &ids {
        delete(server, id);
    }
}

/// An admin's egress sandbox (the built-in policy lets admins ask for egress) whose connection to the
/// metadata address the contract drops: a live contract, blocked packets and the enforcement loop's
/// `network.violation`. Needs root (the network's namespace, veth and nftables rules).
pub fn egress(server: &Server) {
    let sandbox = create(server, &server.admin, json!({"network": "egress"}));
    let id = sandbox["id"].as_str().unwrap();
    let text = scrape(&server.base);
    assert_eq!(
        value(&text, "tartarus_network_contracts_active{lane=\"process\"}"),
        Some(1.0),
        "{text}"
    );
    let probe = "import socket\ns = socket.socket()\ns.settimeout(1)\ntry: s.connect(('169.254.169.254', 80))\nexcept OSError as e: print('blocked', e)";
    let (status, out) = exec(
        server,
        &server.admin,
        id,
        json!({"cmd": ["python3", "-c", probe]}),
    );
    assert_eq!(status, 200, "{out}");
    assert!(out["stdout"].as_str().unwrap().contains("blocked"), "{out}");
    poll_metrics(&server.base, Duration::from_secs(20), |t| {
        value(t, "tartarus_network_packets_blocked_total{lane=\"process\"}").is_some_and(|v| v > 0.0)
            && value(
                t,
                "tartarus_enforcement_actions_total{kind=\"network.violation\"}",
            )
            .is_some_and(|v| v > 0.0)
    });
    delete(server, id);
}
