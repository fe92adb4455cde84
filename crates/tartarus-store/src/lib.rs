//! Persistent state of the control plane: API keys (hashed) with their tenant and role, sandboxes,
//! templates, policies, events, the audit log and the verifiable-effects records. Embedded SQLite in the
//! data directory by default; PostgreSQL (`Store::connect("postgres://…")`) for many machines, with the
//! same queries and semantics. Schema changes are numbered migrations under `migrations/sqlite` and
//! `migrations/postgres` (the same numbers), applied on open.
//!
//! Place in the data flow: the server authenticates every request through [`Store::authenticate`] and
//! records mutating calls with [`Store::record_audit`]; `tartarus apikey` manages keys directly.

mod columns;
mod effects;
mod nodes;
mod policies;
mod queue;
#[cfg(test)]
mod schema_tests;
mod tasks;
#[cfg(test)]
mod testing;
mod usage;

pub use columns::UnknownValue;
pub use effects::{
    Claim, ClaimRequest, DatasetRecord, EpisodeRecord, EvaluatorKey, LedgerCommit, LedgerEntry, LedgerState,
    ReceiptRecord, SignalRecord, ToolRecord, TraceRow,
};
pub use nodes::{Leadership, NodeLane, NodeRecord, NodeRegistration, Registered, NODE_TOKEN_PREFIX};
pub use policies::{Event, EventQuery, NewEvent, PolicyRevision};
pub use queue::{retry_backoff_ms, Enqueue, Lane, NewQueueItem, QueueItem, QueueState, Topic};
pub use tasks::{
    NewProject, NewTask, ProjectRecord, TaskEvent, TaskOutcome, TaskRecord, TaskStatus, MAX_TASK_LOG_BYTES,
};
pub use usage::{UsageRecord, UsageSample};

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use sqlx::{Executor, Row};

use columns::{decode, Flag, JsonText, Record};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, across tenants (operators).
    Admin,
    /// Create, use and delete the tenant's own sandboxes.
    User,
    /// Read the tenant's own sandboxes; no mutation.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
        }
    }

    pub fn can_mutate(self) -> bool {
        self != Role::Viewer
    }
}

impl FromStr for Role {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "viewer" => Ok(Role::Viewer),
            other => Err(StoreError::Invalid(format!(
                "unknown role '{other}': use admin, user or viewer"
            ))),
        }
    }
}

/// A stored role.
impl TryFrom<String> for Role {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        s.parse().map_err(|_| UnknownValue {
            value: s,
            expected: "admin, user or viewer",
        })
    }
}

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub at_ms: i64,
    pub tenant: String,
    pub key_id: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// An audit record to write.
#[derive(Debug, Clone, Default)]
pub struct NewAudit<'a> {
    pub tenant: &'a str,
    pub key_id: Option<&'a str>,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub outcome: &'a str,
    pub detail: Option<&'a str>,
}

impl Record for ApiKey {
    const TABLE: &'static str = "api_keys";
    const KEY: &'static [&'static str] = &["id"];
}

impl Record for AuditRecord {
    const TABLE: &'static str = "audit";
    const KEY: &'static [&'static str] = &["id"];
}

impl StoreError {
    /// Whether the database server could not be reached (worth retrying), as opposed to refusing us.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Open { source, .. } => matches!(
                source,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database at {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("state database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state database error")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("no API key with id '{0}'")]
    UnknownKey(String),
    /// A stored row that this version cannot read (an unknown enum value, unreadable JSON): never
    /// replaced by a default.
    #[error("cannot read column {column} of {table} row '{id}'")]
    Corrupt {
        table: &'static str,
        /// The row's key (`a/b` for a composite key).
        id: String,
        column: String,
        #[source]
        source: sqlx::error::BoxDynError,
    },
    #[error("state database migration left {rows} rows referring to rows that do not exist")]
    BrokenReferences { rows: usize },
    #[error("cannot store {what} as JSON")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Prefix of every key secret, so leaked keys are easy to recognise and scan for.
pub const KEY_PREFIX: &str = "tk_";

/// Milliseconds since the Unix epoch: the time unit of every stored timestamp.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    tartarus_hostsys::random_hex(bytes).map_err(|e| StoreError::Invalid(format!("no randomness: {e}")))
}

fn hash_secret(secret: &str) -> Vec<u8> {
    blake3::hash(secret.as_bytes()).as_bytes().to_vec()
}

fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 63
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The database engine that holds the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite in the data directory: one machine.
    Sqlite,
    /// A PostgreSQL server: many control-plane replicas and nodes.
    Postgres,
}

