//! The shim process: the single-threaded supervisor of one service sandbox.
//!
//! The server starts one shim per sandbox (as containerd does), so the server itself can be
//! multi-threaded and can restart without taking sandboxes down. The shim owns the sandbox and serves any
//! number of connections at once on a unix socket with the [`crate::protocol`] contract. It never blocks on
//! a client: every socket is non-blocking, each connection has a bounded outgoing buffer, and a streaming
//! exec whose client does not read is no longer read from either (its command blocks on its own pipe,
//! nothing else waits).
//!
//! When the sandbox ends on its own (main command exit, timeout) or is killed, the shim writes the
//! [`ResultRecord`] and exits.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use tartarus_runtime::{
    ExecId, ExecRequest, FileOp, KillReason, Outcome, Runtime, SandboxSpec, ServiceSandbox, StdioFds,
    Termination,
};

use crate::lane::{self, FileOpKind, LaneError};
use crate::protocol::{
    self, DirListing, Done, EndReason, ErrorCode, ExecExit, ExecOutput, FileData, Handshake, HandshakeState,
    Isolated, OutputStream, ReplyLine, Request, RequestLine, ResultRecord, RunState, StartFailure,
    StartFailureKind, Status, StreamEvent, StreamLine, Throttled, MAX_EXEC_OUTPUT_BYTES, MAX_REQUEST_BYTES,
    VERSION,
};

/// Bytes queued for one client before the shim stops reading the output that feeds it.
const MAX_CLIENT_BUFFER: usize = 1 << 20;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Where the shim's inputs and outputs are.
#[derive(Debug, Clone)]
pub struct ShimPaths {
    /// Unix socket to serve requests on (created, mode 0600).
    pub socket: PathBuf,
    /// The sandbox spec as JSON.
    pub spec: PathBuf,
    /// Where to write the result record when the sandbox ends.
    pub result: Option<PathBuf>,
    /// File that receives the main command's stdout and stderr.
    pub log: Option<PathBuf>,
    /// Continue the sandbox from this sealed snapshot (a `hibernate` of the same spec) instead of
    /// starting it.
    pub restore: Option<PathBuf>,
}

/// The shim could not run (after the handshake: before it, failures are reported in the handshake).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lane(#[from] LaneError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> ShimError {
    move |source| ShimError::Io { what, source }
}

/// Writes the handshake line on stdout.
fn handshake(state: HandshakeState) {
    let mut out = std::io::stdout();
    let _ = out.write_all(&protocol::encode(&Handshake { v: VERSION, state }));
    let _ = out.flush();
}

