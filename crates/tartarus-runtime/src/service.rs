//! The seam between a shim and a long-lived ("service") sandbox of any lane: [`ServiceSandbox`].
//!
//! Place in the data flow: the shim owns one `Box<dyn ServiceSandbox>` from
//! [`crate::Runtime::prepare_service`], starts it, and drives it from a single-threaded event loop: it polls
//! [`crate::Sandbox::event_fd`] (the sandbox ended) and [`ServiceSandbox::exec_event_fd`] (an exec or file
//! operation ended; then [`ServiceSandbox::wait_exec`] with a zero timeout), and moves stdio through the
//! pipes it passed in. Execs and file operations share ids and that one way of ending. Nothing here blocks
//! except `wait_exec` with a timeout, and `exec`/`start_file_op` until the process has started.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::files::FileOp;
use crate::sandbox::{Sandbox, SandboxState, StartError, StdioFds, Termination};

/// A sandbox that stays up and serves execs, file operations and controls.
///
/// Preconditions common to every method: the sandbox was started ([`Sandbox::start`]) and has not ended;
/// otherwise execs fail with [`ExecError::NotRunning`] and controls with [`ServiceError::State`].
pub trait ServiceSandbox: Sandbox {
    /// Runs `request` with the given stdio (the sandbox keeps its own copies); returns once the command has
    /// been executed, or why it could not be ([`ExecError::exit_code`]: 127 not found, 126 not executable).
    fn exec(&mut self, request: &ExecRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError>;
    /// Starts a file operation under the same walls as an exec, moving data through `stdio` (see
    /// [`crate::files`]); its end is observed with [`ServiceSandbox::wait_exec`] and decoded with
    /// [`crate::files::decode_outcome`]. A malformed path is refused here, with [`ExecError::Invalid`].
    fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError>;
    /// Readable when an exec or file operation may have ended; then call [`ServiceSandbox::wait_exec`] with
    /// a zero timeout. `None` before the start, and for a sandbox not prepared as a service sandbox.
    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Waits up to `timeout` (forever with `None`) for exec `id` to end; `Ok(None)` when it has not.
    fn wait_exec(&mut self, id: ExecId, timeout: Option<Duration>) -> Result<Option<Termination>, ExecError>;
    /// Kills exec `id` and every process it started; its end is still reported by `wait_exec`.
    fn kill_exec(&mut self, id: ExecId) -> Result<(), ExecError>;
    /// Asks every process of the sandbox but its init to end (SIGTERM), the first step of a graceful stop;
    /// the caller kills the sandbox ([`crate::Sandbox::kill`]) when its grace period is over.
    /// [`ServiceErrorKind::Unsupported`] when this sandbox cannot reach its processes that way (the caller
    /// then kills at once).
    fn terminate(&mut self) -> Result<(), ServiceError> {
        Err(ServiceError::Unsupported {
            operation: "terminate",
            why: "this lane cannot signal its processes",
        })
    }
    /// After [`ServiceSandbox::terminate`]: whether every process but init has ended, so that a graceful
    /// stop can end the sandbox now instead of at the end of its grace period (init of a sandbox without a
    /// main command never exits on its own). False when the lane cannot tell.
    fn terminated(&self) -> bool {
        false
    }
    /// Freezes every process; [`ServiceErrorKind::Unsupported`] when this sandbox cannot be frozen.
    fn pause(&mut self) -> Result<(), ServiceError>;
    /// Thaws a paused sandbox; a no-op when it is not paused.
    fn resume(&mut self) -> Result<(), ServiceError>;
    fn is_paused(&self) -> bool;
    /// What the sandbox has used and run into so far.
    fn usage(&self) -> Usage;
    /// Lowers the CPU quota to `cpus` cores; false when the sandbox has no CPU control to lower.
    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, ServiceError>;
    /// Cuts the sandbox's egress network off (quarantine); false when it has none to cut.
    fn isolate_network(&mut self) -> Result<bool, ServiceError>;
    /// A TCP connection to `127.0.0.1:port` inside the sandbox's own network namespace, made from outside
    /// it (preview URLs, the in-sandbox daemons): the sandbox is never opened to the host's network, and a
    /// `network: none` sandbox is reachable this way too. Nothing listening is [`ServiceError::Connect`]
    /// with `ConnectionRefused`; [`ServiceErrorKind::Unsupported`] when the lane has no namespace to enter.
    fn connect_port(&mut self, port: u16) -> Result<OwnedFd, ServiceError> {
        let _ = port;
        Err(ServiceError::Unsupported {
            operation: "connecting to a port",
            why: "this lane has no network namespace the host can enter",
        })
    }
    /// Pause to disk: saves the sandbox's whole state — memory, processes, the files of its scratch
    /// space — into the empty directory `dir`, then ends the sandbox (its outcome is then collected as for
    /// any end, with [`crate::Sandbox::wait`]). A sandbox of the same spec continues from `dir` with
    /// [`ServiceSandbox::restore`]. The caller refuses it while an exec is attached (the shim does: the
    /// exec's streams are its own and cannot cross); an attached exec would end with the sandbox.
    /// Processes started in the background continue after the restore.
    /// [`ServiceErrorKind::Unsupported`] when the lane cannot save memory.
    fn hibernate(&mut self, dir: &Path) -> Result<(), ServiceError> {
        let _ = dir;
        Err(ServiceError::Unsupported {
            operation: "pausing to disk",
            why: "this lane cannot save a sandbox's memory and processes",
        })
    }
    /// Starts this prepared sandbox from the state [`ServiceSandbox::hibernate`] saved in `dir` (of a
    /// sandbox of the same spec), instead of [`crate::Sandbox::start`]; the main command's stdio is `stdio`.
    fn restore(&mut self, dir: &Path, stdio: StdioFds<'_>) -> Result<(), StartError> {
        let _ = (dir, stdio);
        Err(StartError::Host {
            what: "this lane cannot restore a sandbox from a snapshot",
            source: io::Error::from(io::ErrorKind::Unsupported),
        })
    }
}

/// One exec or file operation of a service sandbox; unique for the sandbox's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecId(u64);

impl ExecId {
    pub const fn from_raw(raw: u64) -> Self {
        ExecId(raw)
    }

