//! Isolation lanes through the API: `GET /v1/runtimes`, a create's `runtime`, and the policy's automatic
//! choice (untrusted tenants behind gVisor, everything else on the fast process lane), with
//! the decision in the answer, the audit trail and `tartarus inspect`. Needs root and runsc (`.ci/run`
//! installs it); a missing runsc fails these tests, it does not skip them.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use common::server::{
    admin_audit, call, cli, create, exec, host_release, new_key, wait_for, DataDir, Server,
};
use serde_json::{json, Value};

fn apply(server: &Server, yaml: &str) {
    let (status, body) = call(
        "POST",
        &format!("{}/v1/policies", server.base),
        Some(&server.admin),
        Some(json!({"yaml": yaml, "source": "test.yaml"})),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
}

fn create_status(server: &Server, key: &str, body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/v1/sandboxes", server.base),
        Some(key),
        Some(body),
    )
}

/// What the sandbox's kernel says it is: gVisor's sentry reports its own synthetic release.
fn kernel_release(server: &Server, key: &str, id: &str) -> String {
    let (status, out) = exec(server, key, id, json!({"cmd": ["uname", "-r"]}));
    assert_eq!(status, 200, "{out}");
    out["stdout"].as_str().unwrap().trim().to_string()
}

#[test]
fn the_server_lists_its_lanes_with_versions() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "alpha", "user");
    let (status, lanes) = call("GET", &format!("{}/v1/runtimes", server.base), Some(&user), None);
    assert_eq!(status, 200, "{lanes}");
    let lane = |name: &str| {
        lanes
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} lane in {lanes}"))
    };
    assert_eq!(lane("process")["available"], true, "{lanes}");
    assert_eq!(lane("process")["version"], host_release().as_str());
    let gvisor = lane("gvisor");
    assert_eq!(
        gvisor["available"], true,
        "runsc must be installed for this suite: {gvisor}"
    );
    assert!(gvisor["version"].as_str().is_some(), "{gvisor}");
    assert!(
        gvisor["detail"].as_str().unwrap().contains("platform"),
        "{gvisor}"
    );
    let wasm = lane("wasm");
    assert_eq!(wasm["available"], true, "wasmtime is built in: {wasm}");
    assert_eq!(wasm["version"], "wasmtime 48.0.8", "{wasm}");
    let (status, _) = call("GET", &format!("{}/v1/runtimes", server.base), None, None);
    assert_eq!(status, 401);
}

#[test]
fn auto_puts_untrusted_tenants_behind_gvisor_and_plain_work_on_the_process_lane_saying_why() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alpha = new_key(dir.path(), "alpha", "user");
    let beta = new_key(dir.path(), "beta", "user");
    apply(&server, "id: base\nresources: {max_sandboxes: 5}\n");
    apply(
        &server,
        "id: beta-untrusted\ntenants: [beta]\nisolation: {trust: untrusted}\n",
    );

    let plain = create(&server, &alpha, json!({}));
    assert_eq!(plain["runtime"], "process", "{plain}");
    assert!(
        plain["runtime_reason"]
            .as_str()
            .unwrap()
            .contains("standard trust"),
        "{plain}"
    );
    let id = plain["id"].as_str().unwrap();
    assert_eq!(kernel_release(&server, &alpha, id), host_release());

    let walled = create(&server, &beta, json!({}));
    assert_eq!(walled["runtime"], "gvisor", "{walled}");
    let reason = walled["runtime_reason"].as_str().unwrap();
    assert!(
        reason.contains("an untrusted tenant requires a strong wall"),
        "{walled}"
    );
    let id = walled["id"].as_str().unwrap();
    assert_ne!(
        kernel_release(&server, &beta, id),
        host_release(),
        "a gVisor sandbox sees the sentry's kernel, not the host's"
    );
    // Shown where people look: the record, inspect, and the audit trail.
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&beta),
        None,
    );
    assert_eq!(record["runtime"], "gvisor", "{record}");
    let out = cli(&server, &beta, &["inspect", id], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(
        shown.contains("lane: gvisor (an untrusted tenant requires a strong wall"),
        "{shown}"
    );
    let audit = admin_audit(&server);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["target"] == id && a["outcome"].as_str().unwrap().contains("runtime gvisor")),
        "{audit}"
    );
    // The untrusted tenant asking for the process lane while gVisor is here: refused by the policy.
    let (status, body) = create_status(&server, &beta, json!({"runtime": "process"}));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("too weak"),
        "{body}"
    );
    // Asking for gVisor by name works for anyone.
    let asked = create(&server, &alpha, json!({"runtime": "gvisor"}));
    assert_eq!(asked["runtime"], "gvisor", "{asked}");
    assert_eq!(asked["runtime_reason"], "asked for by the request", "{asked}");
}

