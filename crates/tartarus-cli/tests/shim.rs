//! The shim: one long-lived service sandbox, driven over its unix socket the way the server drives it.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::bin;
use serde_json::{json, Value};

struct Shim {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Shim {
    /// Starts a shim for `spec` and waits for its `ready` line.
    fn start(spec: Value) -> Shim {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("shim.sock");
        std::fs::write(dir.path().join("spec.json"), spec.to_string()).unwrap();
        let (child, line) = common::spawn_first_line(
            Command::new(bin())
                .arg("shim")
                .arg("--socket")
                .arg(&socket)
                .arg("--spec")
                .arg(dir.path().join("spec.json"))
                .arg("--result")
                .arg(dir.path().join("result.json"))
                .arg("--log")
                .arg(dir.path().join("main.log"))
                .stderr(Stdio::inherit()),
        );
        let handshake: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        assert!(
            handshake["v"] == 1 && handshake["ready"]["id"].is_string(),
            "shim did not start: {line:?}"
        );
        Shim { child, dir, socket }
    }

    /// Sends one request (contract version 1) and returns the whole reply line.
    fn request(&self, mut request: Value) -> Value {
        request["v"] = json!(1);
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// A buffered exec's output (the reply's `ok`).
    fn exec(&self, command: &[&str]) -> Value {
        ok(self.request(json!({"op": "exec", "command": command})))
    }

    /// Waits for the shim to exit and returns its result record.
    fn finish(&mut self) -> Value {
        assert!(self.child.wait().unwrap().success());
        assert!(!self.socket.exists(), "socket left behind");
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("result.json")).unwrap()).unwrap()
    }
}

/// The `ok` body of a reply; fails the test on an error reply.
fn ok(reply: Value) -> Value {
    assert_eq!(reply["v"], 1, "{reply}");
    assert!(reply.get("ok").is_some(), "expected a success: {reply}");
    reply["ok"].clone()
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn exec_runs_commands_in_one_persistent_sandbox() {
    let mut shim = Shim::start(json!({"service": true}));
    assert_eq!(ok(shim.request(json!({"op": "status"})))["state"], "running");
    let r = shim.exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(3), Some("out\n"), Some("err\n"))
    );
    shim.exec(&["/bin/sh", "-c", "echo kept > /tmp/state"]);
    assert_eq!(shim.exec(&["cat", "/tmp/state"])["stdout"], "kept\n");
    let r = ok(shim.request(json!({"op": "exec", "command": ["cat"], "stdin": b64("from stdin")})));
    assert_eq!(r["stdout"], "from stdin");
    let r = ok(shim.request(json!({"op": "exec", "command": ["sh", "-c", "echo $GREETING; pwd"], "env": [["GREETING", "hi"]], "workdir": "/tmp"})));
    assert_eq!(r["stdout"], "hi\n/tmp\n");
    assert_eq!(shim.request(json!({"op": "kill"}))["ok"], json!({}));
    assert_eq!(shim.finish()["reason"], "killed");
}

#[test]
fn exec_processes_are_as_confined_as_a_main_command() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut shim = Shim::start(json!({"service": true}));
    let r = shim.exec(&[
        "/bin/sh",
        "-c",
        "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ls /proc | grep -c '^[0-9]'",
    ]);
    let out = r["stdout"].as_str().unwrap();
    assert!(out.starts_with("1000\n"), "{out}");
    assert!(
        out.contains("CapEff:\t0000000000000000")
            && out.contains("NoNewPrivs:\t1")
            && out.contains("Seccomp:\t2"),
        "{out}"
    );
    let probe = format!("import socket\ns=socket.socket()\ntry:\n s.connect(('127.0.0.1',{port})); print('CONNECTED')\nexcept OSError: print('refused')");
    assert_eq!(shim.exec(&["python3", "-c", &probe])["stdout"], "refused\n");
    assert_eq!(
        shim.exec(&["sh", "-c", "echo x > /etc/x 2>/dev/null || echo ro"])["stdout"],
        "ro\n"
    );
    shim.request(json!({"op": "kill"}));
    shim.finish();
}

#[test]
fn exec_errors_and_timeouts_are_reported() {
    let mut shim = Shim::start(json!({"service": true}));
    assert_eq!(
        shim.request(json!({"op": "exec", "command": ["no-such-command"]}))["error"]["code"],
        "command_not_found"
    );
    assert_eq!(
        shim.request(json!({"op": "exec", "command": ["/etc/passwd"]}))["error"]["code"],
        "not_executable"
    );
    assert_eq!(
        shim.request(json!({"op": "exec", "command": []}))["error"]["code"],
        "invalid_request"
    );
    assert_eq!(
        shim.request(json!({"op": "exec", "command": ["true"], "workdir": "../x"}))["error"]["code"],
        "invalid_request"
    );
    assert_eq!(
        shim.request(json!({"op": "frobnicate"}))["error"]["code"],
        "invalid_request"
    );
    let r = ok(shim
        .request(json!({"op": "exec", "command": ["sh", "-c", "sleep 30 & sleep 30"], "timeout_ms": 200})));
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].as_i64()),
        (Some(true), Some(137))
    );
    // The sandbox is still usable after a failed or timed-out exec.
    assert_eq!(shim.exec(&["echo", "alive"])["stdout"], "alive\n");
    shim.request(json!({"op": "kill"}));
    shim.finish();
}