    pub const fn as_raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ExecId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A command to run inside a running service sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Vec<String>,
    /// Added to (and overriding) the sandbox's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the sandbox; the sandbox user's home when `None`.
    #[serde(default)]
    pub workdir: Option<String>,
}

/// An exec or file operation that did not start, or whose channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("this sandbox was not started as a service sandbox")]
    NotService,
    #[error("the sandbox is not running")]
    NotRunning,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{message}")]
    Start { exit_code: i32, message: String },
    /// The lane cannot do this at all (its [`crate::LaneCapabilities`] say so); retrying will not help.
    #[error("the {lane} lane cannot do {operation}")]
    Unsupported {
        lane: &'static str,
        operation: &'static str,
    },
    #[error("sandbox control channel failed")]
    Channel(#[source] io::Error),
}

impl ExecError {
    /// The exit code a shell would report: 127 not found, 126 not executable, 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecError::Start { exit_code, .. } => *exit_code,
            _ => 125,
        }
    }
}

/// A control (pause, resume, throttle, isolate) that failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("sandbox is {0:?}; operation not allowed")]
    State(SandboxState),
    /// This sandbox (or its lane) cannot do it at all; retrying will not help.
    #[error("{operation} is not supported here: {why}")]
    Unsupported {
        operation: &'static str,
        why: &'static str,
    },
    /// The host failed to do it (a cgroup write).
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("changing the sandbox's network failed")]
    Network(#[source] tartarus_network::NetworkError),
    /// Connecting to a port inside the sandbox failed (`ConnectionRefused`: nothing listens there).
    #[error("connecting to port {port} inside the sandbox failed")]
    Connect {
        port: u16,
        #[source]
        source: io::Error,
    },
    /// Not now, for the reason given (an exec is attached, the disk has too little room); the sandbox is
    /// untouched and the operation may work later.
    #[error("{operation} refused: {why}")]
    Refused { operation: &'static str, why: String },
}

/// How a caller should treat a [`ServiceError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceErrorKind {
    /// Not in a state that allows it (not started, already ended).
    State,
    /// The lane or this sandbox cannot do it.
    Unsupported,
    /// The host failed; it may work later.
    Unavailable,
}

impl ServiceError {
    pub fn kind(&self) -> ServiceErrorKind {
        match self {
            ServiceError::State(_) | ServiceError::Refused { .. } => ServiceErrorKind::State,
            ServiceError::Unsupported { .. } => ServiceErrorKind::Unsupported,
            ServiceError::Host { .. } | ServiceError::Network(_) | ServiceError::Connect { .. } => {
                ServiceErrorKind::Unavailable
            }
        }
    }
}

/// What a service sandbox has used and run into so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Packets the egress contract dropped; `None` without egress.
    pub blocked_packets: Option<u64>,
    pub limit_hits: LimitHits,
    /// CPU time used so far, in microseconds; `None` where the lane cannot tell.
    pub cpu_usec: Option<u64>,
    /// Memory in use now, in bytes; `None` where the lane cannot tell.
    pub memory_bytes: Option<u64>,
}

/// Counters of a sandbox hitting its limits: OOM kills inside it and forks refused at its pids limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LimitHits {
    pub oom_kills: u64,
    pub pids_limit_hits: u64,
}
