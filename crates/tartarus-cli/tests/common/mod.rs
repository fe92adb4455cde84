//! Helpers for end-to-end tests that drive the real `tartarus` binary.
#![allow(dead_code, clippy::unwrap_used)]

pub mod postgres;
pub mod registry;
pub mod server;
pub mod wasm;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tartarus")
}

/// `tartarus run [flags] -- cmd...`, stdin closed.
pub fn run(flags: &[&str], cmd: &[&str]) -> Output {
    Command::new(bin())
        .arg("run")
        .args(flags)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("spawn tartarus")
}

/// `tartarus run [flags] -- cmd...` with its cgroups under `parent` (see [`cgroup_parent`]).
pub fn run_in_cgroup(parent: &str, flags: &[&str], cmd: &[&str]) -> Output {
    Command::new(bin())
        .arg("run")
        .args(flags)
        .arg("--")
        .args(cmd)
        .env("TARTARUS_CGROUP_PARENT", parent)
        .stdin(Stdio::null())
        .output()
        .expect("spawn tartarus")
}

/// Runs a shell snippet in a default sandbox.
pub fn sh(script: &str) -> Output {
    run(&[], &["/bin/sh", "-c", script])
}

/// Runs a Python snippet in a default sandbox.
pub fn py(flags: &[&str], script: &str) -> Output {
    run(flags, &["/usr/bin/python3", "-c", script])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("tartarus exited by signal")
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert_eq!(code(&o), 0, "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The JSON result record printed with --json: the last stderr line holding one. A sandboxed process
/// killed mid-write can leave a partial line in front of it, so the record is taken from its first brace.
pub fn result_record(o: &Output) -> serde_json::Value {
    let err = stderr(o);
    let line = err.lines().rev().find_map(|l| l.find("{\"id\"").map(|i| &l[i..]));
    let line = line.unwrap_or_else(|| panic!("no JSON in: {err}"));
    serde_json::from_str(line).expect("valid JSON record")
}

/// A unique cgroup parent name so concurrent tests never see each other's cgroups.
pub fn cgroup_parent(test: &str) -> String {
    format!("tartarus-test-{test}-{}", std::process::id())
}

/// Spawns `tartarus run` with piped stdio and waits until the sandboxed command printed `ready`.
pub fn spawn_until_ready(
    envs: &[(&str, &str)],
    flags: &[&str],
    script: &str,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(bin())
        .arg("run")
        .args(flags)
        .args(["--", "/bin/sh", "-c", script])
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tartarus");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read ready line");
    assert_eq!(line.trim(), "ready", "sandbox did not start");
    (child, out)
}

/// Spawns `command` with stdout piped and returns it with the first line it prints (a readiness line).
pub fn spawn_first_line(command: &mut Command) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the first line");
    (child, line)
}

/// A copy of the binary that any user can execute (for rootless tests: the build tree may be private).
pub fn world_executable_bin() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let path = dir.path().join("tartarus");
    std::fs::copy(bin(), &path).expect("copy binary");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    (dir, path)
}

/// Host paths of the v1 hierarchies (hybrid hosts) or the v2 root that may hold our test cgroups.
pub fn cgroup_roots() -> Vec<PathBuf> {
    [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.join("cgroup.procs").exists())
    .collect()
}

/// Sandbox cgroups left under `parent` in any hierarchy.
pub fn leftover_cgroups(parent: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in cgroup_roots() {
        if let Ok(entries) = std::fs::read_dir(root.join(parent)) {
            out.extend(entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
    }
    out
}

/// Removes the (empty) test parent cgroups.
pub fn remove_cgroup_parent(parent: &str) {
    for root in cgroup_roots() {
        let _ = std::fs::remove_dir(root.join(parent));
    }
}

/// Pids of processes with `needle` in an argument.
pub fn processes_naming(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle))
        {
            out.push(pid);
        }
    }
    out
}

/// Polls `done` every 50 ms until it holds; panics with `what` after `limit`.
pub fn poll_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
