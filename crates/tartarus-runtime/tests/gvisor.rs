//! The gVisor lane against a real runsc, as root: exit codes, signals, stdio, env, cwd and user, the
//! read-only root, image and directory roots, no network, memory, tmpfs and pids limits, timeouts, service
//! execs and controls, and nothing left behind (no runsc container under our root, no bundle, no cgroup).
//!
//! Its own `main` (`harness = false`): the lane makes the process a child subreaper and reaps the runsc
//! processes it adopts, which must not race with other tests' children; cases run one after another. A
//! missing runsc or a non-root run fails loudly: these tests never skip. Give a name fragment as an
//! argument to run only matching cases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use tartarus_runtime::files::{decode_listing, decode_outcome};
use tartarus_runtime::gvisor::GvisorRuntime;
use tartarus_runtime::lanes::{self, GvisorConfig, LaneConfig, LaneName};
use tartarus_runtime::process::ProcessRuntimeConfig;
use tartarus_runtime::{
    ExecRequest, ExitReason, FileErrorKind, FileOp, KillReason, NetworkMode, Outcome, RootSpec, Runtime,
    Sandbox, SandboxSpec, SandboxUser, ServiceSandbox, StartError, StdioFds, Termination,
};

/// Nothing here takes this long unless it hung.
const HUNG: Duration = Duration::from_secs(60);

struct Env {
    config: LaneConfig,
    runtime: GvisorRuntime,
    state: PathBuf,
    cgroup_parent: String,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

struct Ran {
    outcome: Outcome,
    stdout: String,
    stderr: String,
}

/// Moves `input` in and the output out until every pipe is closed (the sandbox, and every process holding
/// its stdio, ended).
fn pump(stdin: Option<OwnedFd>, input: &[u8], stdout: OwnedFd, stderr: OwnedFd) -> (String, String) {
    for fd in [&stdout, &stderr].into_iter().chain(stdin.as_ref()) {
        rustix::io::ioctl_fionbio(fd, true).unwrap();
    }
    let mut stdin = if input.is_empty() { None } else { stdin };
    let mut input = input;
    let mut outputs = [(Some(stdout), Vec::new()), (Some(stderr), Vec::new())];
    let deadline = Instant::now() + HUNG;
    while stdin.is_some() || outputs.iter().any(|(fd, _)| fd.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the sandbox's output never closed");
        let mut fds = Vec::new();
        if let Some(fd) = &stdin {
            fds.push(PollFd::new(fd, PollFlags::OUT));
        }
        for (fd, _) in outputs.iter() {
            if let Some(fd) = fd {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
        }
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        drop(fds);
        if let Some(fd) = &stdin {
            match rustix::io::write(fd, input) {
                Ok(n) => input = &input[n..],
                Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => input = &[],
            }
            if input.is_empty() {
                stdin = None;
            }
        }
        for (slot, buf) in outputs.iter_mut() {
            if let Some(fd) = slot.as_ref() {
                let mut chunk = [0u8; 65536];
                match rustix::io::read(fd, &mut chunk) {
                    Ok(0) => *slot = None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                    Err(_) => *slot = None,
                }
            }
        }
    }
    let [(_, out), (_, err)] = outputs;
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Prepares and starts `spec`, feeds `input`, and waits for the outcome.
fn run_with(env: &Env, spec: SandboxSpec, input: &[u8]) -> Result<Ran, StartError> {
    let sandbox_has_timeout = spec.timeout.is_some();
    let mut sandbox = env.runtime.prepare(spec).expect("prepare");
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let started = sandbox.start(StdioFds {
        stdin: stdin_read.as_fd(),
        stdout: stdout_write.as_fd(),
        stderr: stderr_write.as_fd(),
    });
    drop((stdin_read, stdout_write, stderr_write));
    if let Err(e) = started {
        sandbox.cleanup().expect("cleanup after a failed start");
        return Err(e);
    }
    // With a timeout, the sandbox may hold its output open until it is killed: wait first (the output of
    // these cases fits in the pipes).
    let (outcome, (stdout, stderr)) = match sandbox_has_timeout {
        true => {
            let outcome = sandbox.wait().expect("wait");
            (outcome, pump(Some(stdin_write), input, stdout_read, stderr_read))
        }
        false => {
            let output = pump(Some(stdin_write), input, stdout_read, stderr_read);
            (sandbox.wait().expect("wait"), output)
        }
    };
    sandbox.cleanup().expect("cleanup");
    Ok(Ran {
        outcome,
        stdout,
        stderr,
    })
}

fn run(env: &Env, command: &[&str]) -> Ran {
    run_with(env, spec(command), b"").expect("start")
}

fn spec(command: &[&str]) -> SandboxSpec {
    SandboxSpec::new(command.iter().map(|s| s.to_string()).collect())
}

fn sh(script: &str) -> SandboxSpec {
    spec(&["/bin/sh", "-c", script])
}

/// Nothing of any sandbox is left: no container under our runsc root, no bundle, no cgroup.
fn assert_nothing_left(env: &Env) {
    let list = std::process::Command::new(&env.runtime.runsc().path)
        .arg(format!("--root={}", env.runtime.state_dirs().root.display()))
        .args(["list", "--quiet"])
        .output()
        .expect("runsc list");
    assert!(list.status.success(), "runsc list: {list:?}");
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.trim().is_empty(), "containers left: {listed}");
    let bundles: Vec<_> = std::fs::read_dir(&env.runtime.state_dirs().bundles)
        .expect("bundles dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(bundles.is_empty(), "bundles left: {bundles:?}");
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").expect("cgroups").flatten() {
        let parent = hierarchy.path().join(&env.cgroup_parent);
        let Ok(children) = std::fs::read_dir(&parent) else {
            continue;
        };
        let gvisor: Vec<_> = children
            .flatten()
            .filter(|c| c.file_name().to_string_lossy().starts_with("gvisor-"))
            .map(|c| c.path())
            .collect();
        assert!(gvisor.is_empty(), "cgroups left: {gvisor:?}");
    }
}

type Case = fn(&Env);

fn exit_codes_and_stdio(env: &Env) {
    let ran = run_with(
        env,
        sh("read line; echo \"got $line\"; echo oops >&2; exit 7"),
        b"hello\n",
    )
    .expect("start");
    assert_eq!(ran.outcome.termination, Termination::Exited(7));
    assert_eq!(ran.outcome.reason, ExitReason::Exited);
    assert_eq!(ran.stdout, "got hello\n");
    assert_eq!(ran.stderr, "oops\n");
    let ran = run(env, &["/bin/true"]);
    assert_eq!(ran.outcome.termination, Termination::Exited(0));
    assert_nothing_left(env);
}

fn a_signal_ends_the_command(env: &Env) {
    let ran = run(
        env,
        &[
            "python3",
            "-c",
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
        ],
    );
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGTERM));
    assert_eq!(ran.outcome.termination.exit_code(), 143);
    assert_eq!(ran.outcome.reason, ExitReason::Killed);
}

