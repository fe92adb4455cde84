//! A sandbox's scratch directory, the guest's `/tmp`.
//!
//! As root it is a tmpfs of its own, `size=` the spec's `scratch_bytes`, created with `fsopen` and
//! `fsmount` and never attached to any path: it exists only as a descriptor of this process (the guest's
//! preopen reaches it through `/proc/self/fd/N`), so the kernel removes it when the last descriptor
//! closes, whatever way the supervisor ends. Otherwise (no `CAP_SYS_ADMIN`, or a kernel without the new
//! mount API) it is a private directory under the state directory, removed at cleanup, and **not
//! size-bounded**: the guest can fill the host file system that holds it (docs/wasm.md).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags, MountAttrFlags,
};

/// Where the scratch directory lives; removed by [`Scratch::remove`] (and on drop).
#[derive(Debug)]
pub enum Scratch {
    /// A detached tmpfs: gone with its descriptor.
    Tmpfs { mount: OwnedFd, bytes: u64 },
    /// A directory on the host's file system.
    Directory { path: PathBuf },
}

impl Scratch {
    /// A size-bounded tmpfs when this process may mount one, else a directory `parent/name` (`name` starts
    /// with the supervisor's pid: directories of supervisors that died are removed first).
    pub fn create(parent: &Path, name: &str, bytes: u64) -> io::Result<Scratch> {
        collect_garbage(parent);
        if rustix::process::geteuid().is_root() {
            if let Ok(mount) = detached_tmpfs(bytes) {
                return Ok(Scratch::Tmpfs { mount, bytes });
            }
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        let path = parent.join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Scratch::Directory { path })
    }

    /// The host path a preopen opens: the tmpfs through this process's descriptor, or the directory.
    pub fn host_path(&self) -> PathBuf {
        match self {
            Scratch::Tmpfs { mount, .. } => PathBuf::from(format!("/proc/self/fd/{}", mount.as_raw_fd())),
            Scratch::Directory { path } => path.clone(),
        }
    }

    /// Whether the guest's writes are bounded (a tmpfs), and by how much.
    pub fn bound(&self) -> Option<u64> {
        match self {
            Scratch::Tmpfs { bytes, .. } => Some(*bytes),
            Scratch::Directory { .. } => None,
        }
    }

    /// Removes a directory scratch area with everything in it; a tmpfs goes when this value is dropped.
    pub fn remove(&mut self) -> io::Result<()> {
        match self {
            Scratch::Tmpfs { .. } => Ok(()),
            Scratch::Directory { path } => match std::fs::remove_dir_all(&*path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Removes the scratch directories under `parent` whose supervisor (the pid their name starts with) is
/// gone; returns what it removed.
pub fn collect_garbage(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|n| n.split('-').next()?.parse::<i32>().ok());
        if owner.is_some_and(|pid| !tartarus_hostsys::process_exists(pid))
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

/// A tmpfs of `bytes`, mode 1777 like a `/tmp`, not attached anywhere.
fn detached_tmpfs(bytes: u64) -> io::Result<OwnedFd> {
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "size", bytes.max(4096).to_string())?;
    fsconfig_set_string(&fs, "mode", "1777")?;
    fsconfig_create(&fs)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )?;
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_scratch_area_is_writable_and_gone_after_remove() {
        let parent = tempfile::tempdir().expect("tempdir");
        let mut scratch = Scratch::create(parent.path(), "s1", 1 << 20).expect("scratch");
        let file = scratch.host_path().join("hello");
        std::fs::write(&file, b"hi").expect("write");
        assert_eq!(std::fs::read(&file).expect("read"), b"hi");
        scratch.remove().expect("remove");
        assert!(!parent.path().join("s1").exists());
        let mine = parent.path().join(format!("{}-live", std::process::id()));
        let dead = parent.path().join("4194305-dead"); // above the largest pid_max
        std::fs::create_dir_all(mine.join("x")).expect("mine");
        std::fs::create_dir_all(dead.join("x")).expect("dead");
        assert_eq!(collect_garbage(parent.path()), vec![dead]);
        assert!(mine.exists(), "a live supervisor's directory stays");
        if rustix::process::geteuid().is_root() {
            assert_eq!(scratch.bound(), Some(1 << 20), "root gets a bounded tmpfs");
            let big = vec![0u8; 2 << 20];
            let err = std::fs::write(scratch.host_path().join("big"), big).expect_err("over the size");
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        }
    }
}
