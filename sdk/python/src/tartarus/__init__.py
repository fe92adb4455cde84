"""Tartarus Python SDK: sandboxes, commands, files, preview URLs and signed receipts.

    from tartarus import Sandbox

    with Sandbox.create() as sb:
        print(sb.commands.run("echo hello").stdout)
"""

__version__ = "0.1.0"

from ._async import AsyncClient, AsyncSandbox
from ._exceptions import (
    APIError,
    AuthenticationError,
    CommandExitError,
    ConfigurationError,
    ConflictError,
    ConnectionError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ReceiptVerificationError,
    SandboxQueuedError,
    ServerError,
    TartarusError,
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
from ._receipts import verify_receipt
from ._sync import Client, Sandbox

__all__ = [
    "__version__",
    "Client",
    "Sandbox",
    "AsyncClient",
    "AsyncSandbox",
    "CommandResult",
    "EntryInfo",
    "OutputEvent",
    "PreviewUrl",
    "Receipt",
    "Resources",
    "Runtime",
    "SandboxInfo",
    "Template",
    "ToolCallResult",
    "verify_receipt",
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
