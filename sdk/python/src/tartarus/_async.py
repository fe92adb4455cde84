"""The asynchronous client: ``AsyncClient``, ``AsyncSandbox`` and their parts (same API, awaited)."""

from __future__ import annotations

import asyncio
import inspect
import contextlib
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import httpx

from . import _receipts
from ._base import (
    EXEC_DEFAULT_TIMEOUT,
    EXEC_SLACK,
    Command,
    Config,
    OutputCollector,
    SSEParser,
    create_body,
    decode_body,
    exec_body,
    exec_http_timeout,
    http_timeout,
    join,
    raise_for_status,
    resolve_config,
    tool_call_exec,
    tool_call_result,
)
from ._exceptions import (
    CommandExitError,
    ConnectionError,
    NotFoundError,
    SandboxQueuedError,
    TimeoutError,
)
from ._models import (
    CommandResult,
    EntryInfo,
    OutputEvent,
    PreviewUrl,
    Receipt,
    Resources,
    Runtime,
    SandboxInfo,
    Template,
    ToolCallResult,
)

OutputCallback = Callable[[str], Any]


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as e:
        raise TimeoutError(f"request timed out: {e!r}") from e
    except httpx.TransportError as e:
        raise ConnectionError(f"cannot reach the server: {e!r}") from e


class AsyncClient:
    """A connection to a Tartarus server.

    ``host`` and ``api_key`` default to ``TARTARUS_HOST`` and ``TARTARUS_API_KEY``. ``timeout`` (seconds,
    default 60) bounds every call; execs wait for the command's own limit plus 10 s.
    """

    def __init__(
        self,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.config: Config = resolve_config(host, api_key, timeout)
        self._http = http_client or httpx.AsyncClient(
            base_url=self.config.host,
            headers=self.config.headers,
            timeout=http_timeout(self.config.timeout),
        )
        self.receipts = AsyncReceipts(self)
        self.tools = AsyncTools(self)

    # -- plumbing ---------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Optional[Mapping[str, Any]] = None,
        content: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[httpx.Timeout] = None,
        raw: bool = False,
    ) -> Any:
        """Send one request; returns the decoded JSON (or the ``httpx.Response`` with ``raw=True``) and raises
        a typed ``APIError`` for an error status."""
        kw: Dict[str, Any] = {}
        if timeout is not None:
            kw["timeout"] = timeout
        with _mapped_errors():
            r = await self._http.request(
                method, path, json=json, params=params, content=content, headers=headers, **kw
            )
        raise_for_status(r)
        if raw:
            return r
        if r.status_code == 204 or not r.content:
            return None
        return decode_body(r)

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, *, timeout: Optional[httpx.Timeout] = None, **kw: Any
    ) -> AsyncIterator[httpx.Response]:
        if timeout is not None:
            kw["timeout"] = timeout
        with _mapped_errors():
            async with self._http.stream(method, path, **kw) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise_for_status(r)
                yield r

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- sandboxes --------------------------------------------------------------------------------------

    async def create_sandbox(self, template: Optional[str] = None, **kwargs: Any) -> "AsyncSandbox":
        """``AsyncSandbox.create`` on this client (same keywords)."""
        return await AsyncSandbox._create(template, client=self, **kwargs)

    async def connect(self, sandbox_id: str) -> "AsyncSandbox":
        return await AsyncSandbox.connect(sandbox_id, client=self)

    async def list_sandboxes(
        self, *, status: Optional[str] = None, labels: Optional[Mapping[str, str]] = None
    ) -> List[SandboxInfo]:
        labels = dict(labels or {})
        params: Dict[str, str] = {}
        if status:
            params["status"] = status
        if labels:
            k = next(iter(labels))
            params["label"] = f"{k}={labels[k]}"
        rows = [SandboxInfo.from_dict(d) for d in await self.request("GET", "/v1/sandboxes", params=params)]
        # The server filters on one label; the rest are applied here.
        return [s for s in rows if all(s.labels.get(k) == v for k, v in labels.items())]

    async def runtimes(self) -> List[Runtime]:
        return [Runtime.from_dict(d) for d in await self.request("GET", "/v1/runtimes")]

    async def templates(self) -> List[Template]:
        return [Template.from_dict(d) for d in await self.request("GET", "/v1/templates")]

    async def health(self) -> bool:
        r = await self.request("GET", "/healthz", raw=True)
        return bool(r.status_code == 200)

    async def openapi(self) -> Dict[str, Any]:
        return await self.request("GET", "/v1/openapi.json")  # type: ignore[no-any-return]


