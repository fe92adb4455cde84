//! A hostile tenant against the runtime's limits: fork bombs, scratch fills, process exhaustion. Each test
//! reproduces an attack from the hostile-tenant findings (C1, H5, L6) and asserts that it is contained.
//!
//! Safety: nothing here may exhaust the real host, even against a runtime without the defences. Every
//! test first creates a cgroup that stands for the host (a pids limit of a few hundred, a memory limit
//! where memory is at stake) and starts every supervisor — and so every sandbox, whatever the runtime
//! does — inside it. The sandboxes' own cgroups are created below it (`TARTARUS_CGROUP_PARENT`), and the
//! stand-in is removed by a Drop guard, also when a test panics.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{bin, cgroup_parent, code, stderr, stdout, world_executable_bin};

/// The runtime's defaults, as the tests expect them (tartarus_runtime::DEFAULT_*).
const DEFAULT_PIDS: u64 = 256;
const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

/// Where one controller's hierarchy is mounted: its own v1 hierarchy, or the v2 tree.
fn hierarchy(controller: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    if v1.join("cgroup.procs").exists() {
        return v1;
    }
    let v2 = PathBuf::from("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    assert!(
        controllers.split_whitespace().any(|c| c == controller),
        "these tests need the {controller} controller (cgroup v1 or v2)"
    );
    v2
}

/// A cgroup standing for the host: `<hierarchy>/<parent>` with the limits, and a leaf `supervisor` in it
/// where every supervisor the test starts is placed (a leaf, so that the v2 no-internal-process rule
/// holds). Sandbox cgroups go to `<hierarchy>/<parent>/<name>`, beside the leaf.
struct HostStandIn {
    parent: String,
    /// `<hierarchy>/<parent>` for each hierarchy the stand-in limits.
    dirs: Vec<PathBuf>,
}

impl HostStandIn {
    /// A stand-in with at most `pids` processes and, when given, `memory` bytes.
    fn new(test: &str, pids: u64, memory: Option<u64>) -> HostStandIn {
        let parent = cgroup_parent(test);
        let mut limits = vec![("pids", "pids.max", pids.to_string())];
        if let Some(bytes) = memory {
            let file = match hierarchy("memory").ends_with("memory") {
                true => "memory.limit_in_bytes",
                false => "memory.max",
            };
            limits.push(("memory", file, bytes.to_string()));
        }
        let mut host = HostStandIn {
            parent,
            dirs: Vec::new(),
        };
        for (controller, file, value) in limits {
            let root = hierarchy(controller);
            if root == Path::new("/sys/fs/cgroup") {
                // v2: the controller must be enabled for the stand-in and below it.
                std::fs::write(root.join("cgroup.subtree_control"), format!("+{controller}")).unwrap();
            }
            let dir = root.join(&host.parent);
            if !host.dirs.contains(&dir) {
                std::fs::create_dir(&dir).unwrap();
                host.dirs.push(dir.clone());
            }
            if root == Path::new("/sys/fs/cgroup") {
                std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}")).unwrap();
            }
            std::fs::write(dir.join(file), value).unwrap();
            let leaf = dir.join("supervisor");
            if !leaf.exists() {
                std::fs::create_dir(&leaf).unwrap();
            }
        }
        host
    }

    /// `program args…` started inside the stand-in: a shell moves itself into every `supervisor` leaf,
    /// then execs the program, so the program and everything it starts are counted from its first
    /// instruction.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let procs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.join("supervisor/cgroup.procs").display().to_string())
            .collect();
        let mut c = Command::new("/bin/sh");
        c.args([
            "-c",
            r#"for f in $HOST_STAND_IN; do echo $$ > "$f" || exit 99; done; exec "$@""#,
            "stand-in",
            program,
        ])
        .args(args)
        .env("HOST_STAND_IN", procs.join(" "))
        .env("TARTARUS_CGROUP_PARENT", &self.parent)
        .stdin(Stdio::null());
        c
    }

    /// `tartarus run flags… -- cmd…` inside the stand-in, to completion.
    fn run(&self, flags: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        self.command(bin(), &args).output().unwrap()
    }

    /// `tartarus run flags… -- cmd…` inside the stand-in with piped stdio, once it printed `line`.
    fn spawn_until(&self, flags: &[&str], cmd: &[&str], line: &str) -> Running {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        let mut child = self
            .command(bin(), &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        if first.trim() != line {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("expected '{line}', got '{first}'; stderr: {err}");
        }
        Running { child, out }
    }

    /// The sandbox cgroups under the stand-in in `controller`'s hierarchy (everything but the leaf).
    fn sandbox_cgroups(&self, controller: &str) -> Vec<PathBuf> {
        let dir = hierarchy(controller).join(&self.parent);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.ends_with("supervisor"))
            .collect()
    }

    /// Sandbox cgroups left in any hierarchy.
    fn leftovers(&self) -> Vec<PathBuf> {
        common::leftover_cgroups(&self.parent)
            .into_iter()
            .filter(|p| !p.ends_with("supervisor"))
            .collect()
    }

    /// The one sandbox's cgroup in `controller`'s hierarchy.
    fn only_sandbox(&self, controller: &str) -> PathBuf {
        let dirs = self.sandbox_cgroups(controller);
        assert_eq!(
            dirs.len(),
            1,
            "one sandbox cgroup for {controller} expected: {dirs:?}"
        );
        dirs.into_iter().next().unwrap()
    }
}

