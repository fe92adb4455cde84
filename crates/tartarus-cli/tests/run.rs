//! End-to-end behaviour of `tartarus run`: exit codes, stdio, environment, mounts, limits, results,
//! bad input, and cleanup on every exit path. Runs the real binary with real kernel features.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

#[test]
fn hello_from_python_runs_and_exits_zero() {
    let out = ok(py(&[], "print('hello from a sandbox')"));
    assert_eq!(out, "hello from a sandbox\n");
}

#[test]
fn exit_code_of_the_command_is_propagated() {
    assert_eq!(code(&sh("exit 42")), 42);
}

#[test]
fn death_by_signal_exits_128_plus_signal() {
    let out = run(&["--json"], &["/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&out), 128 + 15);
    let record = result_record(&out);
    assert_eq!(record["signal"], 15);
    assert_eq!(record["reason"], "killed");
}

#[test]
fn unknown_command_exits_127_with_one_line() {
    let out = run(&[], &["definitely-not-a-command"]);
    assert_eq!(code(&out), 127);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("command not found: definitely-not-a-command"),
        "{err}"
    );
}

#[test]
fn non_executable_file_exits_126() {
    let out = run(&[], &["/etc/passwd"]);
    assert_eq!(code(&out), 126);
    assert!(stderr(&out).contains("not executable"), "{}", stderr(&out));
}

#[test]
fn malformed_size_is_a_one_line_error_with_exit_125() {
    let out = run(&["--memory", "12XB"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid size '12XB'") && err.contains("256M"),
        "{err}"
    );
}

#[test]
fn malformed_duration_and_mount_and_network_are_rejected() {
    for (flags, needle) in [
        (vec!["--timeout", "soon"], "invalid duration 'soon'"),
        (vec!["--mount", "onlyone"], "HOST:SANDBOX"),
        (vec!["--mount", "/tmp:/x:rx"], "HOST:SANDBOX"),
        (vec!["--network", "internet"], "not a network mode"),
        (vec!["--env", "NOVALUE"], "KEY=VALUE"),
        (vec!["--cpus", "0"], "--cpus 0 is out of range"),
        (vec!["--workdir", "relative"], "must be an absolute path"),
    ] {
        let out = run(&flags, &["/bin/true"]);
        assert_eq!(code(&out), 125, "{flags:?}");
        assert!(stderr(&out).contains(needle), "{flags:?}: {}", stderr(&out));
    }
}

#[test]
fn unknown_flag_is_a_one_line_error_with_exit_125() {
    let out = run(&["--frobnicate"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--frobnicate") && err.contains("--help"), "{err}");
}

#[test]
fn missing_rootfs_is_a_clear_error() {
    let out = run(&["--rootfs", "/nonexistent/rootfs"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("rootfs '/nonexistent/rootfs' is not a usable directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn host_environment_is_not_inherited_and_env_flags_are_set() {
    let out = Command::new(bin())
        .args(["run", "--env", "GREETING=hi", "--", "/usr/bin/env"])
        .env("HOST_SECRET_TOKEN", "s3cret")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let env = ok(out);
    assert!(!env.contains("HOST_SECRET_TOKEN"), "{env}");
    assert!(env.lines().any(|l| l == "GREETING=hi"), "{env}");
    assert!(env.lines().any(|l| l == "HOME=/home/sandbox"), "{env}");
}

#[test]
fn stdin_is_forwarded() {
    let mut child = Command::new(bin())
        .args(["run", "--", "/bin/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the wall\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through the wall\n");
}

#[test]
fn output_is_streamed_before_the_command_exits() {
    let (mut child, mut out) = spawn_until_ready(&[], &[], "echo ready; read line; echo got-$line");
    writeln!(child.stdin.as_mut().unwrap(), "x").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-x\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn workdir_is_honoured_and_a_missing_one_fails_clearly() {
    assert_eq!(ok(run(&["--workdir", "/tmp"], &["/bin/pwd"])), "/tmp\n");
    assert_eq!(ok(run(&[], &["/bin/pwd"])), "/home/sandbox\n");
    let out = run(&["--workdir", "/no/such/dir"], &["/bin/pwd"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("working directory /no/such/dir"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn read_only_mount_is_readable_but_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.txt"), "data").unwrap();
    let spec = format!("{}:/data", dir.path().display());
    let out = run(
        &["--mount", &spec],
        &[
            "/bin/sh",
            "-c",
            "cat /data/input.txt; echo x > /data/new && echo wrote",
        ],
    );
    assert_eq!(stdout(&out), "data");
    assert!(stderr(&out).contains("Read-only file system"), "{}", stderr(&out));
    assert!(!dir.path().join("new").exists());
}

#[test]
fn writable_mount_writes_reach_the_host() {
    let dir = tempfile::tempdir().unwrap();
    // The sandbox user is an unprivileged host id; let it write here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let spec = format!("{}:/out:rw", dir.path().display());
    ok(run(
        &["--mount", &spec],
        &["/bin/sh", "-c", "echo result > /out/answer"],
    ));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("answer")).unwrap(),
        "result\n"
    );
}

#[test]
fn file_mount_and_nested_target_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "key = 1\n").unwrap();
    let spec = format!("{}:/opt/app/config.toml", file.display());
    assert_eq!(
        ok(run(&["--mount", &spec], &["/bin/cat", "/opt/app/config.toml"])),
        "key = 1\n"
    );
}

#[test]
fn missing_mount_source_is_a_clear_error() {
    let out = run(&["--mount", "/no/such/source:/data"], &["/bin/true"]);
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("mount source '/no/such/source' cannot be used"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn json_record_describes_a_normal_exit() {
    let out = run(&["--json"], &["/bin/sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3);
    let r = result_record(&out);
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["reason"], "exited");
    assert!(r["signal"].is_null());
    assert!(r["wall_ms"].as_f64().unwrap() > 0.0);
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert!(r["id"].as_str().unwrap().len() == 12);
}

#[test]
fn result_file_receives_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("result.json");
    let out = run(&["--result-file", path.to_str().unwrap()], &["/bin/true"]);
    assert_eq!(code(&out), 0);
    assert!(!stderr(&out).contains('{'), "record must not also go to stderr");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(r["reason"], "exited");
    assert_eq!(r["exit_code"], 0);
}

#[test]
fn cpu_time_is_reported() {
    let out = run(&["--json"], &["/usr/bin/python3", "-c", "sum(range(3_000_000))"]);
    let r = result_record(&out);
    assert!(r["cpu_ms"].as_f64().unwrap() > 10.0, "{r}");
}

#[test]
fn timeout_kills_the_whole_tree_and_reports_timeout() {
    let out = run(
        &["--timeout", "300ms", "--timeout-grace", "0", "--json"],
        &["/bin/sh", "-c", "sleep 30 & sleep 30; echo never"],
    );
    assert_eq!(code(&out), 137);
    let r = result_record(&out);
    assert_eq!(r["reason"], "timeout");
    assert!(r["wall_ms"].as_f64().unwrap() < 10_000.0);
    assert!(!stdout(&out).contains("never"));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
}

#[test]
fn a_timeout_sends_sigterm_and_the_command_may_clean_up_within_the_grace() {
    let out = run(
        &["--timeout", "300ms", "--timeout-grace", "20s", "--json"],
        &[
            "/bin/sh",
            "-c",
            "trap 'echo cleaned-up; exit 3' TERM; while :; do sleep 0.05; done",
        ],
    );
    let r = result_record(&out);
    assert_eq!(r["reason"], "timeout", "{r}");
    assert_eq!(code(&out), 3, "the handler's own exit code: {}", stderr(&out));
    assert!(stdout(&out).contains("cleaned-up"), "{}", stdout(&out));
    assert!(r["wall_ms"].as_f64().unwrap() < 10_000.0, "{r}");
    assert!(stderr(&out).contains("sent SIGTERM"), "{}", stderr(&out));
}

#[test]
fn a_command_ignoring_sigterm_is_killed_when_the_timeout_grace_ends() {
    let out = run(
        &["--timeout", "300ms", "--timeout-grace", "1s", "--json"],
        &["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"],
    );
    let r = result_record(&out);
    assert_eq!(r["reason"], "timeout", "{r}");
    assert_eq!(code(&out), 137);
    assert!(
        r["wall_ms"].as_f64().unwrap() >= 1300.0,
        "killed only after the grace: {r}"
    );
    assert!(stderr(&out).contains("SIGKILL"), "{}", stderr(&out));
}

#[test]
fn memory_limit_kills_with_reason_oom() {
    let parent = cgroup_parent("oom");
    let out = run_in_cgroup(
        &parent,
        &["--memory", "64M", "--json"],
        &["/usr/bin/python3", "-c", "x = bytearray(512 << 20)"],
    );
    let r = result_record(&out);
    assert_eq!(r["reason"], "oom", "{}", stderr(&out));
    assert_eq!(code(&out), 137);
    assert!(r["peak_memory_bytes"].as_u64().unwrap() <= 64 << 20, "{r}");
    assert!(leftover_cgroups(&parent).is_empty());
    remove_cgroup_parent(&parent);
}

#[test]
fn cpu_and_pids_limits_are_written_to_the_cgroup_and_removed_after() {
    let parent = cgroup_parent("cpu");
    let (mut child, _out) = spawn_until_ready(
        &[("TARTARUS_CGROUP_PARENT", &parent)],
        &["--cpus", "0.5", "--pids", "32"],
        "echo ready; read x; true",
    );
    let dirs = leftover_cgroups(&parent);
    assert!(!dirs.is_empty(), "no cgroup created under {parent}");
    let read = |file: &str| {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
    };
    match read("cpu.max") {
        Some(v2) => assert_eq!(v2.trim(), "50000 100000"),
        None => assert_eq!(read("cpu.cfs_quota_us").expect("cpu quota file").trim(), "50000"),
    }
    assert_eq!(read("pids.max").expect("pids.max").trim(), "32");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(
        leftover_cgroups(&parent).is_empty(),
        "cgroups left: {:?}",
        leftover_cgroups(&parent)
    );
    remove_cgroup_parent(&parent);
}

#[test]
fn interrupt_kills_the_sandbox_and_exits_130() {
    let (mut child, _out) = spawn_until_ready(&[], &["--json"], "echo ready; exec sleep 60");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("\"reason\":\"killed\""), "{err}");
}

#[test]
fn sigkill_of_the_cli_kills_the_sandbox_and_gc_removes_its_cgroup() {
    let parent = cgroup_parent("sigkill");
    let env = [("TARTARUS_CGROUP_PARENT", parent.as_str())];
    let (mut child, _out) = spawn_until_ready(&env, &["--pids", "16"], "echo ready; exec sleep 600");
    let dirs = leftover_cgroups(&parent);
    let procs = std::fs::read_to_string(dirs[0].join("cgroup.procs")).unwrap();
    let pids: Vec<i32> = procs.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(!pids.is_empty());
    let pidfds: Vec<_> = pids
        .iter()
        .map(|p| {
            rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(*p).unwrap(),
                rustix::process::PidfdFlags::empty(),
            )
            .unwrap()
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    // Every sandbox process must exit on its own (parent-death signal, pid namespace teardown).
    for fd in &pidfds {
        let mut poll = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        let limit = rustix::time::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(
            rustix::event::poll(&mut poll, Some(&limit)).unwrap(),
            1,
            "sandbox process survived"
        );
    }
    // The supervisor died before cleanup: its cgroup is still there until gc.
    assert!(!leftover_cgroups(&parent).is_empty());
    let gc = Command::new(bin())
        .arg("gc")
        .env("TARTARUS_CGROUP_PARENT", &parent)
        .output()
        .unwrap();
    assert!(gc.status.success());
    assert!(
        leftover_cgroups(&parent).is_empty(),
        "gc left {:?}",
        leftover_cgroups(&parent)
    );
    remove_cgroup_parent(&parent);
}

#[test]
fn host_mount_table_is_unchanged_by_a_run() {
    let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    ok(run(&["--mount", "/tmp:/hosttmp"], &["/bin/true"]));
    let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(before, after);
}

#[test]
fn tty_flag_gives_the_command_a_terminal() {
    let out = run(
        &["-t"],
        &["/bin/sh", "-c", "test -t 0 && test -t 1 && echo has-a-tty"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("has-a-tty"), "{}", stdout(&out));
    let out = run(&[], &["/bin/sh", "-c", "test -t 0 || echo no-tty"]);
    assert!(stdout(&out).contains("no-tty"));
}

/// A minimal root: dash and the libraries it needs, copied from the host.
fn minimal_rootfs() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let copy = |host: &str| {
        let dst = root.path().join(host.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(host).unwrap(), &dst).unwrap();
    };
    copy("/bin/dash");
    let ldd = Command::new("ldd").arg("/bin/dash").output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
            copy(path);
        }
    }
    std::os::unix::fs::symlink("dash", root.path().join("bin/sh")).unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

#[test]
fn rootfs_directory_is_the_root_and_stays_untouched() {
    let root = minimal_rootfs();
    let before: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let rootfs = root.path().to_str().unwrap();
    let out = run(
        &["--rootfs", rootfs],
        &[
            "/bin/sh",
            "-c",
            "test -e /usr/bin/python3 || echo own-root; echo x > /tmp/f && echo tmp-ok; echo y > /z",
        ],
    );
    assert!(
        stdout(&out).contains("own-root") && stdout(&out).contains("tmp-ok"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("Read-only file system"), "{}", stderr(&out));
    let after: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after, "the rootfs directory was modified");
}

#[test]
fn mount_target_through_a_rootfs_symlink_is_refused() {
    let root = minimal_rootfs();
    std::os::unix::fs::symlink("/etc", root.path().join("data")).unwrap();
    let src = tempfile::tempdir().unwrap();
    let spec = format!("{}:/data/inside", src.path().display());
    let out = run(
        &["--rootfs", root.path().to_str().unwrap(), "--mount", &spec],
        &["/bin/sh", "-c", "true"],
    );
    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("passes through a symlink"),
        "{}",
        stderr(&out)
    );
    assert!(
        !Path::new("/etc/inside").exists(),
        "mount point created outside the root"
    );
}

#[test]
fn completions_are_generated() {
    let out = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("tartarus"));
}

/// Runs the binary as an unprivileged user (nobody) through setpriv.
fn run_as_nobody(args: &[&str]) -> std::process::Output {
    let (_dir, path) = world_executable_bin();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&path)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) is required for rootless tests");
    drop(_dir);
    out
}

#[test]
fn rootless_run_works_as_an_unprivileged_user() {
    let out = run_as_nobody(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "id -u; cat /proc/self/status | grep CapEff",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("1000\n"), "{}", stdout(&out));
    assert!(stdout(&out).contains("CapEff:\t0000000000000000"));
}

#[test]
fn rootless_limits_without_delegation_fail_clearly() {
    let out = run_as_nobody(&["run", "--memory", "64M", "--", "/bin/true"]);
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    assert!(
        err.contains("memory limit requested but cannot be enforced"),
        "{err}"
    );
}
