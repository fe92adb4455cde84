//! The microVM lane against a real QEMU and guest kernel, as root: exit codes, death by signal, stdin,
//! stdout and stderr kept apart, the host's python on the erofs root, the privilege drop inside the guest,
//! the memory limit, a timeout, a kill, a missing command, the knobs the lane refuses, and after every case
//! nothing left behind (no QEMU, no VM directory or socket, no cgroup).
//!
//! Its own `main` (`harness = false`): this executable is also the guest agent (PID 1 of each guest it
//! boots), and each boot under TCG takes seconds, so cases run one after another and are few. A missing
//! QEMU or kernel, or a non-root run, fails loudly: these tests never skip. Give a name fragment as an
//! argument to run only matching cases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tartarus_runtime::lanes::{self, LaneConfig, LaneName};
use tartarus_runtime::microvm::{MicrovmConfig, MicrovmRuntime};
use tartarus_runtime::process::ProcessRuntimeConfig;
use tartarus_runtime::{
    ExecError, ExecId, ExecRequest, ExitReason, FileErrorKind, FileOp, FileOpError, KillReason, Outcome,
    PrepareError, Runtime, Sandbox, SandboxSpec, ServiceSandbox, StartError, StdioFds, Termination,
};

struct Env {
    runtime: MicrovmRuntime,
    state: PathBuf,
    cgroup_parent: String,
}

struct Ran {
    outcome: Outcome,
    stdout: String,
    stderr: String,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

fn read_all(fd: OwnedFd) -> String {
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text).unwrap();
    text
}

fn spec(command: &[&str]) -> SandboxSpec {
    SandboxSpec::new(command.iter().map(|s| s.to_string()).collect())
}

/// Prepares and starts `spec` with `input` on its stdin (small: it fits in the pipe), waits, cleans up,
/// and returns the outcome and the output (small too: the pipes hold it until the end).
fn run_with(env: &Env, spec: SandboxSpec, input: &[u8]) -> Result<Ran, StartError> {
    let mut sandbox = env.runtime.prepare(spec).expect("prepare");
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    rustix::io::write(&stdin_write, input).unwrap();
    drop(stdin_write);
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
    let outcome = sandbox.wait().expect("wait");
    sandbox.cleanup().expect("cleanup");
    Ok(Ran {
        outcome,
        stdout: read_all(stdout_read),
        stderr: read_all(stderr_read),
    })
}

fn run(env: &Env, command: &[&str]) -> Ran {
    run_with(env, spec(command), b"").expect("start")
}

fn exit_codes_stdin_and_separate_stdout_stderr(env: &Env) {
    let ran = run_with(
        env,
        spec(&[
            "/bin/sh",
            "-c",
            "read line; echo \"out:$line\"; echo err >&2; exit 7",
        ]),
        b"hello\n",
    )
    .expect("start");
    assert_eq!(ran.outcome.termination, Termination::Exited(7));
    assert_eq!(ran.outcome.reason, ExitReason::Exited);
    assert_eq!(ran.stdout, "out:hello\n");
    assert_eq!(ran.stderr, "err\n");
}

