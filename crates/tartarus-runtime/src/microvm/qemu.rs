//! The QEMU driver: finding `qemu-system-x86_64` (`TARTARUS_QEMU`, then `PATH`), its version, whether
//! KVM runs guests here (a bounded boot, the verdict kept for the boot in the state directory), and the
//! command line of one VM: the `microvm` machine with `-nodefaults`, virtio-mmio devices only.
//!
//! A `/dev/kvm` can exist and still not run guests (a nested hypervisor that does not implement enough,
//! as on the development machine this lane was written on): the probe boots the guest kernel with no root
//! and waits at most [`KVM_PROBE_TIMEOUT`] for its first line on the serial console, so a KVM that hangs
//! costs that once per boot, not every run.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::gvisor::runsc::{run_bounded, BoundedError};

/// How long a KVM boot may take to print the kernel's first line.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Memory QEMU itself may use beyond the guest's RAM (TCG's translation cache is capped below it).
pub const VMM_OVERHEAD_BYTES: u64 = 192 << 20;
/// Guest RAM bounds: below the floor the kernel and the unpacked initramfs do not fit.
pub const MIN_GUEST_MEMORY_BYTES: u64 = 256 << 20;
pub const MAX_GUEST_MEMORY_BYTES: u64 = 64 << 30;
/// TCG translation cache, MiB.
const TCG_TB_SIZE_MIB: u64 = 64;

/// QEMU is missing or unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuError {
    #[error("qemu-system-x86_64 not found: apt-get install qemu-system-x86, or set TARTARUS_QEMU")]
    NotFound,
    #[error("{path} does not run: {message}")]
    Broken { path: PathBuf, message: String },
}

/// A checked QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    pub path: PathBuf,
    /// `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub version: String,
}

/// `TARTARUS_QEMU`, then the first `qemu-system-x86_64` on `PATH`, with its version.
pub fn find(configured: Option<&Path>) -> Result<QemuBinary, QemuError> {
    let path = match configured {
        Some(path) => path.to_path_buf(),
        None => match std::env::var_os("TARTARUS_QEMU").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => super::boot::which("qemu-system-x86_64").ok_or(QemuError::NotFound)?,
        },
    };
    let mut command = Command::new(&path);
    command.arg("--version").stdin(Stdio::null());
    let output = run_bounded(command, Duration::from_secs(10)).map_err(|e| QemuError::Broken {
        path: path.clone(),
        message: crate::error_chain(&e),
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("QEMU emulator version "))
        .map(str::to_string)
        .ok_or_else(|| QemuError::Broken {
            path: path.clone(),
            message: format!("unexpected --version output: {}", text.trim()),
        })?;
    Ok(QemuBinary { path, version })
}

/// How guests run: hardware virtualisation, or QEMU's software emulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// TCG, with why KVM is not used.
    Tcg {
        why: String,
    },
}

impl Accel {
    pub fn is_kvm(&self) -> bool {
        matches!(self, Accel::Kvm)
    }

    /// For `tartarus runtimes`: `kvm`, or `tcg (software emulation, slow: …)`.
    pub fn detail(&self) -> String {
        match self {
            Accel::Kvm => "accel kvm".to_string(),
            Accel::Tcg { why } => format!(
                "warning: accel tcg (software emulation, boots take seconds; kvm: {why}); auto never picks this lane under tcg"
            ),
        }
    }
}

/// Whether KVM runs guests here: `TARTARUS_MICROVM_ACCEL=tcg` forces TCG; otherwise the verdict of
/// [`probe_kvm`], found once per process and kept for the boot in `state_dir/kvm-verdict` (keyed by the
/// boot id, the QEMU binary and the kernel).
pub fn accel(qemu: &QemuBinary, kernel: &Path, state_dir: &Path) -> &'static Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if std::env::var("TARTARUS_MICROVM_ACCEL").is_ok_and(|v| v == "tcg") {
            return Accel::Tcg {
                why: "not used (TARTARUS_MICROVM_ACCEL=tcg)".into(),
            };
        }
        let identity = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| format!("{}:{}:{}", m.ino(), m.size(), m.mtime()))
                .unwrap_or_default()
        };
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let key = format!("{} {} {}", boot.trim(), identity(&qemu.path), identity(kernel));
        let cache = state_dir.join("kvm-verdict");
        if let Some(cached) = std::fs::read_to_string(&cache)
            .ok()
            .and_then(|text| cached_verdict(&text, &key))
        {
            return cached;
        }
        let verdict = probe_kvm(qemu, kernel);
        let line = match &verdict {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg { why } => format!("tcg {why}"),
        };
        let _ = std::fs::write(&cache, format!("{key}\n{line}\n"));
        verdict
    })
}

fn cached_verdict(text: &str, key: &str) -> Option<Accel> {
    let (first, verdict) = text.split_once('\n')?;
    if first != key {
        return None;
    }
    let verdict = verdict.trim_end();
    match verdict {
        "kvm" => Some(Accel::Kvm),
        _ => verdict
            .strip_prefix("tcg ")
            .map(|why| Accel::Tcg { why: why.to_string() }),
    }
}