impl Drop for HostStandIn {
    fn drop(&mut self) {
        // Whatever a failed test left running in the stand-in is ours: kill it, then remove the leaves,
        // the stand-in, and the parents the runtime made in other hierarchies.
        for dir in &self.dirs {
            kill_all(&dir.join("supervisor"));
        }
        for dir in &self.dirs {
            remove_when_empty(&dir.join("supervisor"));
        }
        common::remove_cgroup_parent(&self.parent);
        for dir in &self.dirs {
            remove_when_empty(dir);
        }
    }
}

fn kill_all(cgroup: &Path) {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse().ok()) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Cleanup only (never a test's synchronisation): a killed process leaves its cgroup a moment later.
fn remove_when_empty(dir: &Path) {
    for _ in 0..500 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => return,
        }
    }
}

/// A running `tartarus run` with its stdout being read.
struct Running {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Running {
    /// Closes the command's stdin and waits for the supervisor; returns what the command printed after
    /// its first line, and the exit code.
    fn finish(mut self) -> (String, i32) {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        let status = self.child.wait().unwrap();
        (rest, status.code().unwrap_or(-1))
    }

    /// Ends the supervisor as an operator would (SIGTERM: it kills the sandbox and cleans up).
    fn terminate(mut self) -> i32 {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

/// The `max` counter of a `pids.events` file.
fn pids_max_events(dir: &Path) -> u64 {
    read(dir, "pids.events")
        .lines()
        .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes charged to a memory cgroup (v1 or v2).
fn memory_usage(dir: &Path) -> u64 {
    let file = match dir.join("memory.current").exists() {
        true => "memory.current",
        false => "memory.usage_in_bytes",
    };
    read(dir, file).parse().unwrap()
}

/// C1: `while :; do sleep 40 & done` in one sandbox (default limits) stops at that sandbox's pids limit;
/// a second sandbox started afterwards still starts and runs a command. Without a default pids limit the
/// bomb takes every process the stand-in allows and the second sandbox cannot be created.
#[test]
fn test_a_fork_bomb_stops_at_its_sandbox_pids_limit_and_a_second_sandbox_still_starts() {
    let host = HostStandIn::new("forkbomb", 400, None);
    let mut bomb = host.spawn_until(
        &[],
        &["/bin/sh", "-c", "echo started; while :; do sleep 40 & done"],
        "started",
    );
    // dash says "Cannot fork" when the kernel refuses one: the bomb is at a limit.
    let mut err = BufReader::new(bomb.child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Cannot fork") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the bomb's stderr closed");
    }
    let sandbox = host.only_sandbox("pids");
    assert_eq!(read(&sandbox, "pids.max"), DEFAULT_PIDS.to_string());
    let current: u64 = read(&sandbox, "pids.current").parse().unwrap();
    assert!(current <= DEFAULT_PIDS, "{current} processes");
    assert!(
        pids_max_events(&sandbox) > 0,
        "the sandbox's own limit refused the fork"
    );
    let stand_in = hierarchy("pids").join(&host.parent);
    let total: u64 = read(&stand_in, "pids.current").parse().unwrap();
    assert!(total < 400, "the host stand-in is exhausted: {total}");

    let second = host.run(&[], &["/bin/echo", "second sandbox runs"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    assert_eq!(stdout(&second), "second sandbox runs\n");

    bomb.terminate();
    drop(err);
    assert!(
        host.leftovers().is_empty(),
        "cgroups left: {:?}",
        host.leftovers()
    );
}

/// L6: a host out of processes (here a stand-in that holds nothing but the supervisor) is reported as
/// the process limit, not as a user-namespace problem.
#[test]
fn test_a_host_out_of_processes_is_reported_as_its_process_limit_not_user_namespaces() {
    let host = HostStandIn::new("nopids", 1, None);
    let out = host.run(&[], &["/bin/true"]);
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the host's process limit is reached (pids cgroup or pid_max)"),
        "{err}"
    );
    assert!(!err.contains("user namespaces"), "{err}");
    assert!(
        host.leftovers().is_empty(),
        "cgroups left: {:?}",
        host.leftovers()
    );
}

/// H5: the scratch tmpfs is charged to the sandbox's own memory cgroup: pages written to /tmp show up
/// in its usage, not in the supervisor's.
#[test]
fn test_scratch_tmpfs_pages_are_charged_to_the_sandbox_memory_cgroup() {
    let host = HostStandIn::new("tmpfs-charge", 400, Some(1 << 30));
    let sandbox = host.spawn_until(
        &[],
        &[
            "/bin/sh",
            "-c",
            "head -c 67108864 /dev/zero > /tmp/fill && echo filled; read x; true",
        ],
        "filled",
    );
    let memory = host.only_sandbox("memory");
    let charged = memory_usage(&memory);
    assert!(charged >= 64 << 20, "only {charged} bytes charged to the sandbox");
    let supervisor = hierarchy("memory").join(&host.parent).join("supervisor");
    let elsewhere = memory_usage(&supervisor);
    assert!(
        elsewhere < 64 << 20,
        "{elsewhere} bytes charged to the supervisor"
    );
    let (_, status) = sandbox.finish();
    assert_eq!(status, 0);
    assert!(
        host.leftovers().is_empty(),
        "cgroups left: {:?}",
        host.leftovers()
    );
}

/// H5: a sandbox filling its scratch tmpfs is stopped within its own memory limit (64 MiB asked for;
/// the 512 MiB default), and a neighbour holding memory in the same host keeps running. Without a
/// default memory limit the default case charges the host stand-in, whose OOM killer then takes the
/// neighbour: tmpfs pages belong to no process, so the biggest process is the victim.
#[test]
fn test_filling_scratch_stops_at_the_sandbox_memory_limit_and_spares_its_neighbour() {
    let host = HostStandIn::new("tmpfs-fill", 400, Some(768 << 20));
    let neighbour = host.spawn_until(
        &[],
        &[
            "/usr/bin/python3",
            "-c",
            "import sys\nb = bytearray(128 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n\
             print('holding', flush=True)\nsys.stdin.read()\nprint('alive', b[4096])",
        ],
        "holding",
    );
    for (flags, mib) in [
        (&["--memory", "64M"][..], 200),
        (&["--scratch-size", "1G"][..], 700),
    ] {
        let script = format!("dd if=/dev/zero of=/tmp/fill bs=1M count={mib} 2>/dev/null && echo FILLED");
        let mut all = vec!["--json"];
        all.extend_from_slice(flags);
        let out = host.run(&all, &["/bin/sh", "-c", &script]);
        assert!(
            !stdout(&out).contains("FILLED"),
            "{flags:?}: the fill got past the limit"
        );
        assert_ne!(code(&out), 0, "{flags:?}: {}", stderr(&out));
        let record = common::result_record(&out);
        assert!(
            record["reason"] == "oom" || record["exit_code"] != 0,
            "{flags:?}: {record}"
        );
    }
    let (rest, status) = neighbour.finish();
    assert_eq!(
        (rest.as_str(), status),
        ("alive 1\n", 0),
        "the neighbour was killed"
    );
    assert!(
        host.leftovers().is_empty(),
        "cgroups left: {:?}",
        host.leftovers()
    );
}

/// C1, H5: a root supervisor puts every sandbox in its own cgroups with the default limits: the pids
/// limit, the memory limit (swap included where accounted) and a fair CPU weight without a quota; an
/// explicit `unlimited` lifts each.
#[test]
fn test_every_sandbox_gets_the_default_limits_and_unlimited_lifts_them() {
    let host = HostStandIn::new("defaults", 400, None);
    let sandbox = host.spawn_until(&[], &["/bin/sh", "-c", "echo ready; read x; true"], "ready");
    let pids = host.only_sandbox("pids");
    assert_eq!(read(&pids, "pids.max"), DEFAULT_PIDS.to_string());
    let memory = host.only_sandbox("memory");
    let cpu = host.only_sandbox("cpu");
    match memory.join("memory.max").exists() {
        true => {
            assert_eq!(read(&memory, "memory.max"), DEFAULT_MEMORY_BYTES.to_string());
            assert_eq!(read(&cpu, "cpu.weight"), "100");
            assert_eq!(read(&cpu, "cpu.max"), "max 100000");
        }
        false => {
            assert_eq!(
                read(&memory, "memory.limit_in_bytes"),
                DEFAULT_MEMORY_BYTES.to_string()
            );
            assert_eq!(read(&cpu, "cpu.shares"), "1024");
            assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "-1");
        }
    }
    sandbox.finish();

    let lifted = host.spawn_until(
        &[
            "--memory",
            "unlimited",
            "--cpus",
            "unlimited",
            "--pids",
            "unlimited",
        ],
        &[
            "/bin/sh",
            "-c",
            "echo ready; grep 'Max processes' /proc/self/limits; read x; true",
        ],
        "ready",
    );
    assert!(
        host.leftovers().is_empty(),
        "lifted limits still made {:?}",
        host.leftovers()
    );
    let (limits, status) = lifted.finish();
    assert_eq!(status, 0);
    assert!(
        !limits.contains(&format!(" {DEFAULT_PIDS} ")),
        "RLIMIT_NPROC still set: {limits}"
    );
    assert!(
        host.leftovers().is_empty(),
        "cgroups left: {:?}",
        host.leftovers()
    );
}

/// Counts the forks a sandbox gets before the kernel refuses one, and the errno: each child sleeps, so
/// they all count at once.
const FORK_COUNT: &str = r#"
import os, time
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    print(n, 0)
except OSError as e:
    print(n, e.errno)
"#;

/// C1, rootless: without cgroups, RLIMIT_NPROC (per user of the sandbox's own user namespace) bounds a
/// sandbox's processes at the pids default. Without it the forks go on until the host stand-in is full.
#[test]
fn test_a_rootless_sandbox_is_bounded_by_rlimit_nproc() {
    let host = HostStandIn::new("rootless-nproc", 400, None);
    let (_dir, path) = world_executable_bin();
    let tartarus = path.to_str().unwrap();
    let out = host
        .command(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                tartarus,
                "run",
                "--",
                "/usr/bin/python3",
                "-c",
                FORK_COUNT,
            ],
        )
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let (forks, errno) = text.trim().split_once(' ').unwrap();
    let forks: u64 = forks.parse().unwrap();
    assert_eq!(errno, libc::EAGAIN.to_string(), "{text}");
    assert!(forks < DEFAULT_PIDS, "{forks} forks");
    assert!(forks > DEFAULT_PIDS / 2, "only {forks} forks");
}
