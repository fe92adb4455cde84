//! The control plane on one machine: a REST API (axum) over long-lived sandboxes, API keys with tenants and
//! roles, an audit log, and restart safety.
//!
//! Place in the data flow: request → [`auth::Caller`] (key → tenant, role) → handler → [`sandboxes::Manager`]
//! → one `tartarus shim` per sandbox (the process runtime's supervisor) → state in [`tartarus_store`].
//! The server never forks sandboxes itself: it is multi-threaded, and shims outlive it, so a restart
//! re-adopts running sandboxes instead of losing them.

pub mod api;
pub mod auth;
pub mod blobs;
pub mod cluster;
pub mod effects;
pub mod error;
pub mod files;
pub mod gateway;
pub mod images;
pub mod metrics;
pub mod node_agent;
pub mod policies;
pub mod routes;
pub mod sandboxes;
pub mod templates;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tartarus_runtime::{NetworkMode, ResourceLimits, RootSpec, SandboxSpec};
use tartarus_store::{NewAudit, Role, SandboxRecord, SandboxStatus, Store};
use utoipa::OpenApi;

use crate::api::{CreateSandbox, ExecBody, ExecResult, ListQuery, SandboxView};
use crate::auth::Caller;
use crate::error::{json_rejection, ApiError, ErrorBody};
use crate::sandboxes::Manager;

/// Largest request body (JSON) accepted.
pub const MAX_BODY: usize = 1 << 20;

/// Settings of `tartarus server`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The `tartarus` binary that provides `shim`.
    pub shim_exe: PathBuf,
    /// Prepared sandboxes kept ready for requests that fit the defaults.
    pub warm_pool: usize,
    /// The process runtime's settings (where sandbox cgroups live), to collect what dead shims left.
    pub runtime: tartarus_runtime::process::ProcessRuntimeConfig,
    /// Registries on loopback (HOST:PORT) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// How long events are kept.
    pub event_retention: Duration,
    /// How often egress sandboxes' blocked-packet counters are checked against their policy.
    pub enforcement_interval: Duration,
    /// A classification hook: a program given every create request (JSON on stdin) that answers
    /// `allow`, `quarantine` or `reject REASON` on stdout.
    pub classifier: Option<PathBuf>,
    /// Bytes of blobs each tenant may hold.
    pub blob_quota: u64,
    /// More environment-variable name patterns whose values are redacted from traces.
    pub secret_env: Vec<String>,
    /// The state database (`postgres://…`); `None` for SQLite in the data directory.
    pub database: Option<String>,
    /// How long to keep retrying a database that is not reachable at start.
    pub database_wait: Duration,
    /// A node whose last heartbeat is older than this is marked unreachable.
    pub node_timeout: Duration,
    /// Requests waiting for a node beyond which creates are refused with 429.
    pub queue_depth: i64,
    /// How the scheduler scores nodes.
    pub placement: tartarus_scheduler::Strategy,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub manager: Arc<Manager>,
    pub images: images::Images,
    pub policies: policies::Policies,
    pub classifier: Option<Arc<PathBuf>>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub effects: effects::Effects,
    pub cluster: Arc<cluster::ClusterConfig>,
    /// Whether this replica leads the background loops now.
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// Serialises placements on cluster nodes within this replica (capacity is read, then reserved).
    pub placement: Arc<tokio::sync::Mutex<()>>,
    /// For calls to node agents.
    pub http: reqwest::Client,
    /// For streams forwarded from node agents (no overall time limit).
    pub stream_http: reqwest::Client,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tartarus API", version = "1"),
    paths(create_sandbox, list_sandboxes, get_sandbox, delete_sandbox, exec_sandbox, wait_sandbox, healthz,
          files::put_file, files::get_file, logs_sandbox, pause_sandbox, resume_sandbox, list_audit,
          templates::create_template, templates::list_templates, templates::get_template,
          templates::delete_template, policies::apply_policy, policies::list_policies, policies::get_policy,
          policies::delete_policy, policies::policy_history, policies::rollback_policy, policies::list_events,
          policies::quarantine_sandbox, blobs::put_blob, blobs::get_blob, blobs::delete_blob, blobs::gc_blobs,
          routes::tools::put_tool, routes::tools::list_tools, routes::tools::delete_tool,
          routes::receipts::list_receipts, routes::receipts::get_receipt, routes::episodes::list_episodes,
          routes::episodes::get_episode, routes::episodes::export_episode, routes::evaluators::add_evaluator,
          routes::evaluators::list_evaluators, routes::signals::add_signal, routes::signals::list_signals,
          routes::datasets::build_dataset, routes::datasets::list_datasets, routes::nodes::register,
          routes::nodes::heartbeat, routes::nodes::list_nodes, routes::nodes::create_token,
          routes::nodes::cluster_status, routes::queue::list_queue, routes::queue::get_queued,
          routes::nodes::delete_node),
    components(schemas(CreateSandbox, SandboxView, ExecBody, ExecResult, ErrorBody, api::Resources, files::DirEntry,
                       templates::CreateTemplate, templates::TemplateView,
                       policies::ApplyPolicy, policies::PolicyView, policies::Rollback, blobs::BlobPut,
                       blobs::GcView, gateway::ToolDefinition, routes::receipts::ReceiptView,
                       routes::episodes::EpisodeView, routes::evaluators::AddEvaluator,
                       routes::signals::SignalView, routes::datasets::DatasetView, cluster::NodeReport,
                       cluster::Heartbeat, cluster::Registration, routes::nodes::NodeView,
                       routes::nodes::CreateNodeToken)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] tartarus_store::StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reconciling sandboxes after a restart failed: {0}")]
    Reconcile(String),
    #[error("server error")]
    Serve(#[source] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Drops events older than `retention`, hourly.
fn spawn_event_retention(store: Store, retention: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            let before = tartarus_store::now_ms() - retention.as_millis() as i64;
            match store.prune_events(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "expired events removed"),
                Err(e) => tracing::error!("expiring events failed: {e}"),
            }
        }
    });
}

