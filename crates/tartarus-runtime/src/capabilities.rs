//! What a lane (runtime backend) can honour, and the check that refuses a spec asking for more.
//!
//! Place in the data flow: a caller picks a lane, asks [`crate::Runtime::supports`] (which `prepare` also
//! does) and gets either `Ok` or one line naming the first knob the lane cannot honour. The service
//! operations (pause, file operations, throttling, cutting the network) are declared here too, so a caller
//! can answer "unsupported" before trying; the spec never asks for them.

use crate::spec::{NetworkMode, ProcessLimits, RootSpec, SandboxSpec};

/// The knobs and operations one lane can honour. Host conditions (root for egress, a freezer cgroup for
/// pause) are not capabilities: they are reported when the operation is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LaneCapabilities {
    /// Long-lived sandboxes serving execs (`spec.service`).
    pub service: bool,
    /// A terminal for the command (`spec.tty`).
    pub terminal: bool,
    /// `network: host-loopback`.
    pub host_loopback: bool,
    /// `network: egress` with a contract.
    pub egress_network: bool,
    /// Host paths bound into the sandbox (`spec.mounts`).
    pub bind_mounts: bool,
    /// A host directory as the root (`root: Directory`).
    pub directory_root: bool,
    /// Image layers as the root (`root: Layers`).
    pub image_layers: bool,
    pub memory_limit: bool,
    pub cpu_limit: bool,
    pub pids_limit: bool,
    /// Per-process rlimits other than the defaults (`spec.process_limits`).
    pub rlimits: bool,
    /// Syscalls denied on top of the built-in list (`spec.denied_syscalls`).
    pub seccomp_syscall_lists: bool,
    /// Landlock's writable paths (`spec.writable_paths`).
    pub landlock_paths: bool,
    /// A user other than the sandbox user (`spec.user`).
    pub custom_user: bool,
    /// Another name (and home) for the sandbox user (`spec.user_name`).
    pub user_name: bool,
    /// Freezing and thawing every process of a service sandbox.
    pub pause: bool,
    /// Reading, writing and listing files inside a service sandbox.
    pub file_ops: bool,
    /// Lowering a running sandbox's CPU quota.
    pub cpu_throttle: bool,
    /// Cutting a running sandbox's egress network off.
    pub network_isolation: bool,
    /// Saving a service sandbox's whole state — memory, processes, scratch files — to disk and ending it,
    /// then restoring it into a new sandbox of the same spec ([`crate::ServiceSandbox::hibernate`]).
    pub pause_to_disk: bool,
}

impl LaneCapabilities {
    /// Everything (the process lane).
    pub const ALL: LaneCapabilities = LaneCapabilities {
        service: true,
        terminal: true,
        host_loopback: true,
        egress_network: true,
        bind_mounts: true,
        directory_root: true,
        image_layers: true,
        memory_limit: true,
        cpu_limit: true,
        pids_limit: true,
        rlimits: true,
        seccomp_syscall_lists: true,
        landlock_paths: true,
        custom_user: true,
        user_name: true,
        pause: true,
        file_ops: true,
        cpu_throttle: true,
        network_isolation: true,
        pause_to_disk: true,
    };

