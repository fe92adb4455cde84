//! The supervisor's own (static) executable inside a gVisor sandbox, mounted read-only under the name of
//! its role, which is how it knows what to do:
//!
//! - the file-operation agent ([`AGENT_PATH`], service sandboxes): run by `runsc exec` as the sandbox
//!   user, under the same walls as an exec, it performs one [`FileOp`] with the process lane's code (no
//!   shell, no symlink followed, regular files only, the size cap) and reports through its exit status
//!   and one stderr line, the encoding every lane shares (`crate::files`);
//! - the syscall filter ([`SYSCALL_FILTER_PATH`], sandboxes whose spec denies extra syscalls): it
//!   installs the process lane's seccomp program with those syscalls added — gVisor implements seccomp
//!   for the programs it runs — and executes the command, so the main command and every exec (which
//!   `runsc exec` would otherwise start unfiltered) run under the policy's list.
//!
//! A binary that embeds the gVisor lane calls [`run_if_invoked`] first thing in `main`: when started in
//! one of these roles it returns the exit code, and `None` otherwise.

use std::os::unix::process::CommandExt;

use crate::files::{exit_code, FileOp};
use crate::process::seccomp::CompiledFilters;

/// Where the agent is mounted inside the sandbox; its file name is how it knows it is the agent.
pub const AGENT_PATH: &str = "/.tartarus/tartarus-file-op";
const AGENT_NAME: &str = "tartarus-file-op";
/// Where the syscall filter is mounted inside the sandbox.
pub const SYSCALL_FILTER_PATH: &str = "/.tartarus/tartarus-syscall-filter";
const SYSCALL_FILTER_NAME: &str = "tartarus-syscall-filter";
/// The filter's exit status when the command could not be started (as a shell's: 127 not found, 126
/// otherwise), or when the filter itself could not be installed.
const NOT_FOUND: i32 = 127;
const NOT_STARTED: i32 = 126;

/// The argv that runs `command` under the process lane's seccomp program plus `denied` syscall numbers.
pub fn filtered_argv(denied: &[i64], command: &[String]) -> Vec<String> {
    let list: Vec<String> = denied.iter().map(i64::to_string).collect();
    let mut argv = vec![SYSCALL_FILTER_PATH.to_string(), list.join(","), "--".to_string()];
    argv.extend(command.iter().cloned());
    argv
}

/// The argv of the agent for `op`.
pub fn argv(op: &FileOp) -> Vec<String> {
    let name = match op {
        FileOp::Read { .. } => "read",
        FileOp::Write { .. } => "write",
        FileOp::List { .. } => "list",
    };
    vec![AGENT_PATH.to_string(), name.to_string(), op.path().to_string()]
}

/// When this process was started as the agent: performs the operation and returns its exit code.
pub fn run_if_invoked() -> Option<i32> {
    let mut args = std::env::args_os();
    let first = args.next()?;
    let name = std::path::Path::new(&first).file_name()?;
    if name == SYSCALL_FILTER_NAME {
        return Some(run_filtered(args.collect()));
    }
    if name != AGENT_NAME {
        return None;
    }
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let op = match args.as_slice() {
        [op, path] if op == "read" => FileOp::Read { path: path.clone() },
        [op, path] if op == "write" => FileOp::Write { path: path.clone() },
        [op, path] if op == "list" => FileOp::List { path: path.clone() },
        _ => {
            eprintln!("usage: {AGENT_NAME} read|write|list PATH");
            return Some(exit_code::INVALID);
        }
    };
    Some(crate::process::file_ops::perform(&op))
}

/// `tartarus-syscall-filter NR,NR,… -- COMMAND…`: installs the filter, then becomes the command.
fn run_filtered(args: Vec<std::ffi::OsString>) -> i32 {
    let (list, command) = match args.as_slice() {
        [list, dashes, command @ ..] if dashes == "--" && !command.is_empty() => (list, command),
        _ => {
            eprintln!("usage: {SYSCALL_FILTER_NAME} NR,NR,... -- COMMAND [ARG...]");
            return NOT_STARTED;
        }
    };
    let denied: Result<Vec<i64>, _> = list
        .to_string_lossy()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::parse)
        .collect();
    let Ok(denied) = denied else {
        eprintln!("{SYSCALL_FILTER_NAME}: not a list of syscall numbers: {list:?}");
        return NOT_STARTED;
    };
    let installed = CompiledFilters::build_with(&denied)
        .map_err(|e| e.to_string())
        .and_then(|filters| filters.apply().map_err(|e| e.to_string()));
    if let Err(e) = installed {
        eprintln!("{SYSCALL_FILTER_NAME}: installing the seccomp filter: {e}");
        return NOT_STARTED;
    }
    // Only returns when the command could not be executed (PATH is searched as by a shell).
    let error = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    let program = command[0].to_string_lossy();
    if error.kind() == std::io::ErrorKind::NotFound {
        eprintln!("tartarus: command not found: {program}");
        NOT_FOUND
    } else {
        eprintln!("tartarus: cannot execute {program}: {error}");
        NOT_STARTED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_agent_argv_names_the_operation_and_the_path() {
        let op = FileOp::Write {
            path: "/tmp/x".into(),
        };
        assert_eq!(argv(&op), [AGENT_PATH, "write", "/tmp/x"]);
        assert!(AGENT_PATH.ends_with(AGENT_NAME));
    }

    #[test]
    fn test_the_filtered_argv_lists_the_numbers_then_the_command() {
        let argv = filtered_argv(&[90, 91], &["chmod".into(), "600".into(), "f".into()]);
        assert_eq!(argv, [SYSCALL_FILTER_PATH, "90,91", "--", "chmod", "600", "f"]);
        assert!(SYSCALL_FILTER_PATH.ends_with(SYSCALL_FILTER_NAME));
    }
}
