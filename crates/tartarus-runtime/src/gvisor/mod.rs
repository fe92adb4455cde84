//! The gVisor lane: the command runs on gVisor's user-space kernel (the sentry, `runsc`), so the host
//! kernel only ever sees the sentry's own small, seccomp-filtered set of system calls.
//!
//! Process tree: supervisor (the caller, made a child subreaper) → `runsc create` forks the gofer and the
//! sandbox (the sentry), which are reparented to the supervisor once `create` exits; the supervisor waits
//! for the sandbox process itself, whose exit status is the container's. Every runsc invocation is
//! bounded in time and carries the same global flags ([`runsc::Invocation`]): Tartarus's own `--root`,
//! the platform, and `--network=none` or the egress sandbox's prepared network namespace. Limits are the
//! OCI `linux.resources` in a cgroup runsc creates at `/<cgroup parent>/gvisor-<owner pid>-<id>` (v1, v2
//! or hybrid), where the sentry — and with it every page of the sandbox's memory, tmpfs included —
//! lives. Cleanup, on every path: kill, reap, `runsc delete --force`, unmount, remove the bundle,
//! the cgroups and the network.
//!
//! Modules: [`runsc`] finding and invoking runsc; [`bundle`] the OCI bundle; `root_view` what the root
//! will hold, judged before runsc runs; `init` the service-mode init; `service` execs and controls of a
//! service sandbox; [`agent`] file operations and the syscall filter inside it; `cgroups` the sandbox's
//! cgroups; `gc` what a killed supervisor left.

pub mod agent;
pub mod bundle;
mod cgroups;
mod gc;
mod init;
mod root_view;
pub mod runsc;
mod service;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tartarus_network::{NetworkConfig, SandboxNetwork};

use self::bundle::BundleInputs;
use self::cgroups::{cgroups_for, remove_cgroup_dirs};
pub use self::gc::collect_garbage;
use self::root_view::{check_command, missing_workdir, CommandCheck};
use self::runsc::{Invocation, NetworkFlag};
pub use self::runsc::{KvmVerdict, PlatformChoice, RunscBinary, RunscError, RunscVersion, MIN_RELEASE};
use crate::capabilities::LaneCapabilities;
use crate::lanes::{default_state_dir, LaneConfig};
use crate::process::cgroup::SandboxCgroups;
use crate::process::HostCgroupFs;
use crate::sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
use crate::service::ServiceSandbox;
use crate::spec::{normalize_sandbox_path, NetworkMode, RootSpec, SandboxSpec};

/// How long `runsc create` and `runsc start` may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `runsc delete`, `pause`, `resume`, `kill` may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of container ids (and bundle directories): `tartarus-<owner pid>-<id>`.
const CONTAINER_PREFIX: &str = "tartarus-";

/// What the gVisor lane honours. Not (yet): a terminal (runsc's console socket), host-loopback
/// networking (gVisor's `--network=host` would hand the host's stack to the sandbox), another name for
/// the sandbox user. Extra denied
/// syscalls are a seccomp filter installed inside the sentry by the mounted [`agent`]; narrowed writable
/// paths are read-only mounts (gVisor has no Landlock).
pub const CAPABILITIES: LaneCapabilities = LaneCapabilities {
    terminal: false,
    host_loopback: false,
    user_name: false,
    ..LaneCapabilities::ALL
};

/// Directories of the lane's host state.
#[derive(Debug, Clone)]
pub struct StateDirs {
    /// runsc's `--root`.
    pub root: PathBuf,
    /// One bundle per sandbox: `bundles/tartarus-<owner pid>-<id>/`.
    pub bundles: PathBuf,
}

impl StateDirs {
    pub fn new(base: &Path) -> StateDirs {
        StateDirs {
            root: base.join("runsc"),
            bundles: base.join("bundles"),
        }
    }
}

/// The gVisor runtime: a checked runsc, its platform, and where state lives.
pub struct GvisorRuntime {
    runsc: RunscBinary,
    platform: PlatformChoice,
    dirs: StateDirs,
    cgroup_parent: String,
}

