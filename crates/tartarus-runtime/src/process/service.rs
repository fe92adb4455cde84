//! Service sandboxes: init stays up after setup and runs exec requests and file operations inside the
//! sandbox.
//!
//! The supervisor and init share a `SOCK_SEQPACKET` socketpair. A request is one JSON message carrying the
//! process's three stdio descriptors as `SCM_RIGHTS`; init answers `started` (after the exec happened, or
//! once a file operation's process has dropped its privileges) or `failed`, and later `exited` with the
//! wait status. Each process goes through exactly the same privilege drop as a main command
//! (`child::exec_target`); a file operation's then performs the operation itself instead of executing
//! anything (`file_ops.rs`) and reports through its exit status. In service mode init itself creates the
//! network namespace before building the root, so every process it forks is inside it.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

use super::child::{self, ChildPlan, ExecPlan, Program, Target};
use super::protocol::{read_report, Report, STATUS_LEN};
use super::rootfs::{self, Context, SetupError, SetupResult};
use crate::files::{self, FileOp};
use crate::sandbox::{StdioFds, Termination};
use crate::service::{ExecError, ExecId, ExecRequest};
use crate::spec::NetworkMode;

/// Largest control message (the JSON of one request).
const MAX_MESSAGE: usize = 256 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Exec { id: u64, request: ExecRequest },
    File { id: u64, op: FileOp },
    Kill { id: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    Started {
        id: u64,
    },
    Failed {
        id: u64,
        exit_code: i32,
        message: String,
    },
    Exited {
        id: u64,
        status: i32,
    },
}

fn send(fd: BorrowedFd<'_>, message: &impl Serialize, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(io::Error::other("control message too large"));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    loop {
        match sendmsg(fd, &[IoSlice::new(&bytes)], &mut ancillary, SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and the descriptors that came with it; `None` at EOF.
fn receive<T: for<'de> Deserialize<'de>>(fd: BorrowedFd<'_>) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match recvmsg(
            fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..received.bytes]).map_err(io::Error::other)?;
    Ok(Some((message, fds)))
}

/// Init of a service sandbox; never returns.
pub(super) fn run_init(plan: &ChildPlan<'_>, control: RawFd) -> i32 {
    child::hide_supervisor_argv();
    plan.close_supervisor_fds();
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    // SAFETY: the sync pipe's read end is ours and stays open while we use it.
    let sync = unsafe { BorrowedFd::borrow_raw(plan.sync_read) };
    let mut go = [0u8; 1];
    if !matches!(rustix::io::read(sync, &mut go), Ok(1)) {
        return 1;
    }
    if let Err(e) = setup(plan, sync) {
        return child::report_setup(plan.start_write, e);
    }
    let sigchld = match tartarus_hostsys::block_signals(&[libc::SIGCHLD])
        .and_then(|()| tartarus_hostsys::signal_fd(&[libc::SIGCHLD]))
    {
        Ok(fd) => fd,
        Err(e) => {
            return child::report_setup(
                plan.start_write,
                SetupError {
                    stage: "signalfd".into(),
                    source: e,
                },
            )
        }
    };
    let main = match plan.main_target() {
        Some(target) => match spawn(plan, &target) {
            Ok(pid) => Some(pid),
            Err(e) => return child::report_setup(plan.start_write, e),
        },
        None => None,
    };
    // From now on init holds only the status pipe, the control socket and its signalfd; the start pipe
    // reaches EOF when the main command has exec'd (or at once without one).
    let keep = [plan.status_write, control, sigchld.as_raw_fd()];
    close_all_but(&keep);
    // SAFETY: both descriptors are ours and stay open until init exits.
    let (control, status) = unsafe {
        (
            BorrowedFd::borrow_raw(control),
            BorrowedFd::borrow_raw(plan.status_write),
        )
    };
    serve(plan, control, status, sigchld.as_fd(), main)
}

fn setup(plan: &ChildPlan<'_>, sync: BorrowedFd<'_>) -> SetupResult<()> {
    child::become_namespace_root(plan)?;
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if child::supervisor_gone(sync) {
        return Err(SetupError {
            stage: "supervisor exited".into(),
            source: io::ErrorKind::BrokenPipe.into(),
        });
    }
    tartarus_hostsys::unshare_cgroup_namespace().stage(|| "creating the cgroup namespace".into())?;
    rustix::process::umask(rustix::fs::Mode::empty());
    let _ = tartarus_hostsys::set_not_dumpable();
    if *plan.network == NetworkMode::None {
        tartarus_hostsys::unshare_network_namespace().stage(|| "creating the network namespace".into())?;
        tartarus_hostsys::set_loopback_up().stage(|| "bringing up loopback".into())?;
    }
    child::build_root(plan)?;
    rootfs::detach_host_root()
}

fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep.iter().map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut next = 0u32;
    for fd in keep {
        let _ = tartarus_hostsys::close_fds_in(next, fd.saturating_sub(1));
        next = fd + 1;
    }
    let _ = tartarus_hostsys::close_fds_in(next, u32::MAX);
}

/// Forks a process that runs `target`; returns once it has exec'd, or the reason it could not.
fn spawn(plan: &ChildPlan<'_>, target: &Target<'_>) -> SetupResult<Pid> {
    // SAFETY: init is single-threaded.
    match unsafe { tartarus_hostsys::fork_process() }.stage(|| "fork".into())? {
        None => {
            let run = AssertUnwindSafe(|| match child::apply_seccomp(plan) {
                Ok(()) => child::exec_target(plan, target, None),
                Err(e) => child::report_setup(target.report_fd, e),
            });
            tartarus_hostsys::exit_immediately(std::panic::catch_unwind(run).unwrap_or(125))
        }
        Some(pid) => Ok(pid),
    }
}

fn serve(
    plan: &ChildPlan<'_>,
    control: BorrowedFd<'_>,
    status: BorrowedFd<'_>,
    sigchld: BorrowedFd<'_>,
    main: Option<Pid>,
) -> i32 {
    let mut running: HashMap<Pid, u64> = HashMap::new();
    loop {
        let mut fds = [
            PollFd::new(&control, PollFlags::IN),
            PollFd::new(&sigchld, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return 1,
        }
        let (control_ready, child_ready) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if child_ready {
            while let Ok(Some(_)) = tartarus_hostsys::read_signal(sigchld) {}
            while let Ok(Some((pid, raw))) = tartarus_hostsys::reap_any() {
                if Some(pid) == main {
                    let _ = tartarus_hostsys::write_all(status, &raw.to_le_bytes()[..STATUS_LEN]);
                    return 0;
                }
                if let Some(id) = running.remove(&pid) {
                    let _ = send(control, &Reply::Exited { id, status: raw }, &[]);
                }
            }
        }
        if control_ready {
            match receive::<Request>(control) {
                Ok(Some((Request::Exec { id, request }, fds))) => {
                    let reply = started(id, start_exec(plan, &request, fds), &mut running);
                    let _ = send(control, &reply, &[]);
                }
                Ok(Some((Request::File { id, op }, fds))) => {
                    let reply = started(id, start_file_op(plan, &op, fds), &mut running);
                    let _ = send(control, &reply, &[]);
                }
                Ok(Some((Request::Kill { id }, _))) => {
                    if let Some((&pid, _)) = running.iter().find(|(_, &v)| v == id) {
                        // The exec'd process leads its own process group (setsid): kill all of it.
                        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                    }
                }
                // The supervisor is gone (or spoke nonsense): end the sandbox.
                Ok(None) | Err(_) => return 1,
            }
        }
    }
}

/// The reply to a request to start something; a started process is tracked until it exits.
fn started(id: u64, result: Result<Pid, (i32, String)>, running: &mut HashMap<Pid, u64>) -> Reply {
    match result {
        Ok(pid) => {
            running.insert(pid, id);
            Reply::Started { id }
        }
        Err((exit_code, message)) => Reply::Failed {
            id,
            exit_code,
            message,
        },
    }
}

fn start_exec(plan: &ChildPlan<'_>, request: &ExecRequest, fds: Vec<OwnedFd>) -> Result<Pid, (i32, String)> {
    let env: Vec<(String, String)> = plan.base_env.iter().chain(&request.env).cloned().collect();
    let exec = ExecPlan::build(&request.command, &env, plan.hostname).map_err(|e| (125, e.to_string()))?;
    let workdir = request
        .workdir
        .clone()
        .unwrap_or_else(|| plan.root.home.display().to_string());
    let workdir =
        CString::new(workdir).map_err(|_| (125, "working directory contains a NUL byte".to_string()))?;
    start_target(plan, Program::Exec(&exec), &workdir, fds)
}

fn start_file_op(plan: &ChildPlan<'_>, op: &FileOp, fds: Vec<OwnedFd>) -> Result<Pid, (i32, String)> {
    // From "/", so nothing depends on the home directory existing; paths are absolute anyway.
    start_target(plan, Program::File(op), c"/", fds)
}

/// Forks the process for `program` with the request's stdio; returns once it has started.
fn start_target(
    plan: &ChildPlan<'_>,
    program: Program<'_>,
    workdir: &std::ffi::CStr,
    fds: Vec<OwnedFd>,
) -> Result<Pid, (i32, String)> {
    let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| (125, "a request must carry three stdio descriptors".to_string()))?;
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| (125, format!("creating a report pipe: {e}")))?;
    let target = Target {
        program,
        workdir,
        stdio: StdioFds {
            stdin: stdin.as_fd(),
            stdout: stdout.as_fd(),
            stderr: stderr.as_fd(),
        },
        tty: false,
        report_fd: report_write.as_raw_fd(),
    };
    let pid = spawn(plan, &target).map_err(|e| match e.source.raw_os_error() {
        Some(libc::EAGAIN | libc::ENOMEM) if e.stage == "fork" => (
            125,
            "the sandbox's process limit (pids) is reached: end some of its processes first".to_string(),
        ),
        _ => (125, format!("{}: {}", e.stage, e.source)),
    })?;
    drop((report_write, stdin, stdout, stderr));
    let name = program.display_name();
    match read_report(&report_read) {
        Ok(None) => Ok(pid),
        Ok(Some(Report::NotFound)) => Err((127, format!("command not found: {name}"))),
        Ok(Some(Report::NotExecutable { errno })) => Err((
            126,
            format!(
                "command not executable: {name}: {}",
                io::Error::from_raw_os_error(errno)
            ),
        )),
        Ok(Some(Report::SetupFailed { errno, stage })) => {
            Err((125, format!("{stage}: {}", io::Error::from_raw_os_error(errno))))
        }
        Err(e) => Err((125, format!("reading the exec report: {e}"))),
    }
}

