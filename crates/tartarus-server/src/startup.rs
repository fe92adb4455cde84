//! Start-up: the server's settings, its data directory and state store, the background loops, and the
//! listener with graceful shutdown on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use tartarus_store::{Role, Store};

use crate::routes::router;
use crate::sandboxes::Manager;
use crate::{cluster, effects, gateway, images, metrics, policies, sandboxes, AppState};

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
    /// How long ended sandboxes' directories are kept, and the cap on a running sandbox's `main.log`.
    pub retention: sandboxes::Retention,
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
    /// Connections the API serves at once, and how long each may wait for a request.
    pub connections: crate::connections::ConnectionLimits,
    /// What of the host admin keys may give a sandbox (`--allow-host-network`, `--allow-host-rootfs`).
    pub host_access: crate::sandboxes::HostAccess,
    /// Registries (HOST[:PORT]) user keys may pull images from (`--registry`; the insecure registries count
    /// too). Empty: only admin keys pull by reference.
    pub registries: Vec<String>,
    /// E2B's sandbox host names are `{port}-{id}.DOMAIN` (`--sandbox-domain`); `None`: not served.
    pub sandbox_domain: Option<String>,
    /// Prices that turn usage into cost (`--price-table FILE`).
    pub prices: Option<crate::usage::PriceTable>,
    /// The event bus (`memory`, `postgres://…`, `nats://…`, `redis://…`); `None`: PostgreSQL's with
    /// `database`, else in-memory (docs/events.md).
    pub event_bus: Option<String>,
    /// Receivers of signed event webhooks.
    pub webhooks: Vec<tartarus_events::webhooks::Webhook>,
    /// Agent tasks: agent types, the commits' author, the agent's timeout, workers (docs/tasks.md).
    pub tasks: crate::tasks::TaskSettings,
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
                Err(e) => tracing::error!("expiring events failed: {}", tartarus_runtime::error_chain(&e)),
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

/// Runs the server until SIGINT/SIGTERM. Prints `listening on ADDR` once it accepts connections.
pub async fn serve(config: ServerConfig, ready: impl FnOnce(SocketAddr) + Send) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    serve_on(config, listener, ready).await
}