class AsyncReceipts:
    """Signed receipts of tool calls (``/v1/receipts``) and their local verification."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client
        self._keys: Optional[Dict[str, Any]] = None

    async def list(self, *, sandbox: Optional[str] = None, tenant: Optional[str] = None) -> List[Receipt]:
        params = {k: v for k, v in {"sandbox": sandbox, "tenant": tenant}.items() if v}
        return [Receipt.from_dict(d) for d in await self._c.request("GET", "/v1/receipts", params=params)]

    async def get(self, receipt_id: str) -> Receipt:
        return Receipt.from_dict(await self._c.request("GET", f"/v1/receipts/{receipt_id}"))

    async def envelope(self, receipt_id: str) -> bytes:
        """The signed envelope's exact bytes (DAG-CBOR)."""
        r = await self._c.request(
            "GET", f"/v1/receipts/{receipt_id}", headers={"Accept": "application/cbor"}, raw=True
        )
        return r.content  # type: ignore[no-any-return]

    async def public_keys(self, *, refresh: bool = False) -> Dict[str, Any]:
        """The server's public keyring (``GET /v1/keys``), cached; ``refresh=True`` after a rotation."""
        if self._keys is None or refresh:
            self._keys = await self._c.request("GET", "/v1/keys")
        return self._keys

    async def verify(
        self,
        receipt: Union[Receipt, bytes, str],
        *,
        keys: Optional[Mapping[str, Any]] = None,
        request: Optional[bytes] = None,
        response: Optional[bytes] = None,
    ) -> Dict[str, Any]:
        """Verify a receipt's ed25519 signature locally (spec effects-v1 §4.3, §10.3) against ``keys`` (the
        server's ``/v1/keys`` when not given: pin them yourself to not trust the server you ask) and, when
        given, the request/response bytes against its hashes. Returns the signed payload; raises
        ``ReceiptVerificationError``. Needs the ``verify`` extra (``pip install tartarus[verify]``)."""
        if keys is None:
            keys = await self.public_keys()
            kid = _receipts.envelope_kid(receipt)
            if kid is not None and kid not in {k.get("kid") for k in keys.get("keys", [])}:
                keys = await self.public_keys(refresh=True)
        return _receipts.verify_receipt(receipt, keys, request=request, response=response)


