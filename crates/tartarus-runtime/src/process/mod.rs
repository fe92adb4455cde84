//! The process sandbox: Linux namespaces (user, pid, mount, ipc, uts, net, cgroup), a fresh root with
//! `pivot_root`, seccomp-BPF, Landlock, no capabilities, rlimits and cgroup limits.
//!
//! Process tree: supervisor (the caller) → init (pid 1 of the sandbox: builds the root, reaps, reports the
//! command's status) → the command. Init has a parent-death signal, and the pid namespace dies with it, so
//! killing init — or the supervisor — kills the whole tree. Nothing is written to the host's disk: the root
//! and scratch areas are tmpfs mounts inside the sandbox's own mount namespace, gone with it. Cgroups (for
//! every sandbox of a root supervisor, which enforces the default limits; for a rootless one only when
//! limits are asked for) are removed by `cleanup`, or by `gc` after a supervisor crash. So is the
//! network of an egress sandbox (`tartarus-network`): its namespace is created in `prepare`, and `start`
//! clones the sandbox inside it.

pub(crate) mod cgroup;
pub(crate) mod child;
pub(crate) mod file_ops;
mod landlock;
mod protocol;
pub(crate) mod rootfs;
pub(crate) mod seccomp;
mod service;

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, Signal};
use rustix::thread::LinkNameSpaceType;
use tartarus_network::{NetworkConfig, NetworkError, SandboxNetwork};

use self::cgroup::SandboxCgroups;
pub use self::cgroup::{CgroupFs, CgroupLayout, HostCgroupFs};
use self::child::{ChildPlan, ExecPlan, IdMode};
use self::protocol::{read_report, Report, STATUS_LEN};
use self::rootfs::{PreparedMount, RootInputs};
use self::seccomp::CompiledFilters;
pub use self::seccomp::{
    deniable_syscall, ALLOWED_SOCKET_FAMILIES, DENIED_SYSCALLS, EXTRA_DENIABLE_SYSCALLS,
};
use self::service::ExecClient;
use crate::capabilities::LaneCapabilities;
use crate::files::FileOp;
use crate::sandbox::{
    ExitReason, KillReason, Outcome, PrepareError, Runtime, RuntimeError, Sandbox, SandboxState, StartError,
    StdioFds, Termination,
};
pub use crate::service::{ExecError, ExecRequest, LimitHits};
use crate::service::{ExecId, ServiceError, ServiceSandbox, Usage};
use crate::spec::{normalize_sandbox_path, NetworkMode, RootSpec, SandboxSpec, SandboxUser, SANDBOX_UID};

/// First host id of the range the sandbox's ids map to when the supervisor is root: sandbox root is host
/// uid 100000000, the sandbox user host uid 100001000. Nothing on the host is owned by these ids.
pub const PRIVILEGED_HOST_ID_BASE: u32 = 100_000_000;
const MAPPED_RANGE: u32 = 65_536;

/// Settings of the process runtime that are not per-sandbox.
#[derive(Debug, Clone)]
pub struct ProcessRuntimeConfig {
    /// Name of the cgroup (under each hierarchy) that holds sandbox cgroups.
    pub cgroup_parent: String,
}

impl Default for ProcessRuntimeConfig {
    fn default() -> Self {
        ProcessRuntimeConfig {
            cgroup_parent: "tartarus".to_string(),
        }
    }
}

/// The Linux process-isolation runtime.
pub struct ProcessRuntime {
    config: ProcessRuntimeConfig,
    cgroup_fs: Box<dyn CgroupFs + Send + Sync>,
}

impl ProcessRuntime {
    pub fn new(config: ProcessRuntimeConfig) -> Self {
        ProcessRuntime {
            config,
            cgroup_fs: Box::new(HostCgroupFs),
        }
    }

    /// Removes cgroups, and egress networks in this network namespace, left behind by supervisors that
    /// died (e.g. `kill -9` of `tartarus run`).
    pub fn collect_garbage(&self) -> Vec<PathBuf> {
        let layout = CgroupLayout::detect(self.cgroup_fs.as_ref());
        let mut removed =
            cgroup::collect_garbage(self.cgroup_fs.as_ref(), &layout, &self.config.cgroup_parent);
        removed.extend(tartarus_network::collect_garbage());
        removed
    }
}

