//! cgroup placement and limits for v2, v1 and hybrid hosts.
//!
//! Each limit goes to the controller where it can be enforced: the v2 tree when it offers the controller,
//! else the v1 hierarchy of that controller. A limit with neither fails `prepare` with a message naming
//! what is missing; a sandbox never runs without a limit that was asked for, nor (with a root supervisor)
//! without a default one ([`crate::spec::DEFAULT_PIDS`] and the others): lifting a default takes an
//! explicit `unlimited`. Directory names carry the creating process's pid so `gc` can remove leftovers of a
//! crashed supervisor.
//!
//! Charging: the kernel charges a page to the memory cgroup of the task that allocates it, tmpfs pages
//! included. Init is moved into the sandbox's cgroups before it is released to mount anything, and every
//! process of the sandbox descends from it, so the scratch tmpfs (`/tmp`, home, `/dev/shm`) counts against
//! the sandbox's own memory limit, never the supervisor's.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sandbox::PrepareError;
use crate::spec::{Applied, AppliedLimits};

/// The filesystem operations cgroup management needs; [`HostCgroupFs`] is the real one.
pub trait CgroupFs {
    fn is_cgroup2_mount(&self, path: &Path) -> bool;
    fn exists(&self, path: &Path) -> bool;
    fn read(&self, path: &Path) -> io::Result<String>;
    fn write(&self, path: &Path, data: &str) -> io::Result<()>;
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Reads `path` until `done` holds for its content, at most `timeout`; whether it did. The host waits
    /// for the kernel's change notification where the file has one (`cgroup.events`).
    fn wait_until(&self, path: &Path, done: &dyn Fn(&str) -> bool, timeout: Duration) -> io::Result<bool>;
}

/// The host's cgroup filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostCgroupFs;

impl CgroupFs for HostCgroupFs {
    fn is_cgroup2_mount(&self, path: &Path) -> bool {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        tartarus_hostsys::filesystem_type(&c).is_ok_and(|t| t == tartarus_hostsys::CGROUP2_MAGIC)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn write(&self, path: &Path, data: &str) -> io::Result<()> {
        // cgroup files take one write per value; OpenOptions avoids truncation semantics they reject.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(data.as_bytes())
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }
    fn wait_until(&self, path: &Path, done: &dyn Fn(&str) -> bool, timeout: Duration) -> io::Result<bool> {
        use std::io::{Read, Seek};
        let deadline = Instant::now() + timeout;
        // Opened before the first read: a change after the open wakes the poll, so none is missed.
        let mut file = std::fs::File::open(path)?;
        let mut text = String::new();
        loop {
            text.clear();
            file.rewind()?;
            file.read_to_string(&mut text)?;
            if done(&text) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // cgroup.events signals a change with POLLPRI; files without notifications (v1's
            // freezer.state) never do, so each wait is capped and the file read again.
            let mut fds = [rustix::event::PollFd::new(&file, rustix::event::PollFlags::PRI)];
            let wait = left.min(Duration::from_millis(10));
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: wait.subsec_nanos() as i64,
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A resource controller we set limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
    /// v1 `freezer`; on v2 freezing is the core `cgroup.freeze` file and needs no controller.
    Freezer,
}

impl Controller {
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
        }
    }
    fn limit_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Freezer => "pause",
        }
    }

    /// How to lift this controller's default on purpose.
    fn lift_hint(self) -> String {
        let flag = match self {
            Controller::Cpu => "cpus",
            other => other.limit_name(),
        };
        format!(
            "lift the default on purpose (`unlimited.{}` in the spec, `tartarus run --{flag} unlimited`)",
            self.limit_name()
        )
    }
}

/// Which cgroup version a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What this host offers, found by [`CgroupLayout::detect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    /// The v2 mount (`/sys/fs/cgroup` on pure v2, `/sys/fs/cgroup/unified` on hybrid), if any.
    pub v2_mount: Option<PathBuf>,
    /// Controllers available in the v2 tree at the parent we create in.
    pub v2_controllers: BTreeSet<String>,
    /// v1 hierarchy mount per controller.
    pub v1_mounts: Vec<(Controller, PathBuf)>,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl CgroupLayout {
    pub fn detect(fs: &dyn CgroupFs) -> CgroupLayout {
        let root = Path::new(CGROUP_ROOT);
        if fs.is_cgroup2_mount(root) {
            return CgroupLayout {
                v2_mount: Some(root.to_path_buf()),
                v2_controllers: read_controllers(fs, root),
                v1_mounts: Vec::new(),
            };
        }
        let unified = root.join("unified");
        let v2_mount = fs.is_cgroup2_mount(&unified).then_some(unified);
        let v2_controllers = v2_mount
            .as_deref()
            .map(|m| read_controllers(fs, m))
            .unwrap_or_default();
        let mut v1_mounts = Vec::new();
        for controller in [
            Controller::Memory,
            Controller::Cpu,
            Controller::Pids,
            Controller::Freezer,
        ] {
            let dir = root.join(controller.name());
            if fs.exists(&dir.join("cgroup.procs")) {
                v1_mounts.push((controller, dir));
            }
        }
        CgroupLayout {
            v2_mount,
            v2_controllers,
            v1_mounts,
        }
    }

    fn v1_mount(&self, controller: Controller) -> Option<&Path> {
        self.v1_mounts
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, p)| p.as_path())
    }

    /// Where `controller` would be enforced: v2 when offered there, else its v1 hierarchy.
    pub fn placement(&self, controller: Controller) -> Option<(CgroupVersion, &Path)> {
        if let Some(mount) = &self.v2_mount {
            if controller == Controller::Freezer || self.v2_controllers.contains(controller.name()) {
                return Some((CgroupVersion::V2, mount));
            }
        }
        self.v1_mount(controller).map(|m| (CgroupVersion::V1, m))
    }
}

