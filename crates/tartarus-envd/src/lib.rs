//! `tartarus-envd`: an E2B-compatible in-sandbox daemon ("envd").
//!
//! The Tartarus server starts it as a sandbox's main command (`tartarus envd --listen
//! 127.0.0.1:49983`) and proxies the E2B SDK's in-sandbox requests to it unchanged, so the unmodified
//! E2B SDKs (checked against the Python SDK `e2b==2.45.1`) can run commands and use files in a
//! Tartarus sandbox. It claims envd version [`ENVD_VERSION`]; the server reports that as `envdVersion`
//! and the SDK gates its features on it.
//!
//! # Protocol
//! - Connect RPC over HTTP/1.1 with the JSON codec, which is the one the SDK sends: unary calls are
//!   `POST /<service>/<method>` with `application/json`; server streams use `application/connect+json`
//!   (5-byte envelopes, an end-of-stream frame with flag `0x02` carrying `{}` or `{"error": ...}`).
//!   Errors of unary calls carry the Connect HTTP status (not_found → 404, already_exists → 409,
//!   invalid_argument → 400, ...). The binary protobuf codec and compressed messages are refused
//!   (415 / unimplemented). Streams send `keepalive` events at the interval of the request's
//!   `Keepalive-Ping-Interval` header (seconds).
//! - `process.Process`: Start, Connect, List, SendInput, SendSignal, Update (PTY resize), CloseStdin.
//!   StreamInput (client streaming, unused by the Python SDK) answers unimplemented.
//! - `filesystem.Filesystem`: Stat, MakeDir, Move, ListDir, Remove, WatchDir and the polling
//!   CreateWatcher / GetWatcherEvents / RemoveWatcher (inotify).
//! - Plain HTTP: `GET /health` (204), `GET /files?path=` (download, streamed, gzip-encoded when the
//!   request accepts gzip), `POST /files?path=`
//!   (`multipart/form-data` with one or more `file` parts, or `application/octet-stream` with optional
//!   `Content-Encoding: gzip`, streamed to disk; `X-Metadata-<key>` headers are stored as `user.e2b.<key>`
//!   extended attributes), `GET /envs`.
//!
//! # Users
//! Everything runs as the daemon's own user (in Tartarus: uid 1000 `user`). The SDK's user selection
//! (`Authorization: Basic base64("name:")`, the `username` query parameter) is ignored: a request for
//! `root` runs as the daemon's user too. Auth (`X-Access-Token`) is the server's job and is ignored
//! here. Relative paths resolve against the daemon's `HOME`.
//!
//! # Limits (hostile input is expected)
//! At most [`MAX_PROCESSES`] live processes with at most [`MAX_ATTACHED_STREAMS`] streams each; a
//! replay buffer of [`MAX_REPLAY_BYTES`] per process (oldest output dropped) that a late `Connect`
//! receives first, also for the last [`EXITED_KEPT`] processes that exited in the last
//! [`EXITED_KEPT_FOR`] (then with their end event); at most [`MAX_WATCHERS`] watchers with at most [`MAX_WATCHER_EVENTS`] queued
//! events each; at most [`MAX_LIST_ENTRIES`] entries per listing; unary request bodies of at most
//! [`MAX_UNARY_BODY`]. Nothing the user started is timed out. Malformed JSON or envelopes are
//! invalid_argument errors, never a crash. Output is backpressured: a stream that stops reading
//! slows the process's output once its queue is full (as in E2B's envd).
//!
//! # Not supported
//! Running as another user, StreamInput, the binary protobuf codec, signed download URLs (the
//! `signature` query parameters are the server's to check), and refusing network mounts for
//! watching (every directory may be watched, so `allow_network_mounts` changes nothing). Metadata
//! keys arrive lowercased (HTTP header names are case-insensitive). Orphaned grandchildren are
//! reaped by the sandbox's own init (pid 1 of a Tartarus sandbox), not by envd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub mod connect;
mod files;
mod fs;
mod process;
mod rpc;
mod users;
mod watch;

