//! File operations inside a service sandbox, without a shell: what is asked ([`FileOp`]), and how its end is
//! read back.
//!
//! A file operation runs like an exec ([`crate::ServiceSandbox::start_file_op`], ended with `wait_exec`) and
//! under the same walls, as the sandbox user. Its stdio carries the data: a read writes the file's bytes to
//! stdout, a write consumes stdin, a list writes [`encode_entry`]'s frames to stdout. Its exit status is
//! the outcome (0, or one of the [`FileErrorKind`] codes) with one line on stderr saying why;
//! [`decode_outcome`] and [`decode_listing`] turn them back into typed results. Every lane produces the
//! same encoding, so callers decode without knowing the lane.
//!
//! Paths are absolute, without `..`, without NUL, at most [`MAX_PATH_BYTES`] long, and are resolved
//! without following any symlink (in any component); read and write targets must be regular files.

use serde::{Deserialize, Serialize};

use crate::sandbox::Termination;

/// Largest file moved by one read or write, and largest encoded listing. The same value as
/// `tartarus_shim::protocol::MAX_FILE_BYTES` (this crate must not depend on the shim's).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// Longest path accepted (the kernel's `PATH_MAX` less its NUL).
pub const MAX_PATH_BYTES: usize = 4095;

/// A file operation inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FileOp {
    /// The regular file's bytes → stdout (at most [`MAX_FILE_BYTES`]).
    Read { path: String },
    /// stdin → the file, created (mode 0644, owned by the sandbox user) or truncated.
    Write { path: String },
    /// The directory's entries → stdout, framed by [`encode_entry`].
    List { path: String },
}

impl FileOp {
    pub fn path(&self) -> &str {
        match self {
            FileOp::Read { path } | FileOp::Write { path } | FileOp::List { path } => path,
        }
    }
}

/// Refuses a path that must never reach the sandbox: relative, with `..`, with NUL, or too long.
pub fn check_path(path: &str) -> Result<(), FileOpError> {
    let invalid = |why: &str| {
        Err(FileOpError {
            kind: FileErrorKind::Invalid,
            message: format!("path {why}"),
        })
    };
    if !path.starts_with('/') {
        return invalid("must be absolute");
    }
    if path.split('/').any(|c| c == "..") {
        return invalid("must not contain '..'");
    }
    if path.contains('\0') {
        return invalid("must not contain a NUL byte");
    }
    if path.len() > MAX_PATH_BYTES {
        return invalid("is too long");
    }
    Ok(())
}

/// Why a file operation was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileErrorKind {
    /// The path (or a directory on it) does not exist.
    NotFound,
    /// The path is not what the operation needs: a directory or device for a read or write, a file for a
    /// list, or a symlink anywhere on it.
    WrongType,
    /// The sandbox user may not do it (permissions, a read-only root).
    Forbidden,
    /// More than [`MAX_FILE_BYTES`].
    TooLarge,
    /// The path is malformed (relative, `..`, NUL, too long).
    Invalid,
    /// Anything else (no space left, the operation's process killed).
    Failed,
}

/// Exit codes of a file operation's process; every other status is [`FileErrorKind::Failed`].
pub mod exit_code {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const NOT_FOUND: i32 = 2;
    pub const WRONG_TYPE: i32 = 3;
    pub const FORBIDDEN: i32 = 4;
    pub const TOO_LARGE: i32 = 5;
    pub const INVALID: i32 = 6;
}

