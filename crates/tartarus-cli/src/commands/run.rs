//! `tartarus run`: one command in a new sandbox, daemonless. The CLI process is the sandbox's supervisor:
//! it forwards signals as a kill, enforces the timeout, relays a terminal with `-t`, and removes everything
//! on every exit path.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use rustix::event::{PollFd, PollFlags};
use serde::Serialize;
use tartarus_runtime::lanes::{self, GvisorConfig, LaneConfig, LaneName};
use tartarus_runtime::process::ProcessRuntimeConfig;
use tartarus_runtime::units::{parse_duration, parse_size};
use tartarus_runtime::{
    BindMount, EgressContract, ExitReason, KillReason, NetworkMode, Outcome, ResourceLimits, RootSpec,
    SandboxSpec, StdioFds, Termination, Unlimited,
};

use crate::terminal::{Pty, RawMode};
use crate::{print_error, EXIT_TARTARUS_ERROR};

#[derive(Args, Debug)]
#[command(after_help = "Example: tartarus run --memory 256M --timeout 30s -- python3 -c \"print('hi')\"")]
pub struct RunArgs {
    /// Isolation lane: process (namespaces, seccomp, Landlock), gvisor (gVisor's user-space kernel, runsc;
    /// root only), microvm (a QEMU microVM; root only) or wasm (a WebAssembly program under wasmtime and
    /// WASI). `tartarus runtimes` lists what this host can run
    #[arg(long, value_name = "LANE", default_value = "process", value_parser = parse_lane_arg)]
    runtime: LaneName,
    /// Directory to use as the read-only root (default: the host's /usr with a generated /etc)
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Run on an OCI image (pulled first if it is not in the local store): its layers are the root (writable,
    /// changes vanish at exit), its Env, WorkingDir, User and Entrypoint/Cmd are the defaults
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Pull over plain HTTP when the image is missing (only for a registry on loopback)
    #[arg(long, requires = "image")]
    insecure_registry: bool,
    /// Memory limit, e.g. 256M or 1G (default 512M, scratch tmpfs included; `unlimited` lifts it)
    #[arg(long, value_name = "SIZE|unlimited", value_parser = parse_memory_arg)]
    memory: Option<Limit<u64>>,
    /// CPU quota in cores, e.g. 0.5 (default: no quota, a fair share; `unlimited` drops the share too)
    #[arg(long, value_name = "CORES|unlimited", value_parser = parse_cpus_arg)]
    cpus: Option<Limit<f64>>,
    /// Maximum number of processes and threads (default 256; `unlimited` lifts it)
    #[arg(long, value_name = "N|unlimited", value_parser = parse_pids_arg)]
    pids: Option<Limit<u64>>,
    /// Kill the sandbox after this long, e.g. 30s, 1m30s, 250ms
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the timeout ends the sandbox (default 2s; 0 kills at once)
    #[arg(long, value_name = "DURATION", value_parser = parse_grace_arg)]
    timeout_grace: Option<Duration>,
    /// Set an environment variable (repeatable); nothing is inherited from the host
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env_arg)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default: /home/sandbox)
    #[arg(long, short = 'w', value_name = "PATH")]
    workdir: Option<PathBuf>,
    /// Make a host path visible: HOST:SANDBOX[:ro|rw] (read-only unless :rw)
    #[arg(long = "mount", short = 'm', value_name = "HOST:SANDBOX[:ro|rw]", value_parser = parse_mount_arg)]
    mounts: Vec<BindMount>,
    /// Network: none (own loopback only), host-loopback (share the host's network stack) or egress (own
    /// address behind the host's NAT, filtered by the flags below; root only; see docs/network.md)
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = parse_network_arg)]
    network: NetworkMode,
    /// With --network egress: only these networks are reachable (repeatable), e.g. 203.0.113.0/24
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allow_cidrs: Vec<String>,
    /// With --network egress: never reachable, even inside an allowed network (repeatable)
    #[arg(long = "deny-cidr", value_name = "CIDR")]
    deny_cidrs: Vec<String>,
    /// With --network egress: only these TCP/UDP ports are reachable (repeatable; default all)
    #[arg(long = "allow-port", value_name = "PORT")]
    allow_ports: Vec<u16>,
    /// With --network egress: allow private and link-local ranges (metadata addresses stay blocked)
    #[arg(long)]
    allow_private: bool,
    /// With --network egress: allow DNS to the host's resolvers and list them in /etc/resolv.conf
    #[arg(long)]
    dns: bool,
    /// With --network egress: cap bandwidth per direction, in KiB/s
    #[arg(long, value_name = "KBPS")]
    rate_limit: Option<u32>,
    /// Size cap of each writable scratch area (/tmp, home, /dev/shm)
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size_arg)]
    scratch_size: u64,
    /// Allocate a terminal for interactive use
    #[arg(long, short = 't')]
    tty: bool,
    /// Print a JSON result record on stderr when the sandbox ends
    #[arg(long)]
    json: bool,
    /// Write the JSON result record to this file instead of stderr
    #[arg(long, value_name = "FILE")]
    result_file: Option<PathBuf>,
    /// The program, when it is not the first word after `--`; the words after `--` are then its
    /// arguments: `tartarus run --runtime wasm app.wasm -- arg` (a Wasm lane's program is read from this
    /// host path)
    #[arg(value_name = "PROGRAM")]
    program: Option<String>,
    /// The command and its arguments (optional with --image: the image's Cmd)
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// A limit flag: a value, or `unlimited` to lift the default on purpose.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Limit<T> {
    Value(T),
    Unlimited,
}

