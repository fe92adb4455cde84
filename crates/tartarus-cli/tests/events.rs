//! The server's events on the bus, seen through a signed webhook: a sandbox's life (created, started,
//! paused, resumed, ended with its reason) arrives at a receiver in the test, each request's signature
//! checked, on the in-memory bus and on NATS JetStream (the real server on 127.0.0.1:4222).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::server::{call, create, DataDir, Server};
use serde_json::{json, Value};

const SECRET: &str = "event-webhook-secret-for-tests";

/// What the receiver got: (subject, verified, event).
type Received = Arc<Mutex<Vec<(String, bool, Value)>>>;

/// A small HTTP/1.1 receiver on loopback: one request per connection, answered 204.
fn receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received: Received = Arc::default();
    let store = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream);
            let mut headers = std::collections::HashMap::new();
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
                }
            }
            let length: usize = headers
                .get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length.min(1 << 20)];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let header = |name: &str| headers.get(name).cloned().unwrap_or_default();
            let timestamp: i64 = header("x-tartarus-timestamp").parse().unwrap_or(0);
            let verified = tartarus_events::webhooks::verify(
                SECRET.as_bytes(),
                timestamp,
                &body,
                &header("x-tartarus-signature-256"),
            );
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            store
                .lock()
                .unwrap()
                .push((header("x-tartarus-event"), verified, event));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
    });
    (url, received)
}

fn sandbox_life_reaches_a_webhook(bus: Option<&str>, provider: &str) {
    let dir = DataDir::new();
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let (url, received) = receiver();
    let mut args = vec![
        "--event-webhook".to_string(),
        format!("{url} sandbox.>"),
        "--event-webhook-secret-file".to_string(),
        secret.display().to_string(),
    ];
    if let Some(bus) = bus {
        args.extend(["--event-bus".to_string(), bus.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(dir.path(), &[], &args);

    let (status, health) = call("GET", &format!("{}/healthz", server.base), None, None);
    assert_eq!(status, 200);
    assert_eq!(health["event_bus"]["provider"], provider, "{health}");

    let sandbox = create(&server, &server.admin, json!({}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    for action in ["pause", "resume"] {
        let (status, body) = call(
            "POST",
            &format!("{}/v1/sandboxes/{id}/{action}", server.base),
            Some(&server.admin),
            None,
        );
        assert_eq!(status, 200, "{action}: {body}");
    }
    let (status, body) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{body}");

    let mine = || -> Vec<(String, bool, Value)> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, event)| event["data"]["sandbox"] == id.as_str())
            .cloned()
            .collect()
    };
    common::poll_until(Duration::from_secs(30), "sandbox.ended at the webhook", || {
        mine().iter().any(|(subject, _, _)| subject == "sandbox.ended")
    });
    let events = mine();
    let subjects: Vec<&str> = events.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "sandbox.created",
            "sandbox.started",
            "sandbox.paused",
            "sandbox.resumed",
            "sandbox.ended"
        ],
        "each once, in order"
    );
    assert!(
        events.iter().all(|(_, verified, _)| *verified),
        "a bad signature: {events:?}"
    );
    let ended = &events.iter().find(|(s, _, _)| s == "sandbox.ended").unwrap().2;
    assert_eq!(ended["tenant"], "admin");
    assert_eq!(ended["data"]["reason"], "killed", "{ended}");
    assert!(
        !received
            .lock()
            .unwrap()
            .iter()
            .any(|(s, _, _)| !s.starts_with("sandbox.")),
        "the filter let other events through"
    );
}

#[test]
fn sandbox_life_reaches_a_webhook_through_the_in_memory_bus() {
    sandbox_life_reaches_a_webhook(None, "in-memory");
}

#[test]
fn sandbox_life_reaches_a_webhook_through_nats() {
    let url = std::env::var("TARTARUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
    sandbox_life_reaches_a_webhook(Some(&url), "nats");
}

#[test]
fn a_bad_event_bus_setting_stops_the_server_with_a_clear_error() {
    let dir = DataDir::new();
    let out = std::process::Command::new(common::bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--event-bus",
            "kafka://x",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--event-bus") && stderr.contains("nats://"),
        "{stderr}"
    );
}