/// Creates the data directory, the state store and (on first start) the admin key file.
pub async fn open_state(data_dir: &std::path::Path) -> Result<Store, ServerError> {
    open_state_on(data_dir, None, Duration::ZERO).await
}

/// [`open_state`] with the state in `database` (PostgreSQL) when given, retried for up to `wait` while
/// the database cannot be reached.
pub async fn open_state_on(
    data_dir: &std::path::Path,
    database: Option<&str>,
    wait: Duration,
) -> Result<Store, ServerError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir_err = |source| ServerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    // Traversable (not listable) by others: sandboxes reach image layers below it as unprivileged host
    // ids. What is private inside is private by its own mode.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(data_dir)
        .map_err(dir_err)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir.join("sandboxes"))
        .map_err(dir_err)?;
    // Sandboxes' gateway sockets: traversable by their unprivileged ids, not listable.
    std::fs::create_dir_all(data_dir.join("gateway")).map_err(dir_err)?;
    std::fs::set_permissions(data_dir.join("gateway"), std::fs::Permissions::from_mode(0o711))
        .map_err(dir_err)?;
    let store = match database {
        None => Store::open(data_dir).await?,
        Some(url) => {
            let shown = tartarus_store::redact_url(url);
            Store::connect_with_retry(url, wait, |e, delay| {
                tracing::warn!(
                    "database {shown} not reachable ({}); retrying in {:.1} s",
                    tartarus_runtime::error_chain(e),
                    delay.as_secs_f64()
                )
            })
            .await?
        }
    };
    for name in ["state.db", "state.db-wal", "state.db-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let path = data_dir.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(dir_err)?;
        }
    }
    let key_path = data_dir.join("admin.key");
    if !key_path.exists() {
        let (key, secret) = store.create_key("admin", Role::Admin).await?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(dir_err)?;
        std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes()).map_err(dir_err)?;
        tracing::info!(key = key.id, "admin API key written to {}", key_path.display());
    }
    Ok(store)
}

