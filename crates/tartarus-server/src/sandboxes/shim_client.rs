//! The server's side of the shim contract (`tartarus_shim::protocol`): starting a shim and waiting for its
//! handshake ([`ShimLauncher`]), calling it with a deadline on every operation ([`ShimClient`]), and reading
//! the result record it leaves. Nothing here builds JSON by hand or reads a reply by string key.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tartarus_runtime::lanes::LaneName;
use tartarus_shim::protocol::{
    self, DirEntry, DirListing, Done, ErrorCode, ExecOutput, ExecRequest, FileData, Handshake,
    HandshakeState, Isolated, ReplyError, ReplyLine, Request, RequestLine, ResultRecord, ShimError,
    StartFailure, StartFailureKind, Status, StreamEvent, StreamLine, Throttled,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a shim may take to report its handshake.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of a control call (status, pause, throttle, …).
const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of a kill: the shim answers once the sandbox is gone and cleaned up.
const KILL_DEADLINE: Duration = Duration::from_secs(30);
/// How long a pause to disk may take: the lane's checkpoint (runsc allows itself a minute), sealing
/// (hashing every part twice) and the cleanup.
pub(super) const HIBERNATE_DEADLINE: Duration = Duration::from_secs(180);
/// Deadline of a file operation (the shim moves at most `MAX_FILE_BYTES`).
const FILE_DEADLINE: Duration = Duration::from_secs(60);
/// Slack beyond an exec's own timeout, which the shim enforces.
const EXEC_SLACK: Duration = Duration::from_secs(30);
/// Largest reply line read from a shim: a buffered exec's two capped outputs, base64 file data, JSON escapes.
const MAX_REPLY_BYTES: u64 = 64 << 20;

/// The files of one sandbox under `DATA_DIR/sandboxes/<id>/`, named once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    path: PathBuf,
}

impl SandboxDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SandboxDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shim's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("shim.sock")
    }

    /// The spec the shim starts (with the server's own mounts).
    pub fn spec(&self) -> PathBuf {
        self.path.join("spec.json")
    }

    /// The shim's [`ResultRecord`].
    pub fn result(&self) -> PathBuf {
        self.path.join("result.json")
    }

    /// The main command's stdout and stderr.
    pub fn main_log(&self) -> PathBuf {
        self.path.join("main.log")
    }

    /// The shim's own stderr.
    pub fn shim_log(&self) -> PathBuf {
        self.path.join("shim.log")
    }

    /// The result record the shim left, `Ok(None)` when there is none.
    pub async fn read_result(&self) -> Result<Option<ResultRecord>, ResultError> {
        let bytes = match tokio::fs::read(self.result()).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ResultError::Read(e)),
        };
        let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        protocol::decode(line).map(Some).map_err(ResultError::Decode)
    }
}

