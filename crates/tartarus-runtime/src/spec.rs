//! What a sandbox should be: the validated description every runtime backend receives.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
pub use tartarus_network::{ContractError, EgressContract};

/// Where the sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootSpec {
    /// Read-only binds of the host's `/usr` (and `/bin`, `/lib*`, `/sbin`), a generated minimal `/etc`.
    HostSystem,
    /// A directory on the host used as the read-only root (an overlay keeps it untouched).
    Directory(PathBuf),
    /// Unpacked image layers on the host, bottom layer first, stacked read-only under an overlay whose
    /// upper layer lives in the sandbox's scratch tmpfs: the root is writable and every write vanishes
    /// with the sandbox. Each directory is used as an overlayfs lower layer (whiteouts as 0:0 devices,
    /// opaque directories marked with `user.overlay.opaque`).
    Layers(Vec<PathBuf>),
}

/// Who the command runs as inside the sandbox (ids of the sandbox's user namespace, below 65536).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
}

impl Default for SandboxSpec {
    /// The defaults of [`SandboxSpec::new`] with no command (valid only for a service sandbox).
    fn default() -> Self {
        SandboxSpec::new(Vec::new())
    }
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute, normalised path inside the sandbox.
    pub target: PathBuf,
    pub writable: bool,
}

/// Network exposure of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// A private network namespace with only its own loopback interface.
    #[default]
    None,
    /// Shares the host's network namespace: host services on 127.0.0.1 are reachable (and so is every
    /// other interface). For trusted tools that must talk to a local service.
    HostLoopback,
    /// Its own network namespace with `eth0` behind the host's NAT, filtered by the contract (root only;
    /// see docs/network.md).
    Egress(EgressContract),
}

/// Resource limits enforced through cgroups, as the caller asked for them. `None` means "not asked":
/// the sandbox then runs with the default ([`DEFAULT_MEMORY_BYTES`], [`DEFAULT_PIDS`], a fair CPU share of
/// [`DEFAULT_CPU_WEIGHT`]) unless [`SandboxSpec::unlimited`] lifts it; [`SandboxSpec::applied_limits`]
/// says what a sandbox really gets.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory of every process, the scratch tmpfs pages included.
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in cores (0.5 = half of one core): a quota, only when asked.
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
}

impl ResourceLimits {
    /// Whether the caller asked for any limit (defaults do not count).
    pub fn any(&self) -> bool {
        self.memory_bytes.is_some() || self.cpus.is_some() || self.pids.is_some()
    }
}

/// Default limits a trusted caller lifts on purpose: each `true` runs the sandbox without that limit
/// instead of its default (`tartarus run --pids unlimited`). Nothing here is ever set from an API request
/// by default; it exists for operators who really mean "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Unlimited {
    /// No memory limit (the scratch tmpfs is then charged to nobody's limit but its own size cap).
    pub memory: bool,
    /// No CPU cgroup at all: neither a quota nor the default fair-share weight.
    pub cpu: bool,
    /// No pids cgroup and no `RLIMIT_NPROC`.
    pub pids: bool,
}

impl Unlimited {
    /// Nothing lifted: every default applies.
    pub fn is_none(&self) -> bool {
        *self == Unlimited::default()
    }
}

/// Where one limit of a sandbox comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Applied<T> {
    /// The spec asked for it: enforced, or the sandbox does not start.
    Requested(T),
    /// The spec left it unset: the runtime's default. A root supervisor enforces it (or refuses to
    /// start); a rootless one enforces only what needs no cgroup (see docs/process-sandbox.md).
    Default(T),
    /// Lifted on purpose ([`SandboxSpec::unlimited`]).
    Lifted,
}

impl<T: Copy> Applied<T> {
    /// The limit's value, unless lifted.
    pub fn value(&self) -> Option<T> {
        match *self {
            Applied::Requested(v) | Applied::Default(v) => Some(v),
            Applied::Lifted => None,
        }
    }

    pub fn is_default(&self) -> bool {
        matches!(self, Applied::Default(_))
    }

    fn from(asked: Option<T>, lifted: bool, default: T) -> Applied<T> {
        match (asked, lifted) {
            (Some(v), _) => Applied::Requested(v),
            (None, true) => Applied::Lifted,
            (None, false) => Applied::Default(default),
        }
    }
}

