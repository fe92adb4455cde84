//! The guest agent: the supervisor's own static executable, PID 1 of the guest (`rdinit=`
//! [`AGENT_PATH`](super::boot::AGENT_PATH)). It mounts the pseudo filesystems, loads the kernel modules
//! from the initramfs, mounts the read-only root disk (the host's `/usr` as erofs, or an image's erofs
//! under an overlay it then makes the root: [`enter_image_root`]) and scratch tmpfs,
//! creates the sandbox's cgroup with its limits, finds its virtio-serial port and then serves execs over
//! it ([`execs`], frames in [`super::protocol`]): every command runs with the process lane's privilege
//! drop — uid/gid 1000, no supplementary groups, an empty capability bounding set and no capabilities,
//! `no_new_privs` and the process lane's seccomp program — so a guest kernel bug is a second wall, not the
//! only one.
//!
//! A binary that embeds the microVM lane calls [`run_if_invoked`] first thing in `main`.

pub mod connect;
mod execs;
mod nic;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::MountFlags;

use super::boot::{AGENT_NAME, MODULES_DIR};
use super::protocol::{encode, GuestFrame};

/// Name of the agent's virtio-serial port (`virtserialport,name=`).
pub const PORT_NAME: &str = "tartarus.agent";
/// How long devices (the root disk, the port) may take to appear once their drivers are loaded.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// When this process is the guest's PID 1 started as the agent: serves the host and never returns
/// normally (PID 1 must not exit); when it is the port connector ([`connect`]): connects and returns its
/// exit code; `None` otherwise.
pub fn run_if_invoked() -> Option<i32> {
    let first = std::env::args_os().next()?;
    let name = Path::new(&first).file_name()?;
    if name == connect::CONNECT_NAME {
        let args: Vec<String> = std::env::args().skip(1).collect();
        return Some(connect::run(&args));
    }
    if name != AGENT_NAME || std::process::id() != 1 {
        return None;
    }
    if let Err(message) = boot_and_serve() {
        // The console (kernel log) is the only place left when the port is not there.
        eprintln!("tartarus guest agent: {message}");
        if let Some(mut port) = find_port()
            .ok()
            .and_then(|p| File::options().write(true).open(p).ok())
        {
            let _ = port.write_all(&encode(&GuestFrame::Fatal { message }));
        }
    }
    // The host kills the VM once it has the outcome; until then, stay PID 1.
    loop {
        let _ = tartarus_hostsys::reap_any_blocking();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn boot_and_serve() -> Result<(), String> {
    setup_filesystems()?;
    let port_path = find_port()?;
    let mut port = File::options()
        .read(true)
        .write(true)
        .open(&port_path)
        .map_err(|e| format!("opening {}: {e}", port_path.display()))?;
    let kernel = rustix::system::uname().release().to_string_lossy().into_owned();
    send(&mut port, &GuestFrame::Ready { kernel })?;
    execs::serve(&mut port)
}

fn mount(source: &str, target: &str, fstype: &str, flags: MountFlags, data: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let data = std::ffi::CString::new(data).map_err(|e| e.to_string())?;
    rustix::mount::mount(source, target, fstype, flags, data.as_c_str())
        .map_err(|e| format!("mounting {fstype} on {target}: {e}"))
}

fn setup_filesystems() -> Result<(), String> {
    let secure = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    // The sandbox user sees its own processes only: not the agent, not the kernel's threads.
    mount("proc", "/proc", "proc", secure, "hidepid=invisible")?;
    mount("sysfs", "/sys", "sysfs", secure | MountFlags::RDONLY, "")?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "mode=0755",
    )?;
    // The initramfs's root directory is writable by anyone until told otherwise.
    std::fs::set_permissions("/", std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| format!("making / read-only to the sandbox user: {e}"))?;
    // A large allocation fails with ENOMEM under the default heuristic once it exceeds the guest's RAM,
    // where a host process would be OOM-killed at its cgroup's limit: the limit is the cgroup's here too.
    std::fs::write("/proc/sys/vm/overcommit_memory", "1")
        .map_err(|e| format!("setting vm.overcommit_memory: {e}"))?;
    load_modules()?;
    let disk = wait_for(|| Path::new("/dev/vda").exists().then(|| PathBuf::from("/dev/vda")))
        .ok_or("the root disk /dev/vda did not appear (is virtio_blk loaded?)")?;
    let settings = GuestSettings::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let scratch = MountFlags::NOSUID | MountFlags::NODEV;
    let size = settings
        .scratch_bytes
        .map(|b| format!(",size={b}"))
        .unwrap_or_default();
    if settings.image_root {
        enter_image_root(&disk.to_string_lossy(), &size)?;
    } else {
        mount(
            &disk.to_string_lossy(),
            "/usr",
            "erofs",
            MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
            "",
        )?;
    }
    // A policy's narrower writable paths (quarantine's /tmp): a scratch area outside them is read-only.
    let flags = |target: &str| match settings.writable(target) {
        true => scratch,
        false => scratch | MountFlags::RDONLY,
    };
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        flags("/tmp"),
        &format!("mode=1777{size}"),
    )?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        flags("/dev/shm"),
        &format!("mode=1777{size}"),
    )?;
    mount(
        "tmpfs",
        "/home/sandbox",
        "tmpfs",
        flags("/home/sandbox"),
        &format!("mode=0700,uid=1000,gid=1000{size}"),
    )?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", secure, "")?;
    execs::sandbox_cgroup(settings.memory_bytes, settings.max_processes)?;
    tartarus_hostsys::set_loopback_up().map_err(|e| format!("bringing loopback up: {e}"))?;
    if let Some((address, prefix, gateway)) = settings.nic {
        nic::configure("eth0", address, prefix, gateway)?;
    }
    // Not nodev: its device nodes are the terminals.
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    let _ = std::fs::create_dir_all("/etc");
    if settings.image_root {
        // The image's own users and groups stay; the sandbox user is added when the image has no uid 1000.
        add_sandbox_user(
            "/etc/passwd",
            "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n",
            2,
        )?;
        add_sandbox_user("/etc/group", "sandbox:x:1000:\n", 2)?;
    } else {
        for (path, text) in [
            (
                "/etc/passwd",
                "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n",
            ),
            ("/etc/group", "root:x:0:\nsandbox:x:1000:\n"),
        ] {
            std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))?;
        }
    }
    let resolv = match (&settings.nic, settings.dns.is_empty()) {
        (None, _) => "# this sandbox has no network\n".to_string(),
        (Some(_), true) => "# DNS is not part of this sandbox's network contract\n".to_string(),
        (Some(_), false) => settings.dns.iter().map(|r| format!("nameserver {r}\n")).collect(),
    };
    for (path, text) in [
        ("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        ("/etc/resolv.conf", resolv.as_str()),
    ] {
        // An image's /etc/resolv.conf may be a symlink out of the root: replace it, never follow it.
        let _ = std::fs::remove_file(path);
        std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))?;
    }
    let _ = std::fs::write("/etc/hostname", format!("{}\n", settings.hostname));
    let _ = rustix::system::sethostname(settings.hostname.as_bytes());
    if settings.image_root && !settings.writable("/") {
        // Narrowed writable paths without `/`: the image's root is read-only too, as on the other lanes.
        rustix::mount::mount_remount("/", MountFlags::RDONLY | MountFlags::NODEV, c"")
            .map_err(|e| format!("making the image root read-only: {e}"))?;
    }
    Ok(())
}

