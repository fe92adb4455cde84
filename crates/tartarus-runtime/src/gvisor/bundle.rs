//! The OCI bundle of one gVisor sandbox: `config.json` built from the [`SandboxSpec`] with the `oci-spec`
//! crate, and the root directory it names.
//!
//! The root, by [`RootSpec`]: the host system is a directory in the bundle holding the host's top-level
//! symlinks (`bin -> usr/bin`) and a generated `/etc`, with `/usr` (and the other real top-level
//! directories) and the shared `/etc` entries bound read-only; a directory is used read-only as it is; image
//! layers are one read-only overlay on the host (only lower layers), mounted for `runsc create` and
//! detached right after (the gofer keeps its own copy), made writable inside the sentry by
//! `--overlay2=root:memory`, so writes live in sandbox memory and vanish with it. Scratch areas (`/tmp`,
//! home, `/dev/shm`) are gVisor tmpfs mounts: sentry memory, charged to the sandbox's memory cgroup.
//! The process has no capabilities and no new privileges; seccomp is gVisor's own, on the sentry.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::process::rootfs::{self, HostEntry};
use crate::spec::{
    normalize_sandbox_path, RootSpec, SandboxSpec, SandboxUser, DEFAULT_PATH, SANDBOX_HOME, SANDBOX_UID,
};

/// Where the service-mode init (a few bytes of static code) is mounted inside the sandbox.
pub const INIT_PATH: &str = "/.tartarus/init";

/// Host tasks one sandbox process may cost: the platform's stub processes and threads (about 6 under
/// ptrace, measured). The sandbox's own count is `RLIMIT_NPROC`, which the sentry enforces exactly; the
/// host pids cgroup only bounds what the sandbox can take from the host.
pub const HOST_TASKS_PER_PROCESS: u64 = 8;
/// Host tasks of the sentry and the gofer themselves (Go runtime threads).
pub const SENTRY_TASKS: u64 = 128;

/// What the bundle needs besides the spec, decided by the runtime.
#[derive(Debug, Clone)]
pub struct BundleInputs {
    /// Host path of the root directory.
    pub root: PathBuf,
    /// Bind mounts: canonical host source, normalised sandbox target, writable.
    pub mounts: Vec<(PathBuf, PathBuf, bool)>,
    /// Host binds of the host-system root (`/usr`, shared `/etc` entries): source = target.
    pub host_binds: Vec<PathBuf>,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    /// The prepared network namespace (egress), joined instead of a new empty one.
    pub netns: Option<PathBuf>,
    /// runsc is started inside the prepared namespace (host stack in it): no network namespace entry.
    pub share_netns: bool,
    /// Host path of the service-mode init, when the sandbox has no main command.
    pub init: Option<PathBuf>,
    /// Host path of the file-operation agent (service sandboxes).
    pub agent: Option<PathBuf>,
    /// The syscall filter every command starts under (the spec denies extra syscalls).
    pub syscall_filter: Option<SyscallFilter>,
}

/// The supervisor's executable in its syscall-filter role ([`super::agent::SYSCALL_FILTER_PATH`]) and the
/// syscall numbers it adds to the process lane's program.
#[derive(Debug, Clone)]
pub struct SyscallFilter {
    pub executable: PathBuf,
    pub denied: Vec<i64>,
}

/// The config could not be built (a builder refused a value).
#[derive(Debug, thiserror::Error)]
#[error("building the OCI config: {0}")]
pub struct BundleError(String);

fn built<T>(r: Result<T, oci_spec::OciSpecError>) -> Result<T, BundleError> {
    r.map_err(|e| BundleError(e.to_string()))
}

/// The command's user: the spec's, or the sandbox user.
pub fn command_user(spec: &SandboxSpec) -> SandboxUser {
    spec.user.unwrap_or(SandboxUser {
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
    })
}

/// The command's environment: the sandbox defaults overridden by `extra`, in order.
pub fn environment(hostname: &str, layers: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut full: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), SANDBOX_HOME.into()),
        ("USER".into(), "sandbox".into()),
        ("LOGNAME".into(), "sandbox".into()),
        ("HOSTNAME".into(), hostname.to_string()),
    ];
    for (k, v) in layers.iter().flat_map(|l| l.iter()) {
        match full.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => full.push((k.clone(), v.clone())),
        }
    }
    full
}

fn mount(destination: &str, typ: &str, source: &Path, options: &[String]) -> Result<Mount, BundleError> {
    built(
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(options.to_vec())
            .build(),
    )
}

