//! Verifiable effects end to end against a real server: tools through the gateway socket with receipts
//! and the idempotency ledger (counting real invocations), the blob API and CLI, episodes exported as CAR
//! and verified offline, signed signals, and deterministic datasets.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::server::{call, cli, create, exec, new_key, DataDir, Server};
use serde_json::{json, Value};

fn post(server: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    call("POST", &format!("{}{path}", server.base), Some(key), Some(body))
}

fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    call("GET", &format!("{}{path}", server.base), Some(key), None)
}

/// One HTTP/1.1 exchange over the sandbox's gateway socket, from the host side (the socket is what
/// identifies the sandbox, so this is exactly what a process inside sends).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn gateway_call(socket: &Path, tool: &str, key: Option<&str>, body: &[u8]) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut request = format!(
        "POST /v1/tools/{tool} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        request.push_str(&format!("Idempotency-Key: {key}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    read_answer(stream)
}

fn read_answer(stream: impl Read) -> Answer {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (k, v) = trimmed.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// An upstream HTTP service on loopback that counts requests and answers with what it received and the
/// Authorization header the gateway added.
fn upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/charge", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut auth, mut length, mut line) = (String::new(), 0usize, String::new());
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end().to_string();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "authorization" => auth = v.trim().to_string(),
                    "content-length" => length = v.trim().parse().unwrap(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let answer = json!({"received": String::from_utf8_lossy(&body), "auth": auth}).to_string();
            let status = if body.starts_with(b"{\"fail\"") {
                "402 Payment Required"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (url, count)
}

fn socket(dir: &DataDir, id: &str) -> PathBuf {
    dir.path().join("gateway").join(id).join("gateway.sock")
}

fn keys_file(dir: &DataDir) -> PathBuf {
    dir.path().join("keys").join("public-keys.json")
}

#[test]
fn http_tool_calls_are_receipted_replayed_and_refused_on_divergence() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    let (url, count) = upstream();
    let tool = json!({"name": "charge", "kind": "http", "url": url,
                      "headers": {"Authorization": "Bearer sk_test_SECRET"}, "timeout_s": 5});
    let (status, body) = post(&server, &user, "/v1/tools", tool.clone());
    assert_eq!(status, 403, "only admins declare tools: {body}");
    let (status, body) = post(&server, &server.admin, "/v1/tools", tool);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["headers"]["Authorization"], "(hidden)");

    // From inside the sandbox (no network at all): the gateway socket is mounted at /run/tartarus.
    let sandbox = create(&server, &user, json!({}));
    let id = sandbox["id"].as_str().unwrap();
    let script = r#"
import socket, http.client, json, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect("/run/tartarus/gateway.sock")
def call(body, key):
    c = Unix("gateway"); c.request("POST", "/v1/tools/charge", body, {"Idempotency-Key": key, "Content-Type": "application/json"})
    r = c.getresponse(); return [r.status, r.getheader("Tartarus-Receipt"), r.getheader("Tartarus-Replayed"), r.read().decode()]
print(json.dumps([call('{"amount":100}', "order-7"), call('{"amount":100}', "order-7")]))
"#;
    let (status, out) = exec(&server, &user, id, json!({"cmd": ["python3", "-c", script]}));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    let calls: Value = serde_json::from_str(out["stdout"].as_str().unwrap()).unwrap();
    let (first, second) = (&calls[0], &calls[1]);
    assert_eq!(first[0], 200, "{calls}");
    assert_eq!(first[2], "false");
    let answer: Value = serde_json::from_str(first[3].as_str().unwrap()).unwrap();
    assert_eq!(answer["received"], "{\"amount\":100}");
    assert_eq!(
        answer["auth"], "Bearer sk_test_SECRET",
        "the gateway adds the declared credentials"
    );
    assert_eq!(second[0], 200);
    assert_eq!(second[2], "true", "the repeat is a replay");
    assert_eq!(second[1], first[1], "a replay carries the original receipt");
    assert_eq!(second[3], first[3]);
    assert_eq!(count.load(Ordering::SeqCst), 1, "the upstream was called once");

    // Same key, another body: a divergence, refused and recorded; the tool is not called.
    let diverged = gateway_call(&socket(&dir, id), "charge", Some("order-7"), b"{\"amount\":1000}");
    assert_eq!(diverged.status, 409);
    let error: Value = serde_json::from_slice(&diverged.body).unwrap();
    assert_eq!(error["error"]["code"], "idempotency_divergence", "{error}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let (_, events) = get(&server, &server.admin, "/v1/events?category=effects");
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "idempotency.divergence"),
        "{events}"
    );

    // A failure answer is receipted as failed; the receipt list has exactly the real invocations.
    let failed = gateway_call(&socket(&dir, id), "charge", None, b"{\"fail\":true}");
    assert_eq!(failed.status, 402);
    let (status, receipts) = get(&server, &user, &format!("/v1/receipts?sandbox={id}"));
    assert_eq!(status, 200, "{receipts}");
    let receipts = receipts.as_array().unwrap();
    assert_eq!(receipts.len(), 2, "{receipts:?}");
    assert_eq!(receipts[0]["status"], "ok");
    assert_eq!(receipts[0]["code"], 200);
    assert_eq!(receipts[0]["idempotency_key"], "order-7");
    assert_eq!(receipts[0]["id"], first[1]);
    assert_eq!(receipts[1]["status"], "failed");
    assert_eq!(receipts[1]["code"], 402);
    // Another tenant sees none of them.
    let other = new_key(dir.path(), "team-b", "user");
    let (_, theirs) = get(&server, &other, "/v1/receipts");
    assert_eq!(theirs.as_array().unwrap().len(), 0);

    // Offline verification of the receipt, with the exact bytes.
    let work = tempfile::tempdir().unwrap();
    let receipt_file = work.path().join("receipt.cbor");
    let receipt_id = receipts[0]["id"].as_str().unwrap();
    let out = cli(
        &server,
        &user,
        &[
            "receipts",
            "show",
            receipt_id,
            "-o",
            receipt_file.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(work.path().join("req"), b"{\"amount\":100}").unwrap();
    std::fs::write(work.path().join("resp"), answer.to_string().as_bytes()).unwrap();
    std::fs::write(work.path().join("resp"), first[3].as_str().unwrap()).unwrap();
    let keys = keys_file(&dir);
    let verify = |file: &Path, extra: &[&str]| {
        let mut args = vec![
            "receipts",
            "verify",
            file.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli(&server, &user, &args, b"")
    };
    let req = work.path().join("req");
    let resp = work.path().join("resp");
    let out = verify(
        &receipt_file,
        &[
            "--request",
            req.to_str().unwrap(),
            "--response",
            resp.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("match its hashes"));
    // The wrong bytes, a flipped bit, a stranger's key: refused, saying why.
    let out = verify(&receipt_file, &["--request", resp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hash_mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = std::fs::read(&receipt_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = work.path().join("tampered.cbor");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = verify(&tampered, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad_signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stranger = work.path().join("stranger");
    cli(
        &server,
        &user,
        &["signal", "keygen", stranger.to_str().unwrap()],
        b"",
    );
    let args = ["receipts", "verify", receipt_file.to_str().unwrap(), "--keys"];
    let mut args: Vec<&str> = args.to_vec();
    let stranger_keys = stranger.join("public-keys.json");
    args.push(stranger_keys.to_str().unwrap());
    let out = cli(&server, &user, &args, b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_key"));
}

#[test]
fn concurrent_duplicates_invoke_the_tool_once() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("invocations");
    // A command tool that records each real invocation and is slow enough for duplicates to overlap it.
    let script = format!("echo call >> {}; sleep 0.3; cat", counter.display());
    let (status, body) = post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "record", "kind": "command", "command": ["/bin/sh", "-c", script]}),
    );
    assert_eq!(status, 201, "{body}");
    let sandbox = create(&server, &user, json!({}));
    let path = socket(&dir, sandbox["id"].as_str().unwrap());
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| gateway_call(&path, "record", Some("job-1"), b"payload")))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let invocations = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(
        invocations.lines().count(),
        1,
        "the tool ran more than once: {invocations:?}"
    );
    let receipt = answers[0].header("tartarus-receipt").unwrap().to_string();
    for answer in &answers {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, b"payload");
        assert_eq!(answer.header("tartarus-receipt"), Some(receipt.as_str()));
    }
    let fresh = answers
        .iter()
        .filter(|a| a.header("tartarus-replayed") == Some("false"))
        .count();
    assert_eq!(fresh, 1, "exactly one answer is the invocation, the rest replays");
    // Without a key, every call is a new invocation.
    gateway_call(&path, "record", None, b"a");
    gateway_call(&path, "record", None, b"a");
    assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 3);
}

