//! The Wasm lane: the command is a WebAssembly module (WASI preview 1) or component (WASI preview 2),
//! run by wasmtime inside the supervisor's own process, on a thread of its own. The wall is the Wasm
//! sandbox itself: the guest reaches nothing but its linear memory and the WASI calls wasmtime
//! implements, and of those only its standard descriptors, its arguments and environment, a scratch
//! directory as `/tmp` and read-only preopens of the spec's read-only mounts. No network (WASI sockets
//! refuse every use), no other host file, no processes.
//!
//! One sandbox: `prepare` reads `command[0]` from the host path given (relative to the supervisor's
//! working directory), compiles it and checks its imports against WASI ([`guest::Program`]); `start`
//! creates the scratch directory ([`scratch`]), runs the program on a thread and a ticker thread that
//! advances the engine's epoch, enforces the timeout and carries kills (the guest traps at its next epoch
//! check); the end is signalled on an eventfd. The memory limit caps the guest's linear memories (a
//! growth past it is refused; a run that then fails ends with reason `oom`).
//!
//! Modules: [`guest`] the program and one run of it; [`scratch`] the scratch directory; `stdin` the pump
//! that lets a stop reach a guest reading stdin; `sandbox` one sandbox's lifecycle (docs/wasm.md).

pub mod guest;
mod sandbox;
pub mod scratch;
mod stdin;

use std::path::PathBuf;

pub use self::sandbox::WasmSandbox;
use crate::capabilities::{LaneCapabilities, Unsupported};
use crate::lanes::{default_state_dir, LaneConfig};
use crate::sandbox::{PrepareError, Runtime, Sandbox};
use crate::service::ServiceSandbox;
use crate::spec::SandboxSpec;

/// The wasmtime crate this build runs (Cargo.toml pins it exactly).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// What the Wasm lane honours: one-shot runs with a memory limit (the guest's linear memories) and
/// read-only mounts (as read-only preopens; a writable mount is refused at prepare). Not: a service
/// sandbox, a terminal, any network but none, a directory or image root, CPU and pids limits (one guest
/// thread, no processes), rlimits, seccomp lists, Landlock paths, another user (none of them mean
/// anything to a Wasm guest), pause, file operations, throttling.
pub const CAPABILITIES: LaneCapabilities = LaneCapabilities {
    service: false,
    terminal: false,
    host_loopback: false,
    egress_network: false,
    bind_mounts: true,
    directory_root: false,
    image_layers: false,
    memory_limit: true,
    cpu_limit: false,
    pids_limit: false,
    rlimits: false,
    seccomp_syscall_lists: false,
    landlock_paths: false,
    custom_user: false,
    user_name: false,
    pause: false,
    file_ops: false,
    cpu_throttle: false,
    network_isolation: false,
    pause_to_disk: false,
};

/// Components one supervisor process may run at once: the pooling allocator reserves this many component
/// slots; core modules take from the larger pools below (a module with a memory takes one of
/// `POOL_MEMORIES`).
pub const MAX_SANDBOXES: u32 = 16;
/// Core instances, memories and tables in the pool (a WASI component has several core instances).
const POOL_CORE_INSTANCES: u32 = 8 * MAX_SANDBOXES;
const POOL_MEMORIES: u32 = 4 * MAX_SANDBOXES;
const POOL_TABLES: u32 = 4 * MAX_SANDBOXES;
/// The largest linear memory a slot holds: all of a 32-bit memory (the spec's limit caps it lower).
const POOL_MAX_MEMORY_BYTES: usize = 4 << 30;

/// Where scratch directories go when they cannot be a tmpfs of their own.
fn scratch_parent() -> PathBuf {
    default_state_dir().join("wasm")
}

/// Removes the scratch directories of supervisors that died (`tartarus gc`); opens no engine.
pub fn collect_garbage() -> Vec<PathBuf> {
    scratch::collect_garbage(&scratch_parent())
}

/// The lane cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("wasmtime cannot start on this host: {0}")]
    Engine(String),
}

/// The Wasm runtime: one wasmtime engine (Cranelift, the pooling allocator, epoch interruption) for every
/// sandbox of this process.
pub struct WasmRuntime {
    engine: wasmtime::Engine,
    /// Where scratch directories go when they cannot be a tmpfs of their own.
    scratch_parent: PathBuf,
}

impl WasmRuntime {
    /// Builds the engine; fails when the pool's address space cannot be reserved.
    pub fn open(_config: &LaneConfig) -> Result<WasmRuntime, WasmError> {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(MAX_SANDBOXES)
            .total_core_instances(POOL_CORE_INSTANCES)
            .total_memories(POOL_MEMORIES)
            .total_tables(POOL_TABLES)
            .total_stacks(MAX_SANDBOXES)
            .max_memory_size(POOL_MAX_MEMORY_BYTES);
        let mut config = wasmtime::Config::new();
        config
            .epoch_interruption(true)
            .wasm_backtrace_max_frames(None)
            .wasm_component_model(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        Ok(WasmRuntime {
            engine,
            scratch_parent: scratch_parent(),
        })
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// [`Runtime::prepare`] without the trait object.
    pub fn prepare_sandbox(&self, spec: SandboxSpec) -> Result<WasmSandbox, PrepareError> {
        WasmSandbox::prepare(self, spec)
    }
}

impl Runtime for WasmRuntime {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn capabilities(&self) -> LaneCapabilities {
        CAPABILITIES
    }

    fn prepare(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError> {
        Ok(Box::new(WasmSandbox::prepare(self, spec)?))
    }

    fn prepare_service(&self, _spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError> {
        Err(PrepareError::Unsupported(Unsupported {
            lane: "wasm",
            knob: "service sandboxes (service)",
        }))
    }
}
