//! Service sandboxes of the microVM lane: the VM stays up and every exec is one more exec of the guest
//! agent ([`super::mux`]), behind the same privilege drop as the main command, with the sandbox's
//! environment and the request's on top. A file operation is an exec of the same executable under the
//! file-operation agent's name (`crate::gvisor::agent`, linked into the initramfs), as the sandbox user.
//! A connection to a port inside is an exec of the port connector, its stdio a socket pair.
//! Pause freezes the VMM's cgroup (the guest's clock jumps at the thaw); throttling lowers its CPU quota;
//! limit hits are the guest's counters plus OOM kills of the VMM itself.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::agent::connect::{CONNECTED, CONNECT_PATH, REFUSED};
use super::mux::{ExecEnd, ExecStdio, StartFailure};
use super::protocol::{FailKind, HostFrame, RunRequest};
use super::sandbox::{environment, MicrovmSandbox, START_TIMEOUT};
use crate::files::{self, FileOp};
use crate::process::HostCgroupFs;
use crate::sandbox::{SandboxState, StdioFds, Termination};
use crate::service::{ExecError, ExecId, ExecRequest, LimitHits, ServiceError, ServiceSandbox, Usage};
use crate::spec::{normalize_sandbox_path, SANDBOX_HOME};

/// How long `connect_port` waits for the guest's connector to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

impl MicrovmSandbox {
    fn require_running(&self) -> Result<(), ServiceError> {
        match self.state {
            SandboxState::Running => Ok(()),
            state => Err(ServiceError::State(state)),
        }
    }

    /// Starts `run` as the next exec with the caller's `stdio`.
    fn start_exec(&mut self, run: RunRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        if !self.spec.service {
            return Err(ExecError::NotService);
        }
        if run.argv.iter().any(|a| a.contains('\0')) {
            return Err(ExecError::Invalid("the command contains a NUL byte".into()));
        }
        let Some(running) = self
            .running
            .as_ref()
            .filter(|_| self.state == SandboxState::Running)
        else {
            return Err(ExecError::NotRunning);
        };
        if self.paused {
            return Err(ExecError::Start {
                exit_code: 125,
                message: "the sandbox is paused".into(),
            });
        }
        let copies = ExecStdio {
            stdin: stdio.stdin.try_clone_to_owned().map_err(ExecError::Channel)?,
            stdout: stdio.stdout.try_clone_to_owned().map_err(ExecError::Channel)?,
            stderr: stdio.stderr.try_clone_to_owned().map_err(ExecError::Channel)?,
            blocking: false,
        };
        let id = self.next_exec;
        self.next_exec += 1;
        let deadline = Instant::now() + START_TIMEOUT;
        match running.mux.start_exec(id, run, copies, deadline) {
            Ok(()) => Ok(ExecId::from_raw(id)),
            Err(StartFailure::Failed { kind, message }) => Err(ExecError::Start {
                exit_code: match kind {
                    FailKind::NotFound => 127,
                    FailKind::NotExecutable => 126,
                    FailKind::Setup => 125,
                },
                message,
            }),
            Err(StartFailure::VmEnded(_)) => Err(ExecError::NotRunning),
            Err(StartFailure::TimedOut) => Err(ExecError::Channel(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the guest agent did not start the command within {}s",
                    START_TIMEOUT.as_secs()
                ),
            ))),
            Err(StartFailure::Io(e)) => Err(ExecError::Channel(e)),
        }
    }

    fn run_request(&self, argv: Vec<String>, env: &[(String, String)], cwd: String) -> RunRequest {
        RunRequest {
            argv,
            env: environment(&self.spec.hostname, &[&self.spec.env, env]),
            cwd,
            tty: false,
            ..self.request.clone()
        }
    }
}

