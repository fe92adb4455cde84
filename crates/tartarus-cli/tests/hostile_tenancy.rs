//! Hostile tenants against a real server (issue 14): no shared-host holes, no cross-tenant oracles.
//!
//! Each test reproduces one finding of the hostile-tenant review (C2, M1, M2, M5, L1, L2, L5) with two
//! tenants, alpha and beta, and checks the defence. Network traffic stays on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::bin;
use common::registry::{base_layer, Compression, Format, Image, Registry, RunConfig};
use common::server::{call, create, new_key, DataDir, Server};
use serde_json::{json, Value};

fn post(server: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    call("POST", &format!("{}{path}", server.base), Some(key), Some(body))
}

fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    call("GET", &format!("{}{path}", server.base), Some(key), None)
}

fn message(reply: &Value) -> &str {
    reply["error"]["message"].as_str().unwrap_or_default()
}

fn sandbox_count(server: &Server, key: &str) -> usize {
    get(server, key, "/v1/sandboxes").1.as_array().unwrap().len()
}

/// A loopback listener that counts the connections it accepts (and closes them): it stands for a
/// service on the server's host, or a port a tenant probes.
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, count)
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// --- C2: the host's network and root ------------------------------------------------------------------

#[test]
fn c2_user_keys_never_get_the_host_network_or_root_and_admins_only_with_the_flag() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let beta = new_key(dir.path(), "beta", "user");

    // The attack: a user key asks for the host's network namespace (the API, /metrics, the database and
    // other tenants' listeners on the host would be reachable from inside).
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/sandboxes",
        json!({"network": "host-loopback", "timeout_s": 60}),
    );
    assert_eq!(status, 403, "{reply}");
    assert!(message(&reply).contains("admin keys only"), "{reply}");
    assert!(message(&reply).contains("--allow-host-network"), "{reply}");
    let (status, reply) = post(&server, &beta, "/v1/sandboxes", json!({"rootfs": "/"}));
    assert_eq!(status, 403, "{reply}");
    assert_eq!(sandbox_count(&server, &beta), 0);

    // Admins too, unless the server was started to allow it; the message names the flag, on one line.
    for (body, flag) in [
        (json!({"network": "host-loopback"}), "--allow-host-network"),
        (json!({"rootfs": "/"}), "--allow-host-rootfs"),
    ] {
        let (status, reply) = post(&server, &server.admin, "/v1/sandboxes", body.clone());
        assert_eq!(status, 403, "{body}: {reply}");
        assert!(message(&reply).contains(flag), "{body}: {reply}");
        assert!(!message(&reply).contains('\n'));
    }
    drop(server);

    // With the flags: admins get it, user keys still do not.
    let server = Server::start_with(dir.path(), &[], &["--allow-host-network", "--allow-host-rootfs"]);
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/sandboxes",
        json!({"network": "host-loopback"}),
    );
    assert_eq!(status, 403, "{reply}");
    let (status, reply) = post(&server, &beta, "/v1/sandboxes", json!({"rootfs": "/"}));
    assert_eq!(status, 403, "{reply}");
    assert_eq!(sandbox_count(&server, &beta), 0);
    let host = create(&server, &server.admin, json!({"network": "host-loopback"}));
    assert_eq!(host["status"], "running", "{host}");
}

// --- M1: the blob store's answer ----------------------------------------------------------------------

