"""The /execute stream and the context endpoints over real HTTP."""
import base64
import json
import socket
import time

import pytest

from helpers import HAVE_SDK, execute_events, execute_lines, execute_sdk, request

needs_sdk = pytest.mark.skipif(not HAVE_SDK, reason="e2b_code_interpreter not importable")


def new_context(server, **body):
    status, ctx = request(server, "POST", "/contexts", body)
    assert status == 200, ctx
    return ctx


def types(events):
    return [e["type"] for e in events]


def test_health(server):
    assert request(server, "GET", "/health") == (200, "OK")


def test_default_python_context_listed_first(server):
    status, contexts = request(server, "GET", "/contexts")
    assert status == 200
    assert contexts[0]["language"] == "python"
    assert contexts[0]["cwd"] == server.home


def test_result_and_stream_shape(server):
    events = execute_events(server, "print('hi'); 40 + 2")
    assert types(events) == ["number_of_executions", "stdout", "result", "end_of_execution"]
    out = events[1]
    assert out["text"] == "hi\n"
    assert isinstance(out["timestamp"], int) and abs(out["timestamp"] / 1e9 - time.time()) < 60
    assert events[2]["text"] == "42" and events[2]["is_main_result"] is True


def test_stateful(server):
    ctx = new_context(server)
    execute_events(server, "counter = 1", context_id=ctx["id"])
    events = execute_events(server, "counter += 1; counter", context_id=ctx["id"])
    assert [e["text"] for e in events if e["type"] == "result"] == ["2"]


def test_contexts_isolated(server):
    a, b = new_context(server), new_context(server)
    execute_events(server, "secret = 'a'", context_id=a["id"])
    events = execute_events(server, "secret", context_id=b["id"])
    err = [e for e in events if e["type"] == "error"][0]
    assert err["name"] == "NameError"
    assert err["value"] == "name 'secret' is not defined"
    assert [e["text"] for e in execute_events(server, "secret", context_id=a["id"])
            if e["type"] == "result"] == ["a"]


def test_stdout_stderr_order_and_streaming(server):
    code = (
        "import sys, time\n"
        "print('one', flush=True)\n"
        "print('two', file=sys.stderr, flush=True)\n"
        "time.sleep(1.5)\n"
        "print('three', flush=True)\n"
    )
    lines = execute_lines(server, code)
    events = [(t, json.loads(l)) for t, l in lines]
    logs = [(e["type"], e["text"]) for _, e in events if e["type"] in ("stdout", "stderr")]
    assert logs == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]
    first = next(t for t, e in events if e["type"] == "stdout")
    end = next(t for t, e in events if e["type"] == "end_of_execution")
    assert end - first > 1.0, "output was not streamed before the end"


