//! The per-sandbox gateways: an HTTP server on a Unix socket in each sandbox's gateway directory, whose
//! small router lists the tools the sandbox's tenant may call and takes calls.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use tartarus_store::SandboxRecord;

use super::{invocation, tools, GatewayError, ToolDefinition, MAX_TOOL_BODY};
use crate::effects::Effects;
use crate::error::ApiError;

/// The socket's name in the gateway directory.
pub const SOCKET: &str = "gateway.sock";

/// The open gateways, by sandbox.
#[derive(Clone)]
pub struct Gateways {
    open: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
    /// Names this server's ledger leases.
    pub(super) holder: Arc<str>,
    /// For http tools' upstreams: redirects are not followed.
    pub(super) http: reqwest::Client,
}

impl Default for Gateways {
    fn default() -> Self {
        Self::new()
    }
}

impl Gateways {
    pub fn new() -> Self {
        let suffix = tartarus_hostsys::random_hex(4).unwrap_or_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Gateways {
            open: Arc::new(Mutex::new(HashMap::new())),
            holder: format!("{}:{}:{suffix}", crate::metrics::node_name(), std::process::id()).into(),
            http,
        }
    }

    /// Serves the gateway of `record`'s sandbox on `dir/gateway.sock`.
    pub fn open(&self, effects: &Effects, record: &SandboxRecord, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        // The sandbox's user is an unprivileged host id: it may connect, the socket's directory is the
        // sandbox's own and mounted read-only.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let context = Arc::new(Context {
            effects: effects.clone(),
            sandbox: record.id.clone(),
            tenant: record.tenant.clone(),
            calls: Arc::new(tokio::sync::Semaphore::new(crate::limits::TOOL_CALLS_PER_SANDBOX)),
        });
        let app = router(context);
        // Bounded like the API's listener: code in the sandbox must not be able to hold the server's
        // descriptors or its tasks (closing the gateway drops this future, which closes its connections).
        let task = tokio::spawn(crate::connections::serve(
            listener,
            app,
            crate::connections::ConnectionLimits::GATEWAY,
            std::future::pending(),
        ));
        if let Ok(mut open) = self.open.lock() {
            if let Some(old) = open.insert(record.id.clone(), task.abort_handle()) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Stops serving a sandbox's gateway.
    pub fn close(&self, id: &str) {
        if let Some(task) = self.open.lock().ok().and_then(|mut open| open.remove(id)) {
            task.abort();
        }
    }
}

/// Who is calling: the sandbox whose socket the request arrived on.
pub(super) struct Context {
    pub(super) effects: Effects,
    pub(super) sandbox: String,
    pub(super) tenant: String,
    /// Places for calls in progress (each may run a host process or hold an upstream connection).
    calls: Arc<tokio::sync::Semaphore>,
}

/// The gateway inside a sandbox: `GET /v1/tools` and `POST /v1/tools/{name}`.
fn router(context: Arc<Context>) -> Router {
    Router::new()
        .route("/v1/tools", get(sandbox_tools))
        .route("/v1/tools/{name}", post(call_tool))
        .fallback(|| async {
            ApiError::not_found("the gateway serves GET /v1/tools and POST /v1/tools/{name}")
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_TOOL_BODY))
        .with_state(context)
}

async fn sandbox_tools(State(context): State<Arc<Context>>) -> Result<Json<Vec<ToolDefinition>>, ApiError> {
    Ok(Json(
        tools::callable_by(&context.effects.store, &context.tenant).await?,
    ))
}

async fn call_tool(
    State(context): State<Arc<Context>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Ok(place) = Arc::clone(&context.calls).try_acquire_owned() else {
        return Ok(crate::limits::too_many_requests(format!(
            "this sandbox already has {} tool calls in progress; retry when one has ended",
            crate::limits::TOOL_CALLS_PER_SANDBOX
        )));
    };
    // A call, once started, finishes even if the caller hangs up: the tool may already have acted, and
    // its receipt and ledger entry must be written either way. It keeps its place until then.
    let call = tokio::spawn(async move {
        let _place = place;
        invocation::call(context, name, headers, body).await
    });
    Ok(call.await.map_err(GatewayError::CallAborted)??)
}