impl ProcessRuntime {
    /// [`Runtime::prepare`] without the trait object.
    pub fn prepare_sandbox(&self, spec: SandboxSpec) -> Result<ProcessSandbox, PrepareError> {
        ProcessSandbox::prepare(self, spec)
    }
}

/// Every knob, but not pausing to disk: a process's memory cannot be saved without a checkpointer that
/// works inside its namespaces (docs/snapshots.md says what was found).
pub const CAPABILITIES: LaneCapabilities = LaneCapabilities {
    pause_to_disk: false,
    ..LaneCapabilities::ALL
};

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> LaneCapabilities {
        CAPABILITIES
    }

    fn prepare(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError> {
        Ok(Box::new(ProcessSandbox::prepare(self, spec)?))
    }

    fn prepare_service(&self, mut spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError> {
        spec.service = true;
        Ok(Box::new(ProcessSandbox::prepare(self, spec)?))
    }
}

/// A sandbox of the process runtime.
pub struct ProcessSandbox {
    id: String,
    state: SandboxState,
    spec: SandboxSpec,
    root: RootInputs,
    exec: Option<ExecPlan>,
    filters: CompiledFilters,
    workdir: CString,
    writable_dirs: Vec<PathBuf>,
    ids: IdMode,
    cgroups: SandboxCgroups,
    cgroup_fs: Box<dyn CgroupFs>,
    last_capability: u32,
    running: Option<Running>,
    outcome: Option<Outcome>,
    exec_client: Option<ExecClient>,
    paused: bool,
    /// The namespace, veth and rules of an egress sandbox.
    network: Option<SandboxNetwork>,
}

/// Handles of a started sandbox.
struct Running {
    init: Pid,
    pidfd: OwnedFd,
    /// Held open for the sandbox's life: init treats its closing as the supervisor's death.
    _sync_write: OwnedFd,
    status_read: OwnedFd,
    started: Instant,
    killed: Option<KillReason>,
}

fn host_err(what: &'static str) -> impl FnOnce(io::Error) -> PrepareError {
    move |source| PrepareError::Host { what, source }
}

/// The id of one sandbox instance: names its host resources (cgroups, network namespace, veth), so it is
/// short enough for interface names. It is not the API's sandbox id (`sb_…`), which the server makes.
fn new_instance_id() -> Result<String, PrepareError> {
    tartarus_hostsys::random_hex(6).map_err(host_err("reading random bytes for the sandbox id"))
}

fn to_cstring(text: impl Into<Vec<u8>>) -> Result<CString, PrepareError> {
    CString::new(text)
        .map_err(|_| PrepareError::Spec(crate::spec::SpecError::NulByte { what: "an argument" }))
}

impl ProcessSandbox {
    fn prepare(runtime: &ProcessRuntime, mut spec: SandboxSpec) -> Result<Self, PrepareError> {
        spec.validate()?;
        runtime.supports(&spec)?;
        for m in &mut spec.mounts {
            m.target = normalize_sandbox_path(&m.target);
        }
        let id = new_instance_id()?;
        let euid = rustix::process::geteuid().as_raw();
        let ids = if euid == 0 {
            IdMode::Privileged {
                host_base: PRIVILEGED_HOST_ID_BASE,
            }
        } else {
            IdMode::Unprivileged {
                uid: euid,
                gid: rustix::process::getegid().as_raw(),
            }
        };
        // Egress needs the host's root: refuse before creating anything.
        if matches!(spec.network, NetworkMode::Egress(_)) && euid != 0 {
            return Err(NetworkError::NeedsRoot.into());
        }
        let network_config = match spec.network {
            NetworkMode::Egress(_) => Some(NetworkConfig::from_env()?),
            _ => None,
        };
        let resolvers = match &spec.network {
            NetworkMode::Egress(c) if c.dns => tartarus_network::host_resolvers(),
            _ => Vec::new(),
        };
        let root = root_inputs(&spec, ids, &resolvers)?;
        let exec = match spec.command.is_empty() {
            true => None,
            false => Some(ExecPlan::build(&spec.command, &spec.env, &spec.hostname)?),
        };
        let extra = seccomp::denied_syscall_numbers(&spec.denied_syscalls)?;
        let filters =
            CompiledFilters::build_with(&extra).map_err(|e| PrepareError::Seccomp(e.to_string()))?;
        let workdir = spec
            .workdir
            .as_deref()
            .map(normalize_sandbox_path)
            .unwrap_or_else(|| spec.home().into());
        let workdir = to_cstring(workdir.into_os_string().into_encoded_bytes())?;
        let mut writable_dirs: Vec<PathBuf> = match spec.root {
            // A policy's narrower set (quarantine: /tmp only).
            _ if !spec.writable_paths.is_empty() => spec.writable_paths.clone(),
            // The whole root is an ephemeral overlay upper in scratch.
            RootSpec::Layers(_) => vec!["/".into()],
            _ => vec!["/tmp".into(), spec.home().into(), "/dev/shm".into()],
        };
        writable_dirs.extend(
            spec.mounts
                .iter()
                .filter(|m| m.writable)
                .map(|m| m.target.clone()),
        );
        let cgroup_fs: Box<dyn CgroupFs> = Box::new(HostCgroupFs);
        // Service sandboxes can be paused, which needs a freezer cgroup (root only: rootless hosts rarely
        // delegate one; pause then reports why it is unavailable).
        let freezable = spec.service && euid == 0;
        let limits = spec.applied_limits();
        // A root supervisor enforces the default limits too, or refuses to start the sandbox; a rootless one
        // cannot create cgroups on almost any host, so it enforces what was asked for (and the pids default
        // through RLIMIT_NPROC, in the sandbox).
        let wanted = cgroup::wanted(&limits, euid == 0, freezable);
        let mut cgroups = if wanted.is_empty() {
            SandboxCgroups::default()
        } else {
            let layout = CgroupLayout::detect(cgroup_fs.as_ref());
            cgroup::collect_garbage(cgroup_fs.as_ref(), &layout, &runtime.config.cgroup_parent);
            let name = cgroup::cgroup_name(std::process::id(), &id);
            cgroup::create(
                cgroup_fs.as_ref(),
                &layout,
                &runtime.config.cgroup_parent,
                &name,
                &limits,
                &wanted,
            )?
        };
        // Last, so nothing after it can fail and leave the network behind.
        let network = match (&spec.network, &network_config) {
            (NetworkMode::Egress(contract), Some(config)) => {
                tartarus_network::collect_garbage();
                match SandboxNetwork::create(&id, contract, config, &resolvers) {
                    Ok(network) => Some(network),
                    Err(e) => {
                        let _ = cgroups.remove(cgroup_fs.as_ref());
                        return Err(e.into());
                    }
                }
            }
            _ => None,
        };
        Ok(ProcessSandbox {
            id,
            state: SandboxState::Prepared,
            spec,
            root,
            exec,
            filters,
            workdir,
            writable_dirs,
            ids,
            cgroups,
            cgroup_fs,
            last_capability: tartarus_hostsys::last_capability(),
            running: None,
            outcome: None,
            exec_client: None,
            paused: false,
            network,
        })
    }

    fn start_inner(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError> {
        let host = |what: &'static str| move |source: io::Error| StartError::Host { what, source };
        ensure_single_threaded().map_err(host(
            "the process runtime must start sandboxes from a single-threaded process",
        ))?;
        let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(io::Error::from);
        let (sync_read, sync_write) = pipe().map_err(host("creating the sync pipe"))?;
        let (start_read, start_write) = pipe().map_err(host("creating the start pipe"))?;
        let (status_read, status_write) = pipe().map_err(host("creating the status pipe"))?;
        let control = match self.spec.service {
            true => Some(
                rustix::net::socketpair(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::SEQPACKET,
                    rustix::net::SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| StartError::Host {
                    what: "creating the control socket",
                    source: e.into(),
                })?,
            ),
            false => None,
        };
        let mut supervisor_fds = vec![
            sync_write.as_raw_fd(),
            start_read.as_raw_fd(),
            status_read.as_raw_fd(),
        ];
        supervisor_fds.extend(control.as_ref().map(|(ours, _)| ours.as_raw_fd()));
        // The network and cgroup namespaces are created later, in the child (see child.rs).
        let namespaces = tartarus_hostsys::clone_flags::NEWUSER
            | tartarus_hostsys::clone_flags::NEWNS
            | tartarus_hostsys::clone_flags::NEWPID
            | tartarus_hostsys::clone_flags::NEWIPC
            | tartarus_hostsys::clone_flags::NEWUTS;
        let plan = ChildPlan {
            sync_read: sync_read.as_raw_fd(),
            start_write: start_write.as_raw_fd(),
            status_write: status_write.as_raw_fd(),
            supervisor_fds: &supervisor_fds,
            control: control.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
            ids: self.ids,
            user: command_user(&self.spec, self.ids),
            root: &self.root,
            hostname: &self.spec.hostname,
            network: &self.spec.network,
            exec: self.exec.as_ref(),
            filters: &self.filters,
            stdio,
            tty: self.spec.tty,
            workdir: &self.workdir,
            writable_dirs: &self.writable_dirs,
            process_limits: self.spec.process_limits,
            max_processes: self.spec.applied_limits().pids.value(),
            last_capability: self.last_capability,
            early_fork: self.cgroups.dirs.is_empty() && !self.spec.service,
            base_env: &self.spec.env,
        };
        let started = Instant::now();
        // An egress sandbox is cloned inside its prepared network namespace: this (single) thread enters
        // it just for the clone and returns to its own at once.
        let home_netns = match self.network.as_ref().and_then(SandboxNetwork::netns) {
            Some(netns) => {
                Some(enter_netns(netns).map_err(host("entering the sandbox's network namespace"))?)
            }
            None => None,
        };
        // SAFETY: ensure_single_threaded() checked the precondition; the child runs `child::run`, which
        // never returns.
        let forked = match unsafe { tartarus_hostsys::clone_process(namespaces) } {
            Ok(tartarus_hostsys::Forked::Child) => child::run(&plan),
            Ok(tartarus_hostsys::Forked::Parent { pid, pidfd }) => Ok((pid, pidfd)),
            Err(e) => Err(e),
        };
        if let Some(home) = &home_netns {
            rustix::thread::move_into_link_name_space(home.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| StartError::Host {
                    what: "returning to the supervisor's network namespace",
                    source: e.into(),
                })?;
        }
        let (pid, pidfd) = forked.map_err(StartError::from_clone)?;
        drop((sync_read, start_write, status_write));
        self.exec_client = control.map(|(ours, theirs)| {
            drop(theirs);
            ExecClient::new(ours)
        });
        self.running = Some(Running {
            init: pid,
            pidfd,
            _sync_write: sync_write,
            status_read,
            started,
            killed: None,
        });
        self.state = SandboxState::Running;
        let running = self.running.as_ref().expect("just set");

        write_id_maps(pid, self.ids).map_err(StartError::IdMap)?;
        self.cgroups
            .add_process(self.cgroup_fs.as_ref(), pid.as_raw_nonzero().get())
            .map_err(host("moving the sandbox into its cgroups"))?;
        tartarus_hostsys::write_all(&running._sync_write, b"g").map_err(host("releasing the sandbox"))?;

        match read_report(&start_read).map_err(host("reading the sandbox start report"))? {
            None => Ok(()),
            Some(Report::NotFound) => Err(StartError::CommandNotFound(self.command_name())),
            Some(Report::NotExecutable { errno }) => Err(StartError::NotExecutable {
                command: self.command_name(),
                source: io::Error::from_raw_os_error(errno),
            }),
            Some(Report::SetupFailed { errno, stage }) => Err(StartError::from_setup(stage, errno)),
        }
    }

    /// SIGTERM to every process in the sandbox's cgroup but init, the first step of a graceful stop.
    fn terminate_all_but_init(&self) -> Result<(), ServiceError> {
        if self.cgroups.dirs.is_empty() {
            return Err(ServiceError::Unsupported {
                operation: "terminate",
                why: "this sandbox has no cgroup to find its processes by",
            });
        }
        let others = self.processes_but_init().map_err(|source| ServiceError::Host {
            what: "listing the sandbox's processes",
            source,
        })?;
        for pid in others {
            if let Some(pid) = Pid::from_raw(pid) {
                // Gone already is fine; the kill after the grace period catches anything left.
                let _ = rustix::process::kill_process(pid, Signal::TERM);
            }
        }
        Ok(())
    }

    fn command_name(&self) -> String {
        self.exec
            .as_ref()
            .map(|e| e.display_name.clone())
            .unwrap_or_default()
    }

    fn collect(&mut self) -> Result<Outcome, RuntimeError> {
        let running = self.running.as_ref().ok_or(RuntimeError::State(self.state))?;
        let mut record = [0u8; STATUS_LEN];
        let got = read_full(&running.status_read, &mut record).map_err(|source| RuntimeError::Host {
            what: "reading the sandbox status",
            source,
        })?;
        let exit = tartarus_hostsys::wait_child(running.init).map_err(|source| RuntimeError::Host {
            what: "waiting for the sandbox init",
            source,
        })?;
        let wall = running.started.elapsed();
        let termination = if got == STATUS_LEN {
            match child::decode_status(record) {
                tartarus_hostsys::ExitStatus::Exited(c) => Termination::Exited(c),
                tartarus_hostsys::ExitStatus::Signaled(s) => Termination::Signaled(s),
            }
        } else {
            // Init itself died (killed by us, the OOM killer, or the supervisor's death): the command with it.
            Termination::Signaled(libc::SIGKILL)
        };
        let oom = self.cgroups.oom_kills(self.cgroup_fs.as_ref()) > 0;
        let reason = match (running.killed, oom, termination) {
            (Some(KillReason::Timeout), _, _) => ExitReason::Timeout,
            (_, true, Termination::Signaled(_)) => ExitReason::Oom,
            (Some(KillReason::Requested), _, _) => ExitReason::Killed,
            (None, _, Termination::Signaled(_)) => ExitReason::Killed,
            (None, _, Termination::Exited(_)) => ExitReason::Exited,
        };
        let peak_memory_bytes = self
            .cgroups
            .peak_memory(self.cgroup_fs.as_ref())
            .unwrap_or(exit.max_rss_bytes);
        let outcome = Outcome {
            termination,
            reason,
            wall,
            cpu: exit.user_cpu + exit.system_cpu,
            peak_memory_bytes,
        };
        self.outcome = Some(outcome);
        self.state = SandboxState::Finished;
        Ok(outcome)
    }

    fn status_ready(&self, timeout: Option<Duration>) -> Result<bool, RuntimeError> {
        let Some(running) = &self.running else {
            return Ok(true);
        };
        let mut fds = [rustix::event::PollFd::new(
            &running.status_read,
            rustix::event::PollFlags::IN,
        )];
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: t.subsec_nanos() as i64,
        });
        loop {
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(n) => return Ok(n > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(RuntimeError::Host {
                        what: "polling the sandbox",
                        source: e.into(),
                    })
                }
            }
        }
    }
}

