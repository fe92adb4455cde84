//! The runsc binary: finding it (`TARTARUS_RUNSC`, then `PATH`, so a newer runsc earlier on `PATH` wins
//! over the distribution's `/usr/bin/runsc`), its version and the minimum this lane needs, the platform to
//! run it with, and every invocation bounded in time.
//!
//! Global flags are the same on every invocation of one container ([`Invocation`]): `--root` under
//! Tartarus's state directory (never runsc's default `/var/run/runsc`), `--platform`, and `--network=none`
//! or `--network=sandbox` — the latter only with a network namespace Tartarus prepared, so runsc never
//! configures the host's uplink.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::lanes::{GvisorConfig, GvisorPlatform};

/// The oldest runsc release this lane is tested with (Debian 12's `0.0~20221219.0`).
pub const MIN_RELEASE: u32 = 20221219;
/// The first runsc release whose own network stack (`--network=sandbox`) takes over a prepared network
/// namespace on current kernels: older ones tell the host's namespace by `/proc/sys/net/core/rmem_default`,
/// which every namespace has since Linux 5.x, and refuse with "cannot run with network enabled in root
/// network namespace".
pub const NETSTACK_RELEASE: u32 = 20240801;
/// How long a quick runsc query (`--version`, `help platforms`) may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the KVM probe's `runsc do /bin/true` may take before KVM is judged unusable.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// What to do when runsc is missing, named once.
pub const INSTALL_HINT: &str =
    "install gVisor's runsc (Debian: apt-get install runsc; production: the upstream release, see \
     docs/gvisor.md) or point TARTARUS_RUNSC at it";

/// runsc could not be found, run or trusted.
#[derive(Debug, thiserror::Error)]
pub enum RunscError {
    #[error("runsc not found ({searched}): {INSTALL_HINT}")]
    NotFound { searched: String },
    #[error("{path} cannot be run")]
    Exec {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} --version printed no runsc version ({output:?}): {INSTALL_HINT}")]
    Version { path: String, output: String },
    #[error(
        "{path} is runsc {version}, older than the oldest supported release ({MIN_RELEASE}): {INSTALL_HINT}"
    )]
    TooOld { path: String, version: String },
    #[error("runsc {what} did not finish within {after:?}")]
    TimedOut { what: String, after: Duration },
    #[error("runsc {what} failed: {message}")]
    Failed { what: String, message: String },
    #[error("the gVisor lane needs root (runsc creates namespaces and cgroups); run tartarus as root")]
    NeedsRoot,
    #[error("platform {platform} does not work here: {why}")]
    Platform { platform: GvisorPlatform, why: String },
}

/// A runsc release: the text runsc prints and its date (`20221219`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunscVersion {
    pub text: String,
    pub release: u32,
}

/// Reads `runsc --version` output: `runsc version release-20231009.0` (upstream), `runsc version
/// 0.0~20221219.0` (Debian), `runsc version 20221219.0`.
pub fn parse_version(output: &str) -> Option<RunscVersion> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("runsc version "))?;
    let text = line.trim().to_string();
    let release = text
        .split(|c: char| !c.is_ascii_digit())
        .find(|part| part.len() == 8)?
        .parse()
        .ok()?;
    Some(RunscVersion { text, release })
}

/// A runsc binary that answered with a supported version.
#[derive(Debug, Clone)]
pub struct RunscBinary {
    pub path: PathBuf,
    pub version: RunscVersion,
    /// The platforms it has (`runsc help platforms`).
    pub platforms: Vec<GvisorPlatform>,
}

