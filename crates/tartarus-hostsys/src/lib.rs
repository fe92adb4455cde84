//! Narrow wrappers over the Linux syscalls that Tartarus needs and that `rustix` does not cover
//! (`clone3` with namespaces, `mount_setattr`, `close_range`, `signalfd`, `wait4` with usage).
//!
//! This is the only crate in the workspace that contains `unsafe` for host syscalls. Every wrapper states
//! its contract; everything above it deals in `OwnedFd`, `Pid` and `io::Result`.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub use rustix::process::Pid;

/// Namespace and process flags accepted by [`clone_process`]; values are the kernel's `CLONE_*` bits.
pub mod clone_flags {
    pub const NEWUSER: u64 = libc::CLONE_NEWUSER as u64;
    pub const NEWNS: u64 = libc::CLONE_NEWNS as u64;
    pub const NEWPID: u64 = libc::CLONE_NEWPID as u64;
    pub const NEWNET: u64 = libc::CLONE_NEWNET as u64;
    pub const NEWIPC: u64 = libc::CLONE_NEWIPC as u64;
    pub const NEWUTS: u64 = libc::CLONE_NEWUTS as u64;
    pub const NEWCGROUP: u64 = libc::CLONE_NEWCGROUP as u64;
}

/// Which side of a [`clone_process`] call we are on.
pub enum Forked {
    /// The new process. It must finish with [`exit_immediately`] and never return into the caller's frames
    /// beyond the function that called `clone_process`.
    Child,
    /// The caller, with the child's pid and a pidfd for race-free signalling.
    Parent { pid: Pid, pidfd: OwnedFd },
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Creates a child process in new namespaces with `clone3`, fork-style (the child continues on a copy of
/// the caller's stack), and returns a pidfd for it.
///
/// # Safety
/// The calling process must be single-threaded: the child gets a copy of the address space with only the
/// calling thread, so a lock held by another thread (allocator, stdio) would stay locked forever. The child
/// must end with [`exit_immediately`] (never return to `main`, never unwind out of its closure).
pub unsafe fn clone_process(namespaces: u64) -> io::Result<Forked> {
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: namespaces | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid, fully initialised clone_args of the size we pass; the kernel writes the
    // pidfd into `pidfd`, which outlives the call. Single-threadedness is the caller's contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => {
            // SAFETY: CLONE_PIDFD succeeded, so the kernel stored a fresh, owned descriptor in `pidfd`.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            let pid = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::other("clone3 returned pid 0"))?;
            Ok(Forked::Parent { pid, pidfd })
        }
    }
}

/// A plain `fork()`; the child is told apart by `None`.
///
/// # Safety
/// Same contract as [`clone_process`]: single-threaded caller, and the child ends with
/// [`exit_immediately`].
pub unsafe fn fork_process() -> io::Result<Option<Pid>> {
    // SAFETY: fork has no memory-safety preconditions beyond the caller's single-threadedness contract.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Pid::from_raw(pid)),
    }
}

