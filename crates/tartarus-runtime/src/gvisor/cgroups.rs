//! The cgroups runsc makes for a sandbox (`linux.cgroupsPath`): the handles for counters and throttling,
//! and their removal in every hierarchy.

use std::io;
use std::path::{Path, PathBuf};

use crate::process::cgroup::{CgroupDir, Controller, SandboxCgroups};
use crate::process::{CgroupLayout, HostCgroupFs};

/// The memory, pids and cpu cgroups runsc creates for `cgroups_path`, for reading counters and throttling.
pub(super) fn cgroups_for(cgroups_path: &str) -> SandboxCgroups {
    let layout = CgroupLayout::detect(&HostCgroupFs);
    let relative = cgroups_path.trim_start_matches('/');
    let mut dirs: Vec<CgroupDir> = Vec::new();
    for controller in [Controller::Memory, Controller::Pids, Controller::Cpu] {
        let Some((version, mount)) = layout.placement(controller) else {
            continue;
        };
        CgroupDir::add(&mut dirs, version, mount.join(relative), controller);
    }
    SandboxCgroups { dirs }
}

/// Every directory runsc may have made for `cgroups_path`: in each v1 hierarchy and in the v2 tree.
fn cgroup_dirs_everywhere(cgroups_path: &str) -> Vec<PathBuf> {
    let relative = cgroups_path.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let layout = CgroupLayout::detect(&HostCgroupFs);
    if layout.v2_mount.as_deref() == Some(root) {
        return vec![root.join(relative)];
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path().join(relative))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.exists());
    dirs
}

pub(super) fn remove_cgroup_dirs(cgroups_path: &str) -> Option<(PathBuf, io::Error)> {
    let mut failure = None;
    for dir in cgroup_dirs_everywhere(cgroups_path) {
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                failure.get_or_insert((dir, e));
            }
        }
    }
    failure
}