/// The supervisor's end of the control channel.
pub(super) struct ExecClient {
    socket: OwnedFd,
    next_id: u64,
    /// Exits that arrived while waiting for something else.
    finished: HashMap<u64, i32>,
}

impl ExecClient {
    pub(super) fn new(socket: OwnedFd) -> Self {
        ExecClient {
            socket,
            next_id: 1,
            finished: HashMap::new(),
        }
    }

    pub(super) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Starts `request` with the given stdio; returns its id once it has exec'd.
    pub(super) fn start(&mut self, request: &ExecRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        if request.command.is_empty() {
            return Err(ExecError::Invalid("the command is empty".into()));
        }
        if request
            .workdir
            .as_deref()
            .is_some_and(|w| !w.starts_with('/') || w.split('/').any(|c| c == ".."))
        {
            return Err(ExecError::Invalid(
                "the working directory must be absolute, without '..'".into(),
            ));
        }
        let id = self.next_id();
        let request = Request::Exec {
            id,
            request: request.clone(),
        };
        self.request_start(id, &request, stdio)
    }

    /// Starts file operation `op` with the given stdio; returns its id once its process has dropped its
    /// privileges.
    pub(super) fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        files::check_path(op.path()).map_err(|e| ExecError::Invalid(e.message))?;
        let id = self.next_id();
        let request = Request::File { id, op: op.clone() };
        self.request_start(id, &request, stdio)
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn request_start(
        &mut self,
        id: u64,
        request: &Request,
        stdio: StdioFds<'_>,
    ) -> Result<ExecId, ExecError> {
        send(self.socket.as_fd(), request, &stdio.as_array()).map_err(ExecError::Channel)?;
        loop {
            match self.next_reply(None)? {
                Some(Reply::Started { id: got }) if got == id => return Ok(ExecId::from_raw(id)),
                Some(Reply::Failed {
                    id: got,
                    exit_code,
                    message,
                }) if got == id => return Err(ExecError::Start { exit_code, message }),
                Some(_) => continue,
                None => return Err(ExecError::NotRunning),
            }
        }
    }

    /// Waits up to `timeout` for exec `id` to end; `None` on timeout.
    pub(super) fn wait(
        &mut self,
        id: ExecId,
        timeout: Option<Duration>,
    ) -> Result<Option<Termination>, ExecError> {
        let id = id.as_raw();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(raw) = self.finished.remove(&id) {
                return Ok(Some(match tartarus_hostsys::ExitStatus::from_raw(raw) {
                    tartarus_hostsys::ExitStatus::Exited(c) => Termination::Exited(c),
                    tartarus_hostsys::ExitStatus::Signaled(s) => Termination::Signaled(s),
                }));
            }
            // A zero remaining time still reads a reply that is already there.
            let remaining = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if self.next_reply(remaining)?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Kills exec `id` and everything in its process group.
    pub(super) fn kill(&mut self, id: ExecId) -> Result<(), ExecError> {
        let request = Request::Kill { id: id.as_raw() };
        send(self.socket.as_fd(), &request, &[]).map_err(ExecError::Channel)
    }

    /// Reads one reply (recording exits); `None` at EOF or when `timeout` passes first.
    fn next_reply(&mut self, timeout: Option<Duration>) -> Result<Option<Reply>, ExecError> {
        if let Some(t) = timeout {
            let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: t.as_secs() as i64,
                tv_nsec: t.subsec_nanos() as i64,
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(0) => return Ok(None),
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ExecError::Channel(e.into())),
            }
        }
        match receive::<Reply>(self.socket.as_fd()).map_err(ExecError::Channel)? {
            Some((Reply::Exited { id, status }, _)) => {
                self.finished.insert(id, status);
                Ok(Some(Reply::Exited { id, status }))
            }
            Some((reply, _)) => Ok(Some(reply)),
            None => Err(ExecError::NotRunning),
        }
    }
}
