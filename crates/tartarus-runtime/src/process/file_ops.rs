//! File operations, performed inside the sandbox by a process that has gone through the same privilege
//! drop as an exec'd command (seccomp, Landlock, rlimits, no capabilities, the sandbox user) and then, in
//! place of `execve`, does the operation itself and exits with its outcome (`crate::files` has the
//! encoding). The operation's stdio is on 0, 1 and 2; nothing else is open.
//!
//! Every path is opened with `openat2` beneath `/` with `RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, so a
//! symlink in any component is refused (not followed, not even inside the sandbox), and a read or write
//! target must be a regular file (where `openat2` is missing — gVisor's sentry before 2023 — the path is
//! walked one component at a time with `O_NOFOLLOW`, which refuses the same symlinks): a device cannot be streamed, a FIFO cannot hang the operation (it is
//! opened non-blocking and refused), and a write cannot be redirected.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::files::{self, exit_code, EntryKind, FileErrorKind, FileOp, FileOpError, MAX_FILE_BYTES};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Performs `op` and returns the exit code for its outcome, having written the reason of a failure as one
/// line on stderr.
pub(crate) fn perform(op: &FileOp) -> i32 {
    match run(op) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            let line = format!("{}\n", e.message);
            let _ = write_all(rustix::stdio::stderr(), line.as_bytes());
            e.kind.exit_code()
        }
    }
}

fn run(op: &FileOp) -> Result<(), FileOpError> {
    let path = op.path();
    files::check_path(path)?;
    let root = rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(e, "/"))?;
    // Beneath the root descriptor, so relative to it.
    let relative = match path.trim_start_matches('/') {
        "" => ".",
        rest => rest,
    };
    match op {
        FileOp::Read { .. } => read(&root, relative, path),
        FileOp::Write { .. } => write(&root, relative, path),
        FileOp::List { .. } => list(&root, relative, path),
    }
}

/// `openat2` beneath `root` with no symlinks, or, on a kernel without it, the same by walking: every
/// directory on the way is opened with `O_NOFOLLOW | O_DIRECTORY` relative to the previous one, and the last
/// component with `O_NOFOLLOW`, so no symlink is ever followed (one met is `ELOOP`, as with `openat2`).
fn open_beneath(root: &OwnedFd, relative: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    match rustix::fs::openat2(root, relative, flags, mode, RESOLVE) {
        Err(Errno::NOSYS) => {}
        other => return other,
    }
    let parts: Vec<&str> = relative
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return rustix::fs::openat(root, ".", flags, mode);
    };
    let mut dir: Option<OwnedFd> = None;
    for part in dirs {
        let at = dir.as_ref().unwrap_or(root);
        let next = rustix::fs::openat(
            at,
            *part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| symlink_is_loop(at, part, e))?;
        dir = Some(next);
    }
    let at = dir.as_ref().unwrap_or(root);
    rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW, mode).map_err(|e| symlink_is_loop(at, last, e))
}

/// `ENOTDIR` for a component that is a symlink is the walk's way of meeting one: report it as `ELOOP`.
fn symlink_is_loop(at: &OwnedFd, part: &str, errno: Errno) -> Errno {
    let is_link = rustix::fs::statat(at, part, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
    match is_link {
        true => Errno::LOOP,
        false => errno,
    }
}

fn error(kind: FileErrorKind, message: String) -> FileOpError {
    FileOpError { kind, message }
}

/// The refusal for a failed open or write of `path`.
fn refused(errno: Errno, path: &str) -> FileOpError {
    let (kind, why) = match errno {
        Errno::NOENT | Errno::NOTDIR => (FileErrorKind::NotFound, "no such file or directory"),
        Errno::LOOP => (
            FileErrorKind::WrongType,
            "a symlink is on the path (symlinks are not followed)",
        ),
        Errno::ISDIR => (FileErrorKind::WrongType, "is a directory"),
        Errno::NXIO => (FileErrorKind::WrongType, "not a regular file"),
        Errno::ACCESS | Errno::PERM => (FileErrorKind::Forbidden, "permission denied"),
        Errno::ROFS => (FileErrorKind::Forbidden, "read-only file system"),
        Errno::NAMETOOLONG => (FileErrorKind::Invalid, "name too long"),
        Errno::XDEV => (FileErrorKind::Invalid, "leaves the sandbox's root"),
        Errno::FBIG => (FileErrorKind::TooLarge, "file too large"),
        other => {
            let message = format!("{path}: {}", std::io::Error::from(other));
            return error(FileErrorKind::Failed, message);
        }
    };
    error(kind, format!("{path}: {why}"))
}

fn entry_kind(stat: &Stat) -> EntryKind {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

/// Refuses anything but a regular file as a read or write target.
fn require_regular(fd: &OwnedFd, path: &str) -> Result<Stat, FileOpError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| refused(e, path))?;
    match entry_kind(&stat) {
        EntryKind::File => Ok(stat),
        EntryKind::Dir => Err(error(FileErrorKind::WrongType, format!("{path}: is a directory"))),
        _ => Err(error(
            FileErrorKind::WrongType,
            format!("{path}: not a regular file"),
        )),
    }
}

