//! The agent's exec loop: starts the host's execs behind the process lane's privilege drop, each in a
//! cgroup of its own under the sandbox's (`/sys/fs/cgroup/sandbox/exec-<id>`: the sandbox's memory and
//! pids limits cover them all; killing one exec kills everything it started through `cgroup.kill`), and
//! carries their stdio over the port until each ends.
//!
//! Single-threaded (PID 1 forks the commands): one `poll` over the port, every exec's pidfd, its output
//! pipes (unless the host holds them) and its stdin pipe (when bytes wait for it). An exec's end is sent
//! once its command was reaped and its output read to the end — or, when descendants keep the pipes
//! open, [`DRAIN_AFTER_EXIT`] later.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, Signal};

use super::super::protocol::{
    self, decode, encode_bytes, FailKind, GuestFrame, HostFrame, LineBuffer, RunRequest,
};
use super::send;
use crate::process::seccomp::CompiledFilters;
use crate::spec::{ProcessLimits, DEFAULT_PATH};

/// The sandbox's cgroup inside the guest: the spec's memory and pids limits exactly (the guest's RAM has a
/// floor), over every exec.
const SANDBOX_CGROUP: &str = "/sys/fs/cgroup/sandbox";
/// How long an exec's output is still read once its command exited (descendants may hold the pipes
/// open; they are not waited for).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// Stdin the agent holds for one exec before it asks the host to hold back.
const INPUT_HIGH: usize = 1 << 20;
/// How often the loop wakes with nothing to do: orphans are reaped and the limit counters read.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How often, after a terminate, the agent looks whether anything but itself is left.
const TERMINATE_WAKE: Duration = Duration::from_millis(50);

/// Creates the sandbox's cgroup with its limits (at boot, before any exec).
pub(super) fn sandbox_cgroup(memory_bytes: Option<u64>, max_processes: Option<u64>) -> Result<(), String> {
    let write =
        |file: &str, text: &str| std::fs::write(file, text).map_err(|e| format!("writing {file}: {e}"));
    write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")?;
    std::fs::create_dir_all(SANDBOX_CGROUP).map_err(|e| format!("creating {SANDBOX_CGROUP}: {e}"))?;
    write(
        &format!("{SANDBOX_CGROUP}/cgroup.subtree_control"),
        "+memory +pids",
    )?;
    if let Some(bytes) = memory_bytes {
        write(&format!("{SANDBOX_CGROUP}/memory.max"), &bytes.to_string())?;
        let _ = write(&format!("{SANDBOX_CGROUP}/memory.swap.max"), "0");
    }
    if let Some(pids) = max_processes {
        write(&format!("{SANDBOX_CGROUP}/pids.max"), &pids.to_string())?;
    }
    Ok(())
}

fn exec_cgroup(id: u64) -> PathBuf {
    Path::new(SANDBOX_CGROUP).join(format!("exec-{id}"))
}

/// A counter of a cgroup's events file (`memory.events`, `pids.events`; hierarchical).
fn event_count(cgroup: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(cgroup.join(file))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn sandbox_counters() -> (u64, u64) {
    let cgroup = Path::new(SANDBOX_CGROUP);
    (
        event_count(cgroup, "memory.events", "oom_kill"),
        event_count(cgroup, "pids.events", "max"),
    )
}

/// One running exec.
struct GuestExec {
    pid: Pid,
    pidfd: OwnedFd,
    stdin: Option<OwnedFd>,
    pending_stdin: Vec<u8>,
    stdin_closed: bool,
    /// The host was told to hold this exec's stdin.
    input_held: bool,
    outputs: [Option<OwnedFd>; 2],
    /// The host asked the agent to stop reading this exec's output.
    output_held: bool,
    status: Option<i32>,
    /// When the command was reaped (or, while the output was held, released).
    exited_at: Option<Instant>,
    /// The command is on a pty: `stdin` and `outputs[0]` are its master, and the end of stdin is the
    /// terminal's end-of-file character rather than a close.
    tty: bool,
}

impl GuestExec {
    fn finished(&self, now: Instant) -> bool {
        let Some(at) = self.exited_at else {
            return false;
        };
        !self.output_held && (self.outputs.iter().all(Option::is_none) || now >= at + DRAIN_AFTER_EXIT)
    }
}

fn nonblocking(fd: impl AsFd) {
    let _ = rustix::io::ioctl_fionbio(fd, true);
}

/// Reads what is there; `false` at EOF or on error.
fn drain(fd: &OwnedFd, out: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; protocol::CHUNK];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One exec's flood does not starve the others: the rest is read on the next turn.
                if out.len() >= 4 * protocol::CHUNK {
                    return true;
                }
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => return true,
            Err(_) => return false,
        }
    }
}

