//! The shim's view of a runtime lane: starting a service sandbox of any [`Runtime`], and turning the lane's
//! errors and file-operation outcomes into the contract's codes.

use std::os::fd::BorrowedFd;

use tartarus_runtime::files::{decode_listing, decode_outcome};
use tartarus_runtime::{
    ExecError, FileErrorKind, FileOpError, PrepareError, Runtime, RuntimeError, SandboxSpec, ServiceError,
    ServiceErrorKind, ServiceSandbox, StartError, StdioFds, Termination,
};

use crate::protocol::{self, DirEntry, EntryKind, ErrorCode, StartFailure, StartFailureKind};

/// Prepares and starts `spec` as a service sandbox of `runtime`, with the main command's stdio.
pub fn start(
    runtime: &dyn Runtime,
    spec: SandboxSpec,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<Box<dyn ServiceSandbox>, StartFailure> {
    let mut sandbox = runtime.prepare_service(spec).map_err(prepare_failure)?;
    let [stdin, stdout, stderr] = stdio;
    sandbox
        .start(StdioFds {
            stdin,
            stdout,
            stderr,
        })
        .map_err(start_failure)?;
    Ok(sandbox)
}

/// Prepares `spec` as a service sandbox of `runtime` and continues it from the snapshot in `dir` (checked
/// by the caller), with the main command's stdio.
pub fn restore(
    runtime: &dyn Runtime,
    spec: SandboxSpec,
    dir: &std::path::Path,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<Box<dyn ServiceSandbox>, StartFailure> {
    let mut sandbox = runtime.prepare_service(spec).map_err(prepare_failure)?;
    let [stdin, stdout, stderr] = stdio;
    sandbox
        .restore(
            dir,
            StdioFds {
                stdin,
                stdout,
                stderr,
            },
        )
        .map_err(start_failure)?;
    Ok(sandbox)
}

fn prepare_failure(e: PrepareError) -> StartFailure {
    // A default limit the host cannot enforce is the host's (or the operator's) problem, not the request's.
    let kind = match e {
        PrepareError::DefaultLimitUnavailable { .. }
        | PrepareError::Host { .. }
        | PrepareError::Cgroup { .. } => StartFailureKind::Host,
        _ => StartFailureKind::Spec,
    };
    StartFailure {
        kind,
        exit_code: 125,
        message: tartarus_runtime::error_chain(&e),
    }
}

fn start_failure(e: StartError) -> StartFailure {
    let kind = match &e {
        StartError::CommandNotFound(_) => StartFailureKind::CommandNotFound,
        StartError::NotExecutable { .. } => StartFailureKind::NotExecutable,
        // The sandbox's own setup from its spec (working directory, mounts, the root): the request's.
        StartError::Setup { .. } => StartFailureKind::Spec,
        _ => StartFailureKind::Host,
    };
    StartFailure {
        kind,
        exit_code: e.exit_code(),
        message: tartarus_runtime::error_chain(&e),
    }
}

/// A lane operation failed, with the contract's code for it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LaneError {
    code: ErrorCode,
    message: String,
}

impl LaneError {
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn channel(e: std::io::Error) -> Self {
        LaneError {
            code: ErrorCode::Unavailable,
            message: format!("sandbox control channel failed: {e}"),
        }
    }
}

impl From<RuntimeError> for LaneError {
    fn from(e: RuntimeError) -> Self {
        LaneError {
            code: ErrorCode::Unavailable,
            message: tartarus_runtime::error_chain(&e),
        }
    }
}

impl From<ServiceError> for LaneError {
    fn from(e: ServiceError) -> Self {
        let code = match (&e, e.kind()) {
            (ServiceError::Connect { source, .. }, _)
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                ErrorCode::PortClosed
            }
            (ServiceError::Refused { .. }, _) => ErrorCode::Refused,
            (_, kind) => match kind {
                ServiceErrorKind::Unsupported => ErrorCode::Unsupported,
                ServiceErrorKind::State | ServiceErrorKind::Unavailable => ErrorCode::Unavailable,
            },
        };
        LaneError {
            code,
            message: tartarus_runtime::error_chain(&e),
        }
    }
}

impl From<ExecError> for LaneError {
    fn from(e: ExecError) -> Self {
        let code = match (&e, e.exit_code()) {
            (_, 127) => ErrorCode::CommandNotFound,
            (_, 126) => ErrorCode::NotExecutable,
            (ExecError::Invalid(_), _) => ErrorCode::InvalidRequest,
            (ExecError::Unsupported { .. }, _) => ErrorCode::Unsupported,
            _ => ErrorCode::ExecFailed,
        };
        LaneError {
            code,
            message: tartarus_runtime::error_chain(&e),
        }
    }
}

/// Which file operation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOpKind {
    Read,
    Write,
    List,
}

/// What a finished file operation answers.
pub enum FileReply {
    Data(Vec<u8>),
    Listing(Vec<DirEntry>),
    Written,
}

/// Decodes the end of a file operation from its exit and output.
pub fn file_outcome(
    kind: FileOpKind,
    termination: Termination,
    stdout: Vec<u8>,
    stderr: &[u8],
) -> Result<FileReply, protocol::ShimError> {
    decode_outcome(termination, stderr).map_err(file_refusal)?;
    match kind {
        FileOpKind::Read => Ok(FileReply::Data(stdout)),
        FileOpKind::Write => Ok(FileReply::Written),
        FileOpKind::List => {
            let entries = decode_listing(&stdout).map_err(file_refusal)?;
            Ok(FileReply::Listing(
                entries
                    .into_iter()
                    .map(|e| DirEntry {
                        name: e.name,
                        kind: match e.kind {
                            tartarus_runtime::EntryKind::File => EntryKind::File,
                            tartarus_runtime::EntryKind::Dir => EntryKind::Dir,
                            tartarus_runtime::EntryKind::Symlink => EntryKind::Symlink,
                            tartarus_runtime::EntryKind::Other => EntryKind::Other,
                        },
                        size: e.size,
                    })
                    .collect(),
            ))
        }
    }
}

fn file_refusal(e: FileOpError) -> protocol::ShimError {
    let code = match e.kind {
        FileErrorKind::NotFound => ErrorCode::NotFound,
        FileErrorKind::WrongType => ErrorCode::WrongType,
        FileErrorKind::Forbidden => ErrorCode::Forbidden,
        FileErrorKind::TooLarge => ErrorCode::TooLarge,
        FileErrorKind::Invalid => ErrorCode::InvalidRequest,
        FileErrorKind::Failed => ErrorCode::Unavailable,
    };
    protocol::ShimError {
        code,
        message: e.message,
    }
}
