//! Verifiable effects in the state store: declared tools, the idempotency ledger, receipts, trace records,
//! episodes, evaluator keys, signals and datasets.
//!
//! The ledger is the part with rules. A call with an idempotency key first *claims* `(tenant, key)`:
//! the first claim registers it and holds a lease; a claim with the same request hash finds it running
//! (wait), committed (replay the stored response) or with an expired lease (take it over: the epoch, a
//! fencing token, goes up); a claim with another request hash is a divergence. Each transition is one
//! conditional SQL statement, so concurrent claims cannot both win, and a commit or abort from a holder
//! whose lease was taken over matches no row and is rejected.

use serde::Serialize;
use sqlx::Row;

use crate::columns::{decode, Record, UnknownValue};
use crate::{Store, StoreError};

/// A declared tool (its definition is the server's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ToolRecord {
    pub name: String,
    pub definition: String,
    pub created_ms: i64,
}

/// Where an idempotency key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerState {
    /// Claimed: its holder is calling the tool under a lease.
    Registered,
    /// Answered: its response is stored and replayed.
    Committed,
}

/// A stored ledger state.
impl TryFrom<String> for LedgerState {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        match s.as_str() {
            "registered" => Ok(LedgerState::Registered),
            "committed" => Ok(LedgerState::Committed),
            _ => Err(UnknownValue {
                value: s,
                expected: "registered or committed",
            }),
        }
    }
}

/// A ledger row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LedgerEntry {
    pub tenant: String,
    pub key: String,
    pub tool: String,
    pub request_hash: String,
    pub state: LedgerState,
    pub epoch: i64,
    pub holder: String,
    pub lease_expires_ms: i64,
    pub response_code: Option<i64>,
    pub response_type: Option<String>,
    pub response_body: Option<Vec<u8>>,
    pub receipt: Option<String>,
    pub divergences: i64,
}

/// What a claim on an idempotency key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the lease with this epoch: invoke the tool, then commit or abort with it.
    Acquired { epoch: i64 },
    /// Committed earlier with the same request: return its stored response.
    Replay(LedgerEntry),
    /// The key was used with another tool or request body (now counted in `divergences`).
    Divergent(LedgerEntry),
    /// Another holder's lease is live: wait and claim again.
    Busy(LedgerEntry),
}

/// A claim on an idempotency key.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub tenant: &'a str,
    pub key: &'a str,
    pub tool: &'a str,
    pub request_hash: &'a str,
    pub holder: &'a str,
    pub now_ms: i64,
    pub lease_ms: i64,
}

/// The stored answer of a committed call.
#[derive(Debug, Clone)]
pub struct LedgerCommit<'a> {
    pub response_code: i64,
    pub response_type: Option<&'a str>,
    pub response_body: &'a [u8],
    pub receipt: &'a str,
    pub now_ms: i64,
}

/// A stored receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ReceiptRecord {
    pub id: String,
    pub tenant: String,
    pub sandbox: String,
    pub tool: String,
    pub status: String,
    pub idempotency_key: Option<String>,
    pub created_ms: i64,
    #[serde(skip)]
    pub envelope: Vec<u8>,
}

/// A stored trace record.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TraceRow {
    pub sandbox: String,
    pub seq: i64,
    pub kind: String,
    pub at_ms: i64,
    pub record: Vec<u8>,
}

/// A sealed episode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EpisodeRecord {
    pub id: String,
    pub sandbox: String,
    pub tenant: String,
    pub created_ms: i64,
    #[serde(skip)]
    pub envelope: Vec<u8>,
    /// JSON object of queryable fields.
    pub facts: String,
}

/// A stored signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SignalRecord {
    pub id: String,
    pub episode: String,
    pub tenant: String,
    pub evaluator: String,
    pub name: String,
    pub score: Option<i64>,
    pub label: Option<String>,
    pub at_ms: i64,
    #[serde(skip)]
    pub envelope: Vec<u8>,
}

/// An evaluator's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EvaluatorKey {
    pub name: String,
    pub kid: String,
    pub public_key: String,
    pub created_ms: i64,
}

/// A built dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DatasetRecord {
    pub id: String,
    pub tenant: String,
    pub query: String,
    pub episodes: i64,
    pub created_ms: i64,
}