impl<T: Copy> Limit<T> {
    fn value(self) -> Option<T> {
        match self {
            Limit::Value(v) => Some(v),
            Limit::Unlimited => None,
        }
    }
}

fn parse_limit<T>(s: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Limit<T>, String> {
    match s {
        "unlimited" => Ok(Limit::Unlimited),
        _ => parse(s).map(Limit::Value),
    }
}

fn parse_memory_arg(s: &str) -> Result<Limit<u64>, String> {
    parse_limit(s, parse_size_arg)
}

fn parse_cpus_arg(s: &str) -> Result<Limit<f64>, String> {
    parse_limit(s, |s| {
        s.parse()
            .map_err(|_| format!("'{s}' is not a number of cores or `unlimited` (e.g. --cpus 0.5)"))
    })
}

fn parse_pids_arg(s: &str) -> Result<Limit<u64>, String> {
    parse_limit(s, |s| {
        s.parse()
            .map_err(|_| format!("'{s}' is not a number of processes or `unlimited` (e.g. --pids 64)"))
    })
}

fn parse_lane_arg(s: &str) -> Result<LaneName, String> {
    s.parse().map_err(|e: lanes::UnknownLane| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// A grace period: a duration, or `0` for none.
fn parse_grace_arg(s: &str) -> Result<Duration, String> {
    match s {
        "0" => Ok(Duration::ZERO),
        _ => parse_duration_arg(s),
    }
}

fn parse_env_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE (e.g. --env LANG=C.UTF-8)")),
    }
}

fn parse_mount_arg(s: &str) -> Result<BindMount, String> {
    let bad = || format!("'{s}' is not HOST:SANDBOX[:ro|rw] (e.g. --mount ./data:/data:ro)");
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, writable) = match parts.as_slice() {
        [h, t] => (*h, *t, false),
        [h, t, "ro"] => (*h, *t, false),
        [h, t, "rw"] => (*h, *t, true),
        _ => return Err(bad()),
    };
    if source.is_empty() || target.is_empty() {
        return Err(bad());
    }
    Ok(BindMount {
        source: source.into(),
        target: target.into(),
        writable,
    })
}

fn parse_network_arg(s: &str) -> Result<NetworkMode, String> {
    match s {
        "none" => Ok(NetworkMode::None),
        "host-loopback" => Ok(NetworkMode::HostLoopback),
        "egress" => Ok(NetworkMode::Egress(EgressContract::default())),
        _ => Err(format!(
            "'{s}' is not a network mode: use none, host-loopback or egress"
        )),
    }
}

/// Runtime settings shared by `run` and `gc` (the cgroup parent can be moved for tests and operators).
pub fn runtime_config() -> ProcessRuntimeConfig {
    let mut config = ProcessRuntimeConfig::default();
    if let Ok(parent) = std::env::var("TARTARUS_CGROUP_PARENT") {
        if !parent.is_empty() && !parent.contains('/') && parent != "." && parent != ".." {
            config.cgroup_parent = parent;
        }
    }
    config
}

