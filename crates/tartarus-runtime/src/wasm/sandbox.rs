//! One sandbox of the Wasm lane: the program compiled at prepare, the scratch directory, the guest's
//! thread and its ticker, the outcome, and cleanup on every path.
//!
//! The ticker advances the engine's epoch every [`TICK`] while the guest runs, asks for the stop when the
//! timeout is reached, and signals the eventfd when a stopped guest has not ended within
//! [`ABANDON_AFTER`] (it is blocked in a host call, e.g. writing to a stdout nobody reads; stdin comes
//! through a pump that closes it at a stop, so a read ends): the sandbox then reports the stop as its
//! outcome and leaves the thread behind, holding only its own copies of the stdio descriptors and the
//! scratch preopen until that call returns.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags, PollFd, PollFlags};

use super::guest::{self, Control, GuestEnd, NotAProgram, Program, RunConfig};
use super::scratch::Scratch;
use super::{stdin, WasmRuntime};
use crate::capabilities::Unsupported;
use crate::sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
use crate::spec::{normalize_sandbox_path, SandboxSpec};

/// How often the epoch advances: the granularity of timeouts and kills.
const TICK: Duration = Duration::from_millis(10);
/// How long a stopped guest may take to reach its next epoch check before it is given up on.
const ABANDON_AFTER: Duration = Duration::from_secs(2);
/// The guest's scratch directory.
pub const SCRATCH_GUEST_PATH: &str = "/tmp";

/// Why `command[0]` cannot run, found at prepare and reported by start (with a shell's exit code).
#[derive(Debug)]
enum Unrunnable {
    NotFound(String),
    NotAProgram { command: String, why: String },
}

pub struct WasmSandbox {
    id: String,
    state: SandboxState,
    engine: wasmtime::Engine,
    program: Result<Program, Unrunnable>,
    spec: SandboxSpec,
    memory_cap_bytes: u64,
    scratch_parent: PathBuf,
    scratch: Option<Scratch>,
    event: OwnedFd,
    running: Option<Running>,
    outcome: Option<Outcome>,
}

struct Running {
    control: Arc<Control>,
    guest: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    stdin_pump: Option<JoinHandle<()>>,
    started: Instant,
}

fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
    move |source| PrepareError::Host { what, source }
}

impl WasmSandbox {
    pub(super) fn prepare(runtime: &WasmRuntime, spec: SandboxSpec) -> Result<WasmSandbox, PrepareError> {
        spec.validate()?;
        runtime.supports(&spec)?;
        if spec.mounts.iter().any(|m| m.writable) {
            return Err(Unsupported {
                lane: "wasm",
                knob: "writable bind mounts (mounts with :rw; read-only ones are preopened)",
            }
            .into());
        }
        for mount in &spec.mounts {
            let source = match std::fs::metadata(&mount.source) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => {
                    io::Error::other("it is not a directory (a Wasm guest's mount is a preopened directory)")
                }
                Err(e) => e,
            };
            return Err(PrepareError::MountSource {
                path: mount.source.display().to_string(),
                source,
            });
        }
        if let Some(workdir) = &spec.workdir {
            if normalize_sandbox_path(workdir) != std::path::Path::new(SCRATCH_GUEST_PATH) {
                return Err(Unsupported {
                    lane: "wasm",
                    knob: "a working directory other than /tmp (workdir)",
                }
                .into());
            }
        }
        let id =
            tartarus_hostsys::random_hex(6).map_err(host_err("reading random bytes for the sandbox id"))?;
        let event =
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| PrepareError::Host {
                what: "creating the sandbox's eventfd",
                source: e.into(),
            })?;
        let program = load(runtime.engine(), &spec.command);
        Ok(WasmSandbox {
            id,
            state: SandboxState::Prepared,
            engine: runtime.engine().clone(),
            program,
            memory_cap_bytes: spec.applied_limits().memory_bytes.value().unwrap_or(u64::MAX),
            scratch_parent: runtime.scratch_parent.clone(),
            spec,
            scratch: None,
            event,
            running: None,
            outcome: None,
        })
    }

    /// What the program is (module or component), once prepared; `None` when it cannot run.
    pub fn program_kind(&self) -> Option<&'static str> {
        self.program.as_ref().ok().map(Program::kind)
    }

    /// The scratch directory's host path while the sandbox runs.
    pub fn scratch(&self) -> Option<&Scratch> {
        self.scratch.as_ref()
    }

    fn signal(&self) {
        let _ = rustix::io::write(&self.event, &1u64.to_ne_bytes());
    }

    fn drain_event(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.event, &mut buf);
    }

    /// The outcome from the guest's end (or from a stop whose guest never reached an epoch check).
    fn judge(&self, end: Option<GuestEnd>, control: &Control, wall: Duration) -> Outcome {
        let stop = control.stop().map(|(reason, _)| reason);
        let (termination, reason) = match (end, stop) {
            (None, Some(reason)) | (Some(GuestEnd { trapped: true, .. }), Some(reason)) => {
                (Termination::Signaled(libc::SIGKILL), stop_reason(reason))
            }
            (Some(end), Some(reason)) => (Termination::Exited(end.exit_code), stop_reason(reason)),
            (Some(end), None) if end.growth_refused && (end.trapped || end.exit_code != 0) => {
                (Termination::Exited(end.exit_code), ExitReason::Oom)
            }
            (Some(end), None) => (Termination::Exited(end.exit_code), ExitReason::Exited),
            (None, None) => (Termination::Signaled(libc::SIGKILL), ExitReason::Killed),
        };
        Outcome {
            termination,
            reason,
            wall,
            cpu: end.map_or(Duration::ZERO, |e| e.cpu),
            peak_memory_bytes: end.map_or(0, |e| e.peak_memory_bytes),
        }
    }

    /// Ends the threads: joins the guest if it ended (else leaves it, see the module's text), then the
    /// ticker (which ends within a tick of the guest's end or of the abandon).
    fn finish(&mut self, end: Option<GuestEnd>) -> Outcome {
        let Some(mut running) = self.running.take() else {
            return self.outcome.unwrap_or_else(killed_outcome);
        };
        let outcome = self.judge(end, &running.control, running.started.elapsed());
        if end.is_some() {
            if let Some(guest) = running.guest.take() {
                let _ = guest.join();
            }
        }
        if let Some(ticker) = running.ticker.take() {
            let _ = ticker.join();
        }
        // The pump sees the end (or the stop) within its check interval; one blocked in a read that
        // another reader of the caller's stdin raced it to is left to end with that read.
        if let Some(pump) = running.stdin_pump.take() {
            let deadline = Instant::now() + 4 * TICK + Duration::from_millis(200);
            while !pump.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if pump.is_finished() {
                let _ = pump.join();
            }
        }
        self.state = SandboxState::Finished;
        self.outcome = Some(outcome);
        outcome
    }
}

