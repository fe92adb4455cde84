//! File operations in a real service sandbox of the process lane, on the host root, including the attacks
//! a hostile tenant would try (symlinks, devices, FIFOs, `..`, oversized files, read-only places).
//!
//! Its own `main` (`harness = false`): starting a sandbox needs a single-threaded process, which libtest's
//! runner threads are not. One sandbox serves every case; a case that panics is reported and the others
//! still run. Give a name fragment as an argument to run only matching cases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use tartarus_runtime::files::{decode_listing, decode_outcome};
use tartarus_runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use tartarus_runtime::{
    DirEntry, EntryKind, ExecError, ExecId, ExecRequest, FileErrorKind, FileOp, FileOpError, Runtime,
    SandboxSpec, ServiceSandbox, StdioFds, Termination, MAX_FILE_BYTES,
};

/// A case that takes longer than this is hung (a FIFO opened blocking, a read that never ends).
const HUNG: Duration = Duration::from_secs(30);

struct Ran {
    termination: Termination,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

type Starter<'a> = dyn FnOnce(&mut dyn ServiceSandbox, StdioFds<'_>) -> Result<ExecId, ExecError> + 'a;

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

/// Starts a process with fresh pipes, feeds it `input`, collects its output and waits for its end, as the
/// shim does.
fn drive(sandbox: &mut dyn ServiceSandbox, start: Box<Starter<'_>>, input: &[u8]) -> Result<Ran, ExecError> {
    let (stdin_read, stdin_write) = pipe();
    let (stdout_read, stdout_write) = pipe();
    let (stderr_read, stderr_write) = pipe();
    let stdio = StdioFds {
        stdin: stdin_read.as_fd(),
        stdout: stdout_write.as_fd(),
        stderr: stderr_write.as_fd(),
    };
    let id = start(sandbox, stdio)?;
    drop((stdin_read, stdout_write, stderr_write));
    for fd in [&stdin_write, &stdout_read, &stderr_read] {
        rustix::io::ioctl_fionbio(fd, true).unwrap();
    }
    let mut stdin = Some(stdin_write);
    let mut input = input;
    let mut outputs = [(Some(stdout_read), Vec::new()), (Some(stderr_read), Vec::new())];
    let deadline = Instant::now() + HUNG;
    if input.is_empty() {
        stdin = None;
    }
    while stdin.is_some() || outputs.iter().any(|(fd, _)| fd.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the operation hung");
        let mut fds = Vec::new();
        if let Some(fd) = &stdin {
            fds.push(PollFd::new(fd, PollFlags::OUT));
        }
        for (fd, _) in outputs.iter() {
            if let Some(fd) = fd {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
        }
        let timeout = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        drop(fds);
        if let Some(fd) = &stdin {
            match rustix::io::write(fd, input) {
                Ok(n) => input = &input[n..],
                Err(Errno::AGAIN) => {}
                // The process stopped reading (it refused the operation): no more input.
                Err(_) => input = &[],
            }
            if input.is_empty() {
                stdin = None;
            }
        }
        for (fd, kept) in outputs.iter_mut() {
            let Some(pipe) = fd else { continue };
            let mut chunk = [0u8; 64 << 10];
            loop {
                match rustix::io::read(&*pipe, &mut chunk) {
                    Ok(0) => {
                        *fd = None;
                        break;
                    }
                    Ok(n) => kept.extend_from_slice(&chunk[..n]),
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => continue,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }
    let termination = sandbox
        .wait_exec(id, Some(HUNG))?
        .expect("the operation ended once its pipes closed");
    let [(_, stdout), (_, stderr)] = outputs;
    Ok(Ran {
        termination,
        stdout,
        stderr,
    })
}

fn file_op(sandbox: &mut dyn ServiceSandbox, op: FileOp, input: &[u8]) -> Result<Vec<u8>, FileOpError> {
    let ran = drive(
        sandbox,
        Box::new(move |s: &mut dyn ServiceSandbox, stdio: StdioFds<'_>| s.start_file_op(&op, stdio)),
        input,
    )
    .expect("the file operation started");
    decode_outcome(ran.termination, &ran.stderr).map(|()| ran.stdout)
}

fn read(sandbox: &mut dyn ServiceSandbox, path: &str) -> Result<Vec<u8>, FileOpError> {
    file_op(sandbox, FileOp::Read { path: path.into() }, &[])
}

fn write(sandbox: &mut dyn ServiceSandbox, path: &str, data: &[u8]) -> Result<(), FileOpError> {
    file_op(sandbox, FileOp::Write { path: path.into() }, data).map(|out| assert!(out.is_empty()))
}

fn list(sandbox: &mut dyn ServiceSandbox, path: &str) -> Result<Vec<DirEntry>, FileOpError> {
    let out = file_op(sandbox, FileOp::List { path: path.into() }, &[])?;
    Ok(decode_listing(&out).expect("a well-formed listing"))
}

/// Runs a shell snippet as an exec; asserts it succeeded and returns its stdout.
fn sh(sandbox: &mut dyn ServiceSandbox, script: &str) -> String {
    let request = ExecRequest {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        workdir: None,
    };
    let ran = drive(
        sandbox,
        Box::new(move |s: &mut dyn ServiceSandbox, stdio: StdioFds<'_>| s.exec(&request, stdio)),
        &[],
    )
    .expect("exec started");
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(ran.termination, Termination::Exited(0), "{script}: {stderr}");
    String::from_utf8(ran.stdout).unwrap()
}

fn kind_of<T: std::fmt::Debug>(result: Result<T, FileOpError>) -> FileErrorKind {
    result.expect_err("refused").kind
}

/// Bytes that text handling would mangle: every byte value, NUL and 0xff included, in a pattern that is
/// not periodic at any small length.
fn binary(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if i < 256 {
                i as u8
            } else {
                (state >> 24) as u8
            }
        })
        .collect()
}

fn binary_bytes_are_written_and_read_back_exactly(s: &mut dyn ServiceSandbox) {
    let data = binary(10_000);
    assert!(data.contains(&0) && data.contains(&0xff));
    write(s, "/tmp/binary", &data).unwrap();
    assert_eq!(read(s, "/tmp/binary").unwrap(), data);
    // A second write replaces the content (truncates), it does not overlay it.
    write(s, "/tmp/binary", b"\0\xff").unwrap();
    assert_eq!(read(s, "/tmp/binary").unwrap(), b"\0\xff");
    write(s, "/tmp/empty", b"").unwrap();
    assert_eq!(read(s, "/tmp/empty").unwrap(), b"");
}

fn a_file_of_exactly_the_cap_round_trips(s: &mut dyn ServiceSandbox) {
    let data = binary(MAX_FILE_BYTES);
    write(s, "/tmp/four-mib", &data).unwrap();
    let back = read(s, "/tmp/four-mib").unwrap();
    assert_eq!(back.len(), MAX_FILE_BYTES);
    assert!(back == data, "4 MiB read back differs");
    assert_eq!(sh(s, "wc -c < /tmp/four-mib").trim(), MAX_FILE_BYTES.to_string());
}

fn files_are_written_as_the_sandbox_user_with_mode_0644(s: &mut dyn ServiceSandbox) {
    write(s, "/tmp/owned", b"x").unwrap();
    assert_eq!(sh(s, "stat -c '%u:%g %a' /tmp/owned").trim(), "1000:1000 644");
    write(s, "/home/sandbox/in-home", b"y").unwrap();
    assert_eq!(sh(s, "stat -c '%u' /home/sandbox/in-home").trim(), "1000");
}

fn a_listing_has_names_kinds_and_sizes_sorted(s: &mut dyn ServiceSandbox) {
    sh(
        s,
        "mkdir /tmp/l && printf abc > /tmp/l/file && mkdir /tmp/l/dir && ln -s file /tmp/l/link \
         && mkfifo /tmp/l/fifo && : > '/tmp/l/with space'",
    );
    let entries = list(s, "/tmp/l").unwrap();
    let got: Vec<(&str, EntryKind)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        got,
        [
            ("dir", EntryKind::Dir),
            ("fifo", EntryKind::Other),
            ("file", EntryKind::File),
            ("link", EntryKind::Symlink),
            ("with space", EntryKind::File),
        ]
    );
    let size = |name: &str| entries.iter().find(|e| e.name == name).unwrap().size;
    assert_eq!(size("file"), 3);
    assert_eq!(size("link"), 4, "a symlink's size is its target's length");
    assert_eq!(size("with space"), 0);
    assert!(list(s, "/")
        .unwrap()
        .iter()
        .any(|e| e.name == "tmp" && e.kind == EntryKind::Dir));
    assert!(list(s, "/tmp/l/dir").unwrap().is_empty());
}

fn a_symlinked_parent_directory_is_not_followed(s: &mut dyn ServiceSandbox) {
    sh(s, "ln -s /etc /tmp/link-etc && ln -s /tmp /tmp/link-tmp");
    // Positive control: the same file is readable by its real path.
    assert!(read(s, "/etc/passwd").unwrap().starts_with(b"root:"));
    assert_eq!(kind_of(read(s, "/tmp/link-etc/passwd")), FileErrorKind::WrongType);
    assert_eq!(kind_of(list(s, "/tmp/link-etc")), FileErrorKind::WrongType);
    // Even where the link stays inside a writable place, a write does not go through it.
    assert_eq!(
        kind_of(write(s, "/tmp/link-tmp/through", b"x")),
        FileErrorKind::WrongType
    );
    assert_eq!(
        kind_of(write(s, "/tmp/link-etc/x", b"x")),
        FileErrorKind::WrongType
    );
    assert_eq!(
        sh(s, "ls /tmp/through /etc/x 2>/dev/null; echo end").trim(),
        "end"
    );
}

fn a_symlink_as_the_target_is_refused(s: &mut dyn ServiceSandbox) {
    sh(
        s,
        "printf secret > /tmp/victim && ln -s /tmp/victim /tmp/final && ln -s /nowhere /tmp/dangling",
    );
    let err = read(s, "/tmp/final").expect_err("refused");
    assert_eq!(err.kind, FileErrorKind::WrongType);
    assert!(err.message.contains("/tmp/final"), "{}", err.message);
    assert_eq!(
        kind_of(write(s, "/tmp/final", b"overwritten")),
        FileErrorKind::WrongType
    );
    assert_eq!(read(s, "/tmp/victim").unwrap(), b"secret");
    assert_eq!(kind_of(write(s, "/tmp/dangling", b"x")), FileErrorKind::WrongType);
    assert_eq!(sh(s, "ls /nowhere 2>/dev/null; echo end").trim(), "end");
}

fn devices_are_refused(s: &mut dyn ServiceSandbox) {
    let err = read(s, "/dev/zero").expect_err("refused");
    assert_eq!(err.kind, FileErrorKind::WrongType);
    assert_eq!(err.message, "/dev/zero: not a regular file");
    assert_eq!(kind_of(read(s, "/dev/urandom")), FileErrorKind::WrongType);
    assert_eq!(kind_of(write(s, "/dev/null", b"x")), FileErrorKind::WrongType);
}

fn a_fifo_is_refused_without_hanging(s: &mut dyn ServiceSandbox) {
    sh(s, "mkfifo /tmp/fifo");
    // No writer or reader will ever come: opening it blocking would hang until HUNG.
    assert_eq!(kind_of(read(s, "/tmp/fifo")), FileErrorKind::WrongType);
    assert_eq!(kind_of(write(s, "/tmp/fifo", b"x")), FileErrorKind::WrongType);
}

fn malformed_paths_are_refused_before_anything_runs(s: &mut dyn ServiceSandbox) {
    for path in [
        "/tmp/../etc/passwd",
        "/..",
        "tmp/x",
        "/tmp/a\0b",
        &format!("/{}", "a".repeat(5000)),
    ] {
        let op = FileOp::Read { path: path.into() };
        let started = s.start_file_op(&op, StdioFds::inherit());
        assert!(
            matches!(started, Err(ExecError::Invalid(_))),
            "{path:?}: {started:?}"
        );
    }
}

fn a_file_over_the_cap_is_too_large(s: &mut dyn ServiceSandbox) {
    sh(
        s,
        &format!("head -c {} /dev/zero > /tmp/huge", MAX_FILE_BYTES + 1),
    );
    let err = read(s, "/tmp/huge").expect_err("refused");
    assert_eq!(err.kind, FileErrorKind::TooLarge);
    assert_eq!(err.message, "/tmp/huge: larger than 4 MiB");
    // Too much input leaves the file empty rather than cut.
    assert_eq!(
        kind_of(write(s, "/tmp/too-much", &binary(MAX_FILE_BYTES + 1))),
        FileErrorKind::TooLarge
    );
    assert_eq!(read(s, "/tmp/too-much").unwrap(), b"");
}

fn read_only_and_unreadable_places_are_forbidden(s: &mut dyn ServiceSandbox) {
    for path in [
        "/usr/tartarus-file-op",
        "/etc/tartarus-file-op",
        "/tartarus-file-op",
    ] {
        assert_eq!(kind_of(write(s, path, b"x")), FileErrorKind::Forbidden, "{path}");
    }
    // Owned by the sandbox user but mode 000: only a capability (dropped) would get past it.
    sh(
        s,
        "mkdir /tmp/locked && printf x > /tmp/locked/f && chmod 000 /tmp/locked/f && chmod 000 /tmp/locked",
    );
    assert_eq!(kind_of(list(s, "/tmp/locked")), FileErrorKind::Forbidden);
    sh(s, "chmod 100 /tmp/locked");
    assert_eq!(kind_of(read(s, "/tmp/locked/f")), FileErrorKind::Forbidden);
    assert_eq!(kind_of(write(s, "/tmp/locked/f", b"y")), FileErrorKind::Forbidden);
}

fn missing_paths_and_wrong_kinds_are_told_apart(s: &mut dyn ServiceSandbox) {
    assert_eq!(kind_of(read(s, "/tmp/missing")), FileErrorKind::NotFound);
    assert_eq!(kind_of(list(s, "/tmp/missing")), FileErrorKind::NotFound);
    assert_eq!(
        kind_of(write(s, "/tmp/missing-dir/x", b"x")),
        FileErrorKind::NotFound
    );
    assert_eq!(kind_of(read(s, "/etc/passwd/x")), FileErrorKind::NotFound);
    assert_eq!(kind_of(read(s, "/tmp")), FileErrorKind::WrongType);
    assert_eq!(kind_of(write(s, "/tmp", b"x")), FileErrorKind::WrongType);
    assert_eq!(kind_of(list(s, "/etc/passwd")), FileErrorKind::WrongType);
}

type Case = fn(&mut dyn ServiceSandbox);

/// Each case by its function's name.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        &[$((stringify!($case), $case as Case)),*]
    };
}

const CASES: &[(&str, Case)] = cases![
    binary_bytes_are_written_and_read_back_exactly,
    a_file_of_exactly_the_cap_round_trips,
    files_are_written_as_the_sandbox_user_with_mode_0644,
    a_listing_has_names_kinds_and_sizes_sorted,
    a_symlinked_parent_directory_is_not_followed,
    a_symlink_as_the_target_is_refused,
    devices_are_refused,
    a_fifo_is_refused_without_hanging,
    malformed_paths_are_refused_before_anything_runs,
    a_file_over_the_cap_is_too_large,
    read_only_and_unreadable_places_are_forbidden,
    missing_paths_and_wrong_kinds_are_told_apart,
];

fn main() -> ExitCode {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&(&str, Case)> = CASES
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        println!("file_ops: no case matches {filter:?}");
        return ExitCode::SUCCESS;
    }
    let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
    let mut sandbox = runtime
        .prepare_service(SandboxSpec::default())
        .expect("prepare a service sandbox");
    sandbox.start(StdioFds::inherit()).expect("start the sandbox");
    println!(
        "running {} file_ops cases in sandbox {}",
        selected.len(),
        sandbox.id()
    );
    let mut failed = Vec::new();
    for (name, case) in selected {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| case(sandbox.as_mut())));
        match result {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    sandbox.cleanup().expect("cleanup");
    if failed.is_empty() {
        println!("file_ops: all cases passed");
        ExitCode::SUCCESS
    } else {
        println!("file_ops: failed: {failed:?}");
        ExitCode::FAILURE
    }
}