fn env_cwd_and_user(env: &Env) {
    let mut s = sh("echo \"$FOO $HOME $USER\"; pwd; id -u; id -g; uname -r");
    s.env = vec![("FOO".into(), "bar".into())];
    s.workdir = Some("/tmp".into());
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.outcome.termination, Termination::Exited(0), "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[..4], ["bar /home/sandbox sandbox", "/tmp", "1000", "1000"]);
    assert_eq!(lines[4], "4.4.0", "gVisor's kernel, not the host's");
    let mut s = sh("id -u; id -g");
    s.user = Some(SandboxUser { uid: 4321, gid: 99 });
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.stdout, "4321\n99\n");
    let ran = run(
        env,
        &["/bin/sh", "-c", "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status"],
    );
    for line in ran.stdout.lines() {
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
}

fn the_host_root_is_read_only_and_scratch_is_writable(env: &Env) {
    let ran = run(
        env,
        &[
            "/bin/sh",
            "-c",
            "touch /usr/x 2>/dev/null && echo usr-writable; touch /etc/x 2>/dev/null && echo etc-writable; \
             echo ok > /tmp/a && cat /tmp/a; echo home > $HOME/b && cat $HOME/b; \
             test -e /etc/shadow && echo shadow; grep -c sandbox /etc/passwd",
        ],
    );
    assert_eq!(ran.stdout, "ok\nhome\n1\n", "{}", ran.stderr);
}

fn a_directory_root_is_used_read_only(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A root of the host's /usr reached through its merged-/usr symlinks.
    std::fs::create_dir_all(root.join("usr")).unwrap();
    for (name, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(target, root.join(name)).unwrap();
    }
    std::fs::write(root.join("marker"), "from the directory\n").unwrap();
    let mut s = sh("cat /marker; echo x > /marker 2>/dev/null || echo read-only");
    s.root = RootSpec::Directory(root.to_path_buf());
    s.mounts.push(tartarus_runtime::BindMount {
        source: "/usr".into(),
        target: "/usr".into(),
        writable: false,
    });
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.stdout, "from the directory\nread-only\n", "{}", ran.stderr);
    assert_eq!(
        std::fs::read_to_string(root.join("marker")).unwrap(),
        "from the directory\n"
    );
}