fn bind(source: &Path, target: &Path, writable: bool) -> Result<Mount, BundleError> {
    let mode = if writable { "rw" } else { "ro" };
    built(
        MountBuilder::default()
            .destination(target)
            .typ("bind")
            .source(source)
            .options(vec!["rbind".to_string(), mode.to_string()])
            .build(),
    )
}

/// `config.json` for `spec`.
pub fn oci_config(spec: &SandboxSpec, inputs: &BundleInputs) -> Result<Spec, BundleError> {
    let user = command_user(spec);
    let args = match (&inputs.init, spec.command.is_empty(), &inputs.syscall_filter) {
        (Some(_), true, _) => vec![INIT_PATH.to_string()],
        (_, false, Some(filter)) => super::agent::filtered_argv(&filter.denied, &spec.command),
        _ => spec.command.clone(),
    };
    let env: Vec<String> = environment(&spec.hostname, &[&spec.env])
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let cwd = spec
        .workdir
        .as_deref()
        .map(normalize_sandbox_path)
        .unwrap_or_else(|| SANDBOX_HOME.into());
    let none = std::collections::HashSet::new();
    let capabilities = built(
        LinuxCapabilitiesBuilder::default()
            .bounding(none.clone())
            .effective(none.clone())
            .inheritable(none.clone())
            .permitted(none.clone())
            .ambient(none)
            .build(),
    )?;
    let limits = spec.applied_limits();
    let rlimit = |typ, value: u64| {
        built(
            PosixRlimitBuilder::default()
                .typ(typ)
                .hard(value)
                .soft(value)
                .build(),
        )
    };
    let mut rlimits = vec![
        rlimit(PosixRlimitType::RlimitNofile, spec.process_limits.open_files)?,
        rlimit(PosixRlimitType::RlimitFsize, spec.process_limits.file_size_bytes)?,
        rlimit(PosixRlimitType::RlimitCore, 0)?,
    ];
    if let Some(pids) = limits.pids.value() {
        // Processes and threads of the sandbox's users, counted by the sentry itself.
        rlimits.push(rlimit(PosixRlimitType::RlimitNproc, pids)?);
    }
    let process = built(
        ProcessBuilder::default()
            .terminal(false)
            .user(built(
                UserBuilder::default()
                    .uid(user.uid)
                    .gid(user.gid)
                    .additional_gids(Vec::<u32>::new())
                    .build(),
            )?)
            .args(args)
            .env(env)
            .cwd(cwd)
            .capabilities(capabilities)
            .no_new_privileges(true)
            .rlimits(rlimits)
            .build(),
    )?;

    let scratch = spec.scratch_bytes;
    let tmpfs = Path::new("tmpfs");
    let mut mounts = vec![
        mount("/proc", "proc", Path::new("proc"), &[])?,
        mount("/dev", "tmpfs", tmpfs, &["nosuid".into(), "mode=755".into()])?,
        mount(
            "/sys",
            "sysfs",
            Path::new("sysfs"),
            &["nosuid".into(), "noexec".into(), "nodev".into(), "ro".into()],
        )?,
    ];
    for path in &inputs.host_binds {
        mounts.push(bind(path, path, false)?);
    }
    for (target, mode, owner) in [
        ("/tmp", "1777", None),
        (SANDBOX_HOME, "755", Some(user)),
        ("/dev/shm", "1777", None),
    ] {
        let mut options = vec![
            "nosuid".to_string(),
            "nodev".to_string(),
            format!("mode={mode}"),
            format!("size={scratch}"),
        ];
        if !scratch_writable(spec, Path::new(target)) {
            options.push("ro".to_string());
        }
        if let Some(owner) = owner {
            options.push(format!("uid={}", owner.uid));
            options.push(format!("gid={}", owner.gid));
        }
        mounts.push(mount(target, "tmpfs", tmpfs, &options)?);
    }
    for (source, target, writable) in &inputs.mounts {
        mounts.push(bind(source, target, *writable)?);
    }
    if let Some(init) = &inputs.init {
        mounts.push(bind(init, Path::new(INIT_PATH), false)?);
    }
    if let Some(agent) = &inputs.agent {
        mounts.push(bind(agent, Path::new(super::agent::AGENT_PATH), false)?);
    }
    if let Some(filter) = &inputs.syscall_filter {
        mounts.push(bind(
            &filter.executable,
            Path::new(super::agent::SYSCALL_FILTER_PATH),
            false,
        )?);
    }

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ] {
        namespaces.push(built(LinuxNamespaceBuilder::default().typ(typ).build())?);
    }
    let network = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    if !inputs.share_netns {
        namespaces.push(built(match &inputs.netns {
            Some(path) => network.path(path.clone()).build(),
            None => network.build(),
        })?);
    }

    let mut resources = LinuxResourcesBuilder::default().devices(Vec::new());
    if let Some(bytes) = limits.memory_bytes.value() {
        // Swap limited to nothing beyond the memory itself, as in the process lane.
        resources = resources.memory(built(
            LinuxMemoryBuilder::default()
                .limit(bytes as i64)
                .swap(bytes as i64)
                .build(),
        )?);
    }
    if let Some(pids) = limits.pids.value() {
        let host_tasks = pids
            .saturating_mul(HOST_TASKS_PER_PROCESS)
            .saturating_add(SENTRY_TASKS);
        resources = resources.pids(built(
            LinuxPidsBuilder::default().limit(host_tasks as i64).build(),
        )?);
    }
    let mut cpu = LinuxCpuBuilder::default();
    let mut cpu_set = false;
    if let Some(weight) = limits.cpu_weight.value() {
        // v1's cpu.shares: 1024 per 100 of weight (runsc converts back on v2).
        cpu = cpu.shares(weight * 1024 / 100);
        cpu_set = true;
    }
    if let Some(cores) = limits.cpu_quota {
        cpu = cpu.quota((cores * 100_000.0).round() as i64).period(100_000u64);
        cpu_set = true;
    }
    if cpu_set {
        resources = resources.cpu(built(cpu.build())?);
    }
    let linux = built(
        LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(built(resources.build())?)
            .cgroups_path(PathBuf::from(&inputs.cgroups_path))
            .masked_paths(Vec::<String>::new())
            .readonly_paths(Vec::<String>::new())
            .build(),
    )?;
    built(
        SpecBuilder::default()
            .version("1.0.2")
            .process(process)
            .root(built(
                RootBuilder::default()
                    .path(inputs.root.clone())
                    .readonly(!writable_root(spec))
                    .build(),
            )?)
            .hostname(spec.hostname.clone())
            .mounts(mounts)
            .linux(linux)
            .annotations(std::collections::HashMap::new())
            .build(),
    )
}

