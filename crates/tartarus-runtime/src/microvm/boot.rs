//! What a guest boots from: the kernel (found and checked), the initramfs (the supervisor's own static
//! executable as PID 1, the kernel modules the guest needs, a few `/etc` files) and the read-only root
//! disk (an erofs image of the host's `/usr`). The initramfs and the disk are built once and kept in the
//! lane's cache directory under a name derived from what they were built from, so every VM of the same
//! inputs shares them and a changed input gets a new file.
//!
//! Debian's cloud kernel (`linux-image-cloud-amd64`) has ext4, tmpfs, devtmpfs, the 8250 serial console
//! and seccomp built in, and virtio, virtio-mmio, virtio-console, virtio-blk and erofs as modules (no 9p,
//! no virtiofs without virtiofsd): [`GUEST_MODULES`] are loaded by the agent from the initramfs, in
//! dependency order from the kernel's `modules.dep`. A kernel with them built in needs none.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The guest agent's path in the initramfs (`rdinit=`); its file name is how the executable knows it is
/// the guest agent.
pub const AGENT_PATH: &str = "/.tartarus/guest-agent";
pub const AGENT_NAME: &str = "guest-agent";
/// The file-operation agent inside the guest: a link to [`AGENT_PATH`] under the name that role answers to.
pub const FILE_OP_AGENT_PATH: &str = crate::gvisor::agent::AGENT_PATH;
/// Where the initramfs holds the modules, loaded in the order of their file names.
pub const MODULES_DIR: &str = "/.tartarus/modules";
/// Kernel modules the guest needs, by name (dependencies are added from `modules.dep`).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "erofs",
    "overlay",
    "virtio_net",
];
/// Bumped when the initramfs layout or the agent's expectations of it change.
const INITRAMFS_FORMAT: u32 = 3;
/// Bumped when the root image's contents rules change.
const ROOT_FORMAT: u32 = 1;
/// Bumped when the rules of an image's root disk change.
const IMAGE_FORMAT: u32 = 1;
/// An image's root disk unused (unmodified) for this long is removed when another is built.
const IMAGE_DISK_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// Trees of the host's `/usr` left out of the root image: documentation, headers, toolchains and SDKs a
/// sandbox of the host root does not run (relative to `/usr`, as `mkfs.erofs --exclude-regex`).
pub const ROOT_EXCLUDES: &[&str] = &[
    "^(local|include|src|games)(/|$)",
    "^share/(doc|man|info|locale|icons|fonts|help|gtk-doc|javascript|X11|texmf|emacs)(/|$)",
    "^lib/(google-cloud-sdk|jvm|llvm-[0-9]+|gcc|modules|firmware|rustlib|postgresql|debug|node_modules)(/|$)",
];
/// Longest a root image build may take.
const ROOT_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// Something a guest needs is missing or cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "no guest kernel: install one (apt-get install linux-image-cloud-amd64) or set TARTARUS_MICROVM_KERNEL"
    )]
    NoKernel,
    #[error("guest kernel {path} is not a readable file")]
    Kernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module {name} is neither built into {release} nor in {dir}")]
    Module {
        name: String,
        release: String,
        dir: PathBuf,
    },
    #[error("cannot find mkfs.erofs to build the guest's root disk: apt-get install erofs-utils")]
    NoMkfsErofs,
    #[error("building {what} failed: {message}")]
    Build { what: &'static str, message: String },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> BootError {
    move |source| BootError::Io { what, source }
}

/// A checked guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub path: PathBuf,
    /// From the file name (`vmlinuz-<release>`), when it has that form.
    pub release: Option<String>,
}

/// The configured kernel, else the newest `/boot/vmlinuz-*-cloud-amd64`.
pub fn find_kernel(configured: Option<&Path>) -> Result<Kernel, BootError> {
    let path = match configured {
        Some(path) => path.to_path_buf(),
        None => newest_cloud_kernel(Path::new("/boot")).ok_or(BootError::NoKernel)?,
    };
    let file = std::fs::File::open(&path).map_err(|source| BootError::Kernel {
        path: path.clone(),
        source,
    })?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(BootError::Kernel {
            path,
            source: io::Error::other("not a regular file"),
        });
    }
    let release = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string);
    Ok(Kernel { path, release })
}

