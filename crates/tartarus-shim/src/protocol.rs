//! The shim contract, version [`VERSION`].
//!
//! Transport: a unix socket per sandbox (`SandboxDir::socket`). A client connects, writes one
//! [`RequestLine`] as a JSON line, and reads [`ReplyLine`]s: exactly one for every operation but a
//! streaming exec, which answers [`StreamEvent`]s (`started`, output chunks, `exit`) on the same
//! connection. Closing the connection of a running exec kills that exec.
//!
//! Start-up: the shim writes one [`Handshake`] line on its stdout: `ready` once it accepts requests, or
//! `failed` with the structured reason the sandbox could not start. When the sandbox ends, the shim writes a
//! [`ResultRecord`] to its result file and exits.
//!
//! Every message carries `v`. A reader refuses a message of another version with a [`VersionError`] that
//! names both versions instead of guessing at its fields; additions that old readers may ignore keep the
//! version, a change of meaning raises it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version of this contract.
pub const VERSION: u32 = 1;

/// Largest request line a shim reads.
pub const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Output kept per stream of one buffered exec; the rest is dropped and reported as `truncated`.
pub const MAX_EXEC_OUTPUT_BYTES: usize = 4 << 20;
/// Largest file moved by one `read_file` / `write_file`.
pub const MAX_FILE_BYTES: usize = 4 << 20;

/// One request: `{"v":1,"op":"exec",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLine {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

impl RequestLine {
    pub fn new(request: Request) -> Self {
        RequestLine { v: VERSION, request }
    }
}

/// What a client asks of a shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a command in the sandbox. Buffered: one [`ExecOutput`]. Streaming: [`StreamEvent`]s.
    Exec(ExecRequest),
    /// → [`Status`].
    Status,
    /// Freeze every process; execs are refused until `resume`. → [`Done`].
    Pause,
    /// → [`Done`].
    Resume,
    /// Quarantine: cut an egress network off, then freeze every process (kept for inspection). → [`Isolated`].
    Isolate,
    /// Lower the CPU quota to `cpus` cores (enforcement of a resource violation). → [`Throttled`].
    Throttle { cpus: f64 },
    /// Kill the sandbox; answered with [`Done`] once it is gone and cleaned up. The shim then exits.
    /// With `grace_ms`, its processes first get SIGTERM and that long to end on their own (the result
    /// record's `signal` is then 15), then SIGKILL (`signal` 9). Absent: SIGKILL at once (the version 1
    /// form `{"op":"kill"}` is still this).
    Kill {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_ms: Option<u64>,
    },
    /// Read a regular file inside the sandbox, as the sandbox user. → [`FileData`].
    ReadFile { path: String },
    /// Create or replace a regular file inside the sandbox, as the sandbox user. → [`Done`].
    WriteFile {
        path: String,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// List a directory inside the sandbox, as the sandbox user. → [`DirListing`].
    ListDir { path: String },
    /// Connect to `127.0.0.1:port` inside the sandbox's network namespace. → [`Done`], with the connected
    /// TCP socket passed along the reply line (`SCM_RIGHTS`); the caller then owns the connection.
    ConnectPort { port: u16 },
    /// Pause to disk: save the whole sandbox into the empty directory `dir` (made by the caller), seal it
    /// (`tartarus_runtime::snapshot`) and end the sandbox. Answered with [`Done`] once the snapshot is
    /// sealed and the sandbox cleaned up (the result record's reason is then `hibernated`); the shim then
    /// exits. Refused, with the sandbox untouched, while an exec is attached ([`ErrorCode::Refused`]) or
    /// on a lane that cannot ([`ErrorCode::Unsupported`]). A shim started with `--restore DIR` continues
    /// the sandbox from such a directory.
    Hibernate { dir: std::path::PathBuf },
}

/// A command to run in a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Vec<String>,
    /// Added to (and overriding) the sandbox's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Absolute working directory; the sandbox user's home when `None`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Bytes given to the command's stdin (then EOF).
    #[serde(default, with = "base64_bytes")]
    pub stdin: Vec<u8>,
    /// Killed after this long, with `timed_out: true`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Send output as it is written instead of all at the end.
    #[serde(default)]
    pub stream: bool,
}

/// One reply: `{"v":1,"ok":{...}}` or `{"v":1,"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyLine<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: Reply<T>,
}