fn killed_outcome() -> Outcome {
    Outcome {
        termination: Termination::Signaled(libc::SIGKILL),
        reason: ExitReason::Killed,
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        peak_memory_bytes: 0,
    }
}

fn stop_reason(reason: KillReason) -> ExitReason {
    match reason {
        KillReason::Timeout => ExitReason::Timeout,
        KillReason::Requested => ExitReason::Killed,
    }
}

/// Reads and compiles `command[0]` from the host.
fn load(engine: &wasmtime::Engine, command: &[String]) -> Result<Program, Unrunnable> {
    let Some(path) = command.first() else {
        return Err(Unrunnable::NotFound(String::new()));
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Unrunnable::NotFound(path.clone())),
        Err(e) => {
            return Err(Unrunnable::NotAProgram {
                command: path.clone(),
                why: format!("cannot read it: {e}"),
            })
        }
    };
    Program::compile(engine, &bytes).map_err(|NotAProgram(why)| Unrunnable::NotAProgram {
        command: path.clone(),
        why,
    })
}

fn dup_file(fd: BorrowedFd<'_>, what: &'static str) -> Result<File, StartError> {
    rustix::io::fcntl_dupfd_cloexec(fd, 3)
        .map(File::from)
        .map_err(|e| StartError::Host {
            what,
            source: e.into(),
        })
}

