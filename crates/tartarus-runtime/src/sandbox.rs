//! The `Runtime` trait every isolation backend implements, and the lifecycle types it shares.
//!
//! Lifecycle: [`Runtime::prepare`] → [`Sandbox::start`] → [`Sandbox::wait`] (or poll [`Sandbox::event_fd`] and
//! call [`Sandbox::try_wait`]) → [`Sandbox::kill`] at any point → [`Sandbox::cleanup`]. `cleanup` is
//! idempotent and also runs on drop, so no exit path leaks host resources.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::capabilities::{LaneCapabilities, Unsupported};
use crate::service::ServiceSandbox;
use crate::spec::{SandboxSpec, SpecError};

/// An isolation backend: the process, gVisor, microVM and Wasm lanes.
pub trait Runtime {
    /// Short stable name, e.g. `process`.
    fn name(&self) -> &'static str;
    /// What this lane can honour. Conditions of the host (root for egress, a freezer for pause) are not
    /// part of it: they are reported when the operation is asked for.
    fn capabilities(&self) -> LaneCapabilities;
    /// Refuses a spec that asks for a knob this lane cannot honour, naming the knob and the lane.
    /// [`Runtime::prepare`] and [`Runtime::prepare_service`] check it too.
    fn supports(&self, spec: &SandboxSpec) -> Result<(), Unsupported> {
        self.capabilities().check(self.name(), spec)
    }
    /// Validates `spec` against this host and reserves what the sandbox needs (cgroups, descriptors for the
    /// root), without starting anything.
    fn prepare(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError>;
    /// [`Runtime::prepare`] for a long-lived sandbox that serves execs, file operations and controls
    /// (`spec.service` is set whatever the caller gave).
    fn prepare_service(&self, spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError>;
}

/// One sandbox of some runtime.
pub trait Sandbox {
    fn id(&self) -> &str;
    fn state(&self) -> SandboxState;
    /// Starts the command with the given standard descriptors. Returns once the command has been
    /// executed, or with the reason it could not be.
    fn start(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError>;
    /// A descriptor that becomes readable when the sandbox may have finished; then call [`Sandbox::try_wait`].
    fn event_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Collects the outcome if the sandbox has finished, without blocking.
    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError>;
    /// Blocks until the sandbox finishes, killing it when `timeout` (from the start) elapses first.
    fn wait(&mut self) -> Result<Outcome, RuntimeError>;
    /// Kills every process of the sandbox; `reason` is reported in the outcome.
    fn kill(&mut self, reason: KillReason) -> Result<(), RuntimeError>;
    /// The sandbox's timeout ended: stop it with reason `timeout`, giving its processes the spec's grace
    /// period between SIGTERM and SIGKILL where the lane can (this call blocks for at most that long).
    /// A lane that cannot signal gracefully kills at once.
    fn stop_at_timeout(&mut self) -> Result<(), RuntimeError> {
        self.kill(KillReason::Timeout)
    }
    /// Removes every host resource of the sandbox. Idempotent.
    fn cleanup(&mut self) -> Result<(), RuntimeError>;
    /// Packets the egress contract dropped so far; `None` without egress (or once cleaned up).
    fn blocked_packets(&self) -> Option<u64> {
        None
    }
}

/// Standard descriptors handed to a command (the main one, an exec, a file operation). The sandbox gets
/// its own copies; the caller's stay open at least until the call that takes them returns.
#[derive(Debug, Clone, Copy)]
pub struct StdioFds<'a> {
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

impl StdioFds<'static> {
    /// The caller's own descriptors 0, 1 and 2, passed through untouched (no copying, no buffering).
    pub fn inherit() -> Self {
        StdioFds {
            stdin: rustix::stdio::stdin(),
            stdout: rustix::stdio::stdout(),
            stderr: rustix::stdio::stderr(),
        }
    }
}

impl<'a> StdioFds<'a> {
    /// All three on one terminal (the slave side of a pty).
    pub fn terminal(fd: BorrowedFd<'a>) -> Self {
        StdioFds {
            stdin: fd,
            stdout: fd,
            stderr: fd,
        }
    }

    /// In descriptor order, as they are passed on.
    pub fn as_array(&self) -> [BorrowedFd<'a>; 3] {
        [self.stdin, self.stdout, self.stderr]
    }
}

/// Lifecycle states; guards say which transitions are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Prepared,
    Running,
    Finished,
    CleanedUp,
}

impl SandboxState {
    pub fn can_start(self) -> bool {
        self == SandboxState::Prepared
    }
    pub fn can_kill(self) -> bool {
        self == SandboxState::Running
    }
}

/// Why we killed a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    Timeout,
    /// Asked for by a user or an operator (signal to the CLI, API call).
    Requested,
}

/// How the command's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
}

impl Termination {
    /// Shell convention: the exit code, or 128 + signal.
    pub fn exit_code(self) -> i32 {
        match self {
            Termination::Exited(code) => code,
            Termination::Signaled(signal) => 128 + signal,
        }
    }
}

/// Why the sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Exited,
    Timeout,
    Oom,
    Killed,
}

impl ExitReason {
    /// Why a sandbox ended, for a lane that learns its command's termination and OOM kills separately:
    /// the supervisor's timeout wins, then an OOM kill of a command that died by a signal, then a kill the
    /// supervisor asked for; otherwise a signal is `killed` and an exit `exited`.
    pub fn judge(killed: Option<KillReason>, oom: bool, termination: Termination) -> ExitReason {
        match (killed, oom, termination) {
            (Some(KillReason::Timeout), _, _) => ExitReason::Timeout,
            (_, true, Termination::Signaled(_)) => ExitReason::Oom,
            (Some(KillReason::Requested), _, _) => ExitReason::Killed,
            (None, _, Termination::Signaled(_)) => ExitReason::Killed,
            (None, _, Termination::Exited(_)) => ExitReason::Exited,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Exited => "exited",
            ExitReason::Timeout => "timeout",
            ExitReason::Oom => "oom",
            ExitReason::Killed => "killed",
        }
    }
}