impl<T> ReplyLine<T> {
    pub fn ok(value: T) -> Self {
        ReplyLine {
            v: VERSION,
            body: Reply::Ok(value),
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ReplyLine {
            v: VERSION,
            body: Reply::Error(ShimError {
                code,
                message: message.into(),
            }),
        }
    }

    /// The reply as a result, refusing another protocol version.
    pub fn into_result(self) -> Result<T, ReplyError> {
        check_version(self.v)?;
        match self.body {
            Reply::Ok(value) => Ok(value),
            Reply::Error(e) => Err(ReplyError::Shim(e)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(ShimError),
}

/// A refusal by the shim, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ShimError {
    pub code: ErrorCode,
    pub message: String,
}

/// Why the shim refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or asks for something impossible (bad path, bad number, bad version).
    InvalidRequest,
    /// The sandbox is paused; resume it first.
    Paused,
    /// The command is not in the sandbox's PATH or root.
    CommandNotFound,
    /// The command exists but cannot be executed.
    NotExecutable,
    /// The command could not be started for another reason.
    ExecFailed,
    /// The path does not exist.
    NotFound,
    /// The path exists but is not what the operation needs (a directory, a symlink, a device).
    WrongType,
    /// The sandbox user may not do this (permissions, read-only root).
    Forbidden,
    /// More than the operation moves at once ([`MAX_FILE_BYTES`]).
    TooLarge,
    /// The lane cannot do this (e.g. pause without a freezer).
    Unsupported,
    /// The host failed to do it (a cgroup write, the sandbox's control channel).
    Unavailable,
    /// Nothing listens on the port inside the sandbox.
    PortClosed,
    /// Not now (an exec is attached, too little disk for a snapshot); the sandbox is untouched.
    Refused,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Paused => "paused",
            ErrorCode::CommandNotFound => "command_not_found",
            ErrorCode::NotExecutable => "not_executable",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::WrongType => "wrong_type",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::PortClosed => "port_closed",
            ErrorCode::Refused => "refused",
        }
    }
}

/// An operation that succeeded with nothing to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {}

/// Whether the sandbox's processes are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// Counters of a sandbox hitting its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LimitHits {
    pub oom_kills: u64,
    pub pids_limit_hits: u64,
}

impl LimitHits {
    pub fn total(&self) -> u64 {
        self.oom_kills.saturating_add(self.pids_limit_hits)
    }
}

/// Reply to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub state: RunState,
    /// Packets the egress contract dropped so far; `None` without egress.
    pub blocked_packets: Option<u64>,
    pub limit_hits: LimitHits,
    /// CPU time the sandbox has used so far, in microseconds; absent where the lane cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usec: Option<u64>,
    /// Memory the sandbox uses now, in bytes; absent where the lane cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Reply to `isolate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolated {
    /// False when the sandbox had no network to cut.
    pub network_cut: bool,
}

/// Reply to `throttle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled {
    /// False when the sandbox has no CPU cgroup to throttle.
    pub throttled: bool,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The exit code, or 128 + signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub wall_ms: f64,
    pub timed_out: bool,
}

/// Reply to a buffered exec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecOutput {
    #[serde(flatten)]
    pub exit: ExecExit,
    /// UTF-8, invalid sequences replaced.
    pub stdout: String,
    pub stderr: String,
    /// Output beyond [`MAX_EXEC_OUTPUT_BYTES`] per stream was dropped.
    pub truncated: bool,
}

/// Which output of a command a chunk is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// One event of a streaming exec, as a line `{"v":1,"event":"output",...}`; an error before the start is
/// an error [`ReplyLine`] instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StreamEvent {
    /// The command was executed; output follows.
    Started,
    /// A chunk of output as text (a UTF-8 sequence is never split between chunks).
    Output { stream: OutputStream, data: String },
    /// The command ended; the last event.
    Exit(ExecExit),
}

/// [`StreamEvent`] with its version: what a streaming exec's connection carries after the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamLine {
    pub v: u32,
    #[serde(flatten)]
    pub event: StreamEvent,
}

impl StreamLine {
    pub fn new(event: StreamEvent) -> Self {
        StreamLine { v: VERSION, event }
    }
}

/// Reply to `read_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
}

/// Reply to `list_dir`, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    pub entries: Vec<DirEntry>,
}

/// The shim's first line on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    pub v: u32,
    #[serde(flatten)]
    pub state: HandshakeState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandshakeState {
    /// The sandbox runs and the socket accepts requests.
    Ready { id: String },
    /// The sandbox could not start.
    Failed(StartFailure),
}

/// Why a sandbox could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct StartFailure {
    pub kind: StartFailureKind,
    /// The shell's code for it: 127 not found, 126 not executable, 125 otherwise.
    pub exit_code: i32,
    /// One line with its causes.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFailureKind {
    /// The spec cannot run on this host or lane (bad rootfs, a limit that cannot be enforced): the
    /// request's fault, or the operator's.
    Spec,
    /// The main command is not there.
    CommandNotFound,
    /// The main command cannot be executed.
    NotExecutable,
    /// The host failed (namespaces, cgroups, the socket).
    Host,
}