/// The envd version this daemon claims: every feature `e2b/envd/versions.py` gates up to 0.6.4 is
/// implemented (stdin control, octet-stream and gzip upload, file metadata, entry info in watch
/// events, the network-mounts watch flag).
pub const ENVD_VERSION: &str = "0.6.4";
/// Live (not yet exited) processes tracked at once; more Start calls fail with resource_exhausted.
pub const MAX_PROCESSES: usize = 512;
/// Output kept per process for a late Connect (oldest chunks dropped beyond it).
pub const MAX_REPLAY_BYTES: usize = 1 << 20;
/// Exited processes whose output and exit status a Connect still gets, for [`EXITED_KEPT_FOR`].
pub const EXITED_KEPT: usize = 16;
/// How long an exited process can still be connected to.
pub const EXITED_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// Streams attached to one process at once (Start plus Connects).
pub const MAX_ATTACHED_STREAMS: usize = 64;
/// Entries one ListDir answers with at most (a deep listing of a huge tree is refused).
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Filesystem watchers (streaming and polling) at once.
pub const MAX_WATCHERS: usize = 64;
/// Events a polling watcher queues between two GetWatcherEvents calls (older ones dropped).
pub const MAX_WATCHER_EVENTS: usize = 4096;
/// Largest unary (and stream-request) body.
pub const MAX_UNARY_BODY: usize = 16 << 20;

/// What the daemon needs from its environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// The user's home: default cwd of processes and base of relative paths.
    pub home: PathBuf,
}

impl Config {
    /// `HOME`, or the home of the current uid in /etc/passwd, or `/`.
    pub fn from_env() -> Config {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| users::home_of(rustix::process::getuid().as_raw()))
            .unwrap_or_else(|| PathBuf::from("/"));
        Config { home }
    }
}

pub(crate) struct AppState {
    pub config: Config,
    pub processes: process::Table,
    pub watchers: watch::Watchers,
}

pub(crate) type Shared = Arc<AppState>;

/// The daemon's routes.
pub fn router(config: Config) -> Router {
    let state: Shared = Arc::new(AppState {
        config,
        processes: process::Table::default(),
        watchers: watch::Watchers::default(),
    });
    Router::new()
        .route("/health", get(|| async { axum::http::StatusCode::NO_CONTENT }))
        .route("/envs", get(files::envs))
        .route("/files", get(files::download).post(files::upload))
        .route("/{service}/{method}", post(rpc::dispatch))
        // Uploads stream to disk; unary bodies are bounded where they are read.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A write to the stdin pipe of a process that has closed it must be an EPIPE error, not the death of
/// the daemon: the `tartarus` binary has no Rust runtime start-up, which would otherwise ignore
/// SIGPIPE. Started processes get the default disposition back (see `process::start`).
fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Serves on a bound listener until the process ends. `TCP_NODELAY` on every connection: requests and
/// stream frames are small writes, which Nagle's algorithm would hold back for the peer's delayed ACK
/// (40 ms a call).
pub async fn serve(listener: tokio::net::TcpListener, config: Config) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, router(config)).await
}

/// The `tartarus envd` entry point: binds `listen` and serves until killed.
pub fn run(listen: SocketAddr) -> ExitCode {
    ignore_sigpipe();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tartarus envd: cannot start the runtime: {e}");
            return ExitCode::from(125);
        }
    };
    let config = Config::from_env();
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tartarus envd: cannot listen on {listen}: {e}");
                return ExitCode::from(125);
            }
        };
        eprintln!("tartarus envd {ENVD_VERSION} listening on {listen}");
        match serve(listener, config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tartarus envd: {e}");
                ExitCode::from(125)
            }
        }
    })
}

/// The code interpreter's server (`e2b-code-interpreter`'s `run_code`: Jupyter kernels behind port
/// 49999), run with the system's `python3` inside `code-interpreter-v1` sandboxes; its docstring says
/// what it speaks and bounds.
pub const CODE_INTERPRETER_SERVER: &str = include_str!("code_interpreter/server.py");