fn newest_cloud_kernel(boot: &Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(boot)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        .collect();
    names.sort_by_key(|name| version_key(name));
    names.pop().map(|n| boot.join(n))
}

/// `vmlinuz-6.12.3-1-cloud-amd64` → `[6, 12, 3, 1]`, for ordering releases.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The module files for `wanted` (and what they depend on) in load order, from
/// `/lib/modules/<release>/modules.dep`; built-in modules are left out.
pub fn module_files(release: &str, wanted: &[&str]) -> Result<Vec<PathBuf>, BootError> {
    let dir = Path::new("/lib/modules").join(release);
    let dep = std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default();
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    resolve_modules(&dep, &builtin, wanted)
        .map(|files| files.into_iter().map(|f| dir.join(f)).collect())
        .map_err(|name| BootError::Module {
            name,
            release: release.to_string(),
            dir,
        })
}

/// The `modules.dep` paths of `wanted` and their dependencies, dependencies first; the first name that is
/// neither in `dep` nor in `builtin` is the error.
fn resolve_modules(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    let module_name = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split('.').next().unwrap_or(file).replace('-', "_")
    };
    let is_builtin = |name: &str| builtin.lines().any(|l| module_name(l) == name);
    let mut order: Vec<String> = Vec::new();
    for name in wanted {
        let name = name.replace('-', "_");
        let Some(line) = dep.lines().find(|l| {
            l.split_once(':')
                .is_some_and(|(path, _)| module_name(path) == name)
        }) else {
            if is_builtin(&name) {
                continue;
            }
            return Err(name);
        };
        let (path, deps) = line.split_once(':').unwrap_or((line, ""));
        // modules.dep lists every (transitive) dependency, the deepest last.
        for needed in deps.split_whitespace().rev().chain([path]) {
            if !order.iter().any(|p| p == needed) {
                order.push(needed.to_string());
            }
        }
    }
    Ok(order)
}

/// A short hex digest of `parts`.
fn digest(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// Identity of a file that is cheap to read: device, inode, size and modification time.
fn file_identity(path: &Path) -> io::Result<Vec<u8>> {
    let m = std::fs::metadata(path)?;
    Ok(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    )
    .into_bytes())
}

/// The initramfs for `agent` (the supervisor's executable) and `modules`, built into `cache` unless it is
/// there already.
pub fn initramfs(cache: &Path, agent: &Path, modules: &[PathBuf]) -> Result<PathBuf, BootError> {
    let mut parts: Vec<Vec<u8>> = vec![INITRAMFS_FORMAT.to_le_bytes().to_vec()];
    parts.push(file_identity(agent).map_err(io_err("reading the supervisor's executable"))?);
    for module in modules {
        parts.push(module.as_os_str().as_encoded_bytes().to_vec());
        parts.push(file_identity(module).map_err(io_err("reading a kernel module"))?);
    }
    parts.push(std::fs::read("/etc/ld.so.cache").unwrap_or_default());
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let path = cache.join(format!("initramfs-{}.cpio", digest(&refs)));
    let built = build_once(cache, &path, |staged| write_initramfs(staged, agent, modules))?;
    if !built {
        return Ok(path);
    }
    // Another executable's initramfs may be in use (tests and the CLI share the cache): only day-old
    // ones go.
    remove_siblings(cache, "initramfs-", &path, Duration::from_secs(86_400));
    Ok(path)
}

