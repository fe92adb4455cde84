"""Errors: the server's {error: {code, message}} and status become typed exceptions."""

from __future__ import annotations

import httpx
import pytest

import tartarus
from tartarus import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    Sandbox,
    ServerError,
)
from tartarus._exceptions import error_from_response


def test_other_tenants_sandbox_is_not_found(server, sandbox: Sandbox) -> None:  # type: ignore[no-untyped-def]
    with tartarus.Client(server.host, server.other_key) as other:
        with pytest.raises(NotFoundError) as e:
            other.connect(sandbox.id)
        err = e.value
        assert err.status == 404 and err.code == "not_found"
        assert sandbox.id in err.message and "not_found" in str(err) and err.message in str(err)
        with pytest.raises(NotFoundError):
            other.request("POST", f"/v1/sandboxes/{sandbox.id}/exec", json={"cmd": ["true"]})
        assert sandbox.id not in {s.id for s in other.list_sandboxes()}


def test_bad_input_is_invalid_request(client: tartarus.Client) -> None:
    with pytest.raises(InvalidRequestError) as e:
        Sandbox.create(extra={"no_such_field": 1}, client=client)
    assert e.value.status == 422 and e.value.code == "invalid_request"
    assert "no_such_field" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        Sandbox.create(runtime="no-such-lane", client=client)
    assert e.value.status == 422


def test_bad_exec_timeout_is_invalid_request(sandbox: Sandbox) -> None:
    with pytest.raises(InvalidRequestError) as e:
        sandbox.commands.run("true", timeout=100_000)
    assert "timeout_s" in e.value.message


def test_unknown_key_is_authentication_error(server) -> None:  # type: ignore[no-untyped-def]
    with tartarus.Client(server.host, "tk_not_a_real_key") as c:
        with pytest.raises(AuthenticationError) as e:
            c.list_sandboxes()
        assert e.value.status == 401 and e.value.code == "unauthorized"


def test_user_key_on_admin_route_is_permission_denied(client: tartarus.Client) -> None:
    with pytest.raises(PermissionDeniedError) as e:
        client.request("POST", "/v1/tools", json={"name": "x", "kind": "command", "command": ["/bin/true"]})
    assert e.value.status == 403 and e.value.code == "forbidden"


def test_missing_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TARTARUS_HOST", raising=False)
    monkeypatch.delenv("TARTARUS_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="TARTARUS_HOST"):
        tartarus.Client()
    with pytest.raises(ConfigurationError, match="TARTARUS_API_KEY"):
        tartarus.Client("127.0.0.1:1")
    c = tartarus.Client("127.0.0.1:9/", "k")  # a bare host:port gets http://, like the CLI
    assert c.config.host == "http://127.0.0.1:9"
    c.close()


def test_unreachable_server_is_connection_error() -> None:
    with tartarus.Client("http://127.0.0.1:9", "k", timeout=5) as c:
        with pytest.raises(tartarus.ConnectionError):
            c.list_sandboxes()


def test_status_mapping_without_a_server() -> None:
    h = httpx.Headers({"retry-after": "3"})
    body = {"error": {"code": "too_many_requests", "message": "slow down"}}
    e = error_from_response(429, body, h, "POST", "/x")
    assert isinstance(e, RateLimitError) and e.retry_after == 3.0 and "slow down" in str(e)
    body = {"error": {"code": "internal", "message": "oops", "correlation_id": "c-1"}}
    e = error_from_response(500, body, httpx.Headers())
    assert isinstance(e, ServerError) and e.correlation_id == "c-1" and "c-1" in str(e)
    e = error_from_response(503, "<html>bad gateway</html>", httpx.Headers())
    assert isinstance(e, ServerError) and e.code == "http_error"
    assert isinstance(error_from_response(400, {}, httpx.Headers()), InvalidRequestError)
    assert isinstance(error_from_response(413, {}, httpx.Headers()), InvalidRequestError)
    assert isinstance(error_from_response(409, {}, httpx.Headers()), tartarus.ConflictError)
    for cls in (NotFoundError, RateLimitError, ServerError, tartarus.TimeoutError, tartarus.CommandExitError):
        assert issubclass(cls, tartarus.TartarusError)
    assert issubclass(tartarus.TimeoutError, TimeoutError)  # the builtin, too


def test_transport_timeout_is_timeout_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    http = httpx.Client(base_url="http://sdk.test", transport=httpx.MockTransport(handler))
    with tartarus.Client("http://sdk.test", "k", http_client=http) as c:
        with pytest.raises(tartarus.TimeoutError, match="timed out"):
            c.list_sandboxes()


def test_every_call_has_a_deadline(server) -> None:  # type: ignore[no-untyped-def]
    with tartarus.Client(server.host, server.user_key) as c:
        t = c._http.timeout
        assert (t.connect, t.read, t.write, t.pool) == (60.0, 60.0, 60.0, 60.0)
    from tartarus._base import exec_http_timeout

    t = exec_http_timeout(300, 60)
    assert t.read == 310 and t.connect == 60


def test_queued_create_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json={"id": "q_1", "status": "queued", "lane": "main", "reason": "no room"})

    http = httpx.Client(base_url="http://sdk.test", transport=httpx.MockTransport(handler))
    with tartarus.Client("http://sdk.test", "k", http_client=http) as c:
        with pytest.raises(tartarus.SandboxQueuedError) as e:
            Sandbox.create(client=c)
    assert e.value.queue_id == "q_1" and e.value.lane == "main" and "no room" in str(e.value)


def test_api_key_is_not_in_reprs() -> None:
    c = tartarus.Client("http://127.0.0.1:9", "tk_secret_value")
    assert "tk_secret_value" not in repr(c.config)
    c.close()
