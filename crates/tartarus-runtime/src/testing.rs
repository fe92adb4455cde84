//! Test doubles of this crate's seams, for callers' tests: [`FakeServiceSandbox`] stands in for a
//! [`ServiceSandbox`] of any lane, so an event loop (the shim's) can be driven without root or a kernel
//! sandbox.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::EventfdFlags;

use crate::files::{self, FileOp};
use crate::sandbox::{
    ExitReason, KillReason, Outcome, RuntimeError, Sandbox, SandboxState, StartError, StdioFds, Termination,
};
use crate::service::{ExecError, ExecId, ExecRequest, ServiceError, ServiceSandbox, Usage};

/// One call the fake received, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeCall {
    Start,
    Exec(ExecRequest),
    FileOp(FileOp),
    KillExec(ExecId),
    Pause,
    Resume,
    ThrottleCpu(f64),
    IsolateNetwork,
    Terminate,
    Kill(KillReason),
    Cleanup,
}

/// What `pause` and `resume` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseBehaviour {
    Works,
    /// [`ServiceError::Unsupported`], as a sandbox without a freezer answers.
    Unsupported,
    /// [`ServiceError::Host`], as a failed cgroup write answers.
    HostFails,
}

/// What `terminate` (SIGTERM to every process but init) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateBehaviour {
    /// [`ServiceError::Unsupported`], as a lane that cannot signal its processes answers (the default).
    Unsupported,
    /// Every process but init ends at the signal: [`ServiceSandbox::terminated`] answers true after it.
    EndsAll,
    /// The processes ignore the signal: the sandbox lives until it is killed.
    Ignored,
}

/// A scriptable, recording [`ServiceSandbox`] with real event descriptors (eventfds): the sandbox's
/// becomes readable when the test ends the sandbox ([`Self::finish`], or a `kill`), the exec one while an
/// exec or file operation ended by the test ([`Self::finish_exec`], or a `kill_exec`) has not been
/// collected with `wait_exec`. Nothing blocks: `wait_exec` on a running exec answers `None` at once.
pub struct FakeServiceSandbox {
    id: String,
    state: SandboxState,
    calls: Vec<FakeCall>,
    event: OwnedFd,
    exec_event: OwnedFd,
    next_exec: u64,
    /// The stdio of each running exec (the fake's own copies, closed when it ends).
    running: BTreeMap<ExecId, [OwnedFd; 3]>,
    finished: BTreeMap<ExecId, Termination>,
    next_exec_error: Option<ExecError>,
    pause: PauseBehaviour,
    paused: bool,
    terminate: TerminateBehaviour,
    terminated: bool,
    usage: Usage,
    throttles: bool,
    has_network: bool,
    outcome: Option<Outcome>,
}

fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