fn death_by_signal_is_reported_as_the_signal(env: &Env) {
    let ran = run(env, &["/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGTERM));
    assert_eq!(ran.outcome.termination.exit_code(), 128 + libc::SIGTERM);
    assert_eq!(ran.outcome.reason, ExitReason::Killed);
}

fn python_runs_on_the_host_root_as_the_sandbox_user_without_privileges(env: &Env) {
    let script = "import os\n\
                  print('hi', os.getuid(), os.getgid(), os.getgroups())\n\
                  status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n\
                  print(*(status[k].strip() for k in ('CapEff', 'CapBnd', 'NoNewPrivs', 'Seccomp')))\n\
                  print(os.uname().release != open('/proc/version').read() and os.uname().release)\n\
                  try:\n    open('/usr/pwned', 'w')\nexcept OSError as e:\n    print('usr', e.errno)\n";
    let ran = run(env, &["python3", "-c", script]);
    assert_eq!(ran.outcome.termination, Termination::Exited(0), "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "hi 1000 1000 []", "{}", ran.stdout);
    assert_eq!(
        lines[1], "0000000000000000 0000000000000000 1 2",
        "no capabilities, an empty bounding set, no_new_privs, a seccomp filter"
    );
    let host_release = rustix::system::uname().release().to_string_lossy().into_owned();
    assert_ne!(lines[2], host_release, "the guest runs its own kernel");
    // Read-only file system (EROFS = 30) or permission denied (13): never written.
    assert!(lines[3] == "usr 30" || lines[3] == "usr 13", "{}", ran.stdout);
}

fn the_memory_limit_ends_in_an_oom(env: &Env) {
    let mut s = spec(&["python3", "-c", "b = bytearray(200 << 20); print('allocated')"]);
    s.limits.memory_bytes = Some(64 << 20);
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(
        ran.outcome.reason,
        ExitReason::Oom,
        "{:?} {}",
        ran.outcome,
        ran.stderr
    );
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGKILL));
    assert!(!ran.stdout.contains("allocated"));
}

fn a_timeout_stops_the_vm_with_reason_timeout(env: &Env) {
    let mut s = spec(&["/bin/sh", "-c", "trap '' TERM; sleep 60"]);
    // Long enough for the shell to set its trap under TCG.
    s.timeout = Some(Duration::from_secs(4));
    s.timeout_grace = Some(Duration::from_millis(500));
    let started = Instant::now();
    let ran = run_with(env, s, b"").expect("start");
    assert_eq!(ran.outcome.reason, ExitReason::Timeout);
    assert_eq!(ran.outcome.termination, Termination::Signaled(libc::SIGKILL));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

fn a_kill_ends_the_vm_with_reason_killed(env: &Env) {
    let mut sandbox = env
        .runtime
        .prepare_sandbox(spec(&["sleep", "60"]))
        .expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("start");
    let vmm = sandbox.vmm_pid().expect("QEMU runs");
    assert!(sandbox.boot_time().is_some_and(|t| t < Duration::from_secs(90)));
    sandbox.kill(KillReason::Requested).expect("kill");
    let outcome = sandbox.wait().expect("wait");
    assert_eq!(outcome.reason, ExitReason::Killed);
    assert_eq!(outcome.termination.exit_code(), 128 + libc::SIGKILL);
    sandbox.cleanup().expect("cleanup");
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "QEMU was reaped");
}

/// One field of `/proc/<pid>/status`.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// `command` run as QEMU's user `uid` would run it (setpriv, no groups, no capabilities).
fn as_user(uid: u32, command: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .args(command)
        .output()
        .unwrap()
}

/// A guest that escaped into its QEMU is an unprivileged user of its own, without capabilities, behind
/// QEMU's seccomp filter, without network, and unable to reach the lane's files or another VM's QEMU.
fn each_qemu_runs_as_its_own_unprivileged_user_behind_seccomp_without_network(env: &Env) {
    let start = || {
        let mut sandbox = env
            .runtime
            .prepare_sandbox(spec(&["sleep", "60"]))
            .expect("prepare");
        sandbox.start(StdioFds::inherit()).expect("start");
        let pid = sandbox.vmm_pid().expect("QEMU runs");
        (sandbox, pid)
    };
    let (mut first, first_pid) = start();
    let (mut second, second_pid) = start();
    let uid_of = |pid: u32| {
        let uids: Vec<u32> = status_field(pid, "Uid")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        assert!(
            uids.iter().all(|&u| u == uids[0]),
            "real, effective, saved and fs uids: {uids:?}"
        );
        let gids = status_field(pid, "Gid");
        assert!(
            gids.split_whitespace().all(|g| g == uids[0].to_string()),
            "gids {gids}"
        );
        uids[0]
    };
    let (first_uid, second_uid) = (uid_of(first_pid), uid_of(second_pid));
    assert_ne!(first_uid, second_uid, "each VM's QEMU has a user of its own");
    let own_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    for (pid, uid) in [(first_pid, first_uid), (second_pid, second_uid)] {
        assert!(uid >= 200_000_000, "QEMU runs as uid {uid}");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2", "QEMU's -sandbox filter");
        assert!(
            env.runtime.accel().is_kvm() != status_field(pid, "Groups").is_empty(),
            "no supplementary group but /dev/kvm's under KVM"
        );
        let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        assert_ne!(
            net, own_net,
            "QEMU has a network namespace of its own, with no interface"
        );
    }
    // As QEMU's user: no signal reaches the other VM's QEMU, and neither the lane's cache (its root disk,
    // initramfs) nor the VM directories can be opened by path.
    let signal = as_user(first_uid, &["kill", "-0", &second_pid.to_string()]);
    assert!(
        !signal.status.success(),
        "one QEMU's user signalled another VM's QEMU"
    );
    let vms = env.state.join("vms");
    for path in [vms.as_path(), Path::new("/var/cache/tartarus/microvm")] {
        let listed = as_user(first_uid, &["ls", &path.to_string_lossy()]);
        assert!(
            !listed.status.success(),
            "QEMU's user could list {}",
            path.display()
        );
    }
    for sandbox in [&mut first, &mut second] {
        sandbox.kill(KillReason::Requested).expect("kill");
        sandbox.wait().expect("ends");
        sandbox.cleanup().expect("cleanup");
    }
}

/// Two image layers as the image store leaves them (ids shifted by the process lane's base, an overlay
/// whiteout as a 0:0 character device, an opaque directory marked `user.overlay.opaque`): busybox, an
/// os-release, a file the top layer deletes, a directory it replaces, a file owned by the image's uid 1000.
fn image_layers(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let base = tartarus_runtime::process::PRIVILEGED_HOST_ID_BASE;
    let (bottom, top) = (dir.join("bottom"), dir.join("top"));
    for d in ["bin", "etc", "old", "srv"] {
        std::fs::create_dir_all(bottom.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bottom.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bottom.join("bin/sh")).unwrap();
    std::fs::write(bottom.join("etc/os-release"), "ID=tartarus-layers\n").unwrap();
    std::fs::write(bottom.join("deleted.txt"), "from the bottom layer\n").unwrap();
    std::fs::write(bottom.join("old/bottom.txt"), "hidden by the opaque directory\n").unwrap();
    std::fs::write(bottom.join("srv/data"), "the image user's\n").unwrap();
    std::fs::create_dir_all(top.join("old")).unwrap();
    std::fs::write(top.join("old/top.txt"), "top\n").unwrap();
    let whiteout = std::ffi::CString::new(top.join("deleted.txt").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mknod of a 0:0 character device is overlayfs's whiteout.
    let made = unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR, 0) };
    assert_eq!(made, 0);
    let opaque = std::ffi::CString::new(top.join("old").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated name, path and value of the given length.
    let set = unsafe {
        libc::setxattr(
            opaque.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    for layer in [&bottom, &top] {
        let chown = std::process::Command::new("chown")
            .args(["-R", "-h", &format!("{base}:{base}")])
            .arg(layer)
            .status()
            .unwrap();
        assert!(chown.success());
    }
    std::os::unix::fs::chown(bottom.join("srv/data"), Some(base + 1000), Some(base + 1000)).unwrap();
    vec![bottom, top]
}

/// An image's layers become one cached erofs disk, merged as overlayfs would (whiteouts and opaque
/// directories), with the image's own owners: the sandbox user writes what the image's uid 1000 owns
/// and not root's `/`, and every write vanishes with the VM.
fn an_image_root_is_its_layers_merged_with_their_owners_and_writes_vanish(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let layers = image_layers(dir.path());
    let image_spec = |command: &str| {
        let mut spec = spec(&["/bin/sh", "-c", command]);
        spec.root = tartarus_runtime::RootSpec::Layers(layers.clone());
        spec
    };
    let disks = || -> Vec<(PathBuf, u64)> {
        std::fs::read_dir("/var/cache/tartarus/microvm")
            .unwrap()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("image-") && name.ends_with(".erofs")
            })
            .map(|e| {
                use std::os::unix::fs::MetadataExt;
                (e.path(), e.metadata().unwrap().ino())
            })
            .collect()
    };
    let before = disks();
    let ran = run_with(
        env,
        image_spec(
            "cat /etc/os-release; ls /old; test -e /deleted.txt && echo deleted-file-seen; \
             stat -c 'data %u' /srv/data; stat -c 'busybox %u' /bin/busybox; \
             (echo written > /new.txt) 2>/dev/null || echo root-dir-not-writable; \
             echo mine >> /srv/data && echo appended; id -u; \
             test -e /usr/bin/python3 && echo host-usr-seen; true",
        ),
        b"",
    )
    .expect("runs");
    assert_eq!(ran.outcome.termination.exit_code(), 0, "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "ID=tartarus-layers",
            "top.txt",
            "data 1000",
            "busybox 0",
            "root-dir-not-writable",
            "appended",
            "1000"
        ],
        "stderr: {}",
        ran.stderr
    );
    let built: Vec<(PathBuf, u64)> = disks().into_iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(built.len(), 1, "one disk for the image: {built:?}");
    let again = run_with(env, image_spec("grep -q mine /srv/data"), b"").expect("runs");
    assert_eq!(
        again.outcome.termination.exit_code(),
        1,
        "the last VM's write is gone"
    );
    let after: Vec<(PathBuf, u64)> = disks().into_iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(after, built, "the image's disk is built once and reused");
    // A policy's narrower writable paths: /tmp only; the image's root and the home are read-only then.
    let mut narrowed = image_spec(
        "echo mine >> /srv/data 2>/dev/null; echo srv=$?; touch /tmp/x; echo tmp=$?; \
         touch $HOME/x 2>/dev/null; echo home=$?",
    );
    narrowed.writable_paths = vec!["/tmp".into()];
    let ran = run_with(env, narrowed, b"").expect("runs");
    assert_eq!(ran.stdout, "srv=1\ntmp=0\nhome=1\n", "{}", ran.stderr);
    // This test's layers are gone with its temporary directory: so goes their disk.
    std::fs::remove_file(&built[0].0).unwrap();
}

/// A terminal for the command: a pty of the guest as its stdin, stdout and stderr (whatever the
/// caller's are), its output back as stdout, and the caller's end of input as the terminal's end of file.
fn a_terminal_is_a_pty_of_the_guest(env: &Env) {
    let mut s = spec(&[
        "/bin/sh",
        "-c",
        "test -t 0 && test -t 1 && test -t 2 && tty; stty -echo; read l; echo got:$l; cat; echo eof-seen",
    ]);
    s.tty = true;
    let ran = run_with(env, s, b"hi\n").expect("runs");
    assert_eq!(ran.outcome.termination.exit_code(), 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("/dev/pts/"), "{:?}", ran.stdout);
    assert!(ran.stdout.contains("got:hi"), "{:?}", ran.stdout);
    assert!(ran.stdout.contains("eof-seen"), "{:?}", ran.stdout);
    assert_eq!(ran.stderr, "", "a terminal has one output");
}

fn a_missing_command_is_127_and_leaves_nothing(env: &Env) {
    let err = match run_with(env, spec(&["no-such-command"]), b"") {
        Err(e) => e,
        Ok(ran) => panic!("ran: {:?}", ran.outcome),
    };
    assert!(matches!(err, StartError::CommandNotFound(_)), "{err}");
    assert_eq!(err.exit_code(), 127);
}

fn what_the_lane_cannot_honour_is_refused_in_one_line(env: &Env) {
    let mut s = spec(&["/bin/true"]);
    s.root = tartarus_runtime::RootSpec::Directory("/srv".into());
    let err = env.runtime.prepare(s).err().expect("refused");
    assert_eq!(
        err.to_string(),
        "the microvm lane cannot honour a directory root (root: directory)"
    );
    let mut s = spec(&[]);
    s.network = tartarus_runtime::NetworkMode::HostLoopback;
    let err = env.runtime.prepare_service(s).err().expect("refused");
    assert!(matches!(err, PrepareError::Unsupported(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "the microvm lane cannot honour host loopback networking (network: host-loopback)"
    );
}

/// An exec's end and everything it wrote (read by threads, so a large output never blocks the test).
struct Execd {
    termination: Termination,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn reader(fd: OwnedFd) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut bytes).unwrap();
        bytes
    })
}

