//! `tartarus shim`: the supervisor of one long-lived (service) sandbox.
//!
//! The server starts one shim per sandbox (as containerd does), so the server itself can be
//! multi-threaded and can restart without taking sandboxes down. The shim is single-threaded, owns the
//! sandbox, and answers one JSON request per connection on a unix socket:
//!
//! - `{"op":"exec","command":[...],"env":[["K","V"]],"workdir":"/x","stdin":"text","timeout_ms":N}` →
//!   `{"exit_code":0,"signal":null,"stdout":"...","stderr":"...","wall_ms":1.2,"timed_out":false,"truncated":false}`
//!   or `{"error":{"code":"...","message":"..."}}` (command_not_found, not_executable, invalid, ...).
//! - `{"op":"status"}` → `{"id":"...","state":"running"}`
//! - `{"op":"kill"}` → `{"ok":true}`, then the sandbox is killed and the shim exits.
//!
//! When the sandbox ends on its own (main command exit, timeout) the shim writes the result record to
//! `--result` and exits. It prints `ready <sandbox id>` on stdout once it accepts requests.

use std::io::{BufRead, BufReader, Write};
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
use serde_json::json;
use tartarus_runtime::process::{ExecError, ExecRequest, ProcessRuntime, ProcessSandbox};
use tartarus_runtime::{KillReason, Sandbox, SandboxSpec, StdioFds, Termination};

use super::run::runtime_config;

/// Output kept per stream of one exec; the rest is dropped and reported as truncated.
const MAX_OUTPUT: usize = 4 << 20;
/// Largest request line.
const MAX_REQUEST: u64 = 8 << 20;

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
    },
    Status,
    Pause,
    Resume,
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

fn error_json(code: &str, message: impl std::fmt::Display) -> serde_json::Value {
    json!({"error": {"code": code, "message": message.to_string()}})
}

