//! `tartarus shim`: the supervisor of one long-lived (service) sandbox.
//!
//! The server starts one shim per sandbox (as containerd does), so the server itself can be
//! multi-threaded and can restart without taking sandboxes down. The shim is single-threaded, owns the
//! sandbox, and serves any number of connections at once on a unix socket, one JSON request each:
//!
//! - `{"op":"exec","command":[...],"env":[["K","V"]],"workdir":"/x","stdin":"text","timeout_ms":N}` →
//!   `{"exit_code":0,"signal":null,"stdout":"...","stderr":"...","wall_ms":1.2,"timed_out":false,"truncated":false}`
//!   or `{"error":{"code":"...","message":"..."}}` (command_not_found, not_executable, invalid_request,
//!   paused, exec_failed). `stdin_base64` and `binary_output` move bytes instead of text.
//! - The same with `"stream":true` → `{"started":true}`, then one line per chunk of output as it is
//!   written (`{"stream":"stdout","data":"..."}`, UTF-8 kept whole across chunks), then
//!   `{"exit_code":..,"signal":..,"wall_ms":..,"timed_out":..}`. Closing the connection kills the command.
//! - `{"op":"status"}` → `{"id":"...","state":"running"|"paused","blocked_packets":N|null}`;
//!   `{"op":"pause"}`, `{"op":"resume"}`; `{"op":"isolate"}` (quarantine: egress cut off, then frozen);
//!   `{"op":"throttle","cpus":0.25}` (lower the CPU quota). Status also carries `limit_hits`
//!   (`oom_kills`, `pids_limit_hits`).
//! - `{"op":"kill"}` → the sandbox is killed and cleaned up, then `{"ok":true}`, and the shim exits.
//!
//! When the sandbox ends on its own (main command exit, timeout) the shim writes the result record to
//! `--result` and exits. It prints `ready <sandbox id>` on stdout once it accepts requests.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use clap::Args;
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tartarus_runtime::process::{ExecError, ExecRequest, ProcessRuntime, ProcessSandbox};
use tartarus_runtime::{ExecId, KillReason, Sandbox, SandboxSpec, ServiceSandbox, StdioFds, Termination};

use super::run::runtime_config;

/// Output kept per stream of one buffered exec; the rest is dropped and reported as truncated.
const MAX_OUTPUT: usize = 4 << 20;
/// Largest request line.
const MAX_REQUEST: usize = 8 << 20;