/// The state store: the same queries and semantics over SQLite and PostgreSQL (through sqlx's `Any`
/// driver: every query is written once, with `$N` parameters, which both engines read). Schema changes are
/// numbered migrations with the same numbers for both engines, in `migrations/sqlite` and
/// `migrations/postgres`.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// Percent-encodes what a `sqlite://` URL's path may not hold as is.
fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'%' | b'?' | b'#' | b' ' | 0x80..=0xff => url.push_str(&format!("%{b:02X}")),
            _ => url.push(*b as char),
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// Applies SQLite's pending migrations. Changing a column's constraints in SQLite means rebuilding its
/// table, which needs foreign keys off, and they cannot be switched inside the transaction each migration
/// runs in: the migrations run on a connection of their own with foreign keys off (closed afterwards,
/// never back in the pool), and every reference is checked after them. Through `run_direct`: `run`'s
/// lifetime-generic `Acquire` would make opening a store a future that the server cannot spawn.
async fn migrate_sqlite(pool: &AnyPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?.detach();
    conn.execute("PRAGMA foreign_keys = OFF").await?;
    sqlx::migrate!("./migrations/sqlite")
        .run_direct(&mut conn)
        .await?;
    let broken = sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut conn)
        .await?;
    let _ = sqlx::Connection::close(conn).await;
    match broken.len() {
        0 => Ok(()),
        rows => Err(StoreError::BrokenReferences { rows }),
    }
}