/// Starts `command` in `sandbox` with `input` on its stdin; the id and the readers of its output.
fn start_exec(
    sandbox: &mut dyn ServiceSandbox,
    command: &[&str],
    input: &[u8],
) -> Result<(ExecId, OwnedFd, OwnedFd), ExecError> {
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let request = ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hello".into())],
        workdir: None,
    };
    let id = sandbox.exec(
        &request,
        StdioFds {
            stdin: stdin_read.as_fd(),
            stdout: stdout_write.as_fd(),
            stderr: stderr_write.as_fd(),
        },
    )?;
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = std::fs::File::from(stdin_write).write_all(&input);
    });
    Ok((id, stdout_read, stderr_read))
}

fn exec_in(sandbox: &mut dyn ServiceSandbox, command: &[&str], input: &[u8]) -> Execd {
    let (id, stdout, stderr) = start_exec(sandbox, command, input).expect("exec starts");
    let (stdout, stderr) = (reader(stdout), reader(stderr));
    let termination = sandbox
        .wait_exec(id, Some(Duration::from_secs(120)))
        .expect("wait")
        .expect("the exec ended in time");
    Execd {
        termination,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs a file operation with `input`; its outcome and stdout.
fn file_op(sandbox: &mut dyn ServiceSandbox, op: FileOp, input: &[u8]) -> (Result<(), FileOpError>, Vec<u8>) {
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let id = sandbox
        .start_file_op(
            &op,
            StdioFds {
                stdin: stdin_read.as_fd(),
                stdout: stdout_write.as_fd(),
                stderr: stderr_write.as_fd(),
            },
        )
        .expect("file operation starts");
    drop((stdin_read, stdout_write, stderr_write));
    let input = input.to_vec();
    std::thread::spawn(move || {
        let _ = std::fs::File::from(stdin_write).write_all(&input);
    });
    let (stdout, stderr) = (reader(stdout_read), reader(stderr_read));
    let termination = sandbox
        .wait_exec(id, Some(Duration::from_secs(120)))
        .expect("wait")
        .expect("ended in time");
    let stderr = stderr.join().unwrap();
    (
        tartarus_runtime::files::decode_outcome(termination, &stderr),
        stdout.join().unwrap(),
    )
}

/// An echo service inside the guest, on its loopback only, reached through `connect_port`: several
/// connections in turn, 2 MiB each way through the channel's flow control, a refused port, and no exec
/// of the connector left for the caller to collect.
fn a_port_inside_the_guest_is_reached_through_connect_port(env: &Env) {
    use std::io::BufRead;
    let mut sandbox = service_sandbox(env, spec(&[]));
    let sandbox = sandbox.as_mut();
    let echo = "import socket\n\
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                s.bind(('127.0.0.1', 8123)); s.listen(8); print('listening', flush=True)\n\
                while True:\n\
                \x20   c, _ = s.accept()\n\
                \x20   while (d := c.recv(65536)): c.sendall(d)\n\
                \x20   c.close()\n";
    let (server, stdout, _stderr) =
        start_exec(sandbox, &["python3", "-c", echo], b"").expect("server starts");
    let mut line = String::new();
    std::io::BufReader::new(std::fs::File::from(stdout))
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "listening\n");
    for round in 0..3 {
        let fd = sandbox.connect_port(8123).expect("connects");
        let stream = std::os::unix::net::UnixStream::from(fd);
        let payload: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 253) as u8 ^ round).collect();
        let mut writer = stream.try_clone().unwrap();
        let sent = payload.clone();
        let writing = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut echoed = Vec::new();
        (&stream).read_to_end(&mut echoed).unwrap();
        writing.join().unwrap();
        assert!(
            echoed == payload,
            "round {round}: {} of {} bytes came back",
            echoed.len(),
            payload.len()
        );
    }
    match sandbox.connect_port(8124) {
        Err(tartarus_runtime::ServiceError::Connect { port: 8124, source }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused, "{source}");
        }
        other => panic!("nothing listens on 8124: {other:?}"),
    }
    // The connectors' ends are nobody's to collect: only the server's will be.
    let events = sandbox
        .exec_event_fd()
        .expect("a service sandbox has the descriptor");
    let mut fds = [rustix::event::PollFd::new(&events, rustix::event::PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    assert_eq!(
        rustix::event::poll(&mut fds, Some(&zero)).unwrap(),
        0,
        "an exec end is pending"
    );
    sandbox.kill_exec(server).expect("kill the server");
    sandbox
        .wait_exec(server, Some(Duration::from_secs(30)))
        .expect("wait")
        .expect("the server ended");
    sandbox.kill(KillReason::Requested).expect("kill");
    sandbox.wait().expect("ends");
    sandbox.cleanup().expect("cleanup");
}

fn service_sandbox(env: &Env, spec: SandboxSpec) -> Box<dyn ServiceSandbox> {
    let mut sandbox = env.runtime.prepare_service(spec).expect("prepare");
    sandbox.start(StdioFds::inherit()).expect("boots");
    sandbox
}

/// One booted VM serves these checks in turn (a TCG boot takes seconds); each check leaves the sandbox as
/// it found it.
fn a_service_sandbox_serves_execs_and_files_behind_the_same_walls(env: &Env) {
    let mut sandbox = service_sandbox(env, spec(&[]));
    let sandbox = sandbox.as_mut();
    // An exec: stdin in, stdout and stderr apart, its exit code, the sandbox's environment and the request's.
    let ran = exec_in(
        sandbox,
        &[
            "/bin/sh",
            "-c",
            "read l; echo \"$GREETING:$l:$(id -u):$PWD\"; echo err >&2; exit 3",
        ],
        b"world\n",
    );
    assert_eq!(ran.termination, Termination::Exited(3));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hello:world:1000:/home/sandbox\n"
    );
    assert_eq!(String::from_utf8_lossy(&ran.stderr), "err\n");
    // The same privilege drop as the main command.
    let ran = exec_in(
        sandbox,
        &[
            "/bin/sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t' ' '",
        ],
        b"",
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "CapEff: 0000000000000000\nCapBnd: 0000000000000000\nNoNewPrivs: 1\nSeccomp: 2\n"
    );
    // A missing command is refused with a shell's code; the sandbox still serves.
    let err = start_exec(sandbox, &["no-such-command"], b"").expect_err("refused");
    assert_eq!(err.exit_code(), 127, "{err}");
    // Files: written, read back, listed; a path outside what the sandbox user may touch is refused.
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (written, _) = file_op(
        sandbox,
        FileOp::Write {
            path: "/home/sandbox/data.bin".into(),
        },
        &content,
    );
    written.expect("written");
    let (read, bytes) = file_op(
        sandbox,
        FileOp::Read {
            path: "/home/sandbox/data.bin".into(),
        },
        b"",
    );
    read.expect("read");
    assert!(bytes == content, "read back {} bytes", bytes.len());
    let (listed, listing) = file_op(
        sandbox,
        FileOp::List {
            path: "/home/sandbox".into(),
        },
        b"",
    );
    listed.expect("listed");
    let entries = tartarus_runtime::files::decode_listing(&listing).expect("listing");
    assert!(
        entries
            .iter()
            .any(|e| e.name == "data.bin" && e.size == content.len() as u64),
        "{entries:?}"
    );
    let (denied, _) = file_op(
        sandbox,
        FileOp::Write {
            path: "/usr/bin/pwned".into(),
        },
        b"x",
    );
    let denied = denied.expect_err("a read-only root");
    assert!(
        matches!(denied.kind, FileErrorKind::Forbidden | FileErrorKind::NotFound),
        "{denied:?}"
    );
    let ran = exec_in(sandbox, &["cat", "/home/sandbox/data.bin"], b"");
    assert!(ran.stdout == content, "the exec sees the file op's file");
    sandbox.kill(KillReason::Requested).expect("kill");
    sandbox.wait().expect("ends");
    sandbox.cleanup().expect("cleanup");
}