/// Runs the shim until the sandbox ends. Returns the process exit code: 0 after a sandbox that ran, the
/// shell's code for one that could not start (127 not found, 126 not executable, 125 otherwise).
pub fn run(paths: &ShimPaths, runtime: &dyn Runtime) -> Result<u8, ShimError> {
    // A command that exits without reading its stdin, or a client that leaves, must not kill the shim
    // (and with it the sandbox).
    tartarus_hostsys::ignore_sigpipe();
    let StartedSandbox {
        sandbox,
        lifetime,
        timeout_grace,
        spec_text,
    } = match start(paths, runtime) {
        Ok(started) => started,
        Err(failure) => {
            let code = failure.exit_code as u8;
            handshake(HandshakeState::Failed(failure));
            return Ok(code);
        }
    };
    let listener = match listen(&paths.socket) {
        Ok(listener) => listener,
        Err(e) => {
            handshake(HandshakeState::Failed(StartFailure {
                kind: StartFailureKind::Host,
                exit_code: 125,
                message: format!("binding the shim socket: {e}"),
            }));
            return Ok(125);
        }
    };
    tartarus_hostsys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
        .map_err(io_err("blocking signals"))?;
    let signals = tartarus_hostsys::signal_fd(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
        .map_err(io_err("creating the signalfd"))?;
    handshake(HandshakeState::Ready {
        id: sandbox.id().to_string(),
    });

    let deadline = lifetime.map(|t| Instant::now() + t);
    let mut shim = Shim {
        sandbox,
        requests: Vec::new(),
        execs: Vec::new(),
        flushing: Vec::new(),
        kill_requester: None,
        deadline,
        timeout_grace,
        timed_out: false,
        grace: None,
        stop: None,
        hibernating: None,
    };
    let outcome = shim.serve(&listener, &signals)?;
    let Shim {
        mut sandbox,
        mut kill_requester,
        stop,
        timed_out,
        hibernating,
        ..
    } = shim;
    let mut outcome = match outcome {
        Some(o) => o,
        None => sandbox.wait().map_err(LaneError::from)?,
    };
    let stopped_by = match stop {
        // Asked to stop, or stopped by its timeout: it was ended, whatever its command did with the SIGTERM.
        Some(StopSignal::Term) => {
            outcome.reason = tartarus_runtime::ExitReason::Killed;
            Some(libc::SIGTERM)
        }
        Some(StopSignal::Kill) => Some(libc::SIGKILL),
        None => None,
    };
    if timed_out {
        outcome.reason = tartarus_runtime::ExitReason::Timeout;
    }
    // A sandbox saved to disk has ended here but not for its owner: once its snapshot is sealed (synced,
    // hashed, read back), the result says `hibernated` and the requester is answered after the cleanup.
    let mut hibernated = None;
    if let Some(hibernation) = hibernating {
        let origin = tartarus_runtime::snapshot::Origin {
            lane: runtime.name(),
            spec: &spec_text,
            timeout_left_ms: hibernation.timeout_left.map(|t| t.as_millis() as u64),
        };
        let sealed = match (outcome.reason, &kill_requester, timed_out) {
            // Killed, timed out or out of memory while being saved: that end wins.
            (tartarus_runtime::ExitReason::Timeout | tartarus_runtime::ExitReason::Oom, _, _)
            | (_, Some(_), _)
            | (_, _, true) => None,
            _ => Some(tartarus_runtime::snapshot::seal(&hibernation.dir, origin)),
        };
        match sealed {
            Some(Ok(_)) => hibernated = Some((hibernation.requester, hibernation.dir)),
            Some(Err(e)) => {
                let reply = ReplyLine::<Done>::error(
                    ErrorCode::Unavailable,
                    format!(
                        "the sandbox ended but its snapshot is unusable: {}",
                        tartarus_runtime::error_chain(&e)
                    ),
                );
                kill_requester.get_or_insert(hibernation.requester);
                answer_blocking(kill_requester.take(), &reply);
            }
            None => {
                let reply = ReplyLine::<Done>::error(
                    ErrorCode::Unavailable,
                    "the sandbox ended (killed, timed out or out of memory) before its snapshot was complete",
                );
                answer_blocking(Some(hibernation.requester), &reply);
            }
        }
    }
    let _ = std::fs::remove_file(&paths.socket);
    if let Some(path) = &paths.result {
        let snapshot = hibernated.as_ref().map(|(_, dir)| dir.as_path());
        write_result(path, sandbox.id(), &outcome, stopped_by, snapshot)
            .map_err(io_err("writing the result record"))?;
    }
    // A kill is answered only now, so the requester knows the sandbox is gone; a cleanup that failed in
    // part is still answered (the sandbox ended, the result is written) and then reported.
    let cleaned = sandbox.cleanup().map_err(LaneError::from);
    answer_blocking(
        kill_requester.or(hibernated.map(|(requester, _)| requester)),
        &ReplyLine::ok(Done {}),
    );
    cleaned?;
    Ok(0)
}

/// The last answer of a shim that is ending, written in blocking mode (bounded).
fn answer_blocking<T: serde::Serialize>(stream: Option<UnixStream>, reply: &ReplyLine<T>) {
    if let Some(mut stream) = stream {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(&protocol::encode(reply));
    }
}

/// A `hibernate` under way: the sandbox is ending after its checkpoint.
struct Hibernation {
    dir: PathBuf,
    requester: UnixStream,
    timeout_left: Option<Duration>,
}

/// A started sandbox with its lifetime limit and the grace period its timeout gives.
struct StartedSandbox {
    sandbox: Box<dyn ServiceSandbox>,
    lifetime: Option<Duration>,
    timeout_grace: Duration,
    /// The spec file's bytes, which a snapshot is sealed to.
    spec_text: Vec<u8>,
}

/// Reads the spec and starts the sandbox, or says why it could not.
fn start(paths: &ShimPaths, runtime: &dyn Runtime) -> Result<StartedSandbox, StartFailure> {
    let spec_failure = |message: String| StartFailure {
        kind: StartFailureKind::Spec,
        exit_code: 125,
        message,
    };
    let text = std::fs::read_to_string(&paths.spec)
        .map_err(|e| spec_failure(format!("reading the sandbox spec {}: {e}", paths.spec.display())))?;
    // To execute, a field this shim does not know is refused, never dropped (it may be a restriction).
    let mut spec = SandboxSpec::from_json_strict(&text).map_err(|e| {
        spec_failure(format!(
            "invalid sandbox spec {}: {}",
            paths.spec.display(),
            tartarus_runtime::error_chain(&e)
        ))
    })?;
    spec.service = true;
    let host = |what: &str, e: std::io::Error| StartFailure {
        kind: StartFailureKind::Host,
        exit_code: 125,
        message: format!("{what}: {e}"),
    };
    let log = match &paths.log {
        Some(path) => std::fs::OpenOptions::new().create(true).append(true).open(path),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
    }
    .map_err(|e| host("opening the sandbox log", e))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| host("opening /dev/null", e))?;
    let timeout_grace = spec.effective_timeout_grace();
    let stdio = [null.as_fd(), log.as_fd(), log.as_fd()];
    let (sandbox, lifetime) = match &paths.restore {
        None => {
            let lifetime = spec.timeout;
            (lane::start(runtime, spec, stdio)?, lifetime)
        }
        Some(dir) => {
            // Checked again here, whoever checked it before: only a whole snapshot of this spec is used.
            let manifest = tartarus_runtime::snapshot::verify(dir, runtime.name(), text.as_bytes())
                .map_err(|e| spec_failure(tartarus_runtime::error_chain(&e)))?;
            let lifetime = manifest.timeout_left_ms.map(Duration::from_millis);
            (lane::restore(runtime, spec, dir, stdio)?, lifetime)
        }
    };
    Ok(StartedSandbox {
        sandbox,
        lifetime,
        timeout_grace,
        spec_text: text.into_bytes(),
    })
}

