"""A program written for E2B's SDKs, run unmodified against a Tartarus server (`.ci/e2b` runs it with the
pinned SDKs and with the latest ones). Only environment variables point it at Tartarus. Every step
asserts what it needs; the first failure ends the run with a non-zero status.
"""

import hashlib
import os
import threading
import time

from e2b import CommandExitException, NotFoundException, PtySize, Sandbox, SandboxQuery
from e2b_code_interpreter import Sandbox as CodeSandbox

STEPS = []


def step(fn):
    STEPS.append(fn)
    return fn


@step
def commands_streaming_background_and_connect():
    with Sandbox.create(timeout=120, metadata={"suite": "program"}, envs={"GREETING": "hi"}) as sbx:
        seen = []
        result = sbx.commands.run("for i in 1 2 3; do echo $i; done; echo $GREETING >&2", on_stdout=seen.append)
        assert result.stdout == "1\n2\n3\n", result.stdout
        assert result.stderr == "hi\n", result.stderr
        assert "".join(seen) == "1\n2\n3\n", seen
        try:
            sbx.commands.run("exit 3")
            raise AssertionError("a failing command must raise")
        except CommandExitException as e:
            assert e.exit_code == 3
        handle = sbx.commands.run("sleep 1; echo done-in-background", background=True)
        again = sbx.commands.connect(handle.pid)
        assert again.wait().stdout.strip() == "done-in-background"
        listed = Sandbox.list(query=SandboxQuery(metadata={"suite": "program"})).next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in listed], listed


@step
def pty_input_and_resize():
    with Sandbox.create(timeout=120) as sbx:
        out = []
        pty = sbx.pty.create(size=PtySize(cols=80, rows=24))
        sbx.pty.resize(pty.pid, PtySize(cols=100, rows=30))
        sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
        pty.wait(on_pty=out.append)
        assert b"30 100" in b"".join(out), b"".join(out)


@step
def files_watch_and_fifty_megabytes():
    with Sandbox.create(timeout=300) as sbx:
        sbx.files.make_dir("watched")
        events = []
        watcher = sbx.files.watch_dir("watched", recursive=True)
        sbx.files.write("watched/a.txt", "content")
        deadline = time.time() + 10
        while not any(e.name == "a.txt" for e in events) and time.time() < deadline:
            events.extend(watcher.get_new_events())
            time.sleep(0.05)
        watcher.stop()
        assert any(e.name == "a.txt" for e in events), events
        assert [e.name for e in sbx.files.list("watched")] == ["a.txt"]
        assert sbx.files.read("watched/a.txt") == "content"
        big = os.urandom(50 << 20)
        sbx.files.write("big.bin", big)
        back = sbx.files.read("big.bin", format="bytes")
        assert hashlib.sha256(back).digest() == hashlib.sha256(big).digest()
        out = sbx.commands.run("sha256sum big.bin").stdout.split()[0]
        assert out == hashlib.sha256(big).hexdigest()


@step
def timeout_pause_resume_kill_and_errors():
    sbx = Sandbox.create(timeout=60)
    sbx.set_timeout(120)
    sbx.files.write("state.txt", "kept")
    sbx.pause()
    assert not sbx.is_running()
    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.files.read("state.txt") == "kept"
    resumed.kill()
    assert not resumed.is_running()
    try:
        Sandbox.connect(sbx.sandbox_id)
        raise AssertionError("connecting to a killed sandbox must fail")
    except NotFoundException:
        pass
    short = Sandbox.create(timeout=2)
    deadline = time.time() + 20
    while short.is_running() and time.time() < deadline:
        time.sleep(0.2)
    assert not short.is_running(), "the timeout ends the sandbox"


@step
def run_code_state_chart_and_errors():
    with CodeSandbox.create(timeout=300) as sbx:
        sbx.run_code("x = 20")
        assert sbx.run_code("x * 2 + 2").text == "42"
        chart = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        assert chart.results and chart.results[0].png, chart
        failed = sbx.run_code("1 / 0")
        assert failed.error and failed.error.name == "ZeroDivisionError", failed.error
        context = sbx.create_code_context()
        assert sbx.run_code("'x' in dir()", context=context).text == "False"
        stdout = []
        sbx.run_code("print('streamed')", on_stdout=lambda m: stdout.append(m.line))
        assert stdout == ["streamed\n"] or stdout == ["streamed"], stdout


def main():
    started = time.time()
    for fn in STEPS:
        t = time.time()
        fn()
        print(f"ok {fn.__name__} ({time.time() - t:.1f} s)", flush=True)
    print(f"all {len(STEPS)} steps passed in {time.time() - started:.1f} s")


if __name__ == "__main__":
    threading.excepthook = lambda args: os._exit(1)
    main()