impl FileErrorKind {
    /// The exit code that reports this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            FileErrorKind::Failed => exit_code::FAILED,
            FileErrorKind::NotFound => exit_code::NOT_FOUND,
            FileErrorKind::WrongType => exit_code::WRONG_TYPE,
            FileErrorKind::Forbidden => exit_code::FORBIDDEN,
            FileErrorKind::TooLarge => exit_code::TOO_LARGE,
            FileErrorKind::Invalid => exit_code::INVALID,
        }
    }

    fn from_exit_code(code: i32) -> FileErrorKind {
        match code {
            exit_code::NOT_FOUND => FileErrorKind::NotFound,
            exit_code::WRONG_TYPE => FileErrorKind::WrongType,
            exit_code::FORBIDDEN => FileErrorKind::Forbidden,
            exit_code::TOO_LARGE => FileErrorKind::TooLarge,
            exit_code::INVALID => FileErrorKind::Invalid,
            _ => FileErrorKind::Failed,
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            FileErrorKind::NotFound => "no such file or directory",
            FileErrorKind::WrongType => "not the kind of file the operation needs",
            FileErrorKind::Forbidden => "permission denied",
            FileErrorKind::TooLarge => "larger than 4 MiB",
            FileErrorKind::Invalid => "invalid path",
            FileErrorKind::Failed => "the file operation failed",
        }
    }
}

/// A file operation that did not succeed, with the line the sandbox gave as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FileOpError {
    pub kind: FileErrorKind,
    pub message: String,
}

/// Longest reason kept from stderr.
const MAX_MESSAGE: usize = 512;

/// The outcome of a finished file operation, from its termination and what it wrote on stderr.
pub fn decode_outcome(termination: Termination, stderr: &[u8]) -> Result<(), FileOpError> {
    let kind = match termination {
        Termination::Exited(exit_code::OK) => return Ok(()),
        Termination::Exited(code) => FileErrorKind::from_exit_code(code),
        Termination::Signaled(_) => FileErrorKind::Failed,
    };
    let line = stderr.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(&line[..line.len().min(MAX_MESSAGE)]);
    let message = match (line.trim(), termination) {
        ("", Termination::Signaled(signal)) => format!("the file operation was killed by signal {signal}"),
        ("", _) => kind.default_message().to_string(),
        (text, _) => text.to_string(),
    };
    Err(FileOpError { kind, message })
}

/// What a directory entry is (not following symlinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    fn tag(self) -> u8 {
        match self {
            EntryKind::File => b'f',
            EntryKind::Dir => b'd',
            EntryKind::Symlink => b'l',
            EntryKind::Other => b'o',
        }
    }

    fn from_tag(tag: u8) -> Option<EntryKind> {
        Some(match tag {
            b'f' => EntryKind::File,
            b'd' => EntryKind::Dir,
            b'l' => EntryKind::Symlink,
            b'o' => EntryKind::Other,
            _ => return None,
        })
    }
}

/// One entry of a listing. Names are bytes on Linux; one that is not UTF-8 is shown with U+FFFD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    /// `st_size` (for a symlink, the length of its target).
    pub size: u64,
}

/// Bytes of one frame before its name: kind (1), size (8, little-endian), name length (2, little-endian).
pub(crate) const FRAME_HEADER: usize = 11;

/// Appends one entry's frame: `kind: u8` (`f` `d` `l` `o`), `size: u64 LE`, `name_len: u16 LE`, `name`.
/// Names longer than `u16::MAX` bytes cannot occur (Linux names are at most 255 bytes) and are cut.
pub fn encode_entry(out: &mut Vec<u8>, name: &[u8], kind: EntryKind, size: u64) {
    let name = &name[..name.len().min(u16::MAX as usize)];
    out.push(kind.tag());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
}

