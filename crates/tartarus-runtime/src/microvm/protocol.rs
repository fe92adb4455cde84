//! The channel between the supervisor and the guest agent: one JSON object per line over a virtio-serial
//! port (`/dev/vport*` in the guest, a unix socket QEMU connects to on the host).
//!
//! Both sides compile against these types (the agent is the supervisor's own executable); output and input
//! bytes travel base64-encoded. A frame of an unknown version is refused by both sides naming both
//! versions. The agent sends [`GuestFrame::Ready`] once its root is mounted; from then on the host starts
//! execs, each with an id of its choosing ([`HostFrame::Exec`]; a one-shot sandbox's command is exec
//! [`MAIN_EXEC`]), and every other frame names the exec it is about. For one exec: `exec`, then stdin as
//! `stdin` frames and `stdin_closed`; the agent answers `started` (or `failed`), output frames, and one
//! `exit` once the command has ended and its output has been read.
//!
//! Flow control both ways, so one exec's reader or writer never stalls the others or grows the other
//! side's memory without bound: the host sends [`HostFrame::HoldOutput`] when it holds more of an exec's
//! output than its reader has taken (the agent then stops reading that exec's pipes, and the command
//! blocks on them) and [`HostFrame::ReleaseOutput`] once it is written; the agent sends
//! [`GuestFrame::HoldInput`] and [`GuestFrame::ReleaseInput`] the same way for stdin the command has not
//! read.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Version of the frames; bumped on any incompatible change.
pub const VERSION: u32 = 2;
/// Largest line either side accepts (an output chunk of 64 KiB is about 88 KiB encoded).
pub const MAX_LINE: usize = 256 << 10;
/// Output and input are sent in chunks of at most this many bytes.
pub const CHUNK: usize = 32 << 10;
/// The exec id of a sandbox's own command (the one-shot command, or a service sandbox's main command);
/// the host numbers other execs from 1.
pub const MAIN_EXEC: u64 = 0;

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostFrame {
    /// Start a command as exec `id` (unique for the VM's life).
    Exec {
        id: u64,
        run: RunRequest,
    },
    /// Bytes for exec `id`'s stdin.
    Stdin {
        id: u64,
        data: String,
    },
    /// The caller's stdin of exec `id` reached its end.
    StdinClosed {
        id: u64,
    },
    /// Send `signal` to exec `id`'s process group (the timeout's SIGTERM).
    Signal {
        id: u64,
        signal: i32,
    },
    /// Kill exec `id` and every process it started (its cgroup in the guest).
    Kill {
        id: u64,
    },
    /// SIGTERM to every process but the agent: the first step of a graceful stop. The agent answers
    /// [`GuestFrame::Terminated`] once nothing but itself is left.
    Terminate,
    /// Stop reading exec `id`'s output until [`HostFrame::ReleaseOutput`].
    HoldOutput {
        id: u64,
    },
    ReleaseOutput {
        id: u64,
    },
}

/// One command and the walls it runs behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub argv: Vec<String>,
    /// The complete environment, `KEY=value`.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Syscall numbers denied on top of the process lane's program.
    pub denied_syscalls: Vec<i64>,
    pub open_files: u64,
    pub file_size_bytes: u64,
    /// `RLIMIT_NPROC` of the command, if any (the sandbox's cgroup has the pids limit itself).
    pub max_processes: Option<u64>,
    /// The command runs on a terminal of the guest (a pty: stdin, stdout and stderr are its slave, and its
    /// output comes back as stdout).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's rows and columns, when the caller's side is a terminal.
    #[serde(default)]
    pub tty_size: Option<(u16, u16)>,
}

