//! The file-operation agent: the supervisor's own (static) executable, mounted read-only into a service
//! sandbox at [`AGENT_PATH`] and run there by `runsc exec` as the sandbox user, under the same walls as an
//! exec. It performs one [`FileOp`] with the process lane's code (no shell, no symlink followed, regular
//! files only, the size cap) and reports through its exit status and one stderr line, the encoding every
//! lane shares (`crate::files`).
//!
//! A binary that embeds the gVisor lane calls [`run_if_invoked`] first thing in `main`: when started as the
//! agent it returns the exit code, and `None` otherwise.

use crate::files::{exit_code, FileOp};

/// Where the agent is mounted inside the sandbox; its file name is how it knows it is the agent.
pub const AGENT_PATH: &str = "/.tartarus/tartarus-file-op";
const AGENT_NAME: &str = "tartarus-file-op";

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
    if std::path::Path::new(&first).file_name()? != AGENT_NAME {
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
}