impl ProcessSandbox {
    fn exec_client(&mut self) -> Result<&mut ExecClient, ExecError> {
        if self.state != SandboxState::Running {
            return Err(ExecError::NotRunning);
        }
        self.exec_client.as_mut().ok_or(ExecError::NotService)
    }

    /// The pids in the sandbox's first cgroup other than init's: every process it runs but init.
    fn processes_but_init(&self) -> io::Result<Vec<i32>> {
        let init = self.running.as_ref().map(|r| r.init.as_raw_nonzero().get());
        let Some(procs_path) = self.cgroups.dirs.first().map(|d| d.path.join("cgroup.procs")) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the sandbox has no cgroup",
            ));
        };
        let procs = self.cgroup_fs.read(&procs_path)?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter(|pid| Some(*pid) != init)
            .collect())
    }

    fn require_running(&self) -> Result<(), ServiceError> {
        match self.state {
            SandboxState::Running => Ok(()),
            state => Err(ServiceError::State(state)),
        }
    }

    /// Packets the egress contract dropped so far; `None` without egress (or once cleaned up). Also for
    /// sandboxes that are not service sandboxes (`tartarus run` reports it).
    pub fn blocked_packets(&self) -> Option<u64> {
        let network = self.network.as_ref()?;
        network.blocked_packets().ok()
    }
}