#[test]
fn auto_puts_quarantine_behind_gvisor_with_its_syscall_and_path_restrictions_saying_why() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "alpha", "user");
    let jailed = create(&server, &user, json!({"class": "quarantine"}));
    assert_eq!(jailed["runtime"], "gvisor", "{jailed}");
    let reason = jailed["runtime_reason"].as_str().unwrap();
    assert!(
        reason.contains("the quarantine class requires a strong wall"),
        "{jailed}"
    );
    let id = jailed["id"].as_str().unwrap();
    assert_ne!(
        kernel_release(&server, &user, id),
        host_release(),
        "behind the sentry"
    );
    let out = cli(&server, &user, &["inspect", id], b"");
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("lane: gvisor (the quarantine class"), "{shown}");
    // Quarantine's seccomp additions hold for every exec (runsc exec starts it under the filter), and
    // only /tmp is writable.
    let (status, out) = exec(
        &server,
        &user,
        id,
        json!({"cmd": ["sh", "-c", "cd /tmp && touch f && chmod 600 f; echo chmod=$?; \
            ln -s f g; echo symlink=$?; touch $HOME/x; echo home=$?; touch /dev/shm/x; echo shm=$?; \
            echo data > /tmp/ok && cat /tmp/ok"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["stdout"],
        json!("chmod=1\nsymlink=1\nhome=1\nshm=1\ndata\n"),
        "quarantine's restrictions hold on gVisor: {out}"
    );
    // A command that does not exist is still a 127 with one line.
    let (status, out) = exec(&server, &user, id, json!({"cmd": ["no-such-command"]}));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["exit_code"], 127, "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("command not found: no-such-command"),
        "{out}"
    );
}

#[test]
fn bad_runtime_names_and_forbidden_lanes_are_clear_refusals() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "alpha", "user");
    let (status, body) = create_status(&server, &user, json!({"runtime": "docker"}));
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"]["message"], "unknown runtime 'docker': use auto, process, gvisor, microvm, wasm",
        "{body}"
    );
    // gVisor cannot share the host's network: asking for both is a 422 naming the knob.
    let (status, body) = create_status(
        &server,
        &server.admin,
        json!({"runtime": "gvisor", "network": "host-loopback"}),
    );
    assert!(status == 422 || status == 403, "{status} {body}");
    apply(&server, "id: fast-only\nisolation: {runtimes: [process]}\n");
    let (status, body) = create_status(&server, &user, json!({"runtime": "gvisor"}));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "runtime_forbidden", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("isolation.runtimes: process"),
        "{body}"
    );
    // Under that policy quarantine falls back to the process lane (the strong wall is not allowed), and
    // the reason says so.
    let jailed = create(&server, &user, json!({"class": "quarantine"}));
    assert_eq!(jailed["runtime"], "process", "{jailed}");
    assert!(
        jailed["runtime_reason"]
            .as_str()
            .unwrap()
            .contains("gvisor: not allowed by the policy"),
        "{jailed}"
    );
    let audit = admin_audit(&server);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "sandbox.create"
                && a["outcome"]
                    .as_str()
                    .unwrap()
                    .starts_with("refused: runtime gvisor is not allowed")),
        "{audit}"
    );
}

/// QEMU processes whose parent (the sandbox's shim) names sandbox `id` on its command line.
fn vmm_processes(id: &str) -> Vec<String> {
    let cmdline = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default()
    };
    let parent = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().to_string()))
            .unwrap_or_default()
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| cmdline(pid).contains("qemu-system") && cmdline(&parent(pid)).contains(id))
        .collect()
}

