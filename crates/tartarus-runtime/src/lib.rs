//! Sandboxes for untrusted code: the [`Runtime`] trait, the validated [`SandboxSpec`] every backend
//! receives, and the Linux process-isolation backend ([`process::ProcessRuntime`]).
//!
//! Place in the data flow: the CLI (`tartarus run`) and later the server turn user input into a
//! `SandboxSpec`, pick a runtime, and drive `prepare → start → wait → cleanup`. This crate never prints and
//! never exits; every failure is a typed error that says what to change.

pub mod process;
pub mod sandbox;
pub mod spec;
pub mod units;

pub use sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
pub use spec::{
    BindMount, EgressContract, NetworkMode, ProcessLimits, ResourceLimits, RootSpec, SandboxSpec,
    SandboxUser, SpecError,
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