impl Sandbox for WasmSandbox {
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
        let program = match &self.program {
            Ok(program) => program.clone(),
            Err(Unrunnable::NotFound(command)) => return Err(StartError::CommandNotFound(command.clone())),
            Err(Unrunnable::NotAProgram { command, why }) => {
                return Err(StartError::NotExecutable {
                    command: format!("{command} is not a Wasm program this lane runs"),
                    source: io::Error::other(why.clone()),
                })
            }
        };
        let name = format!("{}-{}", std::process::id(), self.id);
        let scratch =
            Scratch::create(&self.scratch_parent, &name, self.spec.scratch_bytes).map_err(|source| {
                StartError::Host {
                    what: "creating the sandbox's scratch directory",
                    source,
                }
            })?;
        let mut preopens = vec![(scratch.host_path(), SCRATCH_GUEST_PATH.to_string(), true)];
        preopens.extend(self.spec.mounts.iter().map(|m| {
            (
                m.source.clone(),
                normalize_sandbox_path(&m.target).to_string_lossy().into_owned(),
                false,
            )
        }));
        self.scratch = Some(scratch);
        let control = Arc::new(Control::default());
        let stdin_source = rustix::io::fcntl_dupfd_cloexec(stdio.stdin, 3).map_err(|e| StartError::Host {
            what: "copying the sandbox's stdin",
            source: e.into(),
        })?;
        let (guest_stdin, stdin_pump) =
            stdin::pump(stdin_source, control.clone()).map_err(|source| StartError::Host {
                what: "starting the guest's stdin pump",
                source,
            })?;
        let config = RunConfig {
            args: self.spec.command.clone(),
            env: self.spec.env.clone(),
            preopens,
            memory_cap_bytes: self.memory_cap_bytes,
            stdin: guest_stdin,
            stdout: dup_file(stdio.stdout, "copying the sandbox's stdout")?,
            stderr: dup_file(stdio.stderr, "copying the sandbox's stderr")?,
        };
        let event = rustix::io::fcntl_dupfd_cloexec(&self.event, 3).map_err(|e| StartError::Host {
            what: "copying the sandbox's eventfd",
            source: e.into(),
        })?;
        let started = Instant::now();
        let engine = self.engine.clone();
        let guest_control = control.clone();
        let guest_event = event.try_clone().map_err(|source| StartError::Host {
            what: "copying the sandbox's eventfd",
            source,
        })?;
        let guest = std::thread::Builder::new()
            .name(format!("wasm-{}", self.id))
            .spawn(move || {
                guest::run(&engine, &program, config, &guest_control);
                let _ = rustix::io::write(&guest_event, &1u64.to_ne_bytes());
            })
            .map_err(|source| StartError::Host {
                what: "starting the guest's thread",
                source,
            })?;
        let ticker_control = control.clone();
        let engine = self.engine.clone();
        let timeout = self.spec.timeout;
        let ticker = std::thread::Builder::new()
            .name(format!("wasm-tick-{}", self.id))
            .spawn(move || tick(&engine, &ticker_control, started, timeout, &event));
        let ticker = match ticker {
            Ok(ticker) => ticker,
            Err(source) => {
                // Without a ticker the guest would never see a stop: it must not run at all.
                control.request_stop(KillReason::Requested);
                self.engine.increment_epoch();
                let _ = guest.join();
                return Err(StartError::Host {
                    what: "starting the guest's epoch ticker",
                    source,
                });
            }
        };
        self.running = Some(Running {
            control,
            guest: Some(guest),
            ticker: Some(ticker),
            stdin_pump: Some(stdin_pump),
            started,
        });
        self.state = SandboxState::Running;
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.event.as_fd())
    }

    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError> {
        if let Some(outcome) = self.outcome {
            return Ok(Some(outcome));
        }
        let Some(running) = &self.running else {
            return Err(RuntimeError::State(self.state));
        };
        self.drain_event();
        if let Some(end) = running.control.take_end() {
            return Ok(Some(self.finish(Some(end))));
        }
        match running.control.stop() {
            Some((_, since)) if since >= ABANDON_AFTER => Ok(Some(self.finish(None))),
            _ => Ok(None),
        }
    }

    fn wait(&mut self) -> Result<Outcome, RuntimeError> {
        loop {
            if let Some(outcome) = self.try_wait()? {
                return Ok(outcome);
            }
            let mut fds = [PollFd::new(&self.event, PollFlags::IN)];
            let step = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&step)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    return Err(RuntimeError::Host {
                        what: "waiting for the guest",
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn kill(&mut self, reason: KillReason) -> Result<(), RuntimeError> {
        if !self.state.can_kill() {
            return Err(RuntimeError::State(self.state));
        }
        if let Some(running) = &self.running {
            running.control.request_stop(reason);
            self.engine.increment_epoch();
        }
        Ok(())
    }

    /// No signals in a Wasm guest, so no grace: the stop at once, then up to [`ABANDON_AFTER`] for the
    /// guest to reach its next epoch check.
    fn stop_at_timeout(&mut self) -> Result<(), RuntimeError> {
        self.kill(KillReason::Timeout)?;
        if let Some(running) = &self.running {
            while !running.control.has_ended()
                && running
                    .control
                    .stop()
                    .is_some_and(|(_, since)| since < ABANDON_AFTER)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), RuntimeError> {
        if self.state == SandboxState::CleanedUp {
            return Ok(());
        }
        if self.running.is_some() {
            let _ = self.kill(KillReason::Requested);
            // Bounded: the guest ends at its next epoch check, or is given up on after ABANDON_AFTER.
            self.wait()?;
        }
        if let Some(mut scratch) = self.scratch.take() {
            let path = scratch.host_path();
            scratch.remove().map_err(|source| RuntimeError::Cleanup {
                path: path.display().to_string(),
                source,
            })?;
        }
        self.signal();
        self.state = SandboxState::CleanedUp;
        Ok(())
    }
}

impl Drop for WasmSandbox {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// The ticker: advances the epoch, asks for the stop at the timeout, wakes the sandbox's waiter when a
/// stopped guest is given up on; ends with the guest (or the abandon).
fn tick(
    engine: &wasmtime::Engine,
    control: &Control,
    started: Instant,
    timeout: Option<Duration>,
    event: &OwnedFd,
) {
    loop {
        std::thread::sleep(TICK);
        engine.increment_epoch();
        if control.has_ended() {
            return;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            control.request_stop(KillReason::Timeout);
        }
        if control.stop().is_some_and(|(_, since)| since >= ABANDON_AFTER) {
            let _ = rustix::io::write(event, &1u64.to_ne_bytes());
            return;
        }
    }
}
