//! The microVM lane: each sandbox is its own guest kernel in a QEMU `microvm` machine, with the
//! supervisor's own static executable as the guest's PID 1 (the [`agent`]), so the host kernel sees only
//! QEMU's system calls and a guest-kernel bug is behind a second wall (the agent's privilege drop).
//!
//! One sandbox: `prepare` finds or builds the cached initramfs and root disk ([`boot`]) and creates the
//! VM's directory and cgroup; `start` starts QEMU ([`qemu`]) confined ([`confine`]) in the cgroup,
//! waits for the agent's `ready` (bounded) and hands the channel to the exec multiplexer ([`mux`]), which
//! starts the command (one-shot) and, for a service sandbox, every exec and file operation after it,
//! carrying their stdio until the guest reports each end. QEMU is killed and reaped on every path (end of
//! the command, timeout, kill, a failed start, drop), then the directory (socket, logs) and the cgroup are
//! removed.
//!
//! This slice runs one-shot and service sandboxes on the host-system root or an image's root; directory
//! roots, bind mounts and host loopback are declared unsupported in [`CAPABILITIES`] (docs/microvm.md).
//!
//! Modules: [`qemu`] the driver; [`confine`] QEMU's own user, namespaces and inherited files; [`boot`]
//! kernel, initramfs and root disk; [`protocol`] the channel's
//! frames; [`channel`] accepting QEMU and the boot handshake; [`mux`] the host side of the execs;
//! `sandbox` one VM's lifecycle; `service` execs and controls of a service sandbox; [`agent`] the guest
//! side.

pub mod agent;
pub mod boot;
pub mod channel;
pub mod confine;
mod egress;
pub mod mux;
pub mod protocol;
pub mod qemu;
mod sandbox;
mod service;

use std::io;
use std::path::{Path, PathBuf};

use self::qemu::{Accel, QemuBinary};
pub use self::sandbox::MicrovmSandbox;
use crate::capabilities::LaneCapabilities;
use crate::lanes::{default_state_dir, LaneConfig};
use crate::process::cgroup;
use crate::process::{CgroupLayout, HostCgroupFs};
use crate::sandbox::{PrepareError, Runtime, Sandbox};
use crate::service::ServiceSandbox;
use crate::spec::SandboxSpec;

/// What the microVM lane honours in this slice: one-shot and service sandboxes on the host-system root
/// or an image's layers (one erofs disk per image), with memory (guest RAM and the guest's cgroup), CPUs
/// (vCPUs and the VMM's cgroup), pids and rlimits inside the guest, extra denied syscalls and another
/// user; egress under a contract (the guest's NIC on a TAP in the sandbox's network namespace); execs,
/// file operations, pause (the VMM's cgroup frozen), CPU throttling and cutting the network; a terminal
/// for the main command (a pty of the guest); a policy's writable paths (read-only mounts elsewhere).
/// Not yet: host loopback, bind mounts, directory roots.
pub const CAPABILITIES: LaneCapabilities = LaneCapabilities {
    service: true,
    terminal: true,
    host_loopback: false,
    egress_network: true,
    bind_mounts: false,
    directory_root: false,
    image_layers: true,
    memory_limit: true,
    cpu_limit: true,
    pids_limit: true,
    rlimits: true,
    seccomp_syscall_lists: true,
    // Enforced by the guest's mounts: a scratch area outside the writable paths, and an image root
    // unless `/` is one, are mounted read-only.
    landlock_paths: true,
    custom_user: true,
    user_name: false,
    pause: true,
    file_ops: true,
    cpu_throttle: true,
    network_isolation: true,
    pause_to_disk: false,
};

/// Settings of the microVM lane that are not per-sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MicrovmConfig {
    /// QEMU; otherwise `TARTARUS_QEMU`, then `qemu-system-x86_64` on `PATH`.
    pub qemu: Option<PathBuf>,
    /// The guest kernel; otherwise `TARTARUS_MICROVM_KERNEL`, then the newest `/boot/vmlinuz-*-cloud-amd64`.
    pub kernel: Option<PathBuf>,
    /// Per-VM directories (sockets, logs) and the KVM verdict; otherwise [`default_state_dir`]`/microvm`.
    pub state_dir: Option<PathBuf>,
    /// Built initramfs and root disks (content-named, shared by every VM and state directory); otherwise
    /// `TARTARUS_MICROVM_CACHE`, then `/var/cache/tartarus/microvm` for root and
    /// `$XDG_CACHE_HOME/tartarus/microvm` (or `~/.cache/…`) otherwise.
    pub cache_dir: Option<PathBuf>,
}

/// The lane cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("the microvm lane needs root (cgroups for the VMM)")]
    NeedsRoot,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The microVM runtime: a checked QEMU and kernel, the acceleration verdict, the directories.