#[test]
fn tool_failures_are_receipted_and_leave_the_key_retryable() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    // Bad declarations are refused with the reason.
    for (tool, needle) in [
        (
            json!({"name": "x", "kind": "command", "command": ["sh", "-c", "true"]}),
            "absolute path",
        ),
        (
            json!({"name": "x", "kind": "http", "url": "ftp://host/"}),
            "http://",
        ),
        (
            json!({"name": "X Y", "kind": "http", "url": "http://127.0.0.1:1/"}),
            "tool name",
        ),
        (
            json!({"name": "x", "kind": "http", "url": "http://127.0.0.1:1/", "extra": 1}),
            "unknown field",
        ),
    ] {
        let (status, body) = post(&server, &server.admin, "/v1/tools", tool);
        assert_eq!(status, 422, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
    // An upstream that is not there: 502, a receipt with status error, and the key released.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "down", "kind": "http", "url": url}),
    );
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "exit3", "kind": "command", "command": ["/bin/sh", "-c", "cat; exit 3"]}),
    );
    let sandbox = create(&server, &user, json!({}));
    let id = sandbox["id"].as_str().unwrap();
    let path = socket(&dir, id);
    let down = gateway_call(&path, "down", Some("k"), b"{}");
    assert_eq!(down.status, 502);
    let again = gateway_call(&path, "down", Some("k"), b"{}");
    assert_eq!(
        again.status, 502,
        "a retry runs again instead of replaying a non-answer"
    );
    assert_eq!(again.header("tartarus-replayed"), Some("false"));
    let failed = gateway_call(&path, "exit3", None, b"in");
    assert_eq!(failed.status, 502);
    assert_eq!(failed.header("tartarus-exit-code"), Some("3"));
    assert_eq!(failed.body, b"in");
    assert_eq!(gateway_call(&path, "nope", None, b"").status, 404);
    let (_, receipts) = get(&server, &user, &format!("/v1/receipts?sandbox={id}"));
    let statuses: Vec<&str> = receipts
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["error", "error", "failed"]);
    // A tool limited to another tenant does not exist for this one.
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "private", "kind": "command", "command": ["/bin/cat"], "tenants": ["team-b"]}),
    );
    assert_eq!(gateway_call(&path, "private", None, b"").status, 404);
}

