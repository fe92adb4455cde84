"""What the sync and async clients share: configuration, request bodies, answers and SSE parsing."""

from __future__ import annotations

import base64
import json
import os
import posixpath
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from ._exceptions import ConfigurationError, TartarusError, error_from_response
from ._models import CommandResult, OutputEvent, Resources, ToolCallResult

DEFAULT_TIMEOUT = 60.0
"""Seconds for every call that is not an exec (connect, read, write and pool each)."""

EXEC_DEFAULT_TIMEOUT = 60.0
"""A command's time limit when ``commands.run`` is not given one (sent to the server as ``timeout_s``)."""

EXEC_SLACK = 10.0
"""Seconds the SDK waits beyond a command's own limit before it gives up on the server."""

MAX_STREAM_OUTPUT = 4 * 1024 * 1024
"""With callbacks, at most this many characters of each stream are also kept for the result."""

# SDK keyword -> wire name in CreateSandbox (checked against the OpenAPI document by the tests).
CREATE_FIELDS: Dict[str, str] = {
    "template": "template",
    "image": "image",
    "runtime": "runtime",
    "class_": "class",
    "cmd": "cmd",
    "env": "env",
    "cwd": "cwd",
    "timeout": "timeout_s",
    "timeout_grace": "timeout_grace_s",
    "labels": "labels",
    "resources": "resources",
    "ports": "ports",
    "network": "network",
    "rootfs": "rootfs",
    "node_selector": "node_selector",
    "tolerations": "tolerations",
    "node_affinity": "node_affinity",
    "node_anti_affinity": "node_anti_affinity",
    "spread_by": "spread_by",
    "lane": "lane",
    "priority": "priority",
}

# SDK keyword -> wire name in ExecBody.
EXEC_FIELDS: Dict[str, str] = {
    "cmd": "cmd",
    "env": "env",
    "cwd": "cwd",
    "stdin": "stdin",
    "timeout": "timeout_s",
    "stream": "stream",
}

Command = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Config:
    host: str
    api_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def headers(self) -> Dict[str, str]:
        from . import __version__

        return {
            "Authorization": f"Bearer {self.api_key}",
            "User-Agent": f"tartarus-python/{__version__}",
        }


def resolve_config(
    host: Optional[str] = None, api_key: Optional[str] = None, timeout: Optional[float] = None
) -> Config:
    """Arguments first, then ``TARTARUS_HOST`` / ``TARTARUS_API_KEY`` (as the CLI does)."""
    host = host or os.environ.get("TARTARUS_HOST")
    api_key = api_key or os.environ.get("TARTARUS_API_KEY")
    if not host:
        raise ConfigurationError(
            "no server configured: pass host=... or set TARTARUS_HOST (e.g. http://127.0.0.1:8080)"
        )
    if not api_key:
        raise ConfigurationError("no API key configured: pass api_key=... or set TARTARUS_API_KEY")
    if "://" not in host:
        host = "http://" + host
    return Config(host=host.rstrip("/"), api_key=api_key, timeout=DEFAULT_TIMEOUT if timeout is None else timeout)


def http_timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds)