impl Store {
    /// Opens (creating if needed) `DIR/state.db` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("state.db");
        Self::connect_url(&sqlite_url(&path), &path.display().to_string()).await
    }

    /// Connects to `url` — `postgres://…` (PostgreSQL) or `sqlite://PATH` — and applies pending migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_url(url, &redact_url(url)).await
    }

    async fn connect_url(url: &str, shown: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Invalid(format!(
                "database URL {shown}: use postgres://USER@HOST:PORT/DB or sqlite://PATH"
            )));
        };
        let open_err = |source| StoreError::Open {
            path: shown.to_string(),
            source,
        };
        if backend == Backend::Postgres {
            // One attempt first, so an unreachable server is reported at once (the pool would keep
            // retrying for its whole acquire timeout).
            use sqlx::Connection;
            let probe = sqlx::AnyConnection::connect(url).await.map_err(open_err)?;
            let _ = probe.close().await;
        }
        let options = AnyPoolOptions::new().after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // WAL: readers never wait for the writer; NORMAL sync is durable across crashes of the
                    // process (not of the machine) at a fraction of FULL's fsyncs.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                    )
                    .await?;
                }
                Ok(())
            })
        });
        let pool = match backend {
            Backend::Sqlite => options.max_connections(4),
            Backend::Postgres => options.max_connections(16),
        }
        .connect(url)
        .await
        .map_err(open_err)?;
        match backend {
            Backend::Sqlite => migrate_sqlite(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Store { pool, backend })
    }

    /// [`Store::connect`], retrying a database that is not reachable (yet) with exponential backoff
    /// (0.5 s doubling to 10 s) for up to `wait`; each failure is reported once through `on_retry` with the
    /// delay before the next attempt. Errors other than an unreachable server fail at once.
    pub async fn connect_with_retry(
        url: &str,
        wait: std::time::Duration,
        mut on_retry: impl FnMut(&StoreError, std::time::Duration),
    ) -> Result<Store, StoreError> {
        let started = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            match Self::connect(url).await {
                Ok(store) => return Ok(store),
                Err(e) if e.is_unreachable() && started.elapsed() + delay <= wait => {
                    on_retry(&e, delay);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The engine behind this store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Creates a key; returns it and its secret, which is shown once and never stored.
    pub async fn create_key(&self, tenant: &str, role: Role) -> Result<(ApiKey, String), StoreError> {
        if !valid_tenant(tenant) {
            return Err(StoreError::Invalid(format!(
                "invalid tenant '{tenant}': use 1-63 lower-case letters, digits, '-' or '_'"
            )));
        }
        let id = format!("key_{}", random_hex(8)?);
        let secret = format!("{KEY_PREFIX}{}", random_hex(32)?);
        let created_ms = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, role, key_hash, created_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(tenant)
        .bind(role.as_str())
        .bind(hash_secret(&secret))
        .bind(created_ms)
        .execute(&self.pool)
        .await?;
        let key = ApiKey {
            id,
            tenant: tenant.to_string(),
            role,
            created_ms,
            revoked_ms: None,
        };
        Ok((key, secret))
    }

    /// The live (not revoked) key whose secret this is.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, StoreError> {
        if !secret.starts_with(KEY_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT id, tenant, role, created_ms, revoked_ms FROM api_keys WHERE key_hash = $1 AND revoked_ms IS NULL",
        )
        .bind(hash_secret(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Every key, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, role, created_ms, revoked_ms FROM api_keys ORDER BY created_ms, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Revokes a key (idempotent for an already revoked key).
    pub async fn revoke_key(&self, id: &str) -> Result<ApiKey, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT id, tenant, role, created_ms, revoked_ms FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::UnknownKey(id.to_string()))?;
        tx.commit().await?;
        decode(&row)
    }

    pub async fn record_audit(&self, record: &NewAudit<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit (at_ms, tenant, key_id, action, target, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(now_ms())
        .bind(record.tenant)
        .bind(record.key_id)
        .bind(record.action)
        .bind(record.target)
        .bind(record.outcome)
        .bind(record.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Audit records, newest first, optionally for one tenant and since a time.
    pub async fn audit(
        &self,
        tenant: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, tenant, key_id, action, target, outcome, detail FROM audit \
             WHERE ($1 IS NULL OR tenant = $1) AND ($2 IS NULL OR at_ms >= $2) ORDER BY id DESC",
        )
        .bind(tenant)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_keys_authenticate_until_revoked() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let (key, secret) = store.create_key("team-a", Role::User).await.unwrap();
            assert!(secret.starts_with(KEY_PREFIX) && secret.len() == KEY_PREFIX.len() + 64);
            assert_eq!(store.authenticate(&secret).await.unwrap(), Some(key.clone()));
            assert_eq!(store.authenticate("tk_wrong").await.unwrap(), None);
            assert_eq!(store.authenticate("not-even-a-key").await.unwrap(), None);
            let revoked = store.revoke_key(&key.id).await.unwrap();
            assert!(revoked.revoked_ms.is_some());
            assert_eq!(store.authenticate(&secret).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn secrets_are_not_stored() {
        // SQLite: not in the database files (PostgreSQL: not in any column, below).
        let test_store = crate::testing::TestStore::sqlite().await;
        let dir = test_store.dir.as_ref().unwrap();
        let (_key, secret) = test_store.store.create_key("team-a", Role::Admin).await.unwrap();
        test_store.store.pool.close().await;
        for name in ["state.db", "state.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains(&secret[KEY_PREFIX.len()..]),
                    "secret found in {name}"
                );
            }
        }
    }

    /// The server opens its store inside spawned tasks: opening must stay `Send` whatever the lifetimes
    /// (a compile-time check; a borrow held across an `await` of a lifetime-generic sqlx call breaks it).
    #[tokio::test]
    async fn test_opening_a_store_can_be_spawned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let opened = tokio::spawn(async move { Store::open(&path).await.map(|_| ()) });
        opened.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn keys_are_listed_and_unknown_ids_rejected() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.create_key("a", Role::Admin).await.unwrap();
            store.create_key("b", Role::Viewer).await.unwrap();
            let keys = store.list_keys().await.unwrap();
            assert_eq!(
                keys.iter()
                    .map(|k| (k.tenant.as_str(), k.role))
                    .collect::<Vec<_>>(),
                [("a", Role::Admin), ("b", Role::Viewer)]
            );
            assert!(matches!(
                store.revoke_key("key_nope").await,
                Err(StoreError::UnknownKey(_))
            ));
        }
    }

    #[tokio::test]
    async fn bad_tenants_and_roles_are_rejected() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for tenant in ["", "Team A", "x/y", &"a".repeat(64)] {
                assert!(
                    matches!(
                        store.create_key(tenant, Role::User).await,
                        Err(StoreError::Invalid(_))
                    ),
                    "{tenant}"
                );
            }
            assert!("root"
                .parse::<Role>()
                .unwrap_err()
                .to_string()
                .contains("admin, user or viewer"));
            assert!(!Role::Viewer.can_mutate() && Role::User.can_mutate());
        }
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_migrations_are_idempotent() {
        for test_store in crate::testing::stores().await {
            let (_key, secret) = test_store.store.create_key("a", Role::User).await.unwrap();
            let store = test_store.reopen().await;
            assert!(store.authenticate(&secret).await.unwrap().is_some());
            // Only hashes are stored, whatever the engine.
            let rows = sqlx::query("SELECT id, tenant, role, key_hash FROM api_keys")
                .fetch_all(&store.pool)
                .await
                .unwrap();
            for row in rows {
                let hash: Vec<u8> = row.get("key_hash");
                assert_ne!(hash, secret.as_bytes());
                let tenant: String = row.get("tenant");
                assert!(!tenant.contains(&secret[KEY_PREFIX.len()..]));
            }
        }
    }

    #[tokio::test]
    async fn audit_is_filtered_by_tenant_and_time() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let record = |tenant| NewAudit {
                tenant,
                action: "sandbox.create",
                outcome: "ok",
                ..NewAudit::default()
            };
            store.record_audit(&record("a")).await.unwrap();
            store.record_audit(&record("b")).await.unwrap();
            assert_eq!(store.audit(None, None).await.unwrap().len(), 2);
            let only_a = store.audit(Some("a"), None).await.unwrap();
            assert_eq!(only_a.len(), 1);
            assert_eq!(only_a[0].action, "sandbox.create");
            assert!(store
                .audit(None, Some(now_ms() + 60_000))
                .await
                .unwrap()
                .is_empty());
        }
    }

    #[tokio::test]
    async fn test_unknown_role_of_a_stored_key_is_an_error() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let (key, secret) = store.create_key("a", Role::Viewer).await.unwrap();
            test_store
                .execute_unchecked(&format!(
                    "UPDATE api_keys SET role = 'superuser' WHERE id = '{}'",
                    key.id
                ))
                .await;
            crate::testing::assert_corrupt(
                store.authenticate(&secret).await,
                ("api_keys", &key.id, "role"),
                "'superuser'",
            );
        }
    }
}