/// The host-system root: a directory with the host's top-level symlinks, mount points for its real
/// top-level directories and a generated `/etc`; returns the host paths to bind read-only.
pub fn build_host_root(dir: &Path, spec: &SandboxSpec, resolv: &[u8]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir.join("etc"))?;
    let mut binds = Vec::new();
    for entry in rootfs::host_entries() {
        match entry {
            HostEntry::Bind(name) => {
                std::fs::create_dir_all(dir.join(name))?;
                binds.push(Path::new("/").join(name));
            }
            HostEntry::Symlink(name, target) => std::os::unix::fs::symlink(target, dir.join(name))?,
        }
    }
    for shared in rootfs::SHARED_ETC {
        let host = Path::new("/").join(shared);
        if host.exists() {
            binds.push(host);
        }
    }
    for (name, content) in rootfs::generated_etc(&spec.hostname, resolv, spec.user_name(), &spec.home()) {
        std::fs::write(dir.join("etc").join(name), content)?;
    }
    Ok(binds)
}

/// Whether the root is made writable in sandbox memory (`--overlay2=root:memory`): image roots, as in the
/// process lane, where an image's root is an overlay with its upper layer in scratch — unless the spec
/// narrows the writable paths to a set without `/`, when the root stays read-only.
pub fn writable_root(spec: &SandboxSpec) -> bool {
    matches!(spec.root, RootSpec::Layers(_)) && (spec.writable_paths.is_empty() || narrowed_to(spec, "/"))
}

/// Whether the scratch area at `target` is writable. `writable_paths` (a policy's narrower set, e.g.
/// quarantine's `/tmp`) is what the process lane grants with Landlock; here the mounts themselves say
/// it: a scratch area not under one of those paths is mounted read-only. A writable path outside the
/// scratch areas and writable mounts stays read-only on this lane (stricter than Landlock on an image root).
fn scratch_writable(spec: &SandboxSpec, target: &Path) -> bool {
    spec.writable_paths.is_empty()
        || spec
            .writable_paths
            .iter()
            .any(|path| target.starts_with(normalize_sandbox_path(path)))
}

