//! `tartarus run --runtime gvisor`, `tartarus runtimes`, `tartarus shim --runtime gvisor` and `tartarus gc`
//! against the real runsc (root). Outcomes have the same shape as the process lane's. These tests never
//! skip: without runsc they fail.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::{json, Value};

fn gvisor(flags: &[&str], cmd: &[&str]) -> Output {
    let mut all = vec!["--runtime", "gvisor"];
    all.extend_from_slice(flags);
    run(&all, cmd)
}

/// The keys of a result record, sorted.
fn keys(record: &Value) -> Vec<String> {
    let mut keys: Vec<String> = record.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn python_prints_hi_in_gvisor() {
    let out = gvisor(&[], &["python3", "-c", "print('hi')"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n");
}

#[test]
fn exit_codes_signals_and_records_have_the_shape_of_the_process_lane() {
    let out = gvisor(&["--json"], &["/bin/sh", "-c", "echo out; exit 42"]);
    assert_eq!(code(&out), 42);
    assert_eq!(stdout(&out), "out\n");
    let record = result_record(&out);
    assert_eq!(record["exit_code"], 42);
    assert_eq!(record["reason"], "exited");
    let process = result_record(&run(&["--json"], &["/bin/sh", "-c", "exit 42"]));
    assert_eq!(keys(&record), keys(&process));

    let out = gvisor(&["--json"], &["/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&out), 128 + 15);
    let record = result_record(&out);
    assert_eq!(
        (record["signal"].as_i64(), record["reason"].as_str()),
        (Some(15), Some("killed"))
    );
}

#[test]
fn a_missing_command_is_127_with_one_line() {
    let out = gvisor(&[], &["/definitely/not/a/command"]);
    assert_eq!(code(&out), 127);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("command not found"), "{err}");
}

#[test]
fn the_memory_limit_is_an_oom_and_a_timeout_a_timeout() {
    let out = gvisor(
        &["--json", "--memory", "96M"],
        &["python3", "-c", "b = bytearray(300 << 20)"],
    );
    assert_eq!(code(&out), 137, "{}", stderr(&out));
    assert_eq!(result_record(&out)["reason"], "oom");
    assert!(
        stderr(&out).contains("out of memory (limit 96 MiB)"),
        "{}",
        stderr(&out)
    );

    // The timeout's grace: SIGTERM first, which ends sleep.
    let out = gvisor(&["--json", "--timeout", "500ms"], &["sleep", "30"]);
    assert_eq!(code(&out), 143);
    assert_eq!(result_record(&out)["reason"], "timeout");
    assert!(stderr(&out).contains("timed out after"), "{}", stderr(&out));
}

#[test]
fn stdin_env_and_workdir_reach_the_command() {
    let mut child = Command::new(bin())
        .args([
            "run",
            "--runtime",
            "gvisor",
            "-e",
            "GREETING=hello",
            "-w",
            "/tmp",
            "--",
        ])
        .args(["/bin/sh", "-c", "read x; echo \"$GREETING $x\"; pwd; id -u"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"world\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "hello world\n/tmp\n1000\n", "{}", stderr(&out));
}

#[test]
fn an_unknown_lane_and_a_missing_runsc_are_one_line_errors() {
    let out = run(&["--runtime", "firecracker"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("unknown lane 'firecracker': valid lanes are process, gvisor"),
        "{err}"
    );

    let out = Command::new(bin())
        .args(["run", "--runtime", "gvisor", "--", "/bin/true"])
        .env("TARTARUS_RUNSC", "/nonexistent/runsc")
        .output()
        .unwrap();
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("runsc not found") && err.contains("apt-get install runsc"),
        "{err}"
    );
}

#[test]
fn a_lane_refuses_what_it_cannot_honour() {
    let out = gvisor(&["--network", "host-loopback"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("the gvisor lane cannot honour host loopback networking"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn runtimes_lists_both_lanes_with_versions() {
    let out = Command::new(bin()).args(["runtimes", "--json"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gvisor = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gvisor")
        .unwrap();
    assert_eq!(gvisor["available"], true, "{gvisor}");
    assert!(
        gvisor["version"].as_str().unwrap().starts_with("runsc "),
        "{gvisor}"
    );
    assert!(
        gvisor["detail"].as_str().unwrap().starts_with("platform "),
        "{gvisor}"
    );
    let table = ok(Command::new(bin()).arg("runtimes").output().unwrap());
    assert!(table.starts_with("LANE "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("gvisor ") && l.contains(" yes ")),
        "{table}"
    );

    let out = Command::new(bin())
        .args(["runtimes", "--json"])
        .env("TARTARUS_RUNSC", "/nonexistent/runsc")
        .output()
        .unwrap();
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gvisor = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gvisor")
        .unwrap();
    assert_eq!(gvisor["available"], false);
    assert!(
        gvisor["reason"]
            .as_str()
            .unwrap()
            .contains("apt-get install runsc"),
        "{gvisor}"
    );
}

/// A `runsc` script that claims a newer release, logs each use, and runs the real one.
fn fake_newer_runsc(dir: &Path) -> std::path::PathBuf {
    let real = ["/usr/bin/runsc", "/usr/sbin/runsc", "/usr/local/bin/runsc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("runsc is installed (apt-get install runsc)");
    let log = dir.join("used");
    let fake = dir.join("runsc");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" >> {log}\nif [ \"$1\" = --version ]; then echo 'runsc version release-20990101.0'; exit 0; fi\nexec {real} \"$@\"\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    log
}

#[test]
fn a_newer_runsc_earlier_on_path_is_used_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = fake_newer_runsc(dir.path());
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(bin())
        .args(["runtimes", "--json"])
        .env("PATH", &path)
        .env_remove("TARTARUS_RUNSC")
        .output()
        .unwrap();
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gvisor = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gvisor")
        .unwrap();
    let version = gvisor["version"].as_str().unwrap();
    assert!(
        version.contains("release-20990101.0") && version.contains(&*dir.path().to_string_lossy()),
        "{version}"
    );

    let out = Command::new(bin())
        .args([
            "run",
            "--runtime",
            "gvisor",
            "--",
            "/bin/echo",
            "through the fake",
        ])
        .env("PATH", &path)
        .env_remove("TARTARUS_RUNSC")
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "through the fake\n", "{}", stderr(&out));
    let used = std::fs::read_to_string(&log).unwrap();
    // A command the root is known to hold starts with one `runsc run --detach`.
    assert!(used.lines().any(|l| l.contains(" run --detach ")), "{used}");
}

/// Starts `tartarus run --runtime gvisor` of a long sleep under `state`, waits until it runs, and kills the
/// supervisor with SIGKILL: its sandbox is left running, its bundle in place.
fn kill_a_running_supervisor(state: &Path) {
    let mut child = Command::new(bin())
        .args([
            "run",
            "--runtime",
            "gvisor",
            "--",
            "/bin/sh",
            "-c",
            "echo up; exec sleep 60",
        ])
        .env("TARTARUS_STATE_DIR", state)
        .env("TARTARUS_GVISOR_PLATFORM", "ptrace")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "up\n");
    child.kill().unwrap();
    child.wait().unwrap();
    let bundles = state.join("gvisor/bundles");
    assert_eq!(
        std::fs::read_dir(&bundles).unwrap().count(),
        1,
        "the killed run's bundle is there"
    );
}

/// No container is left under `state`'s runsc root.
fn assert_no_container(state: &Path) {
    let list = Command::new("runsc")
        .arg(format!("--root={}", state.join("gvisor/runsc").display()))
        .args(["list", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(stdout(&list).trim(), "", "a container is left");
}

#[test]
fn gc_removes_the_sandbox_of_a_killed_supervisor() {
    let state = tempfile::tempdir().unwrap();
    kill_a_running_supervisor(state.path());
    let out = Command::new(bin())
        .arg("gc")
        .env("TARTARUS_STATE_DIR", state.path())
        .env("TARTARUS_GVISOR_PLATFORM", "ptrace")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("gvisor/bundles/tartarus-"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_dir(state.path().join("gvisor/bundles"))
            .unwrap()
            .count(),
        0
    );
    assert_no_container(state.path());
}

#[test]
fn the_next_gvisor_sandbox_removes_one_a_killed_supervisor_left() {
    let state = tempfile::tempdir().unwrap();
    kill_a_running_supervisor(state.path());
    let out = Command::new(bin())
        .args(["run", "--runtime", "gvisor", "--", "/bin/true"])
        .env("TARTARUS_STATE_DIR", state.path())
        .env("TARTARUS_GVISOR_PLATFORM", "ptrace")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(state.path().join("gvisor/bundles"))
            .unwrap()
            .count(),
        0
    );
    assert_no_container(state.path());
}

#[test]
fn the_shim_serves_a_gvisor_service_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shim.sock");
    std::fs::write(dir.path().join("spec.json"), json!({"service": true}).to_string()).unwrap();
    let (mut child, line) = spawn_first_line(
        Command::new(bin())
            .arg("shim")
            .arg("--runtime")
            .arg("gvisor")
            .arg("--socket")
            .arg(&socket)
            .arg("--spec")
            .arg(dir.path().join("spec.json"))
            .arg("--result")
            .arg(dir.path().join("result.json"))
            .stderr(Stdio::inherit()),
    );
    let handshake: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    assert!(
        handshake["ready"]["id"].is_string(),
        "shim did not start: {line:?}"
    );
    let request = |mut request: Value| -> Value {
        request["v"] = json!(1);
        let mut stream = UnixStream::connect(&socket).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let r = request(
        json!({"op": "exec", "command": ["sh", "-c", "echo $GREETING; uname -r; exit 3"], "env": [["GREETING", "hi"]]}),
    );
    assert_eq!(r["ok"]["stdout"], "hi\n4.4.0\n", "{r}");
    assert_eq!(r["ok"]["exit_code"], 3, "{r}");
    assert_eq!(request(json!({"op": "pause"}))["ok"], json!({}));
    assert_eq!(request(json!({"op": "status"}))["ok"]["state"], "paused");
    assert_eq!(request(json!({"op": "resume"}))["ok"], json!({}));
    // aGVsbG8K is "hello\n".
    let r = request(json!({"op": "write_file", "path": "/tmp/f", "data": "aGVsbG8K"}));
    assert_eq!(r["ok"], json!({}), "{r}");
    let r = request(json!({"op": "read_file", "path": "/tmp/f"}));
    assert_eq!(r["ok"]["data"], "aGVsbG8K", "{r}");
    let r = request(json!({"op": "read_file", "path": "/tmp/missing"}));
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    assert_eq!(request(json!({"op": "kill"}))["ok"], json!({}));
    assert!(child.wait().unwrap().success());
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(result["reason"], "killed");
}

#[test]
fn a_kill_with_grace_lets_the_main_command_end_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shim.sock");
    let spec = json!({
        "service": true,
        "command": ["/bin/sh", "-c", "trap 'echo got-term; exit 0' TERM; echo up; while :; do sleep 0.05; done"],
    });
    std::fs::write(dir.path().join("spec.json"), spec.to_string()).unwrap();
    let log = dir.path().join("main.log");
    let (mut child, line) = spawn_first_line(
        Command::new(bin())
            .args(["shim", "--runtime", "gvisor", "--socket"])
            .arg(&socket)
            .arg("--spec")
            .arg(dir.path().join("spec.json"))
            .arg("--result")
            .arg(dir.path().join("result.json"))
            .arg("--log")
            .arg(&log)
            .stderr(Stdio::inherit()),
    );
    assert!(line.contains("ready"), "{line}");
    let started = std::time::Instant::now();
    let mut stream = UnixStream::connect(&socket).unwrap();
    writeln!(stream, "{}", json!({"v": 1, "op": "kill", "grace_ms": 20000})).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the command's own exit, not the grace's end, ended the sandbox"
    );
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(result["signal"], 15, "{result}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("got-term"));
}

#[test]
fn the_shim_reports_an_unavailable_lane_in_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.json"), json!({"service": true}).to_string()).unwrap();
    let (mut child, line) = spawn_first_line(
        Command::new(bin())
            .args(["shim", "--runtime", "gvisor", "--socket"])
            .arg(dir.path().join("s.sock"))
            .arg("--spec")
            .arg(dir.path().join("spec.json"))
            .env("TARTARUS_RUNSC", "/nonexistent/runsc"),
    );
    let handshake: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(handshake["failed"]["kind"], "host", "{line}");
    assert!(
        handshake["failed"]["message"]
            .as_str()
            .unwrap()
            .contains("runsc not found"),
        "{line}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(125));
}