/// Lifecycle of a sandbox record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    Starting,
    Running,
    Exited,
    Killed,
    Failed,
    Lost,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Starting => "starting",
            SandboxStatus::Running => "running",
            SandboxStatus::Exited => "exited",
            SandboxStatus::Killed => "killed",
            SandboxStatus::Failed => "failed",
            SandboxStatus::Lost => "lost",
        }
    }

    pub fn is_live(self) -> bool {
        matches!(self, SandboxStatus::Starting | SandboxStatus::Running)
    }
}

impl FromStr for SandboxStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "starting" => SandboxStatus::Starting,
            "running" => SandboxStatus::Running,
            "exited" => SandboxStatus::Exited,
            "killed" => SandboxStatus::Killed,
            "failed" => SandboxStatus::Failed,
            "lost" => SandboxStatus::Lost,
            other => {
                return Err(StoreError::Invalid(format!(
                    "unknown status '{other}': use starting, running, exited, killed, failed or lost"
                )))
            }
        })
    }
}

/// A stored status.
impl TryFrom<String> for SandboxStatus {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        s.parse().map_err(|_| UnknownValue {
            value: s,
            expected: "starting, running, exited, killed, failed or lost",
        })
    }
}

/// A sandbox record.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SandboxRecord {
    pub id: String,
    pub tenant: String,
    pub status: SandboxStatus,
    pub template: Option<String>,
    /// The runtime spec (JSON).
    pub spec: String,
    #[sqlx(try_from = "JsonText<std::collections::BTreeMap<String, String>>")]
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub shim_pid: Option<i64>,
    pub dir: String,
    /// Frozen by the cgroup freezer (status stays `running`).
    #[sqlx(try_from = "Flag")]
    pub paused: bool,
    /// Cluster mode: the node that runs it (`None`: this server's machine).
    pub node: Option<String>,
    /// Its id on that node.
    pub remote_id: Option<String>,
    /// Why it was placed there (the scheduler's explanation).
    pub placement: Option<String>,
    /// The isolation lane it runs on (`process`, `gvisor`).
    pub runtime: String,
    /// Why that lane was chosen.
    pub runtime_reason: Option<String>,
    /// Paused to disk: the directory of its sealed snapshot (then `paused` is set and no shim runs).
    pub hibernated_to: Option<String>,
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish<'a> {
    pub status: SandboxStatus,
    pub exit_code: Option<i64>,
    pub reason: &'a str,
}

/// What retention needs of an ended sandbox ([`Store::ended_sandboxes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedSandbox {
    pub id: String,
    pub dir: String,
    /// The node it ran on; `None` for this machine's own.
    pub node: Option<String>,
    pub finished_ms: i64,
}

const SANDBOX_COLUMNS: &str =
    "id, tenant, status, template, spec, labels, created_ms, finished_ms, exit_code, reason, shim_pid, dir, paused, \
     node, remote_id, placement, runtime, runtime_reason, hibernated_to";

/// What happens to a sandbox at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Stop,
    /// Freeze it, kept until resumed or deleted (E2B's auto-pause).
    Pause,
}

impl Expiry {
    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::Stop => "stop",
            Expiry::Pause => "pause",
        }
    }

    /// The stored word; anything but `pause` stops (the safe reading).
    fn parse(word: &str) -> Expiry {
        match word {
            "pause" => Expiry::Pause,
            _ => Expiry::Stop,
        }
    }
}