/// What the agent tells the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestFrame {
    /// The root is mounted and the agent takes execs; `kernel` is the guest's release.
    Ready {
        kernel: String,
    },
    /// Exec `id`'s command was executed.
    Started {
        id: u64,
    },
    /// Exec `id`'s command could not be started.
    Failed {
        id: u64,
        kind: FailKind,
        message: String,
    },
    Stdout {
        id: u64,
        data: String,
    },
    Stderr {
        id: u64,
        data: String,
    },
    /// Exec `id`'s command ended; `oom` when the guest kernel's OOM killer killed one of its processes.
    Exit {
        id: u64,
        code: Option<i32>,
        signal: Option<i32>,
        oom: bool,
    },
    /// The agent holds more of exec `id`'s stdin than the command has read: send no more until
    /// [`GuestFrame::ReleaseInput`].
    HoldInput {
        id: u64,
    },
    ReleaseInput {
        id: u64,
    },
    /// The sandbox's limit counters changed (sent when they do).
    Usage {
        oom_kills: u64,
        pids_limit_hits: u64,
    },
    /// After [`HostFrame::Terminate`]: nothing but the agent is left.
    Terminated,
    /// The agent itself failed (mounting the root, a broken frame); the message says what.
    Fatal {
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    NotFound,
    NotExecutable,
    Setup,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    frame: T,
}

/// A line that is not a frame of this version.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of version {theirs}, this side speaks version {VERSION}")]
    Version { theirs: u32 },
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
}

/// `frame` as one line, newline included.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Envelope { v: VERSION, frame }).unwrap_or_default();
    line.push(b'\n');
    line
}

/// One line (without its newline) as a frame.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, FrameError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version = serde_json::from_slice(line).map_err(FrameError::Malformed)?;
    if version.v != VERSION {
        return Err(FrameError::Version { theirs: version.v });
    }
    let envelope: Envelope<T> = serde_json::from_slice(line).map_err(FrameError::Malformed)?;
    Ok(envelope.frame)
}

pub fn encode_bytes(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn decode_bytes(data: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(data).ok()
}

/// Splits a byte stream into lines, keeping the partial last one for the next read.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Appends `data` and returns the complete lines; `Err` when a line grows past [`MAX_LINE`].
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, usize> {
        self.pending.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(line[..line.len() - 1].to_vec());
        }
        if self.pending.len() > MAX_LINE {
            return Err(self.pending.len());
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_round_trip_with_their_version() {
        let frame = GuestFrame::Exit {
            id: 3,
            code: None,
            signal: Some(9),
            oom: true,
        };
        let line = encode(&frame);
        assert_eq!(
            String::from_utf8_lossy(&line),
            "{\"v\":2,\"event\":\"exit\",\"id\":3,\"code\":null,\"signal\":9,\"oom\":true}\n"
        );
        let back: GuestFrame = decode(&line[..line.len() - 1]).expect("decodes");
        assert_eq!(back, frame);
        let stdin = HostFrame::Stdin {
            id: 1,
            data: encode_bytes(b"\x00\xffhi"),
        };
        let line = encode(&stdin);
        let HostFrame::Stdin { data, .. } = decode(&line[..line.len() - 1]).expect("decodes") else {
            panic!("not stdin");
        };
        assert_eq!(decode_bytes(&data).as_deref(), Some(&b"\x00\xffhi"[..]));
    }

    #[test]
    fn test_a_frame_of_another_version_is_refused_naming_both() {
        let err = decode::<HostFrame>(br#"{"v":1,"op":"stdin_closed","id":0}"#).expect_err("refused");
        assert_eq!(err.to_string(), "frame of version 1, this side speaks version 2");
        assert!(decode::<HostFrame>(br#"{"v":2,"op":"format_disk"}"#).is_err());
        assert!(decode::<HostFrame>(br#"{"v":2,"op":"stdin_closed","id":0}"#).is_ok());
    }

    #[test]
    fn test_lines_are_split_across_reads_and_bounded() {
        let mut buffer = LineBuffer::default();
        assert_eq!(buffer.push(b"ab").expect("fits"), Vec::<Vec<u8>>::new());
        assert_eq!(
            buffer.push(b"c\nd\nef").expect("fits"),
            vec![b"abc".to_vec(), b"d".to_vec()]
        );
        assert_eq!(buffer.push(b"\n").expect("fits"), vec![b"ef".to_vec()]);
        assert!(buffer.push(&vec![b'x'; MAX_LINE + 1]).is_err());
    }
}