impl GvisorRuntime {
    /// Finds runsc (checking its version), picks the platform, and creates the state directories.
    pub fn open(config: &LaneConfig) -> Result<GvisorRuntime, RunscError> {
        if !rustix::process::geteuid().is_root() {
            return Err(RunscError::NeedsRoot);
        }
        let runsc = runsc::find(&config.gvisor)?;
        let base = config
            .gvisor
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir().join("gvisor"));
        let dirs = StateDirs::new(&base);
        for dir in [&base, &dirs.root, &dirs.bundles] {
            create_private_dir(dir).map_err(|e| RunscError::Failed {
                what: "state directory".into(),
                message: format!("{}: {e}", dir.display()),
            })?;
        }
        let platform = runsc::choose_platform(&runsc, config.gvisor.platform, &base)?;
        Ok(GvisorRuntime {
            runsc,
            platform,
            dirs,
            cgroup_parent: config.process.cgroup_parent.clone(),
        })
    }

    pub fn runsc(&self) -> &RunscBinary {
        &self.runsc
    }

    pub fn platform(&self) -> &PlatformChoice {
        &self.platform
    }

    pub fn state_dirs(&self) -> &StateDirs {
        &self.dirs
    }

    /// [`Runtime::prepare`] without the trait object.
    pub fn prepare_sandbox(&self, spec: SandboxSpec) -> Result<GvisorSandbox, PrepareError> {
        GvisorSandbox::prepare(self, spec)
    }

    /// Removes the containers, bundles and cgroups of sandboxes whose supervisor died.
    pub fn collect_garbage(&self) -> Vec<PathBuf> {
        collect_garbage(
            &self.runsc,
            self.platform.platform,
            &self.dirs,
            &self.cgroup_parent,
        )
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Runtime for GvisorRuntime {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn capabilities(&self) -> LaneCapabilities {
        CAPABILITIES
    }

    fn prepare(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError> {
        Ok(Box::new(GvisorSandbox::prepare(self, spec)?))
    }

    fn prepare_service(&self, mut spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError> {
        spec.service = true;
        Ok(Box::new(GvisorSandbox::prepare(self, spec)?))
    }
}

/// A sandbox of the gVisor lane.
pub struct GvisorSandbox {
    id: String,
    container: String,
    state: SandboxState,
    spec: SandboxSpec,
    bundle: PathBuf,
    /// runsc's `--root`.
    runsc_root: PathBuf,
    invocation: Invocation,
    /// The host overlay of an image root, mounted until `runsc create` has taken its copy.
    overlay: Option<PathBuf>,
    cgroups_path: String,
    cgroups: SandboxCgroups,
    /// `runsc create` was run: the container may exist and must be deleted.
    created: bool,
    running: Option<Running>,
    outcome: Option<Outcome>,
    network: Option<SandboxNetwork>,
    execs: service::Execs,
    paused: bool,
    /// The file-operation agent is mounted (service sandboxes whose supervisor binary could be found).
    agent: bool,
    /// Extra syscalls denied to every command (the spec's `denied_syscalls`), through the mounted filter.
    denied_syscalls: Option<Vec<i64>>,
    /// The spec's working directory, when the root lacks it: `start` refuses, as the process lane does
    /// (runsc would create it).
    missing_workdir: Option<PathBuf>,
    /// Whether the main command is known to be in the root (then one `runsc run --detach` starts the
    /// sandbox), known to be missing (refused without runsc), or unknown (`runsc create` + `start`,
    /// where a start failure does not reach the command's stderr).
    command: CommandCheck,
}

struct Running {
    sandbox: Pid,
    pidfd: OwnedFd,
    gofer: Option<Pid>,
    started: Instant,
    /// Why the sandbox was sent SIGKILL, if it was.
    killed: Option<KillReason>,
    /// The timeout ended it (possibly by SIGTERM within its grace, before any SIGKILL).
    timed_out: bool,
}

fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
    move |source| PrepareError::Host { what, source }
}

impl GvisorSandbox {
    fn prepare(runtime: &GvisorRuntime, mut spec: SandboxSpec) -> Result<GvisorSandbox, PrepareError> {
        spec.validate()?;
        runtime.supports(&spec)?;
        if spec.service && spec.command.is_empty() && !init::AVAILABLE {
            return Err(PrepareError::Host {
                what: "a gVisor service sandbox without a main command needs an x86-64 host",
                source: io::Error::from(io::ErrorKind::Unsupported),
            });
        }
        for m in &mut spec.mounts {
            m.target = normalize_sandbox_path(&m.target);
        }
        let mut mounts = Vec::with_capacity(spec.mounts.len());
        for m in &spec.mounts {
            let source = std::fs::canonicalize(&m.source).map_err(|source| PrepareError::MountSource {
                path: m.source.display().to_string(),
                source,
            })?;
            mounts.push((source, m.target.clone(), m.writable));
        }
        let network_config = match spec.network {
            NetworkMode::Egress(_) => Some(NetworkConfig::from_env()?),
            _ => None,
        };
        // A supervisor killed outright leaves its sandbox running (runsc's processes are not its
        // children): the next sandbox removes it, as `tartarus gc` does.
        runtime.collect_garbage();
        let id =
            tartarus_hostsys::random_hex(6).map_err(host_err("reading random bytes for the sandbox id"))?;
        let owner = std::process::id();
        let container = format!("{CONTAINER_PREFIX}{owner}-{id}");
        let bundle = runtime.dirs.bundles.join(&container);
        let cgroups_path = format!("/{}/gvisor-{owner}-{id}", runtime.cgroup_parent);
        let network_flag = match spec.network {
            NetworkMode::Egress(_) => NetworkFlag::egress_for(&runtime.runsc),
            _ => NetworkFlag::None,
        };
        let invocation = Invocation::new(
            &runtime.runsc,
            &runtime.dirs.root,
            runtime.platform.platform,
            network_flag,
            bundle::writable_root(&spec),
            &bundle.join("runsc.log"),
        );
        // The runsc processes this sandbox starts are reparented to us, so we can wait for the sandbox
        // process and read the container's exit status from it.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(|e| host_err("becoming a child subreaper")(e.into()))?;
        create_private_dir(&bundle).map_err(host_err("creating the sandbox's bundle directory"))?;
        // From here on, dropping the sandbox removes whatever was made.
        let mut sandbox = GvisorSandbox {
            id,
            container,
            state: SandboxState::Prepared,
            cgroups: cgroups_for(&cgroups_path),
            cgroups_path,
            spec,
            bundle,
            runsc_root: runtime.dirs.root.clone(),
            invocation,
            overlay: None,
            created: false,
            running: None,
            outcome: None,
            network: None,
            execs: service::Execs::new().map_err(host_err("creating the exec event descriptor"))?,
            paused: false,
            agent: false,
            denied_syscalls: None,
            missing_workdir: None,
            command: CommandCheck::Unknown,
        };
        sandbox.missing_workdir = missing_workdir(&sandbox.spec, &mounts)?;
        let resolvers = match &sandbox.spec.network {
            NetworkMode::Egress(c) if c.dns => tartarus_network::host_resolvers(),
            _ => Vec::new(),
        };
        let mut host_binds = Vec::new();
        let root = match &sandbox.spec.root {
            RootSpec::HostSystem => {
                let dir = sandbox.bundle.join("rootfs");
                let resolv = match &sandbox.spec.network {
                    NetworkMode::Egress(contract) => tartarus_network::resolv_conf(contract, &resolvers),
                    _ => "# this sandbox has no network\n".to_string(),
                };
                host_binds = bundle::build_host_root(&dir, &sandbox.spec, resolv.as_bytes())
                    .map_err(host_err("building the sandbox's root directory"))?;
                dir
            }
            RootSpec::Directory(path) => sandbox.mount_root(vec![canonical_dir(path)?])?,
            RootSpec::Layers(layers) => {
                let lowers = layers.iter().rev().map(canonical_dir).collect::<Result<_, _>>()?;
                sandbox.mount_root(lowers)?
            }
        };
        let init = match sandbox.spec.command.is_empty() {
            true => {
                let path = sandbox.bundle.join("init");
                write_executable(&path, &init::executable())
                    .map_err(host_err("writing the service sandbox's init"))?;
                Some(path)
            }
            false => None,
        };
        if let (NetworkMode::Egress(contract), Some(config)) = (&sandbox.spec.network, &network_config) {
            tartarus_network::collect_garbage();
            sandbox.network = Some(SandboxNetwork::create(&sandbox.id, contract, config, &resolvers)?);
            if network_flag == NetworkFlag::HostInNamespace {
                // runsc, its gofer and the sentry run inside the sandbox's namespace.
                sandbox.invocation.netns = sandbox
                    .network
                    .as_ref()
                    .and_then(SandboxNetwork::netns)
                    .map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd));
            }
        }
        // File operations and the syscall filter run this very executable inside (static, so any root
        // can run it).
        let this_executable = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .ok()
            .filter(|p| p.is_file());
        let agent = this_executable.clone().filter(|_| sandbox.spec.service);
        sandbox.agent = agent.is_some();
        let denied = crate::process::seccomp::denied_syscall_numbers(&sandbox.spec.denied_syscalls)?;
        let syscall_filter = match denied.is_empty() {
            true => None,
            false => {
                let executable = this_executable.ok_or_else(|| PrepareError::Host {
                    what: "denied_syscalls on the gVisor lane run the supervisor's own executable inside, which could not be found",
                    source: io::Error::from(io::ErrorKind::NotFound),
                })?;
                sandbox.denied_syscalls = Some(denied.clone());
                Some(bundle::SyscallFilter { executable, denied })
            }
        };
        sandbox.command = match sandbox.spec.command.is_empty() {
            // The service-mode init, ours.
            true => CommandCheck::Found,
            false => check_command(&sandbox.spec, &mounts, &root),
        };
        let inputs = BundleInputs {
            root,
            mounts,
            host_binds,
            cgroups_path: sandbox.cgroups_path.clone(),
            // With the host stack inside the namespace, runsc is started in it and must not make another.
            netns: match (&sandbox.network, network_flag) {
                (Some(_), NetworkFlag::Sandbox) => {
                    Some(PathBuf::from("/run/netns").join(tartarus_network::netns_name(&sandbox.id)))
                }
                _ => None,
            },
            share_netns: network_flag == NetworkFlag::HostInNamespace,
            init,
            agent,
            syscall_filter,
        };
        let config = bundle::oci_config(&sandbox.spec, &inputs).map_err(|e| PrepareError::Host {
            what: "building the OCI config",
            source: io::Error::other(e.to_string()),
        })?;
        let json =
            serde_json::to_vec_pretty(&config).map_err(|e| host_err("encoding config.json")(e.into()))?;
        std::fs::write(sandbox.bundle.join("config.json"), json).map_err(host_err("writing config.json"))?;
        Ok(sandbox)
    }

    /// A read-only host overlay of `lowers` (top first) under a skeleton layer of ours holding the mount
    /// points the sandbox needs (scratch, home, the working directory, mount targets), so that runsc never
    /// creates anything in a caller's directory or image layer.
    fn mount_root(&mut self, lowers: Vec<PathBuf>) -> Result<PathBuf, PrepareError> {
        let skeleton = self.bundle.join("skeleton");
        let mut points: Vec<PathBuf> = ["tmp", "home/sandbox", "dev/shm", "proc", "sys", ".tartarus"]
            .iter()
            .map(PathBuf::from)
            .collect();
        points.extend(self.spec.workdir.as_deref().map(normalize_sandbox_path));
        points.extend(self.spec.mounts.iter().map(|m| m.target.clone()));
        for point in points {
            let relative = point.strip_prefix("/").unwrap_or(&point).to_path_buf();
            if lowers.iter().any(|l| l.join(&relative).exists()) {
                continue;
            }
            std::fs::create_dir_all(skeleton.join(&relative))
                .map_err(host_err("creating the root's mount points"))?;
        }
        std::fs::create_dir_all(&skeleton).map_err(host_err("creating the root's mount points"))?;
        let dir = self.bundle.join("rootfs");
        std::fs::create_dir(&dir).map_err(host_err("creating the root mount point"))?;
        let mut all = vec![skeleton];
        all.extend(lowers);
        mount_layers(&dir, &all)?;
        self.overlay = Some(dir.clone());
        Ok(dir)
    }

    /// The runsc container id (`tartarus-<owner pid>-<id>`), for `runsc list`/`ps`.
    pub fn container_id(&self) -> &str {
        &self.container
    }

    /// Packets the egress contract dropped so far; `None` without egress.
    pub fn blocked_packets(&self) -> Option<u64> {
        self.network.as_ref()?.blocked_packets().ok()
    }

    /// Saves the running sandbox's whole state (memory, files in its tmpfs, processes) into `image_dir`
    /// with `runsc checkpoint`; the sandbox ends unless `leave_running`. For the snapshot work: restoring is
    /// `runsc restore --image-path` over a bundle of the same spec.
    pub fn checkpoint(&mut self, image_dir: &Path, leave_running: bool) -> Result<(), RuntimeError> {
        if self.state != SandboxState::Running {
            return Err(RuntimeError::State(self.state));
        }
        std::fs::create_dir_all(image_dir).map_err(|source| RuntimeError::Host {
            what: "creating the checkpoint directory",
            source,
        })?;
        let image = format!("--image-path={}", image_dir.display());
        let mut args = vec!["checkpoint", image.as_str()];
        if leave_running {
            args.push("--leave-running");
        }
        args.push(&self.container);
        self.invocation
            .run(&args, START_TIMEOUT)
            .map(|_| ())
            .map_err(|e| RuntimeError::Host {
                what: "runsc checkpoint failed",
                source: io::Error::other(e.to_string()),
            })
    }

    fn log_error(&self) -> Option<String> {
        let text = runsc::read_small(&self.bundle.join("runsc.log"))?;
        text.split_inclusive('}')
            .filter_map(|entry| serde_json::from_str::<serde_json::Value>(entry.trim()).ok())
            .filter(|v| {
                v["level"] == "error"
                    || v["level"] == "warning" && v["msg"].as_str().is_some_and(|m| m.contains("FATAL"))
            })
            .filter_map(|v| v["msg"].as_str().map(str::to_string))
            .next()
    }

    /// Starts this prepared sandbox from a checkpoint image written by [`GvisorSandbox::checkpoint`] of a
    /// sandbox of the same spec (`runsc restore`): its processes, memory and scratch files continue; its
    /// stdio is `stdio`.
    pub fn start_restored(&mut self, image_dir: &Path, stdio: StdioFds<'_>) -> Result<(), StartError> {
        if !self.state.can_start() {
            return Err(StartError::State(self.state));
        }
        let result = self.start_inner(stdio, Some(image_dir));
        if result.is_err() && self.running.is_some() {
            let _ = self.kill(KillReason::Requested);
            let _ = self.collect();
        }
        result
    }

    fn start_inner(&mut self, stdio: StdioFds<'_>, restore: Option<&Path>) -> Result<(), StartError> {
        let host = |what: &'static str| move |source: io::Error| StartError::Host { what, source };
        if let Some(workdir) = &self.missing_workdir {
            return Err(StartError::Setup {
                stage: format!("entering working directory {}", workdir.display()),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        if restore.is_none() {
            let command = || self.spec.command.first().cloned().unwrap_or_default();
            match self.command {
                CommandCheck::NotFound => return Err(StartError::CommandNotFound(command())),
                CommandCheck::NotExecutable => {
                    return Err(StartError::NotExecutable {
                        command: command(),
                        source: io::Error::from_raw_os_error(libc::EACCES),
                    })
                }
                CommandCheck::Found | CommandCheck::Unknown => {}
            }
        }
        // One runsc process less (create and start in one) when a start failure is not expected.
        let run_at_once = restore.is_none() && self.command == CommandCheck::Found;
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map(Stdio::from);
        let pid_file = self.bundle.join("sandbox.pid");
        let mut args: Vec<std::ffi::OsString> = match restore {
            None if run_at_once => vec!["run".into(), "--detach".into()],
            None => vec!["create".into()],
            Some(image) => vec![
                "restore".into(),
                "--detach".into(),
                format!("--image-path={}", image.display()).into(),
            ],
        };
        args.extend([
            "--bundle".into(),
            self.bundle.clone().into_os_string(),
            "--pid-file".into(),
            pid_file.clone().into_os_string(),
            self.container.clone().into(),
        ]);
        let mut create = self.invocation.command(&args);
        // The container's stdio is runsc create's: the sandbox receives these descriptors.
        create
            .stdin(dup(stdio.stdin).map_err(host("passing stdin"))?)
            .stdout(dup(stdio.stdout).map_err(host("passing stdout"))?)
            .stderr(dup(stdio.stderr).map_err(host("passing stderr"))?);
        self.created = true;
        let started = Instant::now();
        let mut child = create.spawn().map_err(host("running runsc"))?;
        drop(create);
        let status = runsc::wait_bounded(&mut child, started + START_TIMEOUT).map_err(|e| {
            let _ = child.kill();
            let _ = child.wait();
            match e {
                Some(e) => StartError::Host {
                    what: "waiting for runsc to create the sandbox",
                    source: e,
                },
                None => StartError::Host {
                    what: "runsc did not create the sandbox in time",
                    source: io::Error::from(io::ErrorKind::TimedOut),
                },
            }
        })?;
        if !status.success() {
            let message = self
                .log_error()
                .unwrap_or_else(|| format!("runsc {} exited with {status}", args[0].to_string_lossy()));
            if run_at_once {
                return Err(self.classify_start_failure(message));
            }
            return Err(StartError::Host {
                what: "runsc create failed",
                source: io::Error::other(message),
            });
        }
        let pid = runsc::read_small(&pid_file)
            .and_then(|t| t.trim().parse::<i32>().ok())
            .and_then(Pid::from_raw)
            .ok_or_else(|| StartError::Protocol("runsc wrote no sandbox pid".into()))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(|e| host("watching the sandbox process")(e.into()))?;
        self.running = Some(Running {
            sandbox: pid,
            pidfd,
            gofer: self.gofer_pid(),
            started,
            killed: None,
            timed_out: false,
        });
        self.state = SandboxState::Running;
        // The gofer took its own copy of the root when it started.
        self.unmount_overlay();
        if restore.is_some() || run_at_once {
            return Ok(());
        }
        match self.invocation.run(&["start", &self.container], START_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(RunscError::Failed { message, .. }) => Err(self.classify_start_failure(message)),
            Err(e) => Err(StartError::Host {
                what: "runsc start failed",
                source: io::Error::other(e.to_string()),
            }),
        }
    }

    /// `failed to load /x: no such file or directory` is the shell's 127, `permission denied` its 126.
    fn classify_start_failure(&self, message: String) -> StartError {
        let command = self.spec.command.first().cloned().unwrap_or_default();
        if message.contains("failed to load") || message.contains("executable") {
            if message.contains("no such file or directory") || message.contains("not found") {
                return StartError::CommandNotFound(command);
            }
            if message.contains("permission denied") || message.contains("exec format error") {
                return StartError::NotExecutable {
                    command,
                    source: io::Error::from_raw_os_error(libc::EACCES),
                };
            }
        }
        StartError::Host {
            what: "runsc start failed",
            source: io::Error::other(message),
        }
    }

    /// The gofer's pid, from runsc's state file for the container (best effort: without it the gofer is
    /// still reaped once it has exited).
    fn gofer_pid(&self) -> Option<Pid> {
        let state = runsc::read_small(
            &self
                .runsc_root
                .join(format!("{0}_sandbox:{0}.state", self.container)),
        )?;
        let value: serde_json::Value = serde_json::from_str(&state).ok()?;
        Pid::from_raw(value["goferPid"].as_i64()? as i32)
    }

    fn unmount_overlay(&mut self) {
        if let Some(dir) = self.overlay.take() {
            let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
        }
    }

    fn collect(&mut self) -> Result<Outcome, RuntimeError> {
        let running = self.running.as_ref().ok_or(RuntimeError::State(self.state))?;
        let exit = tartarus_hostsys::wait_child(running.sandbox).map_err(|source| RuntimeError::Host {
            what: "waiting for the gVisor sandbox process",
            source,
        })?;
        let wall = running.started.elapsed();
        let termination = match (
            running.killed,
            tartarus_hostsys::ExitStatus::from_raw(exit.status),
        ) {
            (Some(_), _) => Termination::Signaled(libc::SIGKILL),
            (None, tartarus_hostsys::ExitStatus::Signaled(s)) => Termination::Signaled(s),
            // The sandbox process exits with the container's status, a signal as 128 + its number.
            (None, tartarus_hostsys::ExitStatus::Exited(c)) if (129..=128 + 64).contains(&c) => {
                Termination::Signaled(c - 128)
            }
            (None, tartarus_hostsys::ExitStatus::Exited(c)) => Termination::Exited(c),
        };
        let oom = self.cgroups.oom_kills(&HostCgroupFs) > 0;
        let killed = match running.timed_out {
            true => Some(KillReason::Timeout),
            false => running.killed,
        };
        let reason = ExitReason::judge(killed, oom, termination);
        let outcome = Outcome {
            termination,
            reason,
            wall,
            cpu: exit.user_cpu + exit.system_cpu,
            peak_memory_bytes: self
                .cgroups
                .peak_memory(&HostCgroupFs)
                .unwrap_or(exit.max_rss_bytes),
        };
        self.outcome = Some(outcome);
        self.state = SandboxState::Finished;
        self.execs.end_all();
        reap_adopted(&self.execs.pids());
        Ok(outcome)
    }

    fn sandbox_ended(&self, timeout: Option<Duration>) -> Result<bool, RuntimeError> {
        let Some(running) = &self.running else {
            return Ok(true);
        };
        runsc::readable(&running.pidfd, timeout).map_err(|source| RuntimeError::Host {
            what: "polling the gVisor sandbox",
            source,
        })
    }

    /// Ends the gofer if it outlived the sandbox (bounded), and reaps it.
    fn end_gofer(&mut self) {
        let Some(gofer) = self.running.as_mut().and_then(|r| r.gofer.take()) else {
            return;
        };
        if let Ok(pidfd) = rustix::process::pidfd_open(gofer, rustix::process::PidfdFlags::empty()) {
            if !runsc::readable(&pidfd, Some(Duration::from_secs(2))).unwrap_or(true) {
                let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
                let _ = runsc::readable(&pidfd, Some(Duration::from_secs(5)));
            }
            let _ = rustix::process::waitpid(Some(gofer), rustix::process::WaitOptions::NOHANG);
        }
    }
}

fn canonical_dir(path: &PathBuf) -> Result<PathBuf, PrepareError> {
    let rootfs_err = |source: io::Error| PrepareError::Rootfs {
        path: path.display().to_string(),
        source,
    };
    let canonical = std::fs::canonicalize(path).map_err(rootfs_err)?;
    if !std::fs::metadata(&canonical).map_err(rootfs_err)?.is_dir() {
        return Err(rootfs_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    Ok(canonical)
}

/// A read-only overlay of `lowers` (top first) at `dir`; whiteouts and opaque markers as the image store
/// writes them (`user.overlay.*`).
fn mount_layers(dir: &Path, lowers: &[PathBuf]) -> Result<(), PrepareError> {
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let options = std::ffi::CString::new(format!("lowerdir={},userxattr", lowerdir.join(":")))
        .map_err(|_| PrepareError::Spec(crate::spec::SpecError::NulByte { what: "a layer path" }))?;
    rustix::mount::mount(
        "overlay",
        dir,
        "overlay",
        rustix::mount::MountFlags::RDONLY,
        options.as_c_str(),
    )
    .map_err(|e| PrepareError::Host {
        what: "mounting the image layers",
        source: e.into(),
    })
}

fn write_executable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o555)
        .open(path)?;
    file.write_all(bytes)
}

/// Reaps the zombies among our children that we did not spawn ourselves (`keep`): the gofer, the sentry's
/// helpers and the like, reparented to us as their subreaper.
pub(crate) fn reap_adopted(keep: &[i32]) {
    let me = std::process::id();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{me}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            if keep.contains(&pid) || tartarus_hostsys::process_exists(pid) {
                continue;
            }
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
            }
        }
    }
}