impl Record for SandboxRecord {
    const TABLE: &'static str = "sandboxes";
    const KEY: &'static [&'static str] = &["id"];
}

impl Store {
    /// Inserts a new sandbox in status `starting`.
    pub async fn insert_sandbox(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&record.labels).map_err(|source| StoreError::Encode {
            what: "sandbox labels",
            source,
        })?;
        sqlx::query(
            "INSERT INTO sandboxes (id, tenant, status, template, spec, labels, created_ms, dir, node, remote_id, \
             placement, runtime, runtime_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&record.id)
        .bind(&record.tenant)
        .bind(record.status.as_str())
        .bind(&record.template)
        .bind(&record.spec)
        .bind(labels)
        .bind(record.created_ms)
        .bind(&record.dir)
        .bind(&record.node)
        .bind(&record.remote_id)
        .bind(&record.placement)
        .bind(&record.runtime)
        .bind(&record.runtime_reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a starting sandbox running under the shim `shim_pid`.
    pub async fn mark_running(&self, id: &str, shim_pid: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET status = 'running', shim_pid = $1 WHERE id = $2 AND status = 'starting'",
        )
        .bind(shim_pid)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A running sandbox was paused to disk: its snapshot is sealed in `dir` and its shim has gone.
    pub async fn set_hibernated(&self, id: &str, dir: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET paused = 1, hibernated_to = $1, shim_pid = NULL \
             WHERE id = $2 AND status = 'running'",
        )
        .bind(dir)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A sandbox paused to disk runs again, under the shim `shim_pid`. False when it was not paused to
    /// disk (another resume got there first, or it was deleted).
    pub async fn mark_resumed(&self, id: &str, shim_pid: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET paused = 0, hibernated_to = NULL, shim_pid = $1 \
             WHERE id = $2 AND status = 'running' AND hibernated_to IS NOT NULL",
        )
        .bind(shim_pid)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets or clears the paused flag of a running sandbox.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET paused = $1 WHERE id = $2 AND status = 'running'")
            .bind(paused as i64)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets (or moves) the time a sandbox is stopped (or, with [`Expiry::Pause`], paused) at unless moved
    /// again.
    pub async fn set_deadline(&self, id: &str, deadline_ms: i64, expiry: Expiry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sandbox_deadlines (id, deadline_ms, expiry) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET deadline_ms = excluded.deadline_ms, expiry = excluded.expiry",
        )
        .bind(id)
        .bind(deadline_ms)
        .bind(expiry.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a sandbox's deadline (it then lives until stopped, or its spec's timeout).
    pub async fn clear_deadline(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sandbox_deadlines WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A sandbox's deadline and what happens then, if it has one.
    pub async fn deadline(&self, id: &str) -> Result<Option<(i64, Expiry)>, StoreError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT deadline_ms, expiry FROM sandbox_deadlines WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(ms, expiry)| (ms, Expiry::parse(&expiry))))
    }

