//! Hostile tenants against the server's resource bounds (issue 14): connections and timeouts on the API and
//! the gateway sockets, document nesting, concurrent execs and tool calls per sandbox, and client errors
//! answered as JSON 4xx. Each test runs a real server with two tenants: alpha attacks, beta must be served.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{call, create, exec, new_key, DataDir, Server};
use common::{bin, poll_until};
use serde_json::{json, Value};

/// Sends a request with a 15 s timeout; returns the status, the JSON body (or the text as a string), the
/// headers asked for, and how long it took.
fn timed(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value, Duration) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(15)).build();
    let mut request = agent.request(method, url);
    if let Some(key) = key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let started = Instant::now();
    let response = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    let (status, text) = match response {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {url} failed after {:?}: {e}", started.elapsed()),
    };
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value, started.elapsed())
}

/// Sends raw bytes and returns the whole answer (status line, headers, body) as text.
fn raw_request(server: &Server, request: &[u8]) -> String {
    let addr = server.base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A v1 pids and memory cgroup standing for the host: the server (and its shims and sandboxes without
/// limits of their own) run inside, so an attack that gets through exhausts the cgroup, not the machine.
struct HostCgroup {
    dirs: Vec<PathBuf>,
}

impl HostCgroup {
    fn new(test: &str) -> HostCgroup {
        let name = common::cgroup_parent(&format!("host-{test}"));
        let mut dirs = Vec::new();
        for (controller, file, limit) in [
            ("pids", "pids.max", "3000"),
            ("memory", "memory.limit_in_bytes", "3221225472"),
        ] {
            let dir = Path::new("/sys/fs/cgroup").join(controller).join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), limit).unwrap();
            dirs.push(dir);
        }
        HostCgroup { dirs }
    }

    /// Starts a server on a free loopback port inside the cgroup.
    fn server(&self, data_dir: &Path, args: &[&str]) -> Server {
        let mut script = String::new();
        for dir in &self.dirs {
            script.push_str(&format!("echo $$ > {}/cgroup.procs && ", dir.display()));
        }
        script.push_str("exec \"$0\" \"$@\"");
        let (child, line) = common::spawn_first_line(
            Command::new("/bin/sh")
                .args([
                    "-c",
                    &script,
                    bin(),
                    "server",
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                ])
                .arg(data_dir)
                .args(args)
                .stderr(Stdio::null()),
        );
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .to_string();
        let admin = std::fs::read_to_string(data_dir.join("admin.key"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            child,
            base: format!("http://{addr}"),
            admin,
        }
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        // Its processes (the server, shims) are gone or going: remove it once it is empty.
        let deadline = Instant::now() + Duration::from_secs(20);
        for dir in &self.dirs {
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Puts `contents` at `path` in sandbox `id` through the files API.
fn put_file(server: &Server, key: &str, id: &str, path: &str, contents: &str) {
    let response = ureq::put(&format!("{}/v1/sandboxes/{id}/files?path={path}", server.base))
        .set("Authorization", &format!("Bearer {key}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(contents.as_bytes())
        .unwrap();
    assert_eq!(response.status(), 204);
}

/// Reads `path` in sandbox `id`, if it exists.
fn read_file(server: &Server, key: &str, id: &str, path: &str) -> Option<String> {
    let response = ureq::get(&format!("{}/v1/sandboxes/{id}/files?path={path}", server.base))
        .set("Authorization", &format!("Bearer {key}"))
        .call()
        .ok()?;
    response.into_string().ok()
}

/// N_PROC children each open PER connections to the gateway socket and send half a request line, then
/// hold them for HOLD seconds; the count opened goes to /tmp/flood.done.
const GATEWAY_FLOOD: &str = r#"
import os, socket, sys, time
N, PER, HOLD = map(int, sys.argv[1:4])
children = []
for p in range(N):
    pid = os.fork()
    if pid == 0:
        held = []
        for i in range(PER):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect("/run/tartarus/gateway.sock")
                s.send(b"GET /v1/tools HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
                held.append(s)
            except OSError:
                s.close()
        with open(f"/tmp/flood.{p}.tmp", "w") as f:
            f.write(str(len(held)))
        os.rename(f"/tmp/flood.{p}.tmp", f"/tmp/flood.{p}")
        time.sleep(HOLD)
        os._exit(0)
    children.append(pid)
while not all(os.path.exists(f"/tmp/flood.{p}") for p in range(N)):
    time.sleep(0.05)
total = sum(int(open(f"/tmp/flood.{p}").read()) for p in range(N))
with open("/tmp/flood.tmp", "w") as f:
    f.write(str(total))
os.rename("/tmp/flood.tmp", "/tmp/flood.done")
for pid in children:
    os.waitpid(pid, 0)
print(total)
"#;

#[test]
fn a_gateway_flood_from_a_sandbox_leaves_the_api_and_other_tenants_served() {
    let host = HostCgroup::new("gwflood");
    let dir = DataDir::new();
    let server = host.server(dir.path(), &[]);
    let pid = server.child.id();
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");
    let a1 = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let before = open_fds(pid);

    put_file(&server, &alpha, &a1, "/tmp/flood.py", GATEWAY_FLOOD);
    let flood = {
        let (base, alpha, a1) = (server.base.clone(), alpha.clone(), a1.clone());
        std::thread::spawn(move || {
            let body = json!({"cmd": ["python3", "/tmp/flood.py", "4", "500", "20"], "timeout_s": 60});
            let (status, r) = call(
                "POST",
                &format!("{base}/v1/sandboxes/{a1}/exec"),
                Some(&alpha),
                Some(body),
            );
            (status, r)
        })
    };
    poll_until(Duration::from_secs(30), "the flood never got going", || {
        read_file(&server, &alpha, &a1, "/tmp/flood.done").is_some()
    });
    let opened: usize = read_file(&server, &alpha, &a1, "/tmp/flood.done")
        .unwrap()
        .parse()
        .unwrap();
    assert!(opened >= 32, "the sandbox opened only {opened} connections");

    // While 2,000 connections are attempted and held: the server's descriptors stay bounded, and beta is
    // served.
    let during = open_fds(pid);
    assert!(
        during < before + 200,
        "the server went from {before} to {during} open descriptors ({opened} connections held)"
    );
    let (status, _, took) = timed("GET", &format!("{}/healthz", server.base), None, None);
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(5), "/healthz took {took:?}");
    let started = Instant::now();
    let (status, b1, _) = timed(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&beta),
        Some(json!({})),
    );
    assert_eq!(status, 201, "{b1}");
    let b1 = b1["id"].as_str().unwrap();
    let (status, r, _) = timed(
        "POST",
        &format!("{}/v1/sandboxes/{b1}/exec", server.base),
        Some(&beta),
        Some(json!({"cmd": ["echo", "served"]})),
    );
    assert_eq!((status, r["stdout"].as_str()), (200, Some("served\n")), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "beta's create and exec took {:?}",
        started.elapsed()
    );
    assert!(open_fds(pid) < before + 200);

    let (status, r) = flood.join().unwrap();
    assert_eq!(status, 200, "{r}");
}

#[test]
fn half_sent_requests_on_the_api_are_closed_after_the_header_timeout() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let addr = server.base.strip_prefix("http://").unwrap().to_string();
    // A stream that stays silent for longer than the header timeout is not cut.
    let alpha = new_key(dir.path(), "alpha", "user");
    let a1 = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let stream = {
        let url = format!("{}/v1/sandboxes/{a1}/exec", server.base);
        std::thread::spawn(move || {
            ureq::post(&url)
                .set("Authorization", &format!("Bearer {alpha}"))
                .send_json(json!({"cmd": ["sh", "-c", "sleep 13; echo late"], "stream": true}))
                .unwrap()
                .into_string()
                .unwrap()
        })
    };
    let mut held: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Meanwhile the API answers.
    let (status, _, took) = timed("GET", &format!("{}/healthz", server.base), None, None);
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
    // The default header timeout is 10 s: every connection is closed by the server (EOF) soon after.
    let mut buf = [0u8; 1024];
    poll_until(
        Duration::from_secs(20),
        "half-sent requests were left open",
        || {
            held.retain_mut(|s| match s.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            });
            held.is_empty()
        },
    );
    let events = stream.join().unwrap();
    assert!(
        events.contains("\"late\\n\"") && events.contains("event: exit"),
        "{events}"
    );
}

#[test]
fn deep_template_documents_are_refused_at_once_and_the_api_stays_responsive() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let beta = new_key(dir.path(), "beta", "user");
    let alpha = new_key(dir.path(), "alpha", "user");
    let n = 120_000;
    let yaml = format!(
        "id: d\nname: x\nbase_image: alpine\nenv: {}{}\n",
        "[".repeat(n),
        "]".repeat(n)
    );
    let posts: Vec<_> = (0..2)
        .map(|_| {
            let (base, key, yaml) = (server.base.clone(), beta.clone(), yaml.clone());
            std::thread::spawn(move || {
                timed(
                    "POST",
                    &format!("{base}/v1/templates"),
                    Some(&key),
                    Some(json!({"yaml": yaml})),
                )
            })
        })
        .collect();
    let (status, _, took) = timed("GET", &format!("{}/healthz", server.base), None, None);
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(1),
        "/healthz took {took:?} during the parses"
    );
    for post in posts {
        let (status, body, took) = post.join().unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("invalid_request")),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("template:4:"), "{message}");
        assert!(message.contains("nests deeper than 64 levels"), "{message}");
        assert!(took < Duration::from_secs(5), "the refusal took {took:?}");
    }
    // Alpha is served meanwhile, and the same holds for policies (admin) and JSON-in-YAML.
    let (status, _, _) = timed(
        "GET",
        &format!("{}/v1/templates", server.base),
        Some(&alpha),
        None,
    );
    assert_eq!(status, 200);
    let policy = format!(
        "id: p\nversion: 1\nlimits: {}{}\n",
        "{\"a\": ".repeat(5000),
        "}".repeat(5000)
    );
    let (status, body, took) = timed(
        "POST",
        &format!("{}/v1/policies", server.base),
        Some(&server.admin),
        Some(json!({"yaml": policy})),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nests deeper"),
        "{body}"
    );
    assert!(took < Duration::from_secs(5));
}

