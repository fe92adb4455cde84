//! The Wasm lane through the `Sandbox` trait against the real engine: the eventfd and `try_wait`, a kill
//! and a cleanup of a running guest, a stop reaching a guest blocked reading stdin, a guest blocked
//! writing given up on in bounded time, and many sandboxes of one runtime in turn (pool slots are
//! returned). The CLI's tests (`crates/tartarus-cli/tests/wasm.rs`) cover the programs' side.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tartarus_runtime::lanes::{LaneConfig, LaneName};
use tartarus_runtime::wasm::WasmRuntime;
use tartarus_runtime::{ExitReason, KillReason, Runtime, SandboxSpec, SandboxState, StdioFds, Termination};

const SPIN: &str = r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

fn exit_with(code: i32) -> String {
    format!(
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const {code}))))"#
    )
}

/// Reads one byte of stdin (blocking in the host), then exits 0.
const READ_STDIN: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 1))
    (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Writes 64 KiB to stdout forever (blocking in the host once nobody reads).
const FLOOD_STDOUT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 0)) (i32.store (i32.const 4) (i32.const 65536))
    (loop $again (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))) (br $again))))"#;

struct Programs(tempfile::TempDir);

impl Programs {
    fn new() -> Programs {
        Programs(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, wat: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
        path
    }
}

fn runtime() -> WasmRuntime {
    WasmRuntime::open(&LaneConfig::default()).unwrap()
}

fn spec(program: &std::path::Path) -> SandboxSpec {
    SandboxSpec::new(vec![program.display().to_string()])
}

fn readable(fd: std::os::fd::BorrowedFd<'_>, within: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let ts = rustix::time::Timespec {
        tv_sec: within.as_secs() as i64,
        tv_nsec: within.subsec_nanos() as i64,
    };
    rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0
}

#[test]
fn test_the_eventfd_wakes_the_caller_and_try_wait_collects_the_exit_code() {
    let programs = Programs::new();
    let runtime = runtime();
    assert_eq!(runtime.name(), LaneName::Wasm.as_str());
    let mut sandbox = runtime
        .prepare(spec(&programs.write("exit7.wasm", &exit_with(7))))
        .unwrap();
    sandbox.start(StdioFds::inherit()).unwrap();
    assert_eq!(sandbox.state(), SandboxState::Running);
    let event = sandbox.event_fd().unwrap().try_clone_to_owned().unwrap();
    assert!(
        readable(event.as_fd(), Duration::from_secs(30)),
        "the end is signalled"
    );
    let outcome = loop {
        if let Some(outcome) = sandbox.try_wait().unwrap() {
            break outcome;
        }
        assert!(readable(event.as_fd(), Duration::from_secs(30)));
    };
    assert_eq!(
        (outcome.termination, outcome.reason),
        (Termination::Exited(7), ExitReason::Exited)
    );
    assert_eq!(sandbox.state(), SandboxState::Finished);
    sandbox.cleanup().unwrap();
    sandbox.cleanup().unwrap();
    assert_eq!(sandbox.state(), SandboxState::CleanedUp);
}

#[test]
fn test_a_kill_interrupts_a_spinning_guest_at_once() {
    let programs = Programs::new();
    let runtime = runtime();
    let mut sandbox = runtime.prepare(spec(&programs.write("spin.wasm", SPIN))).unwrap();
    sandbox.start(StdioFds::inherit()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sandbox.try_wait().unwrap(), None, "still spinning");
    let killed = Instant::now();
    sandbox.kill(KillReason::Requested).unwrap();
    let outcome = sandbox.wait().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(
        (outcome.termination, outcome.reason),
        (Termination::Signaled(libc::SIGKILL), ExitReason::Killed)
    );
    assert!(outcome.cpu > Duration::from_millis(50), "{outcome:?}");
}

#[test]
fn test_cleanup_of_a_running_guest_ends_it() {
    let programs = Programs::new();
    let runtime = runtime();
    let mut sandbox = runtime.prepare(spec(&programs.write("spin.wasm", SPIN))).unwrap();
    sandbox.start(StdioFds::inherit()).unwrap();
    let started = Instant::now();
    sandbox.cleanup().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sandbox.state(), SandboxState::CleanedUp);
}

#[test]
fn test_a_stop_reaches_a_guest_blocked_reading_an_open_stdin() {
    let programs = Programs::new();
    let runtime = runtime();
    let (stdin_read, _stdin_write): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
    let mut sandbox = runtime
        .prepare(spec(&programs.write("read.wasm", READ_STDIN)))
        .unwrap();
    let stdio = StdioFds {
        stdin: stdin_read.as_fd(),
        ..StdioFds::inherit()
    };
    sandbox.start(stdio).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sandbox.try_wait().unwrap(), None, "still reading");
    let killed = Instant::now();
    sandbox.kill(KillReason::Timeout).unwrap();
    let outcome = sandbox.wait().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(outcome.reason, ExitReason::Timeout, "{outcome:?}");
    sandbox.cleanup().unwrap();
}

#[test]
fn test_a_guest_blocked_writing_to_a_full_stdout_is_given_up_on_in_bounded_time() {
    let programs = Programs::new();
    let runtime = runtime();
    let (_stdout_read, stdout_write): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
    let mut sandbox = runtime
        .prepare(spec(&programs.write("flood.wasm", FLOOD_STDOUT)))
        .unwrap();
    let stdio = StdioFds {
        stdout: stdout_write.as_fd(),
        ..StdioFds::inherit()
    };
    sandbox.start(stdio).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    sandbox.kill(KillReason::Timeout).unwrap();
    let outcome = sandbox.wait().unwrap();
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(
        (outcome.termination, outcome.reason),
        (Termination::Signaled(libc::SIGKILL), ExitReason::Timeout)
    );
    sandbox.cleanup().unwrap();
}

#[test]
fn test_one_runtime_runs_more_sandboxes_in_turn_than_its_pool_holds_at_once() {
    let programs = Programs::new();
    let runtime = runtime();
    let program = programs.write("exit0.wasm", &exit_with(0));
    for _ in 0..(2 * tartarus_runtime::wasm::MAX_SANDBOXES) {
        let mut sandbox = runtime.prepare(spec(&program)).unwrap();
        sandbox.start(StdioFds::inherit()).unwrap();
        assert_eq!(sandbox.wait().unwrap().termination, Termination::Exited(0));
        sandbox.cleanup().unwrap();
    }
}

#[test]
fn test_a_service_sandbox_is_refused_naming_the_knob() {
    let programs = Programs::new();
    let err = runtime()
        .prepare_service(spec(&programs.write("exit0.wasm", &exit_with(0))))
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "the wasm lane cannot honour service sandboxes (service)"
    );
}