/// The router with every route and layer.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(exec_sandbox))
        .route("/v1/sandboxes/{id}/wait", post(wait_sandbox))
        .route("/v1/sandboxes/{id}/logs", get(logs_sandbox))
        .route("/v1/audit", get(list_audit))
        .route("/v1/events", get(policies::list_events))
        .route(
            "/v1/sandboxes/{id}/quarantine",
            post(policies::quarantine_sandbox),
        )
        .route(
            "/v1/policies",
            post(policies::apply_policy).get(policies::list_policies),
        )
        .route(
            "/v1/policies/{id}",
            get(policies::get_policy).delete(policies::delete_policy),
        )
        .route("/v1/policies/{id}/history", get(policies::policy_history))
        .route("/v1/policies/{id}/rollback", post(policies::rollback_policy))
        .route(
            "/v1/templates",
            post(templates::create_template).get(templates::list_templates),
        )
        .route(
            "/v1/templates/{id}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route(
            "/v1/blobs",
            axum::routing::put(blobs::put_blob).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/gc", post(blobs::gc_blobs))
        .route("/v1/blobs/{cid}", get(blobs::get_blob).delete(blobs::delete_blob))
        .merge(routes::tools::routes())
        .merge(routes::receipts::routes())
        .merge(routes::keys::routes())
        .merge(routes::episodes::routes())
        .merge(routes::signals::routes())
        .merge(routes::evaluators::routes())
        .merge(routes::datasets::routes())
        .merge(routes::nodes::routes())
        .merge(routes::queue::routes())
        .route("/v1/sandboxes/{id}/pause", post(pause_sandbox))
        .route("/v1/sandboxes/{id}/resume", post(resume_sandbox))
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::get_file)
                .put(files::put_file)
                .layer(DefaultBodyLimit::max(files::MAX_FILE)),
        )
        .fallback(|| async { ApiError::not_found("no such route; see /v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal(
                "internal error (a bug: please report)",
            ))
        }))
        .with_state(state)
}

/// Runs the server until SIGINT/SIGTERM. Prints `listening on ADDR` once it accepts connections.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    serve_on(config, listener).await
}

/// [`serve`] on a listener the caller bound (the node agent serves its machine this way).
pub async fn serve_on(config: ServerConfig, listener: tokio::net::TcpListener) -> Result<(), ServerError> {
    let store = open_state_on(&config.data_dir, config.database.as_deref(), config.database_wait).await?;
    let manager = Manager::new(
        store.clone(),
        config.data_dir.clone(),
        config.shim_exe.clone(),
        config.warm_pool,
    );
    let effects = effects::Effects::open(
        store.clone(),
        &config.data_dir,
        config.blob_quota,
        config.secret_env.clone(),
    )
    .map_err(ServerError::Config)?;
    gateway::refresh_redactor(&effects)
        .await
        .map_err(|e| ServerError::Config(e.message))?;
    manager.set_lifecycle(Arc::new(effects::EffectsHooks {
        effects: effects.clone(),
        manager: Arc::downgrade(&manager),
    }));
    let (adopted, ended) = manager
        .reconcile()
        .await
        .map_err(|e| ServerError::Reconcile(e.message))?;
    if adopted + ended > 0 {
        tracing::info!(adopted, ended, "reconciled sandboxes from a previous run");
    }
    // Cgroups of sandboxes whose shim died (it had no chance to remove them).
    let collected = tartarus_runtime::process::ProcessRuntime::new(config.runtime.clone()).collect_garbage();
    if !collected.is_empty() {
        tracing::info!(count = collected.len(), "removed cgroups left by shims that died");
    }
    for registry in &config.insecure_registries {
        if !tartarus_image::pull::is_loopback(registry) {
            return Err(ServerError::Config(format!(
                "--insecure-registry {registry}: plain HTTP is allowed only for a registry on loopback"
            )));
        }
    }
    let image_store = tartarus_image::runspec::open_store(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("opening the image store: {e}")))?;
    let images = images::Images {
        store: image_store,
        insecure_registries: Arc::new(config.insecure_registries.iter().cloned().collect()),
    };
    manager.refill(sandboxes::DEFAULT_POOL);
    for record in store
        .list_templates(None)
        .await
        .map_err(|e| ServerError::Config(e.to_string()))?
    {
        match serde_json::from_str::<tartarus_image::template::Template>(&record.definition) {
            Ok(template) => images::start_template_pool(&manager, &images, template),
            Err(e) => tracing::error!(template = %record.id, "stored template is unreadable: {e}"),
        }
    }
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    println!("listening on {addr}");
    tracing::info!("listening on {addr}, data in {}", config.data_dir.display());
    let policies = policies::Policies::load(&store)
        .await
        .map_err(ServerError::Config)?;
    spawn_event_retention(store.clone(), config.event_retention);
    let (leading_tx, leading) = tokio::sync::watch::channel(false);
    let replica = format!(
        "{}:{}:{}",
        metrics::node_name(),
        std::process::id(),
        tartarus_hostsys::random_hex(3).unwrap_or_default()
    );
    let state = AppState {
        store,
        manager,
        images,
        policies,
        classifier: config.classifier.clone().map(Arc::new),
        metrics: metrics::install(),
        effects,
        cluster: Arc::new(cluster::ClusterConfig {
            node_timeout: config.node_timeout,
            queue_depth: config.queue_depth,
            strategy: config.placement,
            replica,
        }),
        leading,
        placement: Arc::new(tokio::sync::Mutex::new(())),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ServerError::Config(e.to_string()))?,
        stream_http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ServerError::Config(e.to_string()))?,
    };
    cluster::spawn_loops(state.clone(), Arc::new(leading_tx));
    policies::spawn_enforcement(state.clone(), config.enforcement_interval);
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServerError::Serve)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

