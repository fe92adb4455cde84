//! Isolation lanes by name: which ones this host can run ([`probe`]) and opening one as a [`Runtime`]
//! ([`open`]).
//!
//! Place in the data flow: whoever opens a runtime (the CLI's `run` and `shim`, the server's lane
//! selection) names a [`LaneName`] and gets a `Box<dyn Runtime>`; nothing downstream branches on the lane.
//! A [`SandboxSpec`](crate::SandboxSpec) does not carry its lane. Probing is bounded in time: every probe
//! of an engine binary has a timeout, and verdicts that are slow to reach are cached for the process.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::capabilities::LaneCapabilities;
use crate::process::{HostCgroupFs, ProcessRuntime, ProcessRuntimeConfig};
use crate::sandbox::Runtime;

/// The isolation lanes this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaneName {
    /// Linux namespaces, seccomp, Landlock and cgroups around host processes (`process/`).
    Process,
    /// gVisor's user-space kernel (`runsc`) between the command and the host kernel.
    Gvisor,
    /// A guest kernel of its own in a QEMU microVM (`microvm/`).
    Microvm,
    /// A WebAssembly module or component run by wasmtime with WASI (`wasm/`).
    Wasm,
}

impl LaneName {
    /// Every lane, in the order `tartarus runtimes` lists them.
    pub const ALL: [LaneName; 4] = [
        LaneName::Process,
        LaneName::Gvisor,
        LaneName::Microvm,
        LaneName::Wasm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LaneName::Process => "process",
            LaneName::Gvisor => "gvisor",
            LaneName::Microvm => "microvm",
            LaneName::Wasm => "wasm",
        }
    }

    /// What the lane can honour, wherever it runs: the same `LaneCapabilities` its runtime declares, for
    /// a caller that judges a spec for another machine's lane (the control plane, for its nodes).
    pub fn capabilities(self) -> LaneCapabilities {
        match self {
            LaneName::Process => crate::process::CAPABILITIES,
            LaneName::Gvisor => crate::gvisor::CAPABILITIES,
            LaneName::Microvm => crate::microvm::CAPABILITIES,
            LaneName::Wasm => crate::wasm::CAPABILITIES,
        }
    }
}

impl fmt::Display for LaneName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lane name this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lane '{0}': valid lanes are process, gvisor, microvm, wasm")]
pub struct UnknownLane(pub String);

impl FromStr for LaneName {
    type Err = UnknownLane;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LaneName::ALL
            .into_iter()
            .find(|lane| lane.as_str() == s)
            .ok_or_else(|| UnknownLane(s.to_string()))
    }
}

/// gVisor's platform: how the sentry intercepts the application's system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GvisorPlatform {
    /// seccomp traps in the application's threads (runsc from mid-2023 on); the upstream default.
    Systrap,
    /// `PTRACE_SYSEMU`; works everywhere, the slowest.
    Ptrace,
    /// Hardware virtualisation through `/dev/kvm`; needs a KVM that runs guests.
    Kvm,
}

impl GvisorPlatform {
    pub fn as_str(self) -> &'static str {
        match self {
            GvisorPlatform::Systrap => "systrap",
            GvisorPlatform::Ptrace => "ptrace",
            GvisorPlatform::Kvm => "kvm",
        }
    }
}

impl fmt::Display for GvisorPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A platform name runsc does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown gVisor platform '{0}': valid platforms are systrap, ptrace, kvm")]
pub struct UnknownPlatform(pub String);

impl FromStr for GvisorPlatform {
    type Err = UnknownPlatform;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            GvisorPlatform::Systrap,
            GvisorPlatform::Ptrace,
            GvisorPlatform::Kvm,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| UnknownPlatform(s.to_string()))
    }
}