impl ServiceSandbox for MicrovmSandbox {
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
        let run = self.run_request(
            request.command.clone(),
            &request.env,
            workdir.to_string_lossy().into_owned(),
        );
        self.start_exec(run, stdio)
    }

    fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        files::check_path(op.path()).map_err(|e| ExecError::Invalid(e.message))?;
        let run = self.run_request(crate::gvisor::agent::argv(op), &[], "/".into());
        self.start_exec(run, stdio)
    }

    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.spec.service {
            true => self.running.as_ref().map(|r| r.mux.exec_events()),
            false => None,
        }
    }

    fn wait_exec(&mut self, id: ExecId, timeout: Option<Duration>) -> Result<Option<Termination>, ExecError> {
        let Some(running) = &self.running else {
            return Err(ExecError::Invalid(format!("no exec {id}")));
        };
        let end = running
            .mux
            .wait_end(id.as_raw(), timeout)
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        Ok(end.map(|end| match end {
            ExecEnd::Exited(exit) => match exit.signal {
                Some(signal) => Termination::Signaled(signal),
                None => Termination::Exited(exit.code.unwrap_or(0)),
            },
            // The VM went before the guest could say: the exec was killed with it.
            ExecEnd::Lost => Termination::Signaled(libc::SIGKILL),
        }))
    }

    fn kill_exec(&mut self, id: ExecId) -> Result<(), ExecError> {
        let Some(running) = &self.running else {
            return Err(ExecError::Invalid(format!("no exec {id}")));
        };
        if !running.mux.knows(id.as_raw()) {
            return Err(ExecError::Invalid(format!("no exec {id}")));
        }
        // A paused guest acts on it at the thaw; the exec's end is reported then.
        running
            .mux
            .send(&HostFrame::Kill { id: id.as_raw() })
            .map_err(ExecError::Channel)
    }

    fn terminate(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            self.resume()?;
        }
        let Some(running) = &self.running else {
            return Err(ServiceError::State(self.state));
        };
        running
            .mux
            .send(&HostFrame::Terminate)
            .map_err(|source| ServiceError::Host {
                what: "asking the guest to stop its processes",
                source,
            })
    }

    fn terminated(&self) -> bool {
        self.running.as_ref().is_some_and(|r| r.mux.terminated())
    }

    fn pause(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if !self.paused {
            self.cgroups
                .freeze_and_wait(&HostCgroupFs, true)
                .map_err(|source| ServiceError::Host {
                    what: "freezing the VMM's cgroup",
                    source,
                })?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            self.cgroups
                .freeze_and_wait(&HostCgroupFs, false)
                .map_err(|source| ServiceError::Host {
                    what: "thawing the VMM's cgroup",
                    source,
                })?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn usage(&self) -> Usage {
        let (guest_ooms, pids_limit_hits) = self.running.as_ref().map_or((0, 0), |r| r.mux.counters());
        Usage {
            blocked_packets: self
                .egress
                .as_ref()
                .and_then(|e| e.network.blocked_packets().ok()),
            limit_hits: LimitHits {
                oom_kills: guest_ooms + self.cgroups.oom_kills(&HostCgroupFs),
                pids_limit_hits,
            },
            cpu_usec: self.cgroups.cpu_usage_usec(&HostCgroupFs),
            memory_bytes: self.cgroups.memory_current(&HostCgroupFs),
        }
    }

    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, ServiceError> {
        self.cgroups
            .set_cpu_quota(&HostCgroupFs, cpus)
            .map_err(|source| ServiceError::Host {
                what: "throttling the VMM's CPU quota",
                source,
            })
    }

    /// An exec of the port connector ([`super::agent::connect`]) whose stdin and stdout are one end of a
    /// socket pair; the caller gets the other end once the connector says it connected (bounded).
    fn connect_port(&mut self, port: u16) -> Result<OwnedFd, ServiceError> {
        self.require_running()?;
        let connect_error = |source| ServiceError::Connect { port, source };
        let (caller, inner) = UnixStream::pair().map_err(connect_error)?;
        let (said, says) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| connect_error(e.into()))?;
        let run = self.run_request(vec![CONNECT_PATH.to_string(), port.to_string()], &[], "/".into());
        let stdio = StdioFds {
            stdin: inner.as_fd(),
            stdout: inner.as_fd(),
            stderr: says.as_fd(),
        };
        let id = self.start_exec(run, stdio).map_err(|e| match e {
            ExecError::NotRunning => ServiceError::State(self.state),
            e => connect_error(io::Error::other(e.to_string())),
        })?;
        // Only the multiplexer's copies are left: their closing is the end of file on both sides.
        drop((inner, says));
        let mut byte = [0u8; 1];
        let mut fds = [PollFd::new(&said, PollFlags::IN)];
        let timeout = rustix::time::Timespec {
            tv_sec: CONNECT_WAIT.as_secs() as i64,
            tv_nsec: 0,
        };
        let connected = match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => matches!(rustix::io::read(&said, &mut byte), Ok(1)) && byte[0] == CONNECTED,
            _ => false,
        };
        let running = self.running.as_ref().ok_or(ServiceError::State(self.state))?;
        if connected {
            running.mux.detach(id.as_raw());
            return Ok(caller.into());
        }
        let end = running.mux.wait_end(id.as_raw(), Some(Duration::from_secs(1)));
        let refused = matches!(end, Ok(Some(ExecEnd::Exited(exit))) if exit.code == Some(REFUSED));
        if !matches!(end, Ok(Some(_))) {
            let _ = running.mux.send(&HostFrame::Kill { id: id.as_raw() });
            running.mux.detach(id.as_raw());
        }
        Err(connect_error(match refused {
            true => io::Error::from(io::ErrorKind::ConnectionRefused),
            false => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the guest did not connect within {}s", CONNECT_WAIT.as_secs()),
            ),
        }))
    }

    fn isolate_network(&mut self) -> Result<bool, ServiceError> {
        match self.egress.as_ref() {
            Some(egress) => egress
                .network
                .isolate()
                .map(|()| true)
                .map_err(ServiceError::Network),
            // No NIC: there is nothing to cut.
            None => Ok(false),
        }
    }
}