fn put_blob(server: &Server, key: &str, bytes: &[u8]) -> Value {
    let response = ureq::put(&format!("{}/v1/blobs", server.base))
        .set("Authorization", &format!("Bearer {key}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(bytes)
        .unwrap();
    assert_eq!(response.status(), 201);
    response.into_json().unwrap()
}

#[test]
fn m1_a_blob_put_answers_for_the_tenant_alone() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");

    // Alpha holds a secret; beta guesses it: the answer must not say whether alpha holds it.
    assert_eq!(put_blob(&server, &alpha, b"PIN=4821\n")["stored"], true);
    let guesses: Vec<Value> = ["PIN=4820\n", "PIN=4821\n", "PIN=4822\n"]
        .iter()
        .map(|g| put_blob(&server, &beta, g.as_bytes()))
        .collect();
    for guess in &guesses {
        assert_eq!(
            guess["stored"], true,
            "new to beta, whatever alpha holds: {guess}"
        );
    }
    // The per-tenant answer: beta's own repeat is deduplicated.
    assert_eq!(put_blob(&server, &beta, b"PIN=4821\n")["stored"], false);
    assert_eq!(put_blob(&server, &alpha, b"PIN=4821\n")["stored"], false);
    // Both read it back; usage counts it once for each.
    for key in [&alpha, &beta] {
        let cid = guesses[1]["cid"].as_str().unwrap();
        let body = ureq::get(&format!("{}/v1/blobs/{cid}", server.base))
            .set("Authorization", &format!("Bearer {key}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert_eq!(body, "PIN=4821\n");
    }
}

// --- M2: the tool listing -----------------------------------------------------------------------------

#[test]
fn m2_tenants_list_only_the_tools_they_may_call_without_urls_headers_or_commands() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta_viewer = new_key(dir.path(), "beta", "viewer");
    let (port, _) = counting_listener();
    let restricted = json!({"name": "alpha-http", "kind": "http",
        "url": format!("http://127.0.0.1:{port}/api?token=URLSECRET123"),
        "headers": {"Authorization": "Bearer HEADERSECRET456"}, "tenants": ["alpha"]});
    let everyone = json!({"name": "stamp", "kind": "command", "command": ["/usr/bin/date", "-u", "+CMDSECRET789"],
        "description": "the time"});
    for tool in [restricted, everyone] {
        let (status, reply) = post(&server, &server.admin, "/v1/tools", tool);
        assert_eq!(status, 201, "{reply}");
    }

    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    // Beta's viewer: only what beta may call, and nothing of how it is reached.
    let (status, list) = get(&server, &beta_viewer, "/v1/tools");
    assert_eq!(status, 200, "{list}");
    assert_eq!(names(&list), ["stamp"], "{list}");
    // Alpha: its tool, still without the operator's details.
    let (_, list) = get(&server, &alpha, "/v1/tools");
    assert_eq!(names(&list), ["alpha-http", "stamp"], "{list}");
    for text in [
        get(&server, &beta_viewer, "/v1/tools").1.to_string(),
        list.to_string(),
    ] {
        for secret in [
            "URLSECRET123",
            "HEADERSECRET456",
            "CMDSECRET789",
            "127.0.0.1",
            "tenants",
            "alpha\"]",
        ] {
            assert!(!text.contains(secret), "{secret} shown to a tenant: {text}");
        }
    }
    assert_eq!(list[1]["description"], "the time");
    assert_eq!(list[0]["kind"], "http");
    // The same from inside a sandbox, through its gateway.
    let sandbox = create(&server, &alpha, json!({}));
    let socket = dir
        .path()
        .join("gateway")
        .join(sandbox["id"].as_str().unwrap())
        .join("gateway.sock");
    let inside = gateway_request(&socket, "GET", "/v1/tools", None, b"");
    assert_eq!(inside.0, 200);
    let text = String::from_utf8_lossy(&inside.1);
    assert!(
        text.contains("alpha-http") && !text.contains("URLSECRET123"),
        "{text}"
    );
    // Admins see every declaration (header values hidden).
    let (_, all) = get(&server, &server.admin, "/v1/tools");
    let all = all.to_string();
    assert!(
        all.contains("URLSECRET123") && !all.contains("HEADERSECRET456"),
        "{all}"
    );
}

// --- L1: template ids and /metrics --------------------------------------------------------------------

fn template(id: &str, name: &str, image: &str) -> Value {
    json!({"yaml": format!("id: {id}\nname: {name}\nbase_image: {image}\n")})
}

#[test]
fn l1_template_ids_are_per_tenant_and_tell_nothing_about_other_tenants() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");
    let (status, reply) = post(
        &server,
        &alpha,
        "/v1/templates",
        template("alpha-tpl", "Alpha", "alpine"),
    );
    assert_eq!(status, 201, "{reply}");

    // Beta's create with alpha's (hidden) id answers exactly as with a free id.
    let (taken, taken_reply) = post(
        &server,
        &beta,
        "/v1/templates",
        template("alpha-tpl", "Beta", "alpine"),
    );
    let (free, free_reply) = post(
        &server,
        &beta,
        "/v1/templates",
        template("free-tpl", "Beta", "alpine"),
    );
    assert_eq!((taken, free), (201, 201), "{taken_reply} / {free_reply}");
    assert_eq!(taken_reply["tenant"], "beta");
    assert_eq!(taken_reply["template"]["name"], "Beta");

    // Each sees its own; neither changed the other's.
    let (_, mine) = get(&server, &alpha, "/v1/templates/alpha-tpl");
    assert_eq!(
        (mine["tenant"].as_str(), mine["template"]["name"].as_str()),
        (Some("alpha"), Some("Alpha"))
    );
    let (_, theirs) = get(&server, &beta, "/v1/templates/alpha-tpl");
    assert_eq!(theirs["template"]["name"], "Beta");
    let (_, list) = get(&server, &beta, "/v1/templates");
    assert!(
        list.as_array().unwrap().iter().all(|t| t["tenant"] == "beta"),
        "{list}"
    );
    // Beta deletes its own; alpha's stays.
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/templates/alpha-tpl", server.base),
        Some(&beta),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(get(&server, &alpha, "/v1/templates/alpha-tpl").0, 200);
    assert_eq!(get(&server, &beta, "/v1/templates/alpha-tpl").0, 404);
    // Asking for another tenant's template by name is refused as for any tenant.
    assert_eq!(get(&server, &beta, "/v1/templates/alpha-tpl?tenant=alpha").0, 403);
    // Admins see both and address one with ?tenant=.
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/templates",
        template("alpha-tpl", "Beta", "alpine"),
    );
    assert_eq!(status, 201, "{reply}");
    let (status, reply) = get(&server, &server.admin, "/v1/templates/alpha-tpl");
    assert_eq!(status, 409, "{reply}");
    assert!(message(&reply).contains("?tenant="), "{reply}");
    let (_, reply) = get(&server, &server.admin, "/v1/templates/alpha-tpl?tenant=alpha");
    assert_eq!(reply["template"]["name"], "Alpha");
    // Shared ids stay out of reach: a tenant cannot take one (every tenant sees shared templates).
    let (status, _) = post(
        &server,
        &server.admin,
        "/v1/templates",
        template("shared-tpl", "S", "alpine"),
    );
    assert_eq!(status, 201);
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/templates",
        template("shared-tpl", "B", "alpine"),
    );
    assert_eq!(status, 403, "{reply}");
}

