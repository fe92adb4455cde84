//! What the shim needs of a runtime lane, and how the lane's errors become the contract's codes.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use tartarus_runtime::process::{ExecError, ExecRequest, ProcessRuntime, ProcessSandbox};
use tartarus_runtime::{KillReason, Outcome, RuntimeError, Sandbox, SandboxSpec, StdioFds, Termination};

use crate::protocol::{DirEntry, ErrorCode, LimitHits, StartFailure, StartFailureKind};

/// Starts sandboxes of one lane.
pub trait LaneRuntime {
    /// Prepares and starts `spec` (a service sandbox) with the main command's stdio.
    fn start(&self, spec: SandboxSpec, stdio: [BorrowedFd<'_>; 3]) -> Result<Box<dyn Lane>, StartFailure>;
}

/// Work started in a running sandbox.
pub enum Work<'a> {
    Exec(&'a [String], &'a [(String, String)], Option<&'a str>),
    File(FileOpKind, &'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOpKind {
    Read,
    Write,
    List,
}

/// Usage counters of a running sandbox.
pub struct Usage {
    pub blocked_packets: Option<u64>,
    pub limit_hits: LimitHits,
}

/// A running sandbox as the shim drives it.
pub trait Lane {
    fn id(&self) -> &str;
    /// The sandbox's lifetime limit (`timeout`), enforced by the shim.
    fn lifetime(&self) -> Option<Duration>;
    fn event_fd(&self) -> Option<BorrowedFd<'_>>;
    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>>;
    fn try_wait(&mut self) -> Result<Option<Outcome>, LaneError>;
    fn wait(&mut self) -> Result<Outcome, LaneError>;
    fn kill(&mut self, reason: KillReason) -> Result<(), LaneError>;
    fn cleanup(&mut self) -> Result<(), LaneError>;
    fn usage(&self) -> Usage;
    fn is_paused(&self) -> bool;
    fn pause(&mut self) -> Result<(), LaneError>;
    fn resume(&mut self) -> Result<(), LaneError>;
    fn isolate_network(&mut self) -> Result<bool, LaneError>;
    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, LaneError>;
    fn start_work(&mut self, work: Work<'_>, stdio: [BorrowedFd<'_>; 3]) -> Result<u64, LaneError>;
    fn kill_work(&mut self, id: u64) -> Result<(), LaneError>;
    fn try_wait_work(&mut self, id: u64) -> Result<Option<Termination>, LaneError>;
}

/// A lane operation failed, with the contract's code for it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LaneError {
    code: ErrorCode,
    message: String,
}

impl LaneError {
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn channel(e: std::io::Error) -> Self {
        LaneError {
            code: ErrorCode::Unavailable,
            message: format!("sandbox control channel failed: {e}"),
        }
    }
}

impl From<RuntimeError> for LaneError {
    fn from(e: RuntimeError) -> Self {
        let code = match &e {
            RuntimeError::Host { source, .. } if source.kind() == std::io::ErrorKind::Unsupported => {
                ErrorCode::Unsupported
            }
            _ => ErrorCode::Unavailable,
        };
        LaneError {
            code,
            message: tartarus_runtime::error_chain(&e),
        }
    }
}

impl From<ExecError> for LaneError {
    fn from(e: ExecError) -> Self {
        let code = match (&e, e.exit_code()) {
            (_, 127) => ErrorCode::CommandNotFound,
            (_, 126) => ErrorCode::NotExecutable,
            (ExecError::Invalid(_), _) => ErrorCode::InvalidRequest,
            _ => ErrorCode::ExecFailed,
        };
        LaneError {
            code,
            message: tartarus_runtime::error_chain(&e),
        }
    }
}

/// What a finished file operation answers.
pub enum FileReply {
    Data(Vec<u8>),
    Listing(Vec<DirEntry>),
    Written,
}

/// A refused file operation.
pub struct FileRefusal {
    pub code: ErrorCode,
    pub message: String,
}

/// Decodes the end of a file operation.
pub fn file_outcome(
    kind: FileOpKind,
    termination: Termination,
    stdout: Vec<u8>,
    stderr: &str,
) -> Result<FileReply, FileRefusal> {
    let _ = (kind, termination, stdout, stderr);
    Err(FileRefusal {
        code: ErrorCode::Unsupported,
        message: "file operations are not available yet".into(),
    })
}

/// The process lane.
pub struct ProcessLane(pub ProcessRuntime);

impl LaneRuntime for ProcessLane {
    fn start(&self, spec: SandboxSpec, stdio: [BorrowedFd<'_>; 3]) -> Result<Box<dyn Lane>, StartFailure> {
        let lifetime = spec.timeout;
        let mut sandbox = self.0.prepare_sandbox(spec).map_err(|e| StartFailure {
            kind: StartFailureKind::Spec,
            exit_code: 125,
            message: tartarus_runtime::error_chain(&e),
        })?;
        let [stdin, stdout, stderr] = stdio.map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd));
        sandbox
            .start(StdioFds {
                stdin,
                stdout,
                stderr,
            })
            .map_err(|e| StartFailure {
                kind: match e.exit_code() {
                    127 => StartFailureKind::CommandNotFound,
                    126 => StartFailureKind::NotExecutable,
                    _ => StartFailureKind::Host,
                },
                exit_code: e.exit_code(),
                message: tartarus_runtime::error_chain(&e),
            })?;
        Ok(Box::new(ProcessLaneSandbox { sandbox, lifetime }))
    }
}