/// Settings of the gVisor lane that are not per-sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GvisorConfig {
    /// The runsc binary to use; otherwise `TARTARUS_RUNSC`, then the first `runsc` on `PATH`.
    pub runsc: Option<PathBuf>,
    /// Where the lane keeps runsc's state (`--root`) and the sandboxes' bundles; otherwise
    /// [`default_state_dir`]`/gvisor`. Never runsc's own default, `/var/run/runsc`.
    pub state_dir: Option<PathBuf>,
    /// The platform to use; otherwise the fastest one that works on this host.
    pub platform: Option<GvisorPlatform>,
}

/// Everything a lane needs to be opened: the process runtime's settings, the gVisor lane's and the
/// microVM lane's.
#[derive(Debug, Clone, Default)]
pub struct LaneConfig {
    pub process: ProcessRuntimeConfig,
    pub gvisor: GvisorConfig,
    pub microvm: crate::microvm::MicrovmConfig,
}

/// Tartarus's directory for volatile host state (runtime state that must not survive a reboot):
/// `TARTARUS_STATE_DIR`, else `/run/tartarus` for root and `$XDG_RUNTIME_DIR/tartarus` (or
/// `/tmp/tartarus-<uid>`) otherwise.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TARTARUS_STATE_DIR").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return "/run/tartarus".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("tartarus"),
        None => PathBuf::from(format!("/tmp/tartarus-{}", uid.as_raw())),
    }
}

/// What this host can do with one lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneReport {
    pub name: LaneName,
    pub available: bool,
    /// Why the lane cannot run here, with what to install or change; `None` when it can.
    pub reason: Option<String>,
    /// The engine's version (the kernel's release for the process lane, runsc's for gVisor).
    pub version: Option<String>,
    /// How the lane would run here, e.g. `platform ptrace (kvm: /dev/kvm does not run guests here)`.
    pub detail: Option<String>,
    /// Why the lane works here but too slowly for an automatic choice (a microVM lane under TCG).
    pub emulated: Option<String>,
}

/// Every lane's report, in [`LaneName::ALL`] order. Bounded in time.
pub fn probe(config: &LaneConfig) -> Vec<LaneReport> {
    LaneName::ALL
        .into_iter()
        .map(|lane| probe_lane(lane, config))
        .collect()
}

/// One lane's report.
pub fn probe_lane(lane: LaneName, config: &LaneConfig) -> LaneReport {
    match lane {
        LaneName::Process => probe_process(),
        LaneName::Gvisor => probe_gvisor(config),
        LaneName::Microvm => probe_microvm(config),
        LaneName::Wasm => probe_wasm(config),
    }
}

/// A lane that cannot be opened here, with what to install or change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {lane} lane is not available on this host: {reason}")]
pub struct LaneUnavailable {
    pub lane: LaneName,
    pub reason: String,
}

/// Opens `name` as a runtime, or says in one line why this host cannot run it.
pub fn open(name: LaneName, config: &LaneConfig) -> Result<Box<dyn Runtime + Send + Sync>, LaneUnavailable> {
    match name {
        // One file read: this is on every `tartarus run`'s launch path.
        LaneName::Process => match process_unavailable() {
            Some(reason) => Err(LaneUnavailable { lane: name, reason }),
            None => Ok(Box::new(ProcessRuntime::new(config.process.clone()))),
        },
        LaneName::Gvisor => match crate::gvisor::GvisorRuntime::open(config) {
            Ok(runtime) => Ok(Box::new(runtime)),
            Err(e) => Err(LaneUnavailable {
                lane: name,
                reason: e.to_string(),
            }),
        },
        LaneName::Microvm => match crate::microvm::MicrovmRuntime::open(config) {
            Ok(runtime) => Ok(Box::new(runtime)),
            Err(e) => Err(LaneUnavailable {
                lane: name,
                reason: e.to_string(),
            }),
        },
        LaneName::Wasm => match crate::wasm::WasmRuntime::open(config) {
            Ok(runtime) => Ok(Box::new(runtime)),
            Err(e) => Err(LaneUnavailable {
                lane: name,
                reason: e.to_string(),
            }),
        },
    }
}