class AsyncTools:
    """The tools the operator declared (``GET /v1/tools``). Calls are made from inside a sandbox:
    ``sandbox.tools.call``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> List[Dict[str, Any]]:
        return await self._c.request("GET", "/v1/tools")  # type: ignore[no-any-return]


class AsyncSandbox:
    """A running sandbox. Make one with ``AsyncSandbox.create()`` (or ``AsyncSandbox.connect(id)``); use it as a context
    manager to kill it on exit::

        async with AsyncSandbox.create() as sb:          # or: sb = await AsyncSandbox.create()
            print((await sb.commands.run("echo hi")).stdout)
    """

    def __init__(self, info: SandboxInfo, client: AsyncClient, *, owns_client: bool = False) -> None:
        self._client = client
        self._owns_client = owns_client
        self.last_info = info
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.ports = AsyncPorts(self)
        self.tools = AsyncSandboxTools(self)

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.last_info.status}>"

    @property
    def id(self) -> str:
        return self.last_info.id

    @property
    def client(self) -> AsyncClient:
        return self._client

    @property
    def _path(self) -> str:
        return f"/v1/sandboxes/{self.id}"

    # -- lifecycle --------------------------------------------------------------------------------------

    @classmethod
    def create(cls, template: Optional[str] = None, **kwargs: Any) -> "_Starting":
        """Create a sandbox: ``sb = await AsyncSandbox.create(...)``, or ``async with AsyncSandbox.create(...) as
        sb:`` to kill it on exit. Same keywords as ``Sandbox.create``."""
        return _Starting(cls._create(template, **kwargs))

    @classmethod
    async def _create(
        cls,
        template: Optional[str] = None,
        *,
        image: Optional[str] = None,
        runtime: Optional[str] = None,
        class_: Optional[str] = None,
        cmd: Optional[Command] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[int] = None,
        timeout_grace: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        resources: Union[Resources, Mapping[str, Any], None] = None,
        ports: Optional[Sequence[int]] = None,
        network: Optional[str] = None,
        rootfs: Optional[str] = None,
        node_selector: Optional[Mapping[str, str]] = None,
        tolerations: Optional[Sequence[Mapping[str, Any]]] = None,
        node_affinity: Optional[Sequence[Mapping[str, Any]]] = None,
        node_anti_affinity: Optional[Sequence[Mapping[str, Any]]] = None,
        spread_by: Optional[str] = None,
        lane: Optional[str] = None,
        priority: Optional[int] = None,
        extra: Optional[Mapping[str, Any]] = None,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        client: Optional[AsyncClient] = None,
    ) -> "AsyncSandbox":
        """Create a sandbox (``POST /v1/sandboxes``). ``timeout`` is its lifetime in seconds; ``class_`` is the
        resource class (``ember``, ``flame``, ...); ``ports`` are the ports preview URLs may reach; ``extra``
        is merged into the body as-is (for fields newer than this SDK)."""
        fields = dict(
            template=template, image=image, runtime=runtime, class_=class_, cmd=cmd, env=env, cwd=cwd,
            timeout=timeout, timeout_grace=timeout_grace, labels=labels, resources=resources,
            ports=ports, network=network, rootfs=rootfs, node_selector=node_selector,
            tolerations=tolerations, node_affinity=node_affinity,
            node_anti_affinity=node_anti_affinity, spread_by=spread_by, lane=lane, priority=priority,
        )  # fmt: skip
        owns = client is None
        c = client or AsyncClient(host, api_key)
        try:
            r = await c.request("POST", "/v1/sandboxes", json=create_body(fields, extra), raw=True)
            data = r.json()
            if r.status_code == 202:
                raise SandboxQueuedError(data)
        except BaseException:
            if owns:
                await c.close()
            raise
        return cls(SandboxInfo.from_dict(data), c, owns_client=owns)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        client: Optional[AsyncClient] = None,
    ) -> "AsyncSandbox":
        """Attach to an existing sandbox by id (``GET /v1/sandboxes/{id}``)."""
        owns = client is None
        c = client or AsyncClient(host, api_key)
        try:
            data = await c.request("GET", f"/v1/sandboxes/{sandbox_id}")
        except BaseException:
            if owns:
                await c.close()
            raise
        return cls(SandboxInfo.from_dict(data), c, owns_client=owns)

    @classmethod
    async def list(
        cls,
        *,
        status: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        host: Optional[str] = None,
        api_key: Optional[str] = None,
        client: Optional[AsyncClient] = None,
    ) -> List[SandboxInfo]:
        """The caller's tenant's sandboxes (``GET /v1/sandboxes``), optionally by status and labels."""
        if client is not None:
            return await client.list_sandboxes(status=status, labels=labels)
        async with AsyncClient(host, api_key) as c:
            return await c.list_sandboxes(status=status, labels=labels)

    async def info(self) -> SandboxInfo:
        """The sandbox's current record (``GET /v1/sandboxes/{id}``)."""
        self.last_info = SandboxInfo.from_dict(await self._client.request("GET", self._path))
        return self.last_info

    async def kill(self) -> SandboxInfo:
        """Kill it and remove its resources (``DELETE``); returns its final record."""
        self.last_info = SandboxInfo.from_dict(await self._client.request("DELETE", self._path))
        return self.last_info

    async def pause(self) -> SandboxInfo:
        """Freeze every process (execs and files answer 409 ``ConflictError`` until ``resume``)."""
        self.last_info = SandboxInfo.from_dict(await self._client.request("POST", self._path + "/pause"))
        return self.last_info

    async def resume(self) -> SandboxInfo:
        self.last_info = SandboxInfo.from_dict(await self._client.request("POST", self._path + "/resume"))
        return self.last_info

    async def set_timeout(self, seconds: int) -> int:
        """Stop the sandbox ``seconds`` from now (1-86400) unless called again: a keep-alive
        (``POST /v1/sandboxes/{id}/timeout``). Returns the new deadline in ms since the epoch. Needs a server
        with that route (newer than 1d5d9d5); an older one answers 404 (``NotFoundError``)."""
        data = await self._client.request(
            "POST", self._path + "/timeout", json={"timeout_s": int(seconds)}
        )
        return int(data["deadline_ms"])

    async def wait(self, timeout: float = 60.0) -> SandboxInfo:
        """Wait until the sandbox has ended (its main command exited, it timed out or was killed); raises
        ``TimeoutError`` if it is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0, int(deadline - time.monotonic()))
            step = min(left, 3600)
            data = await self._client.request(
                "POST",
                self._path + "/wait",
                params={"timeout_s": step},
                timeout=exec_http_timeout(step, self._client.config.timeout),
            )
            self.last_info = SandboxInfo.from_dict(data)
            if self.last_info.has_ended:
                return self.last_info
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox {self.id} still {self.last_info.status} after {timeout}s")

    async def logs(self) -> str:
        """The main command's output so far (stdout and stderr interleaved)."""
        r = await self._client.request("GET", self._path + "/logs", raw=True)
        return r.text  # type: ignore[no-any-return]

    async def follow_logs(self, timeout: float = 300.0) -> AsyncIterator[str]:
        """Yield the main command's output as it is written, until the sandbox ends (at most ``timeout``
        seconds, then ``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        async with self._client.stream(
            "GET",
            self._path + "/logs",
            params={"follow": "true"},
            timeout=exec_http_timeout(timeout, self._client.config.timeout),
        ) as r:
            async for chunk in r.aiter_text():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"logs of {self.id}: still following after {timeout}s")
                yield chunk

    async def preview_url(self, port: int, ttl_s: Optional[int] = None) -> PreviewUrl:
        """A signed URL for ``port`` that works without an API key until it expires (default 1 h). The
        sandbox must have been created with ``ports=[port]``."""
        body: Dict[str, Any] = {"port": int(port)}
        if ttl_s is not None:
            body["ttl_s"] = int(ttl_s)
        data = await self._client.request("POST", self._path + "/preview-urls", json=body)
        return PreviewUrl.from_dict(data, url=self._client.config.host + data["path"])

    async def receipts(self) -> List[Receipt]:
        """Receipts of the tool calls this sandbox made."""
        return await self._client.receipts.list(sandbox=self.id)

    async def close(self) -> None:
        """Close the connection this sandbox opened (does not kill it)."""
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            with contextlib.suppress(NotFoundError):
                await self.kill()
        finally:
            await self.close()


class AsyncCommands:
    """``sandbox.commands``: run commands in the sandbox (``POST /v1/sandboxes/{id}/exec``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: float = EXEC_DEFAULT_TIMEOUT,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        check: bool = False,
    ) -> CommandResult:
        """Run ``cmd`` and wait for it. A string runs through ``sh -c``; a list runs as-is.

        ``timeout`` (seconds, default 60) is the command's limit on the server; a command past it is killed
        and its result has ``timed_out=True``. With ``on_stdout``/``on_stderr`` the output is streamed to
        the callbacks as it is written (in order within each stream); the result then keeps at most 4 MiB of
        each. A non-zero exit is returned, not raised, unless ``check=True`` (``CommandExitError``).
        """
        stream = on_stdout is not None or on_stderr is not None
        body = exec_body(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, stream=stream)
        c = self._sb.client
        http_t = exec_http_timeout(timeout, c.config.timeout)
        path = self._sb._path + "/exec"
        if not stream:
            result = CommandResult.from_dict(await c.request("POST", path, json=body, timeout=http_t))
        else:
            result = await self._stream(path, body, http_t, timeout, on_stdout, on_stderr)
        if check and not result.ok:
            raise CommandExitError(result)
        return result

    async def _stream(
        self,
        path: str,
        body: Dict[str, Any],
        http_t: httpx.Timeout,
        timeout: float,
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> CommandResult:
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        async with AsyncCommandStream(self._sb.client, path, body, http_t, timeout) as stream:
            async for ev in stream:
                cb = callbacks[ev.stream]
                if cb is not None:
                    out = cb(ev.text)
                    if inspect.isawaitable(out):
                        await out
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        cmd: Command,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout: float = EXEC_DEFAULT_TIMEOUT,
    ) -> "AsyncCommandStream":
        """Run ``cmd`` and iterate over its output as it is written::

            async with sb.commands.stream("make test") as events:
                async for ev in events:    # OutputEvent(stream="stdout" or "stderr", text=...)
                    print(ev.stream, ev.text, end="")
            print(events.result.exit_code)

        Leaving the block early closes the connection, which kills the command."""
        body = exec_body(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, stream=True)
        c = self._sb.client
        http_t = exec_http_timeout(timeout, c.config.timeout)
        return AsyncCommandStream(c, self._sb._path + "/exec", body, http_t, timeout)