pub(crate) fn view(record: &SandboxRecord) -> SandboxView {
    SandboxView {
        id: record.id.clone(),
        tenant: record.tenant.clone(),
        status: match (record.status, record.paused) {
            (SandboxStatus::Running, true) => "paused".to_string(),
            (status, _) => status.as_str().to_string(),
        },
        template: record.template.clone(),
        labels: record.labels.clone(),
        created_ms: record.created_ms,
        finished_ms: record.finished_ms,
        exit_code: record.exit_code,
        reason: record.reason.clone(),
        node: record.node.clone(),
        placement: record.placement.clone(),
    }
}

pub(crate) async fn audit(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: Option<&str>,
    outcome: &str,
) {
    let record = NewAudit {
        tenant: &caller.tenant,
        key_id: Some(&caller.key_id),
        action,
        target,
        outcome,
        detail: None,
    };
    if let Err(e) = state.store.record_audit(&record).await {
        tracing::error!("audit write failed: {e}");
    }
}

/// Translates and validates a create request into a runtime spec.
fn spec_from(body: &CreateSandbox, caller: &Caller) -> Result<SandboxSpec, ApiError> {
    let roots = [
        body.template.is_some(),
        body.image.is_some(),
        body.rootfs.is_some(),
    ];
    if roots.iter().filter(|r| **r).count() > 1 {
        return Err(ApiError::invalid(
            "give at most one of 'template', 'image' and 'rootfs'",
        ));
    }
    let mut spec = SandboxSpec::new(body.cmd.clone().unwrap_or_default());
    spec.service = true;
    if let Some(rootfs) = &body.rootfs {
        if caller.role != Role::Admin {
            return Err(ApiError::forbidden(
                "only admin keys may choose a host directory as rootfs",
            ));
        }
        spec.root = RootSpec::Directory(rootfs.into());
    }
    spec.env = body.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    spec.workdir = body.cwd.as_ref().map(Into::into);
    let r = &body.resources;
    if r.cpus.is_some_and(|c| !(c > 0.0 && c <= 64.0)) {
        return Err(ApiError::invalid("resources.cpus must be in (0, 64]"));
    }
    if r.memory_mb.is_some_and(|m| !(4..=1 << 20).contains(&m)) {
        return Err(ApiError::invalid(
            "resources.memory_mb must be between 4 and 1048576",
        ));
    }
    if r.pids.is_some_and(|p| !(2..=1_000_000).contains(&p)) {
        return Err(ApiError::invalid("resources.pids must be between 2 and 1000000"));
    }
    spec.limits = ResourceLimits {
        memory_bytes: r.memory_mb.map(|m| m << 20),
        cpus: r.cpus,
        pids: r.pids,
    };
    if let Some(t) = body.timeout_s {
        if !(1..=7 * 86_400).contains(&t) {
            return Err(ApiError::invalid("timeout_s must be between 1 and 604800"));
        }
        spec.timeout = Some(Duration::from_secs(t));
    }
    spec.network = match body.network.as_deref() {
        None | Some("none") => NetworkMode::None,
        Some("host-loopback") => NetworkMode::HostLoopback,
        // The contract comes from the policy in force (admission); without one, the safe default:
        // private ranges and metadata denied, no DNS.
        Some("egress") => NetworkMode::Egress(tartarus_runtime::EgressContract::default()),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "unknown network '{other}': use none, egress or host-loopback"
            )))
        }
    };
    spec.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(spec)
}