/// One exec whose reader does not read does not stall its neighbours, and loses nothing once read; a
/// killed exec takes everything it started (even what left its session); a paused VM runs nothing until
/// resumed; a graceful stop ends every process.
fn one_exec_never_stalls_another_and_controls_reach_the_whole_vm(env: &Env) {
    let mut sandbox = service_sandbox(env, spec(&[]));
    let sandbox = sandbox.as_mut();
    const FLOOD: usize = 6 << 20;
    let (flood, flood_out, flood_err) = start_exec(
        sandbox,
        &[
            "/bin/sh",
            "-c",
            &format!("head -c {FLOOD} /dev/zero; echo done >&2"),
        ],
        b"",
    )
    .expect("flood starts");
    // Nobody reads the flood yet: its pipe and the host's buffer fill, and the guest holds its output.
    let ran = exec_in(sandbox, &["echo", "neighbour"], b"");
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "neighbour\n");
    assert_eq!(
        sandbox.wait_exec(flood, Some(Duration::ZERO)).expect("wait"),
        None,
        "the flood cannot end while its output is unread"
    );
    let (flood_out, flood_err) = (reader(flood_out), reader(flood_err));
    let end = sandbox
        .wait_exec(flood, Some(Duration::from_secs(180)))
        .expect("wait")
        .expect("the flood ends once read");
    assert_eq!(end, Termination::Exited(0));
    assert_eq!(flood_out.join().unwrap().len(), FLOOD, "no byte lost");
    assert_eq!(flood_err.join().unwrap(), b"done\n");

    // A kill reaches a process that left the exec's session and process group.
    let (victim, out, _err) = start_exec(
        sandbox,
        &["/bin/sh", "-c", "setsid sleep 1000 & echo started; sleep 1000"],
        b"",
    )
    .expect("starts");
    let mut line = [0u8; 8];
    rustix::io::read(&out, &mut line).unwrap();
    assert_eq!(&line, b"started\n");
    sandbox.kill_exec(victim).expect("kill");
    let end = sandbox
        .wait_exec(victim, Some(Duration::from_secs(60)))
        .expect("wait")
        .expect("killed");
    assert_eq!(end, Termination::Signaled(libc::SIGKILL));
    let ran = exec_in(sandbox, &["pgrep", "-c", "sleep"], b"");
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "0\n",
        "every sleep was killed"
    );

    // Paused: execs are refused, and a running one makes no progress until the thaw.
    let (ticker, ticks, _err) = start_exec(
        sandbox,
        &["/bin/sh", "-c", "while :; do echo tick; sleep 0.05; done"],
        b"",
    )
    .expect("starts");
    let mut tick = [0u8; 5];
    rustix::io::read(&ticks, &mut tick).unwrap();
    sandbox.pause().expect("pause");
    assert!(sandbox.is_paused());
    let err = start_exec(sandbox, &["true"], b"").expect_err("refused while paused");
    assert!(err.to_string().contains("paused"), "{err}");
    // Whatever was written before the freeze is drained; after that nothing comes for a second.
    rustix::io::ioctl_fionbio(&ticks, true).unwrap();
    let mut sink = [0u8; 4096];
    while rustix::io::read(&ticks, &mut sink).is_ok_and(|n| n > 0) {}
    let mut fds = [rustix::event::PollFd::new(&ticks, rustix::event::PollFlags::IN)];
    let second = rustix::time::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    assert_eq!(
        rustix::event::poll(&mut fds, Some(&second)).unwrap(),
        0,
        "a frozen VM writes nothing"
    );
    sandbox.resume().expect("resume");
    rustix::io::ioctl_fionbio(&ticks, false).unwrap();
    rustix::io::read(&ticks, &mut tick).unwrap();
    assert_eq!(&tick, b"tick\n", "the thawed VM runs on");
    assert!(sandbox.throttle_cpu(0.5).expect("throttle"));

    // A graceful stop: SIGTERM to every process, then nothing but the agent is left.
    sandbox.terminate().expect("terminate");
    let end = sandbox
        .wait_exec(ticker, Some(Duration::from_secs(60)))
        .expect("wait")
        .expect("the ticker ended at the SIGTERM");
    assert_eq!(end, Termination::Signaled(libc::SIGTERM));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sandbox.terminated() {
        assert!(Instant::now() < deadline, "the guest never reported it was empty");
        std::thread::yield_now();
    }
    sandbox.kill(KillReason::Requested).expect("kill");
    assert_eq!(sandbox.wait().expect("ends").reason, ExitReason::Killed);
    assert!(matches!(
        start_exec(sandbox, &["true"], b""),
        Err(ExecError::NotRunning)
    ));
    sandbox.cleanup().expect("cleanup");
}