fn read_controllers(fs: &dyn CgroupFs, dir: &Path) -> BTreeSet<String> {
    fs.read(&dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// One cgroup directory we created, with the controllers enforced there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub version: CgroupVersion,
    pub path: PathBuf,
    pub controllers: Vec<Controller>,
}

impl CgroupDir {
    /// Adds `controller` at `path` to `dirs`: to the directory already there (v1 hierarchies mounted
    /// together, or the one v2 tree), else as a new one.
    pub fn add(dirs: &mut Vec<CgroupDir>, version: CgroupVersion, path: PathBuf, controller: Controller) {
        match dirs.iter_mut().find(|d| d.path == path) {
            Some(dir) => dir.controllers.push(controller),
            None => dirs.push(CgroupDir {
                version,
                path,
                controllers: vec![controller],
            }),
        }
    }
}

/// The cgroups of one sandbox. Created by [`SandboxCgroups::create`], removed by
/// [`SandboxCgroups::remove`] (idempotent).
#[derive(Debug, Default)]
pub struct SandboxCgroups {
    pub dirs: Vec<CgroupDir>,
}

const CPU_PERIOD_US: u64 = 100_000;

/// Longest wait for the kernel to report a sandbox frozen or thawed.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// One controller a sandbox needs, and whether only a default asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub controller: Controller,
    pub default: bool,
}

/// The controllers `limits` need. Defaults count only with `defaults` (a root supervisor); `freezable`
/// adds the freezer (pause), which is never a default.
pub fn wanted(limits: &AppliedLimits, defaults: bool, freezable: bool) -> Vec<Wanted> {
    let origin = |applied: Applied<u64>| match applied {
        Applied::Requested(_) => Some(false),
        Applied::Default(_) if defaults => Some(true),
        Applied::Default(_) | Applied::Lifted => None,
    };
    let cpu = match limits.cpu_quota {
        Some(_) => Some(false),
        None => origin(limits.cpu_weight),
    };
    [
        (Controller::Freezer, freezable.then_some(false)),
        (Controller::Memory, origin(limits.memory_bytes)),
        (Controller::Cpu, cpu),
        (Controller::Pids, origin(limits.pids)),
    ]
    .into_iter()
    .filter_map(|(controller, default)| default.map(|default| Wanted { controller, default }))
    .collect()
}

/// The error for a controller that cannot be used, worded for a requested or a default limit.
fn unavailable(wanted: Wanted, why: String, requested_advice: &str) -> PrepareError {
    let limit = wanted.controller.limit_name();
    match wanted.default {
        false => PrepareError::LimitUnavailable {
            limit,
            why: format!("{why}; {requested_advice}"),
        },
        true => PrepareError::DefaultLimitUnavailable {
            limit,
            why: format!("{why}; {}", wanted.controller.lift_hint()),
        },
    }
}

/// Creates the cgroup directories for the `wanted` controllers under `<hierarchy>/<parent>/<name>` and
/// writes `limits`. Rolls back everything it created when any step fails.
pub fn create(
    fs: &dyn CgroupFs,
    layout: &CgroupLayout,
    parent: &str,
    name: &str,
    limits: &AppliedLimits,
    wanted: &[Wanted],
) -> Result<SandboxCgroups, PrepareError> {
    // Group controllers by the directory that will enforce them.
    let mut dirs: Vec<CgroupDir> = Vec::new();
    for &want in wanted {
        let controller = want.controller;
        let Some((version, mount)) = layout.placement(controller) else {
            return Err(unavailable(
                want,
                missing_controller_reason(layout, controller),
                "enable the controller (or delegate it to this user) or drop the limit",
            ));
        };
        CgroupDir::add(&mut dirs, version, mount.join(parent).join(name), controller);
    }
    let mut created = SandboxCgroups::default();
    for dir in dirs {
        // The limit to blame when the directory cannot be made: a requested one before a default.
        let blame = dir
            .controllers
            .iter()
            .filter_map(|c| wanted.iter().find(|w| w.controller == *c))
            .min_by_key(|w| w.default)
            .copied()
            .unwrap_or(Wanted {
                controller: dir.controllers[0],
                default: false,
            });
        if let Err(e) = create_dir(fs, &dir, limits, blame) {
            created.remove(fs);
            // Remove the half-made directory too.
            let _ = fs.rmdir(&dir.path);
            return Err(e);
        }
        created.dirs.push(dir);
    }
    Ok(created)
}