/// The runsc to use: the configured path, else `TARTARUS_RUNSC`, else the first `runsc` on `PATH`.
pub fn locate(config: &GvisorConfig) -> Result<PathBuf, RunscError> {
    if let Some(path) = &config.runsc {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("TARTARUS_RUNSC").filter(|p| !p.is_empty()) {
        return Ok(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join("runsc"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| RunscError::NotFound {
            searched: "TARTARUS_RUNSC is unset and no runsc is on PATH".into(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds runsc and checks its version against [`MIN_RELEASE`]. Its answers (`--version`, `help
/// platforms`: two Go start-ups, a fifth of a sandbox's launch) are kept for the boot in
/// `<state>/runsc-info`, keyed by the binary's path, size and modification time.
pub fn find(config: &GvisorConfig) -> Result<RunscBinary, RunscError> {
    let path = locate(config)?;
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(RunscError::NotFound {
            searched: format!("{shown} does not exist"),
        });
    }
    let cache = config
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::lanes::default_state_dir().join("gvisor"))
        .join("runsc-info");
    let key = identity(&path);
    let cached = key
        .as_deref()
        .and_then(|key| read_small(&cache).and_then(|text| cached_info(&text, key)));
    let (version_text, platforms) = match cached {
        Some(info) => info,
        None => {
            let mut command = Command::new(&path);
            command.arg("--version");
            let output = run_bounded(command, QUERY_TIMEOUT).map_err(|e| match e {
                BoundedError::Spawn(source) => RunscError::Exec {
                    path: shown.clone(),
                    source,
                },
                other => other.into_runsc("--version", QUERY_TIMEOUT),
            })?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let platforms = query_platforms(&path);
            if let (Some(key), Some(version)) = (&key, parse_version(&text)) {
                let names: Vec<&str> = platforms.iter().map(|p| p.as_str()).collect();
                let entry = format!("{key}\nrunsc version {}\n{}\n", version.text, names.join(" "));
                let staged = cache.with_extension(format!("{}", std::process::id()));
                if std::fs::write(&staged, entry).is_ok() {
                    let _ = std::fs::rename(&staged, &cache);
                }
            }
            (text, platforms)
        }
    };
    let version = parse_version(&version_text).ok_or_else(|| RunscError::Version {
        path: shown.clone(),
        output: version_text.trim().chars().take(120).collect(),
    })?;
    if version.release < MIN_RELEASE {
        return Err(RunscError::TooOld {
            path: shown,
            version: version.text,
        });
    }
    Ok(RunscBinary {
        path,
        version,
        platforms,
    })
}

/// What identifies one runsc binary for a boot: its canonical path, size and modification time.
fn identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&canonical).ok()?;
    let boot = read_small(Path::new("/proc/sys/kernel/random/boot_id"))?;
    Some(format!(
        "{} {} {}.{} {}",
        canonical.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        boot.trim()
    ))
}

/// The version output and platforms kept for `key`.
fn cached_info(text: &str, key: &str) -> Option<(String, Vec<GvisorPlatform>)> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let version = lines.next()?.to_string();
    let platforms = lines
        .next()?
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((version, platforms))
}

/// The platforms `runsc help platforms` lists (ptrace alone if it does not answer).
fn query_platforms(path: &Path) -> Vec<GvisorPlatform> {
    let mut command = Command::new(path);
    command.args(["help", "platforms"]);
    let Ok(output) = run_bounded(command, QUERY_TIMEOUT) else {
        return vec![GvisorPlatform::Ptrace];
    };
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect()
}

/// The platform to run with and how it was chosen, e.g. `platform ptrace (systrap: not in runsc
/// 0.0~20221219.0; kvm: /dev/kvm does not run guests here)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformChoice {
    pub platform: GvisorPlatform,
    pub detail: String,
}

/// Picks the platform: the configured one (checked), else systrap when this runsc has it, else kvm when
/// it runs guests here, else ptrace.
pub fn choose_platform(
    runsc: &RunscBinary,
    wanted: Option<GvisorPlatform>,
    scratch: &Path,
) -> Result<PlatformChoice, RunscError> {
    choose(runsc, wanted, || kvm_verdict(runsc, scratch).clone())
}

/// The choice itself, with the KVM verdict asked for only when it matters.
fn choose(
    runsc: &RunscBinary,
    wanted: Option<GvisorPlatform>,
    kvm: impl FnOnce() -> KvmVerdict,
) -> Result<PlatformChoice, RunscError> {
    let known = &runsc.platforms;
    if let Some(platform) = wanted {
        if !known.contains(&platform) {
            return Err(RunscError::Platform {
                platform,
                why: format!("runsc {} does not have it", runsc.version.text),
            });
        }
        if platform == GvisorPlatform::Kvm {
            if let KvmVerdict::Unusable(why) = kvm() {
                return Err(RunscError::Platform { platform, why });
            }
        }
        return Ok(PlatformChoice {
            platform,
            detail: format!("platform {platform} (configured)"),
        });
    }
    if known.contains(&GvisorPlatform::Systrap) {
        return Ok(PlatformChoice {
            platform: GvisorPlatform::Systrap,
            detail: "platform systrap".into(),
        });
    }
    let systrap = format!("systrap: not in runsc {}", runsc.version.text);
    let kvm = match known.contains(&GvisorPlatform::Kvm) {
        false => "kvm: not in this runsc".to_string(),
        true => match kvm() {
            KvmVerdict::Usable => {
                return Ok(PlatformChoice {
                    platform: GvisorPlatform::Kvm,
                    detail: format!("platform kvm ({systrap})"),
                })
            }
            KvmVerdict::Unusable(why) => format!("kvm: {why}"),
        },
    };
    Ok(PlatformChoice {
        platform: GvisorPlatform::Ptrace,
        detail: format!("platform ptrace ({systrap}; {kvm})"),
    })
}

/// Whether runsc's KVM platform runs guests on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    Usable,
    Unusable(String),
}

/// The KVM verdict, found once per process and kept for the boot in `scratch/kvm-verdict` (keyed by the
/// boot id and the runsc binary), so that each `tartarus run` does not pay for the probe: `/dev/kvm` must
/// exist and `runsc --platform=kvm do /bin/true` must finish within [`KVM_PROBE_TIMEOUT`] (a nested
/// software hypervisor hangs it). The probe runs in a cgroup of its own, so that on a hang every process
/// it started is found and killed.
pub fn kvm_verdict(runsc: &RunscBinary, scratch: &Path) -> &'static KvmVerdict {
    static VERDICT: OnceLock<KvmVerdict> = OnceLock::new();
    VERDICT.get_or_init(|| {
        let cache = scratch.join("kvm-verdict");
        let key = format!(
            "{} {} {}",
            read_small(Path::new("/proc/sys/kernel/random/boot_id"))
                .unwrap_or_default()
                .trim(),
            runsc.path.display(),
            runsc.version.text
        );
        if let Some(cached) = read_small(&cache).and_then(|text| cached_verdict(&text, &key)) {
            return cached;
        }
        let verdict = probe_kvm(runsc, scratch);
        let line = match &verdict {
            KvmVerdict::Usable => "usable".to_string(),
            KvmVerdict::Unusable(why) => format!("unusable {why}"),
        };
        let _ = std::fs::write(&cache, format!("{key}\n{line}\n"));
        verdict
    })
}