/// Where an image root is put together: the image's erofs disk, the tmpfs of its writes, the overlay.
const IMAGE_LOWER: &str = "/.image";
const IMAGE_WRITES: &str = "/.writes";
const NEW_ROOT: &str = "/.root";

/// Makes the image on `disk` the root: an overlay of the read-only erofs image under a tmpfs of `size`
/// that takes the sandbox's writes, with `/proc`, `/sys`, `/dev` moved into it and the initramfs's
/// `/.tartarus` (the agent, for file operations) bound read-only; then the agent moves it over `/` and
/// chroots into it, as `switch_root` does (the initramfs cannot be unmounted or pivoted away).
fn enter_image_root(disk: &str, size: &str) -> Result<(), String> {
    mount(
        disk,
        IMAGE_LOWER,
        "erofs",
        MountFlags::RDONLY | MountFlags::NODEV,
        "",
    )?;
    mount(
        "tmpfs",
        IMAGE_WRITES,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        &format!("mode=0755{size}"),
    )?;
    for dir in ["upper", "work"] {
        std::fs::create_dir(format!("{IMAGE_WRITES}/{dir}"))
            .map_err(|e| format!("creating the overlay's {dir}: {e}"))?;
    }
    mount(
        "overlay",
        NEW_ROOT,
        "overlay",
        MountFlags::NODEV,
        &format!("lowerdir={IMAGE_LOWER},upperdir={IMAGE_WRITES}/upper,workdir={IMAGE_WRITES}/work"),
    )?;
    for dir in ["proc", "sys", "dev", ".tartarus"] {
        let target = format!("{NEW_ROOT}/{dir}");
        // A symlink where a mount point goes (an image may have anything) is replaced by a directory.
        if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&target).map_err(|e| format!("clearing {target}: {e}"))?;
        }
        std::fs::create_dir_all(&target).map_err(|e| format!("creating {target}: {e}"))?;
    }
    for dir in ["/proc", "/sys", "/dev"] {
        rustix::mount::mount_move(dir, format!("{NEW_ROOT}{dir}"))
            .map_err(|e| format!("moving {dir} into the image root: {e}"))?;
    }
    let agent_dir = format!("{NEW_ROOT}/.tartarus");
    rustix::mount::mount_bind("/.tartarus", &agent_dir).map_err(|e| format!("binding the agent: {e}"))?;
    rustix::mount::mount_remount(
        &agent_dir,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
        c"",
    )
    .map_err(|e| format!("making the agent's directory read-only: {e}"))?;
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("entering the image root: {e}"))?;
    rustix::mount::mount_move(".", "/").map_err(|e| format!("moving the image root over /: {e}"))?;
    rustix::process::chroot(".").map_err(|e| format!("entering the image root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering the image root: {e}"))
}

