//! The conformance checks of the Wasm lane: the same properties the one-shot and hostile checks assert
//! for the other lanes, with Wasm programs (`common/wasm.rs`) in place of `/bin/sh` and `python3`, which
//! the lane cannot run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::wasm as programs;
use crate::common::{code, result_record, stderr, stdout};
use crate::harness::Fixture;

fn program(f: &Fixture, name: &str, bytes: &[u8]) -> PathBuf {
    programs::write(&f.programs_dir(), name, bytes)
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

pub fn exit_code_is_passed_through(f: &Fixture) {
    let exit42 = program(f, "exit42.wasm", &programs::exit_with(42));
    let out = f.run(&["--json"], &[path(&exit42)]);
    assert_eq!(code(&out), 42, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    let record = result_record(&out);
    assert_eq!(
        (record["exit_code"].as_i64(), record["reason"].as_str()),
        (Some(42), Some("exited")),
        "{record}"
    );
    let exit0 = program(f, "exit0.wasm", &programs::exit_with(0));
    assert_eq!(code(&f.run(&[], &[path(&exit0)])), 0);
}

/// The lane has no signals: the timeout interrupts the guest at its next epoch check, at once (no grace),
/// reported as SIGKILL like a kill after the grace.
pub fn a_timeout_ends_an_endless_loop_with_reason_timeout(f: &Fixture) {
    let spin = program(f, "spin.wasm", &programs::spin());
    let started = Instant::now();
    let out = f.run(
        &["--json", "--timeout", "500ms", "--timeout-grace", "5s"],
        &[path(&spin)],
    );
    assert_eq!(code(&out), 137, "{}", stderr(&out));
    let record = result_record(&out);
    assert_eq!(
        (record["reason"].as_str(), record["signal"].as_i64()),
        (Some("timeout"), Some(9)),
        "{record}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no grace period to wait for: {:?}",
        started.elapsed()
    );
    assert!(stderr(&out).contains("killed (SIGKILL)"), "{}", stderr(&out));
}

pub fn the_memory_limit_ends_in_an_oom(f: &Fixture) {
    let grow = program(f, "grow.wasm", &programs::grow_until_refused_then_trap());
    let out = f.run(&["--json", "--memory", "96M"], &[path(&grow)]);
    assert_eq!(
        code(&out),
        134,
        "a trap after the refused growth: {}",
        stderr(&out)
    );
    assert_eq!(result_record(&out)["reason"], "oom");
    assert!(
        stderr(&out).contains("out of memory (limit 96 MiB)"),
        "{}",
        stderr(&out)
    );
}

pub fn stdin_stdout_and_stderr_are_separate(f: &Fixture) {
    let stdio = program(f, "stdio.wasm", &programs::stdio());
    let out = f.run_with_stdin(&[], &[path(&stdio)], b"first\nrest of it\n");
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out:first\nrest of it\n");
    assert_eq!(stderr(&out), "err\n");
}

/// The environment is the spec's alone; the working directory can only be the scratch area, `/tmp`.
pub fn env_and_workdir_reach_the_command(f: &Fixture) {
    let args = program(f, "args.wasm", &programs::args_and_env());
    let out = f.run(&["-e", "GREETING=hello", "-w", "/tmp"], &[path(&args), "x"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\nx\n--\nGREETING=hello\n", args.display())
    );
}

pub fn a_workdir_other_than_tmp_is_refused(f: &Fixture) {
    let args = program(f, "args.wasm", &programs::args_and_env());
    let out = f.run(&["-w", "/no/such/dir"], &[path(&args)]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "ran: {}", stdout(&out));
    assert!(
        stderr(&out).contains("the wasm lane cannot honour a working directory other than /tmp"),
        "{}",
        stderr(&out)
    );
}

pub fn a_terminal_is_clearly_refused(f: &Fixture) {
    assert!(!f.lane.has_terminal());
    let exit0 = program(f, "exit0.wasm", &programs::exit_with(0));
    let out = f.run(&["-t"], &[path(&exit0)]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the wasm lane cannot honour a terminal"),
        "{}",
        stderr(&out)
    );
}

/// No network at all: host loopback and egress are refused by name; the guest has no socket to use
/// (WASI preview 1 has none it could open; preview 2's are denied: a TCP socket is `access-denied`).
pub fn the_network_is_refused_by_name(f: &Fixture) {
    let tcp = program(
        f,
        "tcp.component.wasm",
        &programs::component_tcp_socket_is_denied(),
    );
    let out = f.run(&[], &[path(&tcp)]);
    assert_eq!(code(&out), 0, "a TCP socket was not refused: {}", stderr(&out));
    let exit0 = program(f, "exit0.wasm", &programs::exit_with(0));
    for (mode, knob) in [
        ("host-loopback", "host loopback networking"),
        ("egress", "egress networking"),
    ] {
        let out = f.run(&["--network", mode], &[path(&exit0)]);
        assert_eq!(code(&out), 125, "{mode}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("the wasm lane cannot honour {knob}")),
            "{mode}: {}",
            stderr(&out)
        );
    }
}

pub fn host_files_are_invisible(f: &Fixture) {
    let reach = program(f, "reach.wasm", &programs::reach_for_the_host());
    let out = f.run(&[], &[path(&reach)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let errnos: Vec<u32> = stdout(&out)
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(errnos.len(), 4, "{}", stdout(&out));
    assert!(errnos.iter().all(|&e| e != 0), "something opened: {errnos:?}");
}

/// The scratch area is writable (and gone afterwards: the leak check); a read-only mount is not.
pub fn only_the_scratch_areas_are_writable(f: &Fixture) {
    let scratch = program(f, "scratch.wasm", &programs::scratch_round_trip());
    let out = f.run(&[], &[path(&scratch)]);
    assert_eq!(stdout(&out), "hello\n/tmp\n", "{}", stderr(&out));
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("file"), "shared\n").unwrap();
    let mount = format!("{}:/data:ro", shared.path().display());
    let write = program(f, "mount.wasm", &programs::read_mount_then_write());
    let out = f.run(&["-m", &mount], &[path(&write)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("shared\n"), "{}", stdout(&out));
    assert!(
        !shared.path().join("new").exists(),
        "wrote into a read-only mount"
    );
}

/// The lane has no service mode: the API refuses a Wasm sandbox by naming the knob.
pub fn the_api_refuses_a_service_sandbox_by_name(f: &Fixture) {
    let service = f.service();
    let (status, body) = service.call("POST", "/v1/sandboxes", Some(json!({"runtime": "wasm"})));
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("runtime wasm cannot take this sandbox")
            && message.contains("the wasm lane cannot honour service sandboxes"),
        "{body}"
    );
}