/// A verdict written by [`kvm_verdict`] for `key`.
fn cached_verdict(text: &str, key: &str) -> Option<KvmVerdict> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    match lines.next()? {
        "usable" => Some(KvmVerdict::Usable),
        line => line
            .strip_prefix("unusable ")
            .map(|why| KvmVerdict::Unusable(why.to_string())),
    }
}

fn probe_kvm(runsc: &RunscBinary, scratch: &Path) -> KvmVerdict {
    if !Path::new("/dev/kvm").exists() {
        return KvmVerdict::Unusable("no /dev/kvm (enable virtualisation or load kvm_intel/kvm_amd)".into());
    }
    if !rustix::process::geteuid().is_root() {
        return KvmVerdict::Unusable("not probed (needs root)".into());
    }
    let Some(cgroup) = ProbeCgroup::create() else {
        return KvmVerdict::Unusable("not probed (no writable cgroup to contain the probe)".into());
    };
    let dir = scratch.join(format!("kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return KvmVerdict::Unusable(format!("not probed ({} is not writable)", dir.display()));
    }
    let mut command = Command::new(&runsc.path);
    command
        .arg(format!("--root={}", dir.join("root").display()))
        .args([
            "--platform=kvm",
            "--network=none",
            "--ignore-cgroups",
            "do",
            "/bin/true",
        ])
        // runsc do keeps its own state in TMPDIR: inside our directory, removed below.
        .env("TMPDIR", &dir)
        .stdin(Stdio::null());
    cgroup.join_before_exec(&mut command);
    let result = run_bounded(command, KVM_PROBE_TIMEOUT);
    cgroup.kill_all();
    drop(cgroup);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(output) if output.status.success() => KvmVerdict::Usable,
        Ok(output) => KvmVerdict::Unusable(format!(
            "runsc --platform=kvm failed ({})",
            last_line(&output.stderr)
        )),
        Err(BoundedError::TimedOut) => KvmVerdict::Unusable(format!(
            "/dev/kvm does not run guests here (runsc --platform=kvm hung for {}s)",
            KVM_PROBE_TIMEOUT.as_secs()
        )),
        Err(e) => KvmVerdict::Unusable(format!("not probed ({e})")),
    }
}

/// A cgroup holding one probe and everything it starts (any v2 tree, or v1's pids hierarchy).
struct ProbeCgroup {
    dir: PathBuf,
}

