//! Messages from the sandbox's init to the supervisor.
//!
//! Start pipe: nothing (EOF when the command's exec closed the last writer) on success, or one [`Report`]
//! on failure. Status pipe: the command's raw wait status as 4 little-endian bytes, written by init just
//! before it exits; EOF without it means init itself was killed.

/// Length of the status record.
pub const STATUS_LEN: usize = 4;

const SETUP_FAILED: u8 = 1;
const NOT_FOUND: u8 = 2;
const NOT_EXECUTABLE: u8 = 3;

/// Why the command did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    SetupFailed { errno: i32, stage: String },
    NotFound,
    NotExecutable { errno: i32 },
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, errno, text) = match self {
            Report::SetupFailed { errno, stage } => (SETUP_FAILED, *errno, stage.as_bytes()),
            Report::NotFound => (NOT_FOUND, 0, &[][..]),
            Report::NotExecutable { errno } => (NOT_EXECUTABLE, *errno, &[][..]),
        };
        let text = &text[..text.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(7 + text.len());
        out.push(kind);
        out.extend_from_slice(&errno.to_le_bytes());
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text);
        out
    }

    /// Decodes a complete message; `None` for anything malformed.
    pub fn decode(bytes: &[u8]) -> Option<Report> {
        let (&kind, rest) = bytes.split_first()?;
        let errno = i32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let len = u16::from_le_bytes(rest.get(4..6)?.try_into().ok()?) as usize;
        let text = rest.get(6..6 + len)?;
        match kind {
            SETUP_FAILED => Some(Report::SetupFailed {
                errno,
                stage: String::from_utf8_lossy(text).into_owned(),
            }),
            NOT_FOUND => Some(Report::NotFound),
            NOT_EXECUTABLE => Some(Report::NotExecutable { errno }),
            _ => None,
        }
    }
}

/// Reads the start pipe to EOF: nothing means the command was executed.
pub fn read_report(fd: &std::os::fd::OwnedFd) -> std::io::Result<Option<Report>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match rustix::io::read(fd, &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    Report::decode(&buf)
        .map(Some)
        .ok_or_else(|| std::io::Error::other("malformed start report"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::SetupFailed {
                errno: 2,
                stage: "mounting /data".into(),
            },
            Report::NotFound,
            Report::NotExecutable { errno: 13 },
        ] {
            assert_eq!(Report::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn truncated_reports_are_rejected() {
        let bytes = Report::SetupFailed {
            errno: 2,
            stage: "x".repeat(10),
        }
        .encode();
        for cut in 0..bytes.len() {
            assert_eq!(Report::decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
