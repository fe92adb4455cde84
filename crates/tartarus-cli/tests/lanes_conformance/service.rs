//! Service-mode checks: a server sandbox created with `"runtime": <lane>`, its execs (buffered and
//! streamed), files, pause and resume, and its end (DELETE with and without grace, timeout, OOM).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::server::exec_stream;
use crate::harness::{assert_fork_bomb_bounded, assert_unchanged, poll_until, Fixture, FORK_BOMB};

/// A main command that prints a growing counter to main.log.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

pub fn the_api_names_the_lane_and_runs_execs(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let (_, record) = service.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(
        (record["status"].as_str(), record["runtime"].as_str()),
        (Some("running"), Some(f.lane.name())),
        "{record}"
    );
    let result = service.exec_ok(&id, json!({"cmd": ["/bin/echo", "hi"]}));
    assert_eq!(
        (result["stdout"].as_str(), result["exit_code"].as_i64()),
        (Some("hi\n"), Some(0))
    );
    service.delete(&id, None);
}

pub fn execs_separate_stdin_stdout_stderr_and_exit_codes(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let result = service.exec_ok(
        &id,
        json!({"cmd": ["sh", "-c", "read x; echo \"out $x\"; echo err >&2; exit 7"], "stdin": "in\n"}),
    );
    assert_eq!(result["stdout"], "out in\n", "{result}");
    assert_eq!(result["stderr"], "err\n", "{result}");
    assert_eq!(
        (result["exit_code"].as_i64(), result["timed_out"].as_bool()),
        (Some(7), Some(false))
    );
    let (status, body) = service.exec(&id, json!({"cmd": ["/no/such/command"]}));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("command_not_found")),
        "{body}"
    );
    service.delete(&id, None);
}

pub fn an_exec_killed_by_a_signal_reports_it(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let result = service.exec_ok(&id, json!({"cmd": ["sh", "-c", "kill -KILL $$"]}));
    assert_eq!(
        (result["exit_code"].as_i64(), result["signal"].as_i64()),
        (Some(137), Some(9)),
        "{result}"
    );
    // The sandbox outlives its exec.
    let result = service.exec_ok(&id, json!({"cmd": ["true"]}));
    assert_eq!(result["exit_code"], 0, "{result}");
    service.delete(&id, None);
}

pub fn an_exec_timeout_is_reported(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let asked = Instant::now();
    let result = service.exec_ok(&id, json!({"cmd": ["sleep", "60"], "timeout_s": 1}));
    assert_eq!(result["timed_out"], true, "{result}");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "the exec timeout did not end it"
    );
    service.delete(&id, None);
}

pub fn streamed_execs_deliver_output_while_running(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 6";
    let mut lines = exec_stream(
        &service.server,
        service.key(),
        &id,
        json!({"cmd": ["sh", "-c", script]}),
    );
    assert_eq!(lines.next().unwrap(), "event: stdout");
    assert_eq!(
        lines.next().unwrap(),
        r#"data: "first\n""#,
        "output arrives while the command runs"
    );
    assert_eq!(
        service.exec_ok(&id, json!({"cmd": ["touch", "/tmp/go"]}))["exit_code"],
        0
    );
    let rest: Vec<String> = lines.collect();
    assert_eq!(
        rest[..3],
        ["event: stderr", r#"data: "second\n""#, "event: exit"],
        "{rest:?}"
    );
    let exit: Value = serde_json::from_str(rest[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(exit["exit_code"], 6, "{exit}");
    service.delete(&id, None);
}

pub fn execs_get_env_cwd_and_user(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({"env": {"FROM_SANDBOX": "s"}}));
    let result = service.exec_ok(
        &id,
        json!({"cmd": ["sh", "-c", "echo $FROM_SANDBOX $FROM_EXEC; pwd; id -u"], "env": {"FROM_EXEC": "e"}, "cwd": "/tmp"}),
    );
    assert_eq!(result["stdout"], "s e\n/tmp\n1000\n", "{result}");
    let result = service.exec_ok(&id, json!({"cmd": ["pwd"]}));
    assert_eq!(result["stdout"], "/home/sandbox\n", "{result}");
    service.delete(&id, None);
}

pub fn an_exec_in_a_missing_cwd_is_refused(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let (status, body) = service.exec(
        &id,
        json!({"cmd": ["sh", "-c", "echo ran"], "cwd": "/no/such/dir"}),
    );
    assert_ne!(body["stdout"], "ran\n", "ran in a made-up directory: {body}");
    let text = body.to_string();
    assert!(
        status >= 400 || body["exit_code"].as_i64().is_some_and(|c| c != 0),
        "a missing cwd was accepted: {status} {body}"
    );
    assert!(
        text.contains("/no/such/dir"),
        "the error does not name the directory: {body}"
    );
    service.delete(&id, None);
}

pub fn files_are_written_read_and_listed(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({}));
    let url = |query: &str| service.url(&format!("/v1/sandboxes/{id}/files?{query}"));
    let auth = format!("Bearer {}", service.key());
    service.exec_ok(&id, json!({"cmd": ["mkdir", "/tmp/dir"]}));
    let put = ureq::put(&url("path=/tmp/dir/f.txt"))
        .set("Authorization", &auth)
        .set("Content-Type", "application/octet-stream")
        .send_bytes(b"hello\n");
    assert_eq!(put.map(|r| r.status()).map_err(|e| e.to_string()), Ok(204));
    let result = service.exec_ok(&id, json!({"cmd": ["cat", "/tmp/dir/f.txt"]}));
    assert_eq!(result["stdout"], "hello\n", "a file put is seen inside: {result}");
    service.exec_ok(&id, json!({"cmd": ["sh", "-c", "echo inside > /tmp/dir/g.txt"]}));
    let got = ureq::get(&url("path=/tmp/dir/g.txt"))
        .set("Authorization", &auth)
        .call()
        .unwrap();
    assert_eq!(got.into_string().unwrap(), "inside\n");
    let (_, listing) = service.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/dir&list=1"),
        None,
    );
    let mut names: Vec<&str> = listing
        .as_array()
        .unwrap_or_else(|| panic!("{listing}"))
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["f.txt", "g.txt"], "{listing}");
    let (status, body) = service.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/missing"),
        None,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = service.call(
        "GET",
        &format!("/v1/sandboxes/{id}/files?path=/tmp/../etc/shadow"),
        None,
    );
    assert_eq!(status, 422, "{body}");
    service.delete(&id, None);
}

