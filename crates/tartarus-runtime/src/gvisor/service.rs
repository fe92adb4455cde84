//! Service sandboxes of the gVisor lane: each exec is a `runsc exec` child of the supervisor with the
//! caller's stdio (runsc hands the descriptors to the sentry), as the command's user, in its working
//! directory, with the sandbox's environment and the request's on top. An exec has started once runsc wrote
//! its in-sandbox pid (`--internal-pid-file`); a `runsc exec` that ends before that could not start the
//! command. Ends are seen through an epoll descriptor holding each exec's pidfd. Controls are runsc's:
//! `pause`, `resume`, `kill --all TERM` (terminate), `kill --pid` (one exec); limit hits and throttling go
//! through the cgroups runsc made.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::fs::inotify;

use super::agent;
use super::bundle::{command_user, environment};
use super::runsc::{self, RunscError};
use super::{GvisorSandbox, CONTROL_TIMEOUT};
use crate::files::{self, FileOp};
use crate::process::HostCgroupFs;
use crate::sandbox::{SandboxState, StartError, StdioFds, Termination};
use crate::service::{ExecError, ExecId, ExecRequest, LimitHits, ServiceError, ServiceSandbox, Usage};
use crate::spec::{normalize_sandbox_path, SANDBOX_HOME};

/// Room a snapshot may need beyond the sandbox's memory use (runsc's own state, the file's framing).
const SNAPSHOT_MARGIN_BYTES: u64 = 16 << 20;

/// How long runsc may take to start an exec's process.
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The execs of one sandbox.
pub(super) struct Execs {
    next: u64,
    running: BTreeMap<ExecId, ExecChild>,
    epoll: OwnedFd,
}

struct ExecChild {
    child: Child,
    pidfd: OwnedFd,
    /// The exec's pid inside the sandbox, for `runsc kill --pid`.
    inner_pid: Option<i32>,
}