/// Appends `line` to `path` unless the file already has an entry with id 1000 (field `id_field`).
fn add_sandbox_user(path: &str, line: &str, id_field: usize) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if text.lines().any(|l| l.split(':').nth(id_field) == Some("1000")) {
        return Ok(());
    }
    let mut updated = text;
    if !updated.is_empty() && !updated.ends_with('\n') {
        updated.push('\n');
    }
    updated.push_str(line);
    let _ = std::fs::remove_file(path);
    std::fs::write(path, updated).map_err(|e| format!("writing {path}: {e}"))
}

/// What the host put on the kernel command line for the agent (`tartarus.<name>=<value>`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestSettings {
    scratch_bytes: Option<u64>,
    hostname: String,
    /// The sandbox's memory limit (its cgroup's `memory.max`).
    memory_bytes: Option<u64>,
    /// The sandbox's pids limit (its cgroup's `pids.max`).
    max_processes: Option<u64>,
    /// The root disk is an image's (`tartarus.root=image`), not the host's `/usr`.
    image_root: bool,
    /// The NIC's address, prefix and gateway (`tartarus.net=`), for an egress sandbox.
    nic: Option<(std::net::Ipv4Addr, u8, std::net::Ipv4Addr)>,
    /// Resolvers the contract lets the sandbox reach (`tartarus.dns=a,b`).
    dns: Vec<std::net::IpAddr>,
    /// The policy's writable paths (`tartarus.writable=`, percent-encoded, comma-separated); empty:
    /// every scratch area and an image's root are writable.
    writable_paths: Vec<PathBuf>,
}

impl GuestSettings {
    fn from_cmdline(cmdline: &str) -> GuestSettings {
        let value = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|arg| arg.strip_prefix(key)?.strip_prefix('='))
        };
        GuestSettings {
            scratch_bytes: value("tartarus.scratch_bytes").and_then(|v| v.parse().ok()),
            hostname: value("tartarus.hostname").unwrap_or("sandbox").to_string(),
            memory_bytes: value("tartarus.memory_bytes").and_then(|v| v.parse().ok()),
            max_processes: value("tartarus.max_processes").and_then(|v| v.parse().ok()),
            image_root: value("tartarus.root") == Some("image"),
            nic: value("tartarus.net").and_then(nic::parse),
            dns: value("tartarus.dns")
                .map(|v| v.split(',').filter_map(|a| a.parse().ok()).collect())
                .unwrap_or_default(),
            writable_paths: value("tartarus.writable")
                .map(|v| v.split(',').map(|p| PathBuf::from(percent_decode(p))).collect())
                .unwrap_or_default(),
        }
    }

    /// Whether `target` may be written: no narrowing, or under one of the writable paths.
    fn writable(&self, target: &str) -> bool {
        self.writable_paths.is_empty()
            || self
                .writable_paths
                .iter()
                .any(|p| Path::new(target).starts_with(p))
    }
}