/// An exec past the sandbox's memory limit is OOM-killed inside the guest and counted; the sandbox lives.
fn an_exec_over_the_memory_limit_is_counted_and_the_sandbox_lives(env: &Env) {
    let mut s = spec(&[]);
    s.limits.memory_bytes = Some(64 << 20);
    let mut sandbox = service_sandbox(env, s);
    let sandbox = sandbox.as_mut();
    let ran = exec_in(
        sandbox,
        &["python3", "-c", "b = bytearray(200 << 20); print('allocated')"],
        b"",
    );
    assert_eq!(ran.termination, Termination::Signaled(libc::SIGKILL));
    assert!(ran.stdout.is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandbox.usage().limit_hits.oom_kills == 0 {
        assert!(Instant::now() < deadline, "the guest never reported the OOM kill");
        std::thread::yield_now();
    }
    let ran = exec_in(sandbox, &["echo", "alive"], b"");
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "alive\n");
    sandbox.kill(KillReason::Requested).expect("kill");
    sandbox.wait().expect("ends");
    sandbox.cleanup().expect("cleanup");
}

fn the_lane_opens_by_name_and_reports_qemu_and_the_accelerator(env: &Env) {
    let config = env.config();
    let report = lanes::probe_lane(LaneName::Microvm, &config);
    assert!(report.available, "{report:?}");
    assert!(
        report.version.as_deref().is_some_and(|v| v.starts_with("qemu ")),
        "{report:?}"
    );
    let detail = report.detail.unwrap_or_default();
    assert!(
        detail.contains("accel kvm") || detail.contains("warning: accel tcg"),
        "{detail}"
    );
    lanes::open(LaneName::Microvm, &config).expect("opens");
    let mut missing = config.clone();
    missing.microvm.kernel = Some("/nonexistent/vmlinuz".into());
    let err = lanes::open(LaneName::Microvm, &missing).err().expect("refused");
    assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
}