fn counter(service: &crate::harness::Service, id: &str) -> usize {
    service.main_log(id).lines().count()
}

pub fn a_paused_sandbox_stops_and_resumes(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({"cmd": ["sh", "-c", COUNTER]}));
    service.wait_for_log(&id, "3\n");
    let (status, body) = service.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(status, 200, "{body}");
    assert_unchanged(
        Duration::from_secs(1),
        "a paused sandbox's counter advanced",
        || counter(&service, &id),
    );
    let paused_at = counter(&service, &id);
    let (status, body) = service.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!(status, 200, "{body}");
    poll_until(
        Duration::from_secs(10),
        "the counter advances after resume",
        || counter(&service, &id) > paused_at + 3,
    );
    let result = service.exec_ok(&id, json!({"cmd": ["true"]}));
    assert_eq!(result["exit_code"], 0, "an exec after resume: {result}");
    service.delete(&id, None);
}

pub fn a_paused_sandbox_can_be_deleted(f: &Fixture) {
    let service = f.service();
    for grace in [None, Some(5)] {
        let id = service.create(f, json!({"cmd": ["sh", "-c", COUNTER]}));
        service.wait_for_log(&id, "3\n");
        let (status, body) = service.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
        assert_eq!(status, 200, "{body}");
        service.delete(&id, grace);
        assert_eq!(service.result(&id)["reason"], "killed", "{}", service.result(&id));
    }
}

pub fn a_delete_with_grace_sends_sigterm_then_sigkill(f: &Fixture) {
    let service = f.service();
    let graceful = "trap 'echo cleaned-up; exit 0' TERM; echo armed; while :; do sleep 0.05; done";
    let id = service.create(f, json!({"cmd": ["sh", "-c", graceful]}));
    service.wait_for_log(&id, "armed");
    let asked = Instant::now();
    service.delete(&id, Some(20));
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the command's exit ended it, not the grace"
    );
    assert!(
        service.main_log(&id).contains("cleaned-up"),
        "{}",
        service.main_log(&id)
    );
    assert_eq!(service.result(&id)["signal"], 15, "{}", service.result(&id));

    let stubborn = "trap '' TERM; echo armed; while :; do sleep 0.05; done";
    let id = service.create(f, json!({"cmd": ["sh", "-c", stubborn]}));
    service.wait_for_log(&id, "armed");
    let asked = Instant::now();
    service.delete(&id, Some(2));
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "killed only after the grace"
    );
    assert_eq!(service.result(&id)["signal"], 9, "{}", service.result(&id));
}

fn wait(service: &crate::harness::Service, id: &str) -> Value {
    let (status, record) = service.call("POST", &format!("/v1/sandboxes/{id}/wait?timeout_s=60"), None);
    assert_eq!(status, 200, "{record}");
    record
}

