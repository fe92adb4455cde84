//! The guest's stdin: a pipe fed by a pump thread from the caller's descriptor, so that a stop reaches a
//! guest blocked reading it. The pump copies until the caller's end reaches EOF or a stop is asked for,
//! then closes the pipe: the guest's read returns EOF and the guest reaches its next epoch check. Each
//! wait of the pump is at most [`STOP_CHECK`], so it ends within that of the stop.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use super::guest::Control;

/// How often a waiting pump looks at the stop request.
const STOP_CHECK: Duration = Duration::from_millis(50);
const CHUNK: usize = 64 << 10;

/// Starts the pump from `source`; returns the guest's end of the pipe and the pump's thread.
pub fn pump(source: OwnedFd, control: Arc<Control>) -> io::Result<(File, JoinHandle<()>)> {
    let (guest_end, pump_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::fs::fcntl_setfl(&pump_end, rustix::fs::OFlags::NONBLOCK)?;
    let thread = std::thread::Builder::new()
        .name("wasm-stdin".to_string())
        .spawn(move || copy(&source, &pump_end, &control))?;
    Ok((File::from(guest_end), thread))
}

/// Waits until `fd` is ready for `flags` (or hung up); `false` when a stop was asked for first.
fn ready(fd: &OwnedFd, flags: PollFlags, control: &Control) -> bool {
    let step = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: STOP_CHECK.as_nanos() as i64,
    };
    loop {
        if control.stop_requested() || control.has_ended() {
            return false;
        }
        let mut fds = [PollFd::new(fd, flags)];
        match rustix::event::poll(&mut fds, Some(&step)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
}

fn copy(source: &OwnedFd, sink: &OwnedFd, control: &Control) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !ready(source, PollFlags::IN, control) {
            return;
        }
        let n = match rustix::io::read(source, &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(_) => return,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if !ready(sink, PollFlags::OUT, control) {
                return;
            }
            match rustix::io::write(sink.as_fd(), rest) {
                Ok(written) => rest = &rest[written..],
                Err(Errno::INTR | Errno::AGAIN) => {}
                // The guest closed its stdin.
                Err(_) => return,
            }
        }
    }
}