impl ProbeCgroup {
    fn create() -> Option<ProbeCgroup> {
        let layout = crate::process::CgroupLayout::detect(&crate::process::HostCgroupFs);
        let base = layout.v2_mount.clone().or_else(|| {
            layout
                .v1_mounts
                .iter()
                .find(|(c, _)| c.name() == "pids")
                .map(|(_, p)| p.clone())
        })?;
        let dir = base.join(format!("tartarus-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).ok()?;
        Some(ProbeCgroup { dir })
    }

    fn join_before_exec(&self, command: &mut Command) {
        if let Ok(procs) = std::ffi::CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        ) {
            tartarus_hostsys::join_cgroup_before_exec(command, procs);
        }
    }

    /// SIGKILLs every process in the cgroup until it is empty (bounded), reaping the ones we adopted.
    fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let procs = self.dir.join("cgroup.procs");
        while Instant::now() < deadline {
            let pids: Vec<i32> = std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            super::reap_adopted(&[]);
            // Killed tasks leave the cgroup asynchronously; a short pause between rounds, bounded above.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// How the sentry reaches a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkFlag {
    /// `--network=none`: loopback only, inside the sentry.
    None,
    /// `--network=sandbox`: gVisor's own stack, over the interfaces of the prepared namespace.
    Sandbox,
    /// `--network=host`, with runsc started inside the prepared namespace: the sentry's sockets are host
    /// sockets of that namespace (older runsc, see [`NETSTACK_RELEASE`]).
    HostInNamespace,
}

impl NetworkFlag {
    /// The egress mode this runsc supports best.
    pub fn egress_for(runsc: &RunscBinary) -> NetworkFlag {
        match runsc.version.release >= NETSTACK_RELEASE {
            true => NetworkFlag::Sandbox,
            false => NetworkFlag::HostInNamespace,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            NetworkFlag::None => "--network=none",
            NetworkFlag::Sandbox => "--network=sandbox",
            NetworkFlag::HostInNamespace => "--network=host",
        }
    }
}

/// Global flags of every invocation for one container.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub runsc: PathBuf,
    pub flags: Vec<String>,
    /// The network namespace every invocation runs in ([`NetworkFlag::HostInNamespace`]: the sandbox's
    /// control socket is an abstract one, scoped by namespace). Owned by the sandbox's network, which
    /// outlives every invocation.
    pub netns: Option<std::os::fd::RawFd>,
}

impl Invocation {
    /// `runsc --root=ROOT --platform=P --network=… [--overlay2=…] --log=LOG`.
    pub fn new(
        runsc: &RunscBinary,
        root: &Path,
        platform: GvisorPlatform,
        network: NetworkFlag,
        overlay_root: bool,
        log: &Path,
    ) -> Invocation {
        let mut flags = vec![
            format!("--root={}", root.display()),
            format!("--platform={platform}"),
            network.flag().to_string(),
            format!("--log={}", log.display()),
            "--log-format=json".to_string(),
        ];
        if overlay_root {
            flags.push("--overlay2=root:memory".into());
        }
        Invocation {
            runsc: runsc.path.clone(),
            flags,
            netns: None,
        }
    }

    /// A command for `runsc <global flags> <args>`, with stdin from /dev/null and output captured.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(&self.runsc);
        command.args(&self.flags).args(args).stdin(Stdio::null());
        if let Some(netns) = self.netns {
            tartarus_hostsys::enter_netns_before_exec(&mut command, netns);
        }
        command
    }

    /// Runs `runsc <flags> <args>` to its end (at most `timeout`); its stderr's last line on failure.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<std::process::Output, RunscError> {
        let what = args.first().copied().unwrap_or("").to_string();
        let output = run_bounded(self.command(args), timeout).map_err(|e| e.into_runsc(&what, timeout))?;
        if !output.status.success() {
            return Err(RunscError::Failed {
                what,
                message: last_line(&output.stderr),
            });
        }
        Ok(output)
    }
}

/// The last non-empty line of a program's output.
pub fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no message)")
        .trim()
        .to_string()
}

