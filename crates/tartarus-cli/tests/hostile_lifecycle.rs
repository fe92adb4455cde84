//! Hostile tenants against a server's defaults and lifecycle (findings C1, H4, H5, M3, M4, L8 of
//! /work/shared/research/hostile-tenant-findings.md): what a server without any policy allows, warm pools
//! outside quotas, and what sandboxes leave behind after a crash, a template delete or their end.
//!
//! Servers that run many sandboxes are placed in a v1 pids cgroup the test creates (standing for the
//! host's pid space), so a regression can never exhaust the machine.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::processes_naming;
use common::registry::{base_layer, Compression, Format, Image, Registry, RunConfig};
use common::server::{call, cli, create, new_key, DataDir, Server};
use serde_json::{json, Value};

/// A v1 pids cgroup standing for the host; the server (and so its shims and sandboxes) is moved into it.
struct HostStandIn(PathBuf);

impl HostStandIn {
    fn new(test: &str, pids_max: u32) -> HostStandIn {
        let path =
            Path::new("/sys/fs/cgroup/pids").join(format!("tartarus-hostile-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("pids.max"), pids_max.to_string()).unwrap();
        HostStandIn(path)
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for HostStandIn {
    fn drop(&mut self) {
        // Its processes end with the test's sandboxes (DataDir) and server; wait for them to leave.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_contained(dir: &Path, stand_in: &HostStandIn, args: &[&str]) -> Server {
    let server = Server::start_with(dir, &[], args);
    stand_in.adopt(server.child.id());
    server
}

fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    call("GET", &format!("{}{path}", server.base), Some(key), None)
}

/// Sandbox cgroups (named `<shim pid>-<id>`) of the shim `pid` in any hierarchy.
fn cgroups_of_shim(pid: i32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for root in common::cgroup_roots() {
        if let Ok(entries) = std::fs::read_dir(root.join("tartarus")) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{pid}-")))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

fn poll(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_a_policy_a_tenants_21st_live_sandbox_is_refused_while_another_tenant_still_creates() {
    let stand_in = HostStandIn::new("count", 600);
    let dir = DataDir::new();
    let server = start_contained(dir.path(), &stand_in, &[]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            create(&server, &alpha, json!({}))["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&alpha),
        Some(json!({})),
    );

    assert_eq!(
        status, 429,
        "the 21st live sandbox of a tenant without a policy: {body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_sandboxes") && message.contains("20"),
        "{message}"
    );
    let b = create(&server, &beta, json!({}));
    assert_eq!(b["status"], "running", "another tenant is not affected: {b}");
    // Every sandbox gets a pids limit (C1): the default, or what it asked for up to the maximum.
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("sandboxes").join(&ids[0]).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["limits"]["pids"], 256, "{spec}");
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&beta),
        Some(json!({"resources": {"pids": 100000}})),
    );
    assert_eq!(status, 422, "more pids than resources.max_pids: {body}");
    // No host network for user keys without a policy (C2's default).
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&beta),
        Some(json!({"network": "host-loopback"})),
    );
    assert_eq!(status, 403, "{body}");
}

#[test]
fn the_effective_policy_without_any_policy_is_the_builtin_default() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");

    let out = cli(&server, &alpha, &["policy", "show", "--effective"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(shown["builtin"], true, "{shown}");
    assert_eq!(shown["tenant"], "alpha");
    assert_eq!(shown["resources"]["max_sandboxes"], 20);
    assert_eq!(shown["resources"]["max_total_memory_mb"], 10240);
    assert_eq!(shown["resources"]["max_pids"], 256);
    assert_eq!(shown["security"]["allow_host_network"], false);
    let (status, body) = get(&server, &alpha, "/v1/policies/effective?tenant=beta");
    assert_eq!(
        status, 403,
        "another tenant's policy is not a user key's to see: {body}"
    );
    let (status, body) = get(&server, &server.admin, "/v1/policies/effective?tenant=beta");
    assert_eq!((status, &body["tenant"]), (200, &json!("beta")), "{body}");
}

#[test]
fn a_user_keys_templates_cannot_keep_more_warm_sandboxes_or_templates_than_the_tenant_cap() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");
    // Nothing listens on 127.0.0.1:1: pools of these templates never start (the pull fails on loopback).
    let template = |id: &str, size: u32| json!({"yaml": format!("id: {id}\nname: T\nbase_image: 127.0.0.1:1/none:latest\npool: {{size: {size}}}\n")});
    let post = |key: &str, body: Value| {
        call(
            "POST",
            &format!("{}/v1/templates", server.base),
            Some(key),
            Some(body),
        )
    };

    let (status, body) = post(&alpha, template("alpha-pool", 64));
    assert_eq!(status, 429, "64 warm sandboxes outside every quota (H4): {body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("warm"),
        "{body}"
    );
    assert_eq!(post(&alpha, template("alpha-small", 3)).0, 201);
    let (status, body) = post(&alpha, template("alpha-more", 2));
    assert_eq!(status, 429, "the tenant's templates together: {body}");
    assert_eq!(
        post(&alpha, template("alpha-small", 4)).0,
        200,
        "a replaced template is not counted twice"
    );
    for n in 1..20 {
        assert_eq!(post(&alpha, template(&format!("alpha-{n}"), 0)).0, 201);
    }
    let (status, body) = post(&alpha, template("alpha-21", 0));
    assert_eq!(status, 429, "the 21st template of a tenant: {body}");
    assert_eq!(
        post(&beta, template("beta-1", 4)).0,
        201,
        "other tenants keep their own allowance"
    );
    assert_eq!(
        post(&server.admin, template("shared", 64)).0,
        201,
        "admins' shared templates may pool more"
    );
}

#[test]
fn deleting_a_template_removes_its_pool_sandboxes_directories_and_cgroups() {
    let registry = Registry::anonymous();
    let image = Image::new(vec![base_layer(Compression::Gzip)], RunConfig::default());
    let reference = registry
        .push("test/pool", "1", &image, Format::Oci)
        .reference(&registry.host());
    let stand_in = HostStandIn::new("pool", 400);
    let dir = DataDir::new();
    let server = start_contained(dir.path(), &stand_in, &["--insecure-registry", &registry.host()]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let yaml = format!("id: alpha-pool\nname: P\nbase_image: {reference}\npool: {{size: 2}}\n");
    let (status, body) = call(
        "POST",
        &format!("{}/v1/templates", server.base),
        Some(&alpha),
        Some(json!({"yaml": yaml})),
    );
    assert_eq!(status, 201, "{body}");
    poll("two warm sandboxes", Duration::from_secs(120), || {
        get(&server, &alpha, "/v1/templates/alpha-pool").1["warm"] == 2
    });
    let sandboxes = dir.path().join("sandboxes");
    let pooled: Vec<PathBuf> = std::fs::read_dir(&sandboxes)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    let shims: Vec<i32> = processes_naming(&sandboxes.display().to_string());
    let cgroups: Vec<PathBuf> = shims.iter().flat_map(|p| cgroups_of_shim(*p)).collect();
    assert!(
        !cgroups.is_empty(),
        "pooled sandboxes have cgroups (their pids limit)"
    );

    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/templates/alpha-pool", server.base),
        Some(&alpha),
        None,
    );
    assert_eq!(status, 200);

    poll(
        "the pool's files and processes gone",
        Duration::from_secs(20),
        || {
            pooled.iter().all(|d| !d.exists())
                && processes_naming(&sandboxes.display().to_string()).is_empty()
        },
    );
    for id in pooled.iter().map(|d| d.file_name().unwrap()) {
        assert!(
            !dir.path().join("gateway").join(id).exists(),
            "gateway directory of {id:?} left"
        );
    }
    poll("the pool's cgroups gone", Duration::from_secs(10), || {
        cgroups.iter().all(|c| !c.exists())
    });
}

#[test]
fn kill_9_of_the_server_mid_create_leaves_no_shim_and_no_cgroup_after_restart() {
    let stand_in = HostStandIn::new("midcreate", 400);
    let dir = DataDir::new();
    let server = start_contained(dir.path(), &stand_in, &[]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let id = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sandbox_dir = dir.path().join("sandboxes").join(&id);
    let shims = processes_naming(&sandbox_dir.display().to_string());
    assert!(!shims.is_empty());
    let cgroups: Vec<PathBuf> = shims.iter().flat_map(|p| cgroups_of_shim(*p)).collect();
    assert!(!cgroups.is_empty(), "the sandbox has cgroups (its pids limit)");
    server.kill9();
    // Exactly what a kill -9 between inserting the record and the shim's handshake leaves: a `starting`
    // record without a shim pid, and a live shim.
    let db = dir.path().join("state.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "UPDATE sandboxes SET status = 'starting', shim_pid = NULL WHERE id = '{id}'"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let server = start_contained(dir.path(), &stand_in, &[]);

    let (_, record) = get(&server, &alpha, &format!("/v1/sandboxes/{id}"));
    assert_ne!(record["status"], "running", "{record}");
    poll("the unadopted shim ended", Duration::from_secs(20), || {
        processes_naming(&sandbox_dir.display().to_string()).is_empty()
    });
    poll("its cgroups removed", Duration::from_secs(10), || {
        cgroups.iter().all(|c| !c.exists())
    });
}

#[test]
fn retention_removes_an_ended_sandboxs_files_but_keeps_its_record() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--retention", "1s"]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let id = create(&server, &alpha, json!({"cmd": ["sh", "-c", "echo bye"]}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sandbox_dir = dir.path().join("sandboxes").join(&id);
    let (status, _) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/wait?timeout_s=30", server.base),
        Some(&alpha),
        None,
    );
    assert_eq!(status, 200);

    poll(
        "the ended sandbox's directory removed",
        Duration::from_secs(20),
        || !sandbox_dir.exists(),
    );

    let (status, record) = get(&server, &alpha, &format!("/v1/sandboxes/{id}"));
    assert_eq!((status, &record["status"]), (200, &json!("exited")), "{record}");
}

#[test]
fn a_main_log_past_its_cap_is_truncated_while_the_sandbox_runs() {
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--max-log-bytes", "1M"]);
    let alpha = new_key(dir.path(), "alpha", "user");
    let script = "head -c 20000000 /dev/zero; echo; echo after-the-cut; sleep 60";
    let id = create(
        &server,
        &alpha,
        json!({"cmd": ["sh", "-c", script], "timeout_s": 90}),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = dir.path().join("sandboxes").join(&id).join("main.log");

    poll("main.log cut back under its cap", Duration::from_secs(30), || {
        std::fs::read(&log)
            .is_ok_and(|l| l.len() < 2 << 20 && String::from_utf8_lossy(&l).contains("was truncated"))
    });

    let _ = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&alpha),
        None,
    );
}

fn result_record(dir: &Path, id: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join("sandboxes").join(id).join("result.json")).unwrap(),
    )
    .unwrap()
}