fn lane_config(state: &Path, cgroup_parent: &str) -> LaneConfig {
    LaneConfig {
        process: ProcessRuntimeConfig {
            cgroup_parent: cgroup_parent.to_string(),
        },
        microvm: MicrovmConfig {
            state_dir: Some(state.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    }
}

impl Env {
    fn config(&self) -> LaneConfig {
        lane_config(&self.state, &self.cgroup_parent)
    }

    /// What a case may have left: VM directories, QEMU processes naming them, QEMU users still taken,
    /// cgroups under the parent.
    fn leaks(&self) -> Vec<String> {
        let vms = self.state.join("vms");
        let mut leaks: Vec<String> = std::fs::read_dir(&vms)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| format!("VM directory {}", e.path().display()))
            .collect();
        leaks.extend(
            std::fs::read_dir(self.state.join("vmm-users"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| format!("QEMU user {}", e.file_name().to_string_lossy())),
        );
        let needle = vms.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                leaks.push(format!("process {}", entry.file_name().to_string_lossy()));
            }
        }
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = hierarchy.path().join(&self.cgroup_parent);
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    leaks.push(format!("cgroup {}", child.path().display()));
                }
            }
        }
        leaks
    }
}

type Case = fn(&Env);

const CASES: &[(&str, Case)] = &[
    (
        "what_the_lane_cannot_honour_is_refused_in_one_line",
        what_the_lane_cannot_honour_is_refused_in_one_line,
    ),
    (
        "the_lane_opens_by_name_and_reports_qemu_and_the_accelerator",
        the_lane_opens_by_name_and_reports_qemu_and_the_accelerator,
    ),
    (
        "exit_codes_stdin_and_separate_stdout_stderr",
        exit_codes_stdin_and_separate_stdout_stderr,
    ),
    (
        "death_by_signal_is_reported_as_the_signal",
        death_by_signal_is_reported_as_the_signal,
    ),
    (
        "python_runs_on_the_host_root_as_the_sandbox_user_without_privileges",
        python_runs_on_the_host_root_as_the_sandbox_user_without_privileges,
    ),
    ("the_memory_limit_ends_in_an_oom", the_memory_limit_ends_in_an_oom),
    (
        "a_timeout_stops_the_vm_with_reason_timeout",
        a_timeout_stops_the_vm_with_reason_timeout,
    ),
    (
        "a_kill_ends_the_vm_with_reason_killed",
        a_kill_ends_the_vm_with_reason_killed,
    ),
    (
        "a_missing_command_is_127_and_leaves_nothing",
        a_missing_command_is_127_and_leaves_nothing,
    ),
    (
        "a_terminal_is_a_pty_of_the_guest",
        a_terminal_is_a_pty_of_the_guest,
    ),
    (
        "an_image_root_is_its_layers_merged_with_their_owners_and_writes_vanish",
        an_image_root_is_its_layers_merged_with_their_owners_and_writes_vanish,
    ),
    (
        "each_qemu_runs_as_its_own_unprivileged_user_behind_seccomp_without_network",
        each_qemu_runs_as_its_own_unprivileged_user_behind_seccomp_without_network,
    ),
    (
        "a_service_sandbox_serves_execs_and_files_behind_the_same_walls",
        a_service_sandbox_serves_execs_and_files_behind_the_same_walls,
    ),
    (
        "one_exec_never_stalls_another_and_controls_reach_the_whole_vm",
        one_exec_never_stalls_another_and_controls_reach_the_whole_vm,
    ),
    (
        "an_exec_over_the_memory_limit_is_counted_and_the_sandbox_lives",
        an_exec_over_the_memory_limit_is_counted_and_the_sandbox_lives,
    ),
    (
        "a_port_inside_the_guest_is_reached_through_connect_port",
        a_port_inside_the_guest_is_reached_through_connect_port,
    ),
];