/// A microVM sandbox through the API as a user would run one: its own kernel, execs, files, pause, the
/// decision in the answer; gone without a trace at delete. `auto` does not choose the lane while its
/// guests are emulated (this machine: TCG), and says so.
#[test]
fn a_microvm_sandbox_serves_execs_and_files_through_the_api() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let user = new_key(dir.path(), "alpha", "user");
    let sandbox = create(
        &server,
        &user,
        json!({"runtime": "microvm", "resources": {"memory_mb": 512}}),
    );
    assert_eq!(sandbox["runtime"], "microvm", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_string();
    let release = kernel_release(&server, &user, &id);
    assert_ne!(release, host_release(), "the sandbox runs its own kernel");
    let (status, out) = exec(
        &server,
        &user,
        &id,
        json!({"cmd": ["python3", "-c", "import os; print('hi', os.getuid())"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "hi 1000\n", "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    let (status, out) = exec(&server, &user, &id, json!({"cmd": ["/bin/sh", "-c", "exit 9"]}));
    assert_eq!((status, out["exit_code"].as_i64()), (200, Some(9)), "{out}");

    let url = format!(
        "{}/v1/sandboxes/{id}/files?path=/home/sandbox/notes.txt",
        server.base
    );
    let put = ureq::put(&url)
        .set("Authorization", &format!("Bearer {user}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(b"kept in the guest\n")
        .unwrap();
    assert_eq!(put.status(), 204);
    let (status, out) = exec(
        &server,
        &user,
        &id,
        json!({"cmd": ["cat", "/home/sandbox/notes.txt"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "kept in the guest\n");
    let got = ureq::get(&url)
        .set("Authorization", &format!("Bearer {user}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(got, "kept in the guest\n");

    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/pause", server.base),
        Some(&user),
        None,
    );
    assert!(status == 200 || status == 204, "{status} {body}");
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/resume", server.base),
        Some(&user),
        None,
    );
    assert!(status == 200 || status == 204, "{status} {body}");
    let (status, out) = exec(&server, &user, &id, json!({"cmd": ["echo", "after the thaw"]}));
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("after the thaw\n")),
        "{out}"
    );

    assert_eq!(vmm_processes(&id).len(), 1, "one QEMU for the sandbox");
    let (status, body) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&user),
        None,
    );
    assert!(status == 200 || status == 204, "{status} {body}");
    wait_for(&server, &id, |s| s["state"] != "running");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !vmm_processes(&id).is_empty() {
        assert!(std::time::Instant::now() < deadline, "QEMU outlived its sandbox");
        std::thread::yield_now();
    }

    // An untrusted tenant on auto: the strongest lane that is not emulated, with why the microVM was
    // passed over (the quarantine class also asks for Landlock paths, which a guest has no use for).
    apply(
        &server,
        "id: alpha-untrusted\ntenants: [alpha]\nisolation: {trust: untrusted}\n",
    );
    let untrusted = create(&server, &user, json!({}));
    assert_eq!(untrusted["runtime"], "gvisor", "{untrusted}");
    assert!(
        untrusted["runtime_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("microvm: its guests run under TCG"),
        "{untrusted}"
    );
}

/// An image from a registry on the microVM lane, as a user would ask for it: its layers become the
/// guest's root (its env, working directory and user apply, its root is writable), in the guest's own
/// kernel; a template of that image on the lane works the same; nothing is left at delete.
#[test]
fn a_microvm_sandbox_runs_an_image_and_a_template_from_the_registry() {
    use common::registry::{base_layer, Compression, Format, Image, Registry, RunConfig};
    let registry = Registry::anonymous();
    let image = Image::new(vec![base_layer(Compression::Gzip)], RunConfig::default());
    let reference = registry
        .push("test/microvm", "1", &image, Format::Oci)
        .reference(&registry.host());
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--insecure-registry", &registry.host()]);
    let sandbox = create(
        &server,
        &server.admin,
        json!({"image": reference, "runtime": "microvm"}),
    );
    assert_eq!(sandbox["runtime"], "microvm", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_string();
    let (status, out) = exec(
        &server,
        &server.admin,
        &id,
        json!({"cmd": ["sh", "-c", "echo $GREETING; pwd; id -u; grep imguser /etc/passwd | cut -d: -f3; \
                        echo x > /etc/new && cat /etc/new; uname -r"]}),
    );
    assert_eq!(status, 200, "{out}");
    let stdout = out["stdout"].as_str().unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..5], ["hello", "/work", "0", "1234", "x"], "{out}");
    assert_ne!(lines[5], host_release(), "the image runs on the guest's kernel");

    let template = json!({
        "id": "vm-base", "name": "VM base", "base_image": reference,
        "env": {"TEAM": "data"}, "workdir": "/tmp",
    });
    let (status, body) = call(
        "POST",
        &format!("{}/v1/templates", server.base),
        Some(&server.admin),
        Some(template),
    );
    assert_eq!(status, 201, "{body}");
    let from_template = create(
        &server,
        &server.admin,
        json!({"template": "vm-base", "runtime": "microvm"}),
    );
    assert_eq!(from_template["runtime"], "microvm", "{from_template}");
    let template_id = from_template["id"].as_str().unwrap().to_string();
    let (status, out) = exec(
        &server,
        &server.admin,
        &template_id,
        json!({"cmd": ["sh", "-c", "echo $TEAM $GREETING; pwd; test -e /etc/new || echo fresh-root"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "data hello\n/tmp\nfresh-root\n", "{out}");

    for id in [&id, &template_id] {
        let (status, body) = call(
            "DELETE",
            &format!("{}/v1/sandboxes/{id}", server.base),
            Some(&server.admin),
            None,
        );
        assert!(status == 200 || status == 204, "{status} {body}");
        wait_for(&server, id, |s| s["state"] != "running");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !vmm_processes(id).is_empty() {
            assert!(std::time::Instant::now() < deadline, "QEMU outlived its sandbox");
            std::thread::yield_now();
        }
    }
}
