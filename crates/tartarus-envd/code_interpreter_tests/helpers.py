"""Raw HTTP helpers (stdlib only) and, when the SDK is importable, parsing of
the streamed lines with the SDK's own models.parse_output."""
import http.client
import json
import time

try:
    from e2b_code_interpreter.models import Execution, parse_output  # noqa: F401
    HAVE_SDK = True
except ImportError:  # running under /usr/bin/python3 without the SDK
    HAVE_SDK = False


def request(server, method, path, body=None, raw=None, timeout=120):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {}
    data = None
    if raw is not None:
        data = raw
        headers["Content-Type"] = "application/json"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload
    return resp.status, parsed


def execute_lines(server, code, timeout=120, **fields):
    """POST /execute; returns [(arrival_time, line_str)] of non-empty lines."""
    body = {"code": code}
    body.update(fields)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.request("POST", "/execute", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        payload = resp.read()
        conn.close()
        raise AssertionError("status %d: %r" % (resp.status, payload))
    assert resp.getheader("Transfer-Encoding") == "chunked"
    out = []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line:
            out.append((time.monotonic(), line))
    conn.close()
    return out


def execute_events(server, code, **fields):
    events = [json.loads(l) for _, l in execute_lines(server, code, **fields)]
    return [e for e in events if e["type"] != "keepalive"]


def execute_sdk(server, code, **fields):
    """The lines parsed by the SDK's parse_output into an SDK Execution."""
    execution = Execution()
    for _, line in execute_lines(server, code, **fields):
        parse_output(execution, line)
    return execution