/// `TARTARUS_MICROVM_BENCH=N`: instead of the cases, N cold boots of `echo hi`, timing QEMU's start to
/// the agent's `ready` (boot), prepare to the first byte of output (create→first output) and the whole
/// run (docs/benchmarks.md).
fn bench(env: &Env, runs: usize) {
    let (mut boots, mut firsts, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let begun = Instant::now();
        let mut sandbox = env
            .runtime
            .prepare_sandbox(spec(&["echo", "hi"]))
            .expect("prepare");
        let (stdout_read, stdout_write) = pipe();
        let null = std::fs::File::open("/dev/null").unwrap();
        sandbox
            .start(StdioFds {
                stdin: null.as_fd(),
                stdout: stdout_write.as_fd(),
                stderr: null.as_fd(),
            })
            .expect("start");
        drop(stdout_write);
        let mut byte = [0u8; 1];
        rustix::io::read(&stdout_read, &mut byte).unwrap();
        firsts.push(begun.elapsed());
        sandbox.wait().expect("wait");
        boots.push(sandbox.boot_time().expect("booted"));
        sandbox.cleanup().expect("cleanup");
        totals.push(begun.elapsed());
    }
    let show = |name: &str, mut times: Vec<Duration>| {
        times.sort();
        let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
        println!(
            "{name}: p50 {:.0} ms, p99 {:.0} ms, min {:.0} ms ({} runs)",
            at(0.5),
            at(0.99),
            at(0.0),
            times.len()
        );
    };
    show("boot (QEMU start to agent ready)", boots);
    show("create to first output", firsts);
    show("whole run (prepare to cleanup)", totals);
}

