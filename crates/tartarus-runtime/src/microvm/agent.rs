//! The guest agent: the supervisor's own static executable, PID 1 of the guest (`rdinit=`
//! [`AGENT_PATH`](super::boot::AGENT_PATH)). It mounts the pseudo filesystems, loads the kernel modules
//! from the initramfs, mounts the read-only root disk (the host's `/usr` as erofs) and scratch tmpfs,
//! finds its virtio-serial port and then serves one run over it ([`super::protocol`]): the command runs
//! with the process lane's privilege drop — uid/gid 1000, no supplementary groups, an empty capability
//! bounding set and no capabilities, `no_new_privs` and the process lane's seccomp program — so a guest
//! kernel bug is a second wall, not the only one.
//!
//! A binary that embeds the microVM lane calls [`run_if_invoked`] first thing in `main`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::mount::MountFlags;

use super::boot::{AGENT_NAME, MODULES_DIR};
use super::protocol::{
    self, decode, encode, encode_bytes, FailKind, GuestFrame, HostFrame, LineBuffer, RunRequest,
};
use crate::process::seccomp::CompiledFilters;
use crate::spec::{ProcessLimits, DEFAULT_PATH};

/// Name of the agent's virtio-serial port (`virtserialport,name=`).
pub const PORT_NAME: &str = "tartarus.agent";
/// How long devices (the root disk, the port) may take to appear once their drivers are loaded.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the command's output is still read once it exited (descendants may hold the pipes open;
/// they are killed after this).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// When this process is the guest's PID 1 started as the agent: serves the host and never returns
/// normally (PID 1 must not exit); `None` otherwise.
pub fn run_if_invoked() -> Option<i32> {
    let first = std::env::args_os().next()?;
    if Path::new(&first).file_name()? != AGENT_NAME || std::process::id() != 1 {
        return None;
    }
    if let Err(message) = boot_and_serve() {
        // The console (kernel log) is the only place left when the port is not there.
        eprintln!("tartarus guest agent: {message}");
        if let Some(mut port) = find_port()
            .ok()
            .and_then(|p| File::options().write(true).open(p).ok())
        {
            let _ = port.write_all(&encode(&GuestFrame::Fatal { message }));
        }
    }
    // The host kills the VM once it has the outcome; until then, stay PID 1.
    loop {
        let _ = tartarus_hostsys::reap_any_blocking();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn boot_and_serve() -> Result<(), String> {
    setup_filesystems()?;
    let port_path = find_port()?;
    let mut port = File::options()
        .read(true)
        .write(true)
        .open(&port_path)
        .map_err(|e| format!("opening {}: {e}", port_path.display()))?;
    let kernel = rustix::system::uname().release().to_string_lossy().into_owned();
    send(&mut port, &GuestFrame::Ready { kernel })?;
    let mut lines = LineBuffer::default();
    let request = loop {
        match read_frame(&mut port, &mut lines)? {
            Some(HostFrame::Run(request)) => break request,
            Some(_) => continue,
            None => return Ok(()),
        }
    };
    serve_run(&mut port, lines, request)
}

fn mount(source: &str, target: &str, fstype: &str, flags: MountFlags, data: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let data = std::ffi::CString::new(data).map_err(|e| e.to_string())?;
    rustix::mount::mount(source, target, fstype, flags, data.as_c_str())
        .map_err(|e| format!("mounting {fstype} on {target}: {e}"))
}

fn setup_filesystems() -> Result<(), String> {
    let secure = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    // The sandbox user sees its own processes only: not the agent, not the kernel's threads.
    mount("proc", "/proc", "proc", secure, "hidepid=invisible")?;
    mount("sysfs", "/sys", "sysfs", secure | MountFlags::RDONLY, "")?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "mode=0755",
    )?;
    // The initramfs's root directory is writable by anyone until told otherwise.
    std::fs::set_permissions("/", std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| format!("making / read-only to the sandbox user: {e}"))?;
    // A large allocation fails with ENOMEM under the default heuristic once it exceeds the guest's RAM,
    // where a host process would be OOM-killed at its cgroup's limit: the limit is the cgroup's here too.
    std::fs::write("/proc/sys/vm/overcommit_memory", "1")
        .map_err(|e| format!("setting vm.overcommit_memory: {e}"))?;
    load_modules()?;
    let disk = wait_for(|| Path::new("/dev/vda").exists().then(|| PathBuf::from("/dev/vda")))
        .ok_or("the root disk /dev/vda did not appear (is virtio_blk loaded?)")?;
    mount(
        &disk.to_string_lossy(),
        "/usr",
        "erofs",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
        "",
    )?;
    let settings = GuestSettings::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let scratch = MountFlags::NOSUID | MountFlags::NODEV;
    let size = settings
        .scratch_bytes
        .map(|b| format!(",size={b}"))
        .unwrap_or_default();
    mount("tmpfs", "/tmp", "tmpfs", scratch, &format!("mode=1777{size}"))?;
    mount("tmpfs", "/dev/shm", "tmpfs", scratch, &format!("mode=1777{size}"))?;
    mount(
        "tmpfs",
        "/home/sandbox",
        "tmpfs",
        scratch,
        &format!("mode=0700,uid=1000,gid=1000{size}"),
    )?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", secure, "")?;
    tartarus_hostsys::set_loopback_up().map_err(|e| format!("bringing loopback up: {e}"))?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        secure,
        "newinstance,ptmxmode=0666",
    )?;
    for (path, text) in [
        (
            "/etc/passwd",
            "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n",
        ),
        ("/etc/group", "root:x:0:\nsandbox:x:1000:\n"),
        ("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        ("/etc/resolv.conf", "# this sandbox has no network\n"),
    ] {
        std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))?;
    }
    let _ = std::fs::write("/etc/hostname", format!("{}\n", settings.hostname));
    let _ = rustix::system::sethostname(settings.hostname.as_bytes());
    Ok(())
}