/// The limits a sandbox runs with: the spec's, the defaults for what it leaves unset, nothing for what it
/// lifts ([`SandboxSpec::applied_limits`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppliedLimits {
    pub memory_bytes: Applied<u64>,
    /// CPU quota in cores; only when the spec asks for one (`limits.cpus`).
    pub cpu_quota: Option<f64>,
    /// CPU weight on the cgroup v2 scale (`cpu.weight`; v1 `cpu.shares` is 1024 per 100).
    pub cpu_weight: Applied<u64>,
    pub pids: Applied<u64>,
}

/// Per-process rlimits applied to the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessLimits {
    pub open_files: u64,
    pub file_size_bytes: u64,
}

impl Default for ProcessLimits {
    fn default() -> Self {
        ProcessLimits {
            open_files: 1024,
            file_size_bytes: 4 << 30,
        }
    }
}

/// The validated description of one sandbox. Build it with [`SandboxSpec::new`] and validate it with
/// [`SandboxSpec::validate`] (runtimes call it again in `prepare`).
///
/// # Stored specs and versions
///
/// Specs are stored as JSON (sandbox records, `spec.json` beside a shim) and sent to node agents, so a
/// spec may be read by an older or a newer version than the one that wrote it. The rule:
///
/// - **To execute** a spec (the shim reading `spec.json`, a node agent receiving one) every field must
///   be understood: a field this version does not know, at any depth, is refused with an error naming it
///   ([`SandboxSpec::from_json_strict`]; serde's `Deserialize` for this type is the same strict reading,
///   so a spec inside a request body is refused too). Fail closed: a newer restriction is never dropped.
/// - **To read a record** (accounting, redaction, placement, display) unknown fields are ignored and
///   reported ([`SandboxSpec::from_stored_json`] returns their paths), so that a downgrade or a mixed-version
///   cluster can still count and show what it stored.
/// - **A field added later must read from older records**: every field takes its [`SandboxSpec::new`]
///   default when absent (`#[serde(default)]` on the struct; nested structs that gain a field need a
///   default for it too). Since the first version that stored specs (through `service`), `user`,
///   `denied_syscalls` and `writable_paths` were added; the tests read a record of that first form.
/// - A new enum variant (a root or network kind) cannot be read by older versions at all: that is a
///   [`SpecDecodeError::Json`] on both paths, never a default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxSpec {
    /// argv; `command[0]` is resolved through the sandbox's `PATH` when it has no `/`.
    pub command: Vec<String>,
    /// The complete environment: nothing is inherited from the host.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox; the sandbox user's home when `None`.
    pub workdir: Option<PathBuf>,
    pub root: RootSpec,
    pub mounts: Vec<BindMount>,
    pub network: NetworkMode,
    pub limits: ResourceLimits,
    pub process_limits: ProcessLimits,
    pub timeout: Option<Duration>,
    /// How long the sandbox's processes get between SIGTERM and SIGKILL when `timeout` ends it;
    /// [`DEFAULT_TIMEOUT_GRACE`] when `None`, zero kills at once. Written only when set, so that versions
    /// that predate it keep executing every spec that leaves it alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_grace: Option<Duration>,
    /// Give the command a terminal (the caller passes the terminal's slave side as stdio).
    pub tty: bool,
    /// Size cap of each writable tmpfs (`/tmp`, home, `/dev/shm`).
    pub scratch_bytes: u64,
    pub hostname: String,
    /// Keep init running after setup to serve exec requests ([`crate::ServiceSandbox::exec`]); the
    /// command is then optional and, if given, ends the sandbox when it exits.
    pub service: bool,
    /// The command's user; [`SANDBOX_UID`] when `None`. Only honoured when the supervisor is root (a
    /// rootless sandbox maps just one id, the sandbox user).
    pub user: Option<SandboxUser>,
    /// Syscalls denied on top of the built-in list (a policy's additions, e.g. for quarantine); names from
    /// [`crate::process::DENIED_SYSCALLS`] or [`crate::process::EXTRA_DENIABLE_SYSCALLS`].
    pub denied_syscalls: Vec<String>,
    /// Where Landlock lets the sandbox write (besides `:rw` mounts and devices), replacing the defaults
    /// (`/tmp`, home and `/dev/shm`, or the whole root of an image) when non-empty: a policy's narrower set.
    pub writable_paths: Vec<PathBuf>,
    /// Default limits lifted on purpose. Written only when something is lifted, so that versions that
    /// predate it keep executing every spec that lifts nothing (and refuse, as unknown, one that does).
    #[serde(skip_serializing_if = "Unlimited::is_none")]
    pub unlimited: Unlimited,
    /// The sandbox user's name in the generated `/etc/passwd` (host-system root), with the home
    /// `/home/NAME`; `sandbox` (home [`SANDBOX_HOME`]) when `None`. Written only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
}