#[derive(Args, Debug)]
pub struct ShimArgs {
    /// Unix socket to serve requests on (created, mode 0600)
    #[arg(long)]
    socket: PathBuf,
    /// The sandbox spec as JSON (a file)
    #[arg(long)]
    spec: PathBuf,
    /// Where to write the result record when the sandbox ends
    #[arg(long)]
    result: Option<PathBuf>,
    /// File that receives the main command's stdout and stderr
    #[arg(long)]
    log: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum ShimRequest {
    Exec {
        command: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        workdir: Option<String>,
        #[serde(default)]
        stdin: Option<String>,
        /// Binary stdin, base64 (instead of `stdin`).
        #[serde(default)]
        stdin_base64: Option<String>,
        /// Return stdout as base64 (`stdout_base64`) instead of text.
        #[serde(default)]
        binary_output: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Send output as it is written instead of all at the end.
        #[serde(default)]
        stream: bool,
    },
    Status,
    Pause,
    Resume,
    /// Quarantine: cut an egress network off, then freeze every process (kept for inspection).
    Isolate,
    /// Lower the CPU quota to `cpus` cores (enforcement of a resource violation).
    Throttle {
        cpus: f64,
    },
    Kill,
}

#[derive(Serialize)]
struct ExecResponse {
    exit_code: i32,
    signal: Option<i32>,
    stdout: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_base64: Option<String>,
    stderr: String,
    wall_ms: f64,
    timed_out: bool,
    truncated: bool,
}

fn error_json(code: &str, message: impl std::fmt::Display) -> Value {
    json!({"error": {"code": code, "message": message.to_string()}})
}

/// Writes one JSON line; false if the client is gone.
fn send(stream: &mut UnixStream, value: &Value) -> bool {
    writeln!(stream, "{value}").is_ok()
}

pub fn run(args: ShimArgs) -> anyhow::Result<u8> {
    // A command that exits without reading its stdin, or a client that leaves, must not kill the shim
    // (and with it the sandbox).
    tartarus_hostsys::ignore_sigpipe();
    let text = std::fs::read_to_string(&args.spec)?;
    let mut spec: SandboxSpec = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid sandbox spec {}: {e}", args.spec.display()))?;
    spec.service = true;
    let log = match &args.log {
        Some(path) => std::fs::OpenOptions::new().create(true).append(true).open(path)?,
        None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    let null = std::fs::File::open("/dev/null")?;
    let runtime = ProcessRuntime::new(runtime_config());
    let lifetime = spec.timeout;
    let mut sandbox = runtime.prepare_sandbox(spec)?;
    let stdio = StdioFds {
        stdin: null.as_fd(),
        stdout: log.as_fd(),
        stderr: log.as_fd(),
    };
    if let Err(e) = sandbox.start(stdio) {
        // Exit with the shell's code for the failure (127 not found, 126 not executable, 125 otherwise).
        crate::print_error(&e);
        return Ok(e.exit_code() as u8);
    }
    drop((null, log));

    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
    tartarus_hostsys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let signals = tartarus_hostsys::signal_fd(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    println!("ready {}", sandbox.id());
    std::io::stdout().flush()?;

    let mut shim = Shim {
        sandbox,
        requests: Vec::new(),
        execs: Vec::new(),
        kill_requester: None,
        deadline: lifetime.map(|t| Instant::now() + t),
    };
    let outcome = shim.serve(&listener, &signals)?;
    let mut sandbox = shim.sandbox;
    let outcome = match outcome {
        Some(o) => o,
        None => sandbox.wait()?,
    };
    let _ = std::fs::remove_file(&args.socket);
    if let Some(path) = &args.result {
        let signal = match outcome.termination {
            Termination::Signaled(s) => Some(s),
            Termination::Exited(_) => None,
        };
        let record = json!({
            "id": sandbox.id(), "exit_code": outcome.termination.exit_code(), "signal": signal,
            "reason": outcome.reason.as_str(), "wall_ms": outcome.wall.as_secs_f64() * 1000.0,
            "cpu_ms": outcome.cpu.as_secs_f64() * 1000.0, "peak_memory_bytes": outcome.peak_memory_bytes,
        });
        std::fs::write(path, format!("{record}\n"))?;
    }
    sandbox.cleanup()?;
    // A kill is answered only now, so the requester knows everything is gone.
    if let Some(mut stream) = shim.kill_requester {
        send(&mut stream, &json!({"ok": true}));
    }
    Ok(0)
}

/// A connection whose request line is still arriving.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// One output pipe of a running exec.
struct Output {
    pipe: Option<OwnedFd>,
    name: &'static str,
    kept: Vec<u8>,
    /// Streaming: an incomplete UTF-8 sequence held back for the next chunk.
    carry: Vec<u8>,
}

/// A running exec and the connection waiting for it.
struct RunningExec {
    id: ExecId,
    client: UnixStream,
    streaming: bool,
    binary_output: bool,
    stdin: Option<OwnedFd>,
    input: Vec<u8>,
    outputs: [Output; 2],
    started: Instant,
    deadline: Option<Instant>,
    timed_out: bool,
    truncated: bool,
    client_gone: bool,
    /// A kill was sent (timeout or client gone).
    killed: bool,
}

struct Shim {
    sandbox: ProcessSandbox,
    requests: Vec<Pending>,
    execs: Vec<RunningExec>,
    kill_requester: Option<UnixStream>,
    /// When the sandbox's lifetime (`timeout`) ends; it is then killed with reason `timeout`.
    deadline: Option<Instant>,
}

enum Slot {
    Request(usize),
    Output(usize, usize),
    Input(usize),
}

impl Shim {
    /// The event loop; returns the sandbox's outcome if it ended on its own, `None` when killed.
    fn serve(
        &mut self,
        listener: &UnixListener,
        signals: &OwnedFd,
    ) -> anyhow::Result<Option<tartarus_runtime::Outcome>> {
        loop {
            let event = self.sandbox.event_fd().map(|fd| fd.as_raw_fd()).unwrap_or(-1);
            let exec_events = self
                .sandbox
                .exec_event_fd()
                .map(|fd| fd.as_raw_fd())
                .unwrap_or(-1);
            // SAFETY: both descriptors belong to the sandbox, which outlives this iteration.
            let (event, exec_events) =
                unsafe { (BorrowedFd::borrow_raw(event), BorrowedFd::borrow_raw(exec_events)) };
            let mut fds = vec![
                PollFd::new(listener, PollFlags::IN),
                PollFd::new(&event, PollFlags::IN),
                PollFd::new(signals, PollFlags::IN),
                PollFd::new(&exec_events, PollFlags::IN),
            ];
            let mut slots = Vec::new();
            for (i, pending) in self.requests.iter().enumerate() {
                fds.push(PollFd::new(&pending.stream, PollFlags::IN));
                slots.push(Slot::Request(i));
            }
            for (i, exec) in self.execs.iter().enumerate() {
                for (j, output) in exec.outputs.iter().enumerate() {
                    if let Some(pipe) = &output.pipe {
                        fds.push(PollFd::new(pipe, PollFlags::IN));
                        slots.push(Slot::Output(i, j));
                    }
                }
                if let Some(stdin) = &exec.stdin {
                    fds.push(PollFd::new(stdin, PollFlags::OUT));
                    slots.push(Slot::Input(i));
                }
            }
            let now = Instant::now();
            let next_deadline = self
                .execs
                .iter()
                .filter_map(|e| e.deadline)
                .chain(self.deadline)
                .min();
            let timeout = next_deadline.map(|d| {
                let left = d.saturating_duration_since(now);
                rustix::time::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: left.subsec_nanos() as i64,
                }
            });
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                // The whole sandbox reached its lifetime: kill the tree; its exit is reported below, with
                // reason `timeout`.
                self.deadline = None;
                self.sandbox.kill(KillReason::Timeout)?;
            }
            if ready[1] {
                if let Some(outcome) = self.sandbox.try_wait()? {
                    return Ok(Some(outcome));
                }
            }
            if ready[2] {
                self.sandbox.kill(KillReason::Requested)?;
                return Ok(None);
            }
            // Work on what is ready, newest index first so removals keep earlier indices valid.
            let mut readable_requests = Vec::new();
            for (slot, is_ready) in slots.iter().zip(&ready[4..]) {
                if !is_ready {
                    continue;
                }
                match *slot {
                    Slot::Request(i) => readable_requests.push(i),
                    Slot::Output(i, j) => self.drain_output(i, j),
                    Slot::Input(i) => self.feed_input(i),
                }
            }
            for i in readable_requests.into_iter().rev() {
                if self.read_request(i)? {
                    self.sandbox.kill(KillReason::Requested)?;
                    return Ok(None);
                }
            }
            if ready[0] {
                self.accept(listener);
            }
            self.enforce_deadlines()?;
            self.finish_execs()?;
        }
    }

    fn accept(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                self.requests.push(Pending {
                    stream,
                    line: Vec::new(),
                });
            }
        }
    }

    /// Reads what a pending connection sent; handles its request once the line is complete. True when
    /// the request was `kill`.
    fn read_request(&mut self, i: usize) -> anyhow::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let pending = &mut self.requests[i];
        let complete = loop {
            match pending.stream.read(&mut chunk) {
                Ok(0) => break true, // the client finished writing (or left)
                Ok(n) => {
                    pending.line.extend_from_slice(&chunk[..n]);
                    if pending.line.contains(&b'\n') || pending.line.len() > MAX_REQUEST {
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
        let Pending { mut stream, line } = self.requests.swap_remove(i);
        let _ = stream.set_nonblocking(false);
        let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
        let request = serde_json::from_slice::<ShimRequest>(&line[..end]);
        let response = match request {
            Err(e) => error_json("invalid_request", e),
            Ok(ShimRequest::Kill) => {
                self.kill_requester = Some(stream);
                return Ok(true);
            }
            Ok(ShimRequest::Status) => {
                json!({
                    "id": self.sandbox.id(),
                    "state": if self.sandbox.is_paused() { "paused" } else { "running" },
                    "blocked_packets": self.sandbox.usage().blocked_packets,
                    "limit_hits": self.sandbox.usage().limit_hits,
                })
            }
            Ok(ShimRequest::Pause) => match self.sandbox.pause() {
                Ok(()) => json!({"ok": true}),
                Err(e) => error_json("unavailable", crate::error_chain(&e)),
            },
            Ok(ShimRequest::Isolate) => {
                let isolated = self.sandbox.isolate_network();
                let paused = match self.sandbox.is_paused() {
                    true => Ok(()),
                    false => self.sandbox.pause(),
                };
                match (isolated, paused) {
                    (Ok(cut), Ok(())) => json!({"ok": true, "network_cut": cut}),
                    (Err(e), _) => error_json("unavailable", crate::error_chain(&e)),
                    (_, Err(e)) => error_json("unavailable", crate::error_chain(&e)),
                }
            }
            Ok(ShimRequest::Throttle { cpus }) if !(cpus.is_finite() && cpus > 0.0) => {
                error_json("invalid_request", "cpus must be a positive number")
            }
            Ok(ShimRequest::Throttle { cpus }) => match self.sandbox.throttle_cpu(cpus) {
                Ok(throttled) => json!({"ok": true, "throttled": throttled}),
                Err(e) => error_json("unavailable", crate::error_chain(&e)),
            },
            Ok(ShimRequest::Resume) => match self.sandbox.resume() {
                Ok(()) => json!({"ok": true}),
                Err(e) => error_json("unavailable", crate::error_chain(&e)),
            },
            Ok(ShimRequest::Exec { .. }) if self.sandbox.is_paused() => {
                error_json("paused", "the sandbox is paused; resume it first")
            }
            Ok(ShimRequest::Exec {
                command,
                env,
                workdir,
                stdin,
                stdin_base64,
                binary_output,
                timeout_ms,
                stream: streaming,
            }) => {
                let input = match stdin_base64 {
                    Some(b64) => BASE64
                        .decode(b64.as_bytes())
                        .map_err(|e| ExecError::Invalid(format!("stdin_base64: {e}"))),
                    None => Ok(stdin.unwrap_or_default().into_bytes()),
                };
                let request = ExecRequest {
                    command,
                    env,
                    workdir,
                };
                let timeout = timeout_ms.map(Duration::from_millis);
                match input.and_then(|input| self.start_exec(&request, input)) {
                    Ok((id, stdin, stdout, stderr, input, started)) => {
                        let client_gone = streaming && !send(&mut stream, &json!({"started": true}));
                        let output = |pipe, name| Output {
                            pipe: Some(pipe),
                            name,
                            kept: Vec::new(),
                            carry: Vec::new(),
                        };
                        self.execs.push(RunningExec {
                            id,
                            client: stream,
                            streaming,
                            binary_output,
                            stdin,
                            input,
                            outputs: [output(stdout, "stdout"), output(stderr, "stderr")],
                            started,
                            deadline: timeout.map(|t| started + t),
                            timed_out: false,
                            truncated: false,
                            client_gone,
                            killed: false,
                        });
                        return Ok(false);
                    }
                    Err(e) => {
                        let code = match e.exit_code() {
                            127 => "command_not_found",
                            126 => "not_executable",
                            _ if matches!(e, ExecError::Invalid(_)) => "invalid_request",
                            _ => "exec_failed",
                        };
                        error_json(code, e)
                    }
                }
            }
        };
        send(&mut stream, &response);
        Ok(false)
    }

    /// Starts one exec; returns its id, the supervisor's ends of its pipes (stdin only when there is input)
    /// and when it started.
    #[allow(clippy::type_complexity)]
    fn start_exec(
        &mut self,
        request: &ExecRequest,
        input: Vec<u8>,
    ) -> Result<(ExecId, Option<OwnedFd>, OwnedFd, OwnedFd, Vec<u8>, Instant), ExecError> {
        let pipe = || {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| ExecError::Channel(e.into()))
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
        let id = self.sandbox.exec(request, stdio)?;
        drop((stdin_read, stdout_write, stderr_write));
        for fd in [&stdin_write, &stdout_read, &stderr_read] {
            rustix::io::ioctl_fionbio(fd, true).map_err(|e| ExecError::Channel(e.into()))?;
        }
        let stdin = (!input.is_empty()).then_some(stdin_write);
        Ok((id, stdin, stdout_read, stderr_read, input, started))
    }

    /// Reads what one output pipe has; streams it or keeps it.
    fn drain_output(&mut self, i: usize, j: usize) {
        let exec = &mut self.execs[i];
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let Some(pipe) = exec.outputs[j].pipe.as_ref() else {
                return;
            };
            match rustix::io::read(pipe, &mut chunk) {
                Ok(0) => {
                    exec.outputs[j].pipe = None;
                    if exec.streaming {
                        let rest = std::mem::take(&mut exec.outputs[j].carry);
                        exec.stream_chunk(j, &rest, true);
                    }
                    return;
                }
                Ok(n) => {
                    if exec.streaming {
                        exec.stream_chunk(j, &chunk[..n], false);
                    } else {
                        let kept = &mut exec.outputs[j].kept;
                        let room = MAX_OUTPUT.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                        exec.truncated |= n > room;
                    }
                }
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
            Err(rustix::io::Errno::AGAIN) => {}
            Err(_) => exec.input.clear(),
        }
        if exec.input.is_empty() {
            exec.stdin = None; // EOF for the command
        }
    }

    fn enforce_deadlines(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for i in 0..self.execs.len() {
            let exec = &mut self.execs[i];
            let expired = exec.deadline.is_some_and(|d| now >= d);
            if (expired || exec.client_gone) && !exec.killed {
                exec.timed_out = expired;
                exec.killed = true;
                exec.deadline = None;
                let id = exec.id;
                self.sandbox.kill_exec(id)?;
            }
        }
        Ok(())
    }

    /// Answers every exec that has exited.
    fn finish_execs(&mut self) -> anyhow::Result<()> {
        let mut i = 0;
        while i < self.execs.len() {
            let id = self.execs[i].id;
            let Some(termination) = self.sandbox.wait_exec(id, Some(Duration::ZERO))? else {
                i += 1;
                continue;
            };
            // What the command wrote before exiting; background children holding the pipes are not waited for.
            self.drain_output(i, 0);
            self.drain_output(i, 1);
            let mut exec = self.execs.swap_remove(i);
            if exec.streaming {
                for j in 0..2 {
                    let rest = std::mem::take(&mut exec.outputs[j].carry);
                    exec.stream_chunk(j, &rest, true);
                }
            }
            let signal = match termination {
                Termination::Signaled(s) => Some(s),
                Termination::Exited(_) => None,
            };
            let wall_ms = exec.started.elapsed().as_secs_f64() * 1000.0;
            let response = if exec.streaming {
                json!({"exit_code": termination.exit_code(), "signal": signal, "wall_ms": wall_ms, "timed_out": exec.timed_out})
            } else {
                let [out, err] = &mut exec.outputs;
                let (stdout, stdout_base64) = match exec.binary_output {
                    true => (String::new(), Some(BASE64.encode(&out.kept))),
                    false => (String::from_utf8_lossy(&out.kept).into_owned(), None),
                };
                serde_json::to_value(ExecResponse {
                    exit_code: termination.exit_code(),
                    signal,
                    stdout,
                    stdout_base64,
                    stderr: String::from_utf8_lossy(&err.kept).into_owned(),
                    wall_ms,
                    timed_out: exec.timed_out,
                    truncated: exec.truncated,
                })?
            };
            send(&mut exec.client, &response);
        }
        Ok(())
    }
}

impl RunningExec {
    /// Sends one chunk of output `j` as text, holding back an incomplete UTF-8 sequence at the end
    /// (unless `last`). A client that went away gets its command killed.
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
        if data.is_empty() || self.client_gone {
            return;
        }
        let text = String::from_utf8_lossy(&data);
        if !send(&mut self.client, &json!({"stream": output.name, "data": text})) {
            self.client_gone = true;
        }
    }
}