    /// Live sandboxes whose deadline is at or before `now_ms`, at most `limit`, earliest first, with what
    /// happens to each.
    pub async fn due_sandboxes(&self, now_ms: i64, limit: i64) -> Result<Vec<(String, Expiry)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT d.id, d.expiry FROM sandbox_deadlines d JOIN sandboxes s ON s.id = d.id \
             WHERE d.deadline_ms <= $1 AND s.status IN ('starting', 'running') \
             ORDER BY d.deadline_ms, d.id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, e)| (id, Expiry::parse(&e))).collect())
    }

    /// Records how a live sandbox ended; a sandbox that already ended keeps its first outcome.
    pub async fn finish_sandbox(&self, id: &str, finish: &Finish<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sandboxes SET status = $1, exit_code = $2, reason = $3, finished_ms = $4 \
             WHERE id = $5 AND status IN ('starting', 'running')",
        )
        .bind(finish.status.as_str())
        .bind(finish.exit_code)
        .bind(finish.reason)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One sandbox; with `tenant`, only if it belongs to that tenant.
    pub async fn sandbox(&self, id: &str, tenant: Option<&str>) -> Result<Option<SandboxRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1 AND ($2 IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Sandboxes, newest first, filtered by tenant and status when given.
    pub async fn sandboxes(
        &self,
        tenant: Option<&str>,
        status: Option<SandboxStatus>,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE ($1 IS NULL OR tenant = $1) \
             AND ($2 IS NULL OR status = $2) ORDER BY created_ms DESC, id"
        ))
        .bind(tenant)
        .bind(status.map(|s| s.as_str()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Ended sandboxes whose end is after `after` (by end time, then id) and at most `until_ms`, oldest
    /// first, at most `limit`: what retention sweeps, a page at a time, without reading whole records.
    pub async fn ended_sandboxes(
        &self,
        after: Option<(i64, &str)>,
        until_ms: i64,
        limit: u32,
    ) -> Result<Vec<EndedSandbox>, StoreError> {
        let (after_ms, after_id) = after.unwrap_or((i64::MIN, ""));
        let rows = sqlx::query(
            "SELECT id, dir, node, finished_ms FROM sandboxes \
             WHERE finished_ms IS NOT NULL AND finished_ms <= $1 \
             AND (finished_ms > $2 OR (finished_ms = $2 AND id > $3)) \
             AND status IN ('exited', 'killed', 'failed', 'lost') \
             ORDER BY finished_ms, id LIMIT $4",
        )
        .bind(until_ms)
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EndedSandbox {
                    id: row.try_get("id")?,
                    dir: row.try_get("dir")?,
                    node: row.try_get("node")?,
                    finished_ms: row.try_get("finished_ms")?,
                })
            })
            .collect()
    }

    /// Live sandboxes of all tenants.
    pub async fn live_count_all(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sandboxes WHERE status IN ('starting', 'running')")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Live sandboxes of a tenant (for quotas).
    pub async fn live_count(&self, tenant: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE tenant = $1 AND status IN ('starting', 'running')",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }
}

#[cfg(test)]
mod sandbox_tests {
    use super::*;

    fn record(id: &str, tenant: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            tenant: tenant.into(),
            status: SandboxStatus::Starting,
            template: None,
            spec: "{}".into(),
            labels: [("team".to_string(), "x".to_string())].into(),
            created_ms: now_ms(),
            finished_ms: None,
            exit_code: None,
            reason: None,
            shim_pid: None,
            dir: format!("/tmp/{id}"),
            paused: false,
            node: None,
            remote_id: None,
            placement: None,
            runtime: "process".into(),
            runtime_reason: None,
            hibernated_to: None,
        }
    }

    #[tokio::test]
    async fn sandbox_lifecycle_and_tenant_scoping() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.insert_sandbox(&record("sb_1", "a")).await.unwrap();
            store.insert_sandbox(&record("sb_2", "b")).await.unwrap();
            store.mark_running("sb_1", 42).await.unwrap();
            let got = store.sandbox("sb_1", Some("a")).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.shim_pid, got.labels["team"].as_str()),
                (SandboxStatus::Running, Some(42), "x")
            );
            assert!(
                store.sandbox("sb_1", Some("b")).await.unwrap().is_none(),
                "other tenants must not see it"
            );
            assert_eq!(store.sandboxes(Some("a"), None).await.unwrap().len(), 1);
            assert_eq!(
                store
                    .sandboxes(None, Some(SandboxStatus::Running))
                    .await
                    .unwrap()
                    .len(),
                1
            );
            assert_eq!(store.live_count("a").await.unwrap(), 1);
            let finish = Finish {
                status: SandboxStatus::Exited,
                exit_code: Some(3),
                reason: "exited",
            };
            store.finish_sandbox("sb_1", &finish).await.unwrap();
            let lost = Finish {
                status: SandboxStatus::Lost,
                exit_code: None,
                reason: "late",
            };
            store.finish_sandbox("sb_1", &lost).await.unwrap();
            let got = store.sandbox("sb_1", None).await.unwrap().unwrap();
            assert_eq!(
                (got.status, got.exit_code),
                (SandboxStatus::Exited, Some(3)),
                "first outcome wins"
            );
            assert_eq!(store.live_count("a").await.unwrap(), 0);
        }
    }
    #[tokio::test]
    async fn test_ended_sandboxes_come_a_page_at_a_time_oldest_first_and_never_live_ones() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for id in ["sb_1", "sb_2", "sb_3", "sb_4", "sb_5"] {
                store.insert_sandbox(&record(id, "a")).await.unwrap();
                store.mark_running(id, 42).await.unwrap();
            }
            let exited = Finish {
                status: SandboxStatus::Exited,
                exit_code: Some(0),
                reason: "exited",
            };
            for id in ["sb_4", "sb_2", "sb_1", "sb_5"] {
                store.finish_sandbox(id, &exited).await.unwrap();
            }
            let now = now_ms();
            let mut seen = Vec::new();
            let mut after: Option<(i64, String)> = None;
            loop {
                let page = store
                    .ended_sandboxes(after.as_ref().map(|(ms, id)| (*ms, id.as_str())), now, 2)
                    .await
                    .unwrap();
                assert!(page.len() <= 2, "{page:?}");
                let Some(last) = page.last() else { break };
                after = Some((last.finished_ms, last.id.clone()));
                seen.extend(page.into_iter().map(|e| e.id));
            }
            let mut sorted = seen.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                ["sb_1", "sb_2", "sb_4", "sb_5"],
                "every ended one once, no live one"
            );
            let before_all = store.ended_sandboxes(None, 0, 10).await.unwrap();
            assert!(
                before_all.is_empty(),
                "nothing ended before the cutoff: {before_all:?}"
            );
        }
    }

    #[tokio::test]
    async fn test_unreadable_sandbox_columns_are_errors_naming_the_row_not_defaults() {
        use crate::testing::assert_corrupt;
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for id in ["sb_status", "sb_labels", "sb_paused"] {
                store.insert_sandbox(&record(id, "a")).await.unwrap();
            }
            test_store
                .execute_unchecked(
                    "UPDATE sandboxes SET status = 'hibernating' WHERE id = 'sb_status'; \
                     UPDATE sandboxes SET labels = '{\"team\":' WHERE id = 'sb_labels'; \
                     UPDATE sandboxes SET paused = 7 WHERE id = 'sb_paused'",
                )
                .await;
            assert_corrupt(
                store.sandbox("sb_status", None).await,
                ("sandboxes", "sb_status", "status"),
                "'hibernating'",
            );
            assert_corrupt(
                store.sandbox("sb_labels", None).await,
                ("sandboxes", "sb_labels", "labels"),
                "EOF",
            );
            assert_corrupt(
                store.sandbox("sb_paused", None).await,
                ("sandboxes", "sb_paused", "paused"),
                "'7'",
            );
            assert!(
                store.sandboxes(Some("a"), None).await.is_err(),
                "a listing must not drop or default a corrupt row"
            );
        }
    }
}