/// How serde reads a [`SandboxSpec`]'s fields, with no check for unknown ones: both readings start here.
/// serde's `remote` keeps the two in step (a field missing here, or of another type, does not compile).
#[derive(Deserialize)]
#[serde(remote = "SandboxSpec", default = "SandboxSpec::default")]
struct SpecFields {
    command: Vec<String>,
    env: Vec<(String, String)>,
    workdir: Option<PathBuf>,
    root: RootSpec,
    mounts: Vec<BindMount>,
    network: NetworkMode,
    limits: ResourceLimits,
    process_limits: ProcessLimits,
    timeout: Option<Duration>,
    timeout_grace: Option<Duration>,
    tty: bool,
    scratch_bytes: u64,
    hostname: String,
    service: bool,
    user: Option<SandboxUser>,
    denied_syscalls: Vec<String>,
    writable_paths: Vec<PathBuf>,
    unlimited: Unlimited,
    user_name: Option<String>,
}

/// Reads a spec and the paths of the fields it ignored (`mounts.0.recursive`).
fn read_fields<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(SandboxSpec, Vec<String>), D::Error> {
    let mut ignored = Vec::new();
    let mut note = |path: serde_ignored::Path| ignored.push(field_path(&path));
    let spec = SpecFields::deserialize(serde_ignored::Deserializer::new(deserializer, &mut note))?;
    Ok((spec, ignored))
}

/// A field's path as dotted keys and indices, without the `?` that `serde_ignored` shows for an
/// `Option` or an enum's content.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    let (parent, segment) = match path {
        Path::Root => return String::new(),
        Path::Seq { parent, index } => (*parent, index.to_string()),
        Path::Map { parent, key } => (*parent, key.clone()),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            return field_path(parent)
        }
    };
    match field_path(parent) {
        prefix if prefix.is_empty() => segment,
        prefix => format!("{prefix}.{segment}"),
    }
}

/// Strict, as for executing: a field this version does not know, at any depth, is an error naming it.
impl<'de> Deserialize<'de> for SandboxSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match read_fields(deserializer)? {
            (spec, unknown) if unknown.is_empty() => Ok(spec),
            (_, unknown) => Err(D::Error::custom(SpecDecodeError::UnknownFields(unknown))),
        }
    }
}

/// A spec that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecDecodeError {
    /// Not JSON, a value of the wrong type, or an enum variant this version does not know.
    #[error("unreadable sandbox spec")]
    Json(#[from] serde_json::Error),
    /// Fields this version does not know (paths like `mounts.0.recursive`): refused for execution.
    #[error("sandbox spec fields unknown to this version (written by a newer one?): {}", .0.join(", "))]
    UnknownFields(Vec<String>),
}

/// The uid and gid the command runs as inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// Home directory of the sandbox user.
pub const SANDBOX_HOME: &str = "/home/sandbox";
/// The sandbox user's name unless the spec names it ([`SandboxSpec::user_name`]).
pub const SANDBOX_USER_NAME: &str = "sandbox";
/// Most image layers one root may stack (overlayfs takes up to 500; the mount options must fit a page).
pub const MAX_LAYERS: usize = 128;
/// `PATH` given to the command when the caller sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Processes and threads of a sandbox whose spec sets no pids limit: room for a build or a test suite,
/// far below any host's `pid_max`, so one sandbox's fork bomb cannot starve the host or its neighbours.
pub const DEFAULT_PIDS: u64 = 256;
/// Memory of a sandbox whose spec sets no limit, its scratch tmpfs pages included.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// CPU weight of every sandbox unless lifted, on the cgroup v2 scale (1-10000; 100 is the kernel's own
/// default): each sandbox gets the same share of contended CPU however many processes it runs. There
/// is no quota unless the spec asks for one.
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// Most CPU cores a sandbox may ask for (`limits.cpus` is in (0, `MAX_CPUS`]).
pub const MAX_CPUS: f64 = 64.0;
/// Least memory a sandbox may ask for: what a process and its init need.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// Most memory a sandbox may ask for.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// Fewest processes a sandbox may ask for: its init and the command.
pub const MIN_PIDS: u64 = 2;
/// Most processes a sandbox may ask for.
pub const MAX_PIDS: u64 = 1_000_000;
/// Longest timeout a sandbox may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
/// Time between SIGTERM and SIGKILL when a sandbox's timeout ends it, unless the spec says otherwise.
pub const DEFAULT_TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// Longest grace period a timeout may give.
pub const MAX_TIMEOUT_GRACE: Duration = Duration::from_secs(300);