/// A result record that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("reading the result record")]
    Read(#[source] std::io::Error),
    #[error("the result record is unreadable")]
    Decode(#[source] ReplyError),
}

/// Starts shims.
#[derive(Debug, Clone)]
pub struct ShimLauncher {
    exe: PathBuf,
}

/// A shim that reported `ready`.
pub struct LaunchedShim {
    pub child: tokio::process::Child,
    pub pid: i64,
}

/// Why a shim did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting the shim")]
    Spawn(#[source] std::io::Error),
    /// The sandbox could not start; the shim said why.
    #[error(transparent)]
    Failed(StartFailure),
    #[error("the shim did not report ready within {}s", START_DEADLINE.as_secs())]
    Timeout,
    #[error("the shim exited (status {status:?}) without a handshake{}", log_tail.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
    Vanished {
        status: Option<i32>,
        log_tail: Option<String>,
    },
    #[error("the shim's handshake is unreadable")]
    Handshake(#[source] ReplyError),
}

impl ShimLauncher {
    pub fn new(exe: PathBuf) -> Self {
        ShimLauncher { exe }
    }

    /// The `tartarus` binary the shims run.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Starts a shim for the spec in `dir` on the isolation lane `lane` and waits for its handshake.
    pub async fn launch(&self, dir: &SandboxDir, lane: LaneName) -> Result<LaunchedShim, LaunchError> {
        self.launch_from(dir, lane, None).await
    }

    /// [`ShimLauncher::launch`], continuing the sandbox from the sealed snapshot `restore` when given.
    pub async fn launch_from(
        &self,
        dir: &SandboxDir,
        lane: LaneName,
        restore: Option<&Path>,
    ) -> Result<LaunchedShim, LaunchError> {
        let shim_log = std::fs::File::create(dir.shim_log()).map_err(LaunchError::Spawn)?;
        let mut command = tokio::process::Command::new(&self.exe);
        command.arg("shim");
        if lane != LaneName::Process {
            // The process lane is the shim's default, so shims of every version start it.
            command.arg("--runtime").arg(lane.as_str());
        }
        if let Some(snapshot) = restore {
            command.arg("--restore").arg(snapshot);
        }
        let mut child = command
            .arg("--socket")
            .arg(dir.socket())
            .arg("--spec")
            .arg(dir.spec())
            .arg("--result")
            .arg(dir.result())
            .arg("--log")
            .arg(dir.main_log())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(shim_log)
            // Its own process group: a Ctrl-C to the server must not reach sandboxes.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(LaunchError::Spawn)?;
        let pid = child.id().map(i64::from).unwrap_or(0);
        let Some(stdout) = child.stdout.take() else {
            let _ = child.start_kill();
            return Err(LaunchError::Spawn(std::io::Error::other(
                "the shim has no stdout",
            )));
        };
        let mut line = Vec::new();
        let mut reader = BufReader::new(stdout.take(64 << 10));
        let read = reader.read_until(b'\n', &mut line);
        let outcome = match tokio::time::timeout(START_DEADLINE, read).await {
            Err(_) => Err(LaunchError::Timeout),
            Ok(Err(e)) => Err(LaunchError::Spawn(e)),
            Ok(Ok(0)) => {
                let status = child.wait().await.ok().and_then(|s| s.code());
                let log_tail = tokio::fs::read_to_string(dir.shim_log())
                    .await
                    .ok()
                    .and_then(|log| log.lines().last().map(str::to_string));
                Err(LaunchError::Vanished { status, log_tail })
            }
            Ok(Ok(_)) => match protocol::decode::<Handshake>(line.trim_ascii_end()) {
                Ok(Handshake {
                    state: HandshakeState::Ready { .. },
                    ..
                }) => return Ok(LaunchedShim { child, pid }),
                Ok(Handshake {
                    state: HandshakeState::Failed(failure),
                    ..
                }) => Err(LaunchError::Failed(failure)),
                Err(e) => Err(LaunchError::Handshake(e)),
            },
        };
        let _ = child.start_kill();
        let _ = child.wait().await;
        outcome
    }
}

impl LaunchError {
    /// The shell's code for the failure when the shim gave one.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            LaunchError::Failed(failure) => Some(failure.exit_code),
            LaunchError::Vanished { status, .. } => *status,
            _ => None,
        }
    }

    /// Whether the request (its spec or command) is at fault rather than the host.
    pub fn is_spec_fault(&self) -> Option<StartFailureKind> {
        match self {
            LaunchError::Failed(failure) if failure.kind != StartFailureKind::Host => Some(failure.kind),
            _ => None,
        }
    }
}

