//! Code that runs in the sandbox's processes: the pid-1 init (builds the root, reaps, reports) and the
//! command (drops every privilege, then execs, or performs a file operation).
//!
//! Both run in a copy of the supervisor's address space made by `clone3`/`fork` from a single-threaded
//! process, so allocation is safe; they never return into the supervisor's frames and always end with
//! `_exit` (a panic becomes exit code 125).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use rustix::fs::Mode;
use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::{CapabilitySet, CapabilitySets};
use tartarus_hostsys::{exit_immediately, ExitStatus};

use super::file_ops;
use super::landlock::{self, LandlockRules};
use super::protocol::{Report, STATUS_LEN};
use super::rootfs::{self, Context, RootInputs, SetupError, SetupResult};
use super::seccomp::CompiledFilters;
use crate::files::FileOp;
use crate::sandbox::StdioFds;
use crate::spec::{NetworkMode, ProcessLimits, SandboxUser, SpecError, DEFAULT_PATH, SANDBOX_HOME};

/// How uids are mapped into the sandbox's user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMode {
    /// The supervisor is root: map a 65536-id range starting at an unprivileged host id, so even the
    /// sandbox's root is nobody on the host.
    Privileged { host_base: u32 },
    /// Unprivileged supervisor: only the caller's own uid/gid can be mapped (to the sandbox user).
    Unprivileged { uid: u32, gid: u32 },
}

/// The command to execute, prepared (and allocated) by the supervisor.
pub struct ExecPlan {
    /// Paths to try in order (one for a command with `/`, one per `PATH` entry otherwise).
    pub candidates: Vec<CString>,
    pub display_name: String,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
}

