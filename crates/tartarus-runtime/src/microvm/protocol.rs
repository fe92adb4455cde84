//! The channel between the supervisor and the guest agent: one JSON object per line over a virtio-serial
//! port (`/dev/vport*` in the guest, a unix socket QEMU connects to on the host).
//!
//! Both sides compile against these types; output and input bytes travel base64-encoded. A frame of an
//! unknown version is refused by both sides naming both versions. Order of one run: the agent sends
//! [`GuestFrame::Ready`] once its root is mounted; the host sends one [`HostFrame::Run`], then stdin as
//! [`HostFrame::Stdin`] frames and [`HostFrame::StdinClosed`]; the agent answers [`GuestFrame::Started`]
//! (or [`GuestFrame::Failed`]), output frames, and one [`GuestFrame::Exit`].

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Version of the frames; bumped on any incompatible change.
pub const VERSION: u32 = 1;
/// Largest line either side accepts (an output chunk of 64 KiB is about 88 KiB encoded).
pub const MAX_LINE: usize = 256 << 10;
/// Output and input are sent in chunks of at most this many bytes.
pub const CHUNK: usize = 32 << 10;

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostFrame {
    /// Run the sandbox's command (once per boot in this slice).
    Run(RunRequest),
    /// Bytes for the command's stdin.
    Stdin { data: String },
    /// The caller's stdin reached its end.
    StdinClosed,
    /// Send `signal` to the command's process group (the timeout's SIGTERM).
    Signal { signal: i32 },
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
    /// The command's pids limit (its cgroup's `pids.max` and `RLIMIT_NPROC`), if any.
    pub max_processes: Option<u64>,
    /// The command's memory limit (its cgroup's `memory.max`), if any.
    pub memory_bytes: Option<u64>,
}

/// What the agent tells the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestFrame {
    /// The root is mounted and the agent waits for a run; `kernel` is the guest's release.
    Ready {
        kernel: String,
    },
    /// The command was executed.
    Started,
    /// The command could not be started.
    Failed {
        kind: FailKind,
        message: String,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The command ended; `oom` when the guest kernel's OOM killer ran during the command.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        oom: bool,
    },
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
            code: None,
            signal: Some(9),
            oom: true,
        };
        let line = encode(&frame);
        assert_eq!(
            String::from_utf8_lossy(&line),
            "{\"v\":1,\"event\":\"exit\",\"code\":null,\"signal\":9,\"oom\":true}\n"
        );
        let back: GuestFrame = decode(&line[..line.len() - 1]).expect("decodes");
        assert_eq!(back, frame);
        let stdin = HostFrame::Stdin {
            data: encode_bytes(b"\x00\xffhi"),
        };
        let line = encode(&stdin);
        let HostFrame::Stdin { data } = decode(&line[..line.len() - 1]).expect("decodes") else {
            panic!("not stdin");
        };
        assert_eq!(decode_bytes(&data).as_deref(), Some(&b"\x00\xffhi"[..]));
    }

    #[test]
    fn test_a_frame_of_another_version_is_refused_naming_both() {
        let err = decode::<HostFrame>(br#"{"v":2,"op":"stdin_closed"}"#).expect_err("refused");
        assert_eq!(err.to_string(), "frame of version 2, this side speaks version 1");
        assert!(decode::<HostFrame>(br#"{"v":1,"op":"format_disk"}"#).is_err());
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