fn started(server: &Server, key: &str, id: &str, dir: &Path) {
    let log = dir.join("sandboxes").join(id).join("main.log");
    poll("the main command's trap set", Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("armed"))
    });
    assert_eq!(
        get(server, key, &format!("/v1/sandboxes/{id}")).1["status"],
        "running"
    );
}

#[test]
fn a_delete_with_grace_sends_sigterm_first_and_sigkill_only_after_the_grace() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let graceful = "trap 'echo cleaned-up; exit 0' TERM; echo armed; while :; do sleep 0.1; done";
    let id = create(&server, &alpha, json!({"cmd": ["sh", "-c", graceful]}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    started(&server, &alpha, &id, dir.path());

    let (status, record) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}?grace_s=5", server.base),
        Some(&alpha),
        None,
    );

    assert_eq!((status, &record["status"]), (200, &json!("killed")), "{record}");
    let log = std::fs::read_to_string(dir.path().join("sandboxes").join(&id).join("main.log")).unwrap();
    assert!(
        log.contains("cleaned-up"),
        "the command's SIGTERM handler ran: {log}"
    );
    assert_eq!(result_record(dir.path(), &id)["signal"], 15);

    let stubborn = "trap '' TERM; echo armed; while :; do sleep 0.1; done";
    let id = create(&server, &alpha, json!({"cmd": ["sh", "-c", stubborn]}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    started(&server, &alpha, &id, dir.path());
    let asked = Instant::now();
    let (status, record) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}?grace_s=2", server.base),
        Some(&alpha),
        None,
    );
    assert_eq!((status, &record["status"]), (200, &json!("killed")), "{record}");
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "killed only after the grace"
    );
    assert_eq!(
        result_record(dir.path(), &id)["signal"],
        9,
        "a command ignoring SIGTERM is killed"
    );
    let (status, body) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}?grace_s=100000", server.base),
        Some(&alpha),
        None,
    );
    assert_eq!(status, 422, "{body}");
}