impl ServiceSandbox for ProcessSandbox {
    fn exec(&mut self, request: &ExecRequest, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        self.exec_client()?.start(request, stdio)
    }

    fn start_file_op(&mut self, op: &FileOp, stdio: StdioFds<'_>) -> Result<ExecId, ExecError> {
        self.exec_client()?.start_file_op(op, stdio)
    }

    fn exec_event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exec_client.as_ref().map(|c| c.socket())
    }

    fn wait_exec(&mut self, id: ExecId, timeout: Option<Duration>) -> Result<Option<Termination>, ExecError> {
        self.exec_client
            .as_mut()
            .ok_or(ExecError::NotService)?
            .wait(id, timeout)
    }

    fn kill_exec(&mut self, id: ExecId) -> Result<(), ExecError> {
        self.exec_client.as_mut().ok_or(ExecError::NotService)?.kill(id)
    }

    /// Sends SIGTERM to every process in the sandbox's cgroup but init (pid 1 of the sandbox would ignore
    /// it, and its exit would end the sandbox at once instead of letting the command finish).
    fn terminate(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            // Frozen tasks only see the signal once thawed (a paused sandbox has cgroups: the freezer).
            self.resume()?;
        }
        self.terminate_all_but_init()
    }

    fn terminated(&self) -> bool {
        // A process that exited has left its cgroup (even before it is reaped).
        self.running.is_some() && self.processes_but_init().is_ok_and(|others| others.is_empty())
    }

    /// Freezes every process through the freezer cgroup, which service sandboxes started by root get.
    fn pause(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if !self.cgroups.can_freeze() {
            return Err(ServiceError::Unsupported {
                operation: "pause",
                why: "this sandbox has no freezer cgroup (service sandboxes started by root get one)",
            });
        }
        self.cgroups
            .freeze_and_wait(self.cgroup_fs.as_ref(), true)
            .map_err(|source| ServiceError::Host {
                what: "freezing the sandbox",
                source,
            })?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), ServiceError> {
        self.require_running()?;
        if self.paused {
            self.cgroups
                .freeze_and_wait(self.cgroup_fs.as_ref(), false)
                .map_err(|source| ServiceError::Host {
                    what: "thawing the sandbox",
                    source,
                })?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    /// Limit hits come from the cgroups.
    fn usage(&self) -> Usage {
        Usage {
            blocked_packets: self.blocked_packets(),
            limit_hits: LimitHits {
                oom_kills: self.cgroups.oom_kills(self.cgroup_fs.as_ref()),
                pids_limit_hits: self.cgroups.pids_limit_hits(self.cgroup_fs.as_ref()),
            },
            cpu_usec: self.cgroups.cpu_usage_usec(self.cgroup_fs.as_ref()),
            memory_bytes: self.cgroups.memory_current(self.cgroup_fs.as_ref()),
        }
    }

    /// Through the CPU cgroup; false when the sandbox has none.
    fn throttle_cpu(&mut self, cpus: f64) -> Result<bool, ServiceError> {
        self.cgroups
            .set_cpu_quota(self.cgroup_fs.as_ref(), cpus)
            .map_err(|source| ServiceError::Host {
                what: "throttling the CPU quota",
                source,
            })
    }

    fn isolate_network(&mut self) -> Result<bool, ServiceError> {
        match &self.network {
            Some(network) => network.isolate().map(|()| true).map_err(ServiceError::Network),
            None => Ok(false),
        }
    }

    fn connect_port(&mut self, port: u16) -> Result<OwnedFd, ServiceError> {
        self.require_running()?;
        let connect_error = |source| ServiceError::Connect { port, source };
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if self.spec.network == NetworkMode::HostLoopback {
            let stream = std::net::TcpStream::connect_timeout(&loopback, PORT_CONNECT_TIMEOUT)
                .map_err(connect_error)?;
            return Ok(stream.into());
        }
        let init = self.running.as_ref().ok_or(ServiceError::State(self.state))?.init;
        // The sandbox's init lives in the sandbox's network namespace for the sandbox's whole life (it is
        // not reaped before the sandbox ends), so its namespace is the sandbox's.
        let netns = rustix::fs::open(
            format!("/proc/{}/ns/net", init.as_raw_nonzero()),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| connect_error(e.into()))?;
        // A socket stays in the namespace it was created in: a short-lived thread enters the namespace,
        // creates and connects it, and ends (the shim's own threads never change namespace).
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    rustix::thread::move_into_link_name_space(
                        netns.as_fd(),
                        Some(LinkNameSpaceType::Network),
                    )?;
                    std::net::TcpStream::connect_timeout(&loopback, PORT_CONNECT_TIMEOUT)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the connecting thread panicked")))
        })
        .map(OwnedFd::from)
        .map_err(connect_error)
    }
}

