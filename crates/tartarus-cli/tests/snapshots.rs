//! Pause to disk and resume through the API (`POST /v1/sandboxes/{id}/pause` with `{"mode":"disk"}`):
//! a gVisor sandbox's files *and* running processes come back under the same id, cycle after cycle; a
//! lane that cannot, a full disk, an attached exec, a corrupted snapshot and a server restart each leave
//! the sandbox whole and say why. Needs root and runsc (`.ci/run` installs it); without runsc these fail.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::server::{call, create, exec, exec_stream, new_key, DataDir, Server};
use serde_json::{json, Value};

/// A counter in a background process: its value lives only in that shell's memory (the file is a
/// copy), so a restored sandbox whose count continues from where it was has its memory back.
const COUNTER: &str = "mkdir -p /tmp/state; (i=0; while :; do i=$((i+1)); echo $i > /tmp/state/counter.new; \
                       mv /tmp/state/counter.new /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 & \
                       echo $! > /tmp/counter.pid";

fn run(server: &Server, key: &str, id: &str, script: &str) -> String {
    let (status, out) = exec(server, key, id, json!({"cmd": ["/bin/sh", "-c", script]}));
    assert_eq!(status, 200, "{script}: {out}");
    assert_eq!(out["exit_code"], 0, "{script}: {out}");
    out["stdout"].as_str().unwrap().to_string()
}

fn pause_to_disk(server: &Server, key: &str, id: &str) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/pause", server.base),
        Some(key),
        Some(json!({"mode": "disk"})),
    )
}

fn resume(server: &Server, key: &str, id: &str) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/resume", server.base),
        Some(key),
        None,
    )
}

fn gvisor_sandbox(server: &Server, key: &str) -> String {
    let record = create(server, key, json!({"runtime": "gvisor"}));
    assert_eq!(record["runtime"], "gvisor", "{record}");
    record["id"].as_str().unwrap().to_string()
}

/// The counter's value, once the background process has written one.
fn counter(server: &Server, key: &str, id: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = run(server, key, id, "cat /tmp/counter 2>/dev/null || true");
        if let Ok(n) = text.trim().parse() {
            return n;
        }
        assert!(Instant::now() < deadline, "the counter never counted: {text:?}");
    }
}

/// Every snapshot directory of sandbox `id`.
fn snapshots(data: &Path, id: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(data.join("snapshots").join(id)) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The host processes that name sandbox `id`'s directory in their command line: its shim.
fn host_processes_of(data: &Path, id: &str) -> Vec<String> {
    let needle = data.join("sandboxes").join(id);
    let needle = needle.to_string_lossy();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if line.contains(needle.as_ref()) {
            found.push(line);
        }
    }
    found
}

#[test]
fn a_gvisor_sandbox_paused_to_disk_comes_back_with_its_files_and_processes_cycle_after_cycle() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, COUNTER);
    let pid = run(&server, &key, &id, "cat /tmp/counter.pid").trim().to_string();
    for cycle in 0..20 {
        // Files change every cycle, a process counts on: both must come back exactly.
        run(
            &server,
            &key,
            &id,
            &format!(
                "head -c {} /dev/urandom > /tmp/state/file-{cycle}; echo {cycle} >> /tmp/state/log",
                1000 + cycle * 997
            ),
        );
        let files = run(&server, &key, &id, "cd /tmp/state && sha256sum file-* log");
        let before = counter(&server, &key, &id);

        let (status, paused) = pause_to_disk(&server, &key, &id);
        assert_eq!(status, 200, "cycle {cycle}: {paused}");
        assert_eq!(paused["status"], "paused", "{paused}");
        assert_eq!(paused["paused_to"], "disk", "{paused}");
        assert_eq!(
            snapshots(dir.path(), &id).len(),
            1,
            "cycle {cycle}: one sealed snapshot"
        );
        // On disk means nothing of it runs: its shim is gone, and a shim ends only after its sandbox is
        // cleaned up (sentry, gofer, cgroups and bundle removed).
        assert_eq!(
            host_processes_of(dir.path(), &id),
            Vec::<String>::new(),
            "cycle {cycle}"
        );
        let (status, refused) = exec(&server, &key, &id, json!({"cmd": ["true"]}));
        assert_eq!(status, 409, "an exec while paused to disk: {refused}");

        let (status, resumed) = resume(&server, &key, &id);
        assert_eq!(status, 200, "cycle {cycle}: {resumed}");
        assert_eq!(resumed["id"], id.as_str());
        assert_eq!(resumed["status"], "running", "{resumed}");
        assert!(resumed.get("paused_to").is_none(), "{resumed}");
        assert_eq!(
            run(&server, &key, &id, "cd /tmp/state && sha256sum file-* log"),
            files,
            "cycle {cycle}: the files came back"
        );
        assert_eq!(
            run(&server, &key, &id, &format!("kill -0 {pid} && echo alive")).trim(),
            "alive",
            "cycle {cycle}: the background process is the same one"
        );
        let after = counter(&server, &key, &id);
        assert!(
            after >= before,
            "cycle {cycle}: the counter went from {before} back to {after}: its memory was not restored"
        );
        assert!(
            snapshots(dir.path(), &id).is_empty(),
            "a used snapshot is removed"
        );
    }
    // And it still counts: the process runs, not only exists.
    let last = counter(&server, &key, &id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&server, &key, &id) == last {
        assert!(Instant::now() < deadline, "the counter stopped at {last}");
    }
}