/// Boots `kernel` under KVM with no root: a KVM that runs guests prints the kernel's banner on the serial
/// console at once (and panics, ending QEMU with `-no-reboot`); one that does not hangs, and is killed
/// after [`KVM_PROBE_TIMEOUT`].
pub fn probe_kvm(qemu: &QemuBinary, kernel: &Path) -> Accel {
    let tcg = |why: String| Accel::Tcg { why };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return match e.kind() {
            io::ErrorKind::NotFound => {
                tcg("no /dev/kvm (enable virtualisation or load kvm_intel/kvm_amd)".into())
            }
            _ => tcg(format!("/dev/kvm cannot be opened ({e})")),
        };
    }
    let mut command = Command::new(&qemu.path);
    command.args([
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        // QEMU's own seccomp filter: no fork or exec, no privilege changes, no obsolete or
        // resource-control system calls (confine.rs adds the user, namespaces and no_new_privs).
        "-sandbox",
        SECCOMP_SANDBOX,
        "-m",
        "128",
        "-serial",
        "stdio",
        "-append",
        "console=ttyS0 earlyprintk=ttyS0 panic=-1",
    ]);
    command.arg("-kernel").arg(kernel).stdin(Stdio::null());
    match run_bounded(command, KVM_PROBE_TIMEOUT) {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("Linux version") => Accel::Kvm,
        Ok(out) => tcg(format!(
            "a KVM guest printed nothing ({})",
            crate::gvisor::runsc::last_line(&out.stderr)
        )),
        Err(BoundedError::TimedOut) => tcg(format!(
            "/dev/kvm does not run guests here (a KVM boot printed nothing in {}s)",
            KVM_PROBE_TIMEOUT.as_secs()
        )),
        Err(e) => tcg(format!("not probed ({})", crate::error_chain(&e))),
    }
}

/// Everything one VM's command line is made of.
#[derive(Debug, Clone)]
pub struct VmConfig<'a> {
    pub accel: &'a Accel,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub root_disk: &'a Path,
    /// QEMU's end of the agent channel (a socket pair with the supervisor), inherited.
    pub agent_fd: i32,
    /// The serial console's log (kernel messages).
    pub console_log: &'a Path,
    /// The VM's directory: QEMU's `-name`, so that `ps` (and a leak check) tells which VM a QEMU is.
    pub vm_dir: &'a Path,
}

/// The guest's RAM for a sandbox memory limit and an initramfs of `initramfs_bytes`, in MiB: the limit
/// within the guest bounds (the sandbox's cgroup in the guest holds the command to the limit itself),
/// plus twice the initramfs — the guest holds the archive and its unpacked files at once while it boots,
/// and the files stay in RAM — so a large agent (a debug build) never leaves the boot without memory.
pub fn guest_memory_mib(limit: Option<u64>, initramfs_bytes: u64) -> u64 {
    let bytes = limit
        .unwrap_or(MIN_GUEST_MEMORY_BYTES)
        .clamp(MIN_GUEST_MEMORY_BYTES, MAX_GUEST_MEMORY_BYTES);
    (bytes >> 20) + initramfs_bytes.saturating_mul(2).div_ceil(1 << 20)
}