/// Create a sandbox.
#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, security(("api_key" = [])),
    responses((status = 201, body = SandboxView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
async fn create_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    let mut spec = spec_from(&body, &caller)?;
    let mut pool_key = None;
    if let Some(id) = &body.template {
        let record = state
            .store
            .get_template(id, caller.scope())
            .await?
            .ok_or_else(|| ApiError::invalid(format!("unknown template '{id}' (see GET /v1/templates)")))?;
        let template: tartarus_image::template::Template = serde_json::from_str(&record.definition)
            .map_err(|e| ApiError::internal(format!("stored template '{id}': {e}")))?;
        let image = state.images.ensure(&template.base_image).await?;
        let plain = images::apply_template(
            &mut spec,
            &template,
            &state.images,
            &image,
            state.manager.shim_exe(),
        )?;
        if plain {
            pool_key = Some(template.id.clone());
        }
    } else if let Some(reference) = &body.image {
        let image = state.images.ensure(reference).await?;
        images::root_on_image(&mut spec, &state.images, &image)?;
    }
    // The classification hook may send the request to quarantine, or refuse it.
    let classified = policies::classify(&state, &caller, &body).await?;
    let facts = policies::CreateFacts {
        template: body.template.as_deref(),
        class: classified.as_deref().or(body.class.as_deref()),
        rootfs: body.rootfs.is_some(),
    };
    if let Some(class) = body.class.as_deref() {
        if tartarus_policy::resource_class(class).is_none() {
            return Err(ApiError::invalid(format!(
                "unknown resource class '{class}': use ember, flame, blaze, inferno or quarantine"
            )));
        }
    }
    let decision = policies::admit(&state, &caller, &mut spec, &facts).await?;
    if decision.is_some() && pool_key.is_some() {
        // A pooled sandbox was started before the policy's constraints: only a fresh one carries them.
        pool_key = None;
    }
    spec.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    // Cluster mode: a sandbox on the host root goes to a node when there are nodes (images and templates
    // still run on this machine).
    if body.template.is_none() && body.image.is_none() && body.rootfs.is_none() {
        let lane: tartarus_store::Lane = body
            .lane
            .as_deref()
            .unwrap_or("main")
            .parse()
            .map_err(|e: tartarus_store::StoreError| ApiError::invalid(e.to_string()))?;
        let want = cluster::Wanted {
            id: None,
            tenant: caller.tenant.clone(),
            spec: spec.clone(),
            labels: body.labels.clone(),
            class: classified.clone().or(body.class.clone()),
            node_selector: body.node_selector.clone(),
            tolerations: body.tolerations.clone(),
            node_affinity: body.node_affinity.clone(),
            node_anti_affinity: body.node_anti_affinity.clone(),
            spread_by: body.spread_by.clone(),
        };
        match cluster::place_on_node(&state, &want).await {
            Ok(Some(record)) => {
                audit(&state, &caller, "sandbox.create", Some(&record.id), "ok").await;
                return Ok((StatusCode::CREATED, Json(view(&record))).into_response());
            }
            Ok(None) => {}
            // No node has room now: wait in the queue (or 429 when it is full).
            Err(e) if e.code == "no_capacity" => {
                let priority = body.priority.unwrap_or(0);
                let Some(id) = cluster::enqueue(&state, &want, lane, priority, &e.message).await? else {
                    audit(&state, &caller, "sandbox.create", None, "refused: queue full").await;
                    let mut response = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "queue_full",
                        format!(
                            "no node has room and {} requests already wait; retry later",
                            state.cluster.queue_depth
                        ),
                    )
                    .into_response();
                    response.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        axum::http::HeaderValue::from_static("5"),
                    );
                    return Ok(response);
                };
                audit(&state, &caller, "sandbox.create", Some(&id), "queued").await;
                let answer = json!({
                    "id": id, "status": "queued", "lane": lane.as_str(), "reason": e.message,
                    "queue": format!("/v1/queue/{id}"),
                });
                return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
            }
            Err(e) => {
                audit(&state, &caller, "sandbox.create", None, "failed").await;
                return Err(e);
            }
        }
    } else if !body.node_selector.is_empty() {
        return Err(ApiError::invalid(
            "node_selector applies to sandboxes on the host root; templates and images run on the control plane",
        ));
    }
    let result = state
        .manager
        .create(
            &caller.tenant,
            spec,
            body.labels.clone(),
            body.template.as_deref(),
            pool_key.as_deref(),
        )
        .await;
    let outcome = if result.is_ok() { "ok" } else { "failed" };
    audit(
        &state,
        &caller,
        "sandbox.create",
        result.as_ref().ok().map(|r| r.id.as_str()),
        outcome,
    )
    .await;
    Ok((StatusCode::CREATED, Json(view(&result?))).into_response())
}

