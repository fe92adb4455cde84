//! The host's side of the agent channel: accepting QEMU's connection, the boot handshake (bounded by a
//! deadline and by QEMU staying alive), and the pump thread that carries stdin to the guest and the
//! command's output to the caller's descriptors until the guest reports the exit.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::protocol::{self, decode, encode, GuestFrame, HostFrame, LineBuffer};

/// The guest's report of the command's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
}

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

/// Accepts QEMU's connection to `listener`, giving up at `deadline` or when `vm` (QEMU's pidfd) ends.
pub fn accept(
    listener: &UnixListener,
    vm: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<Channel, HandshakeError> {
    listener.set_nonblocking(true).map_err(HandshakeError::Io)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(HandshakeError::Io)?;
                return Ok(Channel {
                    stream,
                    lines: LineBuffer::default(),
                    queued: Vec::new(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::TimedOut("QEMU to connect to the agent channel"));
        }
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(&vm, PollFlags::IN),
        ];
        poll_one(&mut fds, left).map_err(HandshakeError::Io)?;
        if !fds[1].revents().is_empty() {
            return Err(HandshakeError::VmExited);
        }
    }
}

impl Channel {
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

/// The caller's descriptors the pump serves (its own copies).
pub struct PumpStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A running pump: the writer half for control frames, the thread, and the descriptor it signals at
/// its end.
pub struct Pump {
    pub writer: Arc<Mutex<UnixStream>>,
    pub thread: Option<JoinHandle<Result<Option<GuestExit>, String>>>,
    pub done: OwnedFd,
}

impl Pump {
    /// Starts the pump over `channel`; its result is the guest's exit report, `None` when the channel
    /// closed first (the VM was killed or died).
    pub fn start(channel: Channel, stdio: PumpStdio) -> io::Result<Pump> {
        let done = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let signal = done.try_clone()?;
        let writer = Arc::new(Mutex::new(channel.stream.try_clone()?));
        let thread_writer = Arc::clone(&writer);
        let thread = std::thread::Builder::new()
            .name("microvm-pump".into())
            .spawn(move || {
                let result = pump(channel, stdio, &thread_writer);
                let _ = rustix::io::write(&signal, &1u64.to_ne_bytes());
                result
            })?;
        Ok(Pump {
            writer,
            thread: Some(thread),
            done,
        })
    }

    pub fn send(&self, frame: &HostFrame) -> io::Result<()> {
        let mut stream = self
            .writer
            .lock()
            .map_err(|_| io::Error::other("pump lock poisoned"))?;
        stream.write_all(&encode(frame))
    }

    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread (it ends once the channel closes) and returns its result.
    pub fn join(&mut self) -> Result<Option<GuestExit>, String> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the pump thread panicked".into())),
            None => Ok(None),
        }
    }
}

fn pump(
    mut channel: Channel,
    stdio: PumpStdio,
    writer: &Mutex<UnixStream>,
) -> Result<Option<GuestExit>, String> {
    let send = |frame: &HostFrame| -> Result<(), String> {
        let mut stream = writer.lock().map_err(|_| "pump lock poisoned".to_string())?;
        stream
            .write_all(&encode(frame))
            .map_err(|e| format!("writing to the guest: {e}"))
    };
    let mut stdin = Some(stdio.stdin);
    let mut lines: Vec<Vec<u8>> = std::mem::take(&mut channel.queued);
    loop {
        for line in lines.drain(..) {
            match decode::<GuestFrame>(&line).map_err(|e| e.to_string())? {
                GuestFrame::Stdout { data } => write_out(stdio.stdout.as_fd(), &data),
                GuestFrame::Stderr { data } => write_out(stdio.stderr.as_fd(), &data),
                GuestFrame::Exit { code, signal, oom } => return Ok(Some(GuestExit { code, signal, oom })),
                GuestFrame::Fatal { message } => return Err(format!("the guest agent failed: {message}")),
                _ => {}
            }
        }
        let mut fds = vec![PollFd::new(&channel.stream, PollFlags::IN)];
        if let Some(fd) = &stdin {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("polling the agent channel: {e}")),
        }
        let channel_ready = !fds[0].revents().is_empty();
        let stdin_ready = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        if stdin_ready {
            let mut buf = [0u8; protocol::CHUNK];
            // Blocking read after POLLIN: the caller's descriptor is shared, so it is not made
            // non-blocking.
            let read = stdin.as_ref().map(|fd| rustix::io::read(fd, &mut buf));
            match read {
                Some(Ok(n)) if n > 0 => send(&HostFrame::Stdin {
                    data: protocol::encode_bytes(&buf[..n]),
                })?,
                Some(Err(rustix::io::Errno::INTR)) | Some(Err(rustix::io::Errno::AGAIN)) => {}
                _ => {
                    stdin = None;
                    send(&HostFrame::StdinClosed)?;
                }
            }
        }
        if channel_ready {
            let mut buf = [0u8; 64 << 10];
            let n = match (&channel.stream).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                return Ok(None);
            }
            lines = channel
                .lines
                .push(&buf[..n])
                .map_err(|len| format!("a {len}-byte line from the guest"))?;
        }
    }
}

/// Writes decoded output to the caller; a caller that stopped reading loses it (as with a closed pipe).
fn write_out(fd: BorrowedFd<'_>, data: &str) {
    if let Some(bytes) = protocol::decode_bytes(data) {
        let _ = tartarus_hostsys::write_all(fd, &bytes);
    }
}