/// A spec that cannot run, with what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("no command given: put it after `--`, e.g. `tartarus run -- /bin/echo hi`")]
    EmptyCommand,
    #[error("invalid user name '{0}': 1-32 of a-z, 0-9, '_' and '-', starting with a letter or '_', and not root or nobody")]
    UserName(String),
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("invalid environment variable name '{0}': it must be non-empty and contain no '='")]
    EnvName(String),
    #[error("{what} '{path}' must be an absolute path without '..' (e.g. /work)")]
    SandboxPath { what: &'static str, path: String },
    #[error("--cpus {0} is out of range: give a positive number of cores, at most {MAX_CPUS} (e.g. 0.5)")]
    Cpus(f64),
    #[error("--memory {0} bytes is out of range: give between 4 MiB (what a process needs) and 1 TiB")]
    Memory(u64),
    #[error("--pids {0} is out of range: give between {MIN_PIDS} (the sandbox init and the command) and {MAX_PIDS}")]
    Pids(u64),
    #[error("timeout {0:?} is out of range: give more than zero and at most 7 days (e.g. 30s)")]
    Timeout(Duration),
    #[error(
        "timeout grace {0:?} is out of range: give at most 300 s (0 kills at once when the timeout ends)"
    )]
    TimeoutGrace(Duration),
    #[error("the {0} limit is both set and lifted (unlimited): drop one of the two")]
    LimitAndUnlimited(&'static str),
    #[error("scratch size must be between 1 MiB and 1 TiB")]
    Scratch,
    #[error("user {0}:{1} is out of range: sandbox ids are below 65536")]
    User(u32, u32),
    #[error("an image root needs between 1 and {MAX_LAYERS} layers, not {0}")]
    Layers(usize),
    #[error("hostname '{0}' is not a valid host name (1-63 letters, digits or '-')")]
    Hostname(String),
    #[error(transparent)]
    Network(#[from] ContractError),
}

impl SandboxSpec {
    /// A spec with safe defaults for `command`: host system root, no network, no inherited environment.
    pub fn new(command: Vec<String>) -> Self {
        SandboxSpec {
            command,
            env: Vec::new(),
            workdir: None,
            root: RootSpec::HostSystem,
            mounts: Vec::new(),
            network: NetworkMode::None,
            limits: ResourceLimits::default(),
            process_limits: ProcessLimits::default(),
            timeout: None,
            timeout_grace: None,
            tty: false,
            scratch_bytes: 256 << 20,
            hostname: "sandbox".to_string(),
            service: false,
            user: None,
            denied_syscalls: Vec::new(),
            writable_paths: Vec::new(),
            unlimited: Unlimited::default(),
            user_name: None,
        }
    }

    /// The time between SIGTERM and SIGKILL when the timeout ends this sandbox.
    pub fn effective_timeout_grace(&self) -> Duration {
        self.timeout_grace.unwrap_or(DEFAULT_TIMEOUT_GRACE)
    }

    /// The limits this sandbox runs with: what the spec asks for, the defaults for what it leaves unset
    /// ([`DEFAULT_MEMORY_BYTES`], [`DEFAULT_PIDS`], [`DEFAULT_CPU_WEIGHT`]), nothing for what it lifts.
    /// Schedulers and quotas should count these, not `limits`.
    pub fn applied_limits(&self) -> AppliedLimits {
        let (asked, lifted) = (&self.limits, &self.unlimited);
        AppliedLimits {
            memory_bytes: Applied::from(asked.memory_bytes, lifted.memory, DEFAULT_MEMORY_BYTES),
            cpu_quota: asked.cpus,
            cpu_weight: Applied::from(None, lifted.cpu, DEFAULT_CPU_WEIGHT),
            pids: Applied::from(asked.pids, lifted.pids, DEFAULT_PIDS),
        }
    }

    /// Reads a spec to execute it: every field must be known (see [`SandboxSpec`]'s rule).
    pub fn from_json_strict(json: &str) -> Result<SandboxSpec, SpecDecodeError> {
        match Self::read_json(json)? {
            (spec, unknown) if unknown.is_empty() => Ok(spec),
            (_, unknown) => Err(SpecDecodeError::UnknownFields(unknown)),
        }
    }

    /// Reads a stored spec for accounting, redaction, placement or display: fields this version does not
    /// know are ignored, and their paths returned so that the caller can report them.
    pub fn from_stored_json(json: &str) -> Result<(SandboxSpec, Vec<String>), SpecDecodeError> {
        Self::read_json(json)
    }

    fn read_json(json: &str) -> Result<(SandboxSpec, Vec<String>), SpecDecodeError> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let read = read_fields(&mut deserializer)?;
        deserializer.end()?;
        Ok(read)
    }

    /// Checks everything that can be checked without touching the host.
    /// The sandbox user's name (`sandbox` by default).
    pub fn user_name(&self) -> &str {
        self.user_name.as_deref().unwrap_or(SANDBOX_USER_NAME)
    }

    /// The sandbox user's home: [`SANDBOX_HOME`], or `/home/NAME` for a [`SandboxSpec::user_name`].
    pub fn home(&self) -> String {
        match &self.user_name {
            Some(name) => format!("/home/{name}"),
            None => SANDBOX_HOME.to_string(),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.command.is_empty() && !self.service {
            return Err(SpecError::EmptyCommand);
        }
        if let Some(name) = &self.user_name {
            let mut chars = name.chars();
            let valid = name.len() <= 32
                && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
                && name != "root"
                && name != "nobody";
            if !valid {
                return Err(SpecError::UserName(name.clone()));
            }
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::NulByte { what: "the command" });
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') {
                return Err(SpecError::EnvName(key.clone()));
            }
            if key.contains('\0') || value.contains('\0') {
                return Err(SpecError::NulByte {
                    what: "an environment variable",
                });
            }
        }
        if let Some(dir) = &self.workdir {
            check_sandbox_path("--workdir", dir)?;
        }
        for path in &self.writable_paths {
            check_sandbox_path("writable path", path)?;
        }
        if let Some(user) = self.user {
            if user.uid >= 65536 || user.gid >= 65536 {
                return Err(SpecError::User(user.uid, user.gid));
            }
        }
        if let RootSpec::Layers(layers) = &self.root {
            if layers.is_empty() || layers.len() > MAX_LAYERS {
                return Err(SpecError::Layers(layers.len()));
            }
        }
        for mount in &self.mounts {
            check_sandbox_path("mount target", &mount.target)?;
            if mount.target == Path::new("/") {
                return Err(SpecError::SandboxPath {
                    what: "mount target",
                    path: "/".into(),
                });
            }
        }
        if let Some(cpus) = self.limits.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= MAX_CPUS) {
                return Err(SpecError::Cpus(cpus));
            }
        }
        if let Some(memory) = self.limits.memory_bytes {
            if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&memory) {
                return Err(SpecError::Memory(memory));
            }
        }
        if let Some(pids) = self.limits.pids {
            if !(MIN_PIDS..=MAX_PIDS).contains(&pids) {
                return Err(SpecError::Pids(pids));
            }
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > MAX_TIMEOUT {
                return Err(SpecError::Timeout(timeout));
            }
        }
        if let Some(grace) = self.timeout_grace {
            if grace > MAX_TIMEOUT_GRACE {
                return Err(SpecError::TimeoutGrace(grace));
            }
        }
        for (set, lifted, name) in [
            (
                self.limits.memory_bytes.is_some(),
                self.unlimited.memory,
                "memory",
            ),
            (self.limits.cpus.is_some(), self.unlimited.cpu, "cpu"),
            (self.limits.pids.is_some(), self.unlimited.pids, "pids"),
        ] {
            if set && lifted {
                return Err(SpecError::LimitAndUnlimited(name));
            }
        }
        if !(1 << 20..=1 << 40).contains(&self.scratch_bytes) {
            return Err(SpecError::Scratch);
        }
        let host_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 63
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !host_ok {
            return Err(SpecError::Hostname(self.hostname.clone()));
        }
        if let NetworkMode::Egress(contract) = &self.network {
            contract.validate()?;
        }
        Ok(())
    }

    /// The value of `key` in the sandbox environment.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn check_sandbox_path(what: &'static str, path: &Path) -> Result<(), SpecError> {
    let bad = || SpecError::SandboxPath {
        what,
        path: path.display().to_string(),
    };
    if !path.is_absolute() {
        return Err(bad());
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad());
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(SpecError::NulByte { what });
    }
    Ok(())
}