#[test]
fn execs_past_the_per_sandbox_cap_get_429_with_retry_after() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");
    let a1 = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b1 = create(&server, &beta, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Sixteen streaming execs in progress (each answer's headers arrived; the streams are left unread).
    let streams: Vec<ureq::Response> = (0..16)
        .map(|_| {
            ureq::post(&format!("{}/v1/sandboxes/{a1}/exec", server.base))
                .set("Authorization", &format!("Bearer {alpha}"))
                .send_json(json!({"cmd": ["sleep", "60"], "stream": true}))
                .unwrap()
        })
        .collect();
    let url = format!("{}/v1/sandboxes/{a1}/exec", server.base);
    let response = ureq::post(&url)
        .set("Authorization", &format!("Bearer {alpha}"))
        .send_json(json!({"cmd": ["true"]}));
    let Err(ureq::Error::Status(429, response)) = response else {
        panic!("the 17th exec was not refused: {response:?}");
    };
    assert_eq!(response.header("retry-after"), Some("1"));
    let body: Value = response.into_json().unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    // Per sandbox: beta's sandbox is not affected.
    let (status, r) = exec(&server, &beta, &b1, json!({"cmd": ["echo", "ok"]}));
    assert_eq!((status, r["stdout"].as_str()), (200, Some("ok\n")), "{r}");
    // Closing the streams ends their execs and gives the places back.
    drop(streams);
    poll_until(Duration::from_secs(20), "the exec places never came back", || {
        exec(&server, &alpha, &a1, json!({"cmd": ["true"]})).0 == 200
    });
}

/// Sends COUNT tool calls at once on the gateway socket, then prints each answer's status, and the first
/// 429's Retry-After and body.
const TOOL_BURST: &str = r#"
import socket, sys
count = int(sys.argv[1])
socks = []
for i in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/tartarus/gateway.sock")
    s.sendall(b"POST /v1/tools/slow HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    socks.append(s)
codes, refused = [], None
for s in socks:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    code = int(head.split(b" ")[1])
    codes.append(code)
    if code == 429 and refused is None:
        retry = [l for l in head.split(b"\r\n") if l.lower().startswith(b"retry-after:")]
        refused = (retry[0].decode() if retry else "", body.decode())
print(sorted(codes))
print(refused[0] if refused else "")
print(refused[1] if refused else "")
"#;

#[test]
fn tool_calls_past_the_per_sandbox_cap_get_429() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let (status, body) = call(
        "POST",
        &format!("{}/v1/tools", server.base),
        Some(&server.admin),
        Some(
            json!({"name": "slow", "kind": "command", "command": ["/bin/sh", "-c", "cat >/dev/null; sleep 3; echo done"]}),
        ),
    );
    assert!(status == 200 || status == 201, "{body}");
    let a1 = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    put_file(&server, &alpha, &a1, "/tmp/burst.py", TOOL_BURST);
    let (status, r) = exec(
        &server,
        &alpha,
        &a1,
        json!({"cmd": ["python3", "/tmp/burst.py", "20"], "timeout_s": 60}),
    );
    assert_eq!(status, 200, "{r}");
    let out = r["stdout"].as_str().unwrap();
    let mut lines = out.lines();
    let codes: Vec<u16> = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 16, "{out}");
    assert_eq!(codes.iter().filter(|&&c| c == 429).count(), 4, "{out}");
    assert_eq!(lines.next().unwrap().to_lowercase(), "retry-after: 1", "{out}");
    let refused: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(refused["error"]["code"], "too_many_requests", "{out}");
}