fn an_image_root_stacks_layers_and_writes_vanish(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let bottom = dir.path().join("bottom");
    let top = dir.path().join("top");
    for layer in [&bottom, &top] {
        std::fs::create_dir_all(layer.join("etc")).unwrap();
    }
    std::fs::create_dir_all(bottom.join("usr")).unwrap();
    for (name, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(target, bottom.join(name)).unwrap();
    }
    std::fs::write(bottom.join("etc/layer"), "bottom\n").unwrap();
    std::fs::write(top.join("etc/layer"), "top\n").unwrap();
    std::fs::write(bottom.join("etc/only-bottom"), "b\n").unwrap();
    let mut s = sh("cat /etc/layer /etc/only-bottom; echo new > /etc/layer && cat /etc/layer");
    // The image's files are root's, as in any image.
    s.user = Some(SandboxUser { uid: 0, gid: 0 });
    s.root = RootSpec::Layers(vec![bottom.clone(), top.clone()]);
    s.mounts.push(tartarus_runtime::BindMount {
        source: "/usr".into(),
        target: "/usr".into(),
        writable: false,
    });
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.stdout, "top\nb\nnew\n", "{}", ran.stderr);
    assert_eq!(std::fs::read_to_string(top.join("etc/layer")).unwrap(), "top\n");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*env.state.to_string_lossy()),
        "a mount is left: {mounts}"
    );
    assert_nothing_left(env);
}

fn network_none_has_only_loopback(env: &Env) {
    let ran = run(
        env,
        &["/bin/sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"],
    );
    let interfaces: Vec<&str> = ran.stdout.split_whitespace().collect();
    assert_eq!(interfaces, ["lo"], "{}", ran.stderr);
}

fn the_memory_limit_ends_the_sandbox_as_oom(env: &Env) {
    let mut s = spec(&["python3", "-c", "b = bytearray(300 << 20); print('allocated')"]);
    s.limits.memory_bytes = Some(128 << 20);
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(
        ran.outcome.reason,
        ExitReason::Oom,
        "{:?} {}",
        ran.outcome,
        ran.stderr
    );
    assert!(!ran.stdout.contains("allocated"));
    assert_nothing_left(env);
}

fn filling_tmpfs_is_charged_to_the_sandbox(env: &Env) {
    let mut s = sh("head -c 200M /dev/zero > /tmp/fill && echo filled");
    s.limits.memory_bytes = Some(128 << 20);
    s.scratch_bytes = 1 << 30;
    let ran = run_with(env, s, b"").expect("start");
    assert!(
        !ran.stdout.contains("filled"),
        "the tmpfs outgrew the memory limit"
    );
    assert_eq!(
        ran.outcome.reason,
        ExitReason::Oom,
        "{:?} {}",
        ran.outcome,
        ran.stderr
    );
}

fn the_pids_limit_stops_a_fork_bomb(env: &Env) {
    let mut s = spec(&[
        "python3",
        "-c",
        "import os, time\n\
         n = 0\n\
         try:\n\
         \x20   for _ in range(200):\n\
         \x20       if os.fork() == 0:\n\
         \x20           time.sleep(2); os._exit(0)\n\
         \x20       n += 1\n\
         except OSError as e:\n\
         \x20   print('refused after', n, e.errno, flush=True)\n\
         os._exit(0)",
    ]);
    s.limits.pids = Some(16);
    s.timeout = Some(Duration::from_secs(30));
    let ran = run_with(env, s, b"").expect("start");
    assert!(
        ran.stdout.starts_with("refused after"),
        "{:?} {} {}",
        ran.outcome,
        ran.stdout,
        ran.stderr
    );
    let forked: u32 = ran.stdout.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(forked < 16, "{forked} forks under a limit of 16");
}

/// The pids hierarchy's directory for our cgroup parent (v1 on a hybrid host, the v2 tree otherwise).
fn pids_parent(env: &Env) -> PathBuf {
    let v1 = PathBuf::from("/sys/fs/cgroup/pids").join(&env.cgroup_parent);
    match v1.exists() {
        true => v1,
        false => PathBuf::from("/sys/fs/cgroup").join(&env.cgroup_parent),
    }
}

fn a_fork_bomb_stays_inside_its_parent_cgroup(env: &Env) {
    let spec = SandboxSpec {
        service: true,
        limits: tartarus_runtime::ResourceLimits {
            pids: Some(16),
            ..Default::default()
        },
        ..SandboxSpec::default()
    };
    let mut sandbox = env.runtime.prepare_service(spec).expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    let parent = pids_parent(env);
    let cgroup = std::fs::read_dir(&parent)
        .expect("the test's parent cgroup")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("gvisor-"))
        .expect("the sandbox's cgroup")
        .path();
    let max: u64 = std::fs::read_to_string(cgroup.join("pids.max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(max, 16 * 8 + 128, "host tasks bound for 16 sandbox processes");
    let bomb = "import os, time\n\
                n = 0\n\
                try:\n\
                \x20   while True:\n\
                \x20       if os.fork() == 0:\n\
                \x20           time.sleep(3); os._exit(0)\n\
                \x20       n += 1\n\
                except OSError:\n\
                \x20   print(n, open('/proc/loadavg').read().split()[3], flush=True)\n";
    let (end, out, err) = exec(sandbox.as_mut(), request(&["python3", "-c", bomb]), b"").unwrap();
    let peak: u64 = std::fs::read_to_string(parent.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(end, Termination::Exited(0), "{err}");
    let forked: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(forked < 16, "{forked} forks under a limit of 16: {out}");
    assert!(
        peak <= max,
        "the parent cgroup holds {peak} tasks, more than {max}"
    );
    sandbox.kill(KillReason::Requested).expect("kill");
    sandbox.wait().expect("wait");
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

fn a_timeout_kills_and_says_so(env: &Env) {
    // The default grace: SIGTERM first, which ends sleep.
    let mut s = spec(&["sleep", "30"]);
    s.timeout = Some(Duration::from_millis(500));
    let started = Instant::now();
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.outcome.reason, ExitReason::Timeout);
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGTERM));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_nothing_left(env);
    // No grace: SIGKILL at once.
    let mut s = spec(&["sleep", "30"]);
    s.timeout = Some(Duration::from_millis(500));
    s.timeout_grace = Some(Duration::ZERO);
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.outcome.reason, ExitReason::Timeout);
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGKILL));
    assert_nothing_left(env);
}

