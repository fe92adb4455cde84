//! The Wasm lane end to end: `tartarus run --runtime wasm PROGRAM -- args` on real WASI programs (written
//! as WAT in `common/wasm.rs`): exit codes, stdio, arguments and environment, the timeout and a kill as
//! epoch interruptions, the memory limit as a refused growth (`oom`), the scratch directory (size-bounded
//! as root), read-only mounts, no host access, malformed programs, refused knobs, and nothing left behind.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::wasm as programs;
use common::{bin, code, result_record, stderr, stdout};

/// A fresh state directory (for the scratch areas) and a directory for the programs.
struct Lane {
    state: tempfile::TempDir,
    programs: tempfile::TempDir,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            state: tempfile::tempdir().unwrap(),
            programs: tempfile::tempdir().unwrap(),
        }
    }

    fn program(&self, name: &str, bytes: &[u8]) -> PathBuf {
        programs::write(self.programs.path(), name, bytes)
    }

    fn command(&self, flags: &[&str], program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(["run", "--runtime", "wasm"])
            .args(flags)
            .arg(program)
            .arg("--")
            .args(args)
            .env("TARTARUS_STATE_DIR", self.state.path())
            .stdin(Stdio::null());
        command
    }

    fn run(&self, flags: &[&str], program: &Path, args: &[&str]) -> Output {
        let out = self.command(flags, program, args).output().unwrap();
        self.assert_nothing_left();
        out
    }

    /// No scratch directory is left under the state directory (a tmpfs scratch area is never attached
    /// to a path at all).
    fn assert_nothing_left(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.state.path().join("wasm"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn record_of(out: &Output) -> (i64, &'static str, serde_json::Value) {
    let record = result_record(out);
    let reason = match record["reason"].as_str() {
        Some("exited") => "exited",
        Some("timeout") => "timeout",
        Some("oom") => "oom",
        Some("killed") => "killed",
        _ => "?",
    };
    (record["exit_code"].as_i64().unwrap_or(-1), reason, record)
}

#[test]
fn exit_codes_pass_through_and_returning_from_start_is_zero() {
    let lane = Lane::new();
    let exit42 = lane.program("exit42.wasm", &programs::exit_with(42));
    let out = lane.run(&["--json"], &exit42, &[]);
    assert_eq!(code(&out), 42, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (42, "exited"), "{record}");
    let exit0 = lane.program("exit0.wasm", &programs::exit_with(0));
    assert_eq!(code(&lane.run(&[], &exit0, &[])), 0);
    let returns = lane.program("returns.wasm", &programs::returns());
    let out = lane.run(&[], &returns, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn stdin_stdout_and_stderr_are_separate() {
    let lane = Lane::new();
    let program = lane.program("stdio.wasm", &programs::stdio());
    let mut child = lane
        .command(&[], &program, &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"from stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out:from stdin\n");
    assert_eq!(stderr(&out), "err\n");
}

#[test]
fn arguments_and_environment_reach_the_program_and_nothing_else() {
    let lane = Lane::new();
    let program = lane.program("args.wasm", &programs::args_and_env());
    let out = lane.run(
        &["-e", "GREETING=hello world", "-e", "EMPTY="],
        &program,
        &["one", "two words"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let expected = format!(
        "{}\none\ntwo words\n--\nGREETING=hello world\nEMPTY=\n",
        program.display()
    );
    assert_eq!(
        stdout(&out),
        expected,
        "argv[0] is the program as given; no host variable leaks"
    );
}

#[test]
fn the_program_can_also_come_after_the_separator() {
    let lane = Lane::new();
    let program = lane.program("args.wasm", &programs::args_and_env());
    let out = Command::new(bin())
        .args(["run", "--runtime", "wasm", "--"])
        .arg(&program)
        .arg("x")
        .env("TARTARUS_STATE_DIR", lane.state.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("{}\nx\n--\n", program.display())));
}

#[test]
fn a_timeout_interrupts_an_endless_loop_with_reason_timeout() {
    let lane = Lane::new();
    let program = lane.program("spin.wasm", &programs::spin());
    let started = Instant::now();
    let out = lane.run(&["--json", "--timeout", "500ms"], &program, &[]);
    let elapsed = started.elapsed();
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (137, "timeout"), "{record}");
    assert_eq!(record["signal"], 9, "{record}");
    assert_eq!(code(&out), 137);
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "interrupted promptly, not {elapsed:?}"
    );
    assert!(stderr(&out).contains("timed out after 500ms"), "{}", stderr(&out));
    assert!(record["wall_ms"].as_f64().unwrap() >= 500.0, "{record}");
    assert!(
        record["cpu_ms"].as_f64().unwrap() > 100.0,
        "the loop burnt CPU: {record}"
    );
}

#[test]
fn a_component_timeout_is_interrupted_too() {
    let lane = Lane::new();
    let program = lane.program("spin.component.wasm", &programs::component("spin"));
    let out = lane.run(&["--json", "--timeout", "300ms"], &program, &[]);
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (137, "timeout"), "{record}");
}

#[test]
fn growth_past_the_memory_limit_is_refused_and_the_failure_is_an_oom() {
    let lane = Lane::new();
    let program = lane.program("grow.wasm", &programs::grow_until_refused_then_trap());
    let out = lane.run(&["--json", "--memory", "32M"], &program, &[]);
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (134, "oom"), "{record}");
    let peak = record["peak_memory_bytes"].as_u64().unwrap();
    assert!(
        (30 << 20..=32 << 20).contains(&peak),
        "peak {peak} just under the limit"
    );
    let err = stderr(&out);
    assert!(err.starts_with("growth refused\n"), "{err}");
    assert!(
        err.contains("tartarus: the Wasm program trapped: wasm trap: wasm `unreachable` instruction executed (after a memory growth past the sandbox's memory limit was refused)"),
        "{err}"
    );
    assert!(err.contains("out of memory (limit 32 MiB)"), "{err}");
}

#[test]
fn an_initial_memory_past_the_limit_is_an_oom_before_the_program_runs() {
    let lane = Lane::new();
    // 2000 pages: 125 MiB.
    let big = wat::parse_str(r#"(module (memory (export "memory") 2000) (func (export "_start")))"#).unwrap();
    let big = lane.program("big-memory.wasm", &big);
    let out = lane.run(&["--json", "--memory", "64M"], &big, &[]);
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (125, "oom"), "{record}");
    let err = stderr(&out);
    assert!(
        err.starts_with("tartarus: the Wasm program cannot be instantiated: ")
            && err.contains("(after a memory growth past the sandbox's memory limit was refused)"),
        "{err}"
    );
    // The same program under a larger limit runs.
    assert_eq!(code(&lane.run(&["--memory", "256M"], &big, &[])), 0);
}

#[test]
fn a_trap_is_exit_code_134_with_one_line_on_stderr() {
    let lane = Lane::new();
    let program = lane.program(
        "trap.wasm",
        &programs::p1(r#"(func (export "_start") unreachable)"#),
    );
    let out = lane.run(&["--json"], &program, &[]);
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (134, "exited"), "{record}");
    let err = stderr(&out);
    assert!(
        err.starts_with(
            "tartarus: the Wasm program trapped: wasm trap: wasm `unreachable` instruction executed\n"
        ),
        "{err}"
    );
}

#[test]
fn a_refused_growth_the_program_survives_is_not_an_oom() {
    let lane = Lane::new();
    let within = lane.program("grow8.wasm", &programs::grow_once(8));
    let out = lane.run(&["--json", "--memory", "16M"], &within, &[]);
    assert_eq!(stdout(&out), "grown\n", "{}", stderr(&out));
    let beyond = lane.program("grow64.wasm", &programs::grow_once(64));
    let out = lane.run(&["--json", "--memory", "16M"], &beyond, &[]);
    assert_eq!(stdout(&out), "refused\n", "{}", stderr(&out));
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (0, "exited"), "{record}");
}