pub fn a_main_commands_exit_timeout_and_oom_are_its_outcome(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({"cmd": ["sh", "-c", "exit 3"]}));
    let record = wait(&service, &id);
    assert_eq!(
        (record["exit_code"].as_i64(), record["status"].as_str()),
        (Some(3), Some("exited")),
        "{record}"
    );

    let graceful = "trap 'echo cleaned-up; exit 0' TERM; while :; do sleep 0.05; done";
    let id = service.create(
        f,
        json!({"cmd": ["sh", "-c", graceful], "timeout_s": 1, "timeout_grace_s": 20}),
    );
    let record = wait(&service, &id);
    assert_eq!(record["reason"], "timeout", "{record}");
    assert_eq!(service.result(&id)["signal"], 15, "{}", service.result(&id));
    assert!(service.main_log(&id).contains("cleaned-up"));

    let id = service.create(
        f,
        json!({"cmd": ["python3", "-c", "b = bytearray(300 << 20)"], "resources": {"memory_mb": 96}}),
    );
    let record = wait(&service, &id);
    assert_eq!(record["reason"], "oom", "{record}");
}

pub fn a_delete_ends_background_processes_and_leaves_nothing(f: &Fixture) {
    let service = f.service();
    // An orphaned grandchild of the main command keeps writing to main.log.
    let script = "(sh -c 'while :; do echo tick; sleep 0.05; done' &); echo armed; exec sleep 600";
    let id = service.create(f, json!({"cmd": ["sh", "-c", script]}));
    service.wait_for_log(&id, "tick");
    // And one started by an exec.
    let result = service.exec_ok(
        &id,
        json!({"cmd": ["sh", "-c", "(sleep 600 >/dev/null 2>&1 &); echo bg"]}),
    );
    assert_eq!(result["stdout"], "bg\n", "{result}");
    service.delete(&id, None);
    assert_unchanged(
        Duration::from_secs(1),
        "a background process outlived its sandbox",
        || service.main_log(&id).len(),
    );
}

pub fn a_fork_bomb_in_an_exec_stops_at_the_pids_limit(f: &Fixture) {
    let service = f.service();
    let id = service.create(f, json!({"resources": {"pids": 64}}));
    let result = service.exec_ok(&id, json!({"cmd": ["python3", "-c", FORK_BOMB], "timeout_s": 30}));
    assert_eq!(result["timed_out"], false, "not contained: {result}");
    assert_fork_bomb_bounded(result["stdout"].as_str().unwrap_or_default(), 64);
    service.delete(&id, None);
    // The server still creates and runs sandboxes.
    let id = service.create(f, json!({}));
    assert_eq!(service.exec_ok(&id, json!({"cmd": ["true"]}))["exit_code"], 0);
    service.delete(&id, None);
}

/// The quarantine class through the API on this lane: its extra denied syscalls hold for every exec
/// (chmod, symlink), and only `/tmp` stays writable (home and `/dev/shm` do not).
///
/// On the process lane, while a stronger lane is here, quarantine is refused (it must not land on the
/// shared kernel); under a policy that allows only the process lane it runs there, restricted.
pub fn quarantine_denies_its_syscalls_and_narrows_the_writable_paths(f: &Fixture) {
    let service = f.service();
    if f.lane.name() == "process" {
        let (status, body) = service.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"class": "quarantine", "runtime": "process"})),
        );
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("runtime_forbidden")),
            "{body}"
        );
        let (status, body) = service.call(
            "POST",
            "/v1/policies",
            Some(json!({"yaml": "id: process-only\nisolation: {runtimes: [process]}\n"})),
        );
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    let id = service.create(f, json!({"class": "quarantine"}));
    let probe = "cd /tmp && touch f && chmod 600 f; echo chmod=$?; ln -s f g; echo symlink=$?; \
                 touch $HOME/x; echo home=$?; touch /dev/shm/x; echo shm=$?; echo ok > /tmp/ok && cat /tmp/ok";
    let result = service.exec_ok(&id, json!({"cmd": ["sh", "-c", probe]}));
    assert_eq!(
        result["stdout"], "chmod=1\nsymlink=1\nhome=1\nshm=1\nok\n",
        "{result}"
    );
    // An ordinary sandbox of the same lane may do all of it: the probe itself is sound.
    let free = service.create(f, json!({}));
    let result = service.exec_ok(&free, json!({"cmd": ["sh", "-c", probe]}));
    assert_eq!(
        result["stdout"], "chmod=0\nsymlink=0\nhome=0\nshm=0\nok\n",
        "{result}"
    );
    service.delete(&id, None);
    service.delete(&free, None);
}