fn a_missing_command_is_127_and_a_directory_126(env: &Env) {
    match run_with(env, spec(&["/does/not/exist"]), b"") {
        Err(e @ StartError::CommandNotFound(_)) => assert_eq!(e.exit_code(), 127),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started"),
    }
    match run_with(env, spec(&["/etc/passwd"]), b"") {
        Err(e @ StartError::NotExecutable { .. }) => assert_eq!(e.exit_code(), 126),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started"),
    }
    assert_nothing_left(env);
}

fn a_missing_mount_source_is_refused_before_anything_exists(env: &Env) {
    let mut s = spec(&["/bin/true"]);
    s.mounts.push(tartarus_runtime::BindMount {
        source: "/does/not/exist".into(),
        target: "/data".into(),
        writable: false,
    });
    let err = env.runtime.prepare(s).err().expect("refused");
    assert!(err.to_string().contains("/does/not/exist"), "{err}");
    assert_nothing_left(env);
}

/// Runs one exec to its end with the given input, returning its end and output.
fn exec(
    sandbox: &mut dyn ServiceSandbox,
    request: ExecRequest,
    input: &[u8],
) -> Result<(Termination, String, String), tartarus_runtime::ExecError> {
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let id = sandbox.exec(
        &request,
        StdioFds {
            stdin: stdin_read.as_fd(),
            stdout: stdout_write.as_fd(),
            stderr: stderr_write.as_fd(),
        },
    )?;
    drop((stdin_read, stdout_write, stderr_write));
    let (out, err) = pump(Some(stdin_write), input, stdout_read, stderr_read);
    let end = sandbox
        .wait_exec(id, Some(HUNG))
        .expect("wait_exec")
        .expect("ended");
    Ok((end, out, err))
}

/// Runs one file operation to its end with the given input.
fn file_op(
    sandbox: &mut dyn ServiceSandbox,
    op: FileOp,
    input: &[u8],
) -> Result<(Termination, String, String), tartarus_runtime::ExecError> {
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let id = sandbox.start_file_op(
        &op,
        StdioFds {
            stdin: stdin_read.as_fd(),
            stdout: stdout_write.as_fd(),
            stderr: stderr_write.as_fd(),
        },
    )?;
    drop((stdin_read, stdout_write, stderr_write));
    let (out, err) = pump(Some(stdin_write), input, stdout_read, stderr_read);
    let end = sandbox
        .wait_exec(id, Some(HUNG))
        .expect("wait_exec")
        .expect("ended");
    Ok((end, out, err))
}

