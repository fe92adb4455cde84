//! `tartarus server`: the REST API on one machine, with state in the data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tartarus_server::ServerConfig;

use super::apikey::default_data_dir;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed)
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where state lives: SQLite database, admin key, sandbox directories (default: see `apikey --help`)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Prepared sandboxes kept ready, so a create without limits, timeout or main command starts at once
    #[arg(long, default_value_t = 0, value_name = "N")]
    warm_pool: usize,
    /// A registry on loopback (HOST:PORT) to pull images from over plain HTTP (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// A registry (HOST[:PORT], e.g. docker.io or ghcr.io) user keys may pull images from (repeatable; the
    /// insecure registries count too). Without any, only admin keys pull images by reference
    #[arg(long = "registry", value_name = "HOST[:PORT]")]
    registries: Vec<String>,
    /// The domain of E2B's sandbox host names (`{port}-{id}.DOMAIN`, what the SDK's `get_host` returns):
    /// requests with such a Host header go to that port of that sandbox (docs/e2b.md). Needs wildcard DNS
    /// (and TLS in front, for the SDK's https) for the names to reach this server
    #[arg(long, value_name = "DOMAIN")]
    sandbox_domain: Option<String>,
    /// Let admin keys create sandboxes on the host's network namespace (`network: host-loopback`), which
    /// reach everything the host reaches: the API, /metrics, the database, other tenants' sandboxes
    #[arg(long)]
    allow_host_network: bool,
    /// Let admin keys create sandboxes with a host directory as their root (`rootfs`)
    #[arg(long)]
    allow_host_rootfs: bool,
    /// How long the event stream keeps events (GET /v1/events), e.g. 30d is 720h
    #[arg(long, default_value = "720h", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    event_retention: std::time::Duration,
    /// How long ended sandboxes' directories (spec, logs, result) are kept; their records stay
    #[arg(long, default_value = "168h", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    retention: std::time::Duration,
    /// The most bytes a running sandbox's main.log may hold; past it the log is truncated (checked every second)
    #[arg(long, default_value = "64MiB", value_name = "SIZE",
          value_parser = |s: &str| tartarus_runtime::units::parse_size(s).map_err(|e| e.to_string()))]
    max_log_bytes: u64,
    /// How often egress sandboxes' blocked-packet counters are checked (network violations)
    #[arg(long, default_value = "1s", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    enforcement_interval: std::time::Duration,
    /// Prices that turn usage into cost (GET /v1/usage): a JSON file with currency, cpu_second,
    /// memory_gib_second, egress_gib, tool_call and snapshot_gib (docs/usage.md)
    #[arg(long, value_name = "FILE")]
    price_table: Option<PathBuf>,
    /// Classification hook: a program given each create request as JSON on stdin that prints allow,
    /// quarantine or "reject REASON" (failures refuse the request)
    #[arg(long, value_name = "PROGRAM")]
    classifier: Option<PathBuf>,
    /// Bytes of blobs (PUT /v1/blobs, tool-call bodies, exec output kept for episodes) each tenant may hold
    #[arg(long, default_value = "10G", value_name = "SIZE",
          value_parser = |s: &str| tartarus_runtime::units::parse_size(s).map_err(|e| e.to_string()))]
    blob_quota: u64,
    /// An environment-variable name pattern (`*` wildcard, any case) whose values are secret: replaced by
    /// their hash in traces and episodes (repeatable; common ones such as *TOKEN* are built in)
    #[arg(long = "secret-env", value_name = "PATTERN")]
    secret_env: Vec<String>,
    /// Keep the state in PostgreSQL instead of SQLite in the data directory (many machines)
    #[arg(
        long,
        env = "TARTARUS_DATABASE_URL",
        value_name = "postgres://USER@HOST:PORT/DB"
    )]
    database: Option<String>,
    /// How long to keep retrying the database at start while it cannot be reached
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    database_wait: std::time::Duration,
    /// A node agent that sends no heartbeat for this long is marked unreachable
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    node_timeout: std::time::Duration,
    /// Cluster mode: how many requests may wait for a node before creates get 429
    #[arg(long, default_value_t = 1000, value_name = "N")]
    queue_depth: i64,
    /// Cluster mode: how nodes are scored: least-loaded (spread load) or bin-pack (fill nodes)
    #[arg(long, default_value = "least-loaded", value_name = "STRATEGY")]
    placement: tartarus_scheduler::Strategy,
    /// Connections served at once; more wait in the listen backlog until one closes
    #[arg(long, default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Time a connection has to send a request's head (also how long a kept-alive connection may idle)
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = |s: &str| match tartarus_runtime::units::parse_duration(s) {
              Ok(d) if d.is_zero() => Err("must be more than 0".to_string()),
              other => other.map_err(|e| e.to_string()),
          })]
    header_timeout: std::time::Duration,
    /// How log lines on stderr look: text for people, json (one object a line) for log collectors
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The format of a daemon's log lines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the event's fields
    /// (`sandbox`, `tenant`, `lane`, `node`, …) at the top level, and the spans it happened in.
    Json,
}

