//! The host's side of the agent channel (a socket pair whose other end QEMU holds): reading frames during
//! the boot handshake (bounded by a deadline and by QEMU staying alive). After the handshake the channel belongs to
//! the exec multiplexer ([`super::mux`]).

use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::protocol::{decode, encode, GuestFrame, HostFrame, LineBuffer};

/// Why the handshake did not reach the command's start.
#[derive(Debug)]
pub enum HandshakeError {
    /// QEMU exited before the agent answered.
    VmExited,
    TimedOut(&'static str),
    /// The agent refused or failed: a frame it sent.
    Guest(GuestFrame),
    Io(io::Error),
    Protocol(String),
}

/// A connected channel, with what was read past the last frame.
pub struct Channel {
    pub stream: UnixStream,
    lines: LineBuffer,
    queued: Vec<Vec<u8>>,
}

fn poll_one(fds: &mut [PollFd<'_>], left: Duration) -> io::Result<()> {
    let ts = rustix::time::Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: left.subsec_nanos() as i64,
    };
    match rustix::event::poll(fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Channel {
    /// The supervisor's end of the socket pair whose other end QEMU holds (blocking).
    pub fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            lines: LineBuffer::default(),
            queued: Vec::new(),
        }
    }

    /// Lines read past the last frame returned, for whoever takes the channel over.
    pub fn take_queued(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.queued)
    }

    /// Appends bytes read from the stream and returns the complete lines.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, usize> {
        self.lines.push(data)
    }

    pub fn send(&mut self, frame: &HostFrame) -> io::Result<()> {
        self.stream.write_all(&encode(frame))
    }

    /// The next frame, by `deadline`, unless QEMU ends first.
    pub fn receive(
        &mut self,
        vm: BorrowedFd<'_>,
        deadline: Instant,
        waiting_for: &'static str,
    ) -> Result<GuestFrame, HandshakeError> {
        loop {
            if !self.queued.is_empty() {
                let line = self.queued.remove(0);
                return decode(&line).map_err(|e| HandshakeError::Protocol(e.to_string()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::TimedOut(waiting_for));
            }
            let mut fds = [
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(&vm, PollFlags::IN),
            ];
            poll_one(&mut fds, left).map_err(HandshakeError::Io)?;
            let (data_ready, vm_ended) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
            if data_ready {
                let mut buf = [0u8; 64 << 10];
                let n = self.stream.read(&mut buf).map_err(HandshakeError::Io)?;
                if n == 0 {
                    return Err(HandshakeError::VmExited);
                }
                let lines = self
                    .lines
                    .push(&buf[..n])
                    .map_err(|len| HandshakeError::Protocol(format!("a {len}-byte line from the guest")))?;
                self.queued.extend(lines);
            } else if vm_ended {
                return Err(HandshakeError::VmExited);
            }
        }
    }
}