#[test]
fn client_errors_on_exec_and_files_are_json_4xx() {
    let dir = DataDir::new();
    let parent = common::cgroup_parent("bounds-errors");
    let server = Server::start_with_env(dir.path(), &[("TARTARUS_CGROUP_PARENT", &parent)]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let id = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = |suffix: &str| format!("{}/v1/sandboxes/{id}{suffix}", server.base);
    let expect = |(status, body, _): (u16, Value, Duration), want: u16, says: &str| {
        assert_eq!(status, want, "{body}");
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("not JSON: {body}"));
        assert!(body["error"]["code"].is_string(), "{body}");
        assert!(message.contains(says), "{message:?} does not say {says:?}");
    };
    let exec_with = |body: Value| timed("POST", &url("/exec"), Some(&alpha), Some(body));

    expect(
        exec_with(json!({"cmd": ["echo", "a\u{0}b"]})),
        422,
        "cmd[1] contains a NUL byte",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "env": {"K": "a\u{0}"}})),
        422,
        "NUL",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "env": {"A=B": "x"}})),
        422,
        "environment variable name",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "env": {"": "x"}})),
        422,
        "environment variable name",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "cwd": "/tmp\u{0}x"})),
        422,
        "cwd contains a NUL byte",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "cwd": "/nonexistent/dir"})),
        422,
        "does not exist",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "cwd": "/etc/passwd"})),
        422,
        "not a directory",
    );
    expect(
        exec_with(json!({"cmd": ["true"], "cwd": "/nonexistent", "stream": true})),
        422,
        "does not exist",
    );
    let big = "x".repeat(900 << 10);
    expect(exec_with(json!({"cmd": ["echo", big]})), 413, "at most 128 KiB");
    let huge: Vec<String> = (0..2048).map(|_| "y".repeat(1024)).collect();
    expect(exec_with(json!({"cmd": huge})), 413, "");

    // Files API: query strings that do not parse.
    expect(
        timed("GET", &url("/files"), Some(&alpha), None),
        400,
        "missing field `path`",
    );
    expect(
        timed("GET", &url("/files?path=/tmp&bogus=1"), Some(&alpha), None),
        400,
        "unknown field `bogus`",
    );
    expect(
        timed("GET", &url("/files?path=/tmp&list=300"), Some(&alpha), None),
        400,
        "list",
    );
    expect(
        timed("GET", &url("/files?path=/tmp&path=/etc"), Some(&alpha), None),
        400,
        "duplicate field",
    );
    // A method a route does not have.
    expect(
        timed("PATCH", &url(""), Some(&alpha), None),
        405,
        "method not allowed",
    );

    // A paused sandbox: exec and files are conflicts, not failures.
    let (status, paused) = call("POST", &url("/pause"), Some(&alpha), None);
    assert_eq!(status, 200, "{paused}");
    expect(exec_with(json!({"cmd": ["true"]})), 409, "paused");
    expect(
        timed("GET", &url("/files?path=/etc/hostname"), Some(&alpha), None),
        409,
        "paused",
    );
    expect(
        timed("GET", &url("/files?path=/tmp&list=1"), Some(&alpha), None),
        409,
        "paused",
    );
    let answer = raw_request(
        &server,
        format!(
            "PUT /v1/sandboxes/{id}/files?path=/tmp/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alpha}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(answer.contains("\"code\":\"conflict\""), "{answer}");
    let (status, _) = call("POST", &url("/resume"), Some(&alpha), None);
    assert_eq!(status, 200);
    let (status, _) = call("DELETE", &url(""), Some(&alpha), None);
    assert_eq!(status, 200);
    common::remove_cgroup_parent(&parent);
}
