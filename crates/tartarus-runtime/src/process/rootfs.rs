//! Building the sandbox root inside the child's private mount namespace, then pivoting into it.
//!
//! Host sources (`/usr`, devices, `--mount` sources) are captured first as detached mount trees with
//! `open_tree(OPEN_TREE_CLONE)`; read-only is applied to the detached tree before it is attached, so there is
//! never a writable window. Every mount point inside the new root is reached with
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`, so a symlink or `..` in a user's rootfs cannot redirect a
//! mount outside it. The root is staged on `/tmp` of the private namespace (sources are captured by then),
//! then `pivot_root(".", ".")`, and [`detach_host_root`] drops the host's tree entirely. The detach waits
//! for an RCU grace period (≈0.5 ms here), so the caller runs it while the command's process prepares,
//! and the command is only executed once it is done.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{
    mount, mount_change, move_mount, open_tree, unmount, MountFlags, MountPropagationFlags, MoveMountFlags,
    OpenTreeFlags, UnmountFlags,
};
use tartarus_hostsys::mount_attr;

use crate::spec::{RootSpec, SANDBOX_UID};

/// Where the new root is assembled inside the private mount namespace.
const STAGE: &str = "/tmp";

/// A failed setup step: what we were doing and the kernel's answer.
#[derive(Debug)]
pub struct SetupError {
    pub stage: String,
    pub source: io::Error,
}

pub type SetupResult<T> = Result<T, SetupError>;

pub(crate) trait Context<T> {
    fn stage(self, stage: impl FnOnce() -> String) -> SetupResult<T>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn stage(self, stage: impl FnOnce() -> String) -> SetupResult<T> {
        self.map_err(|e| SetupError {
            stage: stage(),
            source: e.into(),
        })
    }
}

/// A top-level entry of the host's root mirrored into a host-system sandbox root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A directory bound read-only (`/usr`).
    Bind(&'static str),
    /// A symlink recreated as is (`/bin -> usr/bin` on merged-/usr systems).
    Symlink(&'static str, PathBuf),
}

/// What the root needs, computed by the supervisor before the fork.
pub struct RootInputs {
    pub root: RootSpec,
    /// Canonical host paths of the overlay's lower directories, top first (`--rootfs` or image layers),
    /// checked by the supervisor; empty for the host-system root.
    pub lowers: Vec<PathBuf>,
    /// Leave the root writable (into the overlay's upper layer in scratch) instead of sealing it read-only.
    pub writable_root: bool,
    /// Owner of the home directory (the command's user).
    pub home_owner: u32,
    /// The home directory (absolute), created in the root as a tmpfs.
    pub home: PathBuf,
    /// Created if missing (relative to the new root) when the root is writable: an image's working
    /// directory, which Docker creates too.
    pub create_workdir: Option<PathBuf>,
    pub host_entries: Vec<HostEntry>,
    /// Host files and directories from `/etc` shared read-only (none are secrets).
    pub shared_etc: Vec<&'static str>,
    /// Generated `/etc` files (name, content), host-system root only.
    pub etc_files: Vec<(&'static str, Vec<u8>)>,
    pub mounts: Vec<PreparedMount>,
    pub scratch_bytes: u64,
}

/// A `--mount`, with its source checked and canonicalised by the supervisor. The child captures it by
/// path: descriptors from the supervisor's mount namespace cannot be cloned into the sandbox's.
pub struct PreparedMount {
    pub source: PathBuf,
    pub source_is_dir: bool,
    /// Relative to the new root (no leading `/`).
    pub target: PathBuf,
    pub writable: bool,
}

/// Device nodes bound from the host's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Top-level host entries considered for a host-system root.
pub const HOST_ENTRY_NAMES: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// `/etc` entries shared read-only when present: library cache, alternatives symlinks, CA certificates.
/// (`matplotlibrc`: Debian's matplotlib reads its defaults from there.)
pub const SHARED_ETC: &[&str] = &[
    "etc/ld.so.cache",
    "etc/alternatives",
    "etc/ssl/certs",
    "etc/matplotlibrc",
];

/// Inspects the host's top-level entries (run in the supervisor).
pub fn host_entries() -> Vec<HostEntry> {
    let mut out = Vec::new();
    for &name in HOST_ENTRY_NAMES {
        let path = Path::new("/").join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push(HostEntry::Symlink(name, target));
                }
            }
            Ok(m) if m.is_dir() => out.push(HostEntry::Bind(name)),
            _ => {}
        }
    }
    out
}

/// The minimal generated `/etc`: a passwd/group with the sandbox user, loopback-only hosts, no resolvers.
pub fn generated_etc(
    hostname: &str,
    resolv_conf: &[u8],
    user_name: &str,
    home: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let uid = SANDBOX_UID;
    vec![
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 {user_name}:x:{uid}:{uid}:{user_name}:{home}:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            )
            .into_bytes(),
        ),
        (
            "group",
            format!("root:x:0:\n{user_name}:x:{uid}:\nnogroup:x:65534:\n").into_bytes(),
        ),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n").into_bytes(),
        ),
        ("hostname", format!("{hostname}\n").into_bytes()),
        (
            "nsswitch.conf",
            b"passwd: files\ngroup: files\nhosts: files dns\n".to_vec(),
        ),
        ("resolv.conf", resolv_conf.to_vec()),
    ]
}

/// Builds the root and pivots into it. Runs in the child, as the namespace's root, single-threaded.
/// The host's root is still attached under the new one until [`detach_host_root`].
pub fn build_and_pivot(inputs: &RootInputs) -> SetupResult<()> {
    mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .stage(|| "making mounts private".into())?;

    // 1. Capture every host source while the host tree is still fully visible.
    let host_system = inputs.root == RootSpec::HostSystem;
    let mut host_trees = Vec::new();
    if host_system {
        for entry in &inputs.host_entries {
            if let HostEntry::Bind(name) = entry {
                host_trees.push((*name, capture(CWD, &format!("/{name}"))?));
            }
        }
        for &name in &inputs.shared_etc {
            let host = format!("/{name}");
            if Path::new(&host).exists() {
                host_trees.push((name, capture(CWD, &host)?));
            }
        }
    }
    let mut user_trees = Vec::with_capacity(inputs.mounts.len());
    for m in &inputs.mounts {
        let tree = open_tree(
            CWD,
            &m.source,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
        )
        .stage(|| format!("capturing mount source for /{}", m.target.display()))?;
        let mut attrs = mount_attr::NOSUID | mount_attr::NODEV;
        if !m.writable {
            attrs |= mount_attr::RDONLY;
        }
        tartarus_hostsys::set_mount_attributes(tree.as_fd(), attrs, true)
            .stage(|| format!("setting attributes of /{}", m.target.display()))?;
        user_trees.push(tree);
    }

    // 2. The root mount itself: the scratch tmpfs, or an overlay whose upper layer lives in it. The lower
    //    directories (a rootfs or image layers) are opened before /tmp is shadowed and reached through
    //    their descriptors.
    let mut lowers = Vec::with_capacity(inputs.lowers.len());
    for path in &inputs.lowers {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .stage(|| format!("opening root layer {}", path.display()))?;
        lowers.push(fd);
    }
    mount_fs(
        "tmpfs",
        STAGE,
        "tmpfs",
        &format!("mode=0755,size={}", inputs.scratch_bytes),
    )?;
    let root_path = if lowers.is_empty() {
        STAGE.to_string()
    } else {
        let lowerdir: Vec<String> = lowers
            .iter()
            .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .collect();
        for dir in ["upper", "work", "root"] {
            rustix::fs::mkdir(format!("{STAGE}/{dir}"), Mode::from_raw_mode(0o755))
                .stage(|| format!("creating overlay {dir} directory"))?;
        }
        let options = format!(
            "lowerdir={},upperdir={STAGE}/upper,workdir={STAGE}/work,userxattr",
            lowerdir.join(":")
        );
        mount_fs("overlay", &format!("{STAGE}/root"), "overlay", &options).map_err(|e| SetupError {
            stage: format!("overlay over {}", root_description(&inputs.root)),
            ..e
        })?;
        format!("{STAGE}/root")
    };
    let root = rustix::fs::open(
        &root_path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .stage(|| "opening the new root".into())?;

    // 3. Host system directories and shared /etc entries.
    if host_system {
        for entry in &inputs.host_entries {
            if let HostEntry::Symlink(name, target) = entry {
                rustix::fs::symlinkat(target, &root, *name).stage(|| format!("creating /{name} symlink"))?;
            }
        }
        let etc = ensure_dir(&root, Path::new("etc"))?;
        for (name, content) in &inputs.etc_files {
            write_new_file(&etc, name, content)?;
        }
        for (name, tree) in &host_trees {
            let target = Path::new(name);
            let is_dir = rustix::fs::fstat(tree)
                .map(|s| is_dir_mode(s.st_mode))
                .unwrap_or(true);
            let point = if is_dir {
                ensure_dir(&root, target)?
            } else {
                ensure_file(&root, target)?
            };
            attach(tree, &point, name)?;
        }
    }

    // 4. /proc, /dev and the scratch areas. The root tmpfs itself holds /tmp, the home and /dev/shm (one
    //    size cap for all scratch); each is bound onto itself so it stays writable when the root is sealed.
    let proc_dir = ensure_dir(&root, Path::new("proc"))?;
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs_at("proc", &proc_dir, "proc", proc_flags, None, "/proc")?;
    let dev = ensure_dir(&root, Path::new("dev"))?;
    for name in DEVICES {
        let point = ensure_file(&dev, Path::new(name))?;
        bind_at(&format!("/dev/{name}"), &point)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        rustix::fs::symlinkat(target, &dev, link).stage(|| format!("creating /dev/{link}"))?;
    }
    let pts = ensure_dir(&dev, Path::new("pts"))?;
    let pts_opts = Some("newinstance,ptmxmode=0666,mode=0620");
    mount_fs_at(
        "devpts",
        &pts,
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        pts_opts,
        "/dev/pts",
    )?;
    let home_path = inputs.home.display().to_string();
    let home = Path::new(home_path.trim_start_matches('/'));
    for (path, mode) in [
        (Path::new("tmp"), 0o1777),
        (Path::new("dev/shm"), 0o1777),
        (home, 0o755),
    ] {
        let dir = ensure_dir_with_mode(&root, path, mode)?;
        if path == home {
            let id = Some(rustix::process::Uid::from_raw(inputs.home_owner));
            let gid = Some(rustix::process::Gid::from_raw(inputs.home_owner));
            rustix::fs::chownat(&dir, "", id, gid, rustix::fs::AtFlags::EMPTY_PATH)
                .stage(|| format!("giving {home_path} to the sandbox user"))?;
        }
        let fd_path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        bind_at(&fd_path, &dir).map_err(|e| SetupError {
            stage: format!("binding /{}", path.display()),
            ..e
        })?;
    }

    // 5. User mounts, in order (a later mount may sit inside an earlier one).
    for (m, tree) in inputs.mounts.iter().zip(&user_trees) {
        let point = if m.source_is_dir {
            ensure_dir(&root, &m.target)?
        } else {
            ensure_file(&root, &m.target)?
        };
        attach(tree, &point, &m.target.display().to_string())?;
    }

    if let Some(dir) = inputs.create_workdir.as_deref().filter(|_| inputs.writable_root) {
        if !dir.as_os_str().is_empty() {
            ensure_dir(&root, dir)?;
        }
    }

    // 6. Seal the root read-only and switch to it.
    let root_top = rustix::fs::open(
        &root_path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .stage(|| "reopening the new root".into())?;
    let mut seal = mount_attr::NOSUID | mount_attr::NODEV;
    if !inputs.writable_root {
        seal |= mount_attr::RDONLY;
    }
    tartarus_hostsys::set_mount_attributes(root_top.as_fd(), seal, false)
        .stage(|| "making the root read-only".into())?;
    rustix::process::fchdir(&root_top).stage(|| "entering the new root".into())?;
    rustix::process::pivot_root(".", ".").stage(|| "pivot_root".into())?;
    Ok(())
}

fn root_description(root: &RootSpec) -> String {
    match root {
        RootSpec::HostSystem => "the host system".into(),
        RootSpec::Directory(path) => format!("rootfs {}", path.display()),
        RootSpec::Layers(layers) => format!("{} image layers", layers.len()),
    }
}

/// Detaches the host's root, which `pivot_root(".", ".")` left mounted on top of the new root (and is the
/// current directory). Nothing untrusted may run in the mount namespace before this returns.
pub fn detach_host_root() -> SetupResult<()> {
    unmount(".", UnmountFlags::DETACH).stage(|| "detaching the host root".into())?;
    rustix::process::chdir("/").stage(|| "chdir /".into())
}

fn is_dir_mode(mode: u32) -> bool {
    rustix::fs::FileType::from_raw_mode(mode) == rustix::fs::FileType::Directory
}

/// A detached, read-only (nosuid) clone of the host tree at `path`.
fn capture(dir: BorrowedFd<'_>, path: &str) -> SetupResult<OwnedFd> {
    let tree = open_tree(
        dir,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
    )
    .stage(|| format!("capturing host {path}"))?;
    let attrs = mount_attr::RDONLY | mount_attr::NOSUID | mount_attr::NODEV;
    tartarus_hostsys::set_mount_attributes(tree.as_fd(), attrs, true)
        .stage(|| format!("making host {path} read-only"))?;
    Ok(tree)
}

fn attach(tree: &OwnedFd, point: &OwnedFd, what: &str) -> SetupResult<()> {
    move_mount(
        tree,
        "",
        point,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .stage(|| format!("mounting /{what}"))
}

/// Binds the host path (or /proc/self/fd path) `source` onto the mount point `point`.
fn bind_at(source: &str, point: &OwnedFd) -> SetupResult<()> {
    let target = format!("/proc/self/fd/{}", point.as_raw_fd());
    mount(source, target.as_str(), "", MountFlags::BIND, None).stage(|| format!("binding {source}"))
}

fn mount_fs(source: &str, target: &str, fstype: &str, data: &str) -> SetupResult<()> {
    let data = CString::new(data).stage(|| format!("{fstype} options"))?;
    mount(
        source,
        target,
        fstype,
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(data.as_c_str()),
    )
    .stage(|| format!("mounting {fstype} on {target}"))
}

/// Mounts a filesystem on the directory `point` refers to (through its /proc/self/fd path, which pins the
/// exact directory we resolved without symlinks).
fn mount_fs_at(
    source: &str,
    point: &OwnedFd,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
    what: &str,
) -> SetupResult<()> {
    let target = format!("/proc/self/fd/{}", point.as_raw_fd());
    let data = data
        .map(CString::new)
        .transpose()
        .stage(|| format!("{fstype} options"))?;
    mount(source, target.as_str(), fstype, flags, data.as_deref())
        .stage(|| format!("mounting {fstype} on {what}"))
}

fn resolve_beneath(dir: impl AsFd, name: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    rustix::fs::openat2(
        dir,
        name,
        flags | OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(io::Error::from)
}

fn symlink_refusal(path: &Path, e: io::Error) -> SetupError {
    // With O_NOFOLLOW a symlink shows up as ELOOP, or ENOTDIR when a directory was asked for.
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR) => SetupError {
            stage: format!(
                "mount point /{} passes through a symlink or a non-directory, or leaves the root; use the real path",
                path.display()
            ),
            source: e,
        },
        _ => SetupError { stage: format!("resolving /{}", path.display()), source: e },
    }
}

/// Creates (if needed) and opens the directory `path` below `root` without following any symlink.
pub(crate) fn ensure_dir(root: impl AsFd, path: &Path) -> SetupResult<OwnedFd> {
    ensure_dir_with_mode(root, path, 0o755)
}

/// [`ensure_dir`], creating missing directories with `mode` (the caller's umask is 0 during setup).
fn ensure_dir_with_mode(root: impl AsFd, path: &Path, mode: u32) -> SetupResult<OwnedFd> {
    // One component at a time: mkdirat never follows a symlink in its last component, and each step is
    // reopened with RESOLVE_NO_SYMLINKS, so nothing here can leave `root`.
    let root = root.as_fd();
    let mut current: Option<OwnedFd> = None;
    for component in path.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        let parent = current.as_ref().map(|fd| fd.as_fd()).unwrap_or(root);
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(SetupError {
                    stage: format!("creating /{}", path.display()),
                    source: e.into(),
                })
            }
        }
        let next = resolve_beneath(parent, Path::new(name), OFlags::DIRECTORY)
            .map_err(|e| symlink_refusal(path, e))?;
        current = Some(next);
    }
    match current {
        Some(fd) => Ok(fd),
        None => {
            resolve_beneath(root, Path::new("."), OFlags::DIRECTORY).map_err(|e| symlink_refusal(path, e))
        }
    }
}

/// Creates (if needed) an empty file at `path` below `root` to serve as a mount point, without following
/// symlinks.
fn ensure_file(root: impl AsFd, path: &Path) -> SetupResult<OwnedFd> {
    let root = root.as_fd();
    let parent_path = path.parent().unwrap_or(Path::new(""));
    let parent_fd = match parent_path.as_os_str().is_empty() {
        true => None,
        false => Some(ensure_dir(root, parent_path)?),
    };
    let parent = parent_fd.as_ref().map(|fd| fd.as_fd()).unwrap_or(root);
    let name = path.file_name().ok_or_else(|| SetupError {
        stage: format!("mount point /{} has no file name", path.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    match rustix::fs::openat(
        parent,
        name,
        OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    ) {
        Ok(_) | Err(rustix::io::Errno::ISDIR) => {}
        Err(e) => return Err(symlink_refusal(path, e.into())),
    }
    resolve_beneath(parent, Path::new(name), OFlags::empty()).map_err(|e| symlink_refusal(path, e))
}

fn write_new_file(dir: &OwnedFd, name: &str, content: &[u8]) -> SetupResult<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .stage(|| format!("creating /etc/{name}"))?;
    tartarus_hostsys::write_all(&fd, content).stage(|| format!("writing /etc/{name}"))
}