/// Every lane's settings: the process runtime's, and gVisor's from the environment (`TARTARUS_RUNSC` is read
/// where runsc is looked for; `TARTARUS_GVISOR_PLATFORM` forces a platform; `TARTARUS_STATE_DIR` moves the
/// state).
pub fn lane_config() -> anyhow::Result<LaneConfig> {
    let platform = match std::env::var("TARTARUS_GVISOR_PLATFORM") {
        Ok(name) if !name.is_empty() => Some(name.parse()?),
        _ => None,
    };
    Ok(LaneConfig {
        process: runtime_config(),
        gvisor: GvisorConfig {
            runsc: None,
            state_dir: None,
            platform,
        },
        microvm: Default::default(),
    })
}

/// The JSON result record.
#[derive(Serialize)]
struct ResultRecord<'a> {
    id: &'a str,
    exit_code: i32,
    signal: Option<i32>,
    reason: &'static str,
    wall_ms: f64,
    cpu_ms: f64,
    peak_memory_bytes: u64,
    /// Packets the egress contract dropped (egress runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    blocked_packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The network the flags ask for; egress flags without `--network egress` are an error rather than
/// silently ignored.
fn network_from(args: &RunArgs) -> Result<NetworkMode, String> {
    let egress_flag = [
        (!args.allow_cidrs.is_empty(), "--allow-cidr"),
        (!args.deny_cidrs.is_empty(), "--deny-cidr"),
        (!args.allow_ports.is_empty(), "--allow-port"),
        (args.allow_private, "--allow-private"),
        (args.dns, "--dns"),
        (args.rate_limit.is_some(), "--rate-limit"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag));
    match &args.network {
        NetworkMode::Egress(_) => Ok(NetworkMode::Egress(EgressContract {
            allowed_cidrs: args.allow_cidrs.clone(),
            denied_cidrs: args.deny_cidrs.clone(),
            deny_private: !args.allow_private,
            deny_metadata: true,
            allowed_ports: args.allow_ports.clone(),
            dns: args.dns,
            rate_limit_kbps: args.rate_limit.unwrap_or(0),
        })),
        other => match egress_flag {
            Some(flag) => Err(format!("{flag} needs --network egress")),
            None => Ok(other.clone()),
        },
    }
}

fn spec_from(args: &RunArgs) -> SandboxSpec {
    let command = args.program.iter().chain(&args.command).cloned().collect();
    let mut spec = SandboxSpec::new(command);
    spec.env = args.env.clone();
    spec.workdir = args.workdir.clone();
    spec.root = args
        .rootfs
        .clone()
        .map(RootSpec::Directory)
        .unwrap_or(RootSpec::HostSystem);
    spec.mounts = args.mounts.clone();
    spec.network = args.network.clone();
    spec.limits = ResourceLimits {
        memory_bytes: args.memory.and_then(Limit::value),
        cpus: args.cpus.and_then(Limit::value),
        pids: args.pids.and_then(Limit::value),
    };
    spec.unlimited = Unlimited {
        memory: args.memory == Some(Limit::Unlimited),
        cpu: args.cpus == Some(Limit::Unlimited),
        pids: args.pids == Some(Limit::Unlimited),
    };
    spec.timeout = args.timeout;
    spec.timeout_grace = args.timeout_grace;
    spec.tty = args.tty;
    spec.scratch_bytes = args.scratch_size;
    if args.tty {
        if let Ok(term) = std::env::var("TERM") {
            spec.env.insert(0, ("TERM".into(), term));
        }
    }
    spec
}

const FORWARDED_SIGNALS: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGWINCH,
];

pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let mut spec = spec_from(&args);
    let report = Reporter {
        json: args.json,
        result_file: args.result_file.clone(),
    };
    match network_from(&args) {
        Ok(network) => spec.network = network,
        Err(message) => {
            eprintln!("tartarus: {message}");
            return Ok(EXIT_TARTARUS_ERROR);
        }
    }
    if let Some(reference) = &args.image {
        if let Err(e) = apply_image(&mut spec, reference, args.insecure_registry) {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("tartarus: {}", chain.join(": "));
            return Ok(EXIT_TARTARUS_ERROR);
        }
    }
    let memory_limit = spec.applied_limits().memory_bytes.value();
    let runtime = match lane_config().and_then(|config| Ok(lanes::open(args.runtime, &config)?)) {
        Ok(runtime) => runtime,
        Err(e) => {
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            return Ok(report.failure("", e, EXIT_TARTARUS_ERROR as i32));
        }
    };
    let mut sandbox = match runtime.prepare(spec) {
        Ok(s) => s,
        Err(e) => return Ok(report.failure("", &e, EXIT_TARTARUS_ERROR as i32)),
    };
    // Signals become events on a descriptor; the sandbox's command starts with a clean mask.
    tartarus_hostsys::block_signals(&FORWARDED_SIGNALS)?;
    let signals = tartarus_hostsys::signal_fd(&FORWARDED_SIGNALS)?;

    let stdin = tartarus_hostsys::stdio_fd(0);
    let stdout = tartarus_hostsys::stdio_fd(1);
    let pty = if args.tty { Some(Pty::open()?) } else { None };
    let stdio = match &pty {
        Some(pty) => {
            pty.copy_window_size(stdin);
            StdioFds::terminal(pty.slave.as_fd())
        }
        None => StdioFds::inherit(),
    };
    if let Err(e) = sandbox.start(stdio) {
        let code = e.exit_code();
        let _ = sandbox.cleanup();
        return Ok(report.failure(sandbox.id(), &e, code));
    }
    let _raw = match &pty {
        Some(_) if tartarus_hostsys::is_terminal(stdin) => Some(RawMode::enable(stdin)?),
        _ => None,
    };
    let started = Instant::now();
    let mut interrupted: Option<i32> = None;
    let mut stdin_open = true;
    let outcome = loop {
        let event_fd = sandbox
            .event_fd()
            .expect("running sandbox has an event fd")
            .as_raw_fd();
        // SAFETY: the descriptor belongs to `sandbox`, which outlives this poll.
        let event = unsafe { BorrowedFd::borrow_raw(event_fd) };
        let mut fds = vec![
            PollFd::new(&event, PollFlags::IN),
            PollFd::new(&signals, PollFlags::IN),
        ];
        if let Some(pty) = &pty {
            fds.push(PollFd::new(&pty.master, PollFlags::IN));
            if stdin_open {
                fds.push(PollFd::new(&stdin, PollFlags::IN));
            }
        }
        let remaining = args.timeout.map(|t| t.saturating_sub(started.elapsed()));
        let ts = remaining.map(|d| rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        });
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => {
                sandbox.stop_at_timeout()?;
                continue;
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if let Some(pty) = &pty {
            if ready[2] {
                relay(pty.master.as_fd(), stdout);
            }
            if stdin_open && ready[3] && !relay(stdin, pty.master.as_fd()) {
                // Caller's stdin closed: EOF (^D) once, and stop watching it (an end of file stays
                // readable, and a ^D per turn would fill the terminal's input until the write blocks).
                let _ = tartarus_hostsys::write_all(&pty.master, &[4]);
                stdin_open = false;
            }
        }
        if ready[1] {
            while let Some(signal) = tartarus_hostsys::read_signal(signals.as_fd())? {
                if signal == libc::SIGWINCH {
                    if let Some(pty) = &pty {
                        pty.copy_window_size(stdin);
                    }
                    continue;
                }
                interrupted.get_or_insert(signal);
                sandbox.kill(KillReason::Requested)?;
            }
        }
        if ready[0] {
            if let Some(outcome) = sandbox.try_wait()? {
                break outcome;
            }
        }
    };
    if let Some(pty) = pty {
        drop(pty.slave);
        // Drain what the command wrote before exiting; EIO means every writer is gone.
        while relay(pty.master.as_fd(), stdout) {}
    }
    drop(_raw);
    let id = sandbox.id().to_string();
    let blocked_packets = sandbox.blocked_packets();
    if let Err(e) = sandbox.cleanup() {
        print_error(&e);
    }
    let code = match (interrupted, outcome.reason) {
        (Some(signal), _) => 128 + signal,
        _ => outcome.termination.exit_code(),
    };
    explain(&outcome, &args, memory_limit);
    report.success(&id, &outcome, code, blocked_packets);
    Ok(code.clamp(0, 255) as u8)
}