fn too_large(path: &str) -> FileOpError {
    error(
        FileErrorKind::TooLarge,
        format!("{path}: larger than {} MiB", MAX_FILE_BYTES >> 20),
    )
}

/// The regular file → stdout.
fn read(root: &OwnedFd, relative: &str, path: &str) -> Result<(), FileOpError> {
    // Non-blocking, so opening a FIFO (refused just after) cannot wait for a writer.
    let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = open_beneath(root, relative, flags, Mode::empty()).map_err(|e| refused(e, path))?;
    let stat = require_regular(&file, path)?;
    if stat.st_size as u64 > MAX_FILE_BYTES as u64 {
        return Err(too_large(path));
    }
    let stdout = rustix::stdio::stdout();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        let n = match rustix::io::read(&file, &mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(refused(e, path)),
        };
        // The file may have grown since the fstat.
        total += n;
        if total > MAX_FILE_BYTES {
            return Err(too_large(path));
        }
        write_all(stdout, &buf[..n])
            .map_err(|e| error(FileErrorKind::Failed, format!("writing {path} out: {e}")))?;
    }
}

/// stdin → the file, created (0644 under the 022 umask) or truncated. Input beyond the cap leaves the file
/// empty, so a caller never mistakes a cut file for the whole.
fn write(root: &OwnedFd, relative: &str, path: &str) -> Result<(), FileOpError> {
    // O_TRUNC does nothing to a FIFO or device, which is refused before anything is written; a FIFO
    // without a reader fails at once (ENXIO) instead of blocking.
    let flags =
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o644);
    let file = open_beneath(root, relative, flags, mode).map_err(|e| refused(e, path))?;
    require_regular(&file, path)?;
    let stdin = rustix::stdio::stdin();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        let n = read_some(stdin, &mut buf)
            .map_err(|e| error(FileErrorKind::Failed, format!("reading the data for {path}: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        total += n;
        if total > MAX_FILE_BYTES {
            let _ = rustix::fs::ftruncate(&file, 0);
            return Err(too_large(path));
        }
        write_all(&file, &buf[..n]).map_err(|e| refused(e, path))?;
    }
}

/// The directory's entries (sorted by name, not following symlinks) → stdout, framed by
/// [`files::encode_entry`].
fn list(root: &OwnedFd, relative: &str, path: &str) -> Result<(), FileOpError> {
    // An O_PATH descriptor first: opening a FIFO or device this way has no effect.
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let dir = open_beneath(root, relative, flags, Mode::empty()).map_err(|e| refused(e, path))?;
    let stat = rustix::fs::fstat(&dir).map_err(|e| refused(e, path))?;
    if entry_kind(&stat) != EntryKind::Dir {
        return Err(error(
            FileErrorKind::WrongType,
            format!("{path}: not a directory"),
        ));
    }
    let readable = rustix::fs::openat(
        &dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(e, path))?;
    let mut entries = Dir::new(readable).map_err(|e| refused(e, path))?;
    let mut found: Vec<(Vec<u8>, EntryKind, u64)> = Vec::new();
    let mut encoded = 0usize;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(|e| refused(e, path))?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let (kind, size) = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => (entry_kind(&stat), stat.st_size as u64),
            // Gone since it was read, or not searchable: what the directory itself says.
            Err(_) => (kind_of(entry.file_type()), 0),
        };
        encoded += files::FRAME_HEADER + name.to_bytes().len();
        if encoded > MAX_FILE_BYTES {
            return Err(error(
                FileErrorKind::TooLarge,
                format!("{path}: listing larger than {} MiB", MAX_FILE_BYTES >> 20),
            ));
        }
        found.push((name.to_bytes().to_vec(), kind, size));
    }
    found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(encoded);
    for (name, kind, size) in &found {
        files::encode_entry(&mut out, name, *kind, *size);
    }
    write_all(rustix::stdio::stdout(), &out).map_err(|e| {
        error(
            FileErrorKind::Failed,
            format!("writing the listing of {path} out: {e}"),
        )
    })
}

fn kind_of(file_type: FileType) -> EntryKind {
    match file_type {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

/// Waits until `fd` is ready for `flags` (for descriptors the caller made non-blocking).
fn wait_ready(fd: BorrowedFd<'_>, flags: PollFlags) -> Result<(), Errno> {
    let mut fds = [PollFd::new(&fd, flags)];
    match rustix::event::poll(&mut fds, None) {
        Ok(_) | Err(Errno::INTR) => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => wait_ready(fd, PollFlags::IN)?,
            Err(e) => return Err(e),
        }
    }
}

fn write_all(fd: impl AsFd, mut data: &[u8]) -> Result<(), Errno> {
    let fd = fd.as_fd();
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => wait_ready(fd, PollFlags::OUT)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