/// Ends the process at once without running destructors or atexit handlers (`_exit`).
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: `_exit` never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Mount attributes for [`set_mount_attributes`] (`MOUNT_ATTR_*`).
pub mod mount_attr {
    pub const RDONLY: u64 = 0x0000_0001;
    pub const NOSUID: u64 = 0x0000_0002;
    pub const NODEV: u64 = 0x0000_0004;
    pub const NOEXEC: u64 = 0x0000_0008;
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets attributes on the mount (and, with `recursive`, every mount below it) that `fd` refers to
/// (`mount_setattr(fd, "", AT_EMPTY_PATH)`); works on detached trees from `open_tree(OPEN_TREE_CLONE)`.
pub fn set_mount_attributes(fd: BorrowedFd<'_>, attr_set: u64, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as u32;
    if recursive {
        flags |= libc::AT_RECURSIVE as u32;
    }
    // SAFETY: the path is a valid NUL-terminated empty string, `attr` is a valid mount_attr of the size
    // passed, and `fd` is a live descriptor for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor from `first` upwards close-on-exec (`close_range(.., CLOSE_RANGE_CLOEXEC)`).
pub fn set_cloexec_from(first: u32) -> io::Result<()> {
    close_range(first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC)
}

/// Closes every descriptor in `first..=last`.
pub fn close_fds_in(first: u32, last: u32) -> io::Result<()> {
    if first > last {
        return Ok(());
    }
    close_range(first, last, 0)
}

fn close_range(first: u32, last: u32, flags: u32) -> io::Result<()> {
    // SAFETY: close_range only manipulates this process's descriptor table; callers own the range they close.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates `fd` onto `target` (`dup2`), clearing close-on-exec on the result; a no-op when equal, except
/// that close-on-exec is still cleared.
pub fn dup_onto(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: fcntl(F_SETFD) on a descriptor number has no memory-safety preconditions.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 only manipulates this process's descriptor table.
    if unsafe { libc::dup2(fd, target) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Prepares signal state for an exec: unblocks every signal and restores SIGPIPE's default action, which
/// Rust programs ignore and exec would otherwise pass on (`yes | head` must still end). Other ignored
/// signals are deliberately inherited, as `nohup` relies on.
pub fn reset_signals_for_exec() {
    // SAFETY: installing SIG_DFL for SIGPIPE is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let _ = set_signal_mask(&[], libc::SIG_SETMASK);
}

/// Ignores SIGPIPE, so writing to a pipe or socket whose reader is gone fails with EPIPE instead of
/// killing the process. For long-lived processes that write to peers that may leave (the binary skips
/// Rust's runtime start-up, which would otherwise do this).
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Restores SIGPIPE's default action, so a command whose output pipe closes (`| head`) ends quietly, as
/// command-line tools do, instead of failing writes with EPIPE (Rust's runtime ignores SIGPIPE).
pub fn default_sigpipe() {
    // SAFETY: installing SIG_DFL for SIGPIPE is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Blocks `signals` for the calling thread (they can then be read from a [`signal_fd`]).
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    set_signal_mask(signals, libc::SIG_BLOCK)
}

fn signal_set(signals: &[i32]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset then only writes into it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for &signal in signals {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    }
}

fn set_signal_mask(signals: &[i32], how: i32) -> io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not requested.
    let ret = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// A non-blocking, close-on-exec signalfd for `signals` (which the caller has blocked).
pub fn signal_fd(signals: &[i32]) -> io::Result<OwnedFd> {
    let set = signal_set(signals);
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal number from a [`signal_fd`]; `None` when none is pending.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: the buffer is exactly one signalfd_siginfo, which is what the kernel writes.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    if n == -1 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(err);
    }
    if n as usize != size {
        return Ok(None);
    }
    // SAFETY: the kernel filled the whole structure (n == size).
    Ok(Some(unsafe { info.assume_init() }.ssi_signo as i32))
}

/// How a child ended, with its resource usage (which includes the descendants it reaped).
#[derive(Debug, Clone, Copy)]
pub struct ChildExit {
    /// Raw wait status (decode with [`ExitStatus`]).
    pub status: i32,
    pub user_cpu: std::time::Duration,
    pub system_cpu: std::time::Duration,
    /// Largest resident set of the child or any reaped descendant, in bytes.
    pub max_rss_bytes: u64,
}

/// Waits for `pid` (blocking) and returns its status and rusage (`wait4`).
pub fn wait_child(pid: Pid) -> io::Result<ChildExit> {
    let mut status = 0;
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    loop {
        // SAFETY: both out-pointers are valid for writes for the duration of the call.
        let ret = unsafe { libc::wait4(pid.as_raw_nonzero().get(), &mut status, 0, usage.as_mut_ptr()) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        break;
    }
    // SAFETY: wait4 succeeded and filled the structure (it was zeroed beforehand in any case).
    let usage = unsafe { usage.assume_init() };
    let to_duration = |tv: libc::timeval| {
        std::time::Duration::from_secs(tv.tv_sec as u64) + std::time::Duration::from_micros(tv.tv_usec as u64)
    };
    Ok(ChildExit {
        status,
        user_cpu: to_duration(usage.ru_utime),
        system_cpu: to_duration(usage.ru_stime),
        max_rss_bytes: (usage.ru_maxrss as u64).saturating_mul(1024),
    })
}

/// Reaps any child without blocking; returns its pid and raw wait status.
pub fn reap_any() -> io::Result<Option<(Pid, i32)>> {
    let mut status = 0;
    // SAFETY: `status` is valid for writes.
    let ret = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Pid::from_raw(pid).map(|p| (p, status))),
    }
}

/// Reaps any child, blocking until one exits; `None` when there are no children left.
pub fn reap_any_blocking() -> io::Result<Option<(Pid, i32)>> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is valid for writes.
        let ret = unsafe { libc::waitpid(-1, &mut status, 0) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok(None),
                _ => return Err(err),
            }
        }
        return Ok(Pid::from_raw(ret).map(|p| (p, status)));
    }
}