#[test]
fn pausing_to_disk_is_refused_where_it_cannot_be_done_and_the_sandbox_keeps_running() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");

    // The process lane cannot save memory.
    let plain = create(&server, &key, json!({"runtime": "process"}));
    let plain = plain["id"].as_str().unwrap();
    let (status, body) = pause_to_disk(&server, &key, plain);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "unsupported", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("the process lane cannot pause"), "{message}");
    assert!(message.contains("gvisor"), "says where it can: {message}");
    assert_eq!(run(&server, &key, plain, "echo still here").trim(), "still here");

    // A body that is not a pause request.
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes/{plain}/pause", server.base),
        Some(&key),
        Some(json!({"mode": "swap"})),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"mode\": \"disk\""),
        "{body}"
    );
    // `null` is no body: a plain pause in memory, as before there were modes.
    let (status, body) = call(
        "POST",
        &format!("{}/v1/sandboxes/{plain}/pause", server.base),
        Some(&key),
        Some(Value::Null),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused_to"], "memory", "{body}");
    let (status, body) = resume(&server, &key, plain);
    assert_eq!(status, 200, "{body}");

    // An exec attached to a gVisor sandbox cannot cross a restore: refused while it runs.
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, "echo kept > /tmp/kept");
    let mut events = exec_stream(&server, &key, &id, json!({"cmd": ["sleep", "30"]}));
    let (status, body) = pause_to_disk(&server, &key, &id);
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("exec(s) or file operations are attached"),
        "{message}"
    );
    assert!(
        snapshots(dir.path(), &id).is_empty(),
        "nothing of a refused snapshot is left"
    );
    assert_eq!(run(&server, &key, &id, "cat /tmp/kept").trim(), "kept");
    drop(events.next());
    drop(events);

    // Someone else's sandbox does not exist for this tenant.
    let other = new_key(dir.path(), "beta", "user");
    let (status, body) = pause_to_disk(&server, &other, &id);
    assert_eq!(status, 404, "{body}");
}