/// A call to a running shim failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No shim answers on the socket: the sandbox is not running.
    #[error("the sandbox is not running")]
    NotRunning,
    /// The shim refused the request.
    #[error(transparent)]
    Refused(ShimError),
    #[error("the shim did not answer {op} within {}s", deadline.as_secs())]
    Timeout { op: &'static str, deadline: Duration },
    #[error("the shim's answer to {op} is unusable")]
    Protocol {
        op: &'static str,
        #[source]
        source: ReplyError,
    },
    #[error("the shim's connection failed during {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl CallError {
    /// The shim's refusal code, if it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Refused(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A client of one sandbox's shim.
#[derive(Debug, Clone)]
pub struct ShimClient {
    socket: PathBuf,
}

/// The events of a streaming exec, after `started`. Dropping it closes the connection, which makes the
/// shim kill the command.
pub struct ExecEvents {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl ExecEvents {
    /// The next event; `None` once the stream ended (after `exit`, or if the shim went away).
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ReplyError>> {
        let line = self.lines.next_line().await.ok()??;
        Some(protocol::decode::<StreamLine>(line.as_bytes()).map(|l| l.event))
    }
}

fn op_name(request: &Request) -> &'static str {
    match request {
        Request::Exec(_) => "exec",
        Request::Status => "status",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Isolate => "isolate",
        Request::Throttle { .. } => "throttle",
        Request::Kill { .. } => "kill",
        Request::ReadFile { .. } => "read_file",
        Request::WriteFile { .. } => "write_file",
        Request::ListDir { .. } => "list_dir",
        Request::ConnectPort { .. } => "connect_port",
        Request::Hibernate { .. } => "hibernate",
    }
}

impl ShimClient {
    pub fn new(dir: &SandboxDir) -> Self {
        ShimClient { socket: dir.socket() }
    }

    /// Connects and sends `request`; returns the connection.
    async fn send(&self, request: Request) -> Result<UnixStream, CallError> {
        let op = op_name(&request);
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|_| CallError::NotRunning)?;
        stream
            .write_all(&protocol::encode(&RequestLine::new(request)))
            .await
            .map_err(|source| CallError::Io { op, source })?;
        Ok(stream)
    }

    /// Sends one request and reads its one reply, within `deadline`.
    async fn call<T: DeserializeOwned>(&self, request: Request, deadline: Duration) -> Result<T, CallError> {
        let op = op_name(&request);
        let exchange = async {
            let stream = self.send(request).await?;
            let mut line = Vec::new();
            let read = BufReader::new(stream.take(MAX_REPLY_BYTES))
                .read_until(b'\n', &mut line)
                .await;
            match read {
                Ok(0) => Err(CallError::NotRunning),
                Ok(_) => protocol::decode::<ReplyLine<T>>(line.trim_ascii_end())
                    .map_err(|source| CallError::Protocol { op, source })?
                    .into_result()
                    .map_err(|e| match e {
                        ReplyError::Shim(refusal) => CallError::Refused(refusal),
                        source => CallError::Protocol { op, source },
                    }),
                Err(source) => Err(CallError::Io { op, source }),
            }
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| CallError::Timeout { op, deadline })?
    }

    /// A TCP connection to `port` inside the sandbox's network namespace, made by the shim and passed over
    /// (`SCM_RIGHTS`) with its reply.
    pub async fn connect_port(&self, port: u16) -> Result<tokio::net::TcpStream, CallError> {
        let op = "connect_port";
        let exchange = async {
            let stream = self.send(Request::ConnectPort { port }).await?;
            let (line, fd) = loop {
                stream
                    .readable()
                    .await
                    .map_err(|source| CallError::Io { op, source })?;
                match stream.try_io(tokio::io::Interest::READABLE, || receive_with_fd(&stream)) {
                    Ok(received) => break received,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(source) => return Err(CallError::Io { op, source }),
                }
            };
            if line.is_empty() {
                return Err(CallError::NotRunning);
            }
            protocol::decode::<ReplyLine<Done>>(line.trim_ascii_end())
                .map_err(|source| CallError::Protocol { op, source })?
                .into_result()
                .map_err(|e| match e {
                    ReplyError::Shim(refusal) => CallError::Refused(refusal),
                    source => CallError::Protocol { op, source },
                })?;
            let fd = fd.ok_or_else(|| CallError::Io {
                op,
                source: std::io::Error::other("the shim's reply carried no connection"),
            })?;
            let connection = std::net::TcpStream::from(fd);
            connection
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(connection))
                .map_err(|source| CallError::Io { op, source })
        };
        tokio::time::timeout(CONTROL_DEADLINE, exchange)
            .await
            .map_err(|_| CallError::Timeout {
                op,
                deadline: CONTROL_DEADLINE,
            })?
    }

    pub async fn status(&self) -> Result<Status, CallError> {
        self.call(Request::Status, CONTROL_DEADLINE).await
    }

    pub async fn pause(&self) -> Result<(), CallError> {
        self.call::<Done>(Request::Pause, CONTROL_DEADLINE)
            .await
            .map(drop)
    }

    pub async fn resume(&self) -> Result<(), CallError> {
        self.call::<Done>(Request::Resume, CONTROL_DEADLINE)
            .await
            .map(drop)
    }

    pub async fn isolate(&self) -> Result<Isolated, CallError> {
        self.call(Request::Isolate, CONTROL_DEADLINE).await
    }

    pub async fn throttle(&self, cpus: f64) -> Result<Throttled, CallError> {
        self.call(Request::Throttle { cpus }, CONTROL_DEADLINE).await
    }

    /// Kills the sandbox; returns once the shim says it is gone and cleaned up.
    pub async fn kill(&self) -> Result<(), CallError> {
        self.call::<Done>(Request::Kill { grace_ms: None }, KILL_DEADLINE)
            .await
            .map(drop)
    }

    /// Pauses the sandbox to disk into `dir`; returns once its snapshot is sealed and the shim has cleaned
    /// up (runsc may take a minute to checkpoint, then every part is hashed and read back).
    pub async fn hibernate(&self, dir: &Path) -> Result<(), CallError> {
        self.call::<Done>(
            Request::Hibernate {
                dir: dir.to_path_buf(),
            },
            HIBERNATE_DEADLINE,
        )
        .await
        .map(drop)
    }

    /// Stops the sandbox gracefully: SIGTERM, then SIGKILL after `grace`; returns once it is gone.
    pub async fn terminate(&self, grace: Duration) -> Result<(), CallError> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.call::<Done>(
            Request::Kill {
                grace_ms: Some(grace_ms),
            },
            KILL_DEADLINE + grace,
        )
        .await
        .map(drop)
    }

    /// A buffered exec; the shim kills it at its `timeout_ms`, so the deadline is that plus some slack.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, CallError> {
        let deadline = request.timeout_ms.map(Duration::from_millis).unwrap_or(MAX_EXEC) + EXEC_SLACK;
        self.call(
            Request::Exec(ExecRequest {
                stream: false,
                ..request
            }),
            deadline,
        )
        .await
    }

    /// Starts a streaming exec; returns its events once the shim said `started`.
    pub async fn exec_stream(&self, request: ExecRequest) -> Result<ExecEvents, CallError> {
        let op = "exec";
        let start = async {
            let stream = self
                .send(Request::Exec(ExecRequest {
                    stream: true,
                    ..request
                }))
                .await?;
            let (read, write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let first = lines
                .next_line()
                .await
                .map_err(|source| CallError::Io { op, source })?
                .ok_or(CallError::NotRunning)?;
            if let Ok(reply) = protocol::decode::<ReplyLine<Done>>(first.as_bytes()) {
                if let Err(e) = reply.into_result() {
                    return Err(match e {
                        ReplyError::Shim(refusal) => CallError::Refused(refusal),
                        source => CallError::Protocol { op, source },
                    });
                }
            }
            match protocol::decode::<StreamLine>(first.as_bytes()) {
                Ok(StreamLine {
                    event: StreamEvent::Started,
                    ..
                }) => Ok(ExecEvents { lines, _write: write }),
                Ok(other) => Err(CallError::Protocol {
                    op,
                    source: ReplyError::Malformed(serde::de::Error::custom(format!(
                        "expected the started event, got {:?}",
                        other.event
                    ))),
                }),
                Err(source) => Err(CallError::Protocol { op, source }),
            }
        };
        tokio::time::timeout(CONTROL_DEADLINE, start)
            .await
            .map_err(|_| CallError::Timeout {
                op,
                deadline: CONTROL_DEADLINE,
            })?
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, CallError> {
        let request = Request::ReadFile {
            path: path.to_string(),
        };
        self.call::<FileData>(request, FILE_DEADLINE)
            .await
            .map(|f| f.data)
    }

    pub async fn write_file(&self, path: &str, data: Vec<u8>) -> Result<(), CallError> {
        let request = Request::WriteFile {
            path: path.to_string(),
            data,
        };
        self.call::<Done>(request, FILE_DEADLINE).await.map(drop)
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, CallError> {
        let request = Request::ListDir {
            path: path.to_string(),
        };
        self.call::<DirListing>(request, FILE_DEADLINE)
            .await
            .map(|l| l.entries)
    }
}

/// The longest exec the API accepts (`timeout_s` ≤ 86400); an exec without a timeout gets this one.
pub const MAX_EXEC: Duration = Duration::from_secs(86_400);

/// One message of the shim's reply (a short line sent whole) and the descriptor it carries, if any.
fn receive_with_fd(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Option<std::os::fd::OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut line = vec![0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        stream,
        &mut [std::io::IoSliceMut::new(&mut line)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    line.truncate(received.bytes);
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            // Any descriptor beyond the first is dropped (closed) here.
            fd = fds.into_iter().next().or(fd);
        }
    }
    Ok((line, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in shim on a socket that answers each connection with `reply` (or nothing).
    async fn fake_shim(reply: Option<&'static [u8]>) -> (tempfile::TempDir, ShimClient) {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = SandboxDir::new(dir.path());
        let listener = tokio::net::UnixListener::bind(sandbox.socket()).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut line = Vec::new();
                let mut reader = BufReader::new(&mut stream);
                let _ = reader.read_until(b'\n', &mut line).await;
                match reply {
                    Some(bytes) => {
                        let _ = stream.write_all(bytes).await;
                    }
                    // Hold the connection open without answering.
                    None => std::future::pending::<()>().await,
                }
            }
        });
        (dir, ShimClient::new(&sandbox))
    }

    #[tokio::test]
    async fn a_typed_status_reply_is_read() {
        let (_dir, client) = fake_shim(Some(
            b"{\"v\":1,\"ok\":{\"id\":\"sb_1\",\"state\":\"paused\",\"blocked_packets\":3,\"limit_hits\":{\"oom_kills\":1,\"pids_limit_hits\":2}}}\n",
        ))
        .await;
        let status = client.status().await.unwrap();
        assert_eq!(status.state, protocol::RunState::Paused);
        assert_eq!(status.limit_hits.total(), 3);
    }

    #[tokio::test]
    async fn garbage_and_missing_fields_are_errors_not_defaults() {
        let (_dir, client) = fake_shim(Some(b"tartarus: something went wrong\n")).await;
        assert!(matches!(
            client.status().await,
            Err(CallError::Protocol { op: "status", .. })
        ));
        // A status without its limit hits would once have read as zero hits, so enforcement never fired.
        let (_dir, client) = fake_shim(Some(
            b"{\"v\":1,\"ok\":{\"id\":\"sb_1\",\"state\":\"running\"}}\n",
        ))
        .await;
        assert!(matches!(client.status().await, Err(CallError::Protocol { .. })));
    }

    #[tokio::test]
    async fn a_newer_shim_is_named() {
        let (_dir, client) = fake_shim(Some(b"{\"v\":9,\"ok\":{}}\n")).await;
        let e = client.pause().await.unwrap_err();
        let text = tartarus_runtime::error_chain(&e);
        assert!(text.contains("version 9"), "{text}");
    }

    #[tokio::test]
    async fn refusals_keep_their_code() {
        let (_dir, client) = fake_shim(Some(
            b"{\"v\":1,\"error\":{\"code\":\"paused\",\"message\":\"resume it first\"}}\n",
        ))
        .await;
        let e = client.exec(ExecRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Paused));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shim_that_never_answers_times_out() {
        let (_dir, client) = fake_shim(None).await;
        let e = client.status().await.unwrap_err();
        assert!(matches!(e, CallError::Timeout { op: "status", .. }), "{e:?}");
    }

    #[tokio::test]
    async fn no_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let client = ShimClient::new(&SandboxDir::new(dir.path()));
        assert!(matches!(client.status().await, Err(CallError::NotRunning)));
    }
}
