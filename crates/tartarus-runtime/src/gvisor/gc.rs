//! Garbage collection: runsc containers, bundles and cgroups whose supervisor died (killed outright, it
//! cannot clean up; its sandbox's processes are not its children, so they outlive it).

use std::path::{Path, PathBuf};

use super::cgroups::remove_cgroup_dirs;
use super::runsc::{Invocation, NetworkFlag, RunscBinary};
use super::{StateDirs, CONTAINER_PREFIX, CONTROL_TIMEOUT};

/// The owner pid of a container or bundle named `tartarus-<pid>-<id>`.
pub(super) fn owner_of(name: &str) -> Option<i32> {
    name.strip_prefix(CONTAINER_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Deletes the runsc containers and bundles under `dirs` whose owner died, with their cgroups.
pub fn collect_garbage(
    runsc: &RunscBinary,
    platform: crate::lanes::GvisorPlatform,
    dirs: &StateDirs,
    cgroup_parent: &str,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dirs.bundles) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_of(&name) else { continue };
        if tartarus_hostsys::process_exists(owner) {
            continue;
        }
        let bundle = entry.path();
        let invocation = Invocation::new(
            runsc,
            &dirs.root,
            platform,
            NetworkFlag::None,
            false,
            Path::new("/dev/null"),
        );
        let _ = invocation.run(&["delete", "--force", &name], CONTROL_TIMEOUT);
        let rootfs = bundle.join("rootfs");
        let _ = rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH);
        if let Some(id) = name.rsplit('-').next() {
            let _ = remove_cgroup_dirs(&format!("/{cgroup_parent}/gvisor-{owner}-{id}"));
        }
        if std::fs::remove_dir_all(&bundle).is_ok() {
            removed.push(bundle);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_owners_are_read_from_container_names() {
        assert_eq!(owner_of("tartarus-4242-0a1b2c3d4e5f"), Some(4242));
        assert_eq!(owner_of("other-1-2"), None);
        assert_eq!(owner_of("tartarus-x-1"), None);
    }
}
