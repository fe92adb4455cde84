//! The shim's event loop against a scripted lane (`FakeServiceSandbox`): contract replies, error codes and
//! the result record, without root or a kernel sandbox.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tartarus_runtime::testing::{FakeServiceSandbox, PauseBehaviour, TerminateBehaviour};
use tartarus_runtime::{
    LaneCapabilities, LimitHits, PrepareError, Runtime, Sandbox, SandboxSpec, ServiceSandbox, Usage,
};
use tartarus_shim::serve::{run, ShimPaths};

/// A lane whose sandboxes are fakes with a pause that cannot work, some usage, and the given SIGTERM.
struct FakeLane(TerminateBehaviour);

impl FakeLane {
    fn sandbox(&self) -> FakeServiceSandbox {
        let mut fake = FakeServiceSandbox::new("fake-1").unwrap();
        fake.set_pause(PauseBehaviour::Unsupported);
        fake.set_terminate(self.0);
        fake.set_usage(Usage {
            blocked_packets: Some(7),
            limit_hits: LimitHits {
                oom_kills: 1,
                pids_limit_hits: 2,
            },
            cpu_usec: Some(1_500_000),
            memory_bytes: Some(64 << 20),
        });
        fake
    }
}

impl Runtime for FakeLane {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn capabilities(&self) -> LaneCapabilities {
        LaneCapabilities::ALL
    }
    fn prepare(&self, _spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError> {
        Ok(Box::new(self.sandbox()))
    }
    fn prepare_service(&self, _spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError> {
        Ok(Box::new(self.sandbox()))
    }
}

fn request(socket: &Path, mut line: Value) -> Value {
    line["v"] = json!(1);
    let mut stream = UnixStream::connect(socket).unwrap();
    writeln!(stream, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the shim never listened");
        std::thread::yield_now();
    }
}

#[test]
fn the_shim_answers_the_contract_for_any_lane() {
    let dir = tempfile::tempdir().unwrap();
    let paths = ShimPaths {
        socket: dir.path().join("shim.sock"),
        spec: dir.path().join("spec.json"),
        result: Some(dir.path().join("result.json")),
        log: None,
        restore: None,
    };
    std::fs::write(
        &paths.spec,
        serde_json::to_string(&SandboxSpec::default()).unwrap(),
    )
    .unwrap();
    let shim = {
        let paths = paths.clone();
        std::thread::spawn(move || run(&paths, &FakeLane(TerminateBehaviour::Unsupported)).unwrap())
    };
    wait_for_socket(&paths.socket);

    let status = request(&paths.socket, json!({"op": "status"}));
    assert_eq!(
        status,
        json!({"v": 1, "ok": {"id": "fake-1", "state": "running", "blocked_packets": 7,
                             "limit_hits": {"oom_kills": 1, "pids_limit_hits": 2},
                             "cpu_usec": 1_500_000, "memory_bytes": 64 << 20}})
    );
    // A lane that cannot pause says so with its own code, not as a host failure.
    let pause = request(&paths.socket, json!({"op": "pause"}));
    assert_eq!(pause["error"]["code"], "unsupported", "{pause}");
    let throttle = request(&paths.socket, json!({"op": "throttle", "cpus": -1.0}));
    assert_eq!(throttle["error"]["code"], "invalid_request", "{throttle}");
    let garbage = {
        let mut stream = UnixStream::connect(&paths.socket).unwrap();
        writeln!(stream, "not json").unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        serde_json::from_str::<Value>(&reply).unwrap()
    };
    assert_eq!(garbage["error"]["code"], "invalid_request");
    // A request of another contract version is refused, naming it.
    let mut stream = UnixStream::connect(&paths.socket).unwrap();
    writeln!(stream, "{}", json!({"v": 2, "op": "status"})).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["error"]["code"], "invalid_request");
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("version 2"),
        "{reply}"
    );

    // Kill is answered once the sandbox is gone; the result record is written.
    assert_eq!(
        request(&paths.socket, json!({"op": "kill"})),
        json!({"v": 1, "ok": {}})
    );
    assert_eq!(shim.join().unwrap(), 0);
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(
        (result["v"].as_i64(), result["reason"].as_str()),
        (Some(1), Some("killed"))
    );
    assert!(!paths.socket.exists(), "socket left behind");
}

/// Starts a shim over a fake of `lane` in `dir`; returns its paths and the thread running it.
fn start_shim(dir: &Path, lane: FakeLane) -> (ShimPaths, std::thread::JoinHandle<u8>) {
    let paths = ShimPaths {
        socket: dir.join("shim.sock"),
        spec: dir.join("spec.json"),
        result: Some(dir.join("result.json")),
        log: None,
        restore: None,
    };
    std::fs::write(
        &paths.spec,
        serde_json::to_string(&SandboxSpec::default()).unwrap(),
    )
    .unwrap();
    let shim = {
        let paths = paths.clone();
        std::thread::spawn(move || run(&paths, &lane).unwrap())
    };
    wait_for_socket(&paths.socket);
    (paths, shim)
}

#[test]
fn test_a_graceful_kill_ends_as_soon_as_nothing_but_init_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, shim) = start_shim(dir.path(), FakeLane(TerminateBehaviour::EndsAll));

    let asked = Instant::now();
    let reply = request(&paths.socket, json!({"op": "kill", "grace_ms": 60_000}));
    let took = asked.elapsed();

    assert_eq!(reply, json!({"v": 1, "ok": {}}));
    assert!(took < Duration::from_secs(10), "waited {took:?} of a 60 s grace");
    assert_eq!(shim.join().unwrap(), 0);
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(
        (result["signal"].as_i64(), result["reason"].as_str()),
        (Some(15), Some("killed"))
    );
}

#[test]
fn test_a_graceful_kill_of_processes_that_ignore_sigterm_waits_out_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, shim) = start_shim(dir.path(), FakeLane(TerminateBehaviour::Ignored));

    let asked = Instant::now();
    let reply = request(&paths.socket, json!({"op": "kill", "grace_ms": 300}));
    let took = asked.elapsed();

    assert_eq!(reply, json!({"v": 1, "ok": {}}));
    assert!(
        took >= Duration::from_millis(300),
        "ended after {took:?}, before its grace"
    );
    assert_eq!(shim.join().unwrap(), 0);
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(result["signal"].as_i64(), Some(9));
}