/// List sandboxes of the caller's tenant (all tenants for admins).
#[utoipa::path(get, path = "/v1/sandboxes", params(ListQuery), security(("api_key" = [])),
    responses((status = 200, body = [SandboxView]), (status = 401, body = ErrorBody)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<SandboxView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status: Option<SandboxStatus> = query
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("{e}")))?;
    let label = match &query.label {
        Some(l) => Some(
            l.split_once('=')
                .ok_or_else(|| ApiError::invalid("label filter must be key=value"))?,
        ),
        None => None,
    };
    let records = state.store.sandboxes(caller.scope(), status).await?;
    let views = records
        .iter()
        .filter(|r| label.is_none_or(|(k, v)| r.labels.get(k).is_some_and(|have| have == v)))
        .map(view)
        .collect();
    Ok(Json(views))
}

pub(crate) async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<SandboxRecord, ApiError> {
    // Another tenant's sandbox is reported exactly like a missing one, so ids do not leak.
    state
        .store
        .sandbox(id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sandbox '{id}'")))
}

/// Get one sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)))]
async fn get_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    if record.status.is_live() {
        if let (Some(node), Some(remote)) = (cluster::node_of(&state, &record).await?, &record.remote_id) {
            // Best effort: a node that does not answer leaves the record as it is.
            if let Ok((200, theirs)) = cluster::node_call(
                &state,
                &node,
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{remote}"),
                None,
            )
            .await
            {
                cluster::sync_from_node(&state, &record, &theirs).await?;
            }
        }
    }
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

/// Forwards a request for a sandbox on a node, records an ending it reports, and answers with what the
/// node answered.
async fn on_node(
    state: &AppState,
    record: &SandboxRecord,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let node = cluster::node_of(state, record)
        .await?
        .ok_or_else(|| ApiError::internal("not a node sandbox"))?;
    let remote = record.remote_id.as_deref().unwrap_or_default();
    let (status, answer) = cluster::node_call(
        state,
        &node,
        method,
        &format!("/v1/sandboxes/{remote}{path}"),
        body,
    )
    .await?;
    Ok((
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        answer,
    ))
}

/// Refuses what sandboxes on cluster nodes cannot do yet.
pub(crate) fn local_only(record: &SandboxRecord, what: &str) -> Result<(), ApiError> {
    match &record.node {
        Some(node) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_on_nodes",
            format!("{what} is not available yet for sandboxes on cluster nodes (this one runs on {node})"),
        )),
        None => Ok(()),
    }
}

/// Kill a sandbox and remove its resources; returns its final record.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    if record.status.is_live() {
        if record.node.is_some() {
            let (status, theirs) = on_node(&state, &record, reqwest::Method::DELETE, "", None).await?;
            if !status.is_success() {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "node_failed",
                    format!("node: {theirs}"),
                ));
            }
            cluster::sync_from_node(&state, &record, &theirs).await?;
        } else {
            state.manager.kill(&record).await?;
        }
    }
    audit(&state, &caller, "sandbox.delete", Some(&id), "ok").await;
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

/// Run a command inside a running sandbox and return its output.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecBody, security(("api_key" = [])),
    responses((status = 200, body = ExecResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
               (status = 422, body = ErrorBody)))]
async fn exec_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    let Json(body) = body.map_err(json_rejection)?;
    if body.cmd.is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    if body.timeout_s.is_some_and(|t| !(t > 0.0 && t <= 86_400.0)) {
        return Err(ApiError::invalid("timeout_s must be in (0, 86400]"));
    }
    if !record.status.is_live() {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    if record.node.is_some() {
        if body.stream {
            let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::internal(e.to_string()))?;
            let answer = cluster::forward(
                &state,
                &record,
                reqwest::Method::POST,
                ("/exec", &[]),
                Some("application/json"),
                bytes.into(),
            )
            .await;
            let outcome = if answer.as_ref().is_ok_and(|r| r.status().is_success()) {
                "ok"
            } else {
                "failed"
            };
            audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
            return answer;
        }
        let forwarded = serde_json::to_value(&body).map_err(|e| ApiError::internal(e.to_string()))?;
        let result = on_node(&state, &record, reqwest::Method::POST, "/exec", Some(forwarded)).await;
        let outcome = match &result {
            Ok((status, _)) if status.is_success() => "ok",
            _ => "failed",
        };
        audit(&state, &caller, "sandbox.exec", Some(&id), outcome).await;
        let (status, answer) = result?;
        return Ok((status, Json(answer)).into_response());
    }
    // The sandbox's own env first (pooled sandboxes start without one), then the request's.
    let base: SandboxSpec = serde_json::from_str(&record.spec).unwrap_or_default();
    let env: Vec<(String, String)> = base.env.into_iter().chain(body.env.clone()).collect();
    // The sandbox's working directory (an image's or template's) unless the request names one.
    let workdir = body
        .cwd
        .clone()
        .or_else(|| base.workdir.map(|w| w.display().to_string()));
    let request = json!({
        "op": "exec",
        "command": body.cmd,
        "env": env,
        "workdir": workdir,
        "stdin": body.stdin,
        "timeout_ms": body.timeout_s.map(|t| (t * 1000.0) as u64),
        "stream": body.stream,
    });
    if body.stream {
        let result = state.manager.exec_stream(&record, request).await;
        let error = result.as_ref().err().map(|e| e.message.as_str());
        trace_exec(&state, &record, (&body.cmd, &env), error, None).await;
        audit(
            &state,
            &caller,
            "sandbox.exec",
            Some(&id),
            if result.is_ok() { "ok" } else { "failed" },
        )
        .await;
        return Ok(sse_exec(result?).into_response());
    }
    let result = state.manager.exec(&record, request).await;
    let error = result.as_ref().err().map(|e| e.message.as_str());
    trace_exec(&state, &record, (&body.cmd, &env), error, result.as_ref().ok()).await;
    audit(
        &state,
        &caller,
        "sandbox.exec",
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    Ok(Json(result?).into_response())
}