fn push_busybox(registry: &Registry, repo: &str) -> String {
    let image = Image::new(vec![base_layer(Compression::Gzip)], RunConfig::default());
    registry
        .push(repo, "1", &image, Format::Oci)
        .reference(&registry.host())
}

#[test]
fn l1_unauthenticated_metrics_name_no_template_or_tool() {
    let registry = Registry::anonymous();
    let reference = push_busybox(&registry, "alpha/base");
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--insecure-registry", &registry.host()]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let (status, reply) = post(
        &server,
        &alpha,
        "/v1/templates",
        template("alpha-secret-template", "A", &reference),
    );
    assert_eq!(status, 201, "{reply}");
    let sandbox = create(&server, &alpha, json!({"template": "alpha-secret-template"}));
    let tool = json!({"name": "alpha-secret-tool", "kind": "command", "command": ["/bin/true"], "tenants": ["alpha"]});
    assert_eq!(post(&server, &server.admin, "/v1/tools", tool).0, 201);
    let socket = dir
        .path()
        .join("gateway")
        .join(sandbox["id"].as_str().unwrap())
        .join("gateway.sock");
    let answer = gateway_request(&socket, "POST", "/v1/tools/alpha-secret-tool", None, b"{}");
    assert_eq!(answer.0, 200, "{}", String::from_utf8_lossy(&answer.1));

    let text = ureq::get(&format!("{}/metrics", server.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(text.contains("tartarus_tool_calls_total"), "{text}");
    assert!(text.contains("template=\"template\""), "{text}");
    for secret in ["alpha-secret-template", "alpha-secret-tool", "alpha"] {
        assert!(!text.contains(secret), "/metrics names {secret}: {text}");
    }
}

// --- M5: image pulls as a user key --------------------------------------------------------------------

#[test]
fn m5_user_keys_pull_only_from_allowed_registries_and_errors_tell_nothing() {
    let registry = Registry::anonymous();
    let reference = push_busybox(&registry, "shared/base");
    let (open, connections) = counting_listener();
    let closed = closed_port();
    let dir = DataDir::new();

    // No allowlist: a user key may not name images at all; nothing is contacted.
    let server = Server::start(dir.path());
    let beta = new_key(dir.path(), "beta", "user");
    for port in [open, closed] {
        let (status, reply) = post(
            &server,
            &beta,
            "/v1/sandboxes",
            json!({"image": format!("127.0.0.1:{port}/x:latest")}),
        );
        assert_eq!(status, 403, "{reply}");
        assert!(message(&reply).contains("--registry"), "{reply}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a refused pull must not connect"
    );
    // A template of beta's with such an image is refused when it is used, and pulls nothing meanwhile.
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/templates",
        template("probe", "P", &format!("127.0.0.1:{open}/x:latest")),
    );
    assert_eq!(status, 201, "{reply}");
    let (status, reply) = post(&server, &beta, "/v1/sandboxes", json!({"template": "probe"}));
    assert_eq!(status, 403, "{reply}");
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    drop(server);

    // An allowlist: the loopback registry (insecure counts), and two allowed entries that are a closed
    // port and a port that is no registry. A user key pulls from the registry; the other two fail with
    // the same words (the port scan learns nothing); other hosts are refused before any connection.
    let server = Server::start_with(
        dir.path(),
        &[],
        &[
            "--insecure-registry",
            &registry.host(),
            "--registry",
            &format!("127.0.0.1:{open}"),
            "--registry",
            &format!("127.0.0.1:{closed}"),
        ],
    );
    let image = create(&server, &beta, json!({"image": reference}));
    assert_eq!(image["status"], "running", "{image}");
    let mut failures = Vec::new();
    for port in [open, closed] {
        let host = format!("127.0.0.1:{port}");
        let (status, reply) = post(
            &server,
            &beta,
            "/v1/sandboxes",
            json!({"image": format!("{host}/x:latest")}),
        );
        assert_eq!(status, 422, "{reply}");
        failures.push(message(&reply).replace(&host, "HOST"));
    }
    assert_eq!(failures[0], failures[1], "open and closed ports must look alike");
    assert!(failures[0].contains("server log"), "{failures:?}");
    let (other, others) = counting_listener();
    let (status, reply) = post(
        &server,
        &beta,
        "/v1/sandboxes",
        json!({"image": format!("127.0.0.1:{other}/x:latest")}),
    );
    assert_eq!(status, 403, "{reply}");
    assert!(message(&reply).contains("not one user keys may use"), "{reply}");
    assert_eq!(others.load(Ordering::SeqCst), 0);
    // Admins still get the cause.
    let (status, reply) = post(
        &server,
        &server.admin,
        "/v1/sandboxes",
        json!({"image": format!("127.0.0.1:{closed}/x:latest")}),
    );
    assert_eq!(status, 422, "{reply}");
    assert!(!message(&reply).contains("server log"), "{reply}");
}

// --- L5: admin keys and tenants -----------------------------------------------------------------------

fn apikey(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("apikey")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn l5_an_admin_key_for_a_tenant_is_refused() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let beta = new_key(dir.path(), "beta", "user");
    let sandbox = create(&server, &beta, json!({}));

    let out = apikey(dir.path(), &["create", "--tenant", "alpha", "--role", "admin"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "no secret printed");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("not scoped to a tenant"), "{error}");
    assert!(error.contains("--role user"), "{error}");
    let keys = apikey(dir.path(), &["list", "--json"]);
    let keys: Value = serde_json::from_slice(&keys.stdout).unwrap();
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| !(k["tenant"] == "alpha" && k["role"] == "admin")),
        "{keys}"
    );
    // An admin key is made without a tenant; alpha's user key stays scoped to alpha.
    let out = apikey(dir.path(), &["create", "--role", "admin"]);
    assert!(out.status.success(), "{out:?}");
    let alpha = new_key(dir.path(), "alpha", "user");
    let id = sandbox["id"].as_str().unwrap();
    assert_eq!(get(&server, &alpha, &format!("/v1/sandboxes/{id}")).0, 404);
}