/// A decoded wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    pub fn from_raw(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            ExitStatus::Exited(libc::WEXITSTATUS(status))
        }
    }
}

/// Brings the loopback interface of the current network namespace up.
pub fn set_loopback_up() -> io::Result<()> {
    // SAFETY: socket() has no memory preconditions; the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; the ioctl reads and writes only that structure.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the flags member that SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above, with the flags updated.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the process non-dumpable, so processes with the same uid cannot ptrace it or open its /proc files.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The argv area of this process's initial stack, `(arg_start, arg_end)`, from `/proc/self/stat`
/// (fields 48 and 49, counted from the pid; the comm before them may hold spaces, so they are counted
/// from the closing parenthesis).
fn argv_area() -> io::Result<(usize, usize)> {
    parse_argv_area(&std::fs::read_to_string("/proc/self/stat")?)
}

fn parse_argv_area(stat: &str) -> io::Result<(usize, usize)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat");
    let after_comm = stat.rsplit_once(')').ok_or_else(bad)?.1;
    // The first field after the comm is field 3 (state).
    let field = |n: usize| -> io::Result<usize> {
        after_comm
            .split_whitespace()
            .nth(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(bad)
    };
    let (start, end) = (field(48)?, field(49)?);
    if start == 0 || end <= start {
        return Err(bad());
    }
    Ok((start, end))
}

/// Makes `/proc/self/cmdline` show `title` (truncated to fit) instead of the arguments the program was
/// started with: the argv area is zeroed and `title` written at its start. The area's last byte stays
/// NUL, so no kernel reads on into the environment. For a process that never reads its arguments again:
/// a sandbox's init, a clone of its supervisor whose argv names host paths.
pub fn overwrite_cmdline(title: &[u8]) -> io::Result<()> {
    let (start, end) = argv_area()?;
    let len = end - start;
    let keep = title.len().min(len - 1);
    // SAFETY: `start..end` is the argv area the kernel reports for this process: the strings it copied
    // onto the initial stack at exec, mapped read-write for the process's whole life. No Rust value owns
    // those bytes; std keeps only pointers to them (for `env::args`), which stay valid NUL-terminated
    // strings after this (empty, or the title). The caller is single-threaded, so nothing reads them
    // concurrently.
    unsafe {
        std::ptr::write_bytes(start as *mut u8, 0, len);
        std::ptr::copy_nonoverlapping(title.as_ptr(), start as *mut u8, keep);
    }
    Ok(())
}

/// Returns the highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`), falling
/// back to the highest one libc knows.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Removes `cap` from the bounding set (`PR_CAPBSET_DROP`); unknown capabilities are ignored.
pub fn drop_bounding_capability(cap: u32) -> io::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// `execve(path, argv, envp)`; returns only on failure.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> io::Error {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()) && envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: `path` is NUL-terminated; `argv` and `envp` are NULL-terminated arrays of pointers to
    // NUL-terminated strings that the caller keeps alive (checked in debug builds above).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Fills `buf` with random bytes from the kernel (`getrandom`).
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of its length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// `bytes` random bytes from the kernel, as lower-case hex (ids, key secrets).
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    random_bytes(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// True when `pid` names a live process: it exists (signal 0 probe; EPERM still means it exists) and is
/// not a zombie that has exited but not been reaped yet.
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 performs only the existence and permission check.
    let ret = unsafe { libc::kill(pid, 0) };
    let exists = ret == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    // /proc/PID/stat: "pid (comm) S ..."; comm may contain spaces and parentheses, so split at the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The filesystem magic of the filesystem holding `path` (`statfs.f_type`).
pub fn filesystem_type(path: &CStr) -> io::Result<i64> {
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is valid for writes.
    if unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 on every target
    // SAFETY: statfs succeeded and filled the structure.
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    Ok(f_type)
}

/// `CGROUP2_SUPER_MAGIC`, for [`filesystem_type`].
pub const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// True when `fd` refers to a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    rustix::termios::isatty(fd)
}

/// Borrows one of the process's standard descriptors (0, 1 or 2).
pub fn stdio_fd(n: RawFd) -> BorrowedFd<'static> {
    assert!(
        (0..=2).contains(&n),
        "only standard descriptors may be borrowed statically"
    );
    // SAFETY: descriptors 0..=2 are open for the life of the process (the CLI never closes them).
    unsafe { BorrowedFd::borrow_raw(n) }
}