impl Execs {
    pub(super) fn new() -> io::Result<Execs> {
        Ok(Execs {
            next: 1,
            running: BTreeMap::new(),
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    /// The host pids of the `runsc exec` children still to be waited for.
    pub(super) fn pids(&self) -> Vec<i32> {
        self.running.values().map(|e| e.child.id() as i32).collect()
    }

    /// Kills and reaps every `runsc exec` child (the sandbox has ended or is being removed).
    pub(super) fn end_all(&mut self) {
        for (_, mut exec) in std::mem::take(&mut self.running) {
            let _ = exec.child.kill();
            let _ = exec.child.wait();
        }
    }
}

/// Waits until `pid_file` is written or `child` ends (bounded); whether the exec started.
fn wait_started(pid_file: &Path, child: &mut Child, pidfd: &OwnedFd) -> io::Result<bool> {
    let dir = pid_file.parent().unwrap_or(Path::new("/"));
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(
        &watch,
        dir,
        inotify::WatchFlags::CLOSE_WRITE | inotify::WatchFlags::MOVED_TO,
    )?;
    let deadline = Instant::now() + EXEC_START_TIMEOUT;
    loop {
        // Checked after the watch is in place, so a write in between is not missed.
        if std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
            return Ok(true);
        }
        if child.try_wait()?.is_some() {
            return Ok(std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut fds = [
            rustix::event::PollFd::new(&watch, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&runsc::timespec(left))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut reader = inotify::Reader::new(&watch, &mut buf);
        while reader.next().is_ok() {}
    }
}

/// An exit status of `runsc exec`: the process's code, a signal as 128 + its number.
fn termination(status: std::process::ExitStatus) -> Termination {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) if (129..=128 + 64).contains(&c) => Termination::Signaled(c - 128),
        (Some(c), _) => Termination::Exited(c),
        (None, Some(s)) => Termination::Signaled(s),
        (None, None) => Termination::Exited(255),
    }
}

impl GvisorSandbox {
    fn require_running(&self) -> Result<(), ServiceError> {
        match self.state {
            SandboxState::Running => Ok(()),
            state => Err(ServiceError::State(state)),
        }
    }

    fn runsc_control(&self, what: &'static str, args: &[&str]) -> Result<(), ServiceError> {
        self.invocation
            .run(args, CONTROL_TIMEOUT)
            .map(|_| ())
            .map_err(|e| ServiceError::Host {
                what,
                source: io::Error::other(e.to_string()),
            })
    }

    /// Starts `command` with `runsc exec` and waits until it runs (or could not be started).
    fn spawn_exec(
        &mut self,
        command_line: &[String],
        env: &[(String, String)],
        workdir: &Path,
        stdio: StdioFds<'_>,
    ) -> Result<ExecId, ExecError> {
        if self.state != SandboxState::Running {
            return Err(ExecError::NotRunning);
        }
        if !self.spec.service {
            return Err(ExecError::NotService);
        }
        let program = command_line
            .first()
            .ok_or_else(|| ExecError::Invalid("empty command".into()))?;
        if command_line.iter().any(|a| a.contains('\0')) {
            return Err(ExecError::Invalid("the command contains a NUL byte".into()));
        }
        if self.paused {
            return Err(ExecError::Start {
                exit_code: 125,
                message: "the sandbox is paused".into(),
            });
        }
        let id = ExecId::from_raw(self.execs.next);
        self.execs.next += 1;
        let user = command_user(&self.spec);
        let pid_file = self.bundle.join(format!("exec-{id}.pid"));
        let mut args: Vec<String> = vec![
            "exec".into(),
            format!("--user={}:{}", user.uid, user.gid),
            format!("--cwd={}", workdir.display()),
            format!("--internal-pid-file={}", pid_file.display()),
        ];
        for (k, v) in env {
            args.push(format!("--env={k}={v}"));
        }
        args.push(self.container.clone());
        args.extend(command_line.iter().cloned());
        let mut command = self.invocation.command(&args);
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(Stdio::from)
                .map_err(ExecError::Channel)
        };
        command
            .stdin(dup(stdio.stdin)?)
            .stdout(dup(stdio.stdout)?)
            .stderr(dup(stdio.stderr)?);
        let mut child = command.spawn().map_err(ExecError::Channel)?;
        drop(command);
        let pidfd = match rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ExecError::Channel(e.into()));
            }
        };
        let started = match wait_started(&pid_file, &mut child, &pidfd) {
            Ok(started) => started,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ExecError::Channel(e));
            }
        };
        let inner_pid = runsc::read_small(&pid_file).and_then(|t| t.trim().parse().ok());
        let _ = std::fs::remove_file(&pid_file);
        if !started {
            let _ = child.wait();
            // runsc logs a missing working directory, and exec fails as if the command were missing.
            let cwd = workdir.display().to_string();
            let missing_cwd =
                |line: &str| line.contains("failed to find initial working directory") && line.contains(&cwd);
            if runsc::read_small(&self.bundle.join("runsc.log"))
                .is_some_and(|log| log.lines().any(missing_cwd))
            {
                return Err(ExecError::Start {
                    exit_code: 125,
                    message: format!(
                        "entering working directory {}: {}",
                        workdir.display(),
                        io::Error::from_raw_os_error(libc::ENOENT)
                    ),
                });
            }
            let exit_code = if self.exists_in_root(program) { 126 } else { 127 };
            let what = if exit_code == 127 {
                "command not found"
            } else {
                "command not executable"
            };
            return Err(ExecError::Start {
                exit_code,
                message: format!("{what}: {program} (runsc exec could not start it)"),
            });
        }
        epoll::add(
            &self.execs.epoll,
            &pidfd,
            epoll::EventData::new_u64(id.as_raw()),
            epoll::EventFlags::IN,
        )
        .map_err(|e| ExecError::Channel(e.into()))?;
        self.execs.running.insert(
            id,
            super::service::ExecChild {
                child,
                pidfd,
                inner_pid,
            },
        );
        Ok(id)
    }

    /// Whether `command` exists in the host's view of the root (to tell "not found" from "not executable"
    /// when runsc could not start it).
    fn exists_in_root(&self, command: &str) -> bool {
        if !command.starts_with('/') {
            return false;
        }
        let config = runsc::read_small(&self.bundle.join("config.json"));
        let Some(root) = config
            .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok())
            .and_then(|c| c["root"]["path"].as_str().map(str::to_string))
        else {
            return false;
        };
        let relative = command.trim_start_matches('/');
        Path::new(&root).join(relative).exists() || Path::new("/").join(relative).exists()
    }
}

impl ServiceSandbox for GvisorSandbox {
    fn exec(&mut self, request: &ExecRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        if request.command.is_empty() {
            return Err(ExecError::Invalid("empty command".into()));
        }
        let workdir = request
            .workdir
            .as_deref()
            .map(|w| normalize_sandbox_path(Path::new(w)))
            .or_else(|| self.spec.workdir.as_deref().map(normalize_sandbox_path))
            .unwrap_or_else(|| SANDBOX_HOME.into());
        let env = environment(&self.spec.hostname, &[&self.spec.env, &request.env]);
        let command = match &self.denied_syscalls {
            Some(denied) => agent::filtered_argv(denied, &request.command),
            None => request.command.clone(),
        };
        self.spawn_exec(&command, &env, &workdir, stdio)
    }