fn listen(socket: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Writes the result record; `stopped_by` is the signal that ended a sandbox a client asked to stop with
/// a grace period (15: it ended within it, 9: it was killed).
fn write_result(
    path: &Path,
    id: &str,
    outcome: &Outcome,
    stopped_by: Option<i32>,
    hibernated_to: Option<&Path>,
) -> std::io::Result<()> {
    let signal = match outcome.termination {
        Termination::Signaled(s) => Some(s),
        Termination::Exited(_) => None,
    };
    let signal = stopped_by.or(signal);
    let record = ResultRecord {
        v: VERSION,
        id: id.to_string(),
        exit_code: outcome.termination.exit_code(),
        signal,
        reason: match hibernated_to {
            Some(_) => EndReason::Hibernated,
            None => match outcome.reason {
                tartarus_runtime::ExitReason::Exited => EndReason::Exited,
                tartarus_runtime::ExitReason::Timeout => EndReason::Timeout,
                tartarus_runtime::ExitReason::Oom => EndReason::Oom,
                tartarus_runtime::ExitReason::Killed => EndReason::Killed,
            },
        },
        wall_ms: outcome.wall.as_secs_f64() * 1000.0,
        cpu_ms: outcome.cpu.as_secs_f64() * 1000.0,
        peak_memory_bytes: outcome.peak_memory_bytes,
        snapshot: hibernated_to.map(Path::to_path_buf),
    };
    // Written whole then renamed: a reader never sees half a record.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, protocol::encode(&record))?;
    std::fs::rename(&partial, path)
}

/// A client connection with its outgoing bytes.
struct Client {
    stream: UnixStream,
    out: Vec<u8>,
    /// The peer closed or a write failed: nothing more is sent.
    gone: bool,
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        Client {
            stream,
            out: Vec::new(),
            gone: false,
        }
    }

    fn queue(&mut self, message: &impl serde::Serialize) {
        if !self.gone {
            self.out.extend_from_slice(&protocol::encode(message));
            self.flush();
        }
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        while !self.out.is_empty() && !self.gone {
            match self.stream.write(&self.out) {
                Ok(0) => self.gone = true,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.gone = true,
            }
        }
    }

    fn backlogged(&self) -> bool {
        self.out.len() >= MAX_CLIENT_BUFFER
    }
}

/// A connection whose request line is still arriving.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// One output pipe of a running exec.
struct Output {
    pipe: Option<OwnedFd>,
    stream: OutputStream,
    kept: Vec<u8>,
    /// Streaming: an incomplete UTF-8 sequence held back for the next chunk.
    carry: Vec<u8>,
}

/// What a running exec answers when it ends.
enum Purpose {
    Buffered,
    Streaming,
    File(FileOpKind),
}

/// A running exec (or file operation) and the connection waiting for it.
struct RunningExec {
    id: ExecId,
    client: Client,
    purpose: Purpose,
    stdin: Option<OwnedFd>,
    input: Vec<u8>,
    outputs: [Output; 2],
    started: Instant,
    deadline: Option<Instant>,
    timed_out: bool,
    truncated: bool,
    /// A kill was sent (timeout or client gone).
    killed: bool,
}

struct Shim {
    sandbox: Box<dyn ServiceSandbox>,
    requests: Vec<Pending>,
    execs: Vec<RunningExec>,
    /// Answered connections still sending their reply.
    flushing: Vec<Client>,
    kill_requester: Option<UnixStream>,
    /// When the sandbox's lifetime (`timeout`) ends; it is then stopped (SIGTERM, and SIGKILL after
    /// `timeout_grace`) with reason `timeout`.
    deadline: Option<Instant>,
    timeout_grace: Duration,
    /// The timeout ended the sandbox (the result's reason is `timeout` however it then ended).
    timed_out: bool,
    /// When a graceful kill's grace period ends; the sandbox is then killed.
    grace: Option<Instant>,
    /// How a requested stop ended the sandbox, for the result record.
    stop: Option<StopSignal>,
    /// The sandbox was checkpointed to disk and is ending.
    hibernating: Option<Hibernation>,
}