const LEDGER_COLUMNS: &str = "tenant, key, tool, request_hash, state, epoch, holder, lease_expires_ms, \
    response_code, response_type, response_body, receipt, divergences";

impl Record for ToolRecord {
    const TABLE: &'static str = "tools";
    const KEY: &'static [&'static str] = &["name"];
}

impl Record for LedgerEntry {
    const TABLE: &'static str = "ledger";
    const KEY: &'static [&'static str] = &["tenant", "key"];
}

impl Record for ReceiptRecord {
    const TABLE: &'static str = "receipts";
    const KEY: &'static [&'static str] = &["id"];
}

impl Record for TraceRow {
    const TABLE: &'static str = "trace_records";
    const KEY: &'static [&'static str] = &["sandbox", "seq"];
}

impl Record for EpisodeRecord {
    const TABLE: &'static str = "episodes";
    const KEY: &'static [&'static str] = &["id"];
}

impl Record for SignalRecord {
    const TABLE: &'static str = "signals";
    const KEY: &'static [&'static str] = &["id"];
}

impl Record for EvaluatorKey {
    const TABLE: &'static str = "evaluators";
    const KEY: &'static [&'static str] = &["name", "kid"];
}

impl Record for DatasetRecord {
    const TABLE: &'static str = "datasets";
    const KEY: &'static [&'static str] = &["tenant", "id"];
}

