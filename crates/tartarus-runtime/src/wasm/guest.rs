//! The guest: a compiled WASI program ([`Program`]: a preview 1 core module or a preview 2 component,
//! told apart by the binary's header) and one run of it ([`run`]) with its WASI context, memory cap and
//! epoch deadline.
//!
//! A run ends with the program's own exit code (`proc_exit`, `wasi:cli/exit`, or 0 when `_start` or
//! `run` returns), or with a trap: then one line `tartarus: …` goes to the guest's stderr and the exit
//! code is [`TRAP_EXIT_CODE`]; a program that cannot be instantiated (the pool is full, its initial memory
//! is past the limit) gets one line too and [`INSTANTIATE_EXIT_CODE`]. A stop asked for through
//! [`Control`] traps at the guest's next epoch check.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, InstancePre, Linker, Module, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{InputFile, OutputFile};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::sandbox::KillReason;

/// The exit code of a run that trapped: 128 + SIGABRT, as wasmtime's own CLI reports a trap.
pub const TRAP_EXIT_CODE: i32 = 134;
/// The exit code of a program that could not be instantiated (the pool is full, its initial memory is
/// past the limit): the shell's 125 for a failure before the command ran.
pub const INSTANTIATE_EXIT_CODE: i32 = 125;

/// How a run that did not end by itself failed.
enum Failure {
    /// Before the entry was called: the WASI context or the instantiation.
    Instantiate(wasmtime::Error),
    /// The entry's own error: an exit code (`I32Exit`) or a trap.
    Run(wasmtime::Error),
}

/// A compiled program, its imports resolved against WASI: instantiating it cannot fail for a missing
/// import.
#[derive(Clone)]
pub enum Program {
    /// A core module exporting `_start` (WASI preview 1).
    Module(InstancePre<P1Host>),
    /// A component exporting `wasi:cli/run` (WASI preview 2).
    Component(CommandPre<P2Host>),
}

/// Why a file is not a program this lane runs, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAProgram(pub String);

/// A component's header: magic, then version 0x0d and layer 1 (a core module has version 1, layer 0).
fn is_component(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(&[0x0d, 0x00, 0x01, 0x00])
}

impl Program {
    /// Compiles `bytes` and links it against WASI preview 1 or 2, whichever its header says.
    pub fn compile(engine: &Engine, bytes: &[u8]) -> Result<Program, NotAProgram> {
        if bytes.get(..4) != Some(b"\0asm") {
            return Err(NotAProgram(
                "not a WebAssembly binary (no \\0asm header)".to_string(),
            ));
        }
        let fail = |what: &str, e: wasmtime::Error| NotAProgram(format!("{what}: {}", one_line(&e)));
        if is_component(bytes) {
            let component =
                Component::from_binary(engine, bytes).map_err(|e| fail("invalid component", e))?;
            let mut linker = wasmtime::component::Linker::<P2Host>::new(engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| fail("linking WASI", e))?;
            let pre = linker
                .instantiate_pre(&component)
                .map_err(|e| fail("the component's imports are not WASI preview 2", e))?;
            let command = CommandPre::new(pre)
                .map_err(|e| fail("the component does not export wasi:cli/run (not a command)", e))?;
            return Ok(Program::Component(command));
        }
        let module = Module::from_binary(engine, bytes).map_err(|e| fail("invalid module", e))?;
        if !module.exports().any(|e| e.name() == "_start") {
            return Err(NotAProgram(
                "the module exports no _start function (not a WASI command)".to_string(),
            ));
        }
        let mut linker = Linker::<P1Host>::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |host| &mut host.wasi)
            .map_err(|e| fail("linking WASI", e))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| fail("the module's imports are not WASI preview 1", e))?;
        Ok(Program::Module(pre))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Program::Module(_) => "module (WASI preview 1)",
            Program::Component(_) => "component (WASI preview 2)",
        }
    }
}

/// An error on one line: a trap's own text, else the chain of causes.
fn one_line(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return trap.to_string();
    }
    format!("{e:#}").replace('\n', " ")
}

/// Shared between a run, its ticker and the sandbox: the stop request and the run's end.
#[derive(Default)]
pub struct Control {
    stop: Mutex<Option<(KillReason, Instant)>>,
    stopping: AtomicBool,
    end: Mutex<Option<GuestEnd>>,
    ended: AtomicBool,
}