fn missing_controller_reason(layout: &CgroupLayout, controller: Controller) -> String {
    let v2 = match &layout.v2_mount {
        Some(m) => format!(
            "the cgroup v2 tree at {} does not offer '{}' (available: {})",
            m.display(),
            controller.name(),
            if layout.v2_controllers.is_empty() {
                "none".to_string()
            } else {
                layout
                    .v2_controllers
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        ),
        None => "there is no cgroup v2 tree".to_string(),
    };
    format!(
        "{v2} and there is no cgroup v1 '{}' hierarchy under {CGROUP_ROOT}",
        controller.name()
    )
}

const NOT_ROOT_ADVICE: &str = "run as root or delegate a cgroup to this user";

fn create_dir(
    fs: &dyn CgroupFs,
    dir: &CgroupDir,
    limits: &AppliedLimits,
    blame: Wanted,
) -> Result<(), PrepareError> {
    let cgroup_err = |path: &Path| {
        let path = path.display().to_string();
        move |source: io::Error| PrepareError::Cgroup { path, source }
    };
    let parent = dir.path.parent().unwrap_or(Path::new("/"));
    if !fs.exists(parent) {
        match fs.mkdir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(unavailable(
                    blame,
                    format!("{} is not writable by this user", parent.display()),
                    NOT_ROOT_ADVICE,
                ))
            }
            Err(e) => return Err(cgroup_err(parent)(e)),
        }
    }
    if dir.version == CgroupVersion::V2 {
        // Controllers must be enabled for the children of every level we create in.
        let enable: String = dir
            .controllers
            .iter()
            .filter(|c| **c != Controller::Freezer)
            .map(|c| format!("+{} ", c.name()))
            .collect();
        let mount_root = parent.parent().unwrap_or(parent);
        for level in [mount_root, parent] {
            if enable.is_empty() {
                break; // freezing is a core v2 file: no controller to enable
            }
            let control = level.join("cgroup.subtree_control");
            fs.write(&control, enable.trim_end())
                .map_err(cgroup_err(&control))?;
        }
    }
    fs.mkdir(&dir.path).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => unavailable(
            blame,
            format!("cannot create cgroup {}: permission denied", dir.path.display()),
            NOT_ROOT_ADVICE,
        ),
        _ => cgroup_err(&dir.path)(e),
    })?;
    for (file, value) in limit_settings(fs, dir, limits) {
        let path = dir.path.join(file);
        fs.write(&path, &value).map_err(cgroup_err(&path))?;
    }
    Ok(())
}

/// `cpu.shares` (v1) for a v2 `cpu.weight`: 100 is 1024 on both scales, each kernel's default.
fn cpu_shares(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / 100).clamp(2, 262_144)
}

/// The files and values that express `limits` in `dir`, in the order they must be written.
fn limit_settings(fs: &dyn CgroupFs, dir: &CgroupDir, limits: &AppliedLimits) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for controller in &dir.controllers {
        match (controller, dir.version) {
            (Controller::Memory, CgroupVersion::V2) => {
                if let Some(bytes) = limits.memory_bytes.value() {
                    out.push(("memory.max", bytes.to_string()));
                    if fs.exists(&dir.path.join("memory.swap.max")) {
                        out.push(("memory.swap.max", "0".to_string()));
                    }
                }
            }
            (Controller::Memory, CgroupVersion::V1) => {
                if let Some(bytes) = limits.memory_bytes.value() {
                    out.push(("memory.limit_in_bytes", bytes.to_string()));
                    // Without this the limit could be escaped into swap.
                    if fs.exists(&dir.path.join("memory.memsw.limit_in_bytes")) {
                        out.push(("memory.memsw.limit_in_bytes", bytes.to_string()));
                    }
                }
            }
            (Controller::Cpu, version) => {
                if let Some(weight) = limits.cpu_weight.value() {
                    match version {
                        CgroupVersion::V2 => out.push(("cpu.weight", weight.clamp(1, 10_000).to_string())),
                        CgroupVersion::V1 => out.push(("cpu.shares", cpu_shares(weight).to_string())),
                    }
                }
                if let Some(cpus) = limits.cpu_quota {
                    let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
                    match version {
                        CgroupVersion::V2 => out.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}"))),
                        CgroupVersion::V1 => {
                            out.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                            out.push(("cpu.cfs_quota_us", quota.to_string()));
                        }
                    }
                }
            }
            (Controller::Freezer, _) => {}
            (Controller::Pids, _) => {
                if let Some(pids) = limits.pids.value() {
                    out.push(("pids.max", pids.to_string()));
                }
            }
        }
    }
    out
}