/// Start-up of a long-running daemon (the server, a node agent): peers that go away must never kill it
/// (SIGPIPE ignored), and logs go to stderr at `TARTARUS_LOG` (default info), in `format`.
pub fn init_daemon(format: LogFormat) {
    tartarus_hostsys::ignore_sigpipe();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TARTARUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// The server's settings with every flag at its default, listening on `listen` over `data_dir` with its
/// state in SQLite there (a node agent's own server).
pub fn default_config(listen: SocketAddr, data_dir: PathBuf) -> anyhow::Result<ServerConfig> {
    use clap::{Args as _, FromArgMatches as _};
    let matches = ServerArgs::augment_args(clap::Command::new("server")).try_get_matches_from(["server"])?;
    let mut args = ServerArgs::from_arg_matches(&matches)?;
    args.listen = listen;
    args.data_dir = Some(data_dir);
    // Not from the environment either: a node keeps its own state.
    args.database = None;
    config(args)
}

fn config(args: ServerArgs) -> anyhow::Result<ServerConfig> {
    Ok(ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.unwrap_or_else(default_data_dir),
        // The shim is part of the lean `tartarus` binary, next to this one.
        shim_exe: std::env::current_exe()?.with_file_name("tartarus"),
        warm_pool: args.warm_pool,
        insecure_registries: args.insecure_registries,
        event_retention: args.event_retention,
        retention: tartarus_server::sandboxes::Retention {
            keep_ended: args.retention,
            max_log_bytes: args.max_log_bytes,
        },
        enforcement_interval: args.enforcement_interval,
        classifier: args.classifier,
        blob_quota: args.blob_quota,
        secret_env: args.secret_env,
        database: args.database,
        database_wait: args.database_wait,
        node_timeout: args.node_timeout,
        queue_depth: args.queue_depth,
        placement: args.placement,
        connections: tartarus_server::connections::ConnectionLimits {
            max_connections: args.max_connections as usize,
            header_timeout: args.header_timeout,
            ..tartarus_server::connections::ConnectionLimits::API
        },
        host_access: tartarus_server::sandboxes::HostAccess {
            network: args.allow_host_network,
            rootfs: args.allow_host_rootfs,
        },
        registries: args.registries,
        sandbox_domain: args.sandbox_domain,
        prices: args
            .price_table
            .as_deref()
            .map(tartarus_server::usage::PriceTable::load)
            .transpose()?,
        runtime: super::run::runtime_config(),
    })
}

pub fn run(args: ServerArgs) -> anyhow::Result<u8> {
    init_daemon(args.log_format);
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(tartarus_server::serve(config, print_listening))?;
    Ok(0)
}

/// Prints `listening on ADDR` once a server accepts connections: tests and scripts wait for this line.
pub fn print_listening(addr: std::net::SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
}
