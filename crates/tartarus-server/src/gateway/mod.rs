//! Tools and the gateway: the only way a sandbox reaches a tool.
//!
//! The operator declares tools (`POST /v1/tools`, handlers in `crate::routes::tools`): an HTTP upstream
//! (the URL, method and headers are fixed by the declaration, so a sandbox cannot choose the host;
//! redirects are not followed) or a host command (the request body on stdin, the response from stdout).
//! Every sandbox that belongs to a tenant gets its own gateway: an HTTP server on a Unix socket,
//! `/run/tartarus/gateway.sock` inside the sandbox (bind-mounted read-only from `DATA_DIR/gateway/<id>/`),
//! so the socket a request arrives on says which sandbox made it — nothing in the request can claim
//! another identity.
//!
//! Inside the sandbox: `GET /v1/tools` lists the tools its tenant may call; `POST /v1/tools/{name}`
//! calls one with the request body, optionally with an `Idempotency-Key` header. Every invocation yields
//! a signed receipt (`Tartarus-Receipt: <id>` on the answer); a key runs the call through the ledger
//! (register → commit under a lease, see `tartarus_store::effects`): a repeat with the same body gets the
//! stored answer (`Tartarus-Replayed: true`) without invoking the tool, another body is a divergence (409).
//!
//! - [`tools`]: the declaration, its rules, and the declarations as stored.
//! - [`socket`]: the per-sandbox servers ([`Gateways`]) and their router.
//! - [`ledger`]: claiming, committing and giving up an idempotency key.
//! - [`invocation`]: one call to its end: the upstream or command, the receipt, the trace record.

pub mod error;
pub mod invocation;
pub mod ledger;
pub mod socket;
pub mod tools;

// What the rest of the server uses.
pub use error::GatewayError;
pub use socket::Gateways;
pub use tools::{refresh_redactor, ToolDefinition};

/// Largest request or response body of a tool call.
pub const MAX_TOOL_BODY: usize = 8 << 20;