/// Why the sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Exited,
    Timeout,
    Oom,
    Killed,
    /// Saved to disk by `hibernate`: the sandbox has not ended and continues from its snapshot.
    Hibernated,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::Timeout => "timeout",
            EndReason::Oom => "oom",
            EndReason::Killed => "killed",
            EndReason::Hibernated => "hibernated",
        }
    }
}

/// What the shim writes to its result file when the sandbox has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub v: u32,
    pub id: String,
    /// The exit code, or 128 + signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: EndReason,
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub peak_memory_bytes: u64,
    /// With reason `hibernated`: the directory of the sealed snapshot the sandbox continues from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<std::path::PathBuf>,
}

/// A message of a version this side does not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shim speaks contract version {found}, this side version {VERSION}: run the same Tartarus version on both sides")]
pub struct VersionError {
    pub found: u32,
}

pub fn check_version(v: u32) -> Result<(), VersionError> {
    match v {
        VERSION => Ok(()),
        found => Err(VersionError { found }),
    }
}

/// Decoding or reading a reply failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Shim(ShimError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("malformed shim message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Parses one line of type `T` (a [`ReplyLine`], [`StreamLine`], [`Handshake`] or [`ResultRecord`]),
/// checking its version before its fields so a newer shim's message is named as such.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, ReplyError> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let versioned: Versioned = serde_json::from_slice(line)?;
    check_version(versioned.v)?;
    Ok(serde_json::from_slice(line)?)
}

/// Encodes one message as a JSON line (with its newline).
pub fn encode(message: &impl Serialize) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys, no non-finite floats that
    // serde_json refuses (it writes them as null).
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Vec<u8>` as a base64 string.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_round_trip_with_their_version() {
        let requests = [
            Request::Exec(ExecRequest {
                command: vec!["echo".into(), "hi".into()],
                env: vec![("K".into(), "V".into())],
                workdir: Some("/tmp".into()),
                stdin: b"\x00\xffbytes".to_vec(),
                timeout_ms: Some(5),
                stream: true,
            }),
            Request::Status,
            Request::Throttle { cpus: 0.25 },
            Request::WriteFile {
                path: "/tmp/x".into(),
                data: vec![0, 1, 2],
            },
            Request::ListDir { path: "/".into() },
        ];
        for request in requests {
            let line = encode(&RequestLine::new(request.clone()));
            let back: RequestLine = decode(&line).unwrap();
            assert_eq!(back.request, request);
            assert!(
                line.starts_with(b"{\"v\":1,"),
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn replies_are_ok_or_a_coded_error() {
        let ok = encode(&ReplyLine::ok(Throttled { throttled: true }));
        assert_eq!(ok, b"{\"v\":1,\"ok\":{\"throttled\":true}}\n");
        let err = encode(&ReplyLine::<Done>::error(ErrorCode::Paused, "resume it first"));
        let reply: ReplyLine<Done> = decode(&err).unwrap();
        match reply.into_result() {
            Err(ReplyError::Shim(e)) => assert_eq!(
                (e.code, e.message.as_str()),
                (ErrorCode::Paused, "resume it first")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_version_is_named_not_guessed_at() {
        let newer = br#"{"v":2,"ok":{"something_else":1}}"#;
        match decode::<ReplyLine<Status>>(newer) {
            Err(ReplyError::Version(VersionError { found: 2 })) => {}
            other => panic!("{other:?}"),
        }
        let garbage = decode::<ReplyLine<Status>>(b"tartarus: oops");
        assert!(matches!(garbage, Err(ReplyError::Malformed(_))));
        // A reply of the right version but the wrong shape is malformed, never defaulted.
        let wrong = decode::<ReplyLine<Status>>(br#"{"v":1,"ok":{"id":"x"}}"#);
        assert!(matches!(wrong, Err(ReplyError::Malformed(_))), "{wrong:?}");
    }

    #[test]
    fn stream_events_and_the_handshake_are_tagged_lines() {
        let line = encode(&StreamLine::new(StreamEvent::Output {
            stream: OutputStream::Stderr,
            data: "é".into(),
        }));
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"v\":1,\"event\":\"output\",\"stream\":\"stderr\",\"data\":\"é\"}\n"
        );
        let exit: StreamLine =
            decode(br#"{"v":1,"event":"exit","exit_code":3,"signal":null,"wall_ms":1.5,"timed_out":false}"#)
                .unwrap();
        assert!(matches!(
            exit.event,
            StreamEvent::Exit(ExecExit { exit_code: 3, .. })
        ));
        let failed = Handshake {
            v: VERSION,
            state: HandshakeState::Failed(StartFailure {
                kind: StartFailureKind::CommandNotFound,
                exit_code: 127,
                message: "command not found: nope".into(),
            }),
        };
        let back: Handshake = decode(&encode(&failed)).unwrap();
        assert_eq!(back, failed);
    }
}