/// Decodes a whole listing (frames back to back, in the order written: sorted by name). Anything
/// malformed (a cut frame, an unknown kind, an empty name or one with `/` or NUL) is
/// [`FileErrorKind::Failed`].
pub fn decode_listing(mut bytes: &[u8]) -> Result<Vec<DirEntry>, FileOpError> {
    let malformed = |why: &str| FileOpError {
        kind: FileErrorKind::Failed,
        message: format!("malformed directory listing: {why}"),
    };
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let header = bytes.get(..FRAME_HEADER).ok_or_else(|| malformed("cut frame"))?;
        let kind = EntryKind::from_tag(header[0]).ok_or_else(|| malformed("unknown entry kind"))?;
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[1..9]);
        let len = u16::from_le_bytes([header[9], header[10]]) as usize;
        let name = bytes
            .get(FRAME_HEADER..FRAME_HEADER + len)
            .ok_or_else(|| malformed("cut frame"))?;
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
            return Err(malformed("invalid entry name"));
        }
        entries.push(DirEntry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
            size: u64::from_le_bytes(size),
        });
        bytes = &bytes[FRAME_HEADER + len..];
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_must_not_reach_the_sandbox_are_invalid() {
        for path in ["relative", "/a/../etc", "..", "/..", "/a/..", "/a\0b"] {
            let err = check_path(path).expect_err(path);
            assert_eq!(err.kind, FileErrorKind::Invalid, "{path}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
        for path in [
            "/",
            "/tmp/x",
            "/a/..b/c..",
            "/a/./b",
            &format!("/{}", "a".repeat(MAX_PATH_BYTES - 1)),
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn exit_codes_decode_to_their_kinds_with_the_stderr_line() {
        assert_eq!(decode_outcome(Termination::Exited(0), b"ignored"), Ok(()));
        for kind in [
            FileErrorKind::NotFound,
            FileErrorKind::WrongType,
            FileErrorKind::Forbidden,
            FileErrorKind::TooLarge,
            FileErrorKind::Invalid,
            FileErrorKind::Failed,
        ] {
            let err = decode_outcome(Termination::Exited(kind.exit_code()), b"why: it\nmore\n");
            assert_eq!(
                err,
                Err(FileOpError {
                    kind,
                    message: "why: it".into()
                })
            );
        }
    }

    #[test]
    fn unknown_codes_and_signals_are_failures_with_a_message() {
        let err = decode_outcome(Termination::Exited(125), b"").expect_err("failed");
        assert_eq!(err.kind, FileErrorKind::Failed);
        assert_eq!(err.message, "the file operation failed");
        let err = decode_outcome(Termination::Signaled(9), b"").expect_err("killed");
        assert_eq!(err.kind, FileErrorKind::Failed);
        assert_eq!(err.message, "the file operation was killed by signal 9");
    }

    #[test]
    fn listings_round_trip() {
        let mut bytes = Vec::new();
        encode_entry(&mut bytes, b"a.txt", EntryKind::File, 5);
        encode_entry(&mut bytes, b"dir", EntryKind::Dir, 4096);
        encode_entry(&mut bytes, b"link", EntryKind::Symlink, 4);
        encode_entry(&mut bytes, b"\xff", EntryKind::Other, u64::MAX);
        let entries = decode_listing(&bytes).expect("decodes");
        let got: Vec<(&str, EntryKind, u64)> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.kind, e.size))
            .collect();
        assert_eq!(
            got,
            [
                ("a.txt", EntryKind::File, 5),
                ("dir", EntryKind::Dir, 4096),
                ("link", EntryKind::Symlink, 4),
                ("\u{fffd}", EntryKind::Other, u64::MAX),
            ]
        );
        assert_eq!(decode_listing(&[]), Ok(Vec::new()));
    }

    #[test]
    fn malformed_listings_are_refused() {
        let mut bytes = Vec::new();
        encode_entry(&mut bytes, b"name", EntryKind::File, 1);
        for cut in 1..bytes.len() {
            let err = decode_listing(&bytes[..cut]).expect_err("cut");
            assert_eq!(err.kind, FileErrorKind::Failed, "cut at {cut}");
        }
        for (name, kind) in [(&b"a/b"[..], b'f'), (b"", b'f'), (b"a\0", b'f'), (b"ok", b'x')] {
            let mut frame = Vec::new();
            encode_entry(&mut frame, name, EntryKind::File, 1);
            frame[0] = kind;
            assert!(decode_listing(&frame).is_err(), "{name:?} {kind}");
        }
    }
}