/// A template as stored. The store keeps its definition as JSON text; the server validates and reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TemplateRecord {
    pub id: String,
    /// The tenant that owns it; `None` for a template every tenant sees.
    pub tenant: Option<String>,
    /// The template's canonical JSON.
    pub definition: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What [`Store::put_template`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplatePut {
    Created,
    Replaced,
}

impl Record for TemplateRecord {
    const TABLE: &'static str = "templates";
    const KEY: &'static [&'static str] = &["id"];
}

/// The columns of a [`TemplateRecord`]; the stored owner `''` (shared) reads as a NULL tenant.
const TEMPLATE_COLUMNS: &str = "id, NULLIF(tenant, '') AS tenant, definition, created_ms, updated_ms";

/// A template's owner as stored: the tenant, or `''` for a shared template.
fn template_owner(tenant: Option<&str>) -> &str {
    tenant.unwrap_or("")
}

impl Store {
    /// Inserts `tenant`'s template `id` (`None`: a shared one), or replaces its definition, keeping when it
    /// was created. Ids are per owner: another tenant's template with the same id is neither touched nor
    /// told apart from a free id.
    pub async fn put_template(
        &self,
        id: &str,
        tenant: Option<&str>,
        definition: &str,
    ) -> Result<TemplatePut, StoreError> {
        if let Some(t) = tenant.filter(|t| !valid_tenant(t)) {
            return Err(StoreError::Invalid(format!(
                "invalid tenant '{t}': use 1-63 lower-case letters, digits, '-' or '_'"
            )));
        }
        if serde_json::from_str::<serde_json::Value>(definition).is_err() {
            return Err(StoreError::Invalid(format!(
                "the definition of template '{id}' is not JSON"
            )));
        }
        let now = now_ms();
        let owner = template_owner(tenant);
        let inserted = sqlx::query(
            "INSERT INTO templates (tenant, id, definition, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (tenant, id) DO NOTHING",
        )
        .bind(owner)
        .bind(id)
        .bind(definition)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() > 0 {
            return Ok(TemplatePut::Created);
        }
        sqlx::query("UPDATE templates SET definition = $1, updated_ms = $2 WHERE tenant = $3 AND id = $4")
            .bind(definition)
            .bind(now)
            .bind(owner)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(TemplatePut::Replaced)
    }