fn main() -> ExitCode {
    // This executable is also the guest agent: PID 1 of every VM it boots, and the file-operation agent
    // its service sandboxes run.
    if let Some(code) = tartarus_runtime::microvm::agent::run_if_invoked() {
        return ExitCode::from(code as u8);
    }
    if let Some(code) = tartarus_runtime::gvisor::agent::run_if_invoked() {
        return ExitCode::from(code as u8);
    }
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&(&str, Case)> = CASES
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    // Never skip: a host without QEMU, a kernel or root fails here, loudly.
    assert!(
        rustix::process::geteuid().is_root(),
        "the microvm tests need root (cgroups for QEMU)"
    );
    let state = tempfile::Builder::new()
        .prefix("tartarus-microvm-test")
        .tempdir()
        .unwrap();
    let cgroup_parent = format!("tartarus-test-mvm-{}", std::process::id());
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if hierarchy.path().join("cgroup.procs").exists() {
            let _ = std::fs::create_dir(hierarchy.path().join(&cgroup_parent));
        }
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let _ = std::fs::create_dir(Path::new("/sys/fs/cgroup").join(&cgroup_parent));
    }
    let env = Env {
        runtime: match MicrovmRuntime::open(&lane_config(state.path(), &cgroup_parent)) {
            Ok(runtime) => runtime,
            Err(e) => panic!("the microvm lane cannot run here, so its tests fail: {e}"),
        },
        state: state.path().to_path_buf(),
        cgroup_parent: cgroup_parent.clone(),
    };
    if let Some(runs) = std::env::var("TARTARUS_MICROVM_BENCH")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        bench(&env, runs);
        remove_cgroup_parent(&cgroup_parent);
        return ExitCode::SUCCESS;
    }
    println!(
        "running {} microvm cases with qemu {}, kernel {}, {}",
        selected.len(),
        env.runtime.qemu().version,
        env.runtime.kernel().path.display(),
        env.runtime.accel().detail()
    );
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, case) in selected {
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| case(&env)));
        let leaks = env.leaks();
        match (result, leaks.is_empty()) {
            (Ok(()), true) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", started.elapsed().as_secs_f64());
            }
            (result, _) => {
                if !leaks.is_empty() {
                    println!("{name} left behind: {leaks:#?}");
                }
                println!(
                    "test {name} ... FAILED{}",
                    if result.is_ok() { " (leaks)" } else { "" }
                );
                failed.push(*name);
            }
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join(&cgroup_parent));
    }
    println!("{passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("microvm: failed: {failed:?}");
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