/// Why the process lane cannot run here, if it cannot.
fn process_unavailable() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces") {
        Ok(text) if text.trim() == "0" => {
            Some("user namespaces are disabled: set the sysctl user.max_user_namespaces above 0".to_string())
        }
        _ => None,
    }
}

fn probe_process() -> LaneReport {
    let version = Some(rustix::system::uname().release().to_string_lossy().into_owned());
    let detail = Some(cgroup_summary());
    let reason = process_unavailable();
    LaneReport {
        name: LaneName::Process,
        available: reason.is_none(),
        reason,
        version,
        detail,
        emulated: None,
    }
}

/// The host's cgroup layout in a few words: `cgroups v2`, `cgroups hybrid (v1: memory, cpu, pids)`.
fn cgroup_summary() -> String {
    let layout = crate::process::CgroupLayout::detect(&HostCgroupFs);
    let v1: Vec<&str> = layout.v1_mounts.iter().map(|(c, _)| c.name()).collect();
    match (&layout.v2_mount, v1.is_empty()) {
        (Some(_), true) => "cgroups v2".to_string(),
        (Some(_), false) => format!("cgroups hybrid (v1: {})", v1.join(", ")),
        (None, false) => format!("cgroups v1 ({})", v1.join(", ")),
        (None, true) => "no cgroups (limits cannot be enforced)".to_string(),
    }
}

fn probe_gvisor(config: &LaneConfig) -> LaneReport {
    let unavailable = |reason: String, version: Option<String>| LaneReport {
        name: LaneName::Gvisor,
        available: false,
        reason: Some(reason),
        version,
        detail: None,
        emulated: None,
    };
    let runsc = match crate::gvisor::runsc::find(&config.gvisor) {
        Ok(runsc) => runsc,
        Err(e) => return unavailable(e.to_string(), None),
    };
    let version = Some(format!("runsc {} ({})", runsc.version.text, runsc.path.display()));
    if !rustix::process::geteuid().is_root() {
        return unavailable(crate::gvisor::RunscError::NeedsRoot.to_string(), version);
    }
    let scratch = config
        .gvisor
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir().join("gvisor"));
    let _ = std::fs::create_dir_all(&scratch);
    match crate::gvisor::runsc::choose_platform(&runsc, config.gvisor.platform, &scratch) {
        Ok(choice) => {
            let egress = match crate::gvisor::runsc::NetworkFlag::egress_for(&runsc) {
                crate::gvisor::runsc::NetworkFlag::Sandbox => "egress: gVisor's network stack",
                _ => "egress: the host's stack inside the sandbox's namespace (runsc before 2024-08)",
            };
            LaneReport {
                name: LaneName::Gvisor,
                available: true,
                reason: None,
                version,
                detail: Some(format!("{}; {egress}", choice.detail)),
                emulated: None,
            }
        }
        Err(e) => unavailable(e.to_string(), version),
    }
}

/// QEMU's version and how guests would run (KVM, or TCG with a warning); opening the lane probes KVM
/// once per boot (bounded), and builds nothing.
fn probe_microvm(config: &LaneConfig) -> LaneReport {
    match crate::microvm::MicrovmRuntime::open(config) {
        Ok(runtime) => LaneReport {
            name: LaneName::Microvm,
            available: true,
            reason: None,
            version: Some(format!(
                "qemu {} ({})",
                runtime.qemu().version,
                runtime.qemu().path.display()
            )),
            detail: Some(format!(
                "{}; kernel {}",
                runtime.accel().detail(),
                runtime.kernel().path.display()
            )),
            emulated: matches!(runtime.accel(), crate::microvm::qemu::Accel::Tcg { .. })
                .then(|| "its guests run under TCG (software emulation) on this host".to_string()),
        },
        Err(e) => {
            let version = crate::microvm::qemu::find(config.microvm.qemu.as_deref())
                .ok()
                .map(|q| format!("qemu {} ({})", q.version, q.path.display()));
            LaneReport {
                name: LaneName::Microvm,
                available: false,
                reason: Some(e.to_string()),
                version,
                detail: None,
                emulated: None,
            }
        }
    }
}