fn service_file_operations_without_a_shell(env: &Env) {
    let mut sandbox = env
        .runtime
        .prepare_service(SandboxSpec::default())
        .expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    let path = |p: &str| p.to_string();
    let (end, _, err) = file_op(
        sandbox.as_mut(),
        FileOp::Write {
            path: path("/tmp/note"),
        },
        b"written\n",
    )
    .unwrap();
    assert_eq!(decode_outcome(end, err.as_bytes()), Ok(()), "{err}");
    let (end, out, err) = file_op(
        sandbox.as_mut(),
        FileOp::Read {
            path: path("/tmp/note"),
        },
        b"",
    )
    .unwrap();
    assert_eq!(decode_outcome(end, err.as_bytes()), Ok(()));
    assert_eq!(out, "written\n");
    let (_, out, _) = exec(sandbox.as_mut(), request(&["cat", "/tmp/note"]), b"").unwrap();
    assert_eq!(out, "written\n", "an exec sees what the file operation wrote");
    let (end, out, err) = file_op(sandbox.as_mut(), FileOp::List { path: path("/tmp") }, b"").unwrap();
    assert_eq!(decode_outcome(end, err.as_bytes()), Ok(()));
    let names: Vec<String> = decode_listing(out.as_bytes())
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"note".to_string()), "{names:?}");

    exec(
        sandbox.as_mut(),
        request(&["ln", "-s", "/etc/passwd", "/tmp/link"]),
        b"",
    )
    .unwrap();
    let (end, _, err) = file_op(
        sandbox.as_mut(),
        FileOp::Read {
            path: path("/tmp/link"),
        },
        b"",
    )
    .unwrap();
    assert_eq!(
        decode_outcome(end, err.as_bytes()).map_err(|e| e.kind),
        Err(FileErrorKind::WrongType)
    );
    let (end, _, err) = file_op(
        sandbox.as_mut(),
        FileOp::Read {
            path: path("/tmp/none"),
        },
        b"",
    )
    .unwrap();
    assert_eq!(
        decode_outcome(end, err.as_bytes()).map_err(|e| e.kind),
        Err(FileErrorKind::NotFound)
    );
    let (end, _, err) = file_op(sandbox.as_mut(), FileOp::Write { path: path("/usr/x") }, b"x").unwrap();
    assert_eq!(
        decode_outcome(end, err.as_bytes()).map_err(|e| e.kind),
        Err(FileErrorKind::Forbidden)
    );
    assert!(matches!(
        file_op(
            sandbox.as_mut(),
            FileOp::Read {
                path: path("/tmp/../etc")
            },
            b""
        ),
        Err(tartarus_runtime::ExecError::Invalid(_))
    ));
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

fn request(command: &[&str]) -> ExecRequest {
    ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        workdir: None,
    }
}

fn service_execs_pause_resume_and_kill(env: &Env) {
    let s = SandboxSpec {
        env: vec![("BASE".into(), "1".into())],
        ..SandboxSpec::default()
    };
    let mut sandbox = env.runtime.prepare_service(s).expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    assert!(sandbox.exec_event_fd().is_some());

    let mut req = request(&[
        "/bin/sh",
        "-c",
        "read x; echo \"$x $BASE $EXTRA\"; pwd; id -u; echo e >&2; exit 3",
    ]);
    req.env = vec![("EXTRA".into(), "2".into())];
    req.workdir = Some("/tmp".into());
    let (end, out, err) = exec(sandbox.as_mut(), req, b"in\n").expect("exec");
    assert_eq!(end, Termination::Exited(3));
    assert_eq!(out, "in 1 2\n/tmp\n1000\n");
    assert_eq!(err, "e\n");

    // A file written by one exec is seen by the next.
    let (end, _, _) = exec(
        sandbox.as_mut(),
        request(&["/bin/sh", "-c", "echo kept > /tmp/f"]),
        b"",
    )
    .unwrap();
    assert_eq!(end, Termination::Exited(0));
    let (_, out, _) = exec(sandbox.as_mut(), request(&["cat", "/tmp/f"]), b"").unwrap();
    assert_eq!(out, "kept\n");

    match exec(sandbox.as_mut(), request(&["/no/such/program"]), b"") {
        Err(e) => assert_eq!(e.exit_code(), 127, "{e}"),
        Ok(end) => panic!("started: {end:?}"),
    }

    let (end, _, _) = exec(sandbox.as_mut(), request(&["/bin/sh", "-c", "kill -9 $$"]), b"").unwrap();
    assert_eq!(end, Termination::Signaled(libc::SIGKILL));

    // Paused, a running exec makes no progress; resumed, it finishes.
    let (stdout_read, stdout_write) = pipe();
    let id = sandbox
        .exec(
            &request(&["/bin/sh", "-c", "while true; do echo tick; sleep 0.05; done"]),
            StdioFds {
                stdin: rustix::stdio::stdin(),
                stdout: stdout_write.as_fd(),
                stderr: rustix::stdio::stderr(),
            },
        )
        .expect("exec");
    drop(stdout_write);
    let mut first = [0u8; 5];
    rustix::io::read(&stdout_read, &mut first).unwrap();
    sandbox.pause().expect("pause");
    assert!(sandbox.is_paused());
    let mut drained = [0u8; 4096];
    rustix::io::ioctl_fionbio(&stdout_read, true).unwrap();
    while rustix::io::read(&stdout_read, &mut drained).is_ok_and(|n| n > 0) {}
    let mut fds = [PollFd::new(&stdout_read, PollFlags::IN)];
    let quiet = rustix::event::poll(
        &mut fds,
        Some(&rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 300_000_000,
        }),
    )
    .unwrap();
    assert_eq!(quiet, 0, "a paused sandbox kept writing");
    sandbox.resume().expect("resume");
    assert!(!sandbox.is_paused());
    rustix::io::ioctl_fionbio(&stdout_read, false).unwrap();
    assert!(
        rustix::io::read(&stdout_read, &mut drained).unwrap() > 0,
        "resumed sandbox is silent"
    );
    sandbox.kill_exec(id).expect("kill_exec");
    let end = sandbox.wait_exec(id, Some(HUNG)).unwrap().expect("ended");
    assert_eq!(end, Termination::Signaled(libc::SIGKILL));

    // terminate leaves the sandbox up (its init ignores SIGTERM); kill ends it.
    sandbox.terminate().expect("terminate");
    assert_eq!(sandbox.try_wait().expect("try_wait"), None);
    sandbox.kill(KillReason::Requested).expect("kill");
    let outcome = sandbox.wait().expect("wait");
    assert_eq!(outcome.reason, ExitReason::Killed);
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