/// The result of a finished sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub termination: Termination,
    pub reason: ExitReason,
    pub wall: Duration,
    pub cpu: Duration,
    pub peak_memory_bytes: u64,
}

/// `prepare` failed: the spec cannot run on this host.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error("rootfs '{path}' is not a usable directory")]
    Rootfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mount source '{path}' cannot be used")]
    MountSource {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{limit} limit requested but cannot be enforced: {why}")]
    LimitUnavailable { limit: &'static str, why: String },
    /// A default limit (the spec set none and lifted none) that this host cannot enforce: a root supervisor
    /// never runs a sandbox without it.
    #[error("default {limit} limit cannot be enforced: {why}")]
    DefaultLimitUnavailable { limit: &'static str, why: String },
    #[error("cgroup setup failed at {path}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp filter could not be built: {0}")]
    Seccomp(String),
    #[error(transparent)]
    Network(#[from] tartarus_network::NetworkError),
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `start` failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("sandbox is {0:?}; only a prepared sandbox can start")]
    State(SandboxState),
    /// `clone3` (or init's fork) refused for lack of processes: EAGAIN or ENOMEM. Use
    /// [`StartError::from_clone`] to classify a `clone3` error.
    #[error(
        "the host's process limit is reached (pids cgroup or pid_max): the sandbox's processes cannot be \
         created; end other sandboxes or raise the limit"
    )]
    ProcessLimit(#[source] std::io::Error),
    /// `clone3` refused the new namespaces themselves: EPERM, EINVAL or ENOSPC (user namespaces disabled
    /// or exhausted).
    #[error(
        "cannot create the sandbox namespaces (are user namespaces enabled? see user.max_user_namespaces)"
    )]
    Namespaces(#[source] std::io::Error),
    /// `clone3` failed for another reason.
    #[error("cannot create the sandbox's init process")]
    Clone(#[source] std::io::Error),
    #[error("cannot map the sandbox user")]
    IdMap(#[source] std::io::Error),
    #[error("sandbox setup failed: {stage}")]
    Setup {
        stage: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command not found: {0} (not in the sandbox's PATH or root)")]
    CommandNotFound(String),
    #[error("command not executable: {command}")]
    NotExecutable {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox protocol error: {0}")]
    Protocol(String),
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// The error for a failed `clone3` of the sandbox's init, by errno: the process limit (EAGAIN, ENOMEM),
    /// the namespaces (EPERM, EINVAL, ENOSPC, EUSERS), or anything else.
    pub fn from_clone(source: std::io::Error) -> StartError {
        match source.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOMEM) => StartError::ProcessLimit(source),
            Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS) => StartError::Namespaces(source),
            _ => StartError::Clone(source),
        }
    }

    /// The error for init's report that setup step `stage` failed with `errno`: a refused fork is the
    /// process limit too.
    pub fn from_setup(stage: String, errno: i32) -> StartError {
        let source = std::io::Error::from_raw_os_error(errno);
        match (stage.as_str(), errno) {
            ("fork", libc::EAGAIN | libc::ENOMEM) => StartError::ProcessLimit(source),
            _ => StartError::Setup { stage, source },
        }
    }

    /// The exit code a shell would use for this failure: 127 not found, 126 not executable, 125 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::CommandNotFound(_) => 127,
            StartError::NotExecutable { .. } => 126,
            _ => 125,
        }
    }
}

/// Waiting, killing or cleaning up failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("sandbox is {0:?}; operation not allowed")]
    State(SandboxState),
    #[error("{what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cleanup of {path} failed")]
    Cleanup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the sandbox's network failed")]
    Network(#[source] tartarus_network::NetworkError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    #[test]
    fn test_a_clone_refused_for_lack_of_processes_names_the_process_limit_not_user_namespaces() {
        for code in [libc::EAGAIN, libc::ENOMEM] {
            let e = StartError::from_clone(errno(code));
            assert!(matches!(e, StartError::ProcessLimit(_)), "{code}: {e:?}");
            let text = e.to_string();
            assert!(
                text.contains("process limit is reached (pids cgroup or pid_max)"),
                "{text}"
            );
            assert!(!text.contains("user namespaces"), "{text}");
        }
        for code in [libc::EPERM, libc::EINVAL, libc::ENOSPC, libc::EUSERS] {
            let e = StartError::from_clone(errno(code));
            assert!(matches!(e, StartError::Namespaces(_)), "{code}: {e:?}");
            assert!(e.to_string().contains("are user namespaces enabled?"));
        }
        assert!(matches!(
            StartError::from_clone(errno(libc::EFAULT)),
            StartError::Clone(_)
        ));
    }

    #[test]
    fn test_a_refused_fork_in_init_is_the_process_limit_and_other_steps_keep_their_stage() {
        let e = StartError::from_setup("fork".into(), libc::EAGAIN);
        assert!(matches!(e, StartError::ProcessLimit(_)), "{e:?}");
        let e = StartError::from_setup("pivot_root".into(), libc::EAGAIN);
        assert!(
            matches!(e, StartError::Setup { ref stage, .. } if stage == "pivot_root"),
            "{e:?}"
        );
    }
}
