//! Confinement of QEMU itself, the host side of each VM: a user of its own, no capabilities, its own
//! network and IPC namespaces, and QEMU's seccomp sandbox (`-sandbox on`, in [`super::qemu::vm_args`]).
//!
//! A guest that escaped into its QEMU process lands as an unprivileged user that owns nothing on the
//! host but its console log, cannot signal or trace any other VM's QEMU (each has another uid), has
//! no network at all, and cannot fork, exec, raise privileges or change resource controls (QEMU's
//! seccomp filter). QEMU gets every file it uses as an inherited descriptor ([`Inherited`]): its
//! kernel, initramfs and root disk, its console log and its end of the agent channel (a socket pair), so
//! it needs no path into the lane's private directories.
//!
//! Users come from a range that owns no file ([`VMM_UID_BASE`]..+[`VMM_UIDS`]): one per live VM,
//! allocated by creating `<state>/vmm-users/<uid>` (a symlink to the VM's directory) with `O_EXCL`
//! semantics, released with the VM, and swept when its VM's directory is gone.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The first host uid (and gid) of QEMU processes (the process lane's ids start at 100000000). No file
/// on the host is owned by them but each VM's console log.
pub const VMM_UID_BASE: u32 = 200_000_000;
/// How many VMs can be confined at once on one host.
pub const VMM_UIDS: u32 = 65_536;

/// One VM's QEMU user, allocated until [`VmmUser::release`] (or the sweep after a crash).
#[derive(Debug)]
pub struct VmmUser {
    pub uid: u32,
    link: PathBuf,
}

impl VmmUser {
    /// Allocates a free uid for the VM whose directory is `vm_dir`, starting at a random place in the
    /// range so that concurrent supervisors rarely contend. Bounded: one attempt per uid of the range.
    pub fn allocate(users_dir: &Path, vm_dir: &Path) -> io::Result<VmmUser> {
        std::fs::create_dir_all(users_dir)?;
        let mut start = [0u8; 4];
        tartarus_hostsys::random_bytes(&mut start)?;
        let start = u32::from_le_bytes(start) % VMM_UIDS;
        for step in 0..VMM_UIDS {
            let uid = VMM_UID_BASE + (start + step) % VMM_UIDS;
            let link = users_dir.join(uid.to_string());
            match std::os::unix::fs::symlink(vm_dir, &link) {
                Ok(()) => return Ok(VmmUser { uid, link }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "all {VMM_UIDS} QEMU users are taken: too many microVMs on this host"
        )))
    }

    /// Gives the uid back. Idempotent.
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.link);
    }
}

/// Removes the allocations whose VM's directory is gone (a supervisor that died without cleaning up);
/// returns what it removed. A live VM's directory exists before its allocation, so this never takes a
/// live VM's uid.
pub fn sweep_users(users_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(users_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let dangling = std::fs::read_link(&path).is_ok_and(|target| !target.exists());
        if dangling && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The group that may open `/dev/kvm` (its owner group, when the group can read and write it); QEMU
/// gets it as its only supplementary group under KVM.
pub fn kvm_group() -> Option<u32> {
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    (meta.mode() & 0o060 == 0o060 && meta.gid() != 0).then_some(meta.gid())
}

/// The descriptors QEMU inherits: its kernel, initramfs and root disk (opened by the supervisor, named
/// to QEMU as `/proc/self/fd/N`, which reopens the file without walking the private path to it), its
/// console log, and its end of the agent channel.
#[derive(Default)]
pub struct Inherited {
    fds: Vec<OwnedFd>,
}

impl Inherited {
    /// Opens `path` read-only and returns the name QEMU uses for it. QEMU's reopen checks the file's own
    /// mode, so it must be world-readable (the lane makes its own files so; see `boot`).
    pub fn add_file(&mut self, path: &Path) -> io::Result<PathBuf> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.mode() & 0o004 == 0 {
            return Err(io::Error::other(format!(
                "{} is not world-readable, and QEMU runs as an unprivileged user: chmod o+r it",
                path.display()
            )));
        }
        Ok(self.add_fd(file.into()).1)
    }

    /// Creates `path` for QEMU's user to write (the guest's console log) and returns QEMU's name for it.
    pub fn add_log(&mut self, path: &Path, uid: u32) -> io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(uid))?;
        Ok(self.add_fd(file.into()).1)
    }

    /// Passes `fd` to QEMU; returns its number and its `/proc/self/fd` name.
    pub fn add_fd(&mut self, fd: OwnedFd) -> (RawFd, PathBuf) {
        let raw = fd.as_raw_fd();
        self.fds.push(fd);
        (raw, PathBuf::from(format!("/proc/self/fd/{raw}")))
    }

    fn raw(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// Makes `command` (QEMU) run as `uid` (and gid `uid`), with no supplementary group but `kvm_group`, no
/// capabilities, `no_new_privs`, fresh network and IPC namespaces, and `inherited`'s descriptors. Runs after
/// every hook registered before it (joining the cgroup needs root) and before those registered after
/// (the parent-death signal, which a change of credentials clears).
pub fn confine_before_exec(command: &mut Command, uid: u32, kvm_group: Option<u32>, inherited: &Inherited) {
    use std::os::unix::process::CommandExt;
    let inherited = inherited.raw();
    let groups: Vec<libc::gid_t> = kvm_group.into_iter().collect();
    let hook = move || -> io::Result<()> {
        let check = |rc: libc::c_int| match rc {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
        // SAFETY: raw syscalls only between fork and exec (no allocation, no locks); `groups` and
        // `inherited` are owned by the closure and outlive the calls.
        unsafe {
            for &fd in &inherited {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            check(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC))?;
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(uid, uid, uid))?;
            check(libc::setresuid(uid, uid, uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    };
    // SAFETY: the hook above is async-signal-safe (raw syscalls only), as pre_exec requires.
    unsafe {
        command.pre_exec(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_users_are_distinct_released_and_swept_when_their_vm_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let users = dir.path().join("vmm-users");
        let (vm_a, vm_b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&vm_a).expect("a");
        std::fs::create_dir(&vm_b).expect("b");
        let a = VmmUser::allocate(&users, &vm_a).expect("allocate a");
        let b = VmmUser::allocate(&users, &vm_b).expect("allocate b");
        assert_ne!(a.uid, b.uid);
        for user in [&a, &b] {
            assert!((VMM_UID_BASE..VMM_UID_BASE + VMM_UIDS).contains(&user.uid));
        }
        a.release();
        assert!(!users.join(a.uid.to_string()).exists());
        // b's supervisor died and its VM directory was collected: the sweep frees its uid, and only it.
        let c = VmmUser::allocate(&users, &vm_a).expect("allocate c");
        std::fs::remove_dir(&vm_b).expect("remove b");
        let swept = sweep_users(&users);
        assert_eq!(swept, vec![users.join(b.uid.to_string())]);
        assert!(users.join(c.uid.to_string()).exists());
    }
}