/// What the host put on the kernel command line for the agent (`tartarus.<name>=<value>`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestSettings {
    scratch_bytes: Option<u64>,
    hostname: String,
}

impl GuestSettings {
    fn from_cmdline(cmdline: &str) -> GuestSettings {
        let value = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|arg| arg.strip_prefix(key)?.strip_prefix('='))
        };
        GuestSettings {
            scratch_bytes: value("tartarus.scratch_bytes").and_then(|v| v.parse().ok()),
            hostname: value("tartarus.hostname").unwrap_or("sandbox").to_string(),
        }
    }
}

/// The command's cgroup inside the guest: the spec's memory and pids limits exactly (the guest's RAM has a
/// floor), and the OOM count of the command alone.
const COMMAND_CGROUP: &str = "/sys/fs/cgroup/sandbox";

fn command_cgroup(request: &RunRequest) -> Result<(), String> {
    let write =
        |file: &str, text: &str| std::fs::write(file, text).map_err(|e| format!("writing {file}: {e}"));
    write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")?;
    std::fs::create_dir_all(COMMAND_CGROUP).map_err(|e| format!("creating {COMMAND_CGROUP}: {e}"))?;
    if let Some(bytes) = request.memory_bytes {
        write(&format!("{COMMAND_CGROUP}/memory.max"), &bytes.to_string())?;
        let _ = write(&format!("{COMMAND_CGROUP}/memory.swap.max"), "0");
    }
    if let Some(pids) = request.max_processes {
        write(&format!("{COMMAND_CGROUP}/pids.max"), &pids.to_string())?;
    }
    Ok(())
}