/// Builds `path` with `build` (into a staging file renamed into place whole) unless it exists, under the
/// cache's lock; `true` when this call built it.
fn build_once(
    cache: &Path,
    path: &Path,
    build: impl FnOnce(&Path) -> Result<(), BootError>,
) -> Result<bool, BootError> {
    if path.is_file() {
        return Ok(false);
    }
    let _lock = CacheLock::take(cache)?;
    if path.is_file() {
        return Ok(false);
    }
    let staged = path.with_extension(format!("tmp-{}", std::process::id()));
    // World-readable: QEMU, as its own unprivileged user, reopens its descriptor of the file.
    let result = build(&staged)
        .and_then(|()| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err("making a build readable"))
        })
        .and_then(|()| std::fs::rename(&staged, path).map_err(io_err("renaming a build")));
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result.map(|()| true)
}

/// Removes the other builds next to `keep` not modified for `min_age` (VMs still running keep their open
/// copy).
fn remove_siblings(cache: &Path, prefix: &str, keep: &Path, min_age: Duration) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
        if name.starts_with(prefix) && !name.contains(".tmp-") && entry.path() != keep && old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn write_initramfs(out: &Path, agent: &Path, modules: &[PathBuf]) -> Result<(), BootError> {
    let agent_bytes = agent_executable(agent, out)?;
    let file = std::fs::File::create(out).map_err(io_err("creating the initramfs"))?;
    let mut cpio = Cpio::new(io::BufWriter::new(file));
    let w = |r: io::Result<()>| r.map_err(io_err("writing the initramfs"));
    for dir in [
        ".tartarus",
        ".tartarus/modules",
        "dev",
        "proc",
        "sys",
        "tmp",
        "usr",
        "etc",
        "home",
        "run",
        "mnt",
    ] {
        w(cpio.dir(dir, 0o755))?;
    }
    // The host's top-level links into /usr (a merged-/usr system), so paths like /bin/sh resolve.
    for name in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(name)) {
            w(cpio.symlink(name, &target.to_string_lossy()))?;
        }
    }
    w(cpio.file(&AGENT_PATH[1..], 0o755, &agent_bytes))?;
    // The same executable under the file-operation agent's name, which is how it knows its role
    // (`crate::gvisor::agent`): service sandboxes' file operations run it as the sandbox user.
    w(cpio.symlink(&FILE_OP_AGENT_PATH[1..], AGENT_NAME))?;
    // And under the port connector's (`connect_port`).
    w(cpio.symlink(&super::agent::connect::CONNECT_PATH[1..], AGENT_NAME))?;
    for (i, module) in modules.iter().enumerate() {
        let bytes = std::fs::read(module).map_err(io_err("reading a kernel module"))?;
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        w(cpio.file(&format!("{}/{i:02}-{name}", &MODULES_DIR[1..]), 0o644, &bytes))?;
    }
    if let Ok(bytes) = std::fs::read("/etc/ld.so.cache") {
        w(cpio.file("etc/ld.so.cache", 0o644, &bytes))?;
    }
    if let Ok(entries) = std::fs::read_dir("/etc/alternatives") {
        w(cpio.dir("etc/alternatives", 0o755))?;
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let name = format!("etc/alternatives/{}", entry.file_name().to_string_lossy());
                w(cpio.symlink(&name, &target.to_string_lossy()))?;
            }
        }
    }
    w(cpio.finish())
}

/// The executable's bytes without debug sections when `objcopy` is at hand (a debug build is mostly debug
/// information, and the guest unpacks the initramfs into its RAM), else as they are.
fn agent_executable(agent: &Path, out: &Path) -> Result<Vec<u8>, BootError> {
    let stripped = out.with_extension("agent");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(agent)
        .arg(&stripped)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bytes = match ok {
        true => std::fs::read(&stripped),
        false => std::fs::read(agent),
    };
    let _ = std::fs::remove_file(&stripped);
    bytes.map_err(io_err("reading the supervisor's executable"))
}

/// A `newc` cpio archive writer (what the kernel unpacks as an initramfs).
struct Cpio<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio { out, ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name_size = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_size,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name_size)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..(4 - len % 4) % 4])
    }

    fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040000 | perm, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120777, target.as_bytes())
    }

    fn finish(mut self) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()
    }
}