struct ProcessLaneSandbox {
    sandbox: ProcessSandbox,
    lifetime: Option<Duration>,
}

impl Lane for ProcessLaneSandbox {
    fn id(&self) -> &str {
        self.sandbox.id()
    }
    fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.sandbox.event_fd()
    }
    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.sandbox.exec_event_fd()
    }
    fn try_wait(&mut self) -> Result<Option<Outcome>, LaneError> {
        Ok(self.sandbox.try_wait()?)
    }
    fn wait(&mut self) -> Result<Outcome, LaneError> {
        Ok(self.sandbox.wait()?)
    }
    fn kill(&mut self, reason: KillReason) -> Result<(), LaneError> {
        Ok(self.sandbox.kill(reason)?)
    }
    fn cleanup(&mut self) -> Result<(), LaneError> {
        Ok(self.sandbox.cleanup()?)
    }
    fn usage(&self) -> Usage {
        let hits = self.sandbox.limit_hits();
        Usage {
            blocked_packets: self.sandbox.blocked_packets(),
            limit_hits: LimitHits {
                oom_kills: hits.oom_kills,
                pids_limit_hits: hits.pids_limit_hits,
            },
        }
    }
    fn is_paused(&self) -> bool {
        self.sandbox.is_paused()
    }
    fn pause(&mut self) -> Result<(), LaneError> {
        Ok(self.sandbox.pause()?)
    }
    fn resume(&mut self) -> Result<(), LaneError> {
        Ok(self.sandbox.resume()?)
    }
    fn isolate_network(&mut self) -> Result<bool, LaneError> {
        Ok(self.sandbox.isolate_network()?)
    }
    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, LaneError> {
        Ok(self.sandbox.throttle_cpu(cpus)?)
    }
    fn start_work(&mut self, work: Work<'_>, stdio: [BorrowedFd<'_>; 3]) -> Result<u64, LaneError> {
        match work {
            Work::Exec(command, env, workdir) => {
                let request = ExecRequest {
                    command: command.to_vec(),
                    env: env.to_vec(),
                    workdir: workdir.map(str::to_string),
                };
                Ok(self.sandbox.exec(&request, stdio)?)
            }
            Work::File(..) => Err(LaneError {
                code: ErrorCode::Unsupported,
                message: "file operations are not available yet".into(),
            }),
        }
    }
    fn kill_work(&mut self, id: u64) -> Result<(), LaneError> {
        Ok(self.sandbox.kill_exec(id)?)
    }
    fn try_wait_work(&mut self, id: u64) -> Result<Option<Termination>, LaneError> {
        Ok(self.sandbox.wait_exec(id, Some(Duration::ZERO))?)
    }
}