class AsyncCommandStream:
    """A streamed command: iterate it (``async for``) for ``OutputEvent``s; ``result`` is set once it has
    exited."""

    def __init__(
        self, client: AsyncClient, path: str, body: Dict[str, Any], http_t: httpx.Timeout, timeout: float
    ) -> None:
        self._client, self._path, self._body, self._http_t = client, path, body, http_t
        self._timeout = timeout
        self._gen: Optional[AsyncGenerator[OutputEvent, None]] = None
        self.result: Optional[CommandResult] = None

    async def _events(self) -> AsyncGenerator[OutputEvent, None]:
        deadline = time.monotonic() + self._timeout + EXEC_SLACK
        collector = OutputCollector()
        parser = SSEParser()
        async with self._client.stream("POST", self._path, json=self._body, timeout=self._http_t) as r:
            async for line in r.aiter_lines():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"exec stream still open {self._timeout + EXEC_SLACK}s after it started")
                sse = parser.feed(line)
                if sse is None:
                    continue
                ev = collector.handle(*sse)
                if ev is not None:
                    yield ev
                if collector.exit is not None:
                    break
        self.result = collector.result()

    def __aiter__(self) -> AsyncIterator[OutputEvent]:
        if self._gen is None:
            self._gen = self._events()
        return self._gen

    async def __aenter__(self) -> "AsyncCommandStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading (the server kills the command when the connection closes)."""
        if self._gen is not None:
            await self._gen.aclose()