pub struct MicrovmRuntime {
    qemu: QemuBinary,
    kernel: boot::Kernel,
    /// The kernel QEMU's unprivileged user opens (the kernel itself, or a readable copy of it).
    vmm_kernel: PathBuf,
    modules: Vec<PathBuf>,
    accel: Accel,
    vms_dir: PathBuf,
    /// QEMU users taken by live VMs ([`confine`]).
    users_dir: PathBuf,
    cache_dir: PathBuf,
    agent: PathBuf,
    cgroup_parent: String,
}

fn cache_dir(config: &MicrovmConfig) -> PathBuf {
    if let Some(dir) = &config.cache_dir {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("TARTARUS_MICROVM_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    if rustix::process::geteuid().is_root() {
        return "/var/cache/tartarus/microvm".into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("tartarus/microvm")
}

fn private_dir(dir: &Path, what: &'static str) -> Result<(), MicrovmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| MicrovmError::Io {
            what,
            path: dir.to_path_buf(),
            source,
        })
}

impl MicrovmRuntime {
    /// Finds QEMU and the kernel, resolves the guest's modules, decides KVM or TCG (bounded, cached).
    pub fn open(config: &LaneConfig) -> Result<MicrovmRuntime, MicrovmError> {
        if !rustix::process::geteuid().is_root() {
            return Err(MicrovmError::NeedsRoot);
        }
        let mc = &config.microvm;
        let qemu = qemu::find(mc.qemu.as_deref())?;
        let configured = mc.kernel.clone().or_else(|| {
            std::env::var_os("TARTARUS_MICROVM_KERNEL")
                .filter(|k| !k.is_empty())
                .map(PathBuf::from)
        });
        let kernel = boot::find_kernel(configured.as_deref())?;
        let modules = match &kernel.release {
            Some(release) if Path::new("/lib/modules").join(release).is_dir() => {
                boot::module_files(release, boot::GUEST_MODULES)?
            }
            // A kernel without its modules here must have the drivers built in.
            _ => Vec::new(),
        };
        let state = mc
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir().join("microvm"));
        let vms_dir = state.join("vms");
        private_dir(&vms_dir, "creating the microvm state directory")?;
        let users_dir = state.join("vmm-users");
        private_dir(&users_dir, "creating the microvm state directory")?;
        let cache_dir = cache_dir(mc);
        private_dir(&cache_dir, "creating the microvm cache directory")?;
        let agent = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .map_err(|source| MicrovmError::Io {
                what: "finding the supervisor's own executable (the guest agent)",
                path: "/proc/self/exe".into(),
                source,
            })?;
        let accel = qemu::accel(&qemu, &kernel.path, &cache_dir).clone();
        let vmm_kernel = boot::world_readable_kernel(&cache_dir, &kernel.path)?;
        Ok(MicrovmRuntime {
            qemu,
            kernel,
            vmm_kernel,
            modules,
            accel,
            vms_dir,
            users_dir,
            cache_dir,
            agent,
            cgroup_parent: config.process.cgroup_parent.clone(),
        })
    }

    pub fn qemu(&self) -> &QemuBinary {
        &self.qemu
    }

    pub fn accel(&self) -> &Accel {
        &self.accel
    }

    pub fn kernel(&self) -> &boot::Kernel {
        &self.kernel
    }

    /// [`Runtime::prepare`] without the trait object.
    pub fn prepare_sandbox(&self, spec: SandboxSpec) -> Result<MicrovmSandbox, PrepareError> {
        MicrovmSandbox::prepare(self, spec)
    }

    /// Removes the VM directories and cgroups of supervisors that died (their QEMU died with them: it
    /// runs with a parent-death signal).
    pub fn collect_garbage(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.vms_dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split('-').next()?.parse::<i32>().ok());
            if owner.is_some_and(|pid| !tartarus_hostsys::process_exists(pid)) {
                let _ = std::fs::remove_dir_all(entry.path());
                removed.push(entry.path());
            }
        }
        removed.extend(confine::sweep_users(&self.users_dir));
        let layout = CgroupLayout::detect(&HostCgroupFs);
        removed.extend(cgroup::collect_garbage(
            &HostCgroupFs,
            &layout,
            &self.cgroup_parent,
        ));
        removed
    }
}

impl Runtime for MicrovmRuntime {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn capabilities(&self) -> LaneCapabilities {
        CAPABILITIES
    }

    fn prepare(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>, PrepareError> {
        Ok(Box::new(MicrovmSandbox::prepare(self, spec)?))
    }

    fn prepare_service(&self, mut spec: SandboxSpec) -> Result<Box<dyn ServiceSandbox>, PrepareError> {
        spec.service = true;
        Ok(Box::new(MicrovmSandbox::prepare(self, spec)?))
    }
}