    /// The first knob of `spec` that `lane` (with these capabilities) cannot honour.
    pub fn check(&self, lane: &'static str, spec: &SandboxSpec) -> Result<(), Unsupported> {
        let asked: [(bool, bool, &'static str); 15] = [
            (spec.service, self.service, "service sandboxes (service)"),
            (spec.tty, self.terminal, "a terminal (tty)"),
            (
                spec.network == NetworkMode::HostLoopback,
                self.host_loopback,
                "host loopback networking (network: host-loopback)",
            ),
            (
                matches!(spec.network, NetworkMode::Egress(_)),
                self.egress_network,
                "egress networking (network: egress)",
            ),
            (!spec.mounts.is_empty(), self.bind_mounts, "bind mounts (mounts)"),
            (
                matches!(spec.root, RootSpec::Directory(_)),
                self.directory_root,
                "a directory root (root: directory)",
            ),
            (
                matches!(spec.root, RootSpec::Layers(_)),
                self.image_layers,
                "an image root (root: layers)",
            ),
            (
                spec.limits.memory_bytes.is_some(),
                self.memory_limit,
                "a memory limit (limits.memory_bytes)",
            ),
            (
                spec.limits.cpus.is_some(),
                self.cpu_limit,
                "a CPU limit (limits.cpus)",
            ),
            (
                spec.limits.pids.is_some(),
                self.pids_limit,
                "a pids limit (limits.pids)",
            ),
            (
                spec.process_limits != ProcessLimits::default(),
                self.rlimits,
                "rlimits other than the defaults (process_limits)",
            ),
            (
                !spec.denied_syscalls.is_empty(),
                self.seccomp_syscall_lists,
                "extra denied syscalls (denied_syscalls)",
            ),
            (
                !spec.writable_paths.is_empty(),
                self.landlock_paths,
                "Landlock writable paths (writable_paths)",
            ),
            (spec.user.is_some(), self.custom_user, "a custom user (user)"),
            (
                spec.user_name.is_some(),
                self.user_name,
                "another name for the sandbox user (user_name)",
            ),
        ];
        match asked
            .into_iter()
            .find(|&(wanted, honoured, _)| wanted && !honoured)
        {
            Some((_, _, knob)) => Err(Unsupported { lane, knob }),
            None => Ok(()),
        }
    }
}

/// A spec asks for a knob its lane cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {lane} lane cannot honour {knob}")]
pub struct Unsupported {
    pub lane: &'static str,
    pub knob: &'static str,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::spec::{BindMount, SandboxUser};

    fn spec() -> SandboxSpec {
        SandboxSpec::new(vec!["/bin/true".into()])
    }

    #[test]
    fn a_lane_with_everything_accepts_every_knob() {
        let mut s = spec();
        s.service = true;
        s.tty = true;
        s.network = NetworkMode::HostLoopback;
        s.mounts.push(BindMount {
            source: "/tmp".into(),
            target: "/data".into(),
            writable: true,
        });
        s.root = RootSpec::Layers(vec![PathBuf::from("/layer")]);
        s.limits.memory_bytes = Some(64 << 20);
        s.limits.cpus = Some(0.5);
        s.limits.pids = Some(64);
        s.process_limits.open_files = 64;
        s.denied_syscalls = vec!["socket".into()];
        s.writable_paths = vec!["/tmp".into()];
        s.user = Some(SandboxUser { uid: 0, gid: 0 });
        assert_eq!(LaneCapabilities::ALL.check("process", &s), Ok(()));
    }

    #[test]
    fn a_lane_without_landlock_refuses_writable_paths_naming_knob_and_lane() {
        let lane = LaneCapabilities {
            landlock_paths: false,
            ..LaneCapabilities::ALL
        };
        assert_eq!(lane.check("wasm", &spec()), Ok(()), "the knob is not asked for");
        let mut s = spec();
        s.writable_paths = vec!["/tmp".into()];
        let err = lane.check("wasm", &s).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "the wasm lane cannot honour Landlock writable paths (writable_paths)"
        );
    }

    #[test]
    fn default_rlimits_do_not_count_as_asked_for() {
        let lane = LaneCapabilities {
            rlimits: false,
            ..LaneCapabilities::ALL
        };
        assert_eq!(lane.check("wasm", &spec()), Ok(()));
        let mut s = spec();
        s.process_limits.file_size_bytes = 1 << 20;
        assert_eq!(
            lane.check("wasm", &s).map_err(|e| e.knob),
            Err("rlimits other than the defaults (process_limits)")
        );
    }

    #[test]
    fn each_network_mode_is_its_own_knob() {
        let lane = LaneCapabilities {
            egress_network: false,
            ..LaneCapabilities::ALL
        };
        let mut s = spec();
        s.network = NetworkMode::HostLoopback;
        assert_eq!(lane.check("gvisor", &s), Ok(()));
        s.network = NetworkMode::Egress(Default::default());
        assert_eq!(
            lane.check("gvisor", &s).map_err(|e| e.knob),
            Err("egress networking (network: egress)")
        );
    }
}