/// Writes all of `data` to `fd`, retrying on EINTR and short writes.
pub fn write_all(fd: impl AsFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd.as_fd(), data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Moves the calling process into a new cgroup namespace rooted at its current cgroup.
pub fn unshare_cgroup_namespace() -> io::Result<()> {
    unshare_namespace(libc::CLONE_NEWCGROUP)
}

/// Moves the calling process into a new, empty network namespace.
pub fn unshare_network_namespace() -> io::Result<()> {
    unshare_namespace(libc::CLONE_NEWNET)
}

fn unshare_namespace(flag: libc::c_int) -> io::Result<()> {
    // SAFETY: namespace flags (unlike CLONE_FILES or CLONE_VM) change no memory or descriptor state.
    if unsafe { libc::unshare(flag) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `command`'s process join the cgroup whose `cgroup.procs` file is `procs` before it executes
/// (writing `0` moves the writer itself), so that everything it starts, in any session, can be found and
/// killed through that cgroup. The spawn fails if the join does.
pub fn join_cgroup_before_exec(command: &mut std::process::Command, procs: std::ffi::CString) {
    use std::os::unix::process::CommandExt;
    let hook = move || -> io::Result<()> {
        // SAFETY: only raw syscalls between fork and exec (no allocation, no locks): `procs` is a valid
        // NUL-terminated path owned by the closure, and the buffer written is a static byte.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
        }
        Ok(())
    };
    // SAFETY: the hook above is async-signal-safe (raw syscalls only), as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Makes `command`'s process get SIGKILL when the thread that spawned it exits (`PR_SET_PDEATHSIG`), so a
/// VMM never outlives a supervisor that died without cleaning up.
pub fn die_with_parent_before_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let hook = || -> io::Result<()> {
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        Ok(())
    };
    // SAFETY: the hook is one prctl, async-signal-safe as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Makes `command`'s process enter the network namespace `netns` before it executes, so that it and
/// everything it starts live there. The descriptor must stay open until the spawn returns.
pub fn enter_netns_before_exec(command: &mut std::process::Command, netns: RawFd) {
    use std::os::unix::process::CommandExt;
    let hook = move || -> io::Result<()> {
        // SAFETY: a raw syscall between fork and exec on a descriptor the caller keeps open across the
        // spawn; no allocation, no locks.
        match unsafe { libc::setns(netns, libc::CLONE_NEWNET) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    };
    // SAFETY: the hook above is async-signal-safe (one raw syscall), as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_argv_area_is_read_after_a_comm_with_spaces_and_parentheses() {
        let stat = "25804 (a) b (c) R 25799 25799 16716 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 546010 \
                    3133440 360 18446744073709551615 94573813972992 94573813992873 140733251257792 0 0 0 0 \
                    0 0 0 0 0 17 1 0 0 0 0 0 94573814008880 94573814010496 94574298583040 140733251263188 \
                    140733251263208 140733251263208 140733251264491 0";
        assert_eq!(
            parse_argv_area(stat).unwrap(),
            (140_733_251_263_188, 140_733_251_263_208)
        );
        assert!(parse_argv_area("1 (x) R 0").is_err());
        let (start, end) = argv_area().expect("this process's argv area");
        assert!(end > start);
    }

    #[test]
    fn an_exited_but_unreaped_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id() as i32;
        let raw = Pid::from_raw(pid).expect("pid");
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).expect("pidfd");
        // Wait for the exit without reaping: the child is a zombie now.
        let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut fds, None).expect("poll");
        assert!(!process_exists(pid), "a zombie must count as gone");
        child.wait().expect("reap");
        assert!(process_exists(std::process::id() as i32));
    }
}