fn command_oom_kills() -> u64 {
    std::fs::read_to_string(format!("{COMMAND_CGROUP}/memory.events"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Loads the initramfs's modules in order; virtio-mmio gets the devices QEMU put on the command line
/// (`virtio_mmio.device=…`), which the kernel leaves to modprobe for a module.
fn load_modules() -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(MODULES_DIR) else {
        return Ok(());
    };
    let mut modules: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    modules.sort();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for module in modules {
        let name = module
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let short = name
            .split_once('-')
            .map_or(name.as_str(), |(_, rest)| rest)
            .trim_end_matches(".ko")
            .replace('-', "_");
        let prefix = format!("{short}.");
        let params: Vec<&str> = cmdline
            .split_whitespace()
            .filter_map(|arg| arg.strip_prefix(prefix.as_str()))
            .collect();
        let params = std::ffi::CString::new(params.join(" ")).map_err(|e| e.to_string())?;
        let file = File::open(&module).map_err(|e| format!("opening {name}: {e}"))?;
        match rustix::system::finit_module(&file, &params, 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(format!("loading kernel module {name}: {e}")),
        }
    }
    Ok(())
}

fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    loop {
        if let Some(value) = found() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/vportNpM` of the port named [`PORT_NAME`] (no udev here to make `/dev/virtio-ports/` links).
fn find_port() -> Result<PathBuf, String> {
    wait_for(|| {
        std::fs::read_dir("/sys/class/virtio-ports")
            .ok()?
            .flatten()
            .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME))
            .map(|e| Path::new("/dev").join(e.file_name()))
            .filter(|p| p.exists())
    })
    .ok_or_else(|| format!("the virtio-serial port {PORT_NAME} did not appear (is virtio_console loaded?)"))
}

fn send(port: &mut File, frame: &GuestFrame) -> Result<(), String> {
    port.write_all(&encode(frame))
        .map_err(|e| format!("writing to the host: {e}"))
}

/// The next frame from the host, blocking; `None` when the host closed the port.
fn read_frame(port: &mut File, lines: &mut LineBuffer) -> Result<Option<HostFrame>, String> {
    loop {
        let mut buf = [0u8; 4096];
        let n = port
            .read(&mut buf)
            .map_err(|e| format!("reading from the host: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        let mut frames = lines
            .push(&buf[..n])
            .map_err(|len| format!("a {len}-byte line from the host"))?;
        if !frames.is_empty() {
            let line = frames.remove(0);
            // A run request comes alone: nothing follows it before the agent answers.
            return decode(&line).map(Some).map_err(|e| e.to_string());
        }
    }
}

fn spawn(request: &RunRequest) -> Result<Child, (FailKind, String)> {
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
    command_cgroup(request).map_err(setup)?;
    let procs =
        std::ffi::CString::new(format!("{COMMAND_CGROUP}/cgroup.procs")).map_err(|e| setup(e.to_string()))?;
    let filters = CompiledFilters::build_with(&request.denied_syscalls)
        .map_err(|e| setup(format!("seccomp filter could not be built: {e}")))?;
    let last_cap = tartarus_hostsys::last_capability();
    let mut command = Command::new(&program);
    command
        .arg0(name)
        .args(&request.argv[1..])
        .env_clear()
        .envs(request.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(&request.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
    command.spawn().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => not_found(),
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => (
            FailKind::NotExecutable,
            format!("command not executable: {name}: {e}"),
        ),
        _ => setup(format!("starting the command: {e}")),
    })
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
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => return true,
            Err(_) => return false,
        }
    }
}

fn serve_run(port: &mut File, mut lines: LineBuffer, request: RunRequest) -> Result<(), String> {
    let mut child = match spawn(&request) {
        Ok(child) => child,
        Err((kind, message)) => return send(port, &GuestFrame::Failed { kind, message }),
    };
    send(port, &GuestFrame::Started)?;
    let pid = rustix::process::Pid::from_raw(child.id() as i32).ok_or("the command has no pid")?;
    let mut stdin: Option<OwnedFd> = child.stdin.take().map(OwnedFd::from);
    let mut outputs: [Option<OwnedFd>; 2] = [
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    for fd in outputs.iter().flatten().chain(stdin.iter()) {
        nonblocking(fd);
    }
    let mut pending_stdin: Vec<u8> = Vec::new();
    let mut stdin_closed = false;
    let mut status: Option<i32> = None;
    let mut exited_at: Option<Instant> = None;
    loop {
        if status.is_none() {
            while let Ok(Some((reaped, raw))) = tartarus_hostsys::reap_any() {
                if reaped == pid {
                    status = Some(raw);
                    exited_at = Some(Instant::now());
                }
            }
        }
        let outputs_open = outputs.iter().any(Option::is_some);
        if let Some(at) = exited_at {
            if !outputs_open || at.elapsed() >= DRAIN_AFTER_EXIT {
                break;
            }
        }
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(port, PollFlags::IN)];
        for fd in outputs.iter().flatten() {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let stdin_slot = fds.len();
        if let (Some(fd), false) = (&stdin, pending_stdin.is_empty()) {
            fds.push(PollFd::new(fd, PollFlags::OUT));
        }
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("polling: {e}")),
        }
        let port_ready = !fds[0].revents().is_empty();
        let stdin_ready = fds.get(stdin_slot).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        for (slot, stream) in outputs.iter_mut().zip(0..) {
            let Some(fd) = slot.as_ref() else { continue };
            let mut data = Vec::new();
            let open = drain(fd, &mut data);
            for chunk in data.chunks(protocol::CHUNK) {
                let data = encode_bytes(chunk);
                send(
                    port,
                    &match stream {
                        0 => GuestFrame::Stdout { data },
                        _ => GuestFrame::Stderr { data },
                    },
                )?;
            }
            if !open {
                *slot = None;
            }
        }
        if port_ready {
            let mut buf = [0u8; 64 << 10];
            let n = port
                .read(&mut buf)
                .map_err(|e| format!("reading from the host: {e}"))?;
            if n == 0 {
                // The host went away: nothing is left to report to.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                return Ok(());
            }
            let frames = lines
                .push(&buf[..n])
                .map_err(|len| format!("a {len}-byte line from the host"))?;
            for line in frames {
                match decode::<HostFrame>(&line).map_err(|e| e.to_string())? {
                    HostFrame::Stdin { data } => {
                        pending_stdin.extend(protocol::decode_bytes(&data).unwrap_or_default())
                    }
                    HostFrame::StdinClosed => stdin_closed = true,
                    HostFrame::Signal { signal } => {
                        if let Some(signal) = rustix::process::Signal::from_named_raw(signal) {
                            let _ = rustix::process::kill_process_group(pid, signal);
                        }
                    }
                    HostFrame::Run(_) => {}
                }
            }
        }
        if stdin_ready || (!pending_stdin.is_empty() && stdin.is_some()) {
            if let Some(fd) = &stdin {
                match rustix::io::write(fd, &pending_stdin) {
                    Ok(n) => {
                        pending_stdin.drain(..n);
                    }
                    Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
                    // The command closed its stdin: what is left is dropped, as a pipe would.
                    Err(_) => {
                        pending_stdin.clear();
                        stdin = None;
                    }
                }
            }
        }
        if stdin_closed && pending_stdin.is_empty() {
            stdin = None;
        }
    }
    // Whatever the command left running ends with it: every process but PID 1.
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    kill_all_but_init();
    let raw = status.unwrap_or(0);
    let (code, signal) = match tartarus_hostsys::ExitStatus::from_raw(raw) {
        tartarus_hostsys::ExitStatus::Exited(c) => (Some(c), None),
        tartarus_hostsys::ExitStatus::Signaled(s) => (None, Some(s)),
    };
    let oom = signal.is_some() && command_oom_kills() > 0;
    drop(stdin);
    send(port, &GuestFrame::Exit { code, signal, oom })
}

/// SIGKILL to every process of the guest but PID 1 (what `kill(-1, SIGKILL)` does from init; kernel
/// threads ignore it).
fn kill_all_but_init() {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| p > 1).and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_settings_are_read_from_the_kernel_command_line() {
        let settings = GuestSettings::from_cmdline(
            "console=ttyS0 tartarus.scratch_bytes=67108864 tartarus.hostname=box rdinit=/x",
        );
        assert_eq!(
            settings,
            GuestSettings {
                scratch_bytes: Some(64 << 20),
                hostname: "box".into()
            }
        );
        assert_eq!(GuestSettings::from_cmdline("quiet").hostname, "sandbox");
    }
}
