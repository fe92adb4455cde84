"""Typed views of the API's JSON (dataclasses).

Each model names the OpenAPI schema it mirrors in ``__schema__``; ``tests/test_openapi_drift.py`` checks every
field against the live server's ``/v1/openapi.json``. A field whose metadata says ``{"api": None}`` is
computed by the SDK and is not part of the wire format. Unknown fields the server may add later are kept
in ``raw`` rather than rejected, so an older SDK keeps working against a newer server.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

__all__ = [
    "SandboxInfo",
    "CommandResult",
    "EntryInfo",
    "PreviewUrl",
    "Receipt",
    "Runtime",
    "Template",
    "Resources",
    "ToolCallResult",
    "OutputEvent",
    "MODELS",
]

T = TypeVar("T", bound="_Model")

_LOCAL = {"api": None}


def _ms_to_dt(ms: Optional[int]) -> Optional[_dt.datetime]:
    if ms is None:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000.0, tz=_dt.timezone.utc)


class _Model:
    __schema__: str = ""

    @classmethod
    def api_fields(cls) -> Dict[str, str]:
        """SDK attribute name -> wire name, for the fields that are on the wire."""
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == "raw":
                continue
            api = f.metadata.get("api", f.name)
            if api is not None:
                out[f.name] = api
        return out

    @classmethod
    def from_dict(cls: Type[T], data: Dict[str, Any], **local: Any) -> T:
        kwargs: Dict[str, Any] = {}
        for name, api in cls.api_fields().items():
            if api in data:
                kwargs[name] = data[api]
        kwargs.update(local)
        obj = cls(**kwargs)
        object.__setattr__(obj, "raw", dict(data))
        return obj

    def to_dict(self) -> Dict[str, Any]:
        return {api: getattr(self, name) for name, api in self.api_fields().items()}


@dataclass(frozen=True)
class SandboxInfo(_Model):
    """A sandbox as the API shows it (``SandboxView``)."""

    __schema__ = "SandboxView"
    id: str
    tenant: str
    status: str
    runtime: str
    created_ms: int
    labels: Dict[str, str] = field(default_factory=dict)
    template: Optional[str] = None
    exit_code: Optional[int] = None
    finished_ms: Optional[int] = None
    reason: Optional[str] = None
    runtime_reason: Optional[str] = None
    node: Optional[str] = None
    placement: Optional[str] = None
    #: A paused sandbox: ``"memory"`` (frozen in place) or ``"disk"`` (saved to a snapshot).
    paused_to: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def created_at(self) -> _dt.datetime:
        return _ms_to_dt(self.created_ms)  # type: ignore[return-value]

    @property
    def finished_at(self) -> Optional[_dt.datetime]:
        return _ms_to_dt(self.finished_ms)

    @property
    def is_running(self) -> bool:
        return self.status == "running"

    @property
    def has_ended(self) -> bool:
        return self.status in ("exited", "killed", "failed", "lost")

    @property
    def ports(self) -> List[int]:
        """Ports opened to preview URLs at create (the ``tartarus.ports`` label)."""
        raw = self.labels.get("tartarus.ports", "")
        return [int(p) for p in raw.split(",") if p.strip()]


@dataclass(frozen=True)
class CommandResult(_Model):
    """The result of ``commands.run`` (``ExecResult``). ``truncated``: output beyond 4 MiB per stream was
    dropped by the server (and, with callbacks, the SDK keeps no copy: ``stdout``/``stderr`` are then empty
    unless ``keep_output=True``)."""

    __schema__ = "ExecResult"
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    wall_ms: float = 0.0
    timed_out: bool = False
    truncated: bool = False
    signal: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class EntryInfo(_Model):
    """One directory entry (``DirEntry``); ``path`` is the SDK's join of the listed directory and ``name``."""

    __schema__ = "DirEntry"
    name: str
    type: str
    size: int
    path: str = field(default="", metadata=_LOCAL)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"


@dataclass(frozen=True)
class PreviewUrl(_Model):
    """A signed preview URL (``SignedUrl``): ``url`` is ``path`` prefixed with the server's address."""

    __schema__ = "SignedUrl"
    path: str
    expires_ms: int
    url: str = field(default="", metadata=_LOCAL)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def expires_at(self) -> _dt.datetime:
        return _ms_to_dt(self.expires_ms)  # type: ignore[return-value]

    def __str__(self) -> str:
        return self.url or self.path


@dataclass(frozen=True)
class Receipt(_Model):
    """A signed receipt of one tool call (``ReceiptView``); ``envelope`` is the signed DAG-CBOR, base64."""

    __schema__ = "ReceiptView"
    id: str
    tool: str
    sandbox: str
    tenant: str
    status: str
    request_hash: str
    started_at: int
    finished_at: int
    kid: str
    envelope: str
    response_hash: Optional[str] = None
    idempotency_key: Optional[str] = None
    code: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def envelope_bytes(self) -> bytes:
        import base64

        return base64.b64decode(self.envelope)


@dataclass(frozen=True)
class Runtime(_Model):
    """An isolation lane of the server (``RuntimeView``)."""

    __schema__ = "RuntimeView"
    name: str
    available: bool
    detail: Optional[str] = None
    reason: Optional[str] = None
    version: Optional[str] = None
    #: Why ``auto`` does not choose the lane although it runs (a microVM lane whose guests are emulated).
    emulated: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Template(_Model):
    """A template (``TemplateView``)."""

    __schema__ = "TemplateView"
    id: str
    created_ms: int
    updated_ms: int
    template: Dict[str, Any]
    warm: int
    tenant: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Resources(_Model):
    """Resources asked for at create (``Resources``)."""

    __schema__ = "Resources"
    cpus: Optional[float] = None
    memory_mb: Optional[int] = None
    pids: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass(frozen=True)
class OutputEvent:
    """A piece of a streamed command's output: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: str
    text: str


@dataclass(frozen=True)
class ToolCallResult:
    """The gateway's answer to ``sandbox.tools.call`` (made from inside the sandbox)."""

    status: int
    body: bytes
    receipt_id: Optional[str]
    replayed: bool
    headers: Dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


MODELS: List[Type[_Model]] = [
    SandboxInfo,
    CommandResult,
    EntryInfo,
    PreviewUrl,
    Receipt,
    Runtime,
    Template,
    Resources,
]