    /// The template `id` as `tenant` sees it: its own, else a shared one. `None`: the shared one.
    pub async fn get_template(
        &self,
        id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE id = $1 AND (templates.tenant = '' OR templates.tenant = $2) \
             ORDER BY templates.tenant DESC LIMIT 1"
        ))
        .bind(id)
        .bind(template_owner(tenant))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Every template with this id, the shared one first, then by tenant (for admins, who see them all).
    pub async fn templates_named(&self, id: &str) -> Result<Vec<TemplateRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE id = $1 ORDER BY templates.tenant"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Templates by id (then owner, shared first); with `tenant`, those that tenant sees (its own and
    /// shared ones).
    pub async fn list_templates(&self, tenant: Option<&str>) -> Result<Vec<TemplateRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates \
             WHERE $1 IS NULL OR templates.tenant = '' OR templates.tenant = $1 ORDER BY id, templates.tenant"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Deletes `tenant`'s template `id` (`None`: the shared one); returns whether it existed.
    pub async fn delete_template(&self, id: &str, tenant: Option<&str>) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM templates WHERE tenant = $1 AND id = $2")
            .bind(template_owner(tenant))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[tokio::test]
    async fn test_templates_are_put_replaced_listed_and_deleted() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let put = |id: &'static str, tenant: Option<&'static str>, definition: &'static str| {
                let store = store.clone();
                async move { store.put_template(id, tenant, definition).await.unwrap() }
            };
            assert_eq!(put("py", None, r#"{"id":"py"}"#).await, TemplatePut::Created);
            assert_eq!(
                put("r", Some("team-a"), r#"{"id":"r"}"#).await,
                TemplatePut::Created
            );
            let first = store.get_template("py", None).await.unwrap().unwrap();
            assert_eq!(
                put("py", None, r#"{"id":"py","v":2}"#).await,
                TemplatePut::Replaced
            );
            let replaced = store.get_template("py", None).await.unwrap().unwrap();
            assert_eq!(replaced.definition, r#"{"id":"py","v":2}"#);
            assert_eq!(replaced.tenant, None);
            assert_eq!(replaced.created_ms, first.created_ms);
            assert!(replaced.updated_ms >= first.updated_ms);
            // Ids are per tenant: team-b's "r" is its own, created as from a free id; team-a's is untouched.
            assert_eq!(
                put("r", Some("team-b"), r#"{"id":"r","b":1}"#).await,
                TemplatePut::Created
            );
            assert_eq!(
                put("r", Some("team-a"), r#"{"id":"r","v":2}"#).await,
                TemplatePut::Replaced
            );
            let a = store.get_template("r", Some("team-a")).await.unwrap().unwrap();
            assert_eq!(
                (a.tenant.as_deref(), a.definition.as_str()),
                (Some("team-a"), r#"{"id":"r","v":2}"#)
            );
            let b = store.get_template("r", Some("team-b")).await.unwrap().unwrap();
            assert_eq!(
                (b.tenant.as_deref(), b.definition.as_str()),
                (Some("team-b"), r#"{"id":"r","b":1}"#)
            );
            let ids = |list: Vec<TemplateRecord>| {
                list.into_iter()
                    .map(|t| format!("{}@{}", t.id, t.tenant.unwrap_or_default()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                ids(store.list_templates(None).await.unwrap()),
                ["py@", "r@team-a", "r@team-b"]
            );
            assert_eq!(
                ids(store.list_templates(Some("team-a")).await.unwrap()),
                ["py@", "r@team-a"]
            );
            assert_eq!(
                ids(store.list_templates(Some("team-c")).await.unwrap()),
                ["py@"],
                "another tenant's template is hidden"
            );
            assert!(store.get_template("r", Some("team-c")).await.unwrap().is_none());
            assert!(
                store.get_template("r", None).await.unwrap().is_none(),
                "no shared 'r'"
            );
            assert!(store.get_template("py", Some("team-c")).await.unwrap().is_some());
            // A tenant's own template comes before a shared one with its id.
            assert_eq!(
                put("r", None, r#"{"id":"r","shared":1}"#).await,
                TemplatePut::Created
            );
            let own = store.get_template("r", Some("team-a")).await.unwrap().unwrap();
            assert_eq!(own.tenant.as_deref(), Some("team-a"));
            let shared = store.get_template("r", Some("team-c")).await.unwrap().unwrap();
            assert_eq!(shared.tenant, None);
            assert_eq!(
                ids(store.templates_named("r").await.unwrap()),
                ["r@", "r@team-a", "r@team-b"]
            );
            assert!(store.delete_template("r", Some("team-a")).await.unwrap());
            assert!(!store.delete_template("r", Some("team-a")).await.unwrap());
            assert_eq!(
                store
                    .get_template("r", Some("team-a"))
                    .await
                    .unwrap()
                    .unwrap()
                    .tenant,
                None,
                "the shared one remains"
            );
            assert!(store.get_template("r", Some("team-b")).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn test_put_template_refuses_bad_tenants_and_non_json() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            assert!(matches!(
                store.put_template("a", Some("Team A"), "{}").await,
                Err(StoreError::Invalid(_))
            ));
            assert!(matches!(
                store.put_template("a", None, "id: a").await,
                Err(StoreError::Invalid(_))
            ));
            assert!(store.list_templates(None).await.unwrap().is_empty());
        }
    }
}
