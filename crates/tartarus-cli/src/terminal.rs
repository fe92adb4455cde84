//! Terminal handling for `run -t`: a pseudo-terminal for the sandbox and raw mode on the caller's terminal.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::termios::{self, OptionalActions, Termios};

/// A pty pair: the supervisor keeps `master`, the sandbox gets `slave` as its stdio and controlling tty.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    pub fn open() -> io::Result<Pty> {
        let master = rustix::pty::openpt(rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let slave = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::io::ioctl_fioclex(&master)?;
        Ok(Pty { master, slave })
    }

    /// Copies the window size of `from` (the caller's terminal) to the sandbox's terminal.
    pub fn copy_window_size(&self, from: BorrowedFd<'_>) {
        if let Ok(size) = termios::tcgetwinsize(from) {
            let _ = termios::tcsetwinsize(&self.master, size);
        }
    }
}

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawMode {
    fd: BorrowedFd<'static>,
    saved: Termios,
}

impl RawMode {
    pub fn enable(fd: BorrowedFd<'static>) -> io::Result<RawMode> {
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(fd, OptionalActions::Now, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd.as_fd(), OptionalActions::Now, &self.saved);
    }
}