/// wasmtime's version and whether its engine (with the pooling allocator's reservation) starts here.
fn probe_wasm(config: &LaneConfig) -> LaneReport {
    let version = Some(format!("wasmtime {}", crate::wasm::WASMTIME_VERSION));
    match crate::wasm::WasmRuntime::open(config) {
        Ok(_) => LaneReport {
            name: LaneName::Wasm,
            available: true,
            reason: None,
            version,
            detail: Some(format!(
                "WASI preview 1 and 2; pooling allocator for {} sandboxes; scratch {}",
                crate::wasm::MAX_SANDBOXES,
                if rustix::process::geteuid().is_root() {
                    "a size-bounded tmpfs"
                } else {
                    "a directory (not size-bounded without root)"
                }
            )),
            emulated: None,
        },
        Err(e) => LaneReport {
            name: LaneName::Wasm,
            available: false,
            reason: Some(e.to_string()),
            version,
            detail: None,
            emulated: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lane_names_round_trip_through_text_and_json() {
        for lane in LaneName::ALL {
            assert_eq!(lane.to_string().parse::<LaneName>(), Ok(lane));
            let json = serde_json::to_string(&lane).expect("serialize");
            assert_eq!(json, format!("\"{lane}\""));
            assert_eq!(serde_json::from_str::<LaneName>(&json).expect("parse"), lane);
        }
    }

    #[test]
    fn test_a_lanes_capabilities_are_its_runtimes() {
        let process = ProcessRuntime::new(ProcessRuntimeConfig::default());
        assert_eq!(LaneName::Process.capabilities(), process.capabilities());
        assert_eq!(LaneName::Gvisor.capabilities(), crate::gvisor::CAPABILITIES);
        assert_eq!(LaneName::Microvm.capabilities(), crate::microvm::CAPABILITIES);
        assert_eq!(LaneName::Wasm.capabilities(), crate::wasm::CAPABILITIES);
    }

    #[test]
    fn test_an_unknown_lane_name_lists_the_valid_ones() {
        let err = "firecracker".parse::<LaneName>().expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown lane 'firecracker': valid lanes are process, gvisor, microvm, wasm"
        );
        assert!(
            serde_json::from_str::<LaneName>("\"Process\"").is_err(),
            "lowercase only"
        );
    }

    #[test]
    fn test_every_lane_has_a_report_in_order() {
        // A runsc and a QEMU that are not there keep this test off the host's engines.
        let mut config = LaneConfig::default();
        config.gvisor.runsc = Some("/nonexistent/runsc".into());
        config.microvm.qemu = Some("/nonexistent/qemu-system-x86_64".into());
        let reports = probe(&config);
        let names: Vec<LaneName> = reports.iter().map(|r| r.name).collect();
        assert_eq!(names, LaneName::ALL);
        for report in &reports {
            assert_eq!(report.available, report.reason.is_none(), "{report:?}");
        }
        let gvisor = &reports[1];
        assert!(!gvisor.available);
        assert!(
            gvisor
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("apt-get install runsc")),
            "{gvisor:?}"
        );
        assert!(!reports[2].available, "{:?}", reports[2]);
        assert!(reports[3].available, "wasmtime is built in: {:?}", reports[3]);
    }

    #[test]
    fn test_platform_names_parse_and_an_unknown_one_lists_the_valid_ones() {
        assert_eq!("ptrace".parse(), Ok(GvisorPlatform::Ptrace));
        assert_eq!(
            "sysemu"
                .parse::<GvisorPlatform>()
                .expect_err("unknown")
                .to_string(),
            "unknown gVisor platform 'sysemu': valid platforms are systrap, ptrace, kvm"
        );
    }
}