/// Roots `spec` on the image, pulling it first (through `tartarus-control image pull`, which holds the
/// registry client, so this binary stays small and fast to start) when it is not in the local store.
fn apply_image(spec: &mut SandboxSpec, reference: &str, insecure: bool) -> anyhow::Result<()> {
    let data_dir = super::apikey::default_data_dir();
    let store = tartarus_image::runspec::open_store(&data_dir)?;
    let record = match store.find(reference)? {
        Some(record) => record,
        None => {
            let control = std::env::current_exe()?.with_file_name("tartarus-control");
            let mut pull = std::process::Command::new(&control);
            pull.args(["image", "pull"]);
            if insecure {
                pull.arg("--insecure");
            }
            // Progress goes to stderr: stdout belongs to the sandboxed command.
            let status = pull
                .arg(reference)
                .stdout(std::io::stderr())
                .status()
                .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", control.display()))?;
            if !status.success() {
                anyhow::bail!("pulling {reference} failed");
            }
            store.get(reference)?
        }
    };
    tartarus_image::runspec::apply_image(spec, &store, &record, true)?;
    Ok(())
}

/// Copies what is available from `from` to `to`; false at EOF or error.
fn relay(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    match rustix::io::read(from, &mut buf) {
        Ok(0) | Err(_) => false,
        Ok(n) => tartarus_hostsys::write_all(to, &buf[..n]).is_ok(),
    }
}

fn explain(outcome: &Outcome, args: &RunArgs, memory_limit: Option<u64>) {
    match outcome.reason {
        ExitReason::Timeout => {
            let limit = args.timeout.map(|t| format!("{t:?}")).unwrap_or_default();
            match outcome.termination {
                Termination::Signaled(libc::SIGKILL) => {
                    eprintln!("tartarus: timed out after {limit}; the sandbox was killed (SIGKILL)")
                }
                _ => eprintln!(
                    "tartarus: timed out after {limit}; sent SIGTERM, and the command ended within its grace period"
                ),
            }
        }
        ExitReason::Oom => {
            let limit = memory_limit
                .map(|m| format!(" (limit {} MiB)", m >> 20))
                .unwrap_or_default();
            match outcome.termination {
                Termination::Signaled(_) => {
                    eprintln!("tartarus: out of memory{limit}; the kernel killed the command")
                }
                // A lane that refuses the growth (wasm) instead of killing: the command failed after it.
                Termination::Exited(_) => eprintln!(
                    "tartarus: out of memory{limit}; a memory growth past the limit was refused and the \
                     command failed"
                ),
            }
        }
        _ => {}
    }
}

struct Reporter {
    json: bool,
    result_file: Option<PathBuf>,
}

impl Reporter {
    fn emit(&self, record: &ResultRecord<'_>) {
        if !self.json && self.result_file.is_none() {
            return;
        }
        let Ok(text) = serde_json::to_string(record) else {
            return;
        };
        match &self.result_file {
            Some(path) => {
                if let Err(e) = std::fs::write(path, format!("{text}\n")) {
                    eprintln!("tartarus: cannot write result file {}: {e}", path.display());
                }
            }
            None => {
                let _ = writeln!(std::io::stderr(), "{text}");
            }
        }
    }

    fn success(&self, id: &str, outcome: &Outcome, exit_code: i32, blocked_packets: Option<u64>) {
        let signal = match outcome.termination {
            Termination::Signaled(s) => Some(s),
            Termination::Exited(_) => None,
        };
        self.emit(&ResultRecord {
            id,
            exit_code,
            signal,
            reason: outcome.reason.as_str(),
            wall_ms: outcome.wall.as_secs_f64() * 1000.0,
            cpu_ms: outcome.cpu.as_secs_f64() * 1000.0,
            peak_memory_bytes: outcome.peak_memory_bytes,
            blocked_packets,
            error: None,
        });
    }

    fn failure(&self, id: &str, error: &(dyn std::error::Error + 'static), exit_code: i32) -> u8 {
        print_error(error);
        self.emit(&ResultRecord {
            id,
            exit_code,
            signal: None,
            reason: "error",
            wall_ms: 0.0,
            cpu_ms: 0.0,
            peak_memory_bytes: 0,
            blocked_packets: None,
            error: Some(error.to_string()),
        });
        exit_code as u8
    }
}
