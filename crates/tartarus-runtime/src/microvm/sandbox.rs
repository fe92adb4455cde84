//! One sandbox of the microVM lane: its VM's directory and cgroup, QEMU's start and the bounded
//! handshake, the main command through the exec multiplexer, the outcome from the agent's report, and
//! cleanup of QEMU, directory and cgroup on every path. A service sandbox's execs and controls are in
//! `service.rs`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::channel::{Channel, HandshakeError};
use super::confine::{self, Inherited, VmmUser};
use super::egress::Egress;
use super::mux::{ExecStdio, GuestExit, Mux, StartFailure};
use super::protocol::{FailKind, GuestFrame, HostFrame, RunRequest, MAIN_EXEC};
use super::qemu::{self, Accel};
use super::{boot, MicrovmRuntime};
use crate::process::cgroup::{self, SandboxCgroups};
use crate::process::{CgroupLayout, HostCgroupFs};
use crate::sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
use crate::spec::{Applied, NetworkMode, RootSpec, SandboxSpec, SANDBOX_HOME, SANDBOX_UID};

/// How long a boot may take to reach the agent's `ready`: TCG boots take seconds on a loaded host.
const BOOT_TIMEOUT_TCG: Duration = Duration::from_secs(90);
const BOOT_TIMEOUT_KVM: Duration = Duration::from_secs(15);
/// How long the agent may take to answer a run with `started` or `failed`.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Processes QEMU may have in its cgroup (vCPU and I/O threads count).
const VMM_PIDS: u64 = 64;

/// A sandbox of the microVM lane: one VM, its command (one-shot) or its execs (service).
pub struct MicrovmSandbox {
    id: String,
    pub(super) state: SandboxState,
    dir: PathBuf,
    qemu_path: PathBuf,
    qemu_args: Vec<std::ffi::OsString>,
    /// QEMU runs on KVM (it gets `/dev/kvm`'s group).
    kvm: bool,
    boot_timeout: Duration,
    /// The main command (empty for a service sandbox without one); execs start from its walls.
    pub(super) request: RunRequest,
    pub(super) spec: SandboxSpec,
    timeout: Option<Duration>,
    grace: Duration,
    pub(super) cgroups: SandboxCgroups,
    /// QEMU's own unprivileged user, released with the sandbox.
    vmm_user: VmmUser,
    /// The network namespace, veth, rules and TAP of an egress sandbox, removed with it.
    pub(super) egress: Option<Egress>,
    /// What QEMU inherits (its files and its end of the channel) until it is started.
    inherited: Option<Inherited>,
    /// The supervisor's end of the agent channel until the boot handshake takes it.
    channel: Option<UnixStream>,
    /// The caller's terminal and its settings before it was made raw (the guest's pty is the command's
    /// terminal: the caller's must pass bytes through untouched), restored at the end.
    raw_terminal: Option<(OwnedFd, rustix::termios::Termios)>,
    pub(super) running: Option<Running>,
    outcome: Option<Outcome>,
    /// From QEMU's start to the agent's `ready`.
    boot_time: Option<Duration>,
    /// The next exec id of a service sandbox (the main command is [`MAIN_EXEC`]).
    pub(super) next_exec: u64,
    pub(super) paused: bool,
}

pub(super) struct Running {
    qemu: Child,
    pidfd: OwnedFd,
    /// When the VM was ready (and the main command started): the timeout and the wall time count from
    /// here, the boot is [`MicrovmSandbox::boot_time`].
    started: Instant,
    pub(super) mux: Mux,
    killed: Option<KillReason>,
}

fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
    move |source| PrepareError::Host { what, source }
}