def test_matplotlib_png(server):
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.show()\n"
    )
    events = execute_events(server, code)
    results = [e for e in events if e["type"] == "result"]
    assert len(results) == 1
    r = results[0]
    assert r["is_main_result"] is False
    assert base64.b64decode(r["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["text"].startswith("<Figure")
    assert "extra" not in r and "chart" not in r


def test_error_with_traceback(server):
    events = execute_events(server, "def f():\n    raise ValueError('boom')\nf()")
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1
    e = errors[0]
    assert e["name"] == "ValueError" and e["value"] == "boom"
    assert "raise ValueError('boom')" in e["traceback"]
    assert "\x1b[" not in e["traceback"], "traceback must not carry ANSI colours"
    assert types(events)[-1] == "end_of_execution"


def test_execution_count_increments(server):
    ctx = new_context(server)
    counts = []
    for code in ("echo 'not python'", "!pwd", "1"):
        events = execute_events(server, code, context_id=ctx["id"])
        counts.append([e["execution_count"] for e in events if e["type"] == "number_of_executions"])
    assert counts == [[1], [2], [3]]


def test_display_and_last_expression(server):
    code = "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))\n'last'"
    results = [e for e in execute_events(server, code) if e["type"] == "result"]
    assert [(r.get("html"), r["is_main_result"]) for r in results] == [("<b>x</b>", False), (None, True)]
    assert results[1]["text"] == "last"


def test_pandas_data(server):
    code = "import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})"
    r = [e for e in execute_events(server, code) if e["type"] == "result"][0]
    assert r["data"] == {"a": [1, 2, 3], "b": ["x", "y", "z"]}
    assert "<table" in r["html"]


def test_env_vars_python_set_and_restored(server):
    ctx = new_context(server)
    run = lambda code, **kw: [e for e in execute_events(server, code, context_id=ctx["id"], **kw)
                              if e["type"] == "result"][0]["text"]
    assert run("import os; os.getenv('FOO')", env_vars={"FOO": "bar 'quoted' $x"}) == "bar 'quoted' $x"
    assert run("import os; os.getenv('FOO', 'default')") == "default"
    assert run("import os; os.getenv('CI_GLOBAL_VAR')", env_vars={"CI_GLOBAL_VAR": "over"}) == "over"
    assert run("import os; os.getenv('CI_GLOBAL_VAR')") == "from-server-env"
    # the variable is visible to subprocesses too
    events = execute_events(server, "!echo $FOO", context_id=ctx["id"], env_vars={"FOO": "sub"})
    assert "sub" in "".join(e["text"] for e in events if e["type"] == "stdout")


def test_bash_context_keeps_cd_and_variables(server):
    ctx = new_context(server, language="bash")
    assert ctx["language"] == "bash" and ctx["cwd"] == server.home
    execute_events(server, "cd /tmp\nGREETING=hello\nf() { echo \"f:$1\"; }", context_id=ctx["id"])
    events = execute_events(server, "pwd; echo $GREETING; f x", context_id=ctx["id"])
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["/tmp\n", "hello\n", "f:x\n"]
    assert [e["execution_count"] for e in events if e["type"] == "number_of_executions"] == [2]


def test_bash_stderr_exit_status_and_env(server):
    ctx = new_context(server, language="bash")
    events = execute_events(server, "echo out; echo err >&2; printf partial; exit_code() { return 3; }; exit_code",
                            context_id=ctx["id"])
    assert [(e["type"], e["text"]) for e in events if e["type"] in ("stdout", "stderr")] == [
        ("stdout", "out\n"), ("stderr", "err\n"), ("stdout", "partial")]
    err = [e for e in events if e["type"] == "error"][0]
    assert err["name"] == "NonZeroExitCode" and err["value"] == "3"
    out = lambda code, **kw: [e["text"] for e in execute_events(server, code, context_id=ctx["id"], **kw)
                              if e["type"] == "stdout"]
    assert out("echo $FOO", env_vars={"FOO": "it's $HOME"}) == ["it's $HOME\n"]
    assert out("echo ${FOO:-default}") == ["default\n"]
    assert out("echo $CI_GLOBAL_VAR", env_vars={"CI_GLOBAL_VAR": "over"}) == ["over\n"]
    assert out("echo $CI_GLOBAL_VAR") == ["from-server-env\n"]


def test_bash_exit_restarts_shell(server):
    ctx = new_context(server, language="bash")
    events = execute_events(server, "X=1; exit 4", context_id=ctx["id"])
    err = [e for e in events if e["type"] == "error"][0]
    assert err["name"] == "ShellExited"
    events = execute_events(server, "echo alive${X}", context_id=ctx["id"])
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["alive\n"]


def test_default_bash_context_by_language(server):
    a = execute_events(server, "echo $0; BASHVAR=kept", language="bash")
    assert [e["type"] for e in a][-1] == "end_of_execution"
    b = execute_events(server, "echo ${BASHVAR}", language="bash")
    assert [e["text"] for e in b if e["type"] == "stdout"] == ["kept\n"]
    status, contexts = request(server, "GET", "/contexts")
    assert "bash" in [c["language"] for c in contexts]


def _start_and_drop(server, code, context_id, wait_for="number_of_executions"):
    """Starts an execution with a raw socket, waits until it runs, then
    closes the connection the way a timed-out client does."""
    body = json.dumps({"code": code, "context_id": context_id}).encode()
    s = socket.create_connection((server.host, server.port))
    s.sendall(b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    buf = b""
    deadline = time.time() + 30
    while wait_for.encode() not in buf and time.time() < deadline:
        buf += s.recv(4096)
    assert wait_for.encode() in buf, buf
    s.close()


def test_interrupt_after_client_disconnect_python(server):
    ctx = new_context(server)
    execute_events(server, "kept = 41", context_id=ctx["id"])
    _start_and_drop(server, "import time\nprint('started', flush=True)\ntime.sleep(300)", ctx["id"], "started")
    t = time.monotonic()
    events = execute_events(server, "kept + 1", context_id=ctx["id"], timeout=20)
    assert time.monotonic() - t < 10
    assert [e["text"] for e in events if e["type"] == "result"] == ["42"], events


def test_interrupt_after_client_disconnect_bash(server):
    ctx = new_context(server, language="bash")
    execute_events(server, "KEPT=yes; cd /tmp", context_id=ctx["id"])
    _start_and_drop(server, "echo started; sleep 300; echo not-reached", ctx["id"], "started")
    t = time.monotonic()
    events = execute_events(server, "echo $KEPT $PWD", context_id=ctx["id"], timeout=20)
    assert time.monotonic() - t < 10
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["yes /tmp\n"], events


def test_restart_and_delete(server):
    ctx = new_context(server)
    execute_events(server, "x = 1", context_id=ctx["id"])
    assert request(server, "POST", "/contexts/%s/restart" % ctx["id"]) == (200, None)
    err = [e for e in execute_events(server, "x", context_id=ctx["id"]) if e["type"] == "error"][0]
    assert (err["name"], err["value"]) == ("NameError", "name 'x' is not defined")
    assert request(server, "DELETE", "/contexts/%s" % ctx["id"]) == (200, None)
    status, contexts = request(server, "GET", "/contexts")
    assert ctx["id"] not in [c["id"] for c in contexts]
    status, body = request(server, "POST", "/execute", {"code": "1", "context_id": ctx["id"]})
    assert status == 404
    assert request(server, "DELETE", "/contexts/%s" % ctx["id"])[0] == 404
    assert request(server, "POST", "/contexts/nope/restart")[0] == 404


def test_cwd_option_and_unusable_cwd(server):
    ctx = new_context(server, cwd="/tmp")
    assert ctx["cwd"] == "/tmp" and "cwd_error" not in ctx
    events = execute_events(server, "import os; os.getcwd()", context_id=ctx["id"])
    assert [e["text"] for e in events if e["type"] == "result"] == ["/tmp"]
    bad = new_context(server, cwd="/does/not/exist")
    assert bad["cwd"] == server.home and "does not exist" in bad["cwd_error"]
    request(server, "DELETE", "/contexts/%s" % ctx["id"])
    request(server, "DELETE", "/contexts/%s" % bad["id"])


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"str"', b"\xff\xfe"])
def test_bad_json_is_400_with_json_body(server, raw):
    for path in ("/execute", "/contexts"):
        status, body = request(server, "POST", path, raw=raw)
        assert status == 400, (path, raw, body)
        assert body["code"] == 400 and body["message"]
    assert request(server, "GET", "/health") == (200, "OK")


def test_bad_fields(server):
    assert request(server, "POST", "/execute", {})[0] == 400
    assert request(server, "POST", "/execute", {"code": 1})[0] == 400
    assert request(server, "POST", "/execute", {"code": "1", "env_vars": ["x"]})[0] == 400
    assert request(server, "POST", "/execute", {"code": "1", "env_vars": {"A=B": "x"}})[0] == 400
    assert request(server, "POST", "/execute", {"code": "1", "context_id": "c", "language": "python"})[0] == 400
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "GET", "/execute")[0] == 405


@pytest.mark.parametrize("language", ["js", "javascript", "ts", "r", "java", "cobol"])
def test_unsupported_language_is_a_clear_error(server, language):
    for path, body in (("/execute", {"code": "1", "language": language}),
                       ("/contexts", {"language": language})):
        status, err = request(server, "POST", path, body)
        assert status == 400
        assert err["code"] == 400
        assert ("language '%s' is not supported" % language) in err["message"]


def test_context_limit(server):
    status, contexts = request(server, "GET", "/contexts")
    created = []
    try:
        for _ in range(16 - len(contexts)):
            created.append(new_context(server, language="bash")["id"])
        status, err = request(server, "POST", "/contexts", {"language": "bash"})
        assert status == 429 and "max 16" in err["message"]
    finally:
        for cid in created:
            request(server, "DELETE", "/contexts/%s" % cid)
    assert request(server, "POST", "/contexts", {"language": "bash"})[0] == 200


def test_large_output_is_split(server):
    events = execute_events(server, "print('x' * 200000)")
    texts = [e["text"] for e in events if e["type"] == "stdout"]
    assert all(len(t) <= 64 * 1024 for t in texts)
    assert "".join(texts) == "x" * 200000 + "\n"


@needs_sdk
def test_stream_parsed_by_sdk(server):
    ex = execute_sdk(server, "import sys\nprint('a')\nprint('b', file=sys.stderr)\nxs = [1, 2]\nxs")
    assert ex.logs.stdout == ["a\n"] and ex.logs.stderr == ["b\n"]
    assert ex.text == "[1, 2]" and ex.results[0].json == [1, 2]
    assert ex.execution_count and ex.error is None
    ex = execute_sdk(server, "1/0")
    assert ex.error.name == "ZeroDivisionError"


def test_chunked_request_body(server):
    import http.client
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = json.dumps({"code": "'chunked ok'"}).encode()
    conn.request("POST", "/execute", body=iter([body[:5], body[5:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    lines = [json.loads(l) for l in resp.read().decode().splitlines() if l]
    conn.close()
    assert resp.status == 200
    assert [e["text"] for e in lines if e["type"] == "result"] == ["chunked ok"]


def test_concurrent_executions_in_one_context_are_serialised(server):
    import threading
    ctx = new_context(server)
    execute_events(server, "log = []", context_id=ctx["id"])
    code = "import time\nlog.append('start %d')\ntime.sleep(0.5)\nlog.append('end %d')"
    threads = [threading.Thread(target=execute_events, args=(server, code % (i, i)),
                                kwargs={"context_id": ctx["id"]}) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    log = [e for e in execute_events(server, "log", context_id=ctx["id"]) if e["type"] == "result"][0]["json"]
    assert len(log) == 6
    for i in range(0, 6, 2):  # never interleaved
        assert log[i].split()[1] == log[i + 1].split()[1]


def test_keepalive_lines_while_quiet(server):
    lines = execute_lines(server, "import time; time.sleep(4.5)")
    kinds = [json.loads(l)["type"] for _, l in lines]
    assert kinds.count("keepalive") >= 1
    assert kinds[-1] == "end_of_execution"


def test_keep_alive_connection_reused(server):
    import http.client
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    for i in range(3):
        conn.request("POST", "/execute", body=json.dumps({"code": str(i)}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = [json.loads(l) for l in resp.read().decode().splitlines() if l]
        assert [e["text"] for e in events if e["type"] == "result"] == [str(i)]
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.read() == b'"OK"'
    conn.close()


def test_unicode_output(server):
    events = execute_events(server, "print('h\u00e9llo \u2713')")
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["h\u00e9llo \u2713\n"]
    events = execute_events(server, "echo 'h\u00e9llo \u2713'; printf '\\xff\\n'", language="bash")
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["h\u00e9llo \u2713\n", "\ufffd\n"]


def test_many_output_lines(server):
    t = time.monotonic()
    events = execute_events(server, "for i in range(100000): print(i)")
    text = "".join(e["text"] for e in events if e["type"] == "stdout")
    assert text == "".join("%d\n" % i for i in range(100000))
    assert time.monotonic() - t < 60
    events = execute_events(server, "seq 1 100000", language="bash")
    text = "".join(e["text"] for e in events if e["type"] == "stdout")
    assert text == "".join("%d\n" % i for i in range(1, 100001))


def test_kernel_ignoring_interrupt_is_restarted(server):
    ctx = new_context(server)
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "print('started', flush=True)\ntime.sleep(300)")
    _start_and_drop(server, code, ctx["id"], "started")
    t = time.monotonic()
    events = execute_events(server, "'fresh'", context_id=ctx["id"], timeout=60)
    took = time.monotonic() - t
    assert [e["text"] for e in events if e["type"] == "result"] == ["fresh"], events
    assert 5 < took < 30, took  # waited for the 10 s grace, then a new kernel
    request(server, "DELETE", "/contexts/%s" % ctx["id"])


def test_kernel_death_is_reported_and_recovered(server):
    ctx = new_context(server)
    events = execute_events(server, "import os; os._exit(1)", context_id=ctx["id"], timeout=60)
    err = [e for e in events if e["type"] == "error"]
    assert err and err[0]["name"] == "KernelDied", events
    events = execute_events(server, "1 + 1", context_id=ctx["id"], timeout=60)
    assert [e["text"] for e in events if e["type"] == "result"] == ["2"]
    request(server, "DELETE", "/contexts/%s" % ctx["id"])


def test_bash_closing_control_fd_restarts_shell(server):
    ctx = new_context(server, language="bash")
    # output after the close may be lost: the end of the cell is unknowable
    events = execute_events(server, "exec 61>&-; echo closed", context_id=ctx["id"], timeout=30)
    assert [e["name"] for e in events if e["type"] == "error"] == ["ShellExited"]
    events = execute_events(server, "echo ok", context_id=ctx["id"], timeout=30)
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["ok\n"]
    request(server, "DELETE", "/contexts/%s" % ctx["id"])


def test_http10_client_gets_unchunked_stream(server):
    body = json.dumps({"code": "'one-oh'"}).encode()
    s = socket.create_connection((server.host, server.port), timeout=60)
    s.sendall(b"POST /execute HTTP/1.0\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    s.close()
    head, _, payload = buf.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    events = [json.loads(l) for l in payload.decode().splitlines() if l]
    assert [e["text"] for e in events if e["type"] == "result"] == ["one-oh"]
    assert events[-1]["type"] == "end_of_execution"


def test_multiline_env_value_and_odd_input(server):
    val = "line1\nline2 'q' \"d\" $(not run) \\ end"
    events = execute_events(server, "import os; print(os.environ['ML'], end='')", env_vars={"ML": val})
    assert "".join(e["text"] for e in events if e["type"] == "stdout") == val
    events = execute_events(server, 'printf %s "$ML"', language="bash", env_vars={"ML": val})
    assert "".join(e["text"] for e in events if e["type"] == "stdout") == val
    # a lone surrogate cannot be sent to a kernel: 400, and the contexts live on
    for lang in ("python", "bash"):
        raw = b'{"code": "print(\'\\ud800\')", "language": "%s"}' % lang.encode()
        status, body = request(server, "POST", "/execute", raw=raw)
        assert status == 400 and "not valid Unicode" in body["message"]
    assert [e["text"] for e in execute_events(server, "'still fine'") if e["type"] == "result"] == ["still fine"]
    assert [e["text"] for e in execute_events(server, "echo fine", language="bash")
            if e["type"] == "stdout"] == ["fine\n"]


def test_contexts_run_in_parallel(server):
    import threading
    a, b = new_context(server), new_context(server, language="bash")
    t = threading.Thread(target=execute_events, args=(server, "import time; time.sleep(4)"),
                         kwargs={"context_id": a["id"]})
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    assert [e["text"] for e in execute_events(server, "echo quick", context_id=b["id"])
            if e["type"] == "stdout"] == ["quick\n"]
    assert request(server, "GET", "/contexts")[0] == 200
    assert time.monotonic() - start < 2.5
    t.join(30)
    for c in (a, b):
        request(server, "DELETE", "/contexts/%s" % c["id"])


@pytest.mark.parametrize("language", ["python", "bash"])
def test_restart_and_delete_during_execution(server, language):
    import threading
    sleep = "import time; time.sleep(300)" if language == "python" else "sleep 300"
    for action in ("restart", "delete"):
        ctx = new_context(server, language=language)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault(
            "events", execute_events(server, sleep, context_id=ctx["id"], timeout=60)))
        t.start()
        time.sleep(1.0)
        start = time.monotonic()
        if action == "restart":
            assert request(server, "POST", "/contexts/%s/restart" % ctx["id"]) == (200, None)
        else:
            assert request(server, "DELETE", "/contexts/%s" % ctx["id"]) == (200, None)
        t.join(30)
        assert time.monotonic() - start < 15
        errors = [e["name"] for e in box["events"] if e["type"] == "error"]
        assert errors == ["ContextRestarting"], box["events"]
        if action == "restart":
            code = "'up'" if language == "python" else "echo up"
            events = execute_events(server, code, context_id=ctx["id"])
            assert "up" in [e.get("text", "").strip() for e in events]
            request(server, "DELETE", "/contexts/%s" % ctx["id"])


def test_backend_dead_between_executions_is_restarted(server):
    ctx = new_context(server, language="bash")
    # the shell kills itself after this execution has reported its end
    execute_events(server, "(sleep 0.5; kill -9 $$) &", context_id=ctx["id"])
    time.sleep(1.5)
    events = execute_events(server, "echo back", context_id=ctx["id"])
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["back\n"]
    assert any("restarted" in e["text"] for e in events if e["type"] == "stderr")
    assert not [e for e in events if e["type"] == "error"]
    request(server, "DELETE", "/contexts/%s" % ctx["id"])
