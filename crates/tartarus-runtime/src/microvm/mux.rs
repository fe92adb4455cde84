//! The host's side of the guest's execs: one thread per VM that reads the agent's frames and carries each
//! exec's stdio between the caller's descriptors and the channel, so that every exec of a service sandbox
//! — and a one-shot sandbox's single command — goes through the same path.
//!
//! The thread owns the execs' descriptors; callers register an exec ([`Mux::start_exec`]) and learn of
//! its start and its end through shared state and a condition variable. Two event descriptors tell a
//! caller's event loop without blocking: [`Mux::ended`] is readable once the sandbox is over (the channel
//! closed, or its main command ended), [`Mux::exec_events`] counts execs that ended and were not yet
//! collected (a semaphore: readable exactly while one waits).
//!
//! One exec never stalls another: a service sandbox's output descriptors are non-blocking, output its
//! reader has not taken waits in a buffer, and past [`OUTPUT_HIGH`] the guest is told to stop reading that
//! exec's pipes ([`HostFrame::HoldOutput`]) until the buffer is written. Stdin is forwarded only while the
//! guest has room for it ([`GuestFrame::HoldInput`]).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};

use super::channel::Channel;
use super::protocol::{self, decode, encode, FailKind, GuestFrame, HostFrame, RunRequest, MAIN_EXEC};

/// Output of one exec the host holds for a slow reader before the guest is asked to hold back.
pub const OUTPUT_HIGH: usize = 1 << 20;

/// The guest's report of a command's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnd {
    Exited(GuestExit),
    /// The VM ended before the guest reported it.
    Lost,
}

/// The caller's descriptors of one exec (the mux's own copies).
pub struct ExecStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Write output with blocking writes (a one-shot command's own terminal or files: nothing else
    /// shares the mux, and the caller's descriptors must not be made non-blocking).
    pub blocking: bool,
}

/// An exec id the multiplexer does not know (never started, or its end was collected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no exec {0}")]
pub struct UnknownExec(pub u64);

/// Why an exec did not start.
#[derive(Debug)]
pub enum StartFailure {
    Failed {
        kind: FailKind,
        message: String,
    },
    /// The channel closed first (the VM ended), with the agent's message when it said why.
    VmEnded(Option<String>),
    TimedOut,
    Io(io::Error),
}

#[derive(Debug)]
enum Phase {
    Starting,
    Failed(FailKind, String),
    Running,
    Done(ExecEnd),
}

#[derive(Debug, Default)]
struct State {
    phases: BTreeMap<u64, Phase>,
    /// Execs whose end nobody collects (the port connector's): forgotten when they end.
    detached: std::collections::BTreeSet<u64>,
    /// The channel closed: `Some(None)`, or `Some(Some(why))` when the agent or the channel failed.
    closed: Option<Option<String>>,
    oom_kills: u64,
    pids_limit_hits: u64,
    terminated: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Registration {
    id: u64,
    stdio: ExecStdio,
}

/// A VM's exec multiplexer.
pub struct Mux {
    shared: Arc<Shared>,
    writer: Arc<Mutex<UnixStream>>,
    registrations: mpsc::Sender<Registration>,
    wake: OwnedFd,
    ended: OwnedFd,
    exec_events: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

fn eventfd(flags: EventfdFlags) -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK | flags,
    )?)
}