/// vCPUs for a CPU limit: its ceiling, at least 1 and at most the host's CPUs.
pub fn vcpus(cpus: Option<f64>) -> u32 {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    match cpus {
        Some(c) if c.is_finite() && c > 0.0 => (c.ceil() as u32).clamp(1, host),
        _ => 1,
    }
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`). Under TCG the guest reads the
/// host's TSC, and calibrating it against an emulated PIT is unreliable on a loaded host (the boot hangs
/// once the kernel marks the TSC unstable), so the guest is told the frequency instead.
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1)?.trim().parse().ok())?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// The kernel command line: the serial console for kernel messages (quiet), no probing of hardware the
/// microvm machine does not have, the agent as init.
pub fn kernel_cmdline(accel: &Accel) -> String {
    let mut line = vec![
        "console=ttyS0",
        "quiet",
        "loglevel=1",
        "panic=-1",
        "pci=off",
        "edd=off",
        "nomodeset",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "8250.nr_uarts=1",
        "cryptomgr.notests",
        "random.trust_cpu=on",
        "mitigations=off",
    ];
    if !accel.is_kvm() {
        // No kvmclock under TCG: trust the TSC rather than calibrate it twice.
        line.extend(["tsc=reliable", "no_timer_check"]);
    }
    let mut text = line.join(" ");
    if let (false, Some(khz)) = (accel.is_kvm(), host_tsc_khz()) {
        text.push_str(&format!(" tsc_early_khz={khz}"));
    }
    text.push_str(&format!(" rdinit={}", super::boot::AGENT_PATH));
    text
}

/// QEMU's `-sandbox` setting: its seccomp filter with every optional denial on.
pub const SECCOMP_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// `qemu-system-x86_64` arguments for one VM.
pub fn vm_args(vm: &VmConfig<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    match vm.accel {
        // Without kvmclock or a known TSC frequency the kernel calibrates against the PIT (and the RTC).
        // The RTC stays on in every case: without one the kernel waits for it twice (≈ 2 s under TCG).
        Accel::Tcg { .. } => push(&[
            "-M",
            match host_tsc_khz() {
                Some(_) => "microvm,pit=off,pic=off,rtc=on,isa-serial=on",
                None => "microvm,pit=on,pic=on,rtc=on,isa-serial=on",
            },
            "-accel",
            &format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
            "-cpu",
            "max",
        ]),
        Accel::Kvm => push(&[
            "-M",
            "microvm,pit=off,pic=off,rtc=on,isa-serial=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ]),
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-monitor",
        "none",
        "-no-reboot",
        // QEMU's own seccomp filter: no fork or exec, no privilege changes, no obsolete or
        // resource-control system calls (confine.rs adds the user, namespaces and no_new_privs).
        "-sandbox",
        SECCOMP_SANDBOX,
        "-m",
        &vm.memory_bytes.div_ceil(1 << 20).to_string(),
        "-smp",
        &vm.vcpus.to_string(),
        "-append",
        &kernel_cmdline(vm.accel),
    ]);
    let path_arg = |prefix: &str, path: &Path| {
        let mut arg = OsString::from(prefix);
        arg.push(path.as_os_str());
        arg
    };
    // QEMU's option syntax escapes a comma by doubling it.
    let mut name = OsString::from("guest=");
    name.push(vm.vm_dir.to_string_lossy().replace(',', ",,"));
    args.extend([
        "-name".into(),
        name,
        "-kernel".into(),
        vm.kernel.as_os_str().to_owned(),
        "-initrd".into(),
        vm.initramfs.as_os_str().to_owned(),
        "-serial".into(),
        path_arg("file:", vm.console_log),
        "-drive".into(),
        path_arg("id=root,if=none,format=raw,readonly=on,file=", vm.root_disk),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-serial-device,max_ports=2".into(),
        "-chardev".into(),
        format!("socket,id=agent,fd={}", vm.agent_fd).into(),
        "-device".into(),
        "virtserialport,chardev=agent,name=tartarus.agent".into(),
    ]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_memory_and_vcpus_are_bounded() {
        assert_eq!(guest_memory_mib(None, 0), 256);
        assert_eq!(guest_memory_mib(Some(64 << 20), 0), 256, "below the floor");
        assert_eq!(guest_memory_mib(Some(1 << 30), 0), 1024);
        assert_eq!(guest_memory_mib(Some(1 << 40), 0), 64 << 10, "capped");
        assert_eq!(
            guest_memory_mib(Some(64 << 20), 96 << 20),
            256 + 192,
            "room for the initramfs"
        );
        assert_eq!(vcpus(None), 1);
        assert_eq!(vcpus(Some(0.5)), 1);
        assert!(vcpus(Some(1000.0)) >= 1);
    }

    #[test]
    fn test_a_vm_has_only_virtio_mmio_devices_and_the_agent_as_init() {
        let accel = Accel::Tcg { why: "test".into() };
        let vm = VmConfig {
            accel: &accel,
            memory_bytes: 256 << 20,
            vcpus: 1,
            kernel: Path::new("/k"),
            initramfs: Path::new("/i"),
            root_disk: Path::new("/r.erofs"),
            agent_fd: 7,
            console_log: Path::new("/s/console.log"),
            vm_dir: Path::new("/s,1"),
        };
        let args: Vec<String> = vm_args(&vm)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("-M microvm,"), "{line}");
        assert!(line.contains("-nodefaults -no-user-config -nographic"), "{line}");
        assert!(line.contains("-m 256 -smp 1"), "{line}");
        assert!(line.contains("readonly=on,file=/r.erofs"), "{line}");
        assert!(line.contains("rdinit=/.tartarus/guest-agent"), "{line}");
        assert!(line.contains(&format!("-sandbox {SECCOMP_SANDBOX}")), "{line}");
        assert!(line.contains("socket,id=agent,fd=7"), "{line}");
        assert!(line.contains("-name guest=/s,,1 "), "{line}");
        let devices: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| &w[1])
            .collect();
        assert_eq!(devices.len(), 3, "{line}");
        for device in devices {
            assert!(
                device.starts_with("virtio-") || device.starts_with("virtserialport"),
                "{device}"
            );
        }
        assert!(!args.iter().any(|a| a.contains("-pci")), "no PCI devices: {line}");
    }

    #[test]
    fn test_the_kvm_verdict_is_read_back_only_for_its_key() {
        let text = "boot qemu kernel\ntcg /dev/kvm does not run guests here\n";
        assert_eq!(
            cached_verdict(text, "boot qemu kernel"),
            Some(Accel::Tcg {
                why: "/dev/kvm does not run guests here".into()
            })
        );
        assert_eq!(cached_verdict(text, "other boot"), None);
        assert_eq!(cached_verdict("k\nkvm\n", "k"), Some(Accel::Kvm));
    }
}
