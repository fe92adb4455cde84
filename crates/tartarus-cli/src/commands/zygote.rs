//! The Python zygote of warm template sandboxes, client side.
//!
//! A template sandbox has this binary bind-mounted at `/.tartarus/bin/python3` (first on `PATH`). Its main
//! command, `python3 --tartarus-zygote-serve`, execs the image's real interpreter on `zygote.py`, which
//! runs the template's warm-up and then listens on [`SOCKET_ENV`]. Every later `python3 -c …`,
//! `python3 -m …` or `python3 script.py` in the sandbox (an exec request, or a subprocess) lands here:
//! it hands its argv, environment, working directory and stdio to the zygote, which forks a program from
//! its pristine, warmed state, and this process exits with the program's status. Anything else (no
//! zygote yet, interactive use, interpreter options) runs the real interpreter, so the launcher is never
//! slower than a cold start by more than one exec.
//!
//! The program runs in the same sandbox (namespaces, cgroup, seccomp, Landlock) as the client would have;
//! killing the client kills the program (the zygote watches the connection).

use std::ffi::{OsStr, OsString};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType,
};

/// Where the zygote listens, set in template sandboxes.
pub const SOCKET_ENV: &str = "TARTARUS_ZYGOTE_SOCKET";
/// The warm-up source handed to the zygote.
pub const WARMUP_ENV: &str = "TARTARUS_WARMUP";
/// Directory of the python launcher inside the sandbox (first on `PATH`).
pub const LAUNCHER_DIR: &str = "/.tartarus/bin";
/// The socket path used in template sandboxes.
pub const SOCKET_PATH: &str = "/run/tartarus-zygote/socket";
/// First argument of the zygote's own start.
pub const SERVE_FLAG: &str = "--tartarus-zygote-serve";
/// First argument of a readiness probe: blocks until the zygote is warm (or the deadline passes).
pub const WAIT_FLAG: &str = "--tartarus-zygote-wait";

const ZYGOTE_SOURCE: &str = include_str!("zygote.py");
/// How long a readiness probe waits for the warm-up.
const WARMUP_DEADLINE: Duration = Duration::from_secs(600);

/// Whether this process was started as the sandbox's `python3` / `python`.
pub fn invoked_as_python() -> bool {
    let Some(arg0) = std::env::args_os().next() else {
        return false;
    };
    let path = Path::new(&arg0);
    let name = path.file_name().unwrap_or_default();
    // Exec'd through PATH, argv[0] is the bare name; the zygote's own start names the launcher's path.
    (name == "python3" || name == "python")
        && (path.parent() == Some(Path::new(LAUNCHER_DIR)) || std::env::var_os(SOCKET_ENV).is_some())
}

/// Entry point as `python3`; returns an exit code when it does not exec.
pub fn main() -> i32 {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let arg0 = args.remove(0);
    let name = Path::new(&arg0)
        .file_name()
        .unwrap_or(OsStr::new("python3"))
        .to_os_string();
    match args.first().map(|a| a.as_bytes()) {
        Some(b"--tartarus-zygote-serve") => exec_real(&name, &[OsString::from("-c"), ZYGOTE_SOURCE.into()]),
        Some(b"--tartarus-zygote-wait") => match wait_ready() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tartarus: the python zygote is not ready: {e}");
                1
            }
        },
        _ => match run_in_zygote(&args) {
            Some(code) => code,
            None => exec_real(&name, &args),
        },
    }
}

/// Runs the program through the zygote; `None` when it cannot (the caller then runs the interpreter).
fn run_in_zygote(args: &[OsString]) -> Option<i32> {
    let first = args.first()?.as_bytes();
    let supported = match first {
        b"-c" | b"-m" => args.len() >= 2,
        _ => !first.starts_with(b"-"),
    };
    // Descriptors beyond stdio (a multiprocessing pipe, a subprocess's pass_fds) would not reach a
    // forked program: such a start runs the real interpreter, which inherits them.
    if !supported || inherits_extra_descriptors() {
        return None;
    }
    let socket = std::env::var_os(SOCKET_ENV)?;
    let conn = connect(Path::new(&socket)).ok()?;
    let argv: Option<Vec<String>> = args.iter().map(|a| a.to_str().map(str::to_string)).collect();
    let env: serde_json::Map<String, serde_json::Value> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?.into())))
        .collect();
    let cwd = std::env::current_dir().ok()?.to_str()?.to_string();
    let request = serde_json::json!({"argv": argv?, "env": env, "cwd": cwd});
    let bytes = serde_json::to_vec(&request).ok()?;
    let stdio = [0, 1, 2].map(tartarus_hostsys::stdio_fd);
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(SendAncillaryMessage::ScmRights(&stdio)) {
        return None;
    }
    // Too big for one message (a huge -c program): the interpreter runs it instead.
    sendmsg(
        &conn,
        &[IoSlice::new(&bytes)],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )
    .ok()?;
    // From here the program runs: its status is ours, whatever happens.
    let reply = match receive(&conn) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("tartarus: lost the python zygote: {e}");
            return Some(1);
        }
    };
    let code = match (reply["exit"].as_i64(), reply["signal"].as_i64()) {
        (Some(code), _) => code as i32,
        (None, Some(signal)) => 128 + signal as i32,
        _ => 1,
    };
    Some(code)
}

fn inherits_extra_descriptors() -> bool {
    match std::fs::read_dir("/proc/self/fd") {
        // The listing's own descriptor is the one expected beyond 0, 1 and 2.
        Ok(entries) => entries.count() > 4,
        Err(_) => true,
    }
}

fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

fn receive(conn: &OwnedFd) -> std::io::Result<serde_json::Value> {
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let n = loop {
        match recvmsg(
            conn.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Err(std::io::Error::other("the zygote closed the connection"));
    }
    serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)
}

/// Polls for the zygote's socket (it appears once the warm-up finished), then pings it.
fn wait_ready() -> std::io::Result<()> {
    let socket = std::env::var_os(SOCKET_ENV)
        .ok_or_else(|| std::io::Error::other(format!("{SOCKET_ENV} is not set")))?;
    let started = Instant::now();
    let conn = loop {
        match connect(Path::new(&socket)) {
            Ok(conn) => break conn,
            Err(e) if started.elapsed() > WARMUP_DEADLINE => return Err(e),
            // Waiting on a process in another sandbox's state: no descriptor to block on, so poll.
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    rustix::net::send(&conn, b"ping", SendFlags::NOSIGNAL)?;
    match receive(&conn)?["ready"].as_bool() {
        Some(true) => Ok(()),
        _ => Err(std::io::Error::other("unexpected answer")),
    }
}

/// Execs the image's own interpreter: `name` found on `PATH` outside the launcher's directory.
fn exec_real(name: &OsStr, args: &[OsString]) -> i32 {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let real: Option<PathBuf> = std::env::split_paths(&path)
        .filter(|dir| dir != Path::new(LAUNCHER_DIR))
        .map(|dir| dir.join(name))
        .find(|candidate| rustix::fs::access(candidate, rustix::fs::Access::EXEC_OK).is_ok());
    let Some(real) = real else {
        eprintln!("tartarus: {} not found on PATH", name.to_string_lossy());
        return 127;
    };
    let error = std::process::Command::new(&real).arg0(name).args(args).exec();
    eprintln!("tartarus: cannot run {}: {error}", real.display());
    126
}