fn signal(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn reset(fd: &OwnedFd) {
    let mut count = [0u8; 8];
    let _ = rustix::io::read(fd, &mut count);
}

impl FakeServiceSandbox {
    /// A prepared sandbox whose pause works, with zero usage, that can throttle and has no network.
    pub fn new(id: &str) -> io::Result<Self> {
        Ok(FakeServiceSandbox {
            id: id.to_string(),
            state: SandboxState::Prepared,
            calls: Vec::new(),
            event: eventfd()?,
            exec_event: eventfd()?,
            next_exec: 1,
            running: BTreeMap::new(),
            finished: BTreeMap::new(),
            next_exec_error: None,
            pause: PauseBehaviour::Works,
            paused: false,
            terminate: TerminateBehaviour::Unsupported,
            terminated: false,
            usage: Usage::default(),
            throttles: true,
            has_network: false,
            outcome: None,
        })
    }

    pub fn calls(&self) -> &[FakeCall] {
        &self.calls
    }

    /// Execs and file operations started and not ended, oldest first.
    pub fn running_execs(&self) -> Vec<ExecId> {
        self.running.keys().copied().collect()
    }

    /// The stdio a running exec was given, to play the command: write its output, read its input.
    pub fn exec_stdio(&self, id: ExecId) -> Option<StdioFds<'_>> {
        self.running.get(&id).map(|[stdin, stdout, stderr]| StdioFds {
            stdin: stdin.as_fd(),
            stdout: stdout.as_fd(),
            stderr: stderr.as_fd(),
        })
    }

    /// Ends a running exec as `termination`: its stdio is closed and the exec event fd becomes readable.
    /// False when `id` is not running.
    pub fn finish_exec(&mut self, id: ExecId, termination: Termination) -> bool {
        if self.running.remove(&id).is_none() {
            return false;
        }
        self.finished.insert(id, termination);
        signal(&self.exec_event);
        true
    }

    /// The next exec or file operation fails to start with `error`.
    pub fn fail_next_exec(&mut self, error: ExecError) {
        self.next_exec_error = Some(error);
    }

    pub fn set_pause(&mut self, behaviour: PauseBehaviour) {
        self.pause = behaviour;
    }

    pub fn set_terminate(&mut self, behaviour: TerminateBehaviour) {
        self.terminate = behaviour;
    }

    pub fn set_usage(&mut self, usage: Usage) {
        self.usage = usage;
    }

    /// What `throttle_cpu` answers (whether there was a CPU control to lower).
    pub fn set_throttles(&mut self, throttles: bool) {
        self.throttles = throttles;
    }

    /// What `isolate_network` answers (whether there was a network to cut).
    pub fn set_network(&mut self, has_network: bool) {
        self.has_network = has_network;
    }

    /// Ends the sandbox with `outcome`; the event fd becomes readable.
    pub fn finish(&mut self, outcome: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
            self.state = SandboxState::Finished;
            signal(&self.event);
        }
    }

    fn start_process(&mut self, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        if self.state != SandboxState::Running {
            return Err(ExecError::NotRunning);
        }
        if let Some(error) = self.next_exec_error.take() {
            return Err(error);
        }
        let copy = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(ExecError::Channel);
        let fds = [copy(stdio.stdin)?, copy(stdio.stdout)?, copy(stdio.stderr)?];
        let id = ExecId::from_raw(self.next_exec);
        self.next_exec += 1;
        self.running.insert(id, fds);
        Ok(id)
    }

    fn require_running(&self) -> Result<(), ServiceError> {
        match self.state {
            SandboxState::Running => Ok(()),
            state => Err(ServiceError::State(state)),
        }
    }

    fn pause_outcome(&self, what: &'static str) -> Result<(), ServiceError> {
        self.require_running()?;
        match self.pause {
            PauseBehaviour::Works => Ok(()),
            PauseBehaviour::Unsupported => Err(ServiceError::Unsupported {
                operation: "pause",
                why: "the fake was told it has no freezer",
            }),
            PauseBehaviour::HostFails => Err(ServiceError::Host {
                what,
                source: io::Error::other("scripted failure"),
            }),
        }
    }
}

impl Sandbox for FakeServiceSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> SandboxState {
        self.state
    }

    fn start(&mut self, _stdio: StdioFds<'_>) -> Result<(), StartError> {
        self.calls.push(FakeCall::Start);
        if !self.state.can_start() {
            return Err(StartError::State(self.state));
        }
        self.state = SandboxState::Running;
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        (self.state != SandboxState::Prepared).then(|| self.event.as_fd())
    }

    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError> {
        match (self.outcome, self.state) {
            (Some(outcome), _) => Ok(Some(outcome)),
            (None, SandboxState::Running) => Ok(None),
            (None, state) => Err(RuntimeError::State(state)),
        }
    }

    /// The outcome given to [`FakeServiceSandbox::finish`] (or of a kill); an error when there is none yet,
    /// since nothing else could end the fake.
    fn wait(&mut self) -> Result<Outcome, RuntimeError> {
        self.outcome.ok_or(RuntimeError::Host {
            what: "the fake sandbox was not told how it ends",
            source: io::ErrorKind::WouldBlock.into(),
        })
    }

    /// Ends the sandbox as killed by SIGKILL (`reason` timeout or killed), as a real one reports it.
    fn kill(&mut self, reason: KillReason) -> Result<(), RuntimeError> {
        self.calls.push(FakeCall::Kill(reason));
        if self.state == SandboxState::Running {
            self.finish(Outcome {
                termination: Termination::Signaled(libc::SIGKILL),
                reason: match reason {
                    KillReason::Timeout => ExitReason::Timeout,
                    KillReason::Requested => ExitReason::Killed,
                },
                wall: Duration::ZERO,
                cpu: Duration::ZERO,
                peak_memory_bytes: 0,
            });
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), RuntimeError> {
        self.calls.push(FakeCall::Cleanup);
        self.running.clear();
        self.state = SandboxState::CleanedUp;
        Ok(())
    }
}