/// The `exec` trace record: the command (secrets redacted), and its outcome with the output kept as
/// blobs; a streamed exec's output is not kept.
async fn trace_exec(
    state: &AppState,
    record: &SandboxRecord,
    (cmd, env): (&[String], &[(String, String)]),
    error: Option<&str>,
    result: Option<&ExecResult>,
) {
    use ipld_core::ipld::Ipld;
    let redactor = state.effects.redactor(env, &[]);
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert(
        "cmd".to_string(),
        Ipld::List(cmd.iter().map(|a| redactor.text(a)).collect()),
    );
    if let Some(error) = error {
        attrs.insert("error".to_string(), redactor.text(error));
    }
    match result {
        Some(result) => {
            attrs.insert("exit_code".to_string(), Ipld::Integer(result.exit_code.into()));
            attrs.insert(
                "wall_ms".to_string(),
                Ipld::Integer((result.wall_ms.max(0.0) as u64).into()),
            );
            attrs.insert("timed_out".to_string(), Ipld::Bool(result.timed_out));
            for (name, output) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
                if output.is_empty() {
                    continue;
                }
                let value = if redactor.contains_secret(output.as_bytes()) {
                    redactor.text(output)
                } else {
                    match state
                        .effects
                        .put_blob(&record.tenant, output.as_bytes().to_vec())
                        .await
                    {
                        Some(cid) => effects::link(&cid),
                        None => continue,
                    }
                };
                attrs.insert(name.to_string(), value);
            }
        }
        None if error.is_none() => {
            attrs.insert("stream".to_string(), Ipld::Bool(true));
        }
        None => {}
    }
    state
        .effects
        .trace(&record.id, &record.tenant, "exec", attrs)
        .await;
}

/// Wait (up to `timeout_s`, default 60, at most 3600) until a sandbox has ended; returns its record.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/wait", params(WaitQuery), security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)))]
async fn wait_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SandboxView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let record = find(&state, &caller, &id).await?;
    let limit = Duration::from_secs(query.timeout_s.unwrap_or(60).min(3600));
    if record.status.is_live() && record.node.is_some() {
        let path = format!("/wait?timeout_s={}", limit.as_secs());
        let (status, theirs) = on_node(&state, &record, reqwest::Method::POST, &path, None).await?;
        if status.is_success() {
            cluster::sync_from_node(&state, &record, &theirs).await?;
        }
    } else if record.status.is_live() {
        state.manager.wait(&id, limit).await;
    }
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_s: Option<u64>,
}

/// The main command's output (stdout and stderr interleaved). With `follow=true` the response streams
/// what is written until the sandbox ends.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", params(LogsQuery), security(("api_key" = [])),
    responses((status = 200, description = "text/plain output", content_type = "text/plain"), (status = 404, body = ErrorBody)))]