#[test]
fn a_disk_too_full_for_the_snapshot_refuses_the_pause_and_the_sandbox_keeps_running() {
    let dir = DataDir::new();
    let snapshots_dir = dir.path().join("snapshots");
    std::fs::create_dir_all(&snapshots_dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tartarus-test-full"])
        .arg(&snapshots_dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs (needs root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(snapshots_dir.clone());
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, COUNTER);
    let before = counter(&server, &key, &id);
    let (status, body) = pause_to_disk(&server, &key, &id);
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("bytes free"), "{message}");
    assert!(message.contains("keeps running"), "{message}");
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(record["status"], "running", "{record}");
    assert!(snapshots(dir.path(), &id).is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&server, &key, &id) == before {
        assert!(
            Instant::now() < deadline,
            "the sandbox stopped counting after the refusal"
        );
    }
}

#[test]
fn a_corrupted_snapshot_is_refused_kept_for_inspection_and_the_sandbox_stays_paused_until_deleted() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, "echo precious > /tmp/precious");
    let (status, body) = pause_to_disk(&server, &key, &id);
    assert_eq!(status, 200, "{body}");
    let snapshot = snapshots(dir.path(), &id).pop().unwrap();
    let (status, listed) = call("GET", &format!("{}/v1/snapshots", server.base), Some(&key), None);
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["sandbox"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["lane"], "gvisor", "{listed}");
    assert!(listed[0]["bytes"].as_u64().unwrap() > 0, "{listed}");
    let other = new_key(dir.path(), "beta", "user");
    let (_, theirs) = call(
        "GET",
        &format!("{}/v1/snapshots", server.base),
        Some(&other),
        None,
    );
    assert_eq!(theirs, json!([]), "another tenant sees none of them");
    let image = snapshot.join("checkpoint.img");
    let mut bytes = std::fs::read(&image).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&image, &bytes).unwrap();

    let (status, body) = resume(&server, &key, &id);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "snapshot_unusable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("part checkpoint.img does not match its hash"),
        "{message}"
    );
    assert!(message.contains("kept for inspection"), "{message}");
    assert!(image.exists(), "the corrupt snapshot is kept");
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(record["status"], "paused", "{record}");
    assert_eq!(record["paused_to"], "disk", "{record}");
    let (status, events) = call(
        "GET",
        &format!("{}/v1/events?sandbox={id}", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!(status, 200, "{events}");
    assert!(
        events.to_string().contains("snapshot.unusable"),
        "the refusal is an event: {events}"
    );

    // Deleting it ends it, with a reason, and removes its snapshots.
    let (status, body) = call(
        "DELETE",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert!(status == 200 || status == 204, "{status} {body}");
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(record["status"], "killed", "{record}");
    assert_eq!(record["reason"], "killed while paused to disk", "{record}");
    assert!(!dir.path().join("snapshots").join(&id).exists());
}

#[test]
fn a_sandbox_paused_to_disk_outlives_a_killed_server_and_resumes_under_the_next() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, COUNTER);
    run(&server, &key, &id, "echo survived > /tmp/state/note");
    let before = counter(&server, &key, &id);
    let (status, body) = pause_to_disk(&server, &key, &id);
    assert_eq!(status, 200, "{body}");
    server.kill9();

    let server = Server::start(dir.path());
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{id}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(record["status"], "paused", "a restart does not lose it: {record}");
    assert_eq!(record["paused_to"], "disk", "{record}");
    let (status, body) = resume(&server, &key, &id);
    assert_eq!(status, 200, "{body}");
    assert_eq!(run(&server, &key, &id, "cat /tmp/state/note").trim(), "survived");
    assert!(counter(&server, &key, &id) >= before);
}

fn fork(server: &Server, key: &str, id: &str, count: u32) -> (u16, Value) {
    call(
        "POST",
        &format!("{}/v1/sandboxes/{id}/fork?count={count}", server.base),
        Some(key),
        None,
    )
}

#[test]
fn a_fork_makes_independent_children_with_the_parents_files_and_processes_within_the_quota() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let parent = gvisor_sandbox(&server, &key);
    run(&server, &key, &parent, COUNTER);
    run(&server, &key, &parent, "echo from-the-parent > /tmp/state/shared");
    let pid = run(&server, &key, &parent, "cat /tmp/counter.pid")
        .trim()
        .to_string();
    let before = counter(&server, &key, &parent);

    // Three sandboxes at most: the parent and two children fit, three children do not — and then none
    // starts.
    let (status, body) = call(
        "POST",
        &format!("{}/v1/policies", server.base),
        Some(&server.admin),
        Some(
            json!({"yaml": "id: three\nversion: 1\nresources: {max_sandboxes: 3}\n", "source": "test.yaml"}),
        ),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let (status, body) = fork(&server, &key, &parent, 3);
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_sandboxes"),
        "{body}"
    );
    let (_, listed) = call("GET", &format!("{}/v1/sandboxes", server.base), Some(&key), None);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "a refused fork starts nothing: {listed}"
    );

    let (status, children) = fork(&server, &key, &parent, 2);
    assert_eq!(status, 201, "{children}");
    let children: Vec<String> = children
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["status"], "running", "{c}");
            assert_eq!(c["runtime"], "gvisor", "{c}");
            assert_eq!(c["runtime_reason"], format!("forked from {parent}"), "{c}");
            c["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(children.len(), 2);
    assert!(!children.contains(&parent));
    for child in &children {
        assert_eq!(
            run(&server, &key, child, "cat /tmp/state/shared").trim(),
            "from-the-parent"
        );
        assert_eq!(
            run(&server, &key, child, &format!("kill -0 {pid} && echo alive")).trim(),
            "alive",
            "the parent's background process runs on in the child"
        );
        assert!(
            counter(&server, &key, child) >= before,
            "the child's counter continues the parent's"
        );
    }
    // Each goes its own way from here.
    run(&server, &key, &children[0], "echo only-here > /tmp/state/mine");
    for other in [&children[1], &parent] {
        assert_eq!(
            run(
                &server,
                &key,
                other,
                "cat /tmp/state/mine 2>/dev/null || echo absent"
            )
            .trim(),
            "absent"
        );
    }
    // The kernel's randomness is the host's in every child, not a copy of the parent's.
    let random = |id: &str| run(&server, &key, id, "head -c 16 /dev/urandom | od -An -tx1");
    assert_ne!(random(&children[0]), random(&children[1]));
    // The parent goes on.
    let (_, record) = call(
        "GET",
        &format!("{}/v1/sandboxes/{parent}", server.base),
        Some(&key),
        None,
    );
    assert_eq!(record["status"], "running", "{record}");
    let now = counter(&server, &key, &parent);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&server, &key, &parent) == now {
        assert!(
            Instant::now() < deadline,
            "the parent stopped counting after the fork"
        );
    }

    // What cannot be forked says why.
    let (status, body) = fork(&server, &key, &parent, 0);
    assert_eq!(status, 422, "{body}");
    let (status, body) = fork(&server, &key, &parent, 17);
    assert_eq!(status, 422, "{body}");
    let other = new_key(dir.path(), "beta", "user");
    let (status, body) = fork(&server, &other, &parent, 1);
    assert_eq!(status, 404, "another tenant's sandbox does not exist: {body}");
}