#[test]
fn blobs_stream_verify_range_and_respect_tenants_and_quotas() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--blob-quota", "3M"]);
    let user = new_key(dir.path(), "team-a", "user");
    let other = new_key(dir.path(), "team-b", "user");
    let work = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(1u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = work.path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let out = cli(&server, &user, &["blob", "put", file.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(cid.starts_with("bafkr4i"), "{cid}");
    let expected = blake3::hash(&data);
    assert!(cid.len() == 59 && cid.starts_with('b'));
    // Whole, verified by the client too.
    let copy = work.path().join("copy.bin");
    let out = cli(
        &server,
        &user,
        &["blob", "get", &cid, "-o", copy.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(blake3::hash(&std::fs::read(&copy).unwrap()), expected);
    // A range with a proof, checked against the id alone.
    let part = work.path().join("part.bin");
    let out = cli(
        &server,
        &user,
        &[
            "blob",
            "get",
            &cid,
            "--range",
            "100000-300000",
            "-o",
            part.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&part).unwrap(), &data[100_000..=300_000]);
    // Plain HTTP Range.
    let response = ureq::get(&format!("{}/v1/blobs/{cid}", server.base))
        .set("Authorization", &format!("Bearer {user}"))
        .set("Range", "bytes=10-19")
        .call()
        .unwrap();
    assert_eq!(response.status(), 206);
    let mut got = Vec::new();
    response.into_reader().read_to_end(&mut got).unwrap();
    assert_eq!(got, &data[10..20]);
    // Local verification.
    let out = cli(
        &server,
        &user,
        &["blob", "verify", &cid, file.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success());
    let out = cli(
        &server,
        &user,
        &["blob", "verify", &cid, part.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    // Another tenant cannot read it by id; a second put by this tenant is deduplicated.
    assert_eq!(get(&server, &other, &format!("/v1/blobs/{cid}")).0, 404);
    let out = cli(&server, &user, &["blob", "put", file.to_str().unwrap()], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already stored"));
    // Over the quota: refused, nothing stored.
    let big = work.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    let out = cli(&server, &user, &["blob", "put", big.to_str().unwrap()], b"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("quota"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A byte changed on disk: the server stops before sending it, and the client refuses.
    let hex = hex::encode(expected.as_bytes());
    let on_disk = dir.path().join("blobs").join("blobs").join(&hex[..2]).join(&hex);
    let mut stored = std::fs::read(&on_disk).unwrap();
    stored[500_000] ^= 0x40;
    std::fs::write(&on_disk, &stored).unwrap();
    let out = cli(
        &server,
        &user,
        &["blob", "get", &cid, "-o", copy.to_str().unwrap()],
        b"",
    );
    assert!(!out.status.success(), "a corrupted blob was served");
    // Release and collect.
    let out = cli(&server, &user, &["blob", "rm", &cid], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, report) = post(&server, &server.admin, "/v1/blobs/gc", json!(null));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["blobs_removed"], 1);
    assert!(!on_disk.exists());
}

/// Runs one sandbox to its end: an exec, optional tool call, then delete. Returns its id.
fn one_run(server: &Server, dir: &DataDir, key: &str, labels: Value, env: Value) -> String {
    let sandbox = create(server, key, json!({"labels": labels, "env": env}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    let (status, out) = exec(
        server,
        key,
        &id,
        json!({"cmd": ["sh", "-c", "echo out; echo $API_TOKEN"]}),
    );
    assert_eq!(status, 200, "{out}");
    let answer = gateway_call(&socket(dir, &id), "echo", None, b"{\"q\":1}");
    assert_eq!(answer.status, 200);
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(key),
        None,
    );
    assert_eq!(status, 200);
    id
}

#[test]
fn episodes_export_verify_offline_with_signals_and_redaction() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "echo", "kind": "command", "command": ["/bin/cat"]}),
    );
    let id = one_run(
        &server,
        &dir,
        &user,
        json!({"kind": "a"}),
        json!({"API_TOKEN": "hunter2-secret"}),
    );
    let (status, episode) = get(&server, &user, &format!("/v1/episodes/{id}"));
    assert_eq!(status, 200, "{episode}");
    assert_eq!(episode["facts"]["tool_calls"], 1);
    assert_eq!(episode["facts"]["label.kind"], "a");
    let episode_id = episode["id"].as_str().unwrap().to_string();

    // An evaluator signs a score; unregistered keys are refused.
    let work = tempfile::tempdir().unwrap();
    let grader = work.path().join("grader");
    let out = cli(
        &server,
        &user,
        &["signal", "keygen", grader.to_str().unwrap()],
        b"",
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let signal_args = |key_dir: &Path| {
        vec![
            "signal".to_string(),
            "add".into(),
            id.clone(),
            "--evaluator".into(),
            "grader".into(),
            "--key-dir".into(),
            key_dir.display().to_string(),
            "--name".into(),
            "correctness".into(),
            "--score".into(),
            "9000".into(),
            "--label".into(),
            "pass".into(),
        ]
    };
    let args = signal_args(&grader);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli(&server, &user, &args, b"");
    assert!(
        !out.status.success(),
        "an unregistered evaluator key was accepted"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a registered evaluator key"));
    let out = cli(
        &server,
        &server.admin,
        &["evaluator", "add", "grader", "--public-key", &public],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&server, &user, &args, b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, episode) = get(&server, &user, &format!("/v1/episodes/{episode_id}"));
    assert_eq!(episode["facts"]["signal.correctness.score"], 9000);

    // Export and verify offline (no server needed: only the file and keys).
    let car = work.path().join("run.car");
    let out = cli(
        &server,
        &user,
        &["episode", "export", &id, "-o", car.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&car).unwrap();
    assert!(
        !bytes
            .windows(b"hunter2-secret".len())
            .any(|w| w == b"hunter2-secret"),
        "a secret reached the episode"
    );
    let offline = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .args(args)
            .env_remove("TARTARUS_HOST")
            .env("XDG_CONFIG_HOME", work.path())
            .output()
            .unwrap()
    };
    let out = offline(&["episode", "verify", car.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["episode"], episode_id.as_str());
    assert_eq!(report["receipts"], 1);
    assert_eq!(report["signals"], 1);
    assert!(report["trace_records"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(report["keys_embedded"], true);
    let keys = keys_file(&dir);
    // With the keys this verifier trusts: the server's, and the evaluator's for its signals.
    let grader_keys = format!("grader={}", grader.join("public-keys.json").display());
    let trusted = [
        "episode",
        "verify",
        car.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ];
    let out = offline(&trusted);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a signal by an evaluator the verifier does not trust passed"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_key"));
    let out = offline(&[&trusted[..], &["--evaluator", &grader_keys]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Any changed byte is refused.
    let mut tampered = bytes.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 1;
    let bad = work.path().join("bad.car");
    std::fs::write(&bad, &tampered).unwrap();
    let out = offline(&["episode", "verify", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a tampered episode verified");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    // Signed by someone the verifier does not trust: refused.
    let out = offline(&[
        "episode",
        "verify",
        car.to_str().unwrap(),
        "--keys",
        grader.join("public-keys.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn datasets_are_deterministic() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "echo", "kind": "command", "command": ["/bin/cat"]}),
    );
    for i in 0..6 {
        let kind = if i % 3 == 0 { "b" } else { "a" };
        one_run(&server, &dir, &user, json!({"kind": kind}), json!({}));
    }
    let query = json!({"filter": {"eq": ["outcome", "killed"]}, "sample": {"seed": 7, "size": 3}, "stratify": "label.kind"});
    let build = |query: &Value| {
        let out = cli(
            &server,
            &user,
            &["dataset", "build", "-f", "-"],
            query.to_string().as_bytes(),
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let first = build(&query);
    let second = build(&query);
    assert_eq!(first, second, "the same query gave another manifest");
    // The manifest is a blob: fetch it and check what it holds.
    let (status, datasets) = get(&server, &user, "/v1/datasets");
    assert_eq!(status, 200);
    assert_eq!(datasets.as_array().unwrap().len(), 1, "{datasets}");
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest");
    let out = cli(
        &server,
        &user,
        &["blob", "get", &first, "-o", manifest.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Stratified: 4 of kind a and 2 of kind b → 2 + 1 of 3.
    let (_, built) = post(&server, &user, "/v1/datasets", query.clone());
    assert_eq!(built["id"], first.as_str());
    assert_eq!(built["matched"], 6);
    assert_eq!(built["episodes"], 3);
    assert_eq!(built["strata"], json!({"a": 2, "b": 1}));
    // A bad query says where it is wrong.
    let (status, error) = post(
        &server,
        &user,
        "/v1/datasets",
        json!({"filter": {"gt": ["exit_code", "x"]}}),
    );
    assert_eq!(status, 422, "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("gt"),
        "{error}"
    );
}

#[test]
fn a_restarted_server_reopens_gateways_and_a_retry_takes_over_an_expired_lease() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "team-a", "user");
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("invocations");
    let started = work.path().join("started");
    // Records each invocation; the first one takes a while (long enough to kill the server in the
    // middle, shorter than its 2 s limit would allow to pass unnoticed), the others answer at once.
    let script = format!(
        "echo call >> {c}; if [ ! -e {s} ]; then touch {s}; sleep 5; fi; cat",
        c = counter.display(),
        s = started.display()
    );
    post(
        &server,
        &server.admin,
        "/v1/tools",
        json!({"name": "slow", "kind": "command", "command": ["/bin/sh", "-c", script], "timeout_s": 2}),
    );
    let sandbox = create(&server, &user, json!({}));
    let path = socket(&dir, sandbox["id"].as_str().unwrap());
    let in_flight = {
        let path = path.clone();
        std::thread::spawn(move || {
            // The server dies mid-call: the connection breaks without an answer.
            let mut stream = UnixStream::connect(&path).unwrap();
            let request = "POST /v1/tools/slow HTTP/1.1\r\nHost: g\r\nIdempotency-Key: pay-1\r\nContent-Length: 2\r\n\r\nhi";
            stream.write_all(request.as_bytes()).unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        })
    };
    // Wait until the tool is running (it touched its file), then kill the server: the key stays
    // registered under a lease nobody will commit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "the tool never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill9();
    in_flight.join().unwrap();
    let server = Server::start(dir.path());
    // The re-adopted sandbox has its gateway again; the retry waits out the dead holder's lease (the
    // tool's 2 s limit plus a 5 s margin), takes the key over and runs the call again.
    let retry = gateway_call(&path, "slow", Some("pay-1"), b"hi");
    assert_eq!(retry.status, 200, "{}", String::from_utf8_lossy(&retry.body));
    assert_eq!(retry.body, b"hi");
    assert_eq!(retry.header("tartarus-replayed"), Some("false"));
    assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 2);
    // Now committed: a further retry replays without running anything.
    let replay = gateway_call(&path, "slow", Some("pay-1"), b"hi");
    assert_eq!(replay.header("tartarus-replayed"), Some("true"));
    assert_eq!(
        replay.header("tartarus-receipt"),
        retry.header("tartarus-receipt")
    );
    assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 2);
    drop(server);
}