// --- L2: one receipt per call -------------------------------------------------------------------------

/// One HTTP/1.1 exchange on a gateway socket; the status and the body.
fn gateway_request(
    socket: &PathBuf,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = key {
        request.push_str(&format!("Idempotency-Key: {key}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        chunked |= line.to_ascii_lowercase().starts_with("transfer-encoding") && line.contains("chunked");
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).unwrap();
    if chunked {
        // Good enough for the small answers here: drop the chunk-size lines.
        let text = String::from_utf8_lossy(&raw).to_string();
        let body: String = text
            .split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        return (status, body.into_bytes());
    }
    (status, raw)
}

/// An HTTP upstream on loopback that answers every request at once with the same bytes.
fn echo_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/echo", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut length, mut line) = (0usize, String::new());
                reader.read_line(&mut line).unwrap();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                );
            });
        }
    });
    url
}

#[test]
fn l2_identical_concurrent_tool_calls_get_a_receipt_each() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let tool = json!({"name": "echo", "kind": "http", "url": echo_upstream()});
    assert_eq!(post(&server, &server.admin, "/v1/tools", tool).0, 201);
    let sandbox = create(&server, &alpha, json!({}));
    let id = sandbox["id"].as_str().unwrap().to_string();
    let socket = dir.path().join("gateway").join(&id).join("gateway.sock");

    // The same body, at the same time, without an idempotency key: many land in the same millisecond.
    // As many as a sandbox may have in flight at once (more are refused with 429).
    const CALLS: usize = 16;
    let receipts: Vec<String> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let socket = socket.clone();
                scope.spawn(move || {
                    let mut stream = UnixStream::connect(&socket).unwrap();
                    write!(
                        stream,
                        "POST /v1/tools/echo HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
                    )
                    .unwrap();
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer).unwrap();
                    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                    answer
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("tartarus-receipt:").map(|v| v.trim().to_string()))
                        .unwrap()
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let distinct: std::collections::BTreeSet<&String> = receipts.iter().collect();
    assert_eq!(distinct.len(), CALLS, "every call its own receipt");
    let (status, stored) = get(&server, &alpha, &format!("/v1/receipts?sandbox={id}"));
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored.as_array().unwrap().len(), CALLS, "{stored}");

    // With one idempotency key the repeat is a replay carrying the first receipt.
    let first = gateway_request(&socket, "POST", "/v1/tools/echo", Some("k1"), b"hello");
    let again = gateway_request(&socket, "POST", "/v1/tools/echo", Some("k1"), b"hello");
    assert_eq!((first.0, again.0), (200, 200));
    let (_, stored) = get(&server, &alpha, &format!("/v1/receipts?sandbox={id}"));
    assert_eq!(stored.as_array().unwrap().len(), CALLS + 1, "{stored}");
}