def exec_http_timeout(cmd_timeout: float, base: float) -> httpx.Timeout:
    # connect/write/pool as any call; reads may take as long as the command plus slack.
    return httpx.Timeout(base, read=cmd_timeout + EXEC_SLACK)


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def create_body(kwargs: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        wire = CREATE_FIELDS[name]
        if name == "resources" and isinstance(value, Resources):
            value = value.to_dict()
        if name == "cmd" and isinstance(value, str):
            value = ["sh", "-c", value]
        if name == "ports":
            value = [int(p) for p in value]
        if name in ("env", "labels", "node_selector"):
            value = {str(k): str(v) for k, v in value.items()}
        body[wire] = value
    if extra:
        body.update(extra)
    return body


def argv(cmd: Command) -> List[str]:
    """A string runs through ``sh -c`` (pipes, globs, ``&&``); a list runs as-is."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    out = [str(a) for a in cmd]
    if not out:
        raise ValueError("empty command")
    return out


def exec_body(
    cmd: Command,
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Union[str, bytes, None],
    timeout: float,
    stream: bool,
) -> Dict[str, Any]:
    if isinstance(stdin, bytes):
        try:
            stdin = stdin.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                "stdin must be text: the API takes stdin as a UTF-8 string "
                "(write binary input with files.write and redirect from it)"
            ) from None
    body: Dict[str, Any] = {"cmd": argv(cmd), "timeout_s": float(timeout)}
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        body["stdin"] = stdin
    if stream:
        body["stream"] = True
    return body


def decode_body(response: httpx.Response) -> Any:
    ctype = response.headers.get("content-type", "")
    if "json" in ctype:
        try:
            return response.json()
        except ValueError:
            return response.text
    return response.text


def raise_for_status(response: httpx.Response, body: Any = None) -> None:
    if response.status_code < 400:
        return
    if body is None:
        body = decode_body(response)
    raise error_from_response(
        response.status_code,
        body,
        response.headers,
        method=response.request.method,
        url=str(response.request.url),
    )


def join(directory: str, name: str) -> str:
    return posixpath.join(directory, name)


class SSEParser:
    """Incremental Server-Sent Events parser: feed it lines, get ``(event, data)`` when an event ends."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: List[str] = []

    def feed(self, line: str) -> Optional[Tuple[str, str]]:
        line = line.rstrip("\r\n")
        if line == "":
            if not self._data:
                self._event = "message"
                return None
            out = (self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class OutputCollector:
    """Parses streamed output events and keeps at most ``limit`` characters of each stream for the result."""

    def __init__(self, limit: Optional[int] = None) -> None:
        self.kept: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        self.size = {"stdout": 0, "stderr": 0}
        self.limit = MAX_STREAM_OUTPUT if limit is None else limit
        self.truncated = False
        self.exit: Optional[Dict[str, Any]] = None

    def handle(self, event: str, data: str) -> Optional[OutputEvent]:
        """Keeps what fits and returns the output event (stdout/stderr), if this SSE event is one."""
        if event in ("stdout", "stderr"):
            text = json.loads(data)
            room = self.limit - self.size[event]
            if room > 0:
                piece = text[:room]
                self.kept[event].append(piece)
                self.size[event] += len(piece)
            if len(text) > max(room, 0):
                self.truncated = True
            return OutputEvent(event, text)
        if event == "exit":
            self.exit = json.loads(data)
        elif event == "error":
            try:
                err = json.loads(data)
            except ValueError:
                err = {"message": data}
            raise TartarusError(f"exec stream failed: {err}")
        return None

    def result(self) -> CommandResult:
        if self.exit is None:
            raise TartarusError("exec stream ended without an exit event")
        data = dict(self.exit)
        data["stdout"] = "".join(self.kept["stdout"])
        data["stderr"] = "".join(self.kept["stderr"])
        data["truncated"] = bool(data.get("truncated")) or self.truncated
        return CommandResult.from_dict(data)


# Run inside the sandbox by tools.call: talks to the gateway's unix socket, prints one JSON line.
TOOL_CALL_SCRIPT = r"""
import base64, http.client, json, socket, sys
class G(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.settimeout(%(timeout)s)
        self.sock.connect("/run/tartarus/gateway.sock")
req = json.loads(sys.stdin.read())
c = G("gateway", timeout=%(timeout)s)
c.request(req["method"], req["path"], base64.b64decode(req["body"]), req["headers"])
r = c.getresponse()
print(json.dumps({"status": r.status, "headers": dict(r.getheaders()),
                  "body": base64.b64encode(r.read()).decode()}))
"""


def tool_call_exec(
    name: str,
    body: Union[bytes, str, Any],
    idempotency_key: Optional[str],
    headers: Optional[Mapping[str, str]],
    timeout: float,
) -> Tuple[List[str], str]:
    hdrs = dict(headers or {})
    if isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if idempotency_key is not None:
        hdrs["Idempotency-Key"] = idempotency_key
    stdin = json.dumps(
        {
            "method": "POST",
            "path": "/v1/tools/" + name,
            "body": base64.b64encode(raw).decode(),
            "headers": hdrs,
        }
    )
    script = TOOL_CALL_SCRIPT % {"timeout": repr(float(timeout))}
    return ["python3", "-c", script], stdin


def tool_call_result(result: CommandResult) -> ToolCallResult:
    if result.exit_code != 0:
        raise TartarusError(
            "tools.call: the in-sandbox client failed (it needs python3 in the sandbox): "
            + (result.stderr.strip()[-500:] or f"exit {result.exit_code}")
        )
    data = json.loads(result.stdout)
    headers = {k.lower(): v for k, v in data["headers"].items()}
    return ToolCallResult(
        status=int(data["status"]),
        body=base64.b64decode(data["body"]),
        receipt_id=headers.get("tartarus-receipt"),
        replayed=headers.get("tartarus-replayed") == "true",
        headers=headers,
    )


def quote(cmd: Iterable[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# Every route the SDK calls, as the OpenAPI document spells it (checked by tests/test_openapi_drift.py).
ROUTES: List[Tuple[str, str]] = [
    ("GET", "/healthz"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/sandboxes"),
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/{id}"),
    ("DELETE", "/v1/sandboxes/{id}"),
    ("POST", "/v1/sandboxes/{id}/pause"),
    ("POST", "/v1/sandboxes/{id}/resume"),
    ("POST", "/v1/sandboxes/{id}/wait"),
    ("GET", "/v1/sandboxes/{id}/logs"),
    ("POST", "/v1/sandboxes/{id}/exec"),
    ("GET", "/v1/sandboxes/{id}/files"),
    ("PUT", "/v1/sandboxes/{id}/files"),
    ("POST", "/v1/sandboxes/{id}/preview-urls"),
    ("GET", "/v1/sandboxes/{id}/ports/{port}/{path}"),
    ("GET", "/v1/receipts"),
    ("GET", "/v1/receipts/{id}"),
    ("GET", "/v1/keys"),
    ("GET", "/v1/tools"),
    ("GET", "/v1/runtimes"),
    ("GET", "/v1/templates"),
]

# Routes newer than some servers the SDK still talks to: checked when the server documents them.
NEWER_ROUTES: List[Tuple[str, str]] = [
    ("POST", "/v1/sandboxes/{id}/timeout"),
]

# Query parameters the SDK sends, per route.
QUERY_PARAMS: Dict[Tuple[str, str], List[str]] = {
    ("GET", "/v1/sandboxes"): ["status", "label"],
    ("POST", "/v1/sandboxes/{id}/wait"): ["timeout_s"],
    ("GET", "/v1/sandboxes/{id}/logs"): ["follow"],
    ("GET", "/v1/sandboxes/{id}/files"): ["path", "list"],
    ("PUT", "/v1/sandboxes/{id}/files"): ["path"],
    ("GET", "/v1/receipts"): ["sandbox", "tenant"],
}