fn narrowed_to(spec: &SandboxSpec, path: &str) -> bool {
    spec.writable_paths
        .iter()
        .any(|p| normalize_sandbox_path(p) == Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BindMount;

    fn inputs() -> BundleInputs {
        BundleInputs {
            root: "/run/tartarus/gvisor/bundles/x/rootfs".into(),
            mounts: Vec::new(),
            host_binds: vec!["/usr".into()],
            cgroups_path: "/tartarus/gvisor-1-abc".into(),
            netns: None,
            share_netns: false,
            init: None,
            agent: None,
            syscall_filter: None,
        }
    }

    fn config(spec: &SandboxSpec, inputs: &BundleInputs) -> serde_json::Value {
        serde_json::to_value(oci_config(spec, inputs).expect("config")).expect("json")
    }

    #[test]
    fn test_the_process_has_no_capabilities_no_new_privileges_and_the_sandbox_user() {
        let c = config(&SandboxSpec::new(vec!["/bin/true".into()]), &inputs());
        let process = &c["process"];
        assert_eq!(process["user"]["uid"], 1000);
        assert_eq!(process["user"]["gid"], 1000);
        assert_eq!(process["noNewPrivileges"], true);
        for set in ["bounding", "effective", "inheritable", "permitted", "ambient"] {
            assert_eq!(process["capabilities"][set], serde_json::json!([]), "{set}");
        }
        assert_eq!(process["cwd"], "/home/sandbox");
        assert_eq!(process["args"], serde_json::json!(["/bin/true"]));
        assert_eq!(c["root"]["readonly"], true);
        let mut image = SandboxSpec::new(vec!["/bin/true".into()]);
        image.root = RootSpec::Layers(vec!["/l".into()]);
        let c = config(&image, &inputs());
        assert_eq!(
            c["root"]["readonly"], false,
            "an image root is writable, into sandbox memory"
        );
        assert!(
            c["linux"].get("seccomp").is_none(),
            "gVisor filters the sentry itself"
        );
    }

    #[test]
    fn test_env_cwd_user_and_limits_come_from_the_spec() {
        let mut spec = SandboxSpec::new(vec!["python3".into()]);
        spec.env = vec![("PATH".into(), "/opt/bin".into()), ("A".into(), "1".into())];
        spec.workdir = Some("/work/./x".into());
        spec.user = Some(SandboxUser { uid: 0, gid: 0 });
        spec.limits.memory_bytes = Some(64 << 20);
        spec.limits.pids = Some(32);
        spec.limits.cpus = Some(0.5);
        let c = config(&spec, &inputs());
        let env = c["process"]["env"].as_array().expect("env");
        assert!(
            env.contains(&"PATH=/opt/bin".into()) && env.contains(&"A=1".into()),
            "{env:?}"
        );
        assert!(env.contains(&"HOME=/home/sandbox".into()));
        assert_eq!(c["process"]["cwd"], "/work/x");
        assert_eq!(c["process"]["user"]["uid"], 0);
        let resources = &c["linux"]["resources"];
        assert_eq!(resources["memory"]["limit"], 64 << 20);
        assert_eq!(resources["memory"]["swap"], 64 << 20);
        assert_eq!(
            resources["pids"]["limit"],
            32 * HOST_TASKS_PER_PROCESS + SENTRY_TASKS
        );
        let rlimits = c["process"]["rlimits"].as_array().expect("rlimits");
        assert!(
            rlimits.contains(&serde_json::json!({"type": "RLIMIT_NPROC", "hard": 32, "soft": 32})),
            "{rlimits:?}"
        );
        assert_eq!(resources["cpu"]["quota"], 50_000);
        assert_eq!(resources["cpu"]["period"], 100_000);
        assert_eq!(resources["cpu"]["shares"], 1024);
        assert_eq!(c["linux"]["cgroupsPath"], "/tartarus/gvisor-1-abc");
    }

    #[test]
    fn test_default_limits_apply_and_lifted_ones_are_left_out() {
        let c = config(&SandboxSpec::new(vec!["x".into()]), &inputs());
        assert_eq!(
            c["linux"]["resources"]["memory"]["limit"],
            crate::DEFAULT_MEMORY_BYTES
        );
        assert_eq!(
            c["linux"]["resources"]["pids"]["limit"],
            crate::DEFAULT_PIDS * HOST_TASKS_PER_PROCESS + SENTRY_TASKS
        );
        let mut spec = SandboxSpec::new(vec!["x".into()]);
        spec.unlimited.memory = true;
        spec.unlimited.pids = true;
        spec.unlimited.cpu = true;
        let c = config(&spec, &inputs());
        let resources = &c["linux"]["resources"];
        assert!(
            resources.get("memory").is_none() && resources.get("pids").is_none(),
            "{resources}"
        );
        assert!(resources.get("cpu").is_none(), "{resources}");
    }

    #[test]
    fn test_scratch_is_three_tmpfs_mounts_of_the_scratch_size_and_mounts_keep_their_mode() {
        let mut spec = SandboxSpec::new(vec!["x".into()]);
        spec.scratch_bytes = 8 << 20;
        spec.mounts.push(BindMount {
            source: "/srv".into(),
            target: "/data".into(),
            writable: true,
        });
        let mut inputs = inputs();
        inputs.mounts = vec![("/srv".into(), "/data".into(), true)];
        let c = config(&spec, &inputs);
        let mounts = c["mounts"].as_array().expect("mounts");
        for target in ["/tmp", "/home/sandbox", "/dev/shm"] {
            let m = mounts.iter().find(|m| m["destination"] == target).expect(target);
            assert_eq!(m["type"], "tmpfs");
            assert!(m["options"]
                .as_array()
                .expect("options")
                .contains(&format!("size={}", 8 << 20).into()));
        }
        let data = mounts.iter().find(|m| m["destination"] == "/data").expect("data");
        assert_eq!(data["options"], serde_json::json!(["rbind", "rw"]));
        let usr = mounts.iter().find(|m| m["destination"] == "/usr").expect("usr");
        assert_eq!(usr["options"], serde_json::json!(["rbind", "ro"]));
    }

    #[test]
    fn test_a_service_sandbox_without_a_command_runs_the_mounted_init_and_egress_joins_its_netns() {
        let spec = SandboxSpec {
            service: true,
            ..SandboxSpec::default()
        };
        let mut inputs = inputs();
        inputs.init = Some("/b/init".into());
        inputs.netns = Some("/run/netns/tartarus-abc".into());
        let c = config(&spec, &inputs);
        assert_eq!(c["process"]["args"], serde_json::json!([INIT_PATH]));
        let namespaces = c["linux"]["namespaces"].as_array().expect("namespaces");
        let net = namespaces
            .iter()
            .find(|n| n["type"] == "network")
            .expect("network");
        assert_eq!(net["path"], "/run/netns/tartarus-abc");
    }

    #[test]
    fn test_denied_syscalls_wrap_the_command_in_the_mounted_filter() {
        let spec = SandboxSpec::new(vec!["chmod".into(), "600".into(), "f".into()]);
        let mut with_filter = inputs();
        with_filter.syscall_filter = Some(SyscallFilter {
            executable: "/usr/bin/tartarus".into(),
            denied: vec![90, 91],
        });
        let c = config(&spec, &with_filter);
        assert_eq!(
            c["process"]["args"],
            serde_json::json!([
                super::super::agent::SYSCALL_FILTER_PATH,
                "90,91",
                "--",
                "chmod",
                "600",
                "f"
            ])
        );
        let mounts = c["mounts"].as_array().expect("mounts");
        let filter = mounts
            .iter()
            .find(|m| m["destination"] == super::super::agent::SYSCALL_FILTER_PATH)
            .expect("the filter is mounted");
        assert_eq!(filter["source"], "/usr/bin/tartarus");
        assert!(filter["options"]
            .as_array()
            .expect("options")
            .contains(&"ro".into()));
        let plain = config(&spec, &inputs());
        assert_eq!(plain["process"]["args"], serde_json::json!(["chmod", "600", "f"]));
    }

    #[test]
    fn test_narrowed_writable_paths_make_the_other_scratch_and_an_image_root_read_only() {
        let mut spec = SandboxSpec::new(vec!["/bin/true".into()]);
        spec.root = RootSpec::Layers(vec!["/layer".into()]);
        assert!(writable_root(&spec), "an image root is writable by default");
        spec.writable_paths = vec!["/tmp".into()];
        assert!(
            !writable_root(&spec),
            "quarantine's /tmp-only leaves the root read-only"
        );
        let c = config(&spec, &inputs());
        assert_eq!(c["root"]["readonly"], true);
        let mounts = c["mounts"].as_array().expect("mounts");
        let read_only = |target: &str| {
            let m = mounts.iter().find(|m| m["destination"] == target).expect(target);
            m["options"].as_array().expect("options").contains(&"ro".into())
        };
        assert!(!read_only("/tmp"));
        assert!(read_only(SANDBOX_HOME));
        assert!(read_only("/dev/shm"));
        spec.writable_paths = vec!["/".into()];
        assert!(writable_root(&spec));
    }
}