/// `%XX` escapes back to bytes (the host escapes `%`, `,` and whitespace in paths on the command line).
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Loads the initramfs's modules in order; virtio-mmio gets the devices QEMU put on the command line
/// (`virtio_mmio.device=…`), which the kernel leaves to modprobe for a module.
fn load_modules() -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(MODULES_DIR) else {
        return Ok(());
    };
    let mut modules: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    modules.sort();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for module in modules {
        let name = module
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let short = name
            .split_once('-')
            .map_or(name.as_str(), |(_, rest)| rest)
            .trim_end_matches(".ko")
            .replace('-', "_");
        let prefix = format!("{short}.");
        let params: Vec<&str> = cmdline
            .split_whitespace()
            .filter_map(|arg| arg.strip_prefix(prefix.as_str()))
            .collect();
        let params = std::ffi::CString::new(params.join(" ")).map_err(|e| e.to_string())?;
        let file = File::open(&module).map_err(|e| format!("opening {name}: {e}"))?;
        match rustix::system::finit_module(&file, &params, 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(format!("loading kernel module {name}: {e}")),
        }
    }
    Ok(())
}

fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    loop {
        if let Some(value) = found() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/dev/vportNpM` of the port named [`PORT_NAME`] (no udev here to make `/dev/virtio-ports/` links).
fn find_port() -> Result<PathBuf, String> {
    wait_for(|| {
        std::fs::read_dir("/sys/class/virtio-ports")
            .ok()?
            .flatten()
            .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == PORT_NAME))
            .map(|e| Path::new("/dev").join(e.file_name()))
            .filter(|p| p.exists())
    })
    .ok_or_else(|| format!("the virtio-serial port {PORT_NAME} did not appear (is virtio_console loaded?)"))
}

fn send(port: &mut File, frame: &GuestFrame) -> Result<(), String> {
    port.write_all(&encode(frame))
        .map_err(|e| format!("writing to the host: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guest_settings_are_read_from_the_kernel_command_line() {
        let settings = GuestSettings::from_cmdline(
            "console=ttyS0 tartarus.scratch_bytes=67108864 tartarus.hostname=box \
             tartarus.memory_bytes=268435456 tartarus.max_processes=64 tartarus.root=image \
             tartarus.net=10.88.0.5/16,10.88.0.1 tartarus.dns=10.255.255.53,2001:db8::53 \
             tartarus.writable=/tmp,/data%2Cset%20x rdinit=/x",
        );
        assert_eq!(
            settings,
            GuestSettings {
                scratch_bytes: Some(64 << 20),
                hostname: "box".into(),
                memory_bytes: Some(256 << 20),
                max_processes: Some(64),
                image_root: true,
                nic: Some((
                    std::net::Ipv4Addr::new(10, 88, 0, 5),
                    16,
                    std::net::Ipv4Addr::new(10, 88, 0, 1)
                )),
                dns: vec![
                    "10.255.255.53".parse().expect("v4"),
                    "2001:db8::53".parse().expect("v6")
                ],
                writable_paths: vec!["/tmp".into(), "/data,set x".into()],
            }
        );
        let narrowed = GuestSettings::from_cmdline("tartarus.writable=/tmp");
        assert!(narrowed.writable("/tmp") && !narrowed.writable("/home/sandbox") && !narrowed.writable("/"));
        assert!(GuestSettings::from_cmdline("quiet").writable("/"));
        assert!(!GuestSettings::from_cmdline("tartarus.root=host").image_root);
        assert_eq!(GuestSettings::from_cmdline("quiet").hostname, "sandbox");
    }
}
