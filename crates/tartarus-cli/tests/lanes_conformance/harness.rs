//! The lanes, the per-check fixture (own state directory and cgroup parent, so leaks are this check's
//! alone), the one-shot and service-mode drivers, and the leak check run after every check.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::server::{call, create, DataDir, Server};
use crate::common::{bin, cgroup_parent, leftover_cgroups, remove_cgroup_parent, result_record};
pub use crate::common::{poll_until, processes_naming};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Process,
    Gvisor,
    Microvm,
    Wasm,
}

impl Lane {
    fn parse(name: &str) -> Lane {
        match name {
            "process" => Lane::Process,
            "gvisor" => Lane::Gvisor,
            "microvm" => Lane::Microvm,
            "wasm" => Lane::Wasm,
            other => panic!("no lane {other} in the harness: add a Lane variant"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::Process => "process",
            Lane::Gvisor => "gvisor",
            Lane::Microvm => "microvm",
            Lane::Wasm => "wasm",
        }
    }

    /// Whether the lane honours a terminal (its `LaneCapabilities::terminal`).
    pub fn has_terminal(self) -> bool {
        matches!(self, Lane::Process | Lane::Microvm)
    }
}

/// `tartarus runtimes --json`, once per test binary.
fn probe() -> &'static Value {
    static PROBE: OnceLock<Value> = OnceLock::new();
    PROBE.get_or_init(|| {
        let out = Command::new(bin()).args(["runtimes", "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).expect("tartarus runtimes --json prints JSON")
    })
}

/// The reason CI gives for excluding `lane`, from `TARTARUS_CONFORMANCE_EXCLUDE="lane: why; lane: why"`.
fn exclusion(lane: Lane) -> Option<String> {
    let list = std::env::var("TARTARUS_CONFORMANCE_EXCLUDE").unwrap_or_default();
    list.split(';').find_map(|entry| {
        let (name, why) = entry.split_once(':')?;
        (name.trim() == lane.name() && !why.trim().is_empty()).then(|| why.trim().to_string())
    })
}

/// Runs `check` for `lane` in a fresh fixture, then asserts it left nothing behind.
pub fn conform(lane: &str, check: &str, body: fn(&Fixture)) {
    let lane = Lane::parse(lane);
    if let Some(why) = exclusion(lane) {
        eprintln!("{} excluded from the conformance suite: {why}", lane.name());
        return;
    }
    let report = probe()
        .as_array()
        .and_then(|lanes| lanes.iter().find(|r| r["name"] == lane.name()))
        .unwrap_or_else(|| panic!("tartarus runtimes does not list the {} lane", lane.name()));
    assert_eq!(
        report["available"],
        true,
        "the {} lane cannot run on this host ({}); fix the host, or exclude the lane in CI with \
         TARTARUS_CONFORMANCE_EXCLUDE=\"{}: why\"",
        lane.name(),
        report["reason"],
        lane.name()
    );
    let fixture = Fixture::new(lane, check);
    body(&fixture);
    fixture.assert_no_leaks();
}

/// One check's lane and host state.
pub struct Fixture {
    pub lane: Lane,
    state: tempfile::TempDir,
    pub cgroup_parent: String,
    /// Sandbox ids seen, to look for their shims and network namespaces afterwards.
    ids: RefCell<Vec<String>>,
}

impl Fixture {
    fn new(lane: Lane, check: &str) -> Fixture {
        // Cgroup names stay short: the check's initials.
        let initials: String = check.split('_').filter_map(|w| w.chars().next()).collect();
        Fixture {
            lane,
            state: tempfile::tempdir().unwrap(),
            cgroup_parent: cgroup_parent(&format!("lane-{}-{initials}", lane.name())),
            ids: RefCell::new(Vec::new()),
        }
    }

    fn envs(&self) -> [(&'static str, String); 2] {
        [
            ("TARTARUS_STATE_DIR", self.state.path().display().to_string()),
            ("TARTARUS_CGROUP_PARENT", self.cgroup_parent.clone()),
        ]
    }

    /// Remembers a sandbox id for the leak check.
    pub fn track(&self, id: &str) {
        self.ids.borrow_mut().push(id.to_string());
    }

    /// `tartarus run --runtime <lane> [flags] -- cmd...` with this fixture's state, stdin closed.
    pub fn command(&self, flags: &[&str], cmd: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(["run", "--runtime", self.lane.name()])
            .args(flags)
            .arg("--")
            .args(cmd)
            .envs(self.envs())
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, flags: &[&str], cmd: &[&str]) -> Output {
        let out = self.command(flags, cmd).output().unwrap();
        if flags.contains(&"--json") {
            if let Some(id) = std::panic::catch_unwind(|| result_record(&out)["id"].clone())
                .ok()
                .and_then(|id| id.as_str().map(str::to_string))
            {
                self.track(&id);
            }
        }
        out
    }

    pub fn sh(&self, flags: &[&str], script: &str) -> Output {
        self.run(flags, &["/bin/sh", "-c", script])
    }

    /// A directory for programs the check writes (Wasm modules), removed with the fixture.
    pub fn programs_dir(&self) -> PathBuf {
        let dir = self.state.path().join("programs");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn py(&self, script: &str) -> Output {
        self.run(&[], &["/usr/bin/python3", "-c", script])
    }

    /// `tartarus run` with `input` on its stdin.
    pub fn run_with_stdin(&self, flags: &[&str], cmd: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(flags, cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// A server over a fresh data directory with this fixture's state, and an admin key.
    pub fn service(&self) -> Service {
        let dir = DataDir::new();
        let envs = self.envs();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = Server::start_with_env(dir.path(), &envs);
        Service {
            lane: self.lane,
            server,
            dir,
        }
    }

    fn runsc_root(&self) -> PathBuf {
        self.state.path().join("gvisor/runsc")
    }

    /// Nothing of any sandbox is left: cgroups under the parent, runsc containers and bundles, shims or
    /// other processes naming a sandbox, network namespaces. Polled briefly: a server ends its shims in
    /// the background.
    fn assert_no_leaks(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leaks = self.leaks();
            if leaks.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: {leaks:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn leaks(&self) -> Vec<String> {
        let mut leaks: Vec<String> = leftover_cgroups(&self.cgroup_parent)
            .into_iter()
            .map(|p| format!("cgroup {}", p.display()))
            .collect();
        if self.runsc_root().exists() {
            let list = Command::new("runsc")
                .arg(format!("--root={}", self.runsc_root().display()))
                .args(["list", "--quiet"])
                .output()
                .unwrap();
            let listed = String::from_utf8_lossy(&list.stdout);
            leaks.extend(listed.split_whitespace().map(|c| format!("runsc container {c}")));
        }
        if let Ok(vms) = std::fs::read_dir(self.state.path().join("microvm/vms")) {
            leaks.extend(
                vms.flatten()
                    .map(|vm| format!("VM directory {}", vm.path().display())),
            );
            let needle = self.state.path().join("microvm").display().to_string();
            leaks.extend(
                processes_naming(&needle)
                    .into_iter()
                    .map(|p| format!("process {p} naming {needle}")),
            );
        }
        if let Ok(scratch) = std::fs::read_dir(self.state.path().join("wasm")) {
            leaks.extend(
                scratch
                    .flatten()
                    .map(|s| format!("Wasm scratch directory {}", s.path().display())),
            );
        }
        if let Ok(bundles) = std::fs::read_dir(self.state.path().join("gvisor/bundles")) {
            leaks.extend(
                bundles
                    .flatten()
                    .map(|b| format!("bundle {}", b.path().display())),
            );
        }
        for id in self.ids.borrow().iter() {
            leaks.extend(
                processes_naming(id)
                    .into_iter()
                    .map(|p| format!("process {p} naming {id}")),
            );
            if let Ok(names) = std::fs::read_dir("/run/netns") {
                leaks.extend(
                    names
                        .flatten()
                        .filter(|n| n.file_name().to_string_lossy().contains(id.as_str()))
                        .map(|n| format!("netns {}", n.path().display())),
                );
            }
        }
        leaks
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        remove_cgroup_parent(&self.cgroup_parent);
    }
}

/// Asserts that `value()` does not change for `window` (something that must have stopped stays stopped).
pub fn assert_unchanged<T: PartialEq + std::fmt::Debug>(window: Duration, what: &str, value: impl Fn() -> T) {
    let before = value();
    let end = Instant::now() + window;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(value(), before, "{what}");
    }
}

/// A server whose sandboxes run in the fixture's lane.
pub struct Service {
    pub lane: Lane,
    pub server: Server,
    pub dir: DataDir,
}

impl Service {
    pub fn key(&self) -> &str {
        &self.server.admin
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    /// Creates a sandbox of this lane with `body`'s other fields; returns its id.
    pub fn create(&self, fixture: &Fixture, mut body: Value) -> String {
        body["runtime"] = json!(self.lane.name());
        let record = create(&self.server, self.key(), body);
        assert_eq!(record["runtime"], self.lane.name(), "{record}");
        let id = record["id"].as_str().unwrap().to_string();
        fixture.track(&id);
        id
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(method, &self.url(path), Some(self.key()), body)
    }

    pub fn exec(&self, id: &str, body: Value) -> (u16, Value) {
        self.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(body))
    }

    /// An exec that must succeed at the API level; its result.
    pub fn exec_ok(&self, id: &str, body: Value) -> Value {
        let (status, result) = self.exec(id, body);
        assert_eq!(status, 200, "{result}");
        result
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("sandboxes").join(id)
    }

    pub fn main_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.sandbox_dir(id).join("main.log")).unwrap_or_default()
    }

    pub fn result(&self, id: &str) -> Value {
        let text = std::fs::read_to_string(self.sandbox_dir(id).join("result.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Polls until the main command's log holds `needle`.
    pub fn wait_for_log(&self, id: &str, needle: &str) {
        poll_until(
            Duration::from_secs(30),
            &format!("{needle:?} in main.log"),
            || self.main_log(id).contains(needle),
        );
    }

    /// `DELETE` (with `?grace_s=` when given): the answer must be 200 with status `killed`; then the
    /// sandbox's shim is gone.
    pub fn delete(&self, id: &str, grace_s: Option<u64>) -> Value {
        let query = grace_s.map(|g| format!("?grace_s={g}")).unwrap_or_default();
        let (status, record) = self.call("DELETE", &format!("/v1/sandboxes/{id}{query}"), None);
        assert_eq!(
            (status, record["status"].as_str()),
            (200, Some("killed")),
            "{record}"
        );
        poll_until(Duration::from_secs(20), "the shim exits after a delete", || {
            processes_naming(id).is_empty()
        });
        record
    }
}

/// A sandbox-visible path holding `contents` exists nowhere but here: a host file the sandbox must not see.
pub fn host_secret(dir: &Path) -> PathBuf {
    let secret = dir.join(format!("tartarus-secret-{}", std::process::id()));
    std::fs::write(&secret, "TOP-SECRET").unwrap();
    secret
}

/// Forks sleeping children until a fork fails, prints `fork failed <errno> <children>`, then kills them.
pub const FORK_BOMB: &str = "import os, time
pids = []
try:
    for _ in range(2000):
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        pids.append(pid)
    print('no fork failed', len(pids))
except OSError as e:
    print('fork failed', e.errno, len(pids))
for p in pids:
    os.kill(p, 9)
for p in pids:
    os.waitpid(p, 0)
";

/// [`FORK_BOMB`]'s output says a fork failed with EAGAIN before `limit` processes.
pub fn assert_fork_bomb_bounded(output: &str, limit: usize) {
    let words: Vec<&str> = output.split_whitespace().collect();
    assert_eq!(words.get(..3), Some(&["fork", "failed", "11"][..]), "{output}");
    let children: usize = words[3].parse().unwrap();
    assert!(
        children < limit,
        "{children} children under a limit of {limit}: {output}"
    );
}