impl Store {
    /// Declares or replaces a tool.
    pub async fn put_tool(&self, name: &str, definition: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tools (name, definition, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, created_ms = excluded.created_ms",
        )
        .bind(name)
        .bind(definition)
        .bind(crate::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn tool(&self, name: &str) -> Result<Option<ToolRecord>, StoreError> {
        let row = sqlx::query("SELECT name, definition, created_ms FROM tools WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    pub async fn tools(&self) -> Result<Vec<ToolRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, definition, created_ms FROM tools ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn delete_tool(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM tools WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Claims an idempotency key (see the module docs). Each step is one conditional statement; when a
    /// step loses a race it looks again, so the answer reflects the row as another claimant left it.
    pub async fn ledger_claim(&self, claim: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let expires = claim.now_ms.saturating_add(claim.lease_ms);
        for _ in 0..8 {
            let inserted = sqlx::query(
                "INSERT INTO ledger (tenant, key, tool, request_hash, state, epoch, holder, lease_expires_ms, \
                 created_ms) VALUES ($1, $2, $3, $4, 'registered', 1, $5, $6, $7) ON CONFLICT (tenant, key) DO NOTHING",
            )
            .bind(claim.tenant)
            .bind(claim.key)
            .bind(claim.tool)
            .bind(claim.request_hash)
            .bind(claim.holder)
            .bind(expires)
            .bind(claim.now_ms)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Claim::Acquired { epoch: 1 });
            }
            let Some(entry) = self.ledger_entry(claim.tenant, claim.key).await? else {
                continue; // aborted meanwhile: register again
            };
            if entry.tool != claim.tool || entry.request_hash != claim.request_hash {
                sqlx::query("UPDATE ledger SET divergences = divergences + 1 WHERE tenant = $1 AND key = $2")
                    .bind(claim.tenant)
                    .bind(claim.key)
                    .execute(&self.pool)
                    .await?;
                return Ok(Claim::Divergent(LedgerEntry {
                    divergences: entry.divergences + 1,
                    ..entry
                }));
            }
            if entry.state == LedgerState::Committed {
                return Ok(Claim::Replay(entry));
            }
            if entry.lease_expires_ms > claim.now_ms {
                return Ok(Claim::Busy(entry));
            }
            let taken = sqlx::query(
                "UPDATE ledger SET epoch = epoch + 1, holder = $1, lease_expires_ms = $2 \
                 WHERE tenant = $3 AND key = $4 AND state = 'registered' AND epoch = $5 AND lease_expires_ms <= $6",
            )
            .bind(claim.holder)
            .bind(expires)
            .bind(claim.tenant)
            .bind(claim.key)
            .bind(entry.epoch)
            .bind(claim.now_ms)
            .execute(&self.pool)
            .await?;
            if taken.rows_affected() == 1 {
                return Ok(Claim::Acquired {
                    epoch: entry.epoch + 1,
                });
            }
        }
        Err(StoreError::Invalid(format!(
            "idempotency key '{}' is contended too heavily; retry",
            claim.key
        )))
    }

    /// Records the answer of a call; false when the caller no longer holds the lease (it was taken over,
    /// so its result is rejected) or the key was already committed.
    pub async fn ledger_commit(
        &self,
        tenant: &str,
        key: &str,
        epoch: i64,
        commit: &LedgerCommit<'_>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE ledger SET state = 'committed', committed_ms = $1, response_code = $2, response_type = $3, \
             response_body = $4, receipt = $5 WHERE tenant = $6 AND key = $7 AND epoch = $8 AND state = 'registered'",
        )
        .bind(commit.now_ms)
        .bind(commit.response_code)
        .bind(commit.response_type)
        .bind(commit.response_body)
        .bind(commit.receipt)
        .bind(tenant)
        .bind(key)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a registration up (the tool gave no answer), so that a retry runs the call again; false
    /// when the caller no longer holds it.
    pub async fn ledger_abort(&self, tenant: &str, key: &str, epoch: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "DELETE FROM ledger WHERE tenant = $1 AND key = $2 AND epoch = $3 AND state = 'registered'",
        )
        .bind(tenant)
        .bind(key)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn ledger_entry(&self, tenant: &str, key: &str) -> Result<Option<LedgerEntry>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE tenant = $1 AND key = $2"
        ))
        .bind(tenant)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    pub async fn insert_receipt(&self, receipt: &ReceiptRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO receipts (id, tenant, sandbox, tool, status, idempotency_key, created_ms, envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&receipt.id)
        .bind(&receipt.tenant)
        .bind(&receipt.sandbox)
        .bind(&receipt.tool)
        .bind(&receipt.status)
        .bind(&receipt.idempotency_key)
        .bind(receipt.created_ms)
        .bind(&receipt.envelope)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn receipt(&self, id: &str, tenant: Option<&str>) -> Result<Option<ReceiptRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant, sandbox, tool, status, idempotency_key, created_ms, envelope FROM receipts \
             WHERE id = $1 AND ($2 IS NULL OR tenant = $2)",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Receipts, oldest first, optionally of one tenant and one sandbox.
    pub async fn receipts(
        &self,
        tenant: Option<&str>,
        sandbox: Option<&str>,
    ) -> Result<Vec<ReceiptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, sandbox, tool, status, idempotency_key, created_ms, envelope FROM receipts \
             WHERE ($1 IS NULL OR tenant = $1) AND ($2 IS NULL OR sandbox = $2) ORDER BY created_ms, rowid",
        )
        .bind(tenant)
        .bind(sandbox)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Appends a trace record for `sandbox`; `build` gets the record's sequence number and returns its
    /// canonical bytes. Numbers are dense from 0 in the order of insertion.
    pub async fn append_trace(
        &self,
        sandbox: &str,
        tenant: &str,
        kind: &str,
        at_ms: i64,
        build: impl Fn(i64) -> Result<Vec<u8>, String>,
    ) -> Result<i64, StoreError> {
        // One writer at a time: the next number is read and used inside one immediate transaction.
        // SQLite: take the write lock at BEGIN. PostgreSQL: a transaction-scoped advisory lock per sandbox.
        let mut tx = match self.backend {
            crate::Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            crate::Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(sandbox)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        let seq: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM trace_records WHERE sandbox = $1")
                .bind(sandbox)
                .fetch_one(&mut *tx)
                .await?
                .try_get("next")?;
        let record = build(seq).map_err(StoreError::Invalid)?;
        sqlx::query(
            "INSERT INTO trace_records (sandbox, seq, tenant, kind, at_ms, record) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(sandbox)
        .bind(seq)
        .bind(tenant)
        .bind(kind)
        .bind(at_ms)
        .bind(record)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// A sandbox's trace records in order.
    pub async fn trace(&self, sandbox: &str) -> Result<Vec<TraceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT sandbox, seq, kind, at_ms, record FROM trace_records WHERE sandbox = $1 ORDER BY seq",
        )
        .bind(sandbox)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Seals an episode; a second one for the same sandbox is ignored (false).
    pub async fn insert_episode(&self, episode: &EpisodeRecord) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO episodes (id, sandbox, tenant, created_ms, envelope, facts) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&episode.id)
        .bind(&episode.sandbox)
        .bind(&episode.tenant)
        .bind(episode.created_ms)
        .bind(&episode.envelope)
        .bind(&episode.facts)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The episode with this id, or of the sandbox with this id.
    pub async fn episode(
        &self,
        id_or_sandbox: &str,
        tenant: Option<&str>,
    ) -> Result<Option<EpisodeRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, sandbox, tenant, created_ms, envelope, facts FROM episodes \
             WHERE (id = $1 OR sandbox = $1) AND ($2 IS NULL OR tenant = $2)",
        )
        .bind(id_or_sandbox)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Episodes, oldest first.
    pub async fn episodes(&self, tenant: Option<&str>) -> Result<Vec<EpisodeRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sandbox, tenant, created_ms, envelope, facts FROM episodes \
             WHERE ($1 IS NULL OR tenant = $1) ORDER BY created_ms, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn add_evaluator_key(&self, key: &EvaluatorKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO evaluators (name, kid, public_key, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name, kid) DO NOTHING",
        )
        .bind(&key.name)
        .bind(&key.kid)
        .bind(&key.public_key)
        .bind(key.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Evaluator keys, all or one evaluator's.
    pub async fn evaluator_keys(&self, name: Option<&str>) -> Result<Vec<EvaluatorKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, kid, public_key, created_ms FROM evaluators WHERE ($1 IS NULL OR name = $1) \
             ORDER BY name, kid",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn delete_evaluator(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM evaluators WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Stores a verified signal; false when the same signal (same envelope) is already stored.
    pub async fn insert_signal(&self, signal: &SignalRecord) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO signals (id, episode, tenant, evaluator, name, score, label, at_ms, envelope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&signal.id)
        .bind(&signal.episode)
        .bind(&signal.tenant)
        .bind(&signal.evaluator)
        .bind(&signal.name)
        .bind(signal.score)
        .bind(&signal.label)
        .bind(signal.at_ms)
        .bind(&signal.envelope)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Signals, of one episode or of all a tenant's episodes, in time order.
    pub async fn signals(
        &self,
        episode: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<Vec<SignalRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, episode, tenant, evaluator, name, score, label, at_ms, envelope FROM signals \
             WHERE ($1 IS NULL OR episode = $1) AND ($2 IS NULL OR tenant = $2) ORDER BY at_ms, id",
        )
        .bind(episode)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn insert_dataset(&self, dataset: &DatasetRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO datasets (id, tenant, query, episodes, created_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant, id) DO NOTHING",
        )
        .bind(&dataset.id)
        .bind(&dataset.tenant)
        .bind(&dataset.query)
        .bind(dataset.episodes)
        .bind(dataset.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn datasets(&self, tenant: Option<&str>) -> Result<Vec<DatasetRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, query, episodes, created_ms FROM datasets WHERE ($1 IS NULL OR tenant = $1) \
             ORDER BY created_ms, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(holder: &'a str, hash: &'a str, now_ms: i64) -> ClaimRequest<'a> {
        ClaimRequest {
            tenant: "team-a",
            key: "order-7",
            tool: "charge",
            request_hash: hash,
            holder,
            now_ms,
            lease_ms: 1_000,
        }
    }

    fn commit(body: &[u8], now_ms: i64) -> LedgerCommit<'_> {
        LedgerCommit {
            response_code: 200,
            response_type: Some("application/json"),
            response_body: body,
            receipt: "bafyr4i-receipt",
            now_ms,
        }
    }