/// A bounded run that did not end well.
#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    #[error("cannot start it")]
    Spawn(#[source] io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("waiting for it failed")]
    Wait(#[source] io::Error),
}

impl BoundedError {
    fn into_runsc(self, what: &str, after: Duration) -> RunscError {
        match self {
            BoundedError::TimedOut => RunscError::TimedOut {
                what: what.to_string(),
                after,
            },
            BoundedError::Spawn(e) | BoundedError::Wait(e) => RunscError::Failed {
                what: what.to_string(),
                message: e.to_string(),
            },
        }
    }
}

/// Runs `command` with stdout and stderr captured, killing it (SIGKILL) if it is still running after
/// `timeout`.
pub fn run_bounded(mut command: Command, timeout: Duration) -> Result<std::process::Output, BoundedError> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(BoundedError::Spawn)?;
    let deadline = Instant::now() + timeout;
    let mut stdout = child.stdout.take().map(OwnedFd::from);
    let mut stderr = child.stderr.take().map(OwnedFd::from);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for fd in [&stdout, &stderr].into_iter().flatten() {
        let _ = rustix::io::ioctl_fionbio(fd, true);
    }
    while stdout.is_some() || stderr.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(kill_timed_out(&mut child));
        }
        let mut fds: Vec<PollFd<'_>> = [&stdout, &stderr]
            .into_iter()
            .flatten()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let ts = timespec(left);
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(BoundedError::Wait(e.into())),
        }
        drop(fds);
        for (slot, buf) in [(&mut stdout, &mut out), (&mut stderr, &mut err)] {
            if let Some(fd) = slot.as_ref() {
                if !drain(fd, buf) {
                    *slot = None;
                }
            }
        }
    }
    let status = wait_bounded(&mut child, deadline).map_err(|e| match e {
        Some(e) => BoundedError::Wait(e),
        None => BoundedError::TimedOut,
    });
    let status = match status {
        Ok(status) => status,
        Err(BoundedError::TimedOut) => return Err(kill_timed_out(&mut child)),
        Err(e) => return Err(e),
    };
    Ok(std::process::Output {
        status,
        stdout: out,
        stderr: err,
    })
}

fn kill_timed_out(child: &mut Child) -> BoundedError {
    let _ = child.kill();
    let _ = child.wait();
    BoundedError::TimedOut
}

/// Reads what is available; false at EOF (or an error).
fn drain(fd: &OwnedFd, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    loop {
        match rustix::io::read(fd, &mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::AGAIN) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Waits for `child` until `deadline` through a pidfd; `Err(None)` on timeout.
pub fn wait_bounded(child: &mut Child, deadline: Instant) -> Result<ExitStatus, Option<io::Error>> {
    let pid = rustix::process::Pid::from_child(child);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| Some(io::Error::from(e)))?;
    loop {
        if let Some(status) = child.try_wait().map_err(Some)? {
            return Ok(status);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(None);
        }
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timespec(left))) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Some(e.into())),
        }
    }
}

/// Whether `fd` became readable within `timeout` (`None`: wait forever).
pub fn readable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = timeout.map(timespec);
    loop {
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

pub fn timespec(d: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    }
}