#[test]
fn the_scratch_directory_is_tmp_and_is_gone_afterwards() {
    let lane = Lane::new();
    let program = lane.program("scratch.wasm", &programs::scratch_round_trip());
    let out = lane.run(&[], &program, &[]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "hello\n/tmp\n");
    // A second run starts with an empty scratch area: a read of the file without creating it fails.
    let out = lane.run(&[], &program, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn the_scratch_directory_is_bounded_by_the_scratch_size_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: the scratch area is a directory, not size-bounded (docs/wasm.md)");
        return;
    }
    let lane = Lane::new();
    let program = lane.program("fill.wasm", &programs::fill_scratch());
    let out = lane.run(&["--scratch-size", "1M"], &program, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let words: Vec<u64> = stdout(&out)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    // WASI's ENOSPC is 51; 16 blocks of 64 KiB are 1 MiB.
    assert_eq!(words.first(), Some(&51), "{}", stdout(&out));
    assert!(words[1] <= 16, "{words:?}");
}

/// Without root (here: root dropping to `nobody` with setpriv) the scratch area is a directory under the
/// state directory, and it is removed at the end.
#[test]
fn without_root_the_scratch_area_is_a_directory_removed_afterwards() {
    use std::os::unix::fs::PermissionsExt;
    let lane = Lane::new();
    let program = lane.program("scratch.wasm", &programs::scratch_round_trip());
    for dir in [lane.state.path(), lane.programs.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut command = match rustix::process::geteuid().is_root() {
        true => {
            let mut setpriv = Command::new("setpriv");
            setpriv.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", bin()]);
            setpriv
        }
        false => Command::new(bin()),
    };
    let out = command
        .args(["run", "--runtime", "wasm"])
        .arg(&program)
        .env("TARTARUS_STATE_DIR", lane.state.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "hello\n/tmp\n");
    assert!(
        lane.state.path().join("wasm").is_dir(),
        "the scratch area was a directory there"
    );
    lane.assert_nothing_left();
}

#[test]
fn gc_removes_the_scratch_directories_of_dead_supervisors() {
    let lane = Lane::new();
    let dead = lane.state.path().join("wasm/4194305-0123456789ab"); // above the largest pid_max
    let live = lane
        .state
        .path()
        .join(format!("wasm/{}-0123456789ab", std::process::id()));
    for dir in [&dead, &live] {
        std::fs::create_dir_all(dir.join("left")).unwrap();
    }
    let gc = Command::new(bin())
        .arg("gc")
        .env("TARTARUS_STATE_DIR", lane.state.path())
        .env("TARTARUS_CGROUP_PARENT", "tartarus-test-wasm-gc")
        .output()
        .unwrap();
    assert_eq!(code(&gc), 0, "{}", stderr(&gc));
    assert!(
        stdout(&gc).contains(&format!("removed {}", dead.display())),
        "{}",
        stdout(&gc)
    );
    assert!(!dead.exists());
    assert!(live.exists(), "a live supervisor's directory stays");
}

#[test]
fn host_files_are_out_of_reach() {
    let lane = Lane::new();
    let program = lane.program("reach.wasm", &programs::reach_for_the_host());
    let out = lane.run(&[], &program, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let errnos: Vec<u32> = stdout(&out)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(errnos.len(), 4, "{}", stdout(&out));
    // ../../etc/passwd and /etc/passwd under the preopen: refused (ENOTCAPABLE 76 or EPERM 63).
    for errno in &errnos[..2] {
        assert!([63, 76].contains(errno), "{errnos:?}");
    }
    // No other preopen: fd 4 and 5 are bad descriptors (EBADF 8).
    assert_eq!(&errnos[2..], &[8, 8], "{errnos:?}");
}

#[test]
fn a_read_only_mount_is_readable_and_not_writable_and_a_writable_one_is_refused() {
    let lane = Lane::new();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("file"), "shared\n").unwrap();
    let program = lane.program("mount.wasm", &programs::read_mount_then_write());
    let mount = format!("{}:/data:ro", shared.path().display());
    let out = lane.run(&["-m", &mount], &program, &[]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("shared"));
    let errno: u32 = lines.next().unwrap().parse().unwrap();
    assert_ne!(errno, 0, "creating a file in a read-only mount failed");
    assert!(!shared.path().join("new").exists());
    for (source, why) in [
        ("/etc/passwd", "it is not a directory"),
        ("/nonexistent", "No such file or directory"),
    ] {
        let out = lane.run(&["-m", &format!("{source}:/data:ro")], &program, &[]);
        assert_eq!(code(&out), 125, "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("mount source '{source}' cannot be used")) && err.contains(why),
            "{err}"
        );
    }
    let writable = format!("{}:/data:rw", shared.path().display());
    let out = lane.run(&["-m", &writable], &program, &[]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("the wasm lane cannot honour writable bind mounts"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn components_run_under_wasi_preview_2() {
    let lane = Lane::new();
    let ok = lane.program("ok.component.wasm", &programs::component("ok"));
    let out = lane.run(&["--json"], &ok, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let hello = lane.program("hello.component.wasm", &programs::component_hello());
    let out = lane.run(&[], &hello, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "hello from p2\n",
        "wasi:cli/stdout is the sandbox's stdout"
    );
    let err = lane.program("err.component.wasm", &programs::component("err"));
    let out = lane.run(&["--json"], &err, &[]);
    let (exit_code, reason, record) = record_of(&out);
    assert_eq!((exit_code, reason), (1, "exited"), "{record}");
}

#[test]
fn a_component_is_refused_a_tcp_socket() {
    let lane = Lane::new();
    let program = lane.program("tcp.component.wasm", &programs::component_tcp_socket_is_denied());
    let out = lane.run(&[], &program, &[]);
    assert_eq!(
        code(&out),
        0,
        "create-tcp-socket was not refused with access-denied: {}",
        stderr(&out)
    );
}

#[test]
fn malformed_or_missing_programs_are_one_line_errors() {
    let lane = Lane::new();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "text.wasm",
            b"#!/bin/sh\necho hi\n".to_vec(),
            "not a WebAssembly binary",
        ),
        (
            "truncated.wasm",
            b"\0asm\x01\0\0\0\x01".to_vec(),
            "invalid module",
        ),
        (
            "nostart.wasm",
            wat::parse_str("(module (func (export \"main\")))").unwrap(),
            "exports no _start function",
        ),
        (
            "imports.wasm",
            wat::parse_str("(module (import \"env\" \"launch\" (func)) (func (export \"_start\") call 0))")
                .unwrap(),
            "imports are not WASI preview 1",
        ),
    ];
    for (name, bytes, why) in cases {
        let program = lane.program(name, &bytes);
        let out = lane.run(&[], &program, &[]);
        assert_eq!(code(&out), 126, "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(
            err.contains("is not a Wasm program this lane runs"),
            "{name}: {err}"
        );
        assert!(err.contains(why), "{name}: {err}");
    }
    let out = lane.run(&[], Path::new("/nonexistent/app.wasm"), &[]);
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("command not found: /nonexistent/app.wasm"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn knobs_the_lane_cannot_honour_are_refused_by_name() {
    let lane = Lane::new();
    let program = lane.program("exit0.wasm", &programs::exit_with(0));
    for (flags, knob) in [
        (&["--tty"][..], "a terminal (tty)"),
        (&["--network", "host-loopback"][..], "host loopback networking"),
        (&["--cpus", "0.5"][..], "a CPU limit (limits.cpus)"),
        (&["--pids", "10"][..], "a pids limit (limits.pids)"),
        (
            &["-w", "/home/sandbox"][..],
            "a working directory other than /tmp",
        ),
    ] {
        let out = lane.run(flags, &program, &[]);
        assert_eq!(code(&out), 125, "{flags:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("the wasm lane cannot honour {knob}")),
            "{flags:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(code(&lane.run(&["-w", "/tmp"], &program, &[])), 0);
}

#[test]
fn a_kill_ends_the_program_with_reason_killed() {
    let lane = Lane::new();
    let program = lane.program("spin.wasm", &programs::spin());
    let child = lane
        .command(&["--json"], &program, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code(&out), 128 + 15, "{}", stderr(&out));
    let (_, reason, record) = record_of(&out);
    assert_eq!(reason, "killed", "{record}");
    lane.assert_nothing_left();
}

#[test]
fn the_lane_is_listed_with_its_wasmtime_version() {
    let out = Command::new(bin()).args(["runtimes", "--json"]).output().unwrap();
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wasm = reports
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "wasm"))
        .cloned()
        .unwrap_or_else(|| panic!("no wasm lane in {reports}"));
    assert_eq!(wasm["available"], true, "{wasm}");
    assert_eq!(wasm["version"], "wasmtime 48.0.8", "{wasm}");
}