/// Longest wait for a connection to a port inside a sandbox (on loopback: only a frozen or overloaded
/// sandbox makes it wait at all).
const PORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Sandbox for ProcessSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn blocked_packets(&self) -> Option<u64> {
        ProcessSandbox::blocked_packets(self)
    }

    fn state(&self) -> SandboxState {
        self.state
    }

    fn start(&mut self, stdio: StdioFds<'_>) -> Result<(), StartError> {
        if !self.state.can_start() {
            return Err(StartError::State(self.state));
        }
        let result = self.start_inner(stdio);
        if result.is_err() && self.running.is_some() {
            // Failed after the clone: make sure init is gone and reaped before reporting.
            let _ = self.kill(KillReason::Requested);
            let _ = self.collect();
        }
        result
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.running.as_ref().map(|r| r.status_read.as_fd())
    }

    fn try_wait(&mut self) -> Result<Option<Outcome>, RuntimeError> {
        if let Some(outcome) = self.outcome {
            return Ok(Some(outcome));
        }
        if self.state != SandboxState::Running {
            return Err(RuntimeError::State(self.state));
        }
        if self.status_ready(Some(Duration::ZERO))? {
            return self.collect().map(Some);
        }
        Ok(None)
    }

    fn wait(&mut self) -> Result<Outcome, RuntimeError> {
        if let Some(outcome) = self.outcome {
            return Ok(outcome);
        }
        let running = self.running.as_ref().ok_or(RuntimeError::State(self.state))?;
        if let Some(limit) = self.spec.timeout {
            let remaining = limit.saturating_sub(running.started.elapsed());
            if !self.status_ready(Some(remaining))? {
                self.stop_at_timeout()?;
            }
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
            // A task frozen by the v1 freezer does not die until thawed.
            let _ = self.cgroups.freeze(self.cgroup_fs.as_ref(), false);
            self.paused = false;
        }
        let running = self.running.as_mut().ok_or(RuntimeError::State(state))?;
        match rustix::process::pidfd_send_signal(&running.pidfd, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(RuntimeError::Host {
                what: "killing the sandbox",
                source: e.into(),
            }),
        }
    }

    /// SIGTERM to the command's processes, then, after the spec's grace period, SIGKILL to what is left.
    /// The outcome's reason is `timeout` either way; its signal says which ended it. A sandbox without
    /// cgroups (rootless), or with no grace, is killed at once.
    fn stop_at_timeout(&mut self) -> Result<(), RuntimeError> {
        let grace = self.spec.effective_timeout_grace();
        if let Some(running) = self.running.as_mut() {
            running.killed.get_or_insert(KillReason::Timeout);
        }
        let graceful = !grace.is_zero() && !self.paused && self.terminate_all_but_init().is_ok();
        if graceful && self.status_ready(Some(grace))? {
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
        self.running = None;
        let failures = self.cgroups.remove(self.cgroup_fs.as_ref());
        let network = self.network.as_mut().map(SandboxNetwork::remove);
        self.state = SandboxState::CleanedUp;
        if let Some((path, source)) = failures.into_iter().next() {
            return Err(RuntimeError::Cleanup {
                path: path.display().to_string(),
                source,
            });
        }
        if let Some(Err(e)) = network {
            return Err(RuntimeError::Network(e));
        }
        Ok(())
    }
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// Moves this thread into `netns`; returns its previous network namespace, to return to.
fn enter_netns(netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let home = rustix::fs::open(
        "/proc/thread-self/ns/net",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::thread::move_into_link_name_space(netns, Some(LinkNameSpaceType::Network))?;
    Ok(home)
}

fn ensure_single_threaded() -> io::Result<()> {
    // /proc/self/task has one entry per thread; "." and ".." make a single-threaded count of 3 links.
    let stat = rustix::fs::stat("/proc/self/task")?;
    if stat.st_nlink > 3 {
        return Err(io::Error::other(format!(
            "{} threads are running",
            stat.st_nlink - 2
        )));
    }
    Ok(())
}

fn write_id_maps(pid: Pid, ids: IdMode) -> io::Result<()> {
    let proc = format!("/proc/{}", pid.as_raw_nonzero());
    let write = |file: &str, content: &str| -> io::Result<()> {
        let fd = rustix::fs::open(
            format!("{proc}/{file}").as_str(),
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        tartarus_hostsys::write_all(&fd, content.as_bytes())
    };
    match ids {
        IdMode::Privileged { host_base } => {
            let map = format!("0 {host_base} {MAPPED_RANGE}\n");
            write("uid_map", &map)?;
            write("gid_map", &map)?;
        }
        IdMode::Unprivileged { uid, gid } => {
            write("setgroups", "deny")?;
            write("uid_map", &format!("{SANDBOX_UID} {uid} 1\n"))?;
            write("gid_map", &format!("{SANDBOX_UID} {gid} 1\n"))?;
        }
    }
    Ok(())
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::io::read(fd, &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

/// The command's user: the spec's, when ids beyond the sandbox user are mapped.
fn command_user(spec: &SandboxSpec, ids: IdMode) -> SandboxUser {
    let sandbox_user = SandboxUser {
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
    };
    match ids {
        IdMode::Privileged { .. } => spec.user.unwrap_or(sandbox_user),
        IdMode::Unprivileged { .. } => sandbox_user,
    }
}

fn root_inputs(spec: &SandboxSpec, ids: IdMode, resolvers: &[IpAddr]) -> Result<RootInputs, PrepareError> {
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let source_err = |source: io::Error| PrepareError::MountSource {
            path: m.source.display().to_string(),
            source,
        };
        let source = std::fs::canonicalize(&m.source).map_err(source_err)?;
        let source_is_dir = std::fs::metadata(&source).map_err(source_err)?.is_dir();
        let target = m.target.strip_prefix("/").unwrap_or(&m.target).to_path_buf();
        mounts.push(PreparedMount {
            source,
            source_is_dir,
            target,
            writable: m.writable,
        });
    }
    let resolv: Vec<u8> = match &spec.network {
        NetworkMode::None => b"# this sandbox has no network\n".to_vec(),
        NetworkMode::HostLoopback => std::fs::read("/etc/resolv.conf").unwrap_or_default(),
        NetworkMode::Egress(contract) => tartarus_network::resolv_conf(contract, resolvers).into_bytes(),
    };
    let canonical_dir = |path: &PathBuf| -> Result<PathBuf, PrepareError> {
        let rootfs_err = |source: io::Error| PrepareError::Rootfs {
            path: path.display().to_string(),
            source,
        };
        let canonical = std::fs::canonicalize(path).map_err(rootfs_err)?;
        if !std::fs::metadata(&canonical).map_err(rootfs_err)?.is_dir() {
            return Err(rootfs_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        Ok(canonical)
    };
    let (lowers, host_entries, shared_etc, etc_files) = match &spec.root {
        RootSpec::HostSystem => (
            Vec::new(),
            rootfs::host_entries(),
            rootfs::SHARED_ETC.to_vec(),
            rootfs::generated_etc(&spec.hostname, &resolv, spec.user_name(), &spec.home()),
        ),
        RootSpec::Directory(path) => (vec![canonical_dir(path)?], Vec::new(), Vec::new(), Vec::new()),
        RootSpec::Layers(layers) => {
            let top_first = layers.iter().rev().map(canonical_dir).collect::<Result<_, _>>()?;
            (top_first, Vec::new(), Vec::new(), Vec::new())
        }
    };
    Ok(RootInputs {
        root: spec.root.clone(),
        lowers,
        writable_root: matches!(spec.root, RootSpec::Layers(_)),
        home_owner: command_user(spec, ids).uid,
        home: spec.home().into(),
        create_workdir: spec.workdir.as_deref().map(|w| {
            normalize_sandbox_path(w)
                .strip_prefix("/")
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }),
        host_entries,
        shared_etc,
        etc_files,
        mounts,
        scratch_bytes: spec.scratch_bytes,
    })
}