fn signal(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

impl Mux {
    /// Starts the thread over `channel` (after the agent's `ready`).
    pub fn start(channel: Channel) -> io::Result<Mux> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let writer = Arc::new(Mutex::new(channel.stream.try_clone()?));
        let (registrations, received) = mpsc::channel();
        let wake = eventfd(EventfdFlags::empty())?;
        let ended = eventfd(EventfdFlags::empty())?;
        let exec_events = eventfd(EventfdFlags::SEMAPHORE)?;
        let worker = Worker {
            shared: Arc::clone(&shared),
            writer: Arc::clone(&writer),
            registrations: received,
            wake: wake.try_clone()?,
            ended: ended.try_clone()?,
            exec_events: exec_events.try_clone()?,
            execs: BTreeMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("microvm-mux".into())
            .spawn(move || worker.run(channel))?;
        Ok(Mux {
            shared,
            writer,
            registrations,
            wake,
            ended,
            exec_events,
            thread: Some(thread),
        })
    }

    pub fn send(&self, frame: &HostFrame) -> io::Result<()> {
        send(&self.writer, frame)
    }

    /// Readable once the sandbox is over: the channel closed, or the main command's end was collected by
    /// the thread.
    pub fn ended(&self) -> BorrowedFd<'_> {
        self.ended.as_fd()
    }

    /// Readable while an exec other than the main command has ended and was not collected.
    pub fn exec_events(&self) -> BorrowedFd<'_> {
        self.exec_events.as_fd()
    }

    pub fn is_over(&self) -> bool {
        let state = self.shared.lock();
        state.closed.is_some() || matches!(state.phases.get(&MAIN_EXEC), Some(Phase::Done(_)))
    }

    /// Starts exec `id`: registers its descriptors, sends the run and waits (until `deadline`) for the
    /// guest's answer.
    pub fn start_exec(
        &self,
        id: u64,
        run: RunRequest,
        stdio: ExecStdio,
        deadline: Instant,
    ) -> Result<(), StartFailure> {
        {
            let mut state = self.shared.lock();
            if let Some(closed) = &state.closed {
                return Err(StartFailure::VmEnded(closed.clone()));
            }
            state.phases.insert(id, Phase::Starting);
        }
        let forget = |failure: StartFailure| {
            self.shared.lock().phases.remove(&id);
            Err(failure)
        };
        if self.registrations.send(Registration { id, stdio }).is_err() {
            return forget(StartFailure::VmEnded(None));
        }
        signal(&self.wake);
        if let Err(e) = self.send(&HostFrame::Exec { id, run }) {
            return forget(StartFailure::Io(e));
        }
        let mut state = self.shared.lock();
        loop {
            match state.phases.get(&id) {
                Some(Phase::Running) | Some(Phase::Done(_)) => return Ok(()),
                Some(Phase::Failed(..)) => {
                    let Some(Phase::Failed(kind, message)) = state.phases.remove(&id) else {
                        unreachable!("matched above");
                    };
                    return Err(StartFailure::Failed { kind, message });
                }
                _ => {}
            }
            if let Some(closed) = &state.closed {
                let closed = closed.clone();
                state.phases.remove(&id);
                return Err(StartFailure::VmEnded(closed));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                state.phases.remove(&id);
                drop(state);
                let _ = self.send(&HostFrame::Kill { id });
                return Err(StartFailure::TimedOut);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Exec `id`'s end, waiting up to `timeout` (forever with `None`); the end is collected (`id` is
    /// forgotten). `None` when it has not ended; an unknown id is `Err`.
    pub fn wait_end(&self, id: u64, timeout: Option<Duration>) -> Result<Option<ExecEnd>, UnknownExec> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.shared.lock();
        loop {
            match state.phases.get(&id) {
                None => return Err(UnknownExec(id)),
                Some(Phase::Done(end)) => {
                    let end = *end;
                    if id != MAIN_EXEC {
                        state.phases.remove(&id);
                        let mut count = [0u8; 8];
                        let _ = rustix::io::read(&self.exec_events, &mut count);
                    }
                    return Ok(Some(end));
                }
                Some(_) => {}
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return Ok(None);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Nobody will collect exec `id`'s end: it is forgotten when it ends (now, if it has), and never
    /// counted in [`Mux::exec_events`].
    pub fn detach(&self, id: u64) {
        let mut state = self.shared.lock();
        match state.phases.get(&id) {
            Some(Phase::Done(_)) => {
                state.phases.remove(&id);
                let mut count = [0u8; 8];
                let _ = rustix::io::read(&self.exec_events, &mut count);
            }
            Some(_) => {
                state.detached.insert(id);
            }
            None => {}
        }
    }

    /// Whether exec `id` is known (starting, running, or ended and not collected).
    pub fn knows(&self, id: u64) -> bool {
        self.shared.lock().phases.contains_key(&id)
    }

    /// The guest's limit counters, as last reported.
    pub fn counters(&self) -> (u64, u64) {
        let state = self.shared.lock();
        (state.oom_kills, state.pids_limit_hits)
    }

    /// After a [`HostFrame::Terminate`]: the guest reported nothing but its agent left, and every exec's
    /// output has been written.
    pub fn terminated(&self) -> bool {
        let state = self.shared.lock();
        state.terminated && !state.phases.values().any(|p| matches!(p, Phase::Running))
    }

    /// Waits for the thread (it ends once the channel closes) and returns the main command's end:
    /// `Ok(None)` when there was none, `Err` with the agent's message when it failed.
    pub fn join(&mut self) -> Result<Option<GuestExit>, String> {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                return Err("the microVM's exec thread panicked".into());
            }
        }
        let state = self.shared.lock();
        match (state.phases.get(&MAIN_EXEC), &state.closed) {
            (Some(Phase::Done(ExecEnd::Exited(exit))), _) => Ok(Some(*exit)),
            (_, Some(Some(why))) => Err(why.clone()),
            _ => Ok(None),
        }
    }
}

fn send(writer: &Mutex<UnixStream>, frame: &HostFrame) -> io::Result<()> {
    let mut stream = writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    stream.write_all(&encode(frame))
}

/// One exec's descriptors and buffers, owned by the thread.
struct WorkerExec {
    stdin: Option<OwnedFd>,
    /// Forwarded once the guest started the command.
    stdin_enabled: bool,
    input_held: bool,
    outputs: [Option<OwnedFd>; 2],
    pending: [Vec<u8>; 2],
    output_held: bool,
    blocking: bool,
    exit: Option<GuestExit>,
}

impl WorkerExec {
    fn pending_bytes(&self) -> usize {
        self.pending[0].len() + self.pending[1].len()
    }
}

struct Worker {
    shared: Arc<Shared>,
    writer: Arc<Mutex<UnixStream>>,
    registrations: mpsc::Receiver<Registration>,
    wake: OwnedFd,
    ended: OwnedFd,
    exec_events: OwnedFd,
    execs: BTreeMap<u64, WorkerExec>,
}

impl Worker {
    fn run(mut self, mut channel: Channel) {
        let why = self.serve(&mut channel).err();
        let mut state = self.shared.lock();
        let detached = std::mem::take(&mut state.detached);
        state.phases.retain(|id, _| !detached.contains(id));
        for (&id, phase) in state.phases.iter_mut() {
            if matches!(phase, Phase::Running) {
                *phase = Phase::Done(ExecEnd::Lost);
                if id != MAIN_EXEC {
                    signal(&self.exec_events);
                }
            }
        }
        state.closed = Some(why);
        drop(state);
        self.execs.clear();
        signal(&self.ended);
        self.shared.changed.notify_all();
    }

    fn accept_registrations(&mut self) {
        while let Ok(Registration { id, stdio }) = self.registrations.try_recv() {
            if !stdio.blocking {
                for fd in [&stdio.stdout, &stdio.stderr] {
                    let _ = rustix::io::ioctl_fionbio(fd, true);
                }
            }
            self.execs.insert(
                id,
                WorkerExec {
                    stdin: Some(stdio.stdin),
                    stdin_enabled: false,
                    input_held: false,
                    outputs: [Some(stdio.stdout), Some(stdio.stderr)],
                    pending: [Vec::new(), Vec::new()],
                    output_held: false,
                    blocking: stdio.blocking,
                    exit: None,
                },
            );
        }
    }

    fn serve(&mut self, channel: &mut Channel) -> Result<(), String> {
        let mut lines: Vec<Vec<u8>> = channel.take_queued();
        loop {
            self.accept_registrations();
            for line in lines.drain(..) {
                let frame = decode::<GuestFrame>(&line).map_err(|e| format!("from the guest: {e}"))?;
                self.handle(frame)?;
            }
            let (channel_ready, ready) = {
                let mut fds = vec![
                    PollFd::new(&channel.stream, PollFlags::IN),
                    PollFd::new(&self.wake, PollFlags::IN),
                ];
                let mut slots = Vec::new();
                for (&id, exec) in &self.execs {
                    if let (Some(fd), true, false) = (&exec.stdin, exec.stdin_enabled, exec.input_held) {
                        fds.push(PollFd::new(fd, PollFlags::IN));
                        slots.push((id, None));
                    }
                    for (i, fd) in exec.outputs.iter().enumerate() {
                        if let (Some(fd), false) = (fd, exec.pending[i].is_empty()) {
                            fds.push(PollFd::new(fd, PollFlags::OUT));
                            slots.push((id, Some(i)));
                        }
                    }
                }
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(format!("polling the agent channel: {e}")),
                }
                if !fds[1].revents().is_empty() {
                    let mut count = [0u8; 8];
                    let _ = rustix::io::read(&self.wake, &mut count);
                }
                let ready: Vec<(u64, Option<usize>)> = slots
                    .into_iter()
                    .zip(&fds[2..])
                    .filter(|(_, fd)| !fd.revents().is_empty())
                    .map(|(slot, _)| slot)
                    .collect();
                (!fds[0].revents().is_empty(), ready)
            };
            for (id, slot) in ready {
                match slot {
                    None => self.forward_stdin(id)?,
                    Some(_) => self.flush(id)?,
                }
            }
            if channel_ready {
                let mut buf = [0u8; 64 << 10];
                let n = match (&channel.stream).read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                if n == 0 {
                    return Ok(());
                }
                lines = channel
                    .push(&buf[..n])
                    .map_err(|len| format!("a {len}-byte line from the guest"))?;
            }
        }
    }

    fn send(&self, frame: &HostFrame) -> Result<(), String> {
        send(&self.writer, frame).map_err(|e| format!("writing to the guest: {e}"))
    }

    fn set_phase(&self, id: u64, phase: Phase) {
        self.shared.lock().phases.insert(id, phase);
        self.shared.changed.notify_all();
    }

    fn handle(&mut self, frame: GuestFrame) -> Result<(), String> {
        match frame {
            GuestFrame::Started { id } => {
                if let Some(exec) = self.execs.get_mut(&id) {
                    exec.stdin_enabled = true;
                }
                self.set_phase(id, Phase::Running);
            }
            GuestFrame::Failed { id, kind, message } => {
                self.execs.remove(&id);
                self.set_phase(id, Phase::Failed(kind, message));
            }
            GuestFrame::Stdout { id, data } => self.output(id, 0, &data)?,
            GuestFrame::Stderr { id, data } => self.output(id, 1, &data)?,
            GuestFrame::Exit {
                id,
                code,
                signal,
                oom,
            } => {
                if let Some(exec) = self.execs.get_mut(&id) {
                    exec.exit = Some(GuestExit { code, signal, oom });
                }
                self.finish_if_flushed(id);
            }
            GuestFrame::HoldInput { id } => {
                if let Some(exec) = self.execs.get_mut(&id) {
                    exec.input_held = true;
                }
            }
            GuestFrame::ReleaseInput { id } => {
                if let Some(exec) = self.execs.get_mut(&id) {
                    exec.input_held = false;
                }
            }
            GuestFrame::Usage {
                oom_kills,
                pids_limit_hits,
            } => {
                let mut state = self.shared.lock();
                state.oom_kills = oom_kills;
                state.pids_limit_hits = pids_limit_hits;
            }
            GuestFrame::Terminated => {
                self.shared.lock().terminated = true;
            }
            GuestFrame::Fatal { message } => return Err(format!("the guest agent failed: {message}")),
            GuestFrame::Ready { .. } => return Err("a second ready from the guest".into()),
        }
        Ok(())
    }

    /// Output for exec `id`'s stream `i`: written now when the reader takes it, kept otherwise.
    fn output(&mut self, id: u64, i: usize, data: &str) -> Result<(), String> {
        let Some(exec) = self.execs.get_mut(&id) else {
            return Ok(());
        };
        let Some(bytes) = protocol::decode_bytes(data) else {
            return Err("undecodable output from the guest".into());
        };
        if exec.outputs[i].is_none() {
            // The reader went away: its output is dropped, as with a closed pipe.
            return Ok(());
        }
        exec.pending[i].extend_from_slice(&bytes);
        self.flush(id)?;
        let Some(exec) = self.execs.get_mut(&id) else {
            return Ok(());
        };
        if exec.pending_bytes() > OUTPUT_HIGH && !exec.output_held {
            exec.output_held = true;
            self.send(&HostFrame::HoldOutput { id })?;
        }
        Ok(())
    }

    /// Writes what exec `id`'s readers take; releases the guest once everything is written.
    fn flush(&mut self, id: u64) -> Result<(), String> {
        let Some(exec) = self.execs.get_mut(&id) else {
            return Ok(());
        };
        for i in 0..2 {
            let Some(fd) = &exec.outputs[i] else {
                exec.pending[i].clear();
                continue;
            };
            if exec.blocking {
                if tartarus_hostsys::write_all(fd, &exec.pending[i]).is_err() {
                    exec.outputs[i] = None;
                }
                exec.pending[i].clear();
                continue;
            }
            let mut broken = false;
            while !exec.pending[i].is_empty() {
                match rustix::io::write(fd, &exec.pending[i]) {
                    Ok(n) => {
                        exec.pending[i].drain(..n);
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                // The reader went away: what is left is dropped, as with a closed pipe.
                exec.pending[i].clear();
                exec.outputs[i] = None;
            }
        }
        if exec.pending_bytes() == 0 && exec.output_held {
            exec.output_held = false;
            self.send(&HostFrame::ReleaseOutput { id })?;
        }
        self.finish_if_flushed(id);
        Ok(())
    }

    /// Forwards one read of exec `id`'s stdin (readable), or its end.
    fn forward_stdin(&mut self, id: u64) -> Result<(), String> {
        let Some(exec) = self.execs.get_mut(&id) else {
            return Ok(());
        };
        let Some(fd) = &exec.stdin else {
            return Ok(());
        };
        let mut buf = [0u8; protocol::CHUNK];
        // A blocking read after POLLIN: the caller's descriptor may be shared, so it is not made
        // non-blocking.
        match rustix::io::read(fd, &mut buf) {
            Ok(n) if n > 0 => self.send(&HostFrame::Stdin {
                id,
                data: protocol::encode_bytes(&buf[..n]),
            }),
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            _ => {
                exec.stdin = None;
                self.send(&HostFrame::StdinClosed { id })
            }
        }
    }

    /// Ends exec `id` once the guest reported its exit and its output is written.
    fn finish_if_flushed(&mut self, id: u64) {
        let done = self
            .execs
            .get(&id)
            .and_then(|e| e.exit.filter(|_| e.pending_bytes() == 0));
        let Some(exit) = done else {
            return;
        };
        // Dropping the descriptors is the readers' end of file.
        self.execs.remove(&id);
        {
            let mut state = self.shared.lock();
            if state.detached.remove(&id) {
                state.phases.remove(&id);
                drop(state);
                self.shared.changed.notify_all();
                return;
            }
        }
        self.set_phase(id, Phase::Done(ExecEnd::Exited(exit)));
        match id {
            MAIN_EXEC => signal(&self.ended),
            _ => signal(&self.exec_events),
        }
    }
}