impl Control {
    /// Asks the run to stop; the first reason stays.
    pub fn request_stop(&self, reason: KillReason) {
        if let Ok(mut stop) = self.stop.lock() {
            stop.get_or_insert((reason, Instant::now()));
        }
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The stop's reason and how long ago it was asked for.
    pub fn stop(&self) -> Option<(KillReason, Duration)> {
        let stop = self.stop.lock().ok()?;
        stop.map(|(reason, at)| (reason, at.elapsed()))
    }

    fn finish(&self, end: GuestEnd) {
        if let Ok(mut slot) = self.end.lock() {
            *slot = Some(end);
        }
        self.ended.store(true, Ordering::SeqCst);
    }

    /// The run has ended (its end may have been taken already).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// The run's end, once it has ended (taken once).
    pub fn take_end(&self) -> Option<GuestEnd> {
        self.end.lock().ok()?.take()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestEnd {
    pub exit_code: i32,
    /// The guest ended by a trap (after a stop request: the stop).
    pub trapped: bool,
    /// A memory growth was refused for the memory cap.
    pub growth_refused: bool,
    pub peak_memory_bytes: u64,
    pub cpu: Duration,
}

/// What a run gets.
pub struct RunConfig {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(host path, guest path, read-write)`: the scratch directory first, then read-only mounts.
    pub preopens: Vec<(std::path::PathBuf, String, bool)>,
    pub memory_cap_bytes: u64,
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// Caps the guest's linear memories (their sum) and tables, and remembers a refusal and the peak.
pub struct MemoryCap {
    cap: usize,
    total: usize,
    peak: usize,
    refused: bool,
}

/// Table elements one table may have (a table of funcrefs costs host memory outside the cap).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.cap {
            self.refused = true;
            return Ok(false);
        }
        self.total = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A preview 1 run's store data.
pub struct P1Host {
    wasi: WasiP1Ctx,
    cap: MemoryCap,
}

/// A preview 2 run's store data.
pub struct P2Host {
    wasi: WasiCtx,
    table: ResourceTable,
    cap: MemoryCap,
}

impl WasiView for P2Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The WASI context: arguments, environment, stdio, preopens; no network, no inherited anything.
fn wasi_builder(config: RunConfig) -> Result<WasiCtxBuilder, String> {
    let mut builder = WasiCtxBuilder::new();
    builder
        .args(&config.args)
        .envs(&config.env)
        .stdin(InputFile::new(config.stdin))
        .stdout(OutputFile::new(config.stdout))
        .stderr(OutputFile::new(config.stderr))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    for (host, guest, writable) in &config.preopens {
        let perms = if *writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        builder
            .preopened_dir(host, guest, perms)
            .map_err(|e| format!("cannot preopen {guest}: {}", one_line(&e)))?;
    }
    Ok(builder)
}

/// Runs `program` to its end on this thread; never panics on the guest's doing.
pub fn run(engine: &Engine, program: &Program, config: RunConfig, control: &std::sync::Arc<Control>) {
    let started_cpu = thread_cpu();
    let mut stderr = config.stderr.try_clone().ok();
    let cap = MemoryCap {
        cap: usize::try_from(config.memory_cap_bytes).unwrap_or(usize::MAX),
        total: 0,
        peak: 0,
        refused: false,
    };
    let (result, growth_refused, peak) = match wasi_builder(config) {
        Ok(builder) => call_entry(engine, program, builder, cap, control),
        Err(why) => (Err(Failure::Instantiate(wasmtime::Error::msg(why))), false, 0),
    };
    let refused_note = match growth_refused {
        true => " (after a memory growth past the sandbox's memory limit was refused)",
        false => "",
    };
    // A stopped guest's failure is the stop's interruption: no message of its own.
    let mut report = |line: String| {
        if let (false, Some(stderr)) = (control.stop_requested(), stderr.as_mut()) {
            let _ = writeln!(stderr, "{line}{refused_note}");
        }
    };
    let (exit_code, trapped) = match result {
        Ok(()) => (0, false),
        Err(Failure::Run(e)) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(code)) => (*code, false),
            None => {
                report(format!("tartarus: the Wasm program trapped: {}", one_line(&e)));
                (TRAP_EXIT_CODE, true)
            }
        },
        Err(Failure::Instantiate(e)) => {
            report(format!(
                "tartarus: the Wasm program cannot be instantiated: {}",
                one_line(&e)
            ));
            (INSTANTIATE_EXIT_CODE, control.stop_requested())
        }
    };
    control.finish(GuestEnd {
        exit_code,
        trapped,
        growth_refused,
        peak_memory_bytes: peak as u64,
        cpu: thread_cpu().saturating_sub(started_cpu),
    });
}

/// Instantiates `program` in a store of its own and calls its entry (`_start`, `wasi:cli/run`): the
/// result, whether a growth was refused, and the peak of its memories.
fn call_entry(
    engine: &Engine,
    program: &Program,
    mut builder: WasiCtxBuilder,
    cap: MemoryCap,
    control: &std::sync::Arc<Control>,
) -> (Result<(), Failure>, bool, usize) {
    match program {
        Program::Module(pre) => {
            let host = P1Host {
                wasi: builder.build_p1(),
                cap,
            };
            let mut store = Store::new(engine, host);
            store.limiter(|host| &mut host.cap);
            arm_epoch(&mut store, control);
            let result = pre
                .instantiate(&mut store)
                .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
                .map_err(Failure::Instantiate)
                .and_then(|start| start.call(&mut store, ()).map_err(Failure::Run));
            let cap = &store.data().cap;
            (result, cap.refused, cap.peak)
        }
        Program::Component(pre) => {
            let host = P2Host {
                wasi: builder.build(),
                table: ResourceTable::new(),
                cap,
            };
            let mut store = Store::new(engine, host);
            store.limiter(|host| &mut host.cap);
            arm_epoch(&mut store, control);
            let result = pre
                .instantiate(&mut store)
                .map_err(Failure::Instantiate)
                .and_then(|command| {
                    match command.wasi_cli_run().call_run(&mut store) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(())) => Err(wasmtime::Error::new(I32Exit(1))),
                        Err(e) => Err(e),
                    }
                    .map_err(Failure::Run)
                });
            let cap = &store.data().cap;
            (result, cap.refused, cap.peak)
        }
    }
}

/// The guest checks the epoch at function entries and loop heads: each tick extends its deadline by one,
/// until a stop is asked for.
fn arm_epoch<T: 'static>(store: &mut Store<T>, control: &std::sync::Arc<Control>) {
    let control = control.clone();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if control.stop_requested() {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(bytes: &[u8]) -> Result<&'static str, String> {
        Program::compile(&Engine::default(), bytes)
            .map(|p| p.kind())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn test_what_is_not_a_wasi_command_is_refused_in_one_line() {
        assert_eq!(
            compile(b"#!/bin/sh\n"),
            Err("not a WebAssembly binary (no \\0asm header)".to_string())
        );
        // An empty module: valid, but nothing to start.
        assert_eq!(
            compile(b"\0asm\x01\0\0\0"),
            Err("the module exports no _start function (not a WASI command)".to_string())
        );
        let truncated = compile(b"\0asm\x01\0\0\0\x01").expect_err("truncated");
        assert!(truncated.starts_with("invalid module: "), "{truncated}");
        assert!(!truncated.contains('\n'), "{truncated}");
        let component = compile(b"\0asm\x0d\0\x01\0").expect_err("an empty component");
        assert!(
            component.starts_with("the component does not export wasi:cli/run"),
            "{component}"
        );
    }

    #[test]
    fn test_a_component_is_told_from_a_module_by_its_header() {
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_component(b"\0asm\x01\0\0\0"));
        assert!(!is_component(b"\0asm"));
    }

    #[test]
    fn test_the_memory_cap_counts_every_memory_and_remembers_a_refusal() {
        let mut cap = MemoryCap {
            cap: 10,
            total: 0,
            peak: 0,
            refused: false,
        };
        assert!(cap.memory_growing(0, 6, None).expect("grow"));
        assert!(cap.memory_growing(0, 4, None).expect("a second memory"));
        assert!(!cap.memory_growing(6, 7, None).expect("past the cap"));
        assert!(cap.refused);
        assert_eq!((cap.total, cap.peak), (10, 10));
    }
}