class AsyncFiles:
    """``sandbox.files``: read, write and list files (``/v1/sandboxes/{id}/files?path=``; 4 MiB per file)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def read(self, path: str) -> bytes:
        r = await self._sb.client.request(
            "GET", self._sb._path + "/files", params={"path": path}, raw=True
        )
        return r.content  # type: ignore[no-any-return]

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: Union[bytes, str]) -> None:
        """Write ``data`` (``str`` is encoded as UTF-8) to ``path``, replacing the file."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        await self._sb.client.request(
            "PUT",
            self._sb._path + "/files",
            params={"path": path},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    async def list(self, path: str) -> List[EntryInfo]:
        rows = await self._sb.client.request(
            "GET", self._sb._path + "/files", params={"path": path, "list": 1}
        )
        return [EntryInfo.from_dict(d, path=join(path, d["name"])) for d in rows]

    async def exists(self, path: str) -> bool:
        import posixpath

        parent, name = posixpath.split(path.rstrip("/") or "/")
        if not name:
            return True
        try:
            return any(e.name == name for e in await self.list(parent))
        except NotFoundError:
            return False


class AsyncPorts:
    """``sandbox.ports``: HTTP into a port of the sandbox (``/v1/sandboxes/{id}/ports/{port}/...``), with this
    client's API key. The sandbox must have been created with ``ports=[port]``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    def path(self, port: int, path: str = "/") -> str:
        return f"{self._sb._path}/ports/{int(port)}/{path.lstrip('/')}"

    async def request(self, method: str, port: int, path: str = "/", **kwargs: Any) -> httpx.Response:
        """Any method; keyword arguments go to ``httpx`` (``params``, ``json``, ``content``, ``headers``...).
        Error statuses of the sandbox's own server are returned, not raised (note: the server currently
        rewrites their bodies into its ``{"error": ...}`` form); the forwarder's own refusals (401, 409 port
        not opened or sandbox paused, 429, 502 nothing listening) raise."""
        c = self._sb.client
        with _mapped_errors():
            r = await c._http.request(method, self.path(port, path), **kwargs)
        if r.status_code in (401, 409, 429, 502) and "json" in r.headers.get("content-type", ""):
            body = decode_body(r)
            if isinstance(body, dict) and "error" in body:
                raise_for_status(r, body)
        return r

    async def get(self, port: int, path: str = "/", **kwargs: Any) -> httpx.Response:
        return await self.request("GET", port, path, **kwargs)

    async def post(self, port: int, path: str = "/", **kwargs: Any) -> httpx.Response:
        return await self.request("POST", port, path, **kwargs)

    async def wait_until_ready(
        self, port: int, path: str = "/", *, timeout: float = 30.0, interval: float = 0.1
    ) -> httpx.Response:
        """Poll ``port`` until something answers (any status below 500), then return that answer."""
        from ._exceptions import APIError

        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            try:
                r = await self.get(port, path, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                if r.status_code < 500:
                    return r
            except (APIError, TimeoutError, ConnectionError) as e:
                if getattr(e, "status", 502) not in (502, 503, 504):
                    raise
                last = e
            await asyncio.sleep(interval)
        raise TimeoutError(f"nothing answered on port {port} of {self._sb.id} within {timeout}s: {last}")


class AsyncSandboxTools:
    """``sandbox.tools``: call a declared tool through the sandbox's gateway. The API has no route to call
    a tool from outside (the gateway is a unix socket inside the sandbox), so this runs a small python3
    client inside the sandbox with ``commands.run``: the call is the sandbox's, and so is its receipt."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def list(self) -> List[Dict[str, Any]]:
        return await self._sb.client.tools.list()

    async def call(
        self,
        name: str,
        body: Union[bytes, str, Any] = b"",
        *,
        idempotency_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = 60.0,
    ) -> ToolCallResult:
        """POST ``body`` (bytes, text, or anything JSON-serialisable) to tool ``name``; returns its status,
        body, and the receipt id the gateway answered with."""
        argv, stdin = tool_call_exec(name, body, idempotency_key, headers, timeout)
        return tool_call_result(await self._sb.commands.run(argv, stdin=stdin, timeout=timeout + 5))


class _Starting:
    """What ``AsyncSandbox.create`` returns: await it for the sandbox, or use it with ``async with``."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._sandbox: Optional[AsyncSandbox] = None
        self._started = False

    def __await__(self) -> Any:
        self._started = True
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._started = True
        self._sandbox = await self._coro
        return self._sandbox

    async def __aexit__(self, *exc: Any) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(*exc)

    def __del__(self) -> None:
        if not self._started:
            self._coro.close()  # never awaited: no sandbox was created