/// [`serve`] on a listener the caller bound (the node agent serves its machine this way).
/// `ready` is told the address once the server accepts connections (the CLI prints it; a library never
/// prints).
pub async fn serve_on(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServerError> {
    let store = open_state_on(&config.data_dir, config.database.as_deref(), config.database_wait).await?;
    let lane_config = tartarus_runtime::lanes::LaneConfig {
        process: config.runtime.clone(),
        ..Default::default()
    };
    let runtimes = tokio::task::spawn_blocking(move || crate::sandboxes::Runtimes::probe(&lane_config))
        .await
        .map_err(|e| ServerError::Config(format!("probing the isolation lanes: {e}")))?;
    for report in runtimes.reports() {
        match &report.reason {
            None => {
                tracing::info!(lane = %report.name, version = ?report.version, detail = ?report.detail, "isolation lane available")
            }
            Some(reason) => tracing::info!(lane = %report.name, "isolation lane unavailable: {reason}"),
        }
    }
    let manager = Manager::new(
        store.clone(),
        config.data_dir.clone(),
        config.shim_exe.clone(),
        config.warm_pool,
        Arc::new(runtimes),
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
    let bus = connect_event_bus(&config).await?;
    let events = crate::events::ServerEvents::new(bus.clone());
    tartarus_events::webhooks::spawn(bus, config.webhooks.clone(), Default::default())
        .await
        .map_err(|e| ServerError::Config(e.chain()))?;
    manager.set_lifecycle(Arc::new(crate::events::EventHooks {
        inner: Arc::new(effects::EffectsHooks {
            effects: effects.clone(),
            manager: Arc::downgrade(&manager),
        }),
        events: events.clone(),
        store: store.clone(),
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
    for registry in &config.registries {
        let plain = !registry.is_empty()
            && !registry.contains('/')
            && !registry.contains('@')
            && !registry.chars().any(char::is_whitespace);
        if !plain {
            return Err(ServerError::Config(format!(
                "--registry {registry:?}: give a registry host with an optional port (docker.io, ghcr.io, \
                 registry.internal:5000), no scheme or path"
            )));
        }
    }
    let image_store = tartarus_image::runspec::open_store(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("opening the image store: {e}")))?;
    let images = images::Images {
        store: image_store,
        insecure_registries: Arc::new(config.insecure_registries.iter().cloned().collect()),
        allowed_registries: Arc::new(
            config
                .registries
                .iter()
                .chain(&config.insecure_registries)
                .map(|r| images::registry_name(r))
                .collect(),
        ),
    };
    manager.refill(sandboxes::DEFAULT_POOL);
    for record in store
        .list_templates(None)
        .await
        .map_err(|e| ServerError::Config(e.to_string()))?
    {
        match serde_json::from_str::<tartarus_image::template::Template>(&record.definition) {
            Ok(template) => images::start_template_pool(&manager, &images, record.tenant.clone(), template),
            Err(e) => {
                tracing::error!(template = %record.id, "stored template is unreadable: {}", tartarus_runtime::error_chain(&e))
            }
        }
    }
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    ready(addr);
    tracing::info!("listening on {addr}, data in {}", config.data_dir.display());
    let policies = policies::Policies::load(&store)
        .await
        .map_err(ServerError::Config)?;
    spawn_event_retention(store.clone(), config.event_retention);
    manager.spawn_retention(config.retention);
    manager.spawn_deadlines();
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
        host_access: config.host_access,
        tasks: Arc::new(config.tasks.clone()),
        task_key: crate::tasks::TaskKey::open_or_create(&config.data_dir)
            .map_err(|e| ServerError::Config(tartarus_runtime::error_chain(&e)))?,
        tasks_dir: config.data_dir.join("tasks"),
        e2b: Arc::new(
            crate::e2b::E2bState::open(&config.data_dir, config.sandbox_domain.clone())
                .map_err(|e| ServerError::Config(format!("the E2B API's state: {e}")))?,
        ),
        prices: config.prices.clone().map(Arc::new),
        events,
    };
    cluster::spawn_loops(state.clone(), Arc::new(leading_tx));
    policies::spawn_enforcement(state.clone(), config.enforcement_interval);
    crate::tasks::worker::spawn_workers(state.clone(), state.tasks.clone());
    let app = router(state);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Streams (exec events, forwarded answers) are small writes that must not wait on delayed ACKs.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        let _ = stream.set_nodelay(true);
    });
    let serving = crate::connections::serve(listener, app, config.connections, async {
        let _ = stopped.await;
    });
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        () = &mut serving => return Ok(()),
        () = shutdown_signal() => {}
    }
    // Stop taking connections, let in-flight requests finish within the grace period, then return.
    // Sandboxes keep running: their shims outlive the server, which re-adopts them when it starts again.
    tracing::info!(
        "stopping: finishing in-flight requests for up to {} s",
        SHUTDOWN_GRACE.as_secs()
    );
    let _ = stop.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, serving).await {
        Ok(()) => Ok(()),
        Err(_) => {
            tracing::warn!(
                "the grace period ended with requests still open (streams, follows); they are dropped"
            );
            Ok(())
        }
    }
}

/// The bus `--event-bus` names, PostgreSQL's with `--database` when it names none, else the in-memory
/// one; retried with backoff for `--database-wait` while its server cannot be reached.
async fn connect_event_bus(config: &ServerConfig) -> Result<Arc<dyn tartarus_events::EventBus>, ServerError> {
    let setting = match (&config.event_bus, &config.database) {
        (Some(setting), _) => setting.clone(),
        (None, Some(database)) => database.clone(),
        (None, None) => "memory".to_string(),
    };
    let bus_config = tartarus_events::BusConfig::parse(&setting)
        .map_err(|e| ServerError::Config(format!("--event-bus: {}", e.chain())))?;
    let started = std::time::Instant::now();
    let mut backoff = tartarus_events::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match tartarus_events::connect(&bus_config).await {
            Ok(bus) => {
                tracing::info!(provider = %bus.provider(), "event bus connected");
                return Ok(bus);
            }
            Err(e @ tartarus_events::BusError::Config(_)) => {
                return Err(ServerError::Config(format!("--event-bus: {}", e.chain())))
            }
            Err(e) if started.elapsed() >= config.database_wait => {
                return Err(ServerError::Config(format!("--event-bus: {}", e.chain())))
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!("{}; retrying in {:.1} s", e.chain(), delay.as_secs_f64());
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}