/// Serves the host's execs until it closes the port.
pub(super) fn serve(port: &mut File) -> Result<(), String> {
    let mut lines = LineBuffer::default();
    let mut execs: BTreeMap<u64, GuestExec> = BTreeMap::new();
    let mut counters = (0, 0);
    let mut terminating = false;
    loop {
        // Reap every child: the execs' commands, and orphans that were reparented to PID 1.
        while let Ok(Some((reaped, raw))) = tartarus_hostsys::reap_any() {
            if let Some(exec) = execs.values_mut().find(|e| e.pid == reaped && e.status.is_none()) {
                exec.status = Some(raw);
                exec.exited_at = Some(Instant::now());
            }
        }
        let now = Instant::now();
        let ended: Vec<u64> = execs
            .iter()
            .filter(|(_, e)| e.finished(now))
            .map(|(&id, _)| id)
            .collect();
        for id in ended {
            if let Some(exec) = execs.remove(&id) {
                finish(port, id, exec)?;
            }
        }
        let now_counters = sandbox_counters();
        if now_counters != counters {
            counters = now_counters;
            send(
                port,
                &GuestFrame::Usage {
                    oom_kills: counters.0,
                    pids_limit_hits: counters.1,
                },
            )?;
        }
        // Only once every exec's end (and the output before it) has gone out: the host stops the VM at this.
        if terminating && execs.is_empty() && !other_processes_left() {
            terminating = false;
            send(port, &GuestFrame::Terminated)?;
        }
        let wake = execs
            .values()
            .filter(|e| !e.output_held)
            .filter_map(|e| e.exited_at.map(|at| at + DRAIN_AFTER_EXIT))
            .min()
            .map(|at| at.saturating_duration_since(now))
            .unwrap_or(IDLE_WAKE)
            .min(if terminating { TERMINATE_WAKE } else { IDLE_WAKE });
        let port_ready = {
            let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(&*port, PollFlags::IN)];
            for exec in execs.values() {
                if exec.status.is_none() {
                    fds.push(PollFd::new(&exec.pidfd, PollFlags::IN));
                }
                if !exec.output_held {
                    for fd in exec.outputs.iter().flatten() {
                        fds.push(PollFd::new(fd, PollFlags::IN));
                    }
                }
                if let (Some(fd), false) = (&exec.stdin, exec.pending_stdin.is_empty()) {
                    fds.push(PollFd::new(fd, PollFlags::OUT));
                }
            }
            let timeout = rustix::time::Timespec {
                tv_sec: wake.as_secs() as i64,
                tv_nsec: wake.subsec_nanos() as i64,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("polling: {e}")),
            }
            !fds[0].revents().is_empty()
        };
        for (&id, exec) in execs.iter_mut() {
            pump_output(port, id, exec)?;
            feed_stdin(port, id, exec)?;
        }
        if port_ready {
            let mut buf = [0u8; 64 << 10];
            let n = port
                .read(&mut buf)
                .map_err(|e| format!("reading from the host: {e}"))?;
            if n == 0 {
                // The host went away: nothing is left to report to.
                kill_all_but_init(Signal::KILL);
                return Ok(());
            }
            let frames = lines
                .push(&buf[..n])
                .map_err(|len| format!("a {len}-byte line from the host"))?;
            for line in frames {
                let frame = decode::<HostFrame>(&line).map_err(|e| e.to_string())?;
                if matches!(frame, HostFrame::Terminate) {
                    terminating = true;
                }
                handle(port, &mut execs, frame)?;
            }
        }
    }
}