fn a_service_sandbox_with_a_main_command_ends_with_it(env: &Env) {
    let mut sandbox = env
        .runtime
        .prepare_service(sh("read x; exit 4"))
        .expect("prepare");
    let (stdin_read, stdin_write) = pipe();
    sandbox
        .start(StdioFds {
            stdin: stdin_read.as_fd(),
            stdout: rustix::stdio::stdout(),
            stderr: rustix::stdio::stderr(),
        })
        .expect("start");
    drop(stdin_read);
    let (end, out, _) = exec(sandbox.as_mut(), request(&["/bin/echo", "alongside"]), b"").unwrap();
    assert_eq!((end, out.as_str()), (Termination::Exited(0), "alongside\n"));
    rustix::io::write(&stdin_write, b"go\n").unwrap();
    let outcome = sandbox.wait().expect("wait");
    assert_eq!(outcome.termination, Termination::Exited(4));
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

/// Quarantine's restrictions on this lane: the extra denied syscalls hold for the main command and for
/// every exec (which `runsc exec` starts outside the main command's process tree), and only the narrowed
/// writable paths can be written.
fn denied_syscalls_and_narrowed_writable_paths_hold_for_the_command_and_every_exec(env: &Env) {
    const PROBE: &str = "cd /tmp && touch f && chmod 600 f; echo chmod=$?; ln -s f g; echo symlink=$?; \
        touch $HOME/x; echo home=$?; echo ok > /tmp/ok && cat /tmp/ok";
    let restricted = |mut spec: SandboxSpec| {
        spec.denied_syscalls = ["chmod", "fchmod", "fchmodat", "symlink", "symlinkat"]
            .map(String::from)
            .to_vec();
        spec.writable_paths = vec!["/tmp".into()];
        spec
    };
    let ran = run_with(env, restricted(sh(PROBE)), b"").expect("start");
    assert_eq!(ran.outcome.termination, Termination::Exited(0), "{}", ran.stderr);
    assert_eq!(ran.stdout, "chmod=1\nsymlink=1\nhome=1\nok\n", "{}", ran.stderr);
    // Without them the same script may do all of it: the probe itself is sound.
    let free = run_with(env, sh(PROBE), b"").expect("start");
    assert_eq!(free.stdout, "chmod=0\nsymlink=0\nhome=0\nok\n", "{}", free.stderr);

    let mut sandbox = env
        .runtime
        .prepare_service(restricted(SandboxSpec::default()))
        .expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    let (end, out, err) = exec(sandbox.as_mut(), request(&["/bin/sh", "-c", PROBE]), b"").expect("exec");
    assert_eq!(end, Termination::Exited(0), "{err}");
    assert_eq!(out, "chmod=1\nsymlink=1\nhome=1\nok\n", "{err}");
    // A command the filter cannot find is a shell's 127 with one line.
    let (end, _, err) = exec(sandbox.as_mut(), request(&["no-such-command"]), b"").expect("exec");
    assert_eq!(end, Termination::Exited(127), "{err}");
    assert!(err.contains("command not found: no-such-command"), "{err}");
    sandbox.kill(KillReason::Requested).expect("kill");
    sandbox.wait().expect("wait");
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);

    let mut unknown = sh("true");
    unknown.denied_syscalls = vec!["no_such_call".into()];
    let err = env.runtime.prepare(unknown).err().expect("refused");
    assert!(
        err.to_string().contains("unknown syscall 'no_such_call'"),
        "{err}"
    );
    assert_nothing_left(env);
}

