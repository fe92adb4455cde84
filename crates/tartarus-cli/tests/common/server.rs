//! A `tartarus server` on a loopback port over a temporary data directory, and the HTTP and CLI
//! helpers that drive it.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::bin;

pub struct Server {
    pub child: Child,
    pub base: String,
    pub admin: String,
}

impl Server {
    /// Starts a server on a free loopback port over `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with_env(data_dir, &[])
    }

    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_with(data_dir, env, &[])
    }

    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        let (child, line) = super::spawn_first_line(
            Command::new(bin())
                .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(data_dir)
                .args(args)
                .envs(env.iter().copied())
                .stderr(Stdio::piped()),
        );
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"));
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

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every sandbox under `data_dir` through its shim (shims outlive servers by design), so tests
/// leave nothing running. A shim answers `kill` once its sandbox is gone.
pub fn kill_all_sandboxes(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("sandboxes")) else {
        return;
    };
    for entry in entries.flatten() {
        if let Ok(mut stream) = UnixStream::connect(entry.path().join("shim.sock")) {
            let _ = writeln!(stream, "{}", json!({"v": 1, "op": "kill"}));
            let _ = BufReader::new(stream).read_line(&mut String::new());
        }
    }
}

/// A temporary data directory whose sandboxes are all killed when it goes away.
pub struct DataDir(tempfile::TempDir);

impl DataDir {
    pub fn new() -> DataDir {
        DataDir(tempfile::tempdir().unwrap())
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        kill_all_sandboxes(self.0.path());
    }
}

/// Sends a request; returns the status and the JSON body.
pub fn call(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut request = ureq::request(method, url);
    if let Some(key) = key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let response = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    match response {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

pub fn new_key(data_dir: &Path, tenant: &str, role: &str) -> String {
    apikey(&["--data-dir".as_ref(), data_dir.as_os_str()], tenant, role)
}

/// A key made by `tartarus apikey create` in the state that `store` names (`--data-dir DIR`,
/// `--database URL`, or both).
pub fn apikey(store: &[&std::ffi::OsStr], tenant: &str, role: &str) -> String {
    let out = Command::new(bin())
        .args(["apikey", "create", "--tenant", tenant, "--role", role])
        .args(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The host kernel's release (what a process-lane sandbox sees; gVisor's sentry reports its own).
pub fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

pub fn create(server: &Server, key: &str, body: Value) -> Value {
    let (status, record) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(key),
        Some(body),
    );
    assert_eq!(status, 201, "{record}");
    record
}

pub fn exec(server: &Server, key: &str, id: &str, body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/exec", server.base),
        Some(key),
        Some(body),
    )
}

/// Runs a client command against `server` with `key` (config isolated in a temp dir).
pub fn cli(server: &Server, key: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
    let config = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(args)
        .env("TARTARUS_HOST", &server.base)
        .env("TARTARUS_API_KEY", key)
        .env("XDG_CONFIG_HOME", config.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Polls sandbox `id` until `done` holds for its record (for what the server does in the background, such
/// as enforcement); panics after 30 s with the last record.
pub fn wait_for(server: &Server, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, record) = call(
            "GET",
            &format!("{}/v1/sandboxes/{id}", server.base),
            Some(&server.admin),
            None,
        );
        if done(&record) {
            return record;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox {id} never got there: {record}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `POST …/exec` with `"stream": true` added to `body`: the non-empty lines of the Server-Sent Events
/// answer, as they arrive.
pub fn exec_stream(server: &Server, key: &str, id: &str, mut body: Value) -> impl Iterator<Item = String> {
    body["stream"] = json!(true);
    let response = ureq::post(&format!("{}/v1/sandboxes/{id}/exec", server.base))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body)
        .unwrap();
    assert_eq!(response.content_type(), "text/event-stream");
    BufReader::new(response.into_reader())
        .lines()
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
}

/// The whole audit trail, as the admin reads it.
pub fn admin_audit(server: &Server) -> Value {
    let (status, audit) = call(
        "GET",
        &format!("{}/v1/audit", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{audit}");
    audit
}