async fn logs_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use tokio::io::AsyncReadExt;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let record = find(&state, &caller, &id).await?;
    if record.node.is_some() {
        let follow = if query.follow.unwrap_or(false) {
            "true"
        } else {
            "false"
        };
        return cluster::forward(
            &state,
            &record,
            reqwest::Method::GET,
            ("/logs", &[("follow", follow)]),
            None,
            Default::default(),
        )
        .await;
    }
    let path = std::path::Path::new(&record.dir).join("main.log");
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ApiError::internal(format!("reading logs: {e}"))),
    };
    let done = if query.follow.unwrap_or(false) {
        state.manager.done(&id)
    } else {
        None
    };
    struct Tail {
        file: Option<tokio::fs::File>,
        done: Option<tokio::sync::watch::Receiver<bool>>,
    }
    let stream = futures_util::stream::unfold(Tail { file, done }, |mut tail| async move {
        loop {
            if let Some(file) = tail.file.as_mut() {
                let mut buf = vec![0u8; 64 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) => {}
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), tail));
                    }
                    Err(e) => {
                        return Some((
                            Err(e),
                            Tail {
                                file: None,
                                done: None,
                            },
                        ))
                    }
                }
            }
            // At the end of what is written: stop, or wait for more while the sandbox lives (the shim
            // creates the log before the sandbox runs). Growth is checked four times a second.
            let rx = tail.done.as_mut()?;
            let ended = tokio::select! {
                _ = rx.wait_for(|done| *done) => true,
                _ = tokio::time::sleep(Duration::from_millis(250)) => false,
            };
            if ended {
                tail.done = None; // one last read, then the end
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    follow: Option<bool>,
}

async fn set_paused(
    state: AppState,
    caller: Caller,
    id: String,
    paused: bool,
) -> Result<Json<SandboxView>, ApiError> {
    let record = find(&state, &caller, &id).await?;
    caller.require_mutate()?;
    if record.status != SandboxStatus::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}",
            record.status.as_str()
        )));
    }
    let result = match record.node.is_some() {
        // On a node: its server freezes it; this record keeps the flag for views.
        true => {
            let suffix = if paused { "/pause" } else { "/resume" };
            let (status, theirs) = on_node(&state, &record, reqwest::Method::POST, suffix, None).await?;
            if status.is_success() {
                state.store.set_paused(&id, paused).await.map_err(ApiError::from)
            } else {
                Err(ApiError::new(
                    status,
                    "node_refused",
                    theirs["error"]["message"]
                        .as_str()
                        .unwrap_or("the node refused")
                        .to_string(),
                ))
            }
        }
        false => state.manager.set_paused(&record, paused).await,
    };
    let action = if paused { "sandbox.pause" } else { "sandbox.resume" };
    audit(
        &state,
        &caller,
        action,
        Some(&id),
        if result.is_ok() { "ok" } else { "failed" },
    )
    .await;
    result?;
    Ok(Json(view(&find(&state, &caller, &id).await?)))
}

/// Freeze every process of a running sandbox (cgroup freezer); execs get 409 until it is resumed.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pause_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    set_paused(state, caller, id, true).await
}

/// Thaw a paused sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", security(("api_key" = [])),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn resume_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    set_paused(state, caller, id, false).await
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Admins only: one tenant's records (others always see their own tenant's).
    tenant: Option<String>,
    /// Only records at or after this time (milliseconds since the Unix epoch).
    since_ms: Option<i64>,
}

/// The audit trail, newest first: every mutating call with its tenant, key, target and outcome.
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), security(("api_key" = [])),
    responses((status = 200, description = "audit records, newest first"), (status = 401, body = ErrorBody)))]
async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<tartarus_store::AuditRecord>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = caller.scope_for(query.tenant.as_deref(), "audit trail")?;
    Ok(Json(state.store.audit(tenant, query.since_ms).await?))
}

/// Prometheus text format. Unauthenticated, like /healthz: serve it on an address scrapers can reach.
async fn metrics_text(State(state): State<AppState>) -> Result<String, ApiError> {
    let handle = state
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::internal("metrics recorder not installed"))?;
    let live = state.store.live_count_all().await?;
    ::metrics::gauge!(metrics::ACTIVE).set(live as f64);
    Ok(handle.render())
}

/// Turns the shim's lines into Server-Sent Events: `stdout`/`stderr` with a JSON string, then `exit`.
fn sse_exec(stream: sandboxes::ExecStream) -> impl axum::response::IntoResponse {
    use axum::response::sse::{Event, Sse};
    let events = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        let line = stream.lines.next_line().await.ok()??;
        let value: serde_json::Value = serde_json::from_str(&line).ok()?;
        let event = match value.get("stream").and_then(|s| s.as_str()) {
            Some(name) => Event::default().event(name).data(value["data"].to_string()),
            None => {
                return Some((
                    Ok::<_, std::convert::Infallible>(Event::default().event("exit").data(value.to_string())),
                    None,
                ))
            }
        };
        Some((Ok(event), Some(stream)))
    });
    Sse::new(events)
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
