//! Sandboxes for untrusted code: the [`Runtime`] trait, the validated [`SandboxSpec`] every backend
//! receives, the [`ServiceSandbox`] seam a shim drives, and the Linux process-isolation backend
//! ([`process::ProcessRuntime`]).
//!
//! Place in the data flow: the CLI (`tartarus run`) turns user input into a `SandboxSpec`, picks a runtime,
//! and drives `prepare → start → wait → cleanup`; a shim does the same with
//! [`Runtime::prepare_service`] and then serves execs, file operations and controls through
//! [`ServiceSandbox`]. This crate never prints and never exits; every failure is a typed error that says
//! what to change.
//!
//! Modules: [`sandbox`] the lifecycle traits and types; [`capabilities`] what a lane can honour;
//! [`service`] the service-sandbox seam; [`files`] file operations and their encoding; [`spec`] the
//! validated input; [`lanes`] lanes by name, what this host can run and opening one; [`process`] the Linux
//! process lane; [`gvisor`] the gVisor lane (runsc); [`microvm`] the microVM lane (QEMU and a guest agent); [`wasm`] the Wasm lane (wasmtime and
//! WASI); [`testing`] a scriptable fake of the seam.

pub mod capabilities;
pub mod files;
pub mod gvisor;
pub mod lanes;
pub mod microvm;
pub mod process;
pub mod sandbox;
pub mod service;
pub mod snapshot;
pub mod spec;
pub mod testing;
pub mod units;
pub mod wasm;

pub use capabilities::{LaneCapabilities, Unsupported};
pub use files::{DirEntry, EntryKind, FileErrorKind, FileOp, FileOpError, MAX_FILE_BYTES};
pub use sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
pub use service::{
    ExecError, ExecId, ExecRequest, LimitHits, ServiceError, ServiceErrorKind, ServiceSandbox, Usage,
};
pub use spec::{
    Applied, AppliedLimits, BindMount, EgressContract, NetworkMode, ProcessLimits, ResourceLimits, RootSpec,
    SandboxSpec, SandboxUser, SpecError, Unlimited, DEFAULT_CPU_WEIGHT, DEFAULT_MEMORY_BYTES, DEFAULT_PIDS,
    DEFAULT_TIMEOUT_GRACE, MAX_CPUS, MAX_MEMORY_BYTES, MAX_PIDS, MAX_TIMEOUT, MAX_TIMEOUT_GRACE,
    MIN_MEMORY_BYTES, MIN_PIDS,
};
pub use tartarus_network::NetworkError;

/// An error and all its causes on one line: `error: cause: cause` (skipping a cause whose text the line
/// already holds, as some libraries repeat their source in their own message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