impl MicrovmSandbox {
    pub(super) fn prepare(
        runtime: &MicrovmRuntime,
        spec: SandboxSpec,
    ) -> Result<MicrovmSandbox, PrepareError> {
        spec.validate()?;
        runtime.supports(&spec)?;
        debug_assert!(!matches!(spec.root, RootSpec::Directory(_)));
        let boot_error = |e: boot::BootError| PrepareError::Host {
            what: "preparing the guest's boot files",
            source: io::Error::other(crate::error_chain(&e)),
        };
        let initramfs =
            boot::initramfs(&runtime.cache_dir, &runtime.agent, &runtime.modules).map_err(boot_error)?;
        let root_disk = match &spec.root {
            RootSpec::Layers(layers) => boot::image_disk(
                &runtime.cache_dir,
                layers,
                crate::process::PRIVILEGED_HOST_ID_BASE,
            ),
            _ => boot::root_image(&runtime.cache_dir),
        }
        .map_err(boot_error)?;
        let denied_syscalls = crate::process::seccomp::denied_syscall_numbers(&spec.denied_syscalls)?;
        runtime.collect_garbage();
        let id =
            tartarus_hostsys::random_hex(6).map_err(host_err("reading random bytes for the sandbox id"))?;
        let name = cgroup::cgroup_name(std::process::id(), &id);
        let dir = runtime.vms_dir.join(&name);
        std::fs::create_dir(&dir).map_err(host_err("creating the VM's directory"))?;
        let remove_dir = |e| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let vmm_user = VmmUser::allocate(&runtime.users_dir, &dir)
            .map_err(host_err("allocating QEMU's user"))
            .map_err(remove_dir)?;
        let mut inherited = Inherited::default();
        let (channel, agent_fd, kernel, initramfs, root_disk, console_log) = (|| {
            let (host_end, guest_end) = UnixStream::pair()?;
            let (agent_fd, _) = inherited.add_fd(guest_end.into());
            Ok::<_, io::Error>((
                host_end,
                agent_fd,
                inherited.add_file(&runtime.vmm_kernel)?,
                inherited.add_file(&initramfs)?,
                inherited.add_file(&root_disk)?,
                inherited.add_log(&dir.join("console.log"), vmm_user.uid)?,
            ))
        })()
        .map_err(|e| {
            vmm_user.release();
            remove_dir(host_err("opening the files QEMU uses")(e))
        })?;
        let mut egress = match &spec.network {
            NetworkMode::Egress(contract) => {
                Some(Egress::attach(&id, contract, &mut inherited).map_err(|e| {
                    vmm_user.release();
                    remove_dir(e)
                })?)
            }
            _ => None,
        };
        let limits = spec.applied_limits();
        let initramfs_bytes = std::fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0);
        let guest_mib = qemu::guest_memory_mib(limits.memory_bytes.value(), initramfs_bytes);
        // The VMM's cgroup: the guest's RAM plus QEMU's own bounded overhead, and its threads.
        let mut vmm_limits = limits;
        vmm_limits.memory_bytes = Applied::Requested((guest_mib << 20) + qemu::VMM_OVERHEAD_BYTES);
        vmm_limits.pids = Applied::Requested(VMM_PIDS);
        let layout = CgroupLayout::detect(&HostCgroupFs);
        let wanted = cgroup::wanted(&vmm_limits, true, spec.service);
        let cgroups = cgroup::create(
            &HostCgroupFs,
            &layout,
            &runtime.cgroup_parent,
            &name,
            &vmm_limits,
            &wanted,
        )
        .map_err(|e| {
            if let Some(mut egress) = egress.take() {
                let _ = egress.network.remove();
            }
            vmm_user.release();
            remove_dir(e)
        })?;
        let accel = &runtime.accel;
        let vm = qemu::VmConfig {
            accel,
            memory_bytes: guest_mib << 20,
            vcpus: qemu::vcpus(limits.cpu_quota),
            kernel: &kernel,
            initramfs: &initramfs,
            root_disk: &root_disk,
            agent_fd,
            console_log: &console_log,
            vm_dir: &dir,
        };
        let mut qemu_args = qemu::vm_args(&vm);
        append_guest_settings(&mut qemu_args, &spec, &limits, egress.as_ref());
        if let Some(egress) = &egress {
            qemu_args.extend(egress.qemu_args());
        }
        let user = spec.user.map_or((SANDBOX_UID, SANDBOX_UID), |u| (u.uid, u.gid));
        let request = RunRequest {
            argv: spec.command.clone(),
            env: environment(&spec.hostname, &[&spec.env]),
            cwd: spec
                .workdir
                .as_ref()
                .map_or_else(|| SANDBOX_HOME.to_string(), |w| w.to_string_lossy().into_owned()),
            uid: user.0,
            gid: user.1,
            denied_syscalls,
            open_files: spec.process_limits.open_files,
            file_size_bytes: spec.process_limits.file_size_bytes,
            max_processes: limits.pids.value(),
            tty: spec.tty,
            tty_size: None,
        };
        Ok(MicrovmSandbox {
            id,
            state: SandboxState::Prepared,
            dir,
            qemu_path: runtime.qemu.path.clone(),
            qemu_args,
            kvm: accel.is_kvm(),
            boot_timeout: match accel {
                Accel::Kvm => BOOT_TIMEOUT_KVM,
                Accel::Tcg { .. } => BOOT_TIMEOUT_TCG,
            },
            request,
            timeout: spec.timeout,
            grace: spec.effective_timeout_grace(),
            spec,
            cgroups,
            vmm_user,
            egress,
            inherited: Some(inherited),
            channel: Some(channel),
            raw_terminal: None,
            running: None,
            outcome: None,
            boot_time: None,
            next_exec: MAIN_EXEC + 1,
            paused: false,
        })
    }

    /// From QEMU's start to the agent's `ready` (once started).
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// The VM's QEMU process id while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.qemu.id())
    }

    /// The last lines of the guest's console and of QEMU's own output, for errors.
    fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            lines[lines.len().saturating_sub(3)..].join(" | ")
        };
        let (console, vmm) = (tail("console.log"), tail("qemu.log"));
        match (console.is_empty(), vmm.is_empty()) {
            (true, true) => "no output from the VM".to_string(),
            (false, true) => format!("guest console: {console}"),
            (true, false) => format!("qemu: {vmm}"),
            (false, false) => format!("guest console: {console}; qemu: {vmm}"),
        }
    }

    fn spawn_qemu(&mut self) -> io::Result<Child> {
        let log = std::fs::File::create(self.dir.join("qemu.log"))?;
        let mut command = Command::new(&self.qemu_path);
        command
            .args(&self.qemu_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for dir in &self.cgroups.dirs {
            let procs = std::ffi::CString::new(
                dir.path
                    .join("cgroup.procs")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .map_err(io::Error::other)?;
            tartarus_hostsys::join_cgroup_before_exec(&mut command, procs);
        }
        let inherited = self
            .inherited
            .take()
            .ok_or_else(|| io::Error::other("QEMU was started already"))?;
        let kvm_group = self.kvm.then(confine::kvm_group).flatten();
        // After the cgroup (which needs root), before the parent-death signal (which a change of
        // credentials clears).
        confine::confine_before_exec(&mut command, self.vmm_user.uid, kvm_group, &inherited);
        tartarus_hostsys::die_with_parent_before_exec(&mut command);
        // QEMU has its copies once it runs; the supervisor's are closed here.
        command.spawn()
    }

    fn start_inner(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError> {
        let host = |what: &'static str| move |source: io::Error| StartError::Host { what, source };
        let channel = self
            .channel
            .take()
            .ok_or_else(|| StartError::Protocol("the agent channel was used already".into()))?;
        let copies = ExecStdio {
            stdin: stdio.stdin.try_clone_to_owned().map_err(host("passing stdin"))?,
            stdout: stdio
                .stdout
                .try_clone_to_owned()
                .map_err(host("passing stdout"))?,
            stderr: stdio
                .stderr
                .try_clone_to_owned()
                .map_err(host("passing stderr"))?,
            // A one-shot command's descriptors are the caller's own (a terminal, say): they stay as they
            // are. A service sandbox's are the shim's, and its execs share the multiplexer.
            blocking: !self.spec.service,
        };
        if self.request.tty {
            self.take_terminal(stdio.stdin);
        }
        let started = Instant::now();
        let qemu = self.spawn_qemu().map_err(host("starting QEMU"))?;
        let pid = rustix::process::Pid::from_raw(qemu.id() as i32)
            .ok_or_else(|| StartError::Protocol("QEMU has no pid".into()))?;
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                let mut qemu = qemu;
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(host("watching QEMU")(e.into()));
            }
        };
        let deadline = started + self.boot_timeout;
        let channel = match ready(channel, pidfd.as_fd(), deadline) {
            Ok(channel) => channel,
            Err(e) => {
                kill_and_reap(qemu, &pidfd);
                return Err(self.start_error(e));
            }
        };
        self.boot_time = Some(started.elapsed());
        let mux = match Mux::start(channel) {
            Ok(mux) => mux,
            Err(e) => {
                kill_and_reap(qemu, &pidfd);
                return Err(host("starting the exec thread")(e));
            }
        };
        let mut running = Running {
            qemu,
            pidfd,
            started: Instant::now(),
            mux,
            killed: None,
        };
        if !self.request.argv.is_empty() {
            let deadline = Instant::now() + START_TIMEOUT;
            let started = running
                .mux
                .start_exec(MAIN_EXEC, self.request.clone(), copies, deadline);
            if let Err(failure) = started {
                kill_and_reap(running.qemu, &running.pidfd);
                let _ = running.mux.join();
                return Err(self.start_error(failure.into()));
            }
            running.started = Instant::now();
        }
        self.running = Some(running);
        self.state = SandboxState::Running;
        Ok(())
    }

    /// When the caller's stdin is a terminal: its size goes to the guest's pty, and it is made raw until
    /// the end, so that only the guest's line discipline echoes, edits and translates (not both).
    fn take_terminal(&mut self, stdin: BorrowedFd<'_>) {
        use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions};
        let Ok(saved) = tcgetattr(stdin) else {
            return;
        };
        self.request.tty_size = tcgetwinsize(stdin)
            .ok()
            .filter(|w| w.ws_row > 0 && w.ws_col > 0)
            .map(|w| (w.ws_row, w.ws_col));
        let mut raw = saved.clone();
        raw.make_raw();
        if let (Ok(fd), Ok(())) = (
            stdin.try_clone_to_owned(),
            tcsetattr(stdin, OptionalActions::Now, &raw),
        ) {
            self.raw_terminal = Some((fd, saved));
        }
    }

    /// Gives the caller's terminal its settings back.
    fn restore_terminal(&mut self) {
        if let Some((fd, saved)) = self.raw_terminal.take() {
            let _ = rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &saved);
        }
    }

    fn start_error(&self, e: HandshakeError) -> StartError {
        let command = self.request.argv.first().cloned().unwrap_or_default();
        match e {
            HandshakeError::Guest(GuestFrame::Failed { kind, message, .. }) => match kind {
                FailKind::NotFound => StartError::CommandNotFound(command),
                FailKind::NotExecutable => StartError::NotExecutable {
                    command,
                    source: io::Error::from_raw_os_error(libc::EACCES),
                },
                // The agent names the stage; a missing working directory is the one it checks itself.
                FailKind::Setup => StartError::Setup {
                    source: match message.starts_with("entering working directory") {
                        true => io::Error::from_raw_os_error(libc::ENOENT),
                        false => io::Error::other("in the guest"),
                    },
                    stage: message,
                },
            },
            HandshakeError::Guest(GuestFrame::Fatal { message }) => {
                StartError::Protocol(format!("the guest agent failed: {message}"))
            }
            HandshakeError::Guest(frame) => {
                StartError::Protocol(format!("unexpected frame from the guest: {frame:?}"))
            }
            HandshakeError::VmExited => StartError::Host {
                what: "the microVM ended before its agent answered",
                source: io::Error::other(self.logs()),
            },
            HandshakeError::TimedOut(what) => StartError::Host {
                what: "the microVM did not boot in time",
                source: io::Error::other(format!(
                    "no answer waiting for {what} after {}s; {}",
                    self.boot_timeout.as_secs(),
                    self.logs()
                )),
            },
            HandshakeError::Io(source) => StartError::Host {
                what: "talking to the guest agent",
                source,
            },
            HandshakeError::Protocol(message) => StartError::Protocol(message),
        }
    }

    /// Ends the VM (its main command's end is in, or it is being stopped), reaps QEMU and judges the
    /// outcome from the guest's report.
    fn collect(&mut self) -> Result<Outcome, RuntimeError> {
        let Some(running) = self.running.take() else {
            return Err(RuntimeError::State(self.state));
        };
        self.restore_terminal();
        let Running {
            qemu,
            pidfd,
            started,
            mut mux,
            killed,
        } = running;
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        let pid = rustix::process::Pid::from_raw(qemu.id() as i32);
        let exit = pid.map(tartarus_hostsys::wait_child);
        drop(qemu);
        // QEMU is gone, so the channel closed and the thread ends.
        let guest = mux.join();
        let wall = started.elapsed();
        self.state = SandboxState::Finished;
        let (cpu, max_rss) = match exit {
            Some(Ok(e)) => (e.user_cpu + e.system_cpu, e.max_rss_bytes),
            _ => (Duration::ZERO, 0),
        };
        let guest = match (guest, killed) {
            (Ok(exit), _) => exit,
            (Err(_), Some(_)) => None,
            (Err(message), None) => {
                return Err(RuntimeError::Host {
                    what: "the microVM's agent failed",
                    source: io::Error::other(message),
                })
            }
        };
        let termination = match guest {
            Some(GuestExit { signal: Some(s), .. }) => Termination::Signaled(s),
            Some(GuestExit { code, .. }) => Termination::Exited(code.unwrap_or(0)),
            None if killed.is_some() => Termination::Signaled(libc::SIGKILL),
            // The host's OOM killer ended QEMU at its cgroup's limit: the sandbox's memory, all the same.
            None if self.cgroups.oom_kills(&HostCgroupFs) > 0 => Termination::Signaled(libc::SIGKILL),
            None => {
                return Err(RuntimeError::Host {
                    what: "the microVM ended without reporting the command's exit",
                    source: io::Error::other(self.logs()),
                })
            }
        };
        let oom = guest.is_some_and(|g| g.oom) || self.cgroups.oom_kills(&HostCgroupFs) > 0;
        let reason = ExitReason::judge(killed, oom, termination);
        let outcome = Outcome {
            termination,
            reason,
            wall,
            cpu,
            peak_memory_bytes: self.cgroups.peak_memory(&HostCgroupFs).unwrap_or(max_rss),
        };
        self.outcome = Some(outcome);
        Ok(outcome)
    }

    /// Blocks until the sandbox is over (its main command ended, or the VM) or `deadline`; `true` when
    /// it is.
    fn wait_over(&self, deadline: Option<Instant>) -> Result<bool, RuntimeError> {
        let Some(running) = &self.running else {
            return Ok(true);
        };
        loop {
            if running.mux.is_over() {
                return Ok(true);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(false);
            }
            let ts = left.map(|l| rustix::time::Timespec {
                tv_sec: l.as_secs() as i64,
                tv_nsec: l.subsec_nanos() as i64,
            });
            let ended = running.mux.ended();
            let mut fds = [rustix::event::PollFd::new(&ended, rustix::event::PollFlags::IN)];
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(RuntimeError::Host {
                        what: "polling the microVM",
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn finish(&mut self) -> Result<Outcome, RuntimeError> {
        match self.running {
            Some(_) => self.collect(),
            None => self.outcome.ok_or(RuntimeError::State(self.state)),
        }
    }
}

/// A command's environment as the agent takes it (`KEY=value`): the sandbox defaults with `layers` on top.
pub(super) fn environment(hostname: &str, layers: &[&[(String, String)]]) -> Vec<String> {
    crate::gvisor::bundle::environment(hostname, layers)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Settings the agent reads from the kernel command line before any frame: scratch size, hostname, and
/// the sandbox cgroup's memory and pids limits.
fn append_guest_settings(
    args: &mut [std::ffi::OsString],
    spec: &SandboxSpec,
    limits: &crate::spec::AppliedLimits,
    egress: Option<&Egress>,
) {
    if let Some(pos) = args.iter().position(|a| a == "-append") {
        if let Some(line) = args.get_mut(pos + 1) {
            line.push(format!(
                " tartarus.scratch_bytes={} tartarus.hostname={}",
                spec.scratch_bytes, spec.hostname
            ));
            if let Some(bytes) = limits.memory_bytes.value() {
                line.push(format!(" tartarus.memory_bytes={bytes}"));
            }
            if let Some(pids) = limits.pids.value() {
                line.push(format!(" tartarus.max_processes={pids}"));
            }
            if matches!(spec.root, RootSpec::Layers(_)) {
                line.push(" tartarus.root=image");
            }
            if let Some(egress) = egress {
                line.push(egress.cmdline());
            }
            if !spec.writable_paths.is_empty() {
                let paths: Vec<String> = spec
                    .writable_paths
                    .iter()
                    .map(|p| percent_encode(&crate::spec::normalize_sandbox_path(p).to_string_lossy()))
                    .collect();
                line.push(format!(" tartarus.writable={}", paths.join(",")));
            }
        }
    }
}

/// `%`, `,` and whitespace as `%XX`, for a list on the kernel command line.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'%' | b',' => format!("%{b:02X}"),
            b if b.is_ascii_whitespace() || b.is_ascii_control() => format!("%{b:02X}"),
            b => (b as char).to_string(),
        })
        .collect()
}

/// Accepts QEMU and waits for the agent's `ready`.
fn ready(stream: UnixStream, vm: BorrowedFd<'_>, deadline: Instant) -> Result<Channel, HandshakeError> {
    let mut channel = Channel::new(stream);
    match channel.receive(vm, deadline, "the guest agent's ready")? {
        GuestFrame::Ready { .. } => Ok(channel),
        other => Err(HandshakeError::Guest(other)),
    }
}

impl From<StartFailure> for HandshakeError {
    fn from(failure: StartFailure) -> HandshakeError {
        match failure {
            StartFailure::Failed { kind, message } => HandshakeError::Guest(GuestFrame::Failed {
                id: MAIN_EXEC,
                kind,
                message,
            }),
            StartFailure::VmEnded(Some(why)) => HandshakeError::Protocol(why),
            StartFailure::VmEnded(None) => HandshakeError::VmExited,
            StartFailure::TimedOut => HandshakeError::TimedOut("the command's start"),
            StartFailure::Io(e) => HandshakeError::Io(e),
        }
    }
}

fn kill_and_reap(mut qemu: Child, pidfd: &OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
    let _ = qemu.wait();
}

impl Sandbox for MicrovmSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> SandboxState {
        self.state
    }

    fn start(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError> {
        if !self.state.can_start() {
            return Err(StartError::State(self.state));
        }
        self.start_inner(stdio)
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.running.as_ref().map(|r| r.mux.ended())
    }

    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError> {
        match &self.running {
            Some(running) if running.mux.is_over() => self.finish().map(Some),
            Some(_) => Ok(None),
            None => Ok(self.outcome),
        }
    }

    fn wait(&mut self) -> Result<Outcome, RuntimeError> {
        let Some(running) = &self.running else {
            return self.outcome.ok_or(RuntimeError::State(self.state));
        };
        let deadline = self.timeout.map(|t| running.started + t);
        if !self.wait_over(deadline)? {
            self.stop_at_timeout()?;
        }
        self.finish()
    }

    fn kill(&mut self, reason: KillReason) -> Result<(), RuntimeError> {
        let Some(running) = self.running.as_mut() else {
            return Err(RuntimeError::State(self.state));
        };
        running.killed.get_or_insert(reason);
        rustix::process::pidfd_send_signal(&running.pidfd, rustix::process::Signal::KILL).map_err(|e| {
            RuntimeError::Host {
                what: "killing QEMU",
                source: e.into(),
            }
        })
    }

    fn stop_at_timeout(&mut self) -> Result<(), RuntimeError> {
        let grace = self.grace;
        if let Some(running) = self.running.as_mut() {
            running.killed.get_or_insert(KillReason::Timeout);
            if !grace.is_zero()
                && running
                    .mux
                    .send(&HostFrame::Signal {
                        id: MAIN_EXEC,
                        signal: libc::SIGTERM,
                    })
                    .is_ok()
            {
                let deadline = Instant::now() + grace;
                if self.wait_over(Some(deadline))? {
                    return Ok(());
                }
            }
        }
        self.kill(KillReason::Timeout)
    }

    fn blocked_packets(&self) -> Option<u64> {
        self.egress.as_ref()?.network.blocked_packets().ok()
    }

    fn cleanup(&mut self) -> Result<(), RuntimeError> {
        if self.state == SandboxState::CleanedUp {
            return Ok(());
        }
        if let Some(running) = self.running.as_mut() {
            running.killed.get_or_insert(KillReason::Requested);
            let _ = self.finish();
        }
        let mut failure = None;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                failure = Some(RuntimeError::Cleanup {
                    path: self.dir.display().to_string(),
                    source: e,
                });
            }
        }
        if let Some((path, source)) = self.cgroups.remove(&HostCgroupFs).into_iter().next() {
            failure.get_or_insert(RuntimeError::Cleanup {
                path: path.display().to_string(),
                source,
            });
        }
        self.restore_terminal();
        // QEMU is gone, and with it the TAP's last user.
        if let Some(egress) = self.egress.as_mut() {
            if let Err(e) = egress.network.remove() {
                failure.get_or_insert(RuntimeError::Network(e));
            }
        }
        // After the directory: a uid is free only once nothing of its VM is left.
        self.vmm_user.release();
        self.inherited = None;
        self.channel = None;
        self.state = SandboxState::CleanedUp;
        failure.map_or(Ok(()), Err)
    }
}

impl Drop for MicrovmSandbox {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}