    #[tokio::test]
    async fn register_commit_replay_and_divergence() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            assert_eq!(
                store.ledger_claim(&claim("a", "h1", 0)).await.unwrap(),
                Claim::Acquired { epoch: 1 }
            );
            // A duplicate while the first runs waits.
            assert!(matches!(
                store.ledger_claim(&claim("b", "h1", 10)).await.unwrap(),
                Claim::Busy(_)
            ));
            assert!(store
                .ledger_commit("team-a", "order-7", 1, &commit(b"ok", 20))
                .await
                .unwrap());
            match store.ledger_claim(&claim("b", "h1", 30)).await.unwrap() {
                Claim::Replay(entry) => {
                    assert_eq!(entry.response_body.as_deref(), Some(&b"ok"[..]));
                    assert_eq!(entry.receipt.as_deref(), Some("bafyr4i-receipt"));
                }
                other => panic!("expected a replay, got {other:?}"),
            }
            // Same key, other body: divergence, counted, and the stored answer is untouched.
            match store.ledger_claim(&claim("c", "h2", 40)).await.unwrap() {
                Claim::Divergent(entry) => assert_eq!(entry.divergences, 1),
                other => panic!("expected a divergence, got {other:?}"),
            }
            let entry = store.ledger_entry("team-a", "order-7").await.unwrap().unwrap();
            assert_eq!(entry.state, LedgerState::Committed);
            assert_eq!(entry.request_hash, "h1");
            // A second commit changes nothing.
            assert!(!store
                .ledger_commit("team-a", "order-7", 1, &commit(b"other", 50))
                .await
                .unwrap());
        }
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_and_the_old_holder_is_fenced() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            assert_eq!(
                store.ledger_claim(&claim("a", "h1", 0)).await.unwrap(),
                Claim::Acquired { epoch: 1 }
            );
            // Lease 1 s: at 1.5 s a retry takes it over with epoch 2.
            assert_eq!(
                store.ledger_claim(&claim("b", "h1", 1_500)).await.unwrap(),
                Claim::Acquired { epoch: 2 }
            );
            // The old holder's late commit and abort are rejected.
            assert!(!store
                .ledger_commit("team-a", "order-7", 1, &commit(b"late", 1_600))
                .await
                .unwrap());
            assert!(!store.ledger_abort("team-a", "order-7", 1).await.unwrap());
            assert!(store
                .ledger_commit("team-a", "order-7", 2, &commit(b"new", 1_700))
                .await
                .unwrap());
            let entry = store.ledger_entry("team-a", "order-7").await.unwrap().unwrap();
            assert_eq!(entry.response_body.as_deref(), Some(&b"new"[..]));
            assert_eq!(entry.holder, "b");
        }
    }

    #[tokio::test]
    async fn unknown_ledger_state_is_an_error_not_a_registration() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.ledger_claim(&claim("a", "h1", 0)).await.unwrap();
            // A newer version's state: reading it as "registered" would let a retry run the call again.
            sqlx::query("UPDATE ledger SET state = 'reconciling'")
                .execute(&store.pool)
                .await
                .unwrap();
            crate::testing::assert_corrupt(
                store.ledger_entry("team-a", "order-7").await,
                ("ledger", "team-a/order-7", "state"),
                "'reconciling'",
            );
            assert!(store.ledger_claim(&claim("b", "h1", 5_000)).await.is_err());
        }
    }

    #[tokio::test]
    async fn abort_lets_a_retry_run_again() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.ledger_claim(&claim("a", "h1", 0)).await.unwrap();
            assert!(store.ledger_abort("team-a", "order-7", 1).await.unwrap());
            assert_eq!(
                store.ledger_claim(&claim("b", "h1", 10)).await.unwrap(),
                Claim::Acquired { epoch: 1 }
            );
        }
    }

    #[tokio::test]
    async fn concurrent_claims_have_one_winner() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let mut tasks = Vec::new();
            for i in 0..16 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let holder = format!("h{i}");
                    store.ledger_claim(&claim(&holder, "h1", 0)).await.unwrap()
                }));
            }
            let mut acquired = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Claim::Acquired { .. } => acquired += 1,
                    Claim::Busy(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(acquired, 1);
        }
    }

    #[tokio::test]
    async fn trace_numbers_are_dense_under_concurrency() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let mut tasks = Vec::new();
            for _ in 0..10 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    store
                        .append_trace("sb_1", "team-a", "exec", 5, |seq| Ok(seq.to_le_bytes().to_vec()))
                        .await
                        .unwrap()
                }));
            }
            let mut seqs: Vec<i64> = Vec::new();
            for task in tasks {
                seqs.push(task.await.unwrap());
            }
            seqs.sort();
            assert_eq!(seqs, (0..10).collect::<Vec<_>>());
            let rows = store.trace("sb_1").await.unwrap();
            assert!(rows.iter().all(|r| r.record == r.seq.to_le_bytes()));
        }
    }
}