impl ExecPlan {
    /// The plan for `command` with the sandbox's default environment overridden by `env`; a command
    /// without `/` is looked up in that environment's `PATH`.
    pub fn build(
        command: &[String],
        env: &[(String, String)],
        hostname: &str,
    ) -> Result<ExecPlan, SpecError> {
        let program = command.first().ok_or(SpecError::EmptyCommand)?;
        let mut full: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), SANDBOX_HOME.into()),
            ("USER".into(), "sandbox".into()),
            ("LOGNAME".into(), "sandbox".into()),
            ("HOSTNAME".into(), hostname.to_string()),
        ];
        for (k, v) in env {
            match full.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v.clone(),
                None => full.push((k.clone(), v.clone())),
            }
        }
        let c = |text: String| CString::new(text).map_err(|_| SpecError::NulByte { what: "the command" });
        let candidates = if program.contains('/') {
            vec![c(program.clone())?]
        } else {
            let path = full
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str())
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|dir| dir.starts_with('/'))
                .map(|dir| c(format!("{}/{program}", dir.trim_end_matches('/'))))
                .collect::<Result<_, _>>()?
        };
        Ok(ExecPlan {
            candidates,
            display_name: program.clone(),
            argv: command.iter().map(|a| c(a.clone())).collect::<Result<_, _>>()?,
            envp: full
                .iter()
                .map(|(k, v)| c(format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Everything the child needs; built by the supervisor before the clone.
pub struct ChildPlan<'a> {
    pub sync_read: RawFd,
    pub start_write: RawFd,
    pub status_write: RawFd,
    /// Descriptors of the supervisor that the child must close at once.
    pub supervisor_fds: &'a [RawFd],
    /// Init's end of the control socket of a service sandbox.
    pub control: Option<RawFd>,
    pub ids: IdMode,
    /// Who the command runs as (ids inside the sandbox).
    pub user: SandboxUser,
    pub root: &'a RootInputs,
    pub hostname: &'a str,
    /// Egress sandboxes are cloned inside their prepared namespace; `None` creates a fresh one.
    pub network: &'a NetworkMode,
    /// The main command; `None` for a service sandbox started without one.
    pub exec: Option<&'a ExecPlan>,
    pub filters: &'a CompiledFilters,
    pub stdio: StdioFds<'a>,
    pub tty: bool,
    pub workdir: &'a CStr,
    pub writable_dirs: &'a [PathBuf],
    pub process_limits: ProcessLimits,
    /// `RLIMIT_NPROC` of every process of the sandbox (its pids limit, default or asked for; `None` when
    /// lifted): the wall that holds without cgroups, counted per user of the sandbox's own user namespace.
    pub max_processes: Option<u64>,
    /// The sandbox's environment, under every exec request's own.
    pub base_env: &'a [(String, String)],
    /// Fork the command's process before the supervisor's go-ahead (only when no cgroup placement is
    /// needed, since a process forked before placement would stay outside the sandbox's cgroups).
    pub early_fork: bool,
    /// Highest capability number of this kernel, read by the supervisor.
    pub last_capability: u32,
}

/// Entry point of the cloned child; never returns.
pub fn run(plan: &ChildPlan<'_>) -> ! {
    let init = AssertUnwindSafe(|| match plan.control {
        Some(control) => super::service::run_init(plan, control),
        None => run_init(plan),
    });
    let code = std::panic::catch_unwind(init).unwrap_or(125);
    exit_immediately(code)
}

pub(super) fn report(fd: RawFd, message: &Report) {
    // SAFETY: `fd` is the child's copy of the start pipe's write end, open until exec or exit.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = tartarus_hostsys::write_all(fd, &message.encode());
}

pub(super) fn report_setup(fd: RawFd, e: SetupError) -> i32 {
    report(
        fd,
        &Report::SetupFailed {
            errno: e.source.raw_os_error().unwrap_or(0),
            stage: e.stage,
        },
    );
    125
}

impl<'a> ChildPlan<'a> {
    /// Closes this process's copies of the supervisor's descriptors.
    pub(super) fn close_supervisor_fds(&self) {
        for &fd in self.supervisor_fds {
            // SAFETY: these are the supervisor's ends, duplicated into this process by clone; closing our
            // copies affects nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// The main command as an exec target, reporting on the start pipe.
    pub(super) fn main_target(&self) -> Option<Target<'a>> {
        self.exec.map(|exec| Target {
            program: Program::Exec(exec),
            workdir: self.workdir,
            stdio: self.stdio,
            tty: self.tty,
            report_fd: self.start_write,
        })
    }
}

/// What `/proc/1/cmdline` shows inside the sandbox (and `ps` on the host) instead of the supervisor's
/// arguments, which name host paths (the binary, the data directory, the spec).
const INIT_TITLE: &[u8] = b"tartarus-init";

/// Hides the supervisor's arguments from init's cmdline, first thing: every process init forks inherits
/// the rewritten area. Best effort: it only fails without `/proc`, and the setup then fails anyway.
pub(super) fn hide_supervisor_argv() {
    let _ = tartarus_hostsys::overwrite_cmdline(INIT_TITLE);
}

fn run_init(plan: &ChildPlan<'_>) -> i32 {
    hide_supervisor_argv();
    plan.close_supervisor_fds();
    // Die with the supervisor. Set before waiting so a supervisor that dies now is noticed (the sync read
    // then sees EOF).
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    // SAFETY: the sync pipe's read end is ours; it is read and kept open until exec (close-on-exec).
    let sync = unsafe { BorrowedFd::borrow_raw(plan.sync_read) };
    // The command's process creates its network namespace (the slowest kernel step) on the other core
    // while init builds the root. Without cgroups it is forked at once, even before the supervisor has
    // written the id maps; with cgroups only after the supervisor has placed init, so it inherits them.
    let mut command = None;
    if plan.early_fork {
        command = match fork_command_process(plan) {
            Ok(c) => Some(c),
            Err(e) => return report_setup(plan.start_write, e),
        };
    }
    let mut go = [0u8; 1];
    if !matches!(rustix::io::read(sync, &mut go), Ok(1)) {
        return 1; // supervisor gone or refused: nothing was set up
    }
    if let Err(e) = become_namespace_root(plan) {
        return report_setup(plan.start_write, e);
    }
    // Credential changes clear the parent-death signal: set it again, then make sure the supervisor did
    // not die in between (it holds the sync pipe's write end open for the sandbox's whole life).
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if supervisor_gone(sync) {
        return 1;
    }
    // Only now: while init is non-dumpable its /proc files belong to the host's root, and an unprivileged
    // supervisor could no longer write the id maps.
    let _ = tartarus_hostsys::set_not_dumpable();
    let (child, ready_write) = match command {
        Some(c) => c,
        None => match fork_command_process(plan) {
            Ok(c) => c,
            Err(e) => return report_setup(plan.start_write, e),
        },
    };
    // Two bytes for the command's process: "root ready" (it may drop its privileges) and "sealed" (the
    // host's root is detached; it may exec).
    if let Err(e) = build_root(plan) {
        return report_setup(plan.start_write, e);
    }
    let _ = tartarus_hostsys::write_all(&ready_write, b"r");
    if let Err(e) = rootfs::detach_host_root() {
        return report_setup(plan.start_write, e);
    }
    let _ = tartarus_hostsys::write_all(&ready_write, b"s");
    drop(ready_write);
    // Keep only the status pipe: the command's exec (or failure report) must be the last writer of the
    // start pipe, and init must not hold the command's stdio open.
    let keep = plan.status_write as u32;
    let _ = tartarus_hostsys::close_fds_in(0, keep.saturating_sub(1));
    let _ = tartarus_hostsys::close_fds_in(keep + 1, u32::MAX);
    loop {
        match tartarus_hostsys::reap_any_blocking() {
            Ok(Some((pid, status))) if pid == child => {
                // SAFETY: the status pipe's write end is ours (kept above).
                let fd = unsafe { BorrowedFd::borrow_raw(plan.status_write) };
                let _ = tartarus_hostsys::write_all(fd, &status.to_le_bytes()[..STATUS_LEN]);
                return 0;
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return 1,
        }
    }
}

/// A cgroup namespace rooted at init's cgroup (the sandbox's, once placed), then the command's process.
/// Returns its pid and the write end of its "ready" pipe.
fn fork_command_process(plan: &ChildPlan<'_>) -> SetupResult<(rustix::process::Pid, OwnedFd)> {
    tartarus_hostsys::unshare_cgroup_namespace().stage(|| "creating the cgroup namespace".into())?;
    rustix::process::umask(Mode::empty());
    let (ready_read, ready_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .stage(|| "creating the ready pipe".into())?;
    // SAFETY: this process is single-threaded (a clone of a single-threaded supervisor).
    match unsafe { tartarus_hostsys::fork_process() }.stage(|| "fork".into())? {
        None => {
            drop(ready_write);
            let run = AssertUnwindSafe(|| command_process(plan, ready_read));
            exit_immediately(std::panic::catch_unwind(run).unwrap_or(125))
        }
        Some(pid) => Ok((pid, ready_write)),
    }
}

pub(super) fn supervisor_gone(sync: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(&sync, rustix::event::PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// With a privileged mapping, switch to the namespace's root (a mapped, unprivileged host id) and drop the
/// supervisor's supplementary groups, which would otherwise keep host group access.
pub(super) fn become_namespace_root(plan: &ChildPlan<'_>) -> SetupResult<()> {
    if let IdMode::Privileged { .. } = plan.ids {
        rustix::thread::set_thread_groups(&[]).stage(|| "clearing supplementary groups".into())?;
        let root_gid = rustix::process::Gid::ROOT;
        let root_uid = rustix::process::Uid::ROOT;
        rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid).stage(|| "setresgid".into())?;
        rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid).stage(|| "setresuid".into())?;
    }
    Ok(())
}

pub(super) fn build_root(plan: &ChildPlan<'_>) -> SetupResult<()> {
    rootfs::build_and_pivot(plan.root)?;
    rustix::system::sethostname(plan.hostname.as_bytes()).stage(|| "setting the hostname".into())
}

/// The command's process before exec: its own network namespace, then wait for init's root.
fn command_process(plan: &ChildPlan<'_>, ready: OwnedFd) -> i32 {
    if *plan.network == NetworkMode::None {
        let netns = tartarus_hostsys::unshare_network_namespace()
            .stage(|| "creating the network namespace".into())
            .and_then(|()| tartarus_hostsys::set_loopback_up().stage(|| "bringing up loopback".into()));
        if let Err(e) = netns {
            return report_setup(plan.start_write, e);
        }
    }
    // Installing the filter (the kernel validates and JITs it) overlaps with init's root building. Nothing
    // this process does afterwards is on the deny list.
    if let Err(e) = apply_seccomp(plan) {
        return report_setup(plan.start_write, e);
    }
    if !read_byte(&ready) {
        return 125; // init failed and has reported why
    }
    let Some(target) = plan.main_target() else {
        return 125;
    };
    exec_target(plan, &target, Some(&ready))
}

/// Waits for one byte from init; false when init closed the pipe (it failed and reported why).
pub(super) fn read_byte(ready: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(ready, &mut byte) {
            Ok(1) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            _ => return false,
        }
    }
}
/// What one process in the sandbox runs once its privileges are dropped.
#[derive(Clone, Copy)]
pub(super) enum Program<'a> {
    /// The main command or an exec request.
    Exec(&'a ExecPlan),
    /// A file operation, performed by the process itself (nothing is executed).
    File(&'a FileOp),
}

impl Program<'_> {
    pub fn display_name(&self) -> &str {
        match self {
            Program::Exec(exec) => &exec.display_name,
            Program::File(op) => op.path(),
        }
    }
}

/// One process in the sandbox: the main command, an exec request or a file operation.
pub(super) struct Target<'a> {
    pub program: Program<'a>,
    pub workdir: &'a CStr,
    pub stdio: StdioFds<'a>,
    pub tty: bool,
    /// Where a failure to start is reported (close-on-exec, so a successful exec closes it).
    pub report_fd: RawFd,
}

/// From here on nothing is trusted: drop every privilege, wait for `sealed` (the host root detached) when
/// given, and exec. Returns only on failure, with the shell's exit code for it. A file operation is
/// performed here instead of an exec, and its outcome returned as the exit code.
pub(super) fn exec_target(plan: &ChildPlan<'_>, target: &Target<'_>, sealed: Option<&OwnedFd>) -> i32 {
    rustix::process::umask(Mode::from_raw_mode(0o022));
    if let Err(e) = drop_privileges(plan, target) {
        return report_setup(target.report_fd, e);
    }
    if sealed.is_some_and(|fd| !read_byte(fd)) {
        return 125;
    }
    let exec = match target.program {
        Program::Exec(exec) => exec,
        Program::File(op) => {
            // Nothing will be executed to close the inherited descriptors: close them now, the start report
            // among them (its EOF tells init the operation has started).
            let _ = tartarus_hostsys::close_fds_in(3, u32::MAX);
            return file_ops::perform(op);
        }
    };
    let argv: Vec<*const libc::c_char> = exec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = exec
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut not_executable: Option<io::Error> = None;
    for candidate in &exec.candidates {
        let err = tartarus_hostsys::execve(candidate, &argv, &envp);
        match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => continue,
            _ => {
                not_executable.get_or_insert(err);
            }
        }
    }
    match not_executable {
        Some(e) => {
            report(
                target.report_fd,
                &Report::NotExecutable {
                    errno: e.raw_os_error().unwrap_or(0),
                },
            );
            126
        }
        None => {
            report(target.report_fd, &Report::NotFound);
            127
        }
    }
}

/// Installs the seccomp filter; also sets no_new_privs.
pub(super) fn apply_seccomp(plan: &ChildPlan<'_>) -> SetupResult<()> {
    plan.filters.apply().map_err(|e| SetupError {
        stage: format!("installing seccomp filter: {e}"),
        source: io::ErrorKind::Other.into(),
    })
}

fn drop_privileges(plan: &ChildPlan<'_>, target: &Target<'_>) -> SetupResult<()> {
    rustix::process::setsid().stage(|| "setsid".into())?;
    attach_stdio(target.stdio)?;
    if target.tty {
        // SAFETY: descriptor 0 was just set up as the terminal.
        let tty = unsafe { BorrowedFd::borrow_raw(0) };
        rustix::process::ioctl_tiocsctty(tty).stage(|| "acquiring the terminal".into())?;
    }
    tartarus_hostsys::set_cloexec_from(3).stage(|| "closing inherited descriptors".into())?;
    rustix::process::chdir(target.workdir)
        .stage(|| format!("entering working directory {}", target.workdir.to_string_lossy()))?;
    set_rlimits(&plan.process_limits, plan.max_processes)?;
    tartarus_hostsys::reset_signals_for_exec();

    let writable: Vec<&std::path::Path> = plan.writable_dirs.iter().map(PathBuf::as_path).collect();
    let stdio: [BorrowedFd<'_>; 3] = [0, 1, 2].map(tartarus_hostsys::stdio_fd);
    landlock::restrict(&LandlockRules {
        writable_dirs: &writable,
        device_dir: std::path::Path::new("/dev"),
        stdio: &stdio,
    })
    .map_err(|e| SetupError {
        stage: e.to_string(),
        source: io::ErrorKind::Unsupported.into(),
    })?;

    for cap in 0..=plan.last_capability {
        tartarus_hostsys::drop_bounding_capability(cap)
            .stage(|| "dropping the capability bounding set".into())?;
    }
    rustix::thread::clear_ambient_capability_set().stage(|| "clearing ambient capabilities".into())?;
    if let IdMode::Privileged { .. } = plan.ids {
        // Forked before init dropped them, this process may still hold the supervisor's groups.
        rustix::thread::set_thread_groups(&[]).stage(|| "clearing supplementary groups".into())?;
        let id = rustix::process::Gid::from_raw(plan.user.gid);
        rustix::thread::set_thread_res_gid(id, id, id).stage(|| "switching to the sandbox group".into())?;
        let id = rustix::process::Uid::from_raw(plan.user.uid);
        rustix::thread::set_thread_res_uid(id, id, id).stage(|| "switching to the sandbox user".into())?;
    }
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    // The seccomp filter is already in place (command_process).
    rustix::thread::set_capabilities(None, none).stage(|| "dropping capabilities".into())
}

/// Puts the caller's chosen descriptors on 0, 1 and 2 (via high copies, so any overlap is safe).
fn attach_stdio(stdio: StdioFds<'_>) -> SetupResult<()> {
    let mut copies = Vec::with_capacity(3);
    for fd in stdio.as_array() {
        copies.push(rustix::io::fcntl_dupfd_cloexec(fd, 10).stage(|| "duplicating stdio".into())?);
    }
    for (target, copy) in copies.iter().enumerate() {
        tartarus_hostsys::dup_onto(copy.as_raw_fd(), target as RawFd).stage(|| "attaching stdio".into())?;
    }
    Ok(())
}

/// The sandbox's rlimits on the calling process (no core dumps, open files, file size, processes); also
/// the microVM guest agent's, before it executes a command.
pub(crate) fn set_rlimits(limits: &ProcessLimits, max_processes: Option<u64>) -> SetupResult<()> {
    let set = |resource, value: u64| {
        rustix::process::setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .stage(|| format!("setting rlimit {resource:?}"))
    };
    set(Resource::Core, 0)?;
    set(Resource::Nofile, limits.open_files)?;
    set(Resource::Fsize, limits.file_size_bytes)?;
    // Counted per (user namespace, uid): each sandbox has its own user namespace, so this bounds one
    // sandbox's processes without touching any other's or the host's.
    if let Some(max) = max_processes {
        set(Resource::Nproc, max)?;
    }
    Ok(())
}

/// Decodes init's status record.
pub fn decode_status(bytes: [u8; STATUS_LEN]) -> ExitStatus {
    ExitStatus::from_raw(i32::from_le_bytes(bytes))
}
