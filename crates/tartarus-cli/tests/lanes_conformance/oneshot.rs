//! Lifecycle checks through the one-shot CLI, `tartarus run --runtime <lane>`.

use std::time::{Duration, Instant};

use crate::common::{code, result_record, stderr, stdout};
use crate::harness::{assert_fork_bomb_bounded, assert_unchanged, Fixture, FORK_BOMB};

pub fn exit_code_is_passed_through(f: &Fixture) {
    let out = f.sh(&["--json"], "echo out; exit 42");
    assert_eq!(code(&out), 42, "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    let record = result_record(&out);
    assert_eq!(
        (record["exit_code"].as_i64(), record["reason"].as_str()),
        (Some(42), Some("exited")),
        "{record}"
    );
    assert_eq!(code(&f.sh(&[], "exit 0")), 0);
}

pub fn death_by_signal_is_128_plus_the_signal(f: &Fixture) {
    for (signal, name) in [(15, "TERM"), (9, "KILL")] {
        let out = f.sh(&["--json"], &format!("kill -{name} $$"));
        assert_eq!(code(&out), 128 + signal, "{}", stderr(&out));
        let record = result_record(&out);
        assert_eq!(
            (record["signal"].as_i64(), record["reason"].as_str()),
            (Some(signal as i64), Some("killed")),
            "{record}"
        );
    }
}

pub fn a_timeout_sends_sigterm_and_a_trapping_command_ends_in_its_grace(f: &Fixture) {
    let started = Instant::now();
    let out = f.sh(
        &["--json", "--timeout", "1s", "--timeout-grace", "20s"],
        "trap 'echo cleaned-up; exit 0' TERM; while :; do sleep 0.05; done",
    );
    let record = result_record(&out);
    assert_eq!(record["reason"], "timeout", "{record}");
    assert_ne!(
        record["signal"], 9,
        "ended within the grace, without SIGKILL: {record}"
    );
    assert!(
        stdout(&out).contains("cleaned-up"),
        "the TERM trap ran: {}",
        stdout(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the command's own exit, not the grace's end, ended it"
    );
    assert!(stderr(&out).contains("sent SIGTERM"), "{}", stderr(&out));
}

pub fn a_timeout_kills_a_command_ignoring_sigterm_after_the_grace(f: &Fixture) {
    let started = Instant::now();
    let out = f.sh(
        &["--json", "--timeout", "500ms", "--timeout-grace", "1500ms"],
        "trap '' TERM; while :; do sleep 0.05; done",
    );
    assert_eq!(code(&out), 137, "{}", stderr(&out));
    let record = result_record(&out);
    assert_eq!(
        (record["reason"].as_str(), record["signal"].as_i64()),
        (Some("timeout"), Some(9)),
        "{record}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2000),
        "killed only after the timeout and its grace, not after {:?}",
        started.elapsed()
    );
    assert!(stderr(&out).contains("killed (SIGKILL)"), "{}", stderr(&out));
}

pub fn the_memory_limit_ends_in_an_oom(f: &Fixture) {
    let out = f.run(
        &["--json", "--memory", "96M"],
        &["python3", "-c", "b = bytearray(300 << 20); print('survived')"],
    );
    assert_eq!(code(&out), 137, "{}", stderr(&out));
    assert_eq!(result_record(&out)["reason"], "oom");
    assert!(!stdout(&out).contains("survived"));
    assert!(
        stderr(&out).contains("out of memory (limit 96 MiB)"),
        "{}",
        stderr(&out)
    );
}

pub fn stdin_stdout_and_stderr_are_separate(f: &Fixture) {
    let out = f.run_with_stdin(
        &[],
        &["/bin/sh", "-c", "read x; echo \"got $x\"; echo oops >&2; cat"],
        b"first\nrest of it\n",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "got first\nrest of it\n");
    assert_eq!(stderr(&out), "oops\n");
}

pub fn env_workdir_and_user_reach_the_command(f: &Fixture) {
    let out = f.run(
        &["-e", "GREETING=hello", "-w", "/tmp"],
        &[
            "/bin/sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u; echo \"${HOST_ONLY:-unset}\"",
        ],
    );
    assert_eq!(stdout(&out), "hello\n/tmp\n1000\nunset\n", "{}", stderr(&out));
    // The default working directory is the sandbox's home.
    let out = f.sh(&[], "pwd");
    assert_eq!(stdout(&out), "/home/sandbox\n", "{}", stderr(&out));
}

pub fn a_missing_workdir_is_refused(f: &Fixture) {
    let out = f.run(&["-w", "/no/such/dir"], &["/bin/sh", "-c", "echo ran; pwd"]);
    assert!(
        !stdout(&out).contains("ran"),
        "ran in a made-up directory: {}",
        stdout(&out)
    );
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("working directory /no/such/dir") && err.contains("No such file or directory"),
        "{err}"
    );
}

pub fn a_missing_command_is_127(f: &Fixture) {
    let out = f.run(&[], &["/definitely/not/a/command"]);
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("command not found"), "{}", stderr(&out));
}

pub fn a_terminal_is_given_or_clearly_refused(f: &Fixture) {
    let out = f.sh(&["-t"], "test -t 0 && test -t 1 && echo has-a-tty");
    if f.lane.has_terminal() {
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(stdout(&out).contains("has-a-tty"), "{}", stdout(&out));
    } else {
        assert_eq!(code(&out), 125, "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("the {} lane cannot honour a terminal", f.lane.name())),
            "{}",
            stderr(&out)
        );
    }
    let out = f.sh(&[], "test -t 0 || echo no-tty");
    assert_eq!(stdout(&out), "no-tty\n");
}

pub fn a_background_grandchild_dies_with_the_sandbox(f: &Fixture) {
    let out_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        out_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mount = format!("{}:/out:rw", out_dir.path().display());
    // The grandchild is orphaned (its parent exits at once) and keeps touching a file the host sees.
    let script = "(sh -c 'i=0; while :; do i=$((i+1)); echo $i > /out/tick; sleep 0.05; done' &); \
                  n=0; while [ ! -s /out/tick ] && [ $n -lt 200 ]; do n=$((n+1)); sleep 0.05; done; echo started";
    let out = f.sh(&["-m", &mount], script);
    assert_eq!(stdout(&out), "started\n", "{}", stderr(&out));
    let tick = out_dir.path().join("tick");
    assert_unchanged(
        Duration::from_secs(1),
        "the grandchild still runs after its sandbox ended",
        || std::fs::read_to_string(&tick).unwrap_or_default(),
    );
}

pub fn a_fork_bomb_stops_at_the_pids_limit(f: &Fixture) {
    let out = f.run(
        &["--pids", "64", "--timeout", "30s", "--json"],
        &["python3", "-c", FORK_BOMB],
    );
    assert_ne!(
        result_record(&out)["reason"],
        "timeout",
        "not contained: {}",
        stderr(&out)
    );
    assert_fork_bomb_bounded(&stdout(&out), 64);
    // The next sandbox is fine.
    assert_eq!(code(&f.sh(&[], "exit 3")), 3);
}