    /// Runs the agent ([`super::agent`]) inside with `runsc exec`, as the command's user.
    fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        files::check_path(op.path()).map_err(|e| ExecError::Invalid(e.message))?;
        if !self.agent {
            return Err(ExecError::Unsupported {
                lane: "gvisor",
                operation:
                    "file operations here (the supervisor's executable could not be found to run inside)",
            });
        }
        let env = environment(&self.spec.hostname, &[]);
        self.spawn_exec(&agent::argv(op), &env, Path::new("/"), stdio)
    }

    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>> {
        match (self.state, self.spec.service) {
            (SandboxState::Prepared, _) | (_, false) => None,
            _ => Some(self.execs.epoll.as_fd()),
        }
    }

    fn wait_exec(&mut self, id: ExecId, timeout: Option<Duration>) -> Result<Option<Termination>, ExecError> {
        let exec = self
            .execs
            .running
            .get_mut(&id)
            .ok_or_else(|| ExecError::Invalid(format!("no exec {id}")))?;
        if !runsc::readable(&exec.pidfd, timeout).map_err(ExecError::Channel)? {
            return Ok(None);
        }
        let status = exec.child.wait().map_err(ExecError::Channel)?;
        let _ = epoll::delete(&self.execs.epoll, &exec.pidfd);
        self.execs.running.remove(&id);
        Ok(Some(termination(status)))
    }

    fn kill_exec(&mut self, id: ExecId) -> Result<(), ExecError> {
        let exec = self
            .execs
            .running
            .get(&id)
            .ok_or_else(|| ExecError::Invalid(format!("no exec {id}")))?;
        match exec.inner_pid {
            Some(pid) => {
                let pid = pid.to_string();
                match self
                    .invocation
                    .run(&["kill", "--pid", &pid, &self.container, "KILL"], CONTROL_TIMEOUT)
                {
                    Ok(_) => Ok(()),
                    // Already gone: its end is reported by wait_exec.
                    Err(RunscError::Failed { .. }) => Ok(()),
                    Err(e) => Err(ExecError::Channel(io::Error::other(e.to_string()))),
                }
            }
            None => {
                let exec = self.execs.running.get_mut(&id).ok_or(ExecError::NotRunning)?;
                exec.child.kill().map_err(ExecError::Channel)
            }
        }
    }

    fn terminate(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            self.resume()?;
        }
        self.runsc_control(
            "asking the sandbox's processes to end",
            &["kill", "--all", &self.container, "TERM"],
        )
    }

    fn pause(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if !self.paused {
            self.runsc_control("pausing the gVisor sandbox", &["pause", &self.container])?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            self.runsc_control("resuming the gVisor sandbox", &["resume", &self.container])?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    /// `runsc checkpoint` into `dir`: the sentry saves every task, its memory and the root's in-memory
    /// overlay (the sandbox's scratch files) into one compressed state file, and the container ends.
    /// Refused first, with the sandbox untouched, when the sandbox has an egress
    /// network (its namespace is not carried to the restore yet), or when `dir`'s filesystem has less room
    /// than the sandbox's memory use (runsc's state file never holds more): Debian's runsc ends the
    /// container when a checkpoint fails half-way, so a disk that fills up mid-write is caught before.
    fn hibernate(&mut self, dir: &Path) -> Result<(), ServiceError> {
        const OPERATION: &str = "pausing to disk";
        self.require_running()?;
        if self.network.is_some() {
            return Err(ServiceError::Unsupported {
                operation: OPERATION,
                why: "a gVisor sandbox with an egress network cannot be saved yet: its network namespace \
                      is not carried over to the restored sandbox",
            });
        }
        let needed = self.cgroups.current_memory(&HostCgroupFs).unwrap_or(0) + SNAPSHOT_MARGIN_BYTES;
        let free = crate::snapshot::free_bytes(dir).map_err(|source| ServiceError::Host {
            what: "reading the free space of the snapshot directory",
            source,
        })?;
        if free < needed {
            return Err(ServiceError::Refused {
                operation: OPERATION,
                why: format!(
                    "{} has {free} bytes free and the snapshot may need up to {needed} (the sandbox's \
                     memory use); free some space — the sandbox keeps running",
                    dir.display()
                ),
            });
        }
        // Debian's runsc cannot checkpoint a frozen container (it panics and loses it): thaw it first; the
        // checkpoint stops every task anyway.
        if self.paused {
            self.resume()?;
        }
        self.checkpoint(dir, false).map_err(|e| ServiceError::Host {
            what: "runsc checkpoint failed",
            source: io::Error::other(crate::error_chain(&e)),
        })
    }

    fn restore(&mut self, dir: &Path, stdio: StdioFds<'_>) -> Result<(), StartError> {
        self.start_restored(dir, stdio)
    }

    fn usage(&self) -> Usage {
        Usage {
            blocked_packets: self.blocked_packets(),
            limit_hits: LimitHits {
                oom_kills: self.cgroups.oom_kills(&HostCgroupFs),
                pids_limit_hits: self.cgroups.pids_limit_hits(&HostCgroupFs),
            },
            cpu_usec: self.cgroups.cpu_usage_usec(&HostCgroupFs),
            memory_bytes: self.cgroups.memory_current(&HostCgroupFs),
        }
    }

    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, ServiceError> {
        self.cgroups
            .set_cpu_quota(&HostCgroupFs, cpus)
            .map_err(|source| ServiceError::Host {
                what: "throttling the CPU quota",
                source,
            })
    }

    fn isolate_network(&mut self) -> Result<bool, ServiceError> {
        match &self.network {
            Some(network) => network.isolate().map(|()| true).map_err(ServiceError::Network),
            None => Ok(false),
        }
    }
}
