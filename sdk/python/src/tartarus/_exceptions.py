"""Typed errors, mapped from the server's ``{"error": {"code", "message"}}`` body and HTTP status."""

from __future__ import annotations

import builtins
from typing import Any, Dict, Optional, Type

__all__ = [
    "TartarusError",
    "APIError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "TimeoutError",
    "ConnectionError",
    "CommandExitError",
    "ReceiptVerificationError",
    "SandboxQueuedError",
    "ConfigurationError",
]


class TartarusError(Exception):
    """Base class of every error the SDK raises."""


class ConfigurationError(TartarusError):
    """No host or API key: pass them, or set ``TARTARUS_HOST`` / ``TARTARUS_API_KEY``."""


class APIError(TartarusError):
    """The server answered with an error status.

    ``status`` is the HTTP status, ``code`` the server's stable machine-readable code (``not_found``,
    ``conflict``, ...), ``message`` its human-readable message, ``correlation_id`` the id under which the
    server logged the cause of an ``internal`` error.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        method: str = "",
        url: str = "",
        correlation_id: Optional[str] = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url
        self.correlation_id = correlation_id
        self.body = body
        text = f"{status} {code}: {message}"
        if method:
            text += f" ({method} {url})"
        if correlation_id:
            text += f" [correlation_id={correlation_id}]"
        super().__init__(text)


class AuthenticationError(APIError):
    """401: no key, a malformed header, or an unknown or revoked key."""


class PermissionDeniedError(APIError):
    """403: the key's role or the policy forbids it, or the sandbox refused a path."""


class NotFoundError(APIError):
    """404: no such sandbox, file, receipt, ... (another tenant's sandboxes are 404 too)."""


class ConflictError(APIError):
    """409: the sandbox is paused or has ended, or an idempotency divergence."""


class InvalidRequestError(APIError):
    """400 / 415 / 422: a request the server could not parse or that is out of range."""


class PayloadTooLargeError(InvalidRequestError):
    """413: a body or file over the operation's limit."""


class RateLimitError(APIError):
    """429: too many at once; ``retry_after`` is the server's ``Retry-After`` in seconds, if given."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class ServerError(APIError):
    """5xx: the server failed (``correlation_id`` names the cause in its log) or is unavailable."""


class TimeoutError(TartarusError, builtins.TimeoutError):
    """The SDK's own deadline for a call passed (connect, read or the whole streamed exec)."""


class ConnectionError(TartarusError, builtins.ConnectionError):
    """The server could not be reached."""


class CommandExitError(TartarusError):
    """``commands.run(..., check=True)`` and the command exited non-zero (or timed out)."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        why = "timed out" if result.timed_out else f"exited with {result.exit_code}"
        tail = result.stderr.strip().splitlines()[-3:] if result.stderr else []
        msg = f"command {why}"
        if tail:
            msg += ": " + " | ".join(tail)
        super().__init__(msg)


class SandboxQueuedError(TartarusError):
    """Cluster mode: no node had room, so the create was queued (202) rather than started. ``queue_id`` is the
    request's id (``GET /v1/queue/{id}`` tells when it is placed); ``body`` is the server's answer."""

    def __init__(self, body: Dict[str, Any]) -> None:
        self.body = body
        self.queue_id = str(body.get("id", ""))
        self.lane = body.get("lane")
        self.reason = body.get("reason")
        super().__init__(f"sandbox create queued as {self.queue_id} (lane {self.lane}): {self.reason}")


class ReceiptVerificationError(TartarusError):
    """A receipt did not verify; ``kind`` is the spec's name for why (``bad_signature``,
    ``unknown_key``, ``hash_mismatch``, ``invalid_object``, ``wrong_version``, ``malformed``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}")


_BY_STATUS: Dict[int, Type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def error_from_response(
    status: int, body: Any, headers: Any, method: str = "", url: str = ""
) -> APIError:
    code = "http_error"
    message = ""
    correlation_id = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or "")
        correlation_id = err.get("correlation_id")
    elif isinstance(body, str):
        message = body.strip()[:500]
    if not message:
        message = f"HTTP {status}"
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    kw: Dict[str, Any] = dict(
        status=status, code=code, method=method, url=url, correlation_id=correlation_id, body=body
    )
    if cls is RateLimitError:
        retry_after = None
        raw = headers.get("retry-after") if headers is not None else None
        if raw is not None:
            try:
                retry_after = float(raw)
            except ValueError:
                retry_after = None
        return RateLimitError(message, retry_after=retry_after, **kw)
    return cls(message, **kw)