/// The read-only root disk: an erofs image of the host's `/usr` (less [`ROOT_EXCLUDES`]), built into
/// `cache` unless there. Its name comes from the host's package database and the modification times of
/// `/usr` and the directories below it (a package install changes them), not from hashing gigabytes.
pub fn root_image(cache: &Path) -> Result<PathBuf, BootError> {
    let mkfs = which("mkfs.erofs").ok_or(BootError::NoMkfsErofs)?;
    let mut parts: Vec<Vec<u8>> = vec![ROOT_FORMAT.to_le_bytes().to_vec()];
    parts.extend(ROOT_EXCLUDES.iter().map(|e| e.as_bytes().to_vec()));
    for path in ["/var/lib/dpkg/status", "/usr"] {
        parts.push(file_identity(Path::new(path)).unwrap_or_default());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr")
        .map_err(io_err("reading /usr"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    for sub in ["/usr/lib", "/usr/share", "/usr/lib/x86_64-linux-gnu"] {
        dirs.extend(
            std::fs::read_dir(sub)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    dirs.sort();
    for dir in &dirs {
        parts.push(dir.as_os_str().as_encoded_bytes().to_vec());
        parts.push(file_identity(dir).unwrap_or_default());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let path = cache.join(format!("usr-{}.erofs", digest(&refs)));
    let built = build_once(cache, &path, |staged| {
        let mut command = Command::new(mkfs);
        command.args(["--quiet", "-x-1", "--all-root"]);
        for exclude in ROOT_EXCLUDES {
            command.arg(format!("--exclude-regex={exclude}"));
        }
        command.arg(staged).arg("/usr");
        let message = match crate::gvisor::runsc::run_bounded(command, ROOT_BUILD_TIMEOUT) {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => crate::gvisor::runsc::last_line(&out.stderr),
            Err(e) => crate::error_chain(&e),
        };
        Err(BootError::Build {
            what: "the guest's root disk (mkfs.erofs of /usr)",
            message,
        })
    })?;
    if !built {
        return Ok(path);
    }
    remove_siblings(cache, "usr-", &path, Duration::ZERO);
    Ok(path)
}

/// The read-only root disk of an image: an erofs image of its layers (`layers` bottom first, as in
/// [`crate::RootSpec::Layers`]) merged, built into `cache` unless there, named by the layers' paths and
/// identities (the image store's layer directories are content-addressed and never change).
///
/// The layers are merged by a read-only overlay mounted in a private mount namespace (so no mount
/// outlives the build, whatever happens to it), and read by `mkfs.erofs` inside a user namespace that
/// maps the image store's shifted ids back (host `id_base + n` is `n`), so the disk carries the image's
/// own owners. Bounded in time. A single layer gets an empty layer of ours below it: overlayfs needs
/// two lower layers when it has no upper one.
pub fn image_disk(cache: &Path, layers: &[PathBuf], id_base: u32) -> Result<PathBuf, BootError> {
    let mkfs = which("mkfs.erofs").ok_or(BootError::NoMkfsErofs)?;
    let mut parts: Vec<Vec<u8>> = vec![
        IMAGE_FORMAT.to_le_bytes().to_vec(),
        id_base.to_le_bytes().to_vec(),
    ];
    let mut lowers = Vec::with_capacity(layers.len());
    for layer in layers {
        let canonical = std::fs::canonicalize(layer).map_err(io_err("reading an image layer"))?;
        if canonical.to_string_lossy().contains([':', ',']) {
            return Err(BootError::Build {
                what: "an image's root disk",
                message: format!(
                    "a layer path with ':' or ',' cannot be an overlay layer: {}",
                    canonical.display()
                ),
            });
        }
        parts.push(canonical.as_os_str().as_encoded_bytes().to_vec());
        parts.push(file_identity(&canonical).map_err(io_err("reading an image layer"))?);
        lowers.push(canonical);
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let path = cache.join(format!("image-{}.erofs", digest(&refs)));
    if lowers.is_empty() {
        return Err(BootError::Build {
            what: "an image's root disk",
            message: "an image root needs at least one layer".into(),
        });
    }
    if lowers.len() == 1 {
        let empty = cache.join("empty-layer");
        std::fs::create_dir_all(&empty).map_err(io_err("creating an empty layer"))?;
        lowers.insert(0, empty);
    }
    let built = build_once(cache, &path, |staged| {
        merge_into_erofs(&mkfs, staged, &lowers, id_base)
    })?;
    if built {
        remove_siblings(cache, "image-", &path, IMAGE_DISK_MAX_AGE);
    }
    Ok(path)
}

/// `mkfs.erofs` of the overlay of `lowers` (bottom first) into `out`; see [`image_disk`].
///
/// A placeholder process makes a user namespace whose root is host `id_base` (`0 id_base 65536`; its
/// descriptor keeps the namespace after the placeholder is gone). `mkfs.erofs` is then started by a
/// child that, as the host's root, unshares a private mount namespace and mounts the layers' read-only
/// overlay over `/tmp` in it (no host mount to leave behind), then joins the user namespace as its root,
/// so `mkfs.erofs` reads every file with the image's own owner; it writes `out` through a descriptor it
/// inherits (`/proc/self/fd/N`), as the cache directory is root's only.
fn merge_into_erofs(mkfs: &Path, out: &Path, lowers: &[PathBuf], id_base: u32) -> Result<(), BootError> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let failed = |message: String| BootError::Build {
        what: "an image's root disk (mkfs.erofs of its layers)",
        message,
    };
    let userns = id_mapped_user_namespace(id_base)
        .map_err(|e| failed(format!("a user namespace for the build: {e}")))?;
    let output = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io_err("creating an image's root disk"))?;
    // The namespace's root reopens `out` through /proc/self/fd: it owns the file until the build is done.
    std::os::unix::fs::fchown(&output, Some(id_base), Some(id_base))
        .map_err(io_err("handing the disk to the build"))?;
    let lowerdir: Vec<String> = lowers.iter().rev().map(|l| l.display().to_string()).collect();
    let options = CString::new(format!("lowerdir={},userxattr", lowerdir.join(":")))
        .map_err(|_| failed("a layer path has a NUL byte".into()))?;
    let (output_fd, userns_fd) = (output.as_raw_fd(), userns.as_raw_fd());
    let mut command = Command::new(mkfs);
    command
        .args(["--quiet", "-x-1"])
        .arg(format!("/proc/self/fd/{output_fd}"))
        .arg("/tmp")
        .stdin(Stdio::null());
    let hook = move || -> io::Result<()> {
        let check = |rc: libc::c_int| match rc {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
        // SAFETY: raw syscalls only between fork and exec (no allocation, no locks); every pointer is to
        // a NUL-terminated string owned by the closure or a static C string.
        unsafe {
            check(libc::fcntl(output_fd, libc::F_SETFD, 0))?;
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // Over /tmp: mkfs.erofs resolves its source to a path and walks it as the namespace's
            // root, which may not enter root's own directories (the layers are found before the mount
            // covers /tmp).
            check(libc::mount(
                c"overlay".as_ptr(),
                c"/tmp".as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_RDONLY,
                options.as_ptr().cast(),
            ))?;
            check(libc::setns(userns_fd, libc::CLONE_NEWUSER))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(0, 0, 0))?;
            check(libc::setresuid(0, 0, 0))?;
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe (raw syscalls only), as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
    let message = match crate::gvisor::runsc::run_bounded(command, ROOT_BUILD_TIMEOUT) {
        Ok(run) if run.status.success() => {
            return std::os::unix::fs::fchown(&output, Some(0), Some(0))
                .map_err(io_err("taking the disk back"));
        }
        Ok(run) => crate::gvisor::runsc::last_line(&run.stderr),
        Err(e) => crate::error_chain(&e),
    };
    Err(failed(message))
}

/// A user namespace mapping ids 0..65536 to host `id_base`.., as a descriptor (`/proc/<pid>/ns/user`
/// of a placeholder `sleep` that is killed and reaped before this returns).
fn id_mapped_user_namespace(id_base: u32) -> io::Result<std::fs::File> {
    use std::os::unix::process::CommandExt;
    let mut placeholder = Command::new("sleep");
    placeholder
        .arg("30")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: one raw syscall between fork and exec.
    unsafe {
        placeholder.pre_exec(|| match libc::unshare(libc::CLONE_NEWUSER) {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        });
    }
    let mut child = placeholder.spawn()?;
    let result = (|| {
        let map = format!("0 {id_base} 65536\n");
        std::fs::write(format!("/proc/{}/uid_map", child.id()), &map)?;
        std::fs::write(format!("/proc/{}/gid_map", child.id()), &map)?;
        std::fs::File::open(format!("/proc/{}/ns/user", child.id()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `kernel` if QEMU's unprivileged user can read it, else a world-readable copy of it in `cache` (some
/// distributions install kernels readable by root only; a kernel image is no secret).
pub fn world_readable_kernel(cache: &Path, kernel: &Path) -> Result<PathBuf, BootError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(kernel).map_err(io_err("reading the guest kernel"))?;
    if meta.mode() & 0o004 != 0 {
        return Ok(kernel.to_path_buf());
    }
    let identity = file_identity(kernel).map_err(io_err("reading the guest kernel"))?;
    let path = cache.join(format!(
        "kernel-{}",
        digest(&[kernel.as_os_str().as_encoded_bytes(), &identity])
    ));
    build_once(cache, &path, |staged| {
        std::fs::copy(kernel, staged)
            .map(drop)
            .map_err(io_err("copying the guest kernel"))
    })?;
    Ok(path)
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// An exclusive `flock` on the cache directory's lock file while one build runs.
struct CacheLock(#[allow(dead_code)] std::fs::File);

impl CacheLock {
    fn take(cache: &Path) -> Result<CacheLock, BootError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cache.join("build.lock"))
            .map_err(io_err("opening the cache's lock file"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err("locking the cache")(e.into()))?;
        Ok(CacheLock(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_modules_come_with_their_dependencies_first_and_builtins_are_skipped() {
        let dep = "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let builtin = "kernel/fs/ext4/ext4.ko\n";
        assert_eq!(
            resolve_modules(dep, builtin, &["virtio_mmio", "ext4", "virtio-blk"]),
            Ok(vec![
                "kernel/drivers/virtio/virtio_ring.ko".to_string(),
                "kernel/drivers/virtio/virtio.ko".to_string(),
                "kernel/drivers/virtio/virtio_mmio.ko".to_string(),
                "kernel/drivers/block/virtio_blk.ko".to_string(),
            ])
        );
        assert_eq!(
            resolve_modules(dep, builtin, &["erofs"]),
            Err("erofs".to_string())
        );
    }

    #[test]
    fn test_the_newest_cloud_kernel_is_chosen_by_version_not_by_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-57-cloud-amd64",
            "vmlinuz-6.12.0-1-amd64",
            "config-6.1.0-57-cloud-amd64",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(
            newest_cloud_kernel(dir.path()),
            Some(dir.path().join("vmlinuz-6.1.0-57-cloud-amd64"))
        );
        let kernel = find_kernel(Some(&dir.path().join("vmlinuz-6.1.0-57-cloud-amd64"))).expect("found");
        assert_eq!(kernel.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        let err = find_kernel(Some(Path::new("/nonexistent/vmlinuz"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    }

    #[test]
    fn test_cpio_entries_are_newc_and_aligned() {
        let mut bytes = Vec::new();
        let mut cpio = Cpio::new(&mut bytes);
        cpio.file("init", 0o755, b"abc").expect("write");
        cpio.finish().expect("finish");
        assert!(bytes.starts_with(b"070701"));
        // header 110 + "init\0" 5 → padded to 116, data 3 → padded to 4.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"abc");
        assert_eq!(&bytes[120..126], b"070701");
        assert_eq!(bytes.len() % 4, 0);
    }
}