#[test]
fn a_process_lane_sandbox_cannot_be_forked_and_keeps_running() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let plain = create(&server, &key, json!({"runtime": "process"}));
    let plain = plain["id"].as_str().unwrap();
    let (status, body) = fork(&server, &key, plain, 1);
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "unsupported", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the process lane cannot fork"),
        "{body}"
    );
    assert_eq!(run(&server, &key, plain, "echo still here").trim(), "still here");
}

/// Polls `check` until it holds (for what another process does meanwhile); panics after 30 s.
fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After a restart: the sandbox is either running or wholly paused to disk — with its files, its
/// process and exactly as many shims as that state has — and a resume from there works.
fn whole_after_restart(server: &Server, data: &Path, key: &str, id: &str) {
    let record = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, record) = call(
                "GET",
                &format!("{}/v1/sandboxes/{id}", server.base),
                Some(key),
                None,
            );
            if record["status"] == "running" || record["paused_to"] == "disk" {
                break record;
            }
            assert!(Instant::now() < deadline, "neither running nor on disk: {record}");
        }
    };
    let shims = host_processes_of(data, id)
        .into_iter()
        .filter(|p| p.contains(" shim "))
        .count();
    match record["status"].as_str() {
        Some("running") => assert_eq!(shims, 1, "a running sandbox has one shim: {record}"),
        _ => {
            assert_eq!(shims, 0, "a sandbox on disk has no shim: {record}");
            let (status, body) = resume(server, key, id);
            assert_eq!(status, 200, "{body}");
        }
    }
    assert_eq!(run(server, key, id, "cat /tmp/state/note").trim(), "kept");
    let pid = run(server, key, id, "cat /tmp/counter.pid").trim().to_string();
    assert_eq!(
        run(server, key, id, &format!("kill -0 {pid} && echo alive")).trim(),
        "alive"
    );
}

#[test]
fn a_server_killed_during_a_pause_to_disk_or_a_resume_leaves_the_sandbox_whole() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let key = new_key(dir.path(), "alpha", "user");
    let id = gvisor_sandbox(&server, &key);
    run(&server, &key, &id, COUNTER);
    run(&server, &key, &id, "echo kept > /tmp/state/note");

    // Killed while the shim saves: the pause is under way once its snapshot directory exists.
    let base = server.base.clone();
    let (pause_key, pause_id) = (key.clone(), id.clone());
    let pausing = std::thread::spawn(move || {
        let _ = ureq::post(&format!("{base}/v1/sandboxes/{pause_id}/pause"))
            .set("Authorization", &format!("Bearer {pause_key}"))
            .send_json(json!({"mode": "disk"}));
    });
    until("the pause started", || !snapshots(dir.path(), &id).is_empty());
    server.kill9();
    pausing.join().unwrap();
    let server = Server::start(dir.path());
    whole_after_restart(&server, dir.path(), &key, &id);

    // Killed while a restored shim starts: the resume is under way once that shim runs.
    let (status, body) = pause_to_disk(&server, &key, &id);
    assert_eq!(status, 200, "{body}");
    let base = server.base.clone();
    let (resume_key, resume_id) = (key.clone(), id.clone());
    let resuming = std::thread::spawn(move || {
        let _ = ureq::post(&format!("{base}/v1/sandboxes/{resume_id}/resume"))
            .set("Authorization", &format!("Bearer {resume_key}"))
            .call();
    });
    until("the restored shim started", || {
        host_processes_of(dir.path(), &id)
            .iter()
            .any(|p| p.contains("--restore"))
    });
    server.kill9();
    resuming.join().unwrap();
    let server = Server::start(dir.path());
    whole_after_restart(&server, dir.path(), &key, &id);
}