#[test]
fn main_command_ends_the_sandbox_and_its_output_goes_to_the_log() {
    let mut shim =
        Shim::start(json!({"service": true, "command": ["/bin/sh", "-c", "echo from-main; read x"]}));
    let log = shim.dir.path().join("main.log");
    // The main command is blocked on stdin (/dev/null → EOF), so it has already exited or will shortly.
    let result = shim.finish();
    assert_eq!(result["reason"], "exited");
    assert_eq!(result["exit_code"], 1);
    assert_eq!(std::fs::read_to_string(log).unwrap(), "from-main\n");
}

#[test]
fn invalid_spec_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.json"), r#"{"service": true, "memory": 5}"#).unwrap();
    let out = Command::new(bin())
        .args(["shim", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--spec")
        .arg(dir.path().join("spec.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    // The handshake says why, structured: the server never scrapes a log for it.
    let handshake: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(handshake["failed"]["kind"], "spec", "{handshake}");
    assert_eq!(handshake["failed"]["exit_code"], 125);
    let message = handshake["failed"]["message"].as_str().unwrap();
    assert!(
        message.contains("unknown to this version") && message.ends_with(": memory"),
        "{message}"
    );
}

#[test]
fn a_command_that_ignores_its_stdin_does_not_take_the_shim_down() {
    let mut shim = Shim::start(json!({"service": true}));
    // 1 MiB of stdin to a command that exits at once: the shim's writes hit a closed pipe.
    let input = "x".repeat(1 << 20);
    let r = ok(shim.request(json!({"op": "exec", "command": ["true"], "stdin": b64(&input)})));
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(shim.exec(&["echo", "still here"])["stdout"], "still here\n");
    shim.request(json!({"op": "kill"}));
    shim.finish();
}

#[test]
fn streaming_exec_sends_output_as_it_comes_while_other_requests_are_served() {
    let mut shim = Shim::start(json!({"service": true}));
    let mut stream = UnixStream::connect(&shim.socket).unwrap();
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; printf 'h\\303\\251 '; echo second >&2; exit 3";
    writeln!(
        stream,
        "{}",
        json!({"v": 1, "op": "exec", "command": ["sh", "-c", script], "stream": true})
    )
    .unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut next = || -> Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    assert_eq!(next(), json!({"v": 1, "event": "started"}));
    assert_eq!(
        next(),
        json!({"v": 1, "event": "output", "stream": "stdout", "data": "first\n"}),
        "output must arrive while the command runs"
    );
    // A second request is served while the first exec is still running, and releases it.
    assert_eq!(shim.exec(&["touch", "/tmp/go"])["exit_code"], 0);
    let mut seen = Vec::new();
    let last = loop {
        let line = next();
        if line["event"] == "exit" {
            break line;
        }
        seen.push(line);
    };
    assert!(
        seen.contains(&json!({"v": 1, "event": "output", "stream": "stdout", "data": "hé "})),
        "{seen:?}"
    );
    assert!(
        seen.contains(&json!({"v": 1, "event": "output", "stream": "stderr", "data": "second\n"})),
        "{seen:?}"
    );
    assert_eq!(
        (last["exit_code"].as_i64(), last["timed_out"].as_bool()),
        (Some(3), Some(false))
    );
    shim.request(json!({"op": "kill"}));
    shim.finish();
}

#[test]
fn kill_is_served_while_a_long_exec_runs() {
    let mut shim = Shim::start(json!({"service": true}));
    let mut long = UnixStream::connect(&shim.socket).unwrap();
    writeln!(
        long,
        "{}",
        json!({"v": 1, "op": "exec", "command": ["sleep", "600"], "stream": true})
    )
    .unwrap();
    let mut reader = BufReader::new(long.try_clone().unwrap());
    let mut started = String::new();
    reader.read_line(&mut started).unwrap();
    assert!(started.contains("started"), "{started}");
    assert_eq!(shim.request(json!({"op": "kill"}))["ok"], json!({}));
    assert_eq!(shim.finish()["reason"], "killed");
}

#[test]
fn a_streaming_client_that_never_reads_stalls_nothing_else() {
    let mut shim = Shim::start(json!({"service": true}));
    // An exec that writes without end, to a client that never reads a byte.
    let mut hog = UnixStream::connect(&shim.socket).unwrap();
    writeln!(
        hog,
        "{}",
        json!({"v": 1, "op": "exec", "command": ["sh", "-c", "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"], "stream": true})
    )
    .unwrap();
    // Enough time for the socket buffers to fill many times over is not waited for: the shim must answer
    // every other request whatever state the hog's buffers are in, so ask repeatedly.
    for _ in 0..50 {
        assert_eq!(ok(shim.request(json!({"op": "status"})))["state"], "running");
        assert_eq!(shim.exec(&["echo", "served"])["stdout"], "served\n");
    }
    // The hog's buffered output is bounded: the shim stops reading its pipe instead of growing.
    let rss_kib = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(
        rss_kib(shim.child.id()) < 64 * 1024,
        "the shim buffers without bound"
    );
    assert_eq!(shim.request(json!({"op": "kill"}))["ok"], json!({}));
    assert_eq!(shim.finish()["reason"], "killed");
    drop(hog);
}
