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
    /// The event bus (docs/events.md): memory, postgres://…, nats://HOST:PORT (JetStream) or
    /// redis://HOST:PORT (streams). Default: the --database's PostgreSQL when given, else memory
    #[arg(long, env = "TARTARUS_EVENT_BUS", value_name = "memory|URL")]
    event_bus: Option<String>,
    /// POST every event matching FILTER (default `>`: all; `task.>`, `sandbox.*`) to URL, signed with
    /// HMAC-SHA256 under the --event-webhook-secret-file (repeatable)
    #[arg(long = "event-webhook", value_name = "URL[ FILTER]")]
    event_webhooks: Vec<String>,
    /// The webhooks' signing secret: a file whose contents (trailing newline removed, at least 16 bytes)
    /// key the X-Tartarus-Signature-256 header
    #[arg(long, value_name = "FILE")]
    event_webhook_secret_file: Option<PathBuf>,
    /// An agent type for tasks (docs/tasks.md): NAME=COMMAND, a shell command run in the task's sandbox
    /// with the prompt on stdin (and in $TARTARUS_PROMPT_FILE), the repository as its working directory
    /// (repeatable)
    #[arg(long = "agent-type", value_name = "NAME=COMMAND")]
    agent_types: Vec<String>,
    /// The author (and committer) of tasks' commits
    #[arg(
        long,
        default_value = "Tartarus <tartarus@localhost>",
        value_name = "NAME <EMAIL>"
    )]
    task_author: String,
    /// The most one agent run may take
    #[arg(long, default_value = "30m", value_name = "DURATION",
          value_parser = |s: &str| tartarus_runtime::units::parse_duration(s).map_err(|e| e.to_string()))]
    task_timeout: std::time::Duration,
    /// Task workers on this server (0: it runs none; other replicas of its database may)
    #[arg(long, default_value_t = 1, value_name = "N")]
    task_workers: usize,
    /// A file holding the GitHub token tasks open pull requests with (projects with a github_repo)
    #[arg(long, value_name = "FILE")]
    github_token_file: Option<PathBuf>,
    /// GitHub's REST API (GitHub Enterprise: https://HOST/api/v3)
    #[arg(long, default_value = "https://api.github.com", value_name = "URL")]
    github_api_url: String,
    /// This server's URL as links (in pull requests) should name it
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
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
    args.event_bus = None;
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
        webhooks: webhooks(&args.event_webhooks, args.event_webhook_secret_file.as_deref())?,
        tasks: tartarus_server::tasks::TaskSettings {
            github: github(args.github_token_file.as_deref(), &args.github_api_url)?,
            public_url: args.public_url.clone(),
            ..task_settings(
                &args.agent_types,
                &args.task_author,
                args.task_timeout,
                args.task_workers,
            )?
        },
        event_bus: args.event_bus,
    })
}

/// `--agent-type NAME=COMMAND`, `--task-author "NAME <EMAIL>"`, `--task-timeout`, `--task-workers`.
fn task_settings(
    agent_types: &[String],
    author: &str,
    timeout: std::time::Duration,
    workers: usize,
) -> anyhow::Result<tartarus_server::tasks::TaskSettings> {
    let mut settings = tartarus_server::tasks::TaskSettings {
        agent_timeout: timeout,
        workers,
        ..Default::default()
    };
    for agent in agent_types {
        let (name, command) = agent
            .split_once('=')
            .filter(|(name, command)| {
                !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !command.trim().is_empty()
            })
            .ok_or_else(|| {
                anyhow::anyhow!("--agent-type {agent:?}: give NAME=COMMAND (NAME of a-z, 0-9, '-', '_')")
            })?;
        settings.agent_types.insert(name.to_string(), command.to_string());
    }
    let (name, email) = author
        .strip_suffix('>')
        .and_then(|a| a.split_once(" <"))
        .filter(|(name, email)| !name.trim().is_empty() && email.contains('@') && !email.contains(['<', '>']))
        .ok_or_else(|| anyhow::anyhow!("--task-author {author:?}: give \"NAME <EMAIL>\""))?;
    settings.author_name = name.trim().to_string();
    settings.author_email = email.to_string();
    anyhow::ensure!(timeout.as_secs() >= 1, "--task-timeout must be at least 1s");
    Ok(settings)
}

/// `--github-token-file` and `--github-api-url`.
fn github(
    token_file: Option<&std::path::Path>,
    api_url: &str,
) -> anyhow::Result<Option<tartarus_server::tasks::github::GithubSettings>> {
    use anyhow::Context as _;
    let Some(path) = token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "{}: the GitHub token file is empty",
        path.display()
    );
    anyhow::ensure!(
        api_url.starts_with("https://")
            || api_url.starts_with("http://127.0.0.1:")
            || api_url.starts_with("http://localhost:"),
        "--github-api-url {api_url}: use https:// (plain http only on loopback)"
    );
    Ok(Some(tartarus_server::tasks::github::GithubSettings {
        api_url: api_url.to_string(),
        token,
    }))
}

/// `--event-webhook URL[ FILTER]` with the secret from `--event-webhook-secret-file`.
fn webhooks(
    hooks: &[String],
    secret_file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<tartarus_events::webhooks::Webhook>> {
    use anyhow::Context as _;
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let path = secret_file.context("--event-webhook needs --event-webhook-secret-file")?;
    let mut secret = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    anyhow::ensure!(
        secret.len() >= 16,
        "{}: a webhook secret needs at least 16 bytes",
        path.display()
    );
    hooks
        .iter()
        .map(|hook| {
            tartarus_events::webhooks::Webhook::parse(hook, &secret)
                .map_err(|e| anyhow::anyhow!("--event-webhook {hook}: {}", e.chain()))
        })
        .collect()
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