pub fn run(args: ShimArgs) -> anyhow::Result<u8> {
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
    let mut sandbox = runtime.prepare_sandbox(spec)?;
    let stdio = StdioFds {
        stdin: null.as_raw_fd(),
        stdout: log.as_raw_fd(),
        stderr: log.as_raw_fd(),
    };
    if let Err(e) = sandbox.start(stdio) {
        // Exit with the shell's code for the failure (127 not found, 126 not executable, 125 otherwise).
        crate::print_error(&e);
        return Ok(e.exit_code() as u8);
    }
    drop((null, log));

    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
    tartarus_hostsys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let signals = tartarus_hostsys::signal_fd(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    println!("ready {}", sandbox.id());
    std::io::stdout().flush()?;

    let mut kill_requester = None;
    let outcome = loop {
        let event = sandbox.event_fd().map(|fd| fd.as_raw_fd()).unwrap_or(-1);
        // SAFETY: the descriptor belongs to `sandbox`, which outlives this poll.
        let event = unsafe { BorrowedFd::borrow_raw(event) };
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&event, PollFlags::IN),
            PollFd::new(&signals, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        if ready[1] {
            if let Some(outcome) = sandbox.try_wait()? {
                break Some(outcome);
            }
        }
        if ready[2] {
            sandbox.kill(KillReason::Requested)?;
            break None;
        }
        if ready[0] {
            let (stream, _) = listener.accept()?;
            if let Some(killer) = serve(&mut sandbox, stream)? {
                sandbox.kill(KillReason::Requested)?;
                kill_requester = Some(killer);
                break None;
            }
        }
    };
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
    if let Some(mut stream) = kill_requester {
        let _ = writeln!(stream, "{}", json!({"ok": true}));
    }
    Ok(0)
}

/// Answers one connection; returns the connection when the client asked to kill the sandbox (answered
/// once the sandbox is gone).
fn serve(sandbox: &mut ProcessSandbox, stream: UnixStream) -> anyhow::Result<Option<UnixStream>> {
    let mut line = String::new();
    let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_REQUEST));
    reader.read_line(&mut line)?;
    let response = match serde_json::from_str::<ShimRequest>(&line) {
        Err(e) => error_json("invalid_request", e),
        Ok(ShimRequest::Status) => {
            json!({"id": sandbox.id(), "state": if sandbox.is_paused() { "paused" } else { "running" }})
        }
        Ok(ShimRequest::Pause) => match sandbox.pause() {
            Ok(()) => json!({"ok": true}),
            Err(e) => error_json("unavailable", crate_error_line(&e)),
        },
        Ok(ShimRequest::Resume) => match sandbox.resume() {
            Ok(()) => json!({"ok": true}),
            Err(e) => error_json("unavailable", crate_error_line(&e)),
        },
        Ok(ShimRequest::Exec { .. }) if sandbox.is_paused() => {
            error_json("paused", "the sandbox is paused; resume it first")
        }
        Ok(ShimRequest::Kill) => return Ok(Some(stream)),
        Ok(ShimRequest::Exec {
            command,
            env,
            workdir,
            stdin,
            stdin_base64,
            binary_output,
            timeout_ms,
        }) => {
            let request = ExecRequest {
                command,
                env,
                workdir,
            };
            let timeout = timeout_ms.map(Duration::from_millis);
            let input = match stdin_base64 {
                Some(b64) => BASE64
                    .decode(b64.as_bytes())
                    .map_err(|e| ExecError::Invalid(format!("stdin_base64: {e}"))),
                None => Ok(stdin.unwrap_or_default().into_bytes()),
            };
            match input.and_then(|input| exec(sandbox, &request, &input, timeout, binary_output)) {
                Ok(r) => serde_json::to_value(r)?,
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
    let mut stream = stream;
    // A client that went away does not stop the shim.
    let _ = writeln!(stream, "{response}");
    Ok(None)
}

/// An error and its causes on one line.
fn crate_error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(Into::into)
}

/// Runs one command to completion with `input` on stdin, collecting its output.
fn exec(
    sandbox: &mut ProcessSandbox,
    request: &ExecRequest,
    input: &[u8],
    timeout: Option<Duration>,
    binary_output: bool,
) -> Result<ExecResponse, ExecError> {
    let channel = |e: std::io::Error| ExecError::Channel(e);
    let (stdin_read, stdin_write) = pipe().map_err(channel)?;
    let (stdout_read, stdout_write) = pipe().map_err(channel)?;
    let (stderr_read, stderr_write) = pipe().map_err(channel)?;
    let started = Instant::now();
    let id = sandbox.exec(
        request,
        [stdin_read.as_fd(), stdout_write.as_fd(), stderr_write.as_fd()],
    )?;
    drop((stdin_read, stdout_write, stderr_write));
    for fd in [&stdin_write, &stdout_read, &stderr_read] {
        rustix::io::ioctl_fionbio(fd, true).map_err(|e| channel(e.into()))?;
    }
    let mut stdin = (!input.is_empty()).then_some(stdin_write);
    let mut input = input;
    let (mut stdout_open, mut stderr_open) = (Some(stdout_read), Some(stderr_read));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut truncated = false;
    let mut timed_out = false;
    let termination = loop {
        if let Some(t) = sandbox.wait_exec(id, Some(Duration::ZERO))? {
            break t;
        }
        let remaining = timeout.map(|t| t.saturating_sub(started.elapsed()));
        if remaining.is_some_and(|r| r.is_zero()) && !timed_out {
            timed_out = true;
            sandbox.kill_exec(id)?;
        }
        let events = sandbox.exec_event_fd().ok_or(ExecError::NotService)?.as_raw_fd();
        // SAFETY: the descriptor belongs to `sandbox`, which outlives this poll.
        let events = unsafe { BorrowedFd::borrow_raw(events) };
        let mut fds = vec![PollFd::new(&events, PollFlags::IN)];
        for fd in [&stdout_open, &stderr_open].into_iter().flatten() {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let stdin_slot = fds.len();
        if let Some(w) = &stdin {
            fds.push(PollFd::new(w, PollFlags::OUT));
        }
        let ts = remaining.filter(|_| !timed_out).map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        });
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(channel(e.into())),
        }
        let writable = fds.get(stdin_slot).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        truncated |= drain(&mut stdout_open, &mut out);
        truncated |= drain(&mut stderr_open, &mut err);
        if writable {
            if let Some(w) = &stdin {
                match rustix::io::write(w, input) {
                    Ok(n) => input = &input[n..],
                    Err(rustix::io::Errno::AGAIN) => {}
                    Err(_) => input = &[],
                }
            }
            if input.is_empty() {
                stdin = None; // EOF for the command
            }
        }
    };
    // What the command wrote before exiting; background children holding the pipes are not waited for.
    truncated |= drain(&mut stdout_open, &mut out);
    truncated |= drain(&mut stderr_open, &mut err);
    let signal = match termination {
        Termination::Signaled(s) => Some(s),
        Termination::Exited(_) => None,
    };
    let (stdout, stdout_base64) = match binary_output {
        true => (String::new(), Some(BASE64.encode(&out))),
        false => (String::from_utf8_lossy(&out).into_owned(), None),
    };
    Ok(ExecResponse {
        exit_code: termination.exit_code(),
        signal,
        stdout,
        stdout_base64,
        stderr: String::from_utf8_lossy(&err).into_owned(),
        wall_ms: started.elapsed().as_secs_f64() * 1000.0,
        timed_out,
        truncated,
    })
}

/// Reads what is available (non-blocking) into `buf` up to [`MAX_OUTPUT`], closing the pipe at EOF; true
/// if anything was dropped.
fn drain(pipe: &mut Option<OwnedFd>, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    let mut dropped = false;
    let Some(fd) = pipe.as_ref() else { return false };
    loop {
        match rustix::io::read(fd, &mut chunk) {
            Ok(0) => {
                *pipe = None;
                return dropped;
            }
            Err(_) => return dropped,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..n.min(room)]);
                dropped |= n > room;
            }
        }
    }
}