impl SandboxCgroups {
    /// Moves process `pid` into every cgroup of the sandbox.
    pub fn add_process(&self, fs: &dyn CgroupFs, pid: i32) -> io::Result<()> {
        for dir in &self.dirs {
            fs.write(&dir.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn dir_with(&self, controller: Controller) -> Option<&CgroupDir> {
        self.dirs.iter().find(|d| d.controllers.contains(&controller))
    }

    /// Freezes (or thaws) every process of the sandbox and waits, at most [`FREEZE_TIMEOUT`], until the
    /// kernel reports it done: the freezer works asynchronously, and "paused" must mean that no process
    /// of the sandbox runs any more. A freeze that does not complete is undone.
    pub fn freeze_and_wait(&self, fs: &dyn CgroupFs, frozen: bool) -> io::Result<()> {
        self.freeze(fs, frozen)?;
        let dir = self
            .dir_with(Controller::Freezer)
            .ok_or_else(|| io::Error::other("no freezer cgroup"))?;
        let (file, state) = match (dir.version, frozen) {
            (CgroupVersion::V2, true) => ("cgroup.events", "frozen 1"),
            (CgroupVersion::V2, false) => ("cgroup.events", "frozen 0"),
            (CgroupVersion::V1, true) => ("freezer.state", "FROZEN"),
            (CgroupVersion::V1, false) => ("freezer.state", "THAWED"),
        };
        let done = |text: &str| text.lines().any(|l| l.trim() == state);
        if fs.wait_until(&dir.path.join(file), &done, FREEZE_TIMEOUT)? {
            return Ok(());
        }
        if frozen {
            let _ = self.freeze(fs, false);
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the kernel did not report the sandbox {state} within {FREEZE_TIMEOUT:?}"),
        ))
    }

    /// Freezes (or thaws) every process of the sandbox, without waiting for the kernel to finish.
    pub fn freeze(&self, fs: &dyn CgroupFs, frozen: bool) -> io::Result<()> {
        let dir = self
            .dir_with(Controller::Freezer)
            .ok_or_else(|| io::Error::other("no freezer cgroup"))?;
        match dir.version {
            CgroupVersion::V2 => fs.write(&dir.path.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
            CgroupVersion::V1 => fs.write(
                &dir.path.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
        }
    }

    pub fn can_freeze(&self) -> bool {
        self.dir_with(Controller::Freezer).is_some()
    }

    /// How many times the OOM killer killed a process in the sandbox.
    pub fn oom_kills(&self, fs: &dyn CgroupFs) -> u64 {
        let Some(dir) = self.dir_with(Controller::Memory) else {
            return 0;
        };
        let file = match dir.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        fs.read(&dir.path.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0)
    }

    /// How many times a fork or clone in the sandbox failed at its pids limit (`pids.events`, v1 and v2).
    pub fn pids_limit_hits(&self, fs: &dyn CgroupFs) -> u64 {
        let Some(dir) = self.dir_with(Controller::Pids) else {
            return 0;
        };
        fs.read(&dir.path.join("pids.events"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("max ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0)
    }

    /// Lowers (or raises) the CPU quota to `cpus` cores; `false` when the sandbox has no CPU cgroup.
    pub fn set_cpu_quota(&self, fs: &dyn CgroupFs, cpus: f64) -> io::Result<bool> {
        let Some(dir) = self.dir_with(Controller::Cpu) else {
            return Ok(false);
        };
        let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
        match dir.version {
            CgroupVersion::V2 => fs.write(&dir.path.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?,
            CgroupVersion::V1 => fs.write(&dir.path.join("cpu.cfs_quota_us"), &quota.to_string())?,
        }
        Ok(true)
    }

    /// CPU time the sandbox's processes have used so far, in microseconds: `usage_usec` of the v2 core
    /// `cpu.stat` (kept by every v2 cgroup, whatever its controllers, so hybrid hosts have it too), else
    /// v1 `cpuacct.usage` where cpuacct is mounted with cpu; `None` when neither is there.
    pub fn cpu_usage_usec(&self, fs: &dyn CgroupFs) -> Option<u64> {
        let v2 = self
            .dirs
            .iter()
            .filter(|d| d.version == CgroupVersion::V2)
            .find_map(|dir| {
                fs.read(&dir.path.join("cpu.stat")).ok().and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("usage_usec ").and_then(|v| v.trim().parse().ok()))
                })
            });
        if v2.is_some() {
            return v2;
        }
        let dir = self
            .dir_with(Controller::Cpu)
            .filter(|d| d.version == CgroupVersion::V1)?;
        let nanos: u64 = fs
            .read(&dir.path.join("cpuacct.usage"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(nanos / 1000)
    }

    /// Memory the sandbox uses now (`memory.current`, v1 `memory.usage_in_bytes`), when the memory
    /// controller tracks it.
    pub fn memory_current(&self, fs: &dyn CgroupFs) -> Option<u64> {
        let dir = self.dir_with(Controller::Memory)?;
        let file = match dir.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        fs.read(&dir.path.join(file)).ok()?.trim().parse().ok()
    }

    /// Peak memory use of the sandbox, when the memory controller tracks it.
    pub fn peak_memory(&self, fs: &dyn CgroupFs) -> Option<u64> {
        let dir = self.dir_with(Controller::Memory)?;
        let file = match dir.version {
            CgroupVersion::V2 => "memory.peak",
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
        };
        fs.read(&dir.path.join(file)).ok()?.trim().parse().ok()
    }

    /// Memory the sandbox uses now (page cache and tmpfs included), when the memory controller tracks it.
    pub fn current_memory(&self, fs: &dyn CgroupFs) -> Option<u64> {
        let dir = self.dir_with(Controller::Memory)?;
        let file = match dir.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        fs.read(&dir.path.join(file)).ok()?.trim().parse().ok()
    }

    /// Removes every directory; processes still inside are killed first. Idempotent.
    pub fn remove(&mut self, fs: &dyn CgroupFs) -> Vec<(PathBuf, io::Error)> {
        let mut failures = Vec::new();
        for dir in self.dirs.drain(..) {
            if let Err(e) = remove_dir(fs, &dir.path) {
                failures.push((dir.path, e));
            }
        }
        failures
    }
}

/// Removes one cgroup directory, killing what is still inside (a pid namespace's teardown normally has
/// emptied it already).
fn remove_dir(fs: &dyn CgroupFs, path: &Path) -> io::Result<()> {
    for attempt in 0..200 {
        match fs.rmdir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 199 => {
                kill_members(fs, path);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn kill_members(fs: &dyn CgroupFs, path: &Path) {
    if fs.write(&path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(procs) = fs.read(&path.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY-free: rustix validates the pid; errors (already gone) are irrelevant here.
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Name of a sandbox cgroup: the supervisor's pid, then the sandbox id.
pub fn cgroup_name(owner_pid: u32, sandbox_id: &str) -> String {
    format!("{owner_pid}-{sandbox_id}")
}

/// Removes sandbox cgroups under `parent` whose supervisor process is gone. Returns what it removed.
pub fn collect_garbage(fs: &dyn CgroupFs, layout: &CgroupLayout, parent: &str) -> Vec<PathBuf> {
    let mut roots: Vec<&Path> = layout.v1_mounts.iter().map(|(_, p)| p.as_path()).collect();
    if let Some(v2) = &layout.v2_mount {
        roots.push(v2);
    }
    let mut removed = Vec::new();
    for root in roots {
        let dir = root.join(parent);
        let Ok(children) = fs.subdirs(&dir) else { continue };
        for child in children {
            let Some(owner) = child.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if tartarus_hostsys::process_exists(owner) {
                continue;
            }
            let path = dir.join(&child);
            if remove_dir(fs, &path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// An in-memory cgroup filesystem that records every write.
    #[derive(Default)]
    pub struct FakeCgroupFs {
        pub cgroup2_mounts: BTreeSet<PathBuf>,
        pub files: RefCell<BTreeMap<PathBuf, String>>,
        pub dirs: RefCell<BTreeSet<PathBuf>>,
        pub writes: RefCell<Vec<(PathBuf, String)>>,
        pub read_only: BTreeSet<PathBuf>,
    }

    impl FakeCgroupFs {
        pub fn file(self, path: &str, content: &str) -> Self {
            self.files.borrow_mut().insert(path.into(), content.into());
            self
        }
        pub fn written(&self, path: &str) -> Option<String> {
            self.writes
                .borrow()
                .iter()
                .rev()
                .find(|(p, _)| p == Path::new(path))
                .map(|(_, v)| v.clone())
        }
    }

    impl CgroupFs for FakeCgroupFs {
        fn is_cgroup2_mount(&self, path: &Path) -> bool {
            self.cgroup2_mounts.contains(path)
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.borrow().contains_key(path) || self.dirs.borrow().contains(path)
        }
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files
                .borrow()
                .get(path)
                .cloned()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
        fn write(&self, path: &Path, data: &str) -> io::Result<()> {
            if self.read_only.iter().any(|ro| path.starts_with(ro)) {
                return Err(io::ErrorKind::PermissionDenied.into());
            }
            self.writes
                .borrow_mut()
                .push((path.to_path_buf(), data.to_string()));
            self.files
                .borrow_mut()
                .insert(path.to_path_buf(), data.to_string());
            Ok(())
        }
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            if self.read_only.iter().any(|ro| path.starts_with(ro)) {
                return Err(io::ErrorKind::PermissionDenied.into());
            }
            if !self.dirs.borrow_mut().insert(path.to_path_buf()) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            Ok(())
        }
        fn rmdir(&self, path: &Path) -> io::Result<()> {
            if self.dirs.borrow_mut().remove(path) {
                Ok(())
            } else {
                Err(io::ErrorKind::NotFound.into())
            }
        }
        fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
            Ok(self
                .dirs
                .borrow()
                .iter()
                .filter(|d| d.parent() == Some(path))
                .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect())
        }
        /// Answers at once from the file as it is: the fake's kernel is instantaneous (or never done).
        fn wait_until(
            &self,
            path: &Path,
            done: &dyn Fn(&str) -> bool,
            _timeout: Duration,
        ) -> io::Result<bool> {
            Ok(done(&self.read(path)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeCgroupFs;
    use super::*;

    fn hybrid() -> FakeCgroupFs {
        let mut fs = FakeCgroupFs::default()
            .file("/sys/fs/cgroup/unified/cgroup.controllers", "")
            .file("/sys/fs/cgroup/memory/cgroup.procs", "")
            .file("/sys/fs/cgroup/cpu/cgroup.procs", "")
            .file("/sys/fs/cgroup/pids/cgroup.procs", "");
        fs.cgroup2_mounts.insert("/sys/fs/cgroup/unified".into());
        fs
    }

    fn pure_v2(controllers: &str) -> FakeCgroupFs {
        let mut fs = FakeCgroupFs::default().file("/sys/fs/cgroup/cgroup.controllers", controllers);
        fs.cgroup2_mounts.insert("/sys/fs/cgroup".into());
        fs
    }

    fn all_limits() -> AppliedLimits {
        let mut spec = crate::SandboxSpec::new(vec!["/bin/true".into()]);
        spec.limits = crate::ResourceLimits {
            memory_bytes: Some(256 << 20),
            cpus: Some(0.5),
            pids: Some(64),
        };
        spec.applied_limits()
    }

    /// Every default lifted: only what `freezable` adds.
    fn nothing() -> AppliedLimits {
        let mut spec = crate::SandboxSpec::new(vec!["/bin/true".into()]);
        spec.unlimited = crate::Unlimited {
            memory: true,
            cpu: true,
            pids: true,
        };
        spec.applied_limits()
    }

    /// `create` as `prepare` calls it, for a root supervisor (defaults enforced).
    fn make(
        fs: &FakeCgroupFs,
        limits: &AppliedLimits,
        freezable: bool,
    ) -> Result<SandboxCgroups, PrepareError> {
        let layout = CgroupLayout::detect(fs);
        let wanted = wanted(limits, true, freezable);
        create(fs, &layout, "tartarus", "1-abc", limits, &wanted)
    }

    #[test]
    fn hybrid_host_places_every_limit_in_v1() {
        let fs = hybrid();
        let layout = CgroupLayout::detect(&fs);
        assert_eq!(
            layout.v2_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        let cgroups = make(&fs, &all_limits(), false).unwrap();
        assert_eq!(cgroups.dirs.len(), 3);
        assert!(cgroups.dirs.iter().all(|d| d.version == CgroupVersion::V1));
        assert_eq!(
            fs.written("/sys/fs/cgroup/memory/tartarus/1-abc/memory.limit_in_bytes")
                .unwrap(),
            "268435456"
        );
        assert_eq!(
            fs.written("/sys/fs/cgroup/cpu/tartarus/1-abc/cpu.cfs_quota_us")
                .unwrap(),
            "50000"
        );
        assert_eq!(
            fs.written("/sys/fs/cgroup/pids/tartarus/1-abc/pids.max").unwrap(),
            "64"
        );
    }

    #[test]
    fn pure_v2_uses_one_directory_and_enables_controllers() {
        let fs = pure_v2("cpuset cpu io memory pids");
        let cgroups = make(&fs, &all_limits(), false).unwrap();
        assert_eq!(cgroups.dirs.len(), 1);
        assert_eq!(
            cgroups.dirs[0].controllers,
            vec![Controller::Memory, Controller::Cpu, Controller::Pids]
        );
        assert_eq!(
            fs.written("/sys/fs/cgroup/cgroup.subtree_control").unwrap(),
            "+memory +cpu +pids"
        );
        assert_eq!(
            fs.written("/sys/fs/cgroup/tartarus/1-abc/memory.max").unwrap(),
            "268435456"
        );
        assert_eq!(
            fs.written("/sys/fs/cgroup/tartarus/1-abc/cpu.max").unwrap(),
            "50000 100000"
        );
    }

    #[test]
    fn missing_controller_fails_with_a_reason_naming_it() {
        let fs = pure_v2("cpu pids");
        let err = make(&fs, &all_limits(), false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("memory limit requested but cannot be enforced"),
            "{text}"
        );
        assert!(text.contains("does not offer 'memory'"), "{text}");
        assert!(fs.dirs.borrow().is_empty(), "nothing may be left behind");
    }

    #[test]
    fn unwritable_hierarchy_is_a_clear_limit_error_and_rolls_back() {
        let mut fs = hybrid();
        fs.read_only.insert("/sys/fs/cgroup/pids".into());
        let err = make(&fs, &all_limits(), false).unwrap_err();
        assert!(
            matches!(err, PrepareError::LimitUnavailable { limit: "pids", .. }),
            "{err}"
        );
        let leftovers: Vec<_> = fs
            .dirs
            .borrow()
            .iter()
            .filter(|d| d.ends_with("1-abc"))
            .cloned()
            .collect();
        assert!(leftovers.is_empty(), "rolled back: {leftovers:?}");
    }

    #[test]
    fn freezer_uses_the_v2_core_file_even_without_v2_controllers() {
        let fs = hybrid();
        let cgroups = make(&fs, &nothing(), true).unwrap();
        assert_eq!(cgroups.dirs.len(), 1);
        assert_eq!(
            cgroups.dirs[0].path,
            Path::new("/sys/fs/cgroup/unified/tartarus/1-abc")
        );
        assert!(
            fs.written("/sys/fs/cgroup/unified/cgroup.subtree_control")
                .is_none(),
            "nothing to enable"
        );
        cgroups.freeze(&fs, true).unwrap();
        assert_eq!(
            fs.written("/sys/fs/cgroup/unified/tartarus/1-abc/cgroup.freeze")
                .unwrap(),
            "1"
        );
        cgroups.freeze(&fs, false).unwrap();
        assert_eq!(
            fs.written("/sys/fs/cgroup/unified/tartarus/1-abc/cgroup.freeze")
                .unwrap(),
            "0"
        );
    }

    #[test]
    fn test_pause_waits_for_the_kernel_to_report_frozen_and_undoes_a_freeze_that_never_completes() {
        let fs = hybrid().file(
            "/sys/fs/cgroup/unified/tartarus/1-abc/cgroup.events",
            "populated 1\nfrozen 1\n",
        );
        let cgroups = make(&fs, &nothing(), true).unwrap();
        cgroups.freeze_and_wait(&fs, true).unwrap();
        let freeze = "/sys/fs/cgroup/unified/tartarus/1-abc/cgroup.freeze";
        assert_eq!(fs.written(freeze).as_deref(), Some("1"));

        let stuck = hybrid().file(
            "/sys/fs/cgroup/unified/tartarus/1-abc/cgroup.events",
            "populated 1\nfrozen 0\n",
        );
        let cgroups = make(&stuck, &nothing(), true).unwrap();
        let err = cgroups.freeze_and_wait(&stuck, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(
            stuck.written(freeze).as_deref(),
            Some("0"),
            "a half-done freeze is undone"
        );
    }

    #[test]
    fn freezer_falls_back_to_v1() {
        let fs = FakeCgroupFs::default().file("/sys/fs/cgroup/freezer/cgroup.procs", "");
        let cgroups = make(&fs, &nothing(), true).unwrap();
        cgroups.freeze(&fs, true).unwrap();
        assert_eq!(
            fs.written("/sys/fs/cgroup/freezer/tartarus/1-abc/freezer.state")
                .unwrap(),
            "FROZEN"
        );
    }

    #[test]
    fn pids_limit_hits_and_cpu_throttling_use_the_sandboxes_cgroups() {
        let fs = FakeCgroupFs::default()
            .file("/sys/fs/cgroup/pids/t/x/pids.events", "max 7\n")
            .file("/sys/fs/cgroup/cpu/t/x/cpu.cfs_quota_us", "100000");
        let cgroups = SandboxCgroups {
            dirs: vec![
                CgroupDir {
                    version: CgroupVersion::V1,
                    path: "/sys/fs/cgroup/pids/t/x".into(),
                    controllers: vec![Controller::Pids],
                },
                CgroupDir {
                    version: CgroupVersion::V1,
                    path: "/sys/fs/cgroup/cpu/t/x".into(),
                    controllers: vec![Controller::Cpu],
                },
            ],
        };
        assert_eq!(cgroups.pids_limit_hits(&fs), 7);
        assert!(cgroups.set_cpu_quota(&fs, 0.25).unwrap());
        assert_eq!(
            fs.written("/sys/fs/cgroup/cpu/t/x/cpu.cfs_quota_us").unwrap(),
            "25000"
        );
        assert!(!SandboxCgroups::default().set_cpu_quota(&fs, 1.0).unwrap());
    }

    #[test]
    fn cpu_time_comes_from_any_v2_cgroup_before_v1_cpuacct_and_memory_from_the_memory_cgroup() {
        let v1_memory = CgroupDir {
            version: CgroupVersion::V1,
            path: "/sys/fs/cgroup/memory/t/x".into(),
            controllers: vec![Controller::Memory],
        };
        let v1_cpu = CgroupDir {
            version: CgroupVersion::V1,
            path: "/sys/fs/cgroup/cpu/t/x".into(),
            controllers: vec![Controller::Cpu],
        };
        // A hybrid host: the freezer's v2 directory keeps the core cpu.stat.
        let v2_freezer = CgroupDir {
            version: CgroupVersion::V2,
            path: "/sys/fs/cgroup/unified/t/x".into(),
            controllers: vec![Controller::Freezer],
        };
        let fs = FakeCgroupFs::default()
            .file(
                "/sys/fs/cgroup/unified/t/x/cpu.stat",
                "usage_usec 2500\nuser_usec 2000\n",
            )
            .file("/sys/fs/cgroup/cpu/t/x/cpuacct.usage", "9000000")
            .file("/sys/fs/cgroup/memory/t/x/memory.usage_in_bytes", "4096\n");
        let hybrid = SandboxCgroups {
            dirs: vec![v1_memory.clone(), v1_cpu.clone(), v2_freezer],
        };
        assert_eq!(hybrid.cpu_usage_usec(&fs), Some(2500));
        assert_eq!(hybrid.memory_current(&fs), Some(4096));
        let v1_only = SandboxCgroups {
            dirs: vec![v1_memory, v1_cpu],
        };
        assert_eq!(
            v1_only.cpu_usage_usec(&fs),
            Some(9000),
            "cpuacct.usage is in nanoseconds"
        );
        assert_eq!(SandboxCgroups::default().cpu_usage_usec(&fs), None);
        assert_eq!(SandboxCgroups::default().memory_current(&fs), None);
    }

    #[test]
    fn oom_kills_are_read_from_the_version_specific_file() {
        let fs = hybrid().file(
            "/sys/fs/cgroup/memory/t/x/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let cgroups = SandboxCgroups {
            dirs: vec![CgroupDir {
                version: CgroupVersion::V1,
                path: "/sys/fs/cgroup/memory/t/x".into(),
                controllers: vec![Controller::Memory],
            }],
        };
        assert_eq!(cgroups.oom_kills(&fs), 2);
    }

    fn defaults() -> AppliedLimits {
        crate::SandboxSpec::new(vec!["/bin/true".into()]).applied_limits()
    }

    #[test]
    fn test_defaults_on_a_hybrid_host_go_to_v1_with_a_fair_share_and_no_quota() {
        let fs = hybrid();
        let cgroups = make(&fs, &defaults(), false).unwrap();
        assert_eq!(cgroups.dirs.len(), 3);
        let written = |file: &str| fs.written(&format!("/sys/fs/cgroup/{file}"));
        assert_eq!(
            written("memory/tartarus/1-abc/memory.limit_in_bytes").as_deref(),
            Some("536870912")
        );
        assert_eq!(written("cpu/tartarus/1-abc/cpu.shares").as_deref(), Some("1024"));
        assert_eq!(
            written("cpu/tartarus/1-abc/cpu.cfs_quota_us"),
            None,
            "no quota unless asked"
        );
        assert_eq!(written("pids/tartarus/1-abc/pids.max").as_deref(), Some("256"));
    }

    #[test]
    fn test_defaults_on_pure_v2_write_memory_weight_and_pids_in_one_directory() {
        let fs = pure_v2("cpuset cpu io memory pids");
        let cgroups = make(&fs, &defaults(), false).unwrap();
        assert_eq!(cgroups.dirs.len(), 1);
        let written = |file: &str| fs.written(&format!("/sys/fs/cgroup/tartarus/1-abc/{file}"));
        assert_eq!(written("memory.max").as_deref(), Some("536870912"));
        assert_eq!(written("cpu.weight").as_deref(), Some("100"));
        assert_eq!(written("cpu.max"), None);
        assert_eq!(written("pids.max").as_deref(), Some("256"));
        assert_eq!(
            fs.written("/sys/fs/cgroup/tartarus/cgroup.subtree_control")
                .as_deref(),
            Some("+memory +cpu +pids")
        );
    }

    #[test]
    fn test_a_rootless_supervisor_wants_cgroups_only_for_requested_limits() {
        assert!(wanted(&defaults(), false, false).is_empty());
        let mut spec = crate::SandboxSpec::new(vec!["/bin/true".into()]);
        spec.limits.pids = Some(32);
        let wanted = wanted(&spec.applied_limits(), false, false);
        assert_eq!(
            wanted,
            [Wanted {
                controller: Controller::Pids,
                default: false
            }]
        );
    }

    #[test]
    fn test_lifted_defaults_want_no_cgroup() {
        assert!(wanted(&nothing(), true, false).is_empty());
    }

    #[test]
    fn test_a_default_the_host_cannot_enforce_says_how_to_lift_it() {
        let fs = pure_v2("cpu memory");
        let err = make(&fs, &defaults(), false).unwrap_err();
        assert!(
            matches!(err, PrepareError::DefaultLimitUnavailable { limit: "pids", .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("default pids limit cannot be enforced: "),
            "{text}"
        );
        assert!(text.contains("does not offer 'pids'"), "{text}");
        assert!(text.contains("`tartarus run --pids unlimited`"), "{text}");
        assert!(fs.dirs.borrow().is_empty(), "nothing may be left behind");
    }

    #[test]
    fn test_a_requested_limit_is_blamed_before_a_default_in_the_same_directory() {
        let mut fs = pure_v2("cpu memory pids");
        fs.read_only.insert("/sys/fs/cgroup/tartarus".into());
        let mut spec = crate::SandboxSpec::new(vec!["/bin/true".into()]);
        spec.limits.pids = Some(32);
        let err = make(&fs, &spec.applied_limits(), false).unwrap_err();
        assert!(
            matches!(err, PrepareError::LimitUnavailable { limit: "pids", .. }),
            "{err}"
        );
    }

    #[test]
    fn garbage_collection_removes_only_dead_owners() {
        let fs = hybrid();
        let live = std::process::id();
        fs.dirs
            .borrow_mut()
            .insert(format!("/sys/fs/cgroup/pids/tartarus/{live}-a").into());
        fs.dirs
            .borrow_mut()
            .insert("/sys/fs/cgroup/pids/tartarus/2147483600-b".into());
        let layout = CgroupLayout::detect(&fs);
        let removed = collect_garbage(&fs, &layout, "tartarus");
        assert_eq!(
            removed,
            vec![PathBuf::from("/sys/fs/cgroup/pids/tartarus/2147483600-b")]
        );
    }
}