fn handle(port: &mut File, execs: &mut BTreeMap<u64, GuestExec>, frame: HostFrame) -> Result<(), String> {
    match frame {
        HostFrame::Exec { id, run } => {
            if execs.contains_key(&id) {
                let message = format!("exec id {id} is in use");
                return send(
                    port,
                    &GuestFrame::Failed {
                        id,
                        kind: FailKind::Setup,
                        message,
                    },
                );
            }
            match spawn(id, &run) {
                Ok(exec) => {
                    execs.insert(id, exec);
                    send(port, &GuestFrame::Started { id })
                }
                Err((kind, message)) => send(port, &GuestFrame::Failed { id, kind, message }),
            }
        }
        HostFrame::Stdin { id, data } => {
            if let Some(exec) = execs.get_mut(&id) {
                if exec.stdin.is_some() {
                    exec.pending_stdin
                        .extend(protocol::decode_bytes(&data).unwrap_or_default());
                }
                if exec.pending_stdin.len() > INPUT_HIGH && !exec.input_held {
                    exec.input_held = true;
                    send(port, &GuestFrame::HoldInput { id })?;
                }
            }
            Ok(())
        }
        HostFrame::StdinClosed { id } => {
            if let Some(exec) = execs.get_mut(&id) {
                exec.stdin_closed = true;
                if exec.pending_stdin.is_empty() {
                    close_stdin(exec);
                }
            }
            Ok(())
        }
        HostFrame::Signal { id, signal } => {
            if let (Some(exec), Some(signal)) = (execs.get(&id), Signal::from_named_raw(signal)) {
                if exec.status.is_none() {
                    let _ = rustix::process::kill_process_group(exec.pid, signal);
                }
            }
            Ok(())
        }
        HostFrame::Kill { id } => {
            if let Some(exec) = execs.get(&id) {
                // Everything the exec started, wherever it moved its session; its process group when the
                // kernel has no cgroup.kill.
                if std::fs::write(exec_cgroup(id).join("cgroup.kill"), "1").is_err() && exec.status.is_none()
                {
                    let _ = rustix::process::kill_process_group(exec.pid, Signal::KILL);
                }
            }
            Ok(())
        }
        HostFrame::Terminate => {
            kill_all_but_init(Signal::TERM);
            Ok(())
        }
        HostFrame::HoldOutput { id } => {
            if let Some(exec) = execs.get_mut(&id) {
                exec.output_held = true;
            }
            Ok(())
        }
        HostFrame::ReleaseOutput { id } => {
            if let Some(exec) = execs.get_mut(&id) {
                exec.output_held = false;
                // The drain after the exit counts from now: what the command wrote is still read.
                if exec.exited_at.is_some() {
                    exec.exited_at = Some(Instant::now());
                }
            }
            Ok(())
        }
    }
}

/// Sends what the exec's pipes hold (unless the host holds them).
fn pump_output(port: &mut File, id: u64, exec: &mut GuestExec) -> Result<(), String> {
    if exec.output_held {
        return Ok(());
    }
    for (slot, stream) in exec.outputs.iter_mut().zip(0..) {
        let Some(fd) = slot.as_ref() else { continue };
        let mut data = Vec::new();
        let open = drain(fd, &mut data);
        for chunk in data.chunks(protocol::CHUNK) {
            let data = encode_bytes(chunk);
            send(
                port,
                &match stream {
                    0 => GuestFrame::Stdout { id, data },
                    _ => GuestFrame::Stderr { id, data },
                },
            )?;
        }
        if !open {
            *slot = None;
        }
    }
    Ok(())
}