/// Reads a whole small file that may not exist yet.
pub fn read_small(path: &Path) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path).ok()?.read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_versions_of_debian_upstream_and_plain_builds_parse_to_their_release_date() {
        let debian = parse_version("runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n").expect("debian");
        assert_eq!(debian.release, 20221219);
        assert_eq!(debian.text, "0.0~20221219.0");
        let upstream = parse_version("runsc version release-20240513.0\nspec: 1.1.0\n").expect("upstream");
        assert_eq!(upstream.release, 20240513);
        assert_eq!(
            parse_version("runsc version 20230101.0").map(|v| v.release),
            Some(20230101)
        );
        assert_eq!(parse_version("runc version 1.1.0"), None);
        assert_eq!(parse_version("runsc version dev"), None);
    }

    #[test]
    fn test_every_invocation_names_our_root_a_platform_and_a_network_mode() {
        let runsc = RunscBinary {
            path: "/usr/bin/runsc".into(),
            version: parse_version("runsc version 0.0~20221219.0").expect("version"),
            platforms: vec![GvisorPlatform::Ptrace, GvisorPlatform::Kvm],
        };
        let none = Invocation::new(
            &runsc,
            Path::new("/run/tartarus/gvisor/runsc"),
            GvisorPlatform::Ptrace,
            NetworkFlag::None,
            false,
            Path::new("/run/tartarus/gvisor/b/runsc.log"),
        );
        assert!(none
            .flags
            .contains(&"--root=/run/tartarus/gvisor/runsc".to_string()));
        assert!(none.flags.contains(&"--platform=ptrace".to_string()));
        assert!(none.flags.contains(&"--network=none".to_string()));
        assert!(!none.flags.iter().any(|f| f.starts_with("--overlay2")));
        let egress = Invocation::new(
            &runsc,
            Path::new("/r"),
            GvisorPlatform::Systrap,
            NetworkFlag::Sandbox,
            true,
            Path::new("/l"),
        );
        assert!(egress.flags.contains(&"--network=sandbox".to_string()));
        assert!(egress.flags.contains(&"--overlay2=root:memory".to_string()));
        let mut old = runsc.clone();
        assert_eq!(NetworkFlag::egress_for(&old), NetworkFlag::HostInNamespace);
        old.version.release = NETSTACK_RELEASE;
        assert_eq!(NetworkFlag::egress_for(&old), NetworkFlag::Sandbox);
    }

    fn binary(platforms: &[GvisorPlatform]) -> RunscBinary {
        RunscBinary {
            path: "/usr/bin/runsc".into(),
            version: parse_version("runsc version 0.0~20221219.0").expect("version"),
            platforms: platforms.to_vec(),
        }
    }

    #[test]
    fn test_systrap_is_chosen_without_probing_kvm() {
        use GvisorPlatform::*;
        let choice = choose(&binary(&[Systrap, Ptrace, Kvm]), None, || panic!("kvm probed")).expect("choice");
        assert_eq!(choice.platform, Systrap);
    }

    #[test]
    fn test_kvm_is_chosen_when_it_runs_guests_and_ptrace_otherwise_with_the_reasons() {
        use GvisorPlatform::*;
        let old = binary(&[Kvm, Ptrace]);
        assert_eq!(
            choose(&old, None, || KvmVerdict::Usable)
                .expect("choice")
                .platform,
            Kvm
        );
        let choice = choose(&old, None, || {
            KvmVerdict::Unusable("/dev/kvm does not run guests here".into())
        })
        .expect("choice");
        assert_eq!(choice.platform, Ptrace);
        assert_eq!(
            choice.detail,
            "platform ptrace (systrap: not in runsc 0.0~20221219.0; kvm: /dev/kvm does not run guests here)"
        );
    }

    #[test]
    fn test_a_configured_platform_is_checked() {
        use GvisorPlatform::*;
        let old = binary(&[Kvm, Ptrace]);
        let err = choose(&old, Some(Systrap), || KvmVerdict::Usable).expect_err("no systrap");
        assert_eq!(
            err.to_string(),
            "platform systrap does not work here: runsc 0.0~20221219.0 does not have it"
        );
        let err = choose(&old, Some(Kvm), || KvmVerdict::Unusable("no /dev/kvm".into())).expect_err("no kvm");
        assert_eq!(err.to_string(), "platform kvm does not work here: no /dev/kvm");
        let ok = choose(&old, Some(Ptrace), || panic!("kvm probed")).expect("ptrace");
        assert_eq!(ok.detail, "platform ptrace (configured)");
    }

    #[test]
    fn test_a_cached_kvm_verdict_counts_only_for_its_boot_and_binary() {
        let text = "boot1 /usr/bin/runsc 0.0~20221219.0\nunusable /dev/kvm does not run guests here\n";
        assert_eq!(
            cached_verdict(text, "boot1 /usr/bin/runsc 0.0~20221219.0"),
            Some(KvmVerdict::Unusable("/dev/kvm does not run guests here".into()))
        );
        assert_eq!(cached_verdict(text, "boot2 /usr/bin/runsc 0.0~20221219.0"), None);
        assert_eq!(cached_verdict("k\nusable\n", "k"), Some(KvmVerdict::Usable));
        assert_eq!(cached_verdict("k\n", "k"), None);
    }

    #[test]
    fn test_cached_runsc_answers_count_only_for_the_same_binary_and_boot() {
        let text = "/usr/bin/runsc 1 2.3 boot\nrunsc version 0.0~20221219.0\nkvm ptrace\n";
        let (version, platforms) = cached_info(text, "/usr/bin/runsc 1 2.3 boot").expect("hit");
        assert_eq!(parse_version(&version).map(|v| v.release), Some(20221219));
        assert_eq!(platforms, [GvisorPlatform::Kvm, GvisorPlatform::Ptrace]);
        assert_eq!(cached_info(text, "/usr/local/bin/runsc 1 2.3 boot"), None);
    }

    #[test]
    fn test_a_bounded_run_that_overstays_is_killed_and_reported() {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "exec sleep 30"]);
        let started = Instant::now();
        let result = run_bounded(command, Duration::from_millis(200));
        assert!(matches!(result, Err(BoundedError::TimedOut)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let output = run_bounded(command, Duration::from_secs(10)).expect("ran");
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(last_line(&output.stderr), "err");
    }
}