/// The signal that ended a sandbox a client asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    /// It ended within its grace period after SIGTERM.
    Term,
    /// It was killed (at once, or when its grace period ran out).
    Kill,
}

/// The longest grace period a kill may ask for.
const MAX_GRACE: Duration = Duration::from_secs(300);

/// How often, during a grace period, the shim asks whether every process but init has ended.
const GRACE_POLL: Duration = Duration::from_millis(50);

enum Slot {
    Request(usize),
    Output(usize, usize),
    Input(usize),
    ExecClient(usize),
    Flushing(usize),
}

fn poll_timeout(deadline: Option<Instant>) -> Option<rustix::time::Timespec> {
    deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        }
    })
}

impl Shim {
    /// The event loop; returns the sandbox's outcome if it ended on its own, `None` when killed.
    fn serve(&mut self, listener: &UnixListener, signals: &OwnedFd) -> Result<Option<Outcome>, ShimError> {
        loop {
            let mut fds = Vec::with_capacity(8 + self.requests.len() + 3 * self.execs.len());
            let mut slots = Vec::new();
            fds.push(PollFd::new(signals, PollFlags::IN));
            let accepting = self.requests.len() + self.execs.len() + self.flushing.len() < MAX_CONNECTIONS;
            let listener_at = accepting.then(|| {
                fds.push(PollFd::new(listener, PollFlags::IN));
                fds.len() - 1
            });
            let event_fd = self.sandbox.event_fd();
            let event_at = event_fd.as_ref().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::IN));
                fds.len() - 1
            });
            // Readable when an exec reply (such as an exit) is pending: `finish_execs` collects it.
            let exec_events = self.sandbox.exec_event_fd();
            if let Some(fd) = &exec_events {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            let fixed = fds.len();
            for (i, pending) in self.requests.iter().enumerate() {
                fds.push(PollFd::new(&pending.stream, PollFlags::IN));
                slots.push(Slot::Request(i));
            }
            for (i, exec) in self.execs.iter().enumerate() {
                // A client that is not reading gets no more output: the command waits on its pipe.
                if !exec.client.backlogged() {
                    for (j, output) in exec.outputs.iter().enumerate() {
                        if let Some(pipe) = &output.pipe {
                            fds.push(PollFd::new(pipe, PollFlags::IN));
                            slots.push(Slot::Output(i, j));
                        }
                    }
                }
                if let Some(stdin) = &exec.stdin {
                    fds.push(PollFd::new(stdin, PollFlags::OUT));
                    slots.push(Slot::Input(i));
                }
                // Writable when bytes wait; otherwise readable tells of a peer that hung up.
                let flags = match exec.client.out.is_empty() {
                    true => PollFlags::IN,
                    false => PollFlags::OUT,
                };
                if !exec.client.gone {
                    fds.push(PollFd::new(&exec.client.stream, flags));
                    slots.push(Slot::ExecClient(i));
                }
            }
            for (i, client) in self.flushing.iter().enumerate() {
                fds.push(PollFd::new(&client.stream, PollFlags::OUT));
                slots.push(Slot::Flushing(i));
            }
            let next_deadline = self
                .execs
                .iter()
                .filter_map(|e| e.deadline)
                .chain(self.requests.iter().map(|p| p.deadline))
                .chain(self.deadline)
                .chain(self.grace)
                .chain(self.grace.map(|_| Instant::now() + GRACE_POLL))
                .min();
            match rustix::event::poll(&mut fds, poll_timeout(next_deadline).as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(io_err("polling")(e.into())),
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop((fds, event_fd, exec_events));
            if self.grace.is_some_and(|d| Instant::now() >= d) {
                // The grace period is over: what is left is killed.
                self.grace = None;
                self.stop = Some(StopSignal::Kill);
                let reason = match self.timed_out {
                    true => KillReason::Timeout,
                    false => KillReason::Requested,
                };
                self.sandbox.kill(reason).map_err(LaneError::from)?;
                return Ok(None);
            }
            if self.grace.is_some() && self.sandbox.terminated() {
                // Everything but init ended at the SIGTERM: the stop is done within its grace. (Init of a
                // sandbox without a main command would otherwise wait out the whole grace period.)
                self.grace = None;
                self.sandbox
                    .kill(KillReason::Requested)
                    .map_err(LaneError::from)?;
                return Ok(None);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                // The whole sandbox reached its lifetime: SIGTERM, then the kill when the grace is over;
                // its exit is reported below, with reason `timeout`.
                self.deadline = None;
                self.timed_out = true;
                let graceful =
                    self.grace.is_none() && !self.timeout_grace.is_zero() && self.sandbox.terminate().is_ok();
                if graceful {
                    self.grace = Some(Instant::now() + self.timeout_grace);
                    self.stop = Some(StopSignal::Term);
                } else {
                    self.sandbox.kill(KillReason::Timeout).map_err(LaneError::from)?;
                }
            }
            if event_at.is_some_and(|at| ready[at]) {
                if let Some(outcome) = self.sandbox.try_wait().map_err(LaneError::from)? {
                    return Ok(Some(outcome));
                }
            }
            if ready[0] {
                self.sandbox
                    .kill(KillReason::Requested)
                    .map_err(LaneError::from)?;
                return Ok(None);
            }
            // Work on what is ready; removals happen afterwards, newest index first.
            let mut readable_requests = Vec::new();
            for (slot, is_ready) in slots.iter().zip(&ready[fixed..]) {
                if !is_ready {
                    continue;
                }
                match *slot {
                    Slot::Request(i) => readable_requests.push(i),
                    Slot::Output(i, j) => self.drain_output(i, j),
                    Slot::Input(i) => self.feed_input(i),
                    Slot::ExecClient(i) => self.service_exec_client(i),
                    Slot::Flushing(i) => self.flushing[i].flush(),
                }
            }
            self.flushing.retain(|c| !c.out.is_empty() && !c.gone);
            for i in readable_requests.into_iter().rev() {
                if self.read_request(i)? {
                    self.sandbox
                        .kill(KillReason::Requested)
                        .map_err(LaneError::from)?;
                    return Ok(None);
                }
            }
            self.expire_requests();
            if listener_at.is_some_and(|at| ready[at]) {
                self.accept(listener);
            }
            self.enforce_deadlines()?;
            self.finish_execs()?;
        }
    }

    fn accept(&mut self, listener: &UnixListener) {
        let room =
            MAX_CONNECTIONS.saturating_sub(self.requests.len() + self.execs.len() + self.flushing.len());
        for _ in 0..room {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            if stream.set_nonblocking(true).is_ok() {
                self.requests.push(Pending {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + REQUEST_DEADLINE,
                });
            }
        }
    }

    /// Drops connections that did not send a whole request line in time.
    fn expire_requests(&mut self) {
        let now = Instant::now();
        self.requests.retain(|p| p.deadline > now);
    }

    /// Sends a one-line answer and closes the connection once it is written.
    fn answer<T: serde::Serialize>(&mut self, stream: UnixStream, reply: &ReplyLine<T>) {
        let mut client = Client::new(stream);
        client.queue(reply);
        if !client.out.is_empty() && !client.gone {
            self.flushing.push(client);
        }
    }

    /// Reads what a pending connection sent; handles its request once the line is complete. True when
    /// the request was `kill`.
    fn read_request(&mut self, i: usize) -> Result<bool, ShimError> {
        let mut chunk = [0u8; 16 * 1024];
        let pending = &mut self.requests[i];
        let complete = loop {
            match pending.stream.read(&mut chunk) {
                Ok(0) => break true, // the client finished writing (or left)
                Ok(n) => {
                    pending.line.extend_from_slice(&chunk[..n]);
                    if pending.line.contains(&b'\n') || pending.line.len() > MAX_REQUEST_BYTES {
                        break true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if !complete {
            return Ok(false);
        }
        let Pending { stream, line, .. } = self.requests.swap_remove(i);
        let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
        let request = match protocol::decode::<RequestLine>(&line[..end]) {
            Ok(line) => line.request,
            Err(e) => {
                self.answer(
                    stream,
                    &ReplyLine::<Done>::error(ErrorCode::InvalidRequest, e.to_string()),
                );
                return Ok(false);
            }
        };
        self.handle(stream, request)
    }

    fn handle(&mut self, stream: UnixStream, request: Request) -> Result<bool, ShimError> {
        let lane_reply = |r: Result<(), tartarus_runtime::ServiceError>| match r.map_err(LaneError::from) {
            Ok(()) => ReplyLine::ok(Done {}),
            Err(e) => ReplyLine::error(e.code(), e.to_string()),
        };
        match request {
            Request::Kill { grace_ms } => {
                let grace = grace_ms.filter(|g| *g > 0).map(Duration::from_millis);
                if let (Some(grace), None) = (grace, self.grace) {
                    // Graceful: SIGTERM now, the kill at the end of the grace (or when the sandbox ends).
                    if self.sandbox.terminate().is_ok() {
                        self.kill_requester = Some(stream);
                        self.grace = Some(Instant::now() + grace.min(MAX_GRACE));
                        self.stop = Some(StopSignal::Term);
                        return Ok(false);
                    }
                }
                if self.stop.is_some() {
                    self.stop = Some(StopSignal::Kill);
                }
                self.kill_requester = Some(stream);
                return Ok(true);
            }
            Request::Status => {
                let usage = self.sandbox.usage();
                let status = Status {
                    id: self.sandbox.id().to_string(),
                    state: match self.sandbox.is_paused() {
                        true => RunState::Paused,
                        false => RunState::Running,
                    },
                    blocked_packets: usage.blocked_packets,
                    limit_hits: protocol::LimitHits {
                        oom_kills: usage.limit_hits.oom_kills,
                        pids_limit_hits: usage.limit_hits.pids_limit_hits,
                    },
                    cpu_usec: usage.cpu_usec,
                    memory_bytes: usage.memory_bytes,
                };
                self.answer(stream, &ReplyLine::ok(status));
            }
            Request::Pause => {
                let reply = lane_reply(self.sandbox.pause());
                self.answer(stream, &reply);
            }
            Request::Resume => {
                let reply = lane_reply(self.sandbox.resume());
                self.answer(stream, &reply);
            }
            Request::Isolate => {
                let isolated = self.sandbox.isolate_network().map_err(LaneError::from);
                let paused = match self.sandbox.is_paused() {
                    true => Ok(()),
                    false => self.sandbox.pause().map_err(LaneError::from),
                };
                let reply = match (isolated, paused) {
                    (Ok(network_cut), Ok(())) => ReplyLine::ok(Isolated { network_cut }),
                    (Err(e), _) | (_, Err(e)) => ReplyLine::error(e.code(), e.to_string()),
                };
                self.answer(stream, &reply);
            }
            Request::Throttle { cpus } if !(cpus.is_finite() && cpus > 0.0) => {
                let reply = ReplyLine::<Throttled>::error(
                    ErrorCode::InvalidRequest,
                    "cpus must be a positive number",
                );
                self.answer(stream, &reply);
            }
            Request::Throttle { cpus } => {
                let reply = match self.sandbox.throttle_cpu(cpus).map_err(LaneError::from) {
                    Ok(throttled) => ReplyLine::ok(Throttled { throttled }),
                    Err(e) => ReplyLine::error(e.code(), e.to_string()),
                };
                self.answer(stream, &reply);
            }
            Request::Exec(_)
            | Request::ReadFile { .. }
            | Request::WriteFile { .. }
            | Request::ListDir { .. }
            | Request::ConnectPort { .. }
                if self.sandbox.is_paused() =>
            {
                self.answer(
                    stream,
                    &ReplyLine::<Done>::error(ErrorCode::Paused, "the sandbox is paused; resume it first"),
                );
            }
            Request::Exec(exec) => {
                let purpose = match exec.stream {
                    true => Purpose::Streaming,
                    false => Purpose::Buffered,
                };
                let timeout = exec.timeout_ms.map(Duration::from_millis);
                let request = ExecRequest {
                    command: exec.command,
                    env: exec.env,
                    workdir: exec.workdir,
                };
                let started = self.start(Work::Exec(&request), exec.stdin);
                self.attach(stream, purpose, timeout, started);
            }
            Request::ReadFile { path } => {
                let started = self.start(Work::File(&FileOp::Read { path }), Vec::new());
                self.attach(stream, Purpose::File(FileOpKind::Read), None, started);
            }
            Request::WriteFile { path, data } => {
                let started = self.start(Work::File(&FileOp::Write { path }), data);
                self.attach(stream, Purpose::File(FileOpKind::Write), None, started);
            }
            Request::ListDir { path } => {
                let started = self.start(Work::File(&FileOp::List { path }), Vec::new());
                self.attach(stream, Purpose::File(FileOpKind::List), None, started);
            }
            Request::Hibernate { dir } => self.hibernate(stream, dir),
            Request::ConnectPort { port } => match self.sandbox.connect_port(port) {
                Ok(connection) => send_with_fd(&stream, &ReplyLine::ok(Done {}), connection),
                Err(e) => {
                    let e = LaneError::from(e);
                    self.answer(stream, &ReplyLine::<Done>::error(e.code(), e.to_string()));
                }
            },
        }
        Ok(false)
    }

    /// Saves the sandbox into `dir`; its end (seen by the event loop) completes the hibernation.
    fn hibernate(&mut self, stream: UnixStream, dir: PathBuf) {
        let refuse = |why: &str| {
            ReplyLine::<Done>::error(ErrorCode::Refused, format!("pausing to disk refused: {why}"))
        };
        if self.hibernating.is_some() || self.grace.is_some() || self.kill_requester.is_some() {
            self.answer(stream, &refuse("the sandbox is already being saved or stopped"));
            return;
        }
        if !self.execs.is_empty() {
            let why = format!(
                "{} exec(s) or file operations are attached and their streams cannot cross a restore; wait \
                 for them to end or kill them (background processes are kept)",
                self.execs.len()
            );
            self.answer(stream, &refuse(&why));
            return;
        }
        if !dir.is_absolute() {
            let reply = ReplyLine::<Done>::error(
                ErrorCode::InvalidRequest,
                "the snapshot directory must be an absolute path",
            );
            self.answer(stream, &reply);
            return;
        }
        let timeout_left = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match self.sandbox.hibernate(&dir).map_err(LaneError::from) {
            Ok(()) => {
                // The sandbox is ending; its lifetime no longer runs.
                self.deadline = None;
                self.hibernating = Some(Hibernation {
                    dir,
                    requester: stream,
                    timeout_left,
                });
            }
            Err(e) => self.answer(stream, &ReplyLine::<Done>::error(e.code(), e.to_string())),
        }
    }

    /// Starts work in the sandbox with fresh pipes; returns its id and the shim's ends.
    fn start(&mut self, work: Work<'_>, input: Vec<u8>) -> Result<Started, LaneError> {
        let pipe = || {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| LaneError::channel(e.into()))
        };
        let (stdin_read, stdin_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        let started = Instant::now();
        let stdio = StdioFds {
            stdin: stdin_read.as_fd(),
            stdout: stdout_write.as_fd(),
            stderr: stderr_write.as_fd(),
        };
        let id = match work {
            Work::Exec(request) => self.sandbox.exec(request, stdio)?,
            Work::File(op) => self.sandbox.start_file_op(op, stdio)?,
        };
        drop((stdin_read, stdout_write, stderr_write));
        for fd in [&stdin_write, &stdout_read, &stderr_read] {
            rustix::io::ioctl_fionbio(fd, true).map_err(|e| LaneError::channel(e.into()))?;
        }
        let stdin = (!input.is_empty()).then_some(stdin_write);
        Ok(Started {
            id,
            stdin,
            stdout: stdout_read,
            stderr: stderr_read,
            input,
            at: started,
        })
    }

    fn attach(
        &mut self,
        stream: UnixStream,
        purpose: Purpose,
        timeout: Option<Duration>,
        started: Result<Started, LaneError>,
    ) {
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                self.answer(stream, &ReplyLine::<Done>::error(e.code(), e.to_string()));
                return;
            }
        };
        let mut client = Client::new(stream);
        if matches!(purpose, Purpose::Streaming) {
            client.queue(&StreamLine::new(StreamEvent::Started));
        }
        let output = |pipe, stream| Output {
            pipe: Some(pipe),
            stream,
            kept: Vec::new(),
            carry: Vec::new(),
        };
        self.execs.push(RunningExec {
            id: started.id,
            client,
            purpose,
            stdin: started.stdin,
            input: started.input,
            outputs: [
                output(started.stdout, OutputStream::Stdout),
                output(started.stderr, OutputStream::Stderr),
            ],
            started: started.at,
            deadline: timeout.map(|t| started.at + t),
            timed_out: false,
            truncated: false,
            killed: false,
        });
    }

    /// Reads what one output pipe has; streams it or keeps it.
    fn drain_output(&mut self, i: usize, j: usize) {
        let exec = &mut self.execs[i];
        let mut chunk = [0u8; 64 * 1024];
        let cap = exec.output_cap();
        loop {
            if matches!(exec.purpose, Purpose::Streaming) && exec.client.backlogged() {
                return;
            }
            let Some(pipe) = exec.outputs[j].pipe.as_ref() else {
                return;
            };
            match rustix::io::read(pipe, &mut chunk) {
                Ok(0) => {
                    exec.outputs[j].pipe = None;
                    if matches!(exec.purpose, Purpose::Streaming) {
                        exec.stream_chunk(j, &[], true);
                    }
                    return;
                }
                Ok(n) => {
                    if matches!(exec.purpose, Purpose::Streaming) {
                        exec.stream_chunk(j, &chunk[..n], false);
                    } else {
                        let kept = &mut exec.outputs[j].kept;
                        let room = cap.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                        exec.truncated |= n > room;
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
        }
    }

    fn feed_input(&mut self, i: usize) {
        let exec = &mut self.execs[i];
        let Some(stdin) = &exec.stdin else { return };
        match rustix::io::write(stdin, &exec.input) {
            Ok(n) => {
                exec.input.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => exec.input.clear(),
        }
        if exec.input.is_empty() {
            exec.stdin = None; // EOF for the command
        }
    }

    /// Flushes an exec's client, or notices that it hung up.
    fn service_exec_client(&mut self, i: usize) {
        let client = &mut self.execs[i].client;
        if !client.out.is_empty() {
            client.flush();
            return;
        }
        let mut probe = [0u8; 512];
        match client.stream.read(&mut probe) {
            Ok(0) => client.gone = true,
            Ok(_) => {} // nothing more is expected from the client; ignore it
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => client.gone = true,
        }
    }

    fn enforce_deadlines(&mut self) -> Result<(), ShimError> {
        let now = Instant::now();
        for i in 0..self.execs.len() {
            let exec = &mut self.execs[i];
            let expired = exec.deadline.is_some_and(|d| now >= d);
            if (expired || exec.client.gone) && !exec.killed {
                exec.timed_out = expired;
                exec.killed = true;
                exec.deadline = None;
                let id = exec.id;
                self.sandbox.kill_exec(id).map_err(LaneError::from)?;
            }
        }
        Ok(())
    }

    /// Answers every exec that has exited.
    fn finish_execs(&mut self) -> Result<(), ShimError> {
        let mut i = 0;
        while i < self.execs.len() {
            let id = self.execs[i].id;
            let Some(termination) = self
                .sandbox
                .wait_exec(id, Some(Duration::ZERO))
                .map_err(LaneError::from)?
            else {
                i += 1;
                continue;
            };
            // What the command wrote before exiting; background children holding the pipes are not waited for.
            self.drain_output(i, 0);
            self.drain_output(i, 1);
            let mut exec = self.execs.swap_remove(i);
            let signal = match termination {
                Termination::Signaled(s) => Some(s),
                Termination::Exited(_) => None,
            };
            let exit = ExecExit {
                exit_code: termination.exit_code(),
                signal,
                wall_ms: exec.started.elapsed().as_secs_f64() * 1000.0,
                timed_out: exec.timed_out,
            };
            let [out, err] = &mut exec.outputs;
            match &exec.purpose {
                Purpose::Streaming => {
                    for j in 0..2 {
                        exec.stream_chunk(j, &[], true);
                    }
                    exec.client.queue(&StreamLine::new(StreamEvent::Exit(exit)));
                }
                Purpose::Buffered => {
                    let reply = ReplyLine::ok(ExecOutput {
                        exit,
                        stdout: String::from_utf8_lossy(&out.kept).into_owned(),
                        stderr: String::from_utf8_lossy(&err.kept).into_owned(),
                        truncated: exec.truncated,
                    });
                    exec.client.queue(&reply);
                }
                Purpose::File(kind) => {
                    let stdout = std::mem::take(&mut out.kept);
                    match lane::file_outcome(*kind, termination, stdout, &err.kept) {
                        Ok(lane::FileReply::Data(data)) => {
                            exec.client.queue(&ReplyLine::ok(FileData { data }))
                        }
                        Ok(lane::FileReply::Listing(entries)) => {
                            exec.client.queue(&ReplyLine::ok(DirListing { entries }))
                        }
                        Ok(lane::FileReply::Written) => exec.client.queue(&ReplyLine::ok(Done {})),
                        Err(e) => exec.client.queue(&ReplyLine::<Done>::error(e.code, e.message)),
                    }
                }
            }
            if !exec.client.out.is_empty() && !exec.client.gone {
                self.flushing.push(exec.client);
            }
        }
        Ok(())
    }
}

/// Work to start in the sandbox.
enum Work<'a> {
    Exec(&'a ExecRequest),
    File(&'a FileOp),
}

/// A started piece of work: its id and the shim's ends of its pipes (stdin only when there is input).
struct Started {
    id: ExecId,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    input: Vec<u8>,
    at: Instant,
}

impl RunningExec {
    /// Bytes kept per output stream.
    fn output_cap(&self) -> usize {
        match self.purpose {
            // One more than a file may have, so an oversized file is told from a full one.
            Purpose::File(_) => protocol::MAX_FILE_BYTES + 1,
            _ => MAX_EXEC_OUTPUT_BYTES,
        }
    }

    /// Queues one chunk of output `j` as text, holding back an incomplete UTF-8 sequence at the end
    /// (unless `last`).
    fn stream_chunk(&mut self, j: usize, bytes: &[u8], last: bool) {
        let output = &mut self.outputs[j];
        let mut data = std::mem::take(&mut output.carry);
        data.extend_from_slice(bytes);
        if !last {
            if let Err(e) = std::str::from_utf8(&data) {
                if e.error_len().is_none() {
                    output.carry = data.split_off(e.valid_up_to());
                }
            }
        }
        if data.is_empty() || self.client.gone {
            return;
        }
        let event = StreamEvent::Output {
            stream: output.stream,
            data: String::from_utf8_lossy(&data).into_owned(),
        };
        self.client.queue(&StreamLine::new(event));
    }
}

/// Writes `reply` with `fd` attached (`SCM_RIGHTS`) in one message, then closes the connection (dropping
/// `stream` and the shim's copy of `fd`). The line is a few dozen bytes on a fresh connection, so it fits
/// the socket's buffer; a client that went away just loses the connection.
fn send_with_fd<T: serde::Serialize>(stream: &UnixStream, reply: &ReplyLine<T>, fd: std::os::fd::OwnedFd) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::os::fd::AsFd;
    let Ok(mut line) = serde_json::to_vec(reply) else {
        return;
    };
    line.push(b'\n');
    let fds = [fd.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return;
    }
    let _ = rustix::net::sendmsg(
        stream,
        &[std::io::IoSlice::new(&line)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
}