/// Writes what stdin bytes the command takes; releases the host's stdin once they are all written.
fn feed_stdin(port: &mut File, id: u64, exec: &mut GuestExec) -> Result<(), String> {
    if let (Some(fd), false) = (&exec.stdin, exec.pending_stdin.is_empty()) {
        match rustix::io::write(fd, &exec.pending_stdin) {
            Ok(n) => {
                exec.pending_stdin.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            // The command closed its stdin: what is left is dropped, as a pipe would.
            Err(_) => {
                exec.pending_stdin.clear();
                exec.stdin = None;
            }
        }
    }
    if exec.pending_stdin.is_empty() {
        if exec.stdin_closed {
            close_stdin(exec);
        }
        if exec.input_held {
            exec.input_held = false;
            send(port, &GuestFrame::ReleaseInput { id })?;
        }
    }
    Ok(())
}

/// The host's stdin ended and everything before its end was written: a pipe is closed; a terminal gets
/// its end-of-file character (VEOF: closing a master is no end of file for the reader at the slave).
fn close_stdin(exec: &mut GuestExec) {
    if let (true, Some(fd)) = (exec.tty, exec.stdin.as_ref()) {
        let _ = rustix::io::write(fd, &[0x04]);
    }
    exec.stdin = None;
}

/// Reports an exec's end and removes its cgroup (unless processes it left behind still run there).
fn finish(port: &mut File, id: u64, exec: GuestExec) -> Result<(), String> {
    let raw = exec.status.unwrap_or(0);
    let (code, signal) = match tartarus_hostsys::ExitStatus::from_raw(raw) {
        tartarus_hostsys::ExitStatus::Exited(c) => (Some(c), None),
        tartarus_hostsys::ExitStatus::Signaled(s) => (None, Some(s)),
    };
    let cgroup = exec_cgroup(id);
    let oom = signal.is_some() && event_count(&cgroup, "memory.events", "oom_kill") > 0;
    drop(exec);
    let _ = std::fs::remove_dir(&cgroup);
    send(
        port,
        &GuestFrame::Exit {
            id,
            code,
            signal,
            oom,
        },
    )
}

fn spawn(id: u64, request: &RunRequest) -> Result<GuestExec, (FailKind, String)> {
    let setup = |message: String| (FailKind::Setup, message);
    if !Path::new(&request.cwd).is_dir() {
        return Err(setup(format!("entering working directory {}", request.cwd)));
    }
    let name = request
        .argv
        .first()
        .ok_or_else(|| setup("empty command".into()))?;
    let not_found = || {
        (
            FailKind::NotFound,
            format!("command not found: {name} (not in the sandbox's PATH or root)"),
        )
    };
    let program = match name.contains('/') {
        true => PathBuf::from(name),
        false => {
            let path = request
                .env
                .iter()
                .find_map(|kv| kv.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            std::env::split_paths(path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
                .ok_or_else(not_found)?
        }
    };
    let cgroup = exec_cgroup(id);
    std::fs::create_dir_all(&cgroup).map_err(|e| setup(format!("creating {}: {e}", cgroup.display())))?;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
        .map_err(|e| setup(e.to_string()))?;
    let filters = CompiledFilters::build_with(&request.denied_syscalls)
        .map_err(|e| setup(format!("seccomp filter could not be built: {e}")))?;
    let last_cap = tartarus_hostsys::last_capability();
    let mut command = Command::new(&program);
    command
        .arg0(name)
        .args(&request.argv[1..])
        .env_clear()
        .envs(request.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(&request.cwd);
    let terminal = match request.tty {
        true => Some(open_terminal(request.tty_size).map_err(|e| setup(format!("opening a terminal: {e}")))?),
        false => None,
    };
    match &terminal {
        Some((_, slave)) => {
            let stdio = |what| {
                slave
                    .try_clone()
                    .map(Stdio::from)
                    .map_err(|e| setup(format!("passing the terminal as {what}: {e}")))
            };
            command
                .stdin(stdio("stdin")?)
                .stdout(stdio("stdout")?)
                .stderr(stdio("stderr")?);
        }
        None => {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let tty = terminal.is_some();
    tartarus_hostsys::join_cgroup_before_exec(&mut command, procs);
    let (uid, gid) = (request.uid, request.gid);
    let limits = (
        ProcessLimits {
            open_files: request.open_files,
            file_size_bytes: request.file_size_bytes,
        },
        request.max_processes,
    );
    let drop_privileges = move || -> io::Result<()> {
        rustix::process::setsid()?;
        if tty {
            // The terminal (stdin) becomes the new session's controlling terminal.
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
        }
        crate::process::child::set_rlimits(&limits.0, limits.1).map_err(|e| e.source)?;
        for cap in 0..=last_cap {
            tartarus_hostsys::drop_bounding_capability(cap)?;
        }
        rustix::thread::clear_ambient_capability_set()?;
        rustix::thread::set_thread_groups(&[])?;
        let g = rustix::process::Gid::from_raw(gid);
        rustix::thread::set_thread_res_gid(g, g, g)?;
        let u = rustix::process::Uid::from_raw(uid);
        rustix::thread::set_thread_res_uid(u, u, u)?;
        let none = rustix::thread::CapabilitySets {
            effective: rustix::thread::CapabilitySet::empty(),
            permitted: rustix::thread::CapabilitySet::empty(),
            inheritable: rustix::thread::CapabilitySet::empty(),
        };
        rustix::thread::set_capabilities(None, none)?;
        // Last: sets no_new_privs, and nothing after it but the execve is on the deny list.
        filters.apply().map_err(io::Error::other)
    };
    // SAFETY: the agent is single-threaded (PID 1 of the guest, no threads started), so the forked child
    // may run this closure: raw syscalls through rustix on values moved in, and seccompiler's install of
    // an already compiled program.
    unsafe {
        command.pre_exec(drop_privileges);
    }
    let mut child = command.spawn().map_err(|e| {
        let _ = std::fs::remove_dir(&cgroup);
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => not_found(),
            Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => (
                FailKind::NotExecutable,
                format!("command not executable: {name}: {e}"),
            ),
            _ => setup(format!("starting the command: {e}")),
        }
    })?;
    let pid = Pid::from_child(&child);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).map_err(|e| {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        setup(format!("watching the command: {e}"))
    })?;
    let (stdin, outputs) = match terminal {
        Some((master, slave)) => {
            // The agent keeps no slave open: the master's end of file (EIO) comes with the last holder.
            drop(slave);
            let reader = master
                .try_clone()
                .map_err(|e| setup(format!("reading the terminal: {e}")))?;
            (Some(master), [Some(reader), None])
        }
        None => (
            child.stdin.take().map(OwnedFd::from),
            [
                child.stdout.take().map(OwnedFd::from),
                child.stderr.take().map(OwnedFd::from),
            ],
        ),
    };
    for fd in outputs.iter().flatten().chain(stdin.iter()) {
        nonblocking(fd);
    }
    Ok(GuestExec {
        pid,
        pidfd,
        stdin,
        pending_stdin: Vec::new(),
        stdin_closed: false,
        input_held: false,
        outputs,
        output_held: false,
        status: None,
        exited_at: None,
        tty,
    })
}

/// A new pty of the guest's devpts instance, of `size` (rows, columns) when known: master and slave.
fn open_terminal(size: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags};
    let master = rustix::fs::open(
        "/dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if let Some((rows, cols)) = size {
        let winsize = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, winsize)?;
    }
    Ok((master, slave))
}

/// The processes of the guest but PID 1 (kernel threads have no executable and are left out).
fn other_processes() -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            (pid > 1 && std::fs::read_link(entry.path().join("exe")).is_ok())
                .then_some(())
                .and_then(|()| Pid::from_raw(pid))
        })
        .collect()
}

fn other_processes_left() -> bool {
    // Zombies not yet reaped have no executable either: they do not count.
    !other_processes().is_empty()
}

/// `signal` to every process of the guest but PID 1 (what `kill(-1, sig)` does from init).
fn kill_all_but_init(signal: Signal) {
    for pid in other_processes() {
        let _ = rustix::process::kill_process(pid, signal);
    }
}