#[test]
fn a_timeout_sends_sigterm_first_and_sigkill_only_after_the_timeout_grace() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let wait = |id: &str| {
        call(
            "POST",
            &format!("{}/v1/sandboxes/{id}/wait", server.base),
            Some(&alpha),
            None,
        )
        .1
    };
    let graceful = "trap 'echo cleaned-up; exit 0' TERM; echo armed; while :; do sleep 0.1; done";
    let id = create(
        &server,
        &alpha,
        json!({"cmd": ["sh", "-c", graceful], "timeout_s": 2, "timeout_grace_s": 20}),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let waited = wait(&id);
    assert_eq!(waited["reason"], "timeout", "{waited}");
    let log = std::fs::read_to_string(dir.path().join("sandboxes").join(&id).join("main.log")).unwrap();
    assert!(
        log.contains("cleaned-up"),
        "the command's SIGTERM handler ran: {log}"
    );
    assert_eq!(
        result_record(dir.path(), &id)["signal"],
        15,
        "ended within the grace"
    );

    let stubborn = "trap '' TERM; echo armed; while :; do sleep 0.1; done";
    let created = Instant::now();
    let id = create(
        &server,
        &alpha,
        json!({"cmd": ["sh", "-c", stubborn], "timeout_s": 1, "timeout_grace_s": 2}),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let waited = wait(&id);
    assert_eq!(waited["reason"], "timeout", "{waited}");
    assert!(
        created.elapsed() >= Duration::from_secs(3),
        "killed only after the timeout and its grace"
    );
    assert_eq!(
        result_record(dir.path(), &id)["signal"],
        9,
        "a command ignoring SIGTERM is killed"
    );
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(&alpha),
        Some(json!({"cmd": ["true"], "timeout_s": 1, "timeout_grace_s": 100000})),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timeout_grace_s"),
        "{body}"
    );
}

#[test]
fn a_graceful_delete_of_a_sandbox_without_a_main_command_ends_once_its_processes_have() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let id = create(&server, &alpha, json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Init of a sandbox without a main command never exits on its own: the stop ends when nothing else
    // is left, not at the end of the grace.
    let asked = Instant::now();
    let (status, record) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}?grace_s=60", server.base),
        Some(&alpha),
        None,
    );

    assert_eq!((status, &record["status"]), (200, &json!("killed")), "{record}");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "a graceful delete with nothing to wait for took {:?}",
        asked.elapsed()
    );
    assert_eq!(result_record(dir.path(), &id)["signal"], 15);
}