impl Sandbox for GvisorSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn blocked_packets(&self) -> Option<u64> {
        GvisorSandbox::blocked_packets(self)
    }

    fn state(&self) -> SandboxState {
        self.state
    }

    fn start(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError> {
        if !self.state.can_start() {
            return Err(StartError::State(self.state));
        }
        let result = self.start_inner(stdio, None);
        if result.is_err() && self.running.is_some() {
            let _ = self.kill(KillReason::Requested);
            let _ = self.collect();
        }
        result
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.running.as_ref().map(|r| r.pidfd.as_fd())
    }

    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError> {
        if let Some(outcome) = self.outcome {
            return Ok(Some(outcome));
        }
        if self.state != SandboxState::Running {
            return Err(RuntimeError::State(self.state));
        }
        if self.sandbox_ended(Some(Duration::ZERO))? {
            return self.collect().map(Some);
        }
        Ok(None)
    }

    fn wait(&mut self) -> Result<Outcome, RuntimeError> {
        if let Some(outcome) = self.outcome {
            return Ok(outcome);
        }
        let running = self.running.as_ref().ok_or(RuntimeError::State(self.state))?;
        let remaining = self
            .spec
            .timeout
            .map(|t| t.saturating_sub(running.started.elapsed()));
        if !self.sandbox_ended(remaining)? {
            self.stop_at_timeout()?;
        }
        self.collect()
    }

    fn kill(&mut self, reason: KillReason) -> Result<(), RuntimeError> {
        let state = self.state;
        let Some(running) = self.running.as_mut() else {
            return Err(RuntimeError::State(state));
        };
        if state != SandboxState::Running {
            return Ok(());
        }
        running.killed.get_or_insert(reason);
        if self.paused {
            // runsc keeps the container `paused` in its state after the sentry dies, and then cannot delete
            // it: resume first (best effort; the SIGKILL below ends the sandbox either way).
            let _ = self.invocation.run(&["resume", &self.container], CONTROL_TIMEOUT);
            self.paused = false;
        }
        let Some(running) = self.running.as_ref() else {
            return Err(RuntimeError::State(state));
        };
        // SIGKILL to the sentry ends every process of the sandbox at once.
        match rustix::process::pidfd_send_signal(&running.pidfd, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(RuntimeError::Host {
                what: "killing the gVisor sandbox",
                source: e.into(),
            }),
        }
    }

    /// SIGTERM to every process of the container (`runsc kill --all`), then SIGKILL if the sandbox has not
    /// ended within the spec's grace, as the process lane does.
    fn stop_at_timeout(&mut self) -> Result<(), RuntimeError> {
        if self.state != SandboxState::Running {
            return self.kill(KillReason::Timeout);
        }
        let grace = self.spec.effective_timeout_grace();
        if let Some(running) = self.running.as_mut() {
            running.timed_out = true;
        }
        let graceful = !grace.is_zero()
            && !self.paused
            && self
                .invocation
                .run(&["kill", "--all", &self.container, "TERM"], CONTROL_TIMEOUT)
                .is_ok();
        if graceful && self.sandbox_ended(Some(grace))? {
            return Ok(());
        }
        self.kill(KillReason::Timeout)
    }

    fn cleanup(&mut self) -> Result<(), RuntimeError> {
        if self.state == SandboxState::CleanedUp {
            return Ok(());
        }
        if self.state == SandboxState::Running {
            self.kill(KillReason::Requested)?;
            self.collect()?;
        }
        self.end_gofer();
        self.execs.end_all();
        reap_adopted(&[]);
        self.running = None;
        let mut failure: Option<RuntimeError> = None;
        if self.created {
            if let Err(e) = self
                .invocation
                .run(&["delete", "--force", &self.container], CONTROL_TIMEOUT)
            {
                let gone = matches!(&e, RunscError::Failed { message, .. } if message.contains("does not exist") || message.contains("not found"));
                if !gone {
                    failure.get_or_insert(RuntimeError::Cleanup {
                        path: format!("runsc container {}", self.container),
                        source: io::Error::other(e.to_string()),
                    });
                }
            }
        }
        self.unmount_overlay();
        if let Some((path, source)) = remove_cgroup_dirs(&self.cgroups_path) {
            failure.get_or_insert(RuntimeError::Cleanup {
                path: path.display().to_string(),
                source,
            });
        }
        if let Err(source) = std::fs::remove_dir_all(&self.bundle) {
            if source.kind() != io::ErrorKind::NotFound {
                failure.get_or_insert(RuntimeError::Cleanup {
                    path: self.bundle.display().to_string(),
                    source,
                });
            }
        }
        if let Some(Err(e)) = self.network.as_mut().map(SandboxNetwork::remove) {
            failure.get_or_insert(RuntimeError::Network(e));
        }
        self.state = SandboxState::CleanedUp;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for GvisorSandbox {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_lane_declares_what_it_cannot_honour() {
        let mut spec = SandboxSpec::new(vec!["/bin/true".into()]);
        assert_eq!(CAPABILITIES.check("gvisor", &spec), Ok(()));
        spec.tty = true;
        assert_eq!(
            CAPABILITIES.check("gvisor", &spec).map_err(|e| e.to_string()),
            Err("the gvisor lane cannot honour a terminal (tty)".into())
        );
        let mut spec = SandboxSpec::new(vec!["/bin/true".into()]);
        spec.network = NetworkMode::HostLoopback;
        assert!(CAPABILITIES.check("gvisor", &spec).is_err());
    }
}