impl ServiceSandbox for FakeServiceSandbox {
    fn exec(&mut self, request: &ExecRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        self.calls.push(FakeCall::Exec(request.clone()));
        self.start_process(stdio)
    }

    fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        self.calls.push(FakeCall::FileOp(op.clone()));
        files::check_path(op.path()).map_err(|e| ExecError::Invalid(e.message))?;
        self.start_process(stdio)
    }

    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>> {
        (self.state != SandboxState::Prepared).then(|| self.exec_event.as_fd())
    }

    fn wait_exec(
        &mut self,
        id: ExecId,
        _timeout: Option<Duration>,
    ) -> Result<Option<Termination>, ExecError> {
        let Some(termination) = self.finished.remove(&id) else {
            return Ok(None);
        };
        if self.finished.is_empty() {
            reset(&self.exec_event);
        }
        Ok(Some(termination))
    }

    /// Ends a running exec as killed by SIGKILL.
    fn kill_exec(&mut self, id: ExecId) -> Result<(), ExecError> {
        self.calls.push(FakeCall::KillExec(id));
        self.finish_exec(id, Termination::Signaled(libc::SIGKILL));
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ServiceError> {
        self.calls.push(FakeCall::Pause);
        self.pause_outcome("freezing the sandbox")?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.calls.push(FakeCall::Resume);
        if self.paused {
            self.pause_outcome("thawing the sandbox")?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn terminate(&mut self) -> Result<(), ServiceError> {
        self.calls.push(FakeCall::Terminate);
        if self.terminate == TerminateBehaviour::Unsupported {
            return Err(ServiceError::Unsupported {
                operation: "terminate",
                why: "the fake was told it cannot signal its processes",
            });
        }
        self.require_running()?;
        self.terminated = self.terminate == TerminateBehaviour::EndsAll;
        Ok(())
    }

    fn terminated(&self) -> bool {
        self.terminated
    }

    fn usage(&self) -> Usage {
        self.usage
    }

    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, ServiceError> {
        self.calls.push(FakeCall::ThrottleCpu(cpus));
        self.require_running()?;
        Ok(self.throttles)
    }

    fn isolate_network(&mut self) -> Result<bool, ServiceError> {
        self.calls.push(FakeCall::IsolateNetwork);
        self.require_running()?;
        Ok(self.has_network)
    }
}

#[cfg(test)]
mod tests {
    use rustix::event::{PollFd, PollFlags};

    use super::*;
    use crate::service::{LimitHits, ServiceErrorKind};

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).expect("poll") > 0
    }

    fn started() -> FakeServiceSandbox {
        let mut fake = FakeServiceSandbox::new("fake").expect("eventfds");
        fake.start(StdioFds::inherit()).expect("start");
        fake
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
    }

    #[test]
    fn an_exec_ends_when_the_test_says_so_and_its_event_fd_tells() {
        let mut fake = started();
        let (out_read, out_write) = pipe();
        let request = ExecRequest {
            command: vec!["true".into()],
            env: Vec::new(),
            workdir: None,
        };
        let stdio = StdioFds {
            stdout: out_write.as_fd(),
            ..StdioFds::inherit()
        };
        let id = fake.exec(&request, stdio).expect("exec");
        drop(out_write);
        assert_eq!(fake.running_execs(), [id]);
        let events = fake
            .exec_event_fd()
            .expect("started")
            .try_clone_to_owned()
            .expect("dup");
        assert!(!readable(events.as_fd()));
        assert_eq!(fake.wait_exec(id, Some(Duration::ZERO)).expect("wait"), None);

        // The test plays the command: output, then exit 3.
        let stdout = fake.exec_stdio(id).expect("running").stdout;
        rustix::io::write(stdout, b"hi").expect("write");
        assert!(fake.finish_exec(id, Termination::Exited(3)));
        assert!(readable(events.as_fd()));
        assert_eq!(
            fake.wait_exec(id, Some(Duration::ZERO)).expect("wait"),
            Some(Termination::Exited(3))
        );
        assert!(!readable(events.as_fd()), "collected: no longer readable");
        let mut buf = [0u8; 8];
        assert_eq!(rustix::io::read(&out_read, &mut buf).expect("read"), 2);
        assert_eq!(
            rustix::io::read(&out_read, &mut buf).expect("eof"),
            0,
            "stdio closed at the end"
        );
        assert_eq!(fake.calls(), [FakeCall::Start, FakeCall::Exec(request)]);
    }

    #[test]
    fn kill_exec_ends_it_as_sigkill() {
        let mut fake = started();
        let op = FileOp::Read {
            path: "/etc/hostname".into(),
        };
        let id = fake.start_file_op(&op, StdioFds::inherit()).expect("file op");
        fake.kill_exec(id).expect("kill");
        assert_eq!(
            fake.wait_exec(id, None).expect("wait"),
            Some(Termination::Signaled(libc::SIGKILL))
        );
        assert_eq!(fake.calls()[1..], [FakeCall::FileOp(op), FakeCall::KillExec(id)]);
    }

    #[test]
    fn scripted_failures_surface_with_their_kinds() {
        let mut fake = started();
        fake.set_pause(PauseBehaviour::Unsupported);
        assert_eq!(
            fake.pause().map_err(|e| e.kind()),
            Err(ServiceErrorKind::Unsupported)
        );
        assert!(!fake.is_paused());
        fake.set_pause(PauseBehaviour::HostFails);
        assert_eq!(
            fake.pause().map_err(|e| e.kind()),
            Err(ServiceErrorKind::Unavailable)
        );
        fake.set_pause(PauseBehaviour::Works);
        fake.pause().expect("pause");
        assert!(fake.is_paused());

        fake.fail_next_exec(ExecError::Start {
            exit_code: 127,
            message: "command not found: nope".into(),
        });
        let request = ExecRequest {
            command: vec!["nope".into()],
            env: Vec::new(),
            workdir: None,
        };
        assert_eq!(
            fake.exec(&request, StdioFds::inherit())
                .map_err(|e| e.exit_code()),
            Err(127)
        );
        let dotdot = FileOp::List {
            path: "/tmp/../etc".into(),
        };
        assert!(matches!(
            fake.start_file_op(&dotdot, StdioFds::inherit()),
            Err(ExecError::Invalid(_))
        ));
    }

    #[test]
    fn usage_and_controls_answer_what_they_were_told() {
        let mut fake = started();
        let usage = Usage {
            blocked_packets: Some(7),
            limit_hits: LimitHits {
                oom_kills: 1,
                pids_limit_hits: 2,
            },
            cpu_usec: Some(1_500_000),
            memory_bytes: Some(64 << 20),
        };
        fake.set_usage(usage);
        fake.set_throttles(false);
        fake.set_network(true);
        assert_eq!(fake.usage(), usage);
        assert!(!fake.throttle_cpu(0.25).expect("throttle"));
        assert!(fake.isolate_network().expect("isolate"));
        assert_eq!(
            fake.calls()[1..],
            [FakeCall::ThrottleCpu(0.25), FakeCall::IsolateNetwork]
        );
    }

    #[test]
    fn a_kill_ends_the_sandbox_and_its_event_fd_tells() {
        let mut fake = started();
        assert!(!readable(fake.event_fd().expect("started")));
        assert_eq!(fake.try_wait().expect("running"), None);
        fake.kill(KillReason::Timeout).expect("kill");
        assert!(readable(fake.event_fd().expect("ended")));
        let outcome = fake.try_wait().expect("ended").expect("an outcome");
        assert_eq!(outcome.reason, ExitReason::Timeout);
        assert_eq!(outcome.termination, Termination::Signaled(libc::SIGKILL));
        assert!(matches!(
            fake.exec(
                &ExecRequest {
                    command: vec!["x".into()],
                    env: Vec::new(),
                    workdir: None
                },
                StdioFds::inherit()
            ),
            Err(ExecError::NotRunning)
        ));
    }
}