/// Normalises an absolute sandbox path: drops `.` and repeated slashes (`..` is rejected by validation).
pub fn normalize_sandbox_path(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec::new(vec!["/bin/true".into()])
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn empty_command_is_rejected() {
        assert_eq!(SandboxSpec::new(vec![]).validate(), Err(SpecError::EmptyCommand));
    }

    #[test]
    fn mount_targets_with_dotdot_or_relative_are_rejected() {
        for target in ["/data/../etc", "data", "/"] {
            let mut s = spec();
            s.mounts.push(BindMount {
                source: "/tmp".into(),
                target: target.into(),
                writable: false,
            });
            assert!(
                matches!(s.validate(), Err(SpecError::SandboxPath { .. })),
                "{target}"
            );
        }
    }

    #[test]
    fn absurd_limits_are_rejected() {
        let mut s = spec();
        s.limits.cpus = Some(0.0);
        assert_eq!(s.validate(), Err(SpecError::Cpus(0.0)));
        let mut s = spec();
        s.limits.memory_bytes = Some(1024);
        assert_eq!(s.validate(), Err(SpecError::Memory(1024)));
        let mut s = spec();
        s.limits.pids = Some(1);
        assert_eq!(s.validate(), Err(SpecError::Pids(1)));
    }

    #[test]
    fn test_limits_are_accepted_at_their_bounds_and_refused_just_past_them() {
        let with = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut s = spec();
            f(&mut s);
            s.validate()
        };
        assert_eq!(with(&|s| s.limits.cpus = Some(MAX_CPUS)), Ok(()));
        assert_eq!(
            with(&|s| s.limits.cpus = Some(64.01)),
            Err(SpecError::Cpus(64.01))
        );
        assert!(with(&|s| s.limits.cpus = Some(f64::NAN)).is_err());
        assert_eq!(with(&|s| s.limits.memory_bytes = Some(MIN_MEMORY_BYTES)), Ok(()));
        assert_eq!(with(&|s| s.limits.memory_bytes = Some(MAX_MEMORY_BYTES)), Ok(()));
        assert_eq!(
            with(&|s| s.limits.memory_bytes = Some(MAX_MEMORY_BYTES + 1)),
            Err(SpecError::Memory(MAX_MEMORY_BYTES + 1))
        );
        assert_eq!(with(&|s| s.limits.pids = Some(MIN_PIDS)), Ok(()));
        assert_eq!(with(&|s| s.limits.pids = Some(MAX_PIDS)), Ok(()));
        assert_eq!(
            with(&|s| s.limits.pids = Some(MAX_PIDS + 1)),
            Err(SpecError::Pids(MAX_PIDS + 1))
        );
        assert_eq!(with(&|s| s.timeout = Some(MAX_TIMEOUT)), Ok(()));
        let past = MAX_TIMEOUT + Duration::from_secs(1);
        assert_eq!(with(&|s| s.timeout = Some(past)), Err(SpecError::Timeout(past)));
        assert_eq!(
            with(&|s| s.timeout = Some(Duration::ZERO)),
            Err(SpecError::Timeout(Duration::ZERO))
        );
    }

    #[test]
    fn test_unset_limits_get_the_defaults_and_lifted_ones_none() {
        let applied = spec().applied_limits();
        assert_eq!(applied.memory_bytes, Applied::Default(DEFAULT_MEMORY_BYTES));
        assert_eq!(applied.pids, Applied::Default(DEFAULT_PIDS));
        assert_eq!(applied.cpu_weight, Applied::Default(DEFAULT_CPU_WEIGHT));
        assert_eq!(applied.cpu_quota, None);

        let mut s = spec();
        s.limits.pids = Some(32);
        s.limits.cpus = Some(0.5);
        s.unlimited.memory = true;
        let applied = s.applied_limits();
        assert_eq!(applied.pids, Applied::Requested(32));
        assert_eq!(applied.cpu_quota, Some(0.5));
        assert_eq!(applied.cpu_weight, Applied::Default(DEFAULT_CPU_WEIGHT));
        assert_eq!(applied.memory_bytes, Applied::Lifted);
        assert_eq!(applied.memory_bytes.value(), None);
    }

    #[test]
    fn test_a_limit_both_set_and_lifted_is_refused() {
        let mut s = spec();
        s.limits.pids = Some(32);
        s.unlimited.pids = true;
        assert_eq!(s.validate(), Err(SpecError::LimitAndUnlimited("pids")));
    }

    #[test]
    fn test_unlimited_is_written_only_when_something_is_lifted() {
        let text = serde_json::to_string(&spec()).expect("serialize");
        assert!(!text.contains("unlimited"), "{text}");
        let mut s = spec();
        s.unlimited.cpu = true;
        let text = serde_json::to_string(&s).expect("serialize");
        assert!(
            text.contains(r#""unlimited":{"memory":false,"cpu":true,"pids":false}"#),
            "{text}"
        );
        assert_eq!(SandboxSpec::from_json_strict(&text).expect("strict reading"), s);
    }

    #[test]
    fn env_names_with_equals_are_rejected() {
        let mut s = spec();
        s.env.push(("A=B".into(), "c".into()));
        assert_eq!(s.validate(), Err(SpecError::EnvName("A=B".into())));
    }

    #[test]
    fn egress_cidrs_are_validated() {
        let mut s = spec();
        s.network = NetworkMode::Egress(EgressContract {
            allowed_cidrs: vec!["203.0.113.0/24".into(), "2001:db8::/32".into()],
            ..EgressContract::default()
        });
        assert_eq!(s.validate(), Ok(()));
        for bad in ["203.0.113.1/24", "300.0.0.0/8", "2001:db8::1/32", "10.0.0.0/33"] {
            let mut s = spec();
            s.network = NetworkMode::Egress(EgressContract {
                denied_cidrs: vec![bad.into()],
                ..EgressContract::default()
            });
            let err = s.validate().expect_err(bad).to_string();
            assert!(err.starts_with(&format!("denied CIDR: '{bad}' ")), "{err}");
        }
    }

    #[test]
    fn egress_round_trips_through_json() {
        let mut s = spec();
        s.network = NetworkMode::Egress(EgressContract {
            allowed_ports: vec![443],
            dns: true,
            ..EgressContract::default()
        });
        let text = serde_json::to_string(&s).expect("serialize");
        assert!(text.contains(r#""network":{"egress":{"#), "{text}");
        assert_eq!(serde_json::from_str::<SandboxSpec>(&text).expect("parse"), s);
        let none: SandboxSpec = serde_json::from_str(r#"{"command":["x"],"network":"none"}"#).expect("none");
        assert_eq!(none.network, NetworkMode::None);
    }

    #[test]
    fn test_a_spec_read_from_json_writes_back_to_the_same_numbers() {
        // Found by the sandbox_spec fuzz target: without serde_json's float_roundtrip, `1e-030` reads as
        // one f64, is written as its shortest form, and that form reads back as the next f64.
        for cpus in [
            "1e-030",
            "9.999999999999999e-31",
            "0.30000000000000004",
            "63.99999999999999",
        ] {
            let spec = SandboxSpec::from_json_strict(&format!(
                r#"{{"command": ["x"], "limits": {{"cpus": {cpus}}}}}"#
            ))
            .expect("a spec");
            let written = serde_json::to_string(&spec).expect("serialize");
            let again = SandboxSpec::from_json_strict(&written).expect("read back");
            assert_eq!(again.limits.cpus, spec.limits.cpus, "{cpus} written as {written}");
        }
    }

    /// A record as the first version that stored specs wrote it: only the fields it had.
    const FIRST_STORED_FORM: &str = r#"{
        "command": ["/bin/sh", "-c", "echo hi"],
        "env": [["PATH", "/usr/bin:/bin"], ["API_TOKEN", "s3cret"]],
        "workdir": "/work",
        "root": "HostSystem",
        "mounts": [{"source": "/srv/data", "target": "/data", "writable": false}],
        "network": "none",
        "limits": {"memory_bytes": 268435456, "cpus": 0.5, "pids": 64},
        "process_limits": {"open_files": 1024, "file_size_bytes": 4294967296},
        "timeout": {"secs": 30, "nanos": 0},
        "tty": false,
        "scratch_bytes": 268435456,
        "hostname": "sandbox",
        "service": true
    }"#;

    /// A record as a later version might write it: this version's fields, and some it does not know, at
    /// the top, in a list, in an `Option` and in an enum's content.
    const FUTURE_FORM: &str = r#"{
        "command": ["/bin/true"],
        "env": [["API_TOKEN", "s3cret"]],
        "mounts": [{"source": "/srv/data", "target": "/data", "writable": true, "recursive_read_only": true}],
        "network": {"egress": {"allowed_ports": [443], "dns": true, "burst_kbps": 64}},
        "limits": {"memory_bytes": 268435456, "cpus": 2.0, "pids": 64, "io_weight": 10},
        "user": {"uid": 1000, "gid": 1000, "supplementary_gids": [27]},
        "denied_syscalls": ["ptrace"],
        "syscall_profile": {"deny": ["io_uring_setup"]}
    }"#;

    const FUTURE_FIELDS: [&str; 5] = [
        "mounts.0.recursive_read_only",
        "network.burst_kbps",
        "limits.io_weight",
        "user.supplementary_gids",
        "syscall_profile",
    ];

    fn first_stored_spec() -> SandboxSpec {
        SandboxSpec {
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("API_TOKEN".into(), "s3cret".into()),
            ],
            workdir: Some("/work".into()),
            mounts: vec![BindMount {
                source: "/srv/data".into(),
                target: "/data".into(),
                writable: false,
            }],
            limits: ResourceLimits {
                memory_bytes: Some(256 << 20),
                cpus: Some(0.5),
                pids: Some(64),
            },
            timeout: Some(Duration::from_secs(30)),
            service: true,
            ..SandboxSpec::new(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()])
        }
    }

    #[test]
    fn test_a_record_of_the_first_stored_form_reads_to_execute_and_to_read() {
        let strict = SandboxSpec::from_json_strict(FIRST_STORED_FORM).expect("strict reading");
        let (stored, ignored) = SandboxSpec::from_stored_json(FIRST_STORED_FORM).expect("stored reading");
        assert_eq!(strict, first_stored_spec());
        assert_eq!(stored, first_stored_spec());
        assert!(ignored.is_empty(), "{ignored:?}");
        // The fields added since take their defaults.
        assert_eq!(strict.user, None);
        assert!(strict.denied_syscalls.is_empty() && strict.writable_paths.is_empty());
    }

    #[test]
    fn test_every_field_may_be_absent_and_then_takes_its_default() {
        let full = serde_json::to_value(SandboxSpec::new(vec!["/bin/true".into()])).expect("serialize");
        let default = serde_json::to_value(SandboxSpec::default()).expect("serialize");
        let fields = full.as_object().expect("an object");
        assert!(fields.contains_key("writable_paths"), "{fields:?}");
        for name in fields.keys() {
            let mut without = full.clone();
            without.as_object_mut().expect("an object").remove(name);
            let read = SandboxSpec::from_json_strict(&without.to_string())
                .unwrap_or_else(|e| panic!("a record without '{name}' must read: {e}"));
            let read = serde_json::to_value(read).expect("serialize");
            assert_eq!(
                read[name], default[name],
                "'{name}' takes its default when absent"
            );
        }
    }

    #[test]
    fn test_unknown_fields_are_refused_to_execute_naming_them() {
        match SandboxSpec::from_json_strict(FUTURE_FORM) {
            Err(SpecDecodeError::UnknownFields(fields)) => assert_eq!(fields, FUTURE_FIELDS),
            other => panic!("expected unknown fields, got {other:?}"),
        }
        // serde's reading (a spec inside a request body, spec.json) is the strict one.
        let err = serde_json::from_str::<SandboxSpec>(FUTURE_FORM)
            .expect_err("a spec with unknown fields must not deserialize")
            .to_string();
        for field in FUTURE_FIELDS {
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn test_unknown_fields_are_ignored_and_reported_to_read_a_record() {
        let (spec, ignored) = SandboxSpec::from_stored_json(FUTURE_FORM).expect("stored reading");
        assert_eq!(ignored, FUTURE_FIELDS);
        let expected = SandboxSpec {
            env: vec![("API_TOKEN".into(), "s3cret".into())],
            mounts: vec![BindMount {
                source: "/srv/data".into(),
                target: "/data".into(),
                writable: true,
            }],
            network: NetworkMode::Egress(EgressContract {
                allowed_ports: vec![443],
                dns: true,
                ..EgressContract::default()
            }),
            limits: ResourceLimits {
                memory_bytes: Some(256 << 20),
                cpus: Some(2.0),
                pids: Some(64),
            },
            user: Some(SandboxUser { uid: 1000, gid: 1000 }),
            denied_syscalls: vec!["ptrace".into()],
            ..SandboxSpec::new(vec!["/bin/true".into()])
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn test_an_unknown_variant_or_a_wrong_type_reads_neither_way() {
        for text in [
            r#"{"command": ["x"], "root": {"Snapshot": "/snapshots/1"}}"#,
            r#"{"command": "x"}"#,
            r#"{"command": ["x"]} trailing"#,
        ] {
            assert!(
                matches!(SandboxSpec::from_stored_json(text), Err(SpecDecodeError::Json(_))),
                "{text}"
            );
            assert!(
                matches!(SandboxSpec::from_json_strict(text), Err(SpecDecodeError::Json(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn normalize_drops_dots_and_slashes() {
        assert_eq!(
            normalize_sandbox_path(Path::new("//data/./x/")),
            PathBuf::from("/data/x")
        );
    }
}
