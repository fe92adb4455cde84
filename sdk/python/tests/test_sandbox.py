"""The sync client against the real server: lifecycle, commands, streaming, files, context managers."""

from __future__ import annotations

import os

import pytest

import tartarus
from tartarus import CommandExitError, ConflictError, NotFoundError, Sandbox


def test_create_run_info(sandbox: Sandbox) -> None:
    assert sandbox.id.startswith("sb_")
    r = sandbox.commands.run("echo hello")
    assert r.exit_code == 0 and r.ok
    assert r.stdout == "hello\n" and r.stderr == ""
    info = sandbox.info()
    assert info.status == "running" and info.is_running
    assert info.labels["test"] == "sdk"
    assert info.tenant == "sdk-a"
    assert info.created_at.year >= 2024


def test_argv_list_is_not_a_shell(sandbox: Sandbox) -> None:
    r = sandbox.commands.run(["echo", "$HOME; echo no"])
    assert r.stdout == "$HOME; echo no\n"


def test_nonzero_exit_is_returned_unless_check(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (7, "out\n", "err\n", False)
    with pytest.raises(CommandExitError) as e:
        sandbox.commands.run("echo boom >&2; exit 3", check=True)
    assert e.value.exit_code == 3 and "boom" in str(e.value)
    assert sandbox.commands.run("true", check=True).exit_code == 0


def test_stdin_env_cwd(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("tr a-z A-Z", stdin="hello stdin\nsecond line\n")
    assert r.stdout == "HELLO STDIN\nSECOND LINE\n"
    r = sandbox.commands.run("echo $GREETING; pwd", env={"GREETING": "hi there"}, cwd="/tmp")
    assert r.stdout == "hi there\n/tmp\n"


def test_stdin_bytes_must_be_utf8(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("cat", stdin="é".encode()).stdout == "é"
    with pytest.raises(ValueError):
        sandbox.commands.run("cat", stdin=b"\xff\xfe")


def test_command_timeout(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("sleep 30", timeout=1)
    assert r.timed_out and not r.ok
    r = sandbox.commands.run("sleep 30", timeout=1, on_stdout=lambda s: None)
    assert r.timed_out
    with pytest.raises(CommandExitError, match="timed out"):
        sandbox.commands.run("sleep 30", timeout=1, check=True)


def test_streaming_callbacks_in_order(sandbox: Sandbox) -> None:
    events: list = []
    r = sandbox.commands.run(
        "for i in $(seq 1 300); do echo line$i; done; echo warn >&2; echo tail",
        on_stdout=lambda s: events.append(("out", s)),
        on_stderr=lambda s: events.append(("err", s)),
    )
    out = "".join(s for k, s in events if k == "out")
    assert out == "".join(f"line{i}\n" for i in range(1, 301)) + "tail\n"
    assert "".join(s for k, s in events if k == "err") == "warn\n"
    assert r.exit_code == 0 and r.stdout == out and r.stderr == "warn\n"


def test_streaming_interleaves_stdout_and_stderr_as_written(sandbox: Sandbox) -> None:
    # The command itself paces its writes (the test waits on nothing but the stream).
    events: list = []
    sandbox.commands.run(
        "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three",
        on_stdout=lambda s: events.append(("out", s)),
        on_stderr=lambda s: events.append(("err", s)),
    )
    assert events == [("out", "one\n"), ("err", "two\n"), ("out", "three\n")]


def test_streaming_result_is_bounded(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import tartarus._base as base

    monkeypatch.setattr(base, "MAX_STREAM_OUTPUT", 1000)
    seen = []
    r = sandbox.commands.run(
        "head -c 200000 /dev/zero | tr '\\0' x", on_stdout=seen.append, timeout=30
    )
    assert sum(map(len, seen)) == 200000  # every byte reached the callback
    assert len(r.stdout) == 1000 and r.truncated  # but the result kept only the cap


def test_files_round_trip_binary(sandbox: Sandbox) -> None:
    blob = bytes(range(256)) * 64 + os.urandom(50_000)
    sandbox.files.write("/tmp/data.bin", blob)
    assert sandbox.files.read("/tmp/data.bin") == blob
    assert sandbox.commands.run("wc -c < /tmp/data.bin").stdout.strip() == str(len(blob))
    sandbox.files.write("/tmp/t.txt", "héllo\nwörld\n")
    assert sandbox.files.read_text("/tmp/t.txt") == "héllo\nwörld\n"
    entries = {e.name: e for e in sandbox.files.list("/tmp")}
    assert entries["data.bin"].size == len(blob) and entries["data.bin"].is_file
    assert entries["data.bin"].path == "/tmp/data.bin"
    assert sandbox.files.exists("/tmp/t.txt") and not sandbox.files.exists("/tmp/nope")
    # a file written by a command reads back
    sandbox.commands.run("printf '\\000\\001\\377' > /tmp/c.bin")
    assert sandbox.files.read("/tmp/c.bin") == b"\x00\x01\xff"


def test_files_missing_is_not_found(sandbox: Sandbox) -> None:
    with pytest.raises(NotFoundError) as e:
        sandbox.files.read("/tmp/does-not-exist")
    assert e.value.status == 404 and e.value.code == "not_found"


def test_context_manager_kills(client: tartarus.Client) -> None:
    with Sandbox.create(client=client) as sb:
        sid = sb.id
        assert sb.commands.run("true").ok
    after = client.connect(sid).info()
    assert after.has_ended and after.status == "killed"


def test_context_manager_kills_on_exception(client: tartarus.Client) -> None:
    with pytest.raises(RuntimeError):
        with Sandbox.create(client=client) as sb:
            sid = sb.id
            raise RuntimeError("boom")
    assert client.connect(sid).info().has_ended


def test_env_config_and_own_client(server) -> None:  # type: ignore[no-untyped-def]
    # No host or key given: TARTARUS_HOST / TARTARUS_API_KEY (set by the fixture), as the CLI does.
    with Sandbox.create() as sb:
        assert sb.client.config.host == server.host
        assert sb.commands.run("echo env").stdout == "env\n"
        same = Sandbox.connect(sb.id)
        assert same.info().id == sb.id
        same.close()
    assert any(s.id == sb.id for s in Sandbox.list(status="killed"))


def test_pause_resume(sandbox: Sandbox) -> None:
    assert sandbox.pause().status == "paused"
    assert sandbox.info().status == "paused"
    with pytest.raises(ConflictError) as e:
        sandbox.commands.run("true")
    assert e.value.status == 409 and "paused" in e.value.message
    assert sandbox.resume().status == "running"
    assert sandbox.commands.run("echo back").stdout == "back\n"


def test_wait_and_logs(client: tartarus.Client) -> None:
    sb = Sandbox.create(cmd="echo from-main; echo on-stderr >&2; exit 3", client=client)
    try:
        info = sb.wait(timeout=30)
        assert info.status == "exited" and info.exit_code == 3 and info.reason == "exited"
        assert info.finished_at is not None
        logs = sb.logs()
        assert "from-main" in logs and "on-stderr" in logs
    finally:
        sb.kill()


def test_follow_logs(client: tartarus.Client) -> None:
    sb = Sandbox.create(cmd=["sh", "-c", "for i in 1 2 3; do echo tick$i; sleep 0.2; done"], client=client)
    try:
        text = "".join(sb.follow_logs(timeout=30))
        assert text.split() == ["tick1", "tick2", "tick3"]
    finally:
        sb.kill()


def test_wait_timeout(sandbox: Sandbox) -> None:
    with pytest.raises(tartarus.TimeoutError):
        sandbox.wait(timeout=1)


def test_list_by_label(client: tartarus.Client) -> None:
    with Sandbox.create(labels={"suite": "list", "n": "1"}, client=client) as a, Sandbox.create(
        labels={"suite": "list", "n": "2"}, client=client
    ) as b:
        ids = {s.id for s in Sandbox.list(labels={"suite": "list"}, client=client)}
        assert {a.id, b.id} <= ids
        only = Sandbox.list(labels={"suite": "list", "n": "2"}, client=client)
        assert [s.id for s in only] == [b.id]
        assert all(s.is_running for s in client.list_sandboxes(status="running"))


def test_resources_and_runtime(client: tartarus.Client) -> None:
    runtimes = {r.name: r for r in client.runtimes()}
    assert runtimes["process"].available
    with Sandbox.create(
        runtime="process", resources=tartarus.Resources(memory_mb=256, pids=64), client=client
    ) as sb:
        assert sb.last_info.runtime == "process"
        assert sb.commands.run("echo ok").ok


def test_file_over_the_limit_is_payload_too_large(sandbox: Sandbox) -> None:
    with pytest.raises(tartarus.PayloadTooLargeError) as e:
        sandbox.files.write("/tmp/big", b"x" * (4 * 1024 * 1024 + 1))
    assert e.value.status == 413
    sandbox.files.write("/tmp/big", b"x" * (4 * 1024 * 1024))  # exactly the limit is fine
    assert len(sandbox.files.read("/tmp/big")) == 4 * 1024 * 1024


def test_commands_stream_iterator(sandbox: Sandbox) -> None:
    with sandbox.commands.stream("echo a; echo b >&2; echo c; exit 5") as events:
        got = [(ev.stream, ev.text) for ev in events]
    assert "".join(t for s, t in got if s == "stdout") == "a\nc\n"
    assert [t for s, t in got if s == "stderr"] == ["b\n"]
    assert events.result is not None and events.result.exit_code == 5
    assert events.result.stdout == "a\nc\n" and events.result.stderr == "b\n"


def test_leaving_a_stream_early_kills_the_command(sandbox: Sandbox) -> None:
    import time

    with sandbox.commands.stream("echo started; exec sleep 31.5", timeout=60) as events:
        for ev in events:
            assert ev.text == "started\n"
            break
    assert events.result is None
    # The server kills the command when the connection closes; poll (bounded) until it is gone.
    deadline = time.monotonic() + 20
    while True:
        left = sandbox.commands.run("ps -eo args | grep -c '^sleep 31[.]5' || true").stdout.strip()
        if left == "0":
            break
        assert time.monotonic() < deadline, "the streamed command survived its connection"
        time.sleep(0.2)


def test_set_timeout(sandbox: Sandbox) -> None:
    if "/v1/sandboxes/{id}/timeout" not in sandbox.client.openapi()["paths"]:
        pytest.skip("this server has no POST /v1/sandboxes/{id}/timeout")
    import time

    deadline = sandbox.set_timeout(120)
    assert abs(deadline - (time.time() * 1000 + 120_000)) < 30_000
    assert sandbox.info().is_running