fn checkpoint_writes_an_image(env: &Env) {
    let mut sandbox = env
        .runtime
        .prepare_sandbox(spec(&["sleep", "30"]))
        .expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    let dir = tempfile::tempdir().unwrap();
    sandbox.checkpoint(dir.path(), false).expect("checkpoint");
    let saved: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(!saved.is_empty(), "no checkpoint image");
    let outcome = sandbox.wait().expect("the checkpointed sandbox ends");
    assert!(outcome.wall < HUNG);
    sandbox.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

fn a_checkpoint_restores_into_a_new_sandbox_with_its_files(env: &Env) {
    let spec = SandboxSpec {
        service: true,
        ..SandboxSpec::default()
    };
    let mut first = env.runtime.prepare_sandbox(spec.clone()).expect("prepare");
    first.start(StdioFds::inherit()).expect("start");
    let (end, _, _) = exec(
        &mut first,
        request(&["/bin/sh", "-c", "echo before > /tmp/state"]),
        b"",
    )
    .unwrap();
    assert_eq!(end, Termination::Exited(0));
    let image = tempfile::tempdir().unwrap();
    first.checkpoint(image.path(), false).expect("checkpoint");
    first.wait().expect("the checkpointed sandbox ends");
    first.cleanup().expect("cleanup");

    let mut second = env.runtime.prepare_sandbox(spec).expect("prepare");
    second
        .start_restored(image.path(), StdioFds::inherit())
        .expect("restore");
    let (_, out, err) = exec(&mut second, request(&["cat", "/tmp/state"]), b"").unwrap();
    assert_eq!(out, "before\n", "{err}");
    second.kill(KillReason::Requested).expect("kill");
    second.wait().expect("wait");
    second.cleanup().expect("cleanup");
    assert_nothing_left(env);
}

fn unsupported_knobs_are_refused_naming_the_lane(env: &Env) {
    let mut s = spec(&["/bin/true"]);
    s.tty = true;
    let err = env.runtime.prepare(s).err().expect("refused");
    assert_eq!(err.to_string(), "the gvisor lane cannot honour a terminal (tty)");
    let mut s = spec(&["/bin/true"]);
    s.network = NetworkMode::HostLoopback;
    assert!(env.runtime.prepare(s).is_err());
    assert_nothing_left(env);
}

fn a_newer_runsc_earlier_on_path_is_the_one_used(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("runsc");
    let real = env.runtime.runsc().path.clone();
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'runsc version release-20990101.0'; echo 'spec: 1.1.0'; exit 0; fi\nexec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_path = std::env::var_os("PATH").unwrap_or_default();
    let old_runsc = std::env::var_os("TARTARUS_RUNSC");
    let mut path = std::ffi::OsString::from(dir.path());
    path.push(":");
    path.push(&old_path);
    // SAFETY (test): this harness is single-threaded; the variables are restored below.
    std::env::set_var("PATH", &path);
    std::env::remove_var("TARTARUS_RUNSC");
    let report = lanes::probe_lane(LaneName::Gvisor, &env.config_without_runsc());
    let found = tartarus_runtime::gvisor::runsc::find(&GvisorConfig::default());
    std::env::set_var("PATH", &old_path);
    if let Some(v) = old_runsc {
        std::env::set_var("TARTARUS_RUNSC", v);
    }
    let found = found.expect("the fake runsc is found");
    assert_eq!(found.path, fake);
    assert_eq!(found.version.release, 20990101);
    let version = report.version.expect("a version");
    assert!(
        version.contains("release-20990101.0") && version.contains(&*fake.to_string_lossy()),
        "{version}"
    );
}

fn a_missing_or_old_runsc_is_one_line_naming_what_to_install(env: &Env) {
    let mut config = env.config_without_runsc();
    config.gvisor.runsc = Some("/nonexistent/runsc".into());
    let err = lanes::open(LaneName::Gvisor, &config).err().expect("refused");
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("runsc not found") && text.contains("apt-get install runsc"),
        "{text}"
    );
    let report = lanes::probe_lane(LaneName::Gvisor, &config);
    assert!(!report.available && report.reason.expect("reason").contains("apt-get install runsc"));

    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("runsc");
    std::fs::write(&old, "#!/bin/sh\necho 'runsc version release-20200101.0'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    config.gvisor.runsc = Some(old);
    let text = lanes::open(LaneName::Gvisor, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(text.contains("older than the oldest supported release"), "{text}");
    assert!("firecracker".parse::<LaneName>().is_err());
}

fn the_lane_opens_by_name_and_reports_its_platform(env: &Env) {
    let runtime = lanes::open(LaneName::Gvisor, &env.config).expect("open");
    assert_eq!(runtime.name(), "gvisor");
    let report = lanes::probe_lane(LaneName::Gvisor, &env.config);
    assert!(report.available, "{report:?}");
    let detail = report.detail.expect("detail");
    assert!(detail.starts_with("platform "), "{detail}");
    println!(
        "gvisor lane here: {} — {detail}",
        report.version.unwrap_or_default()
    );
}

impl Env {
    fn config_without_runsc(&self) -> LaneConfig {
        let mut config = self.config.clone();
        config.gvisor.runsc = None;
        config
    }
}

const CASES: &[(&str, Case)] = &[
    ("exit_codes_and_stdio", exit_codes_and_stdio),
    ("a_signal_ends_the_command", a_signal_ends_the_command),
    ("env_cwd_and_user", env_cwd_and_user),
    (
        "the_host_root_is_read_only_and_scratch_is_writable",
        the_host_root_is_read_only_and_scratch_is_writable,
    ),
    (
        "a_directory_root_is_used_read_only",
        a_directory_root_is_used_read_only,
    ),
    (
        "an_image_root_stacks_layers_and_writes_vanish",
        an_image_root_stacks_layers_and_writes_vanish,
    ),
    ("network_none_has_only_loopback", network_none_has_only_loopback),
    (
        "the_memory_limit_ends_the_sandbox_as_oom",
        the_memory_limit_ends_the_sandbox_as_oom,
    ),
    (
        "filling_tmpfs_is_charged_to_the_sandbox",
        filling_tmpfs_is_charged_to_the_sandbox,
    ),
    (
        "the_pids_limit_stops_a_fork_bomb",
        the_pids_limit_stops_a_fork_bomb,
    ),
    (
        "a_fork_bomb_stays_inside_its_parent_cgroup",
        a_fork_bomb_stays_inside_its_parent_cgroup,
    ),
    ("a_timeout_kills_and_says_so", a_timeout_kills_and_says_so),
    (
        "a_missing_command_is_127_and_a_directory_126",
        a_missing_command_is_127_and_a_directory_126,
    ),
    (
        "a_missing_mount_source_is_refused_before_anything_exists",
        a_missing_mount_source_is_refused_before_anything_exists,
    ),
    (
        "service_execs_pause_resume_and_kill",
        service_execs_pause_resume_and_kill,
    ),
    (
        "denied_syscalls_and_narrowed_writable_paths_hold_for_the_command_and_every_exec",
        denied_syscalls_and_narrowed_writable_paths_hold_for_the_command_and_every_exec,
    ),
    (
        "a_service_sandbox_with_a_main_command_ends_with_it",
        a_service_sandbox_with_a_main_command_ends_with_it,
    ),
    (
        "service_file_operations_without_a_shell",
        service_file_operations_without_a_shell,
    ),
    ("checkpoint_writes_an_image", checkpoint_writes_an_image),
    (
        "a_checkpoint_restores_into_a_new_sandbox_with_its_files",
        a_checkpoint_restores_into_a_new_sandbox_with_its_files,
    ),
    (
        "unsupported_knobs_are_refused_naming_the_lane",
        unsupported_knobs_are_refused_naming_the_lane,
    ),
    (
        "a_newer_runsc_earlier_on_path_is_the_one_used",
        a_newer_runsc_earlier_on_path_is_the_one_used,
    ),
    (
        "a_missing_or_old_runsc_is_one_line_naming_what_to_install",
        a_missing_or_old_runsc_is_one_line_naming_what_to_install,
    ),
    (
        "the_lane_opens_by_name_and_reports_its_platform",
        the_lane_opens_by_name_and_reports_its_platform,
    ),
];

fn main() -> ExitCode {
    // This executable is also the file-operation agent inside the sandboxes it starts.
    if let Some(code) = tartarus_runtime::gvisor::agent::run_if_invoked() {
        return ExitCode::from(code as u8);
    }
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&(&str, Case)> = CASES
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    // Never skip: a host without runsc or root fails here, loudly.
    assert!(
        rustix::process::geteuid().is_root(),
        "the gvisor tests need root (runsc creates namespaces and cgroups)"
    );
    let state = tempfile::Builder::new()
        .prefix("tartarus-gvisor-test")
        .tempdir()
        .unwrap();
    let cgroup_parent = format!("tartarus-test-{}", std::process::id());
    // The parent is the test's own, in every hierarchy: what the sandboxes do is seen (and bounded) there.
    let root = std::path::Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = match root.join("cgroup.controllers").exists() {
        true => vec![root.to_path_buf()],
        false => std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|h| h.path())
            .filter(|h| h.join("cgroup.procs").exists())
            .collect(),
    };
    for hierarchy in hierarchies {
        let _ = std::fs::create_dir(hierarchy.join(&cgroup_parent));
    }
    let config = LaneConfig {
        process: ProcessRuntimeConfig {
            cgroup_parent: cgroup_parent.clone(),
        },
        gvisor: GvisorConfig {
            runsc: None,
            state_dir: Some(state.path().to_path_buf()),
            platform: None,
        },
        microvm: Default::default(),
    };
    let runtime = match GvisorRuntime::open(&config) {
        Ok(runtime) => runtime,
        Err(e) => panic!("the gvisor lane cannot run here, so its tests fail: {e}"),
    };
    let env = Env {
        config,
        runtime,
        state: state.path().to_path_buf(),
        cgroup_parent: cgroup_parent.clone(),
    };
    println!(
        "running {} gvisor cases with runsc {} at {}, {}",
        selected.len(),
        env.runtime.runsc().version.text,
        env.runtime.runsc().path.display(),
        env.runtime.platform().detail
    );
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, case) in selected {
        let started = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| case(&env))) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", started.elapsed().as_secs_f64());
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    remove_cgroup_parent(&cgroup_parent);
    println!("{passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("gvisor: failed: {failed:?}");
        ExitCode::FAILURE
    }
}

fn remove_cgroup_parent(parent: &str) {
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join(parent));
    }
}
