//! Versioned policies (every apply a new revision, with history and rollback) and the event stream.

use serde::Serialize;
use sqlx::Row;

use crate::columns::{decode, Record};
use crate::{now_ms, Store, StoreError};

/// One revision of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PolicyRevision {
    pub id: String,
    pub revision: i64,
    /// The validated policy as canonical JSON; empty for a removal.
    pub document: String,
    /// The text as it was applied.
    pub source: String,
    pub created_ms: i64,
    pub author: String,
    /// For a rollback: the revision it restored.
    pub rollback_of: Option<i64>,
}

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    /// `enforcement`, `admission`, `lifecycle` or `dead_letter`.
    pub category: String,
    /// What happened, e.g. `timeout.kill`, `resources.throttle`, `network.quarantine`, `start.failed`.
    pub kind: String,
    pub sandbox: Option<String>,
    pub tenant: Option<String>,
    pub message: String,
    /// Structured details (JSON text).
    pub details: Option<String>,
}

/// An event to record.
#[derive(Debug, Clone, Default)]
pub struct NewEvent<'a> {
    pub category: &'a str,
    pub kind: &'a str,
    pub sandbox: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub message: &'a str,
    pub details: Option<&'a str>,
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventQuery<'a> {
    pub tenant: Option<&'a str>,
    pub sandbox: Option<&'a str>,
    pub category: Option<&'a str>,
    pub since_ms: Option<i64>,
    pub limit: Option<i64>,
}

impl Record for PolicyRevision {
    const TABLE: &'static str = "policies";
    const KEY: &'static [&'static str] = &["id", "revision"];
}

impl Record for Event {
    const TABLE: &'static str = "events";
    const KEY: &'static [&'static str] = &["seq"];
}

const REVISION_COLUMNS: &str = "id, revision, document, source, created_ms, author, rollback_of";

impl Store {
    /// Stores a new revision of policy `id` (the next number) and returns it. An empty `document` records
    /// the policy's removal.
    pub async fn put_policy(
        &self,
        id: &str,
        document: &str,
        source: &str,
        author: &str,
        rollback_of: Option<i64>,
    ) -> Result<PolicyRevision, StoreError> {
        // One statement: the next revision is computed and inserted atomically.
        let row = sqlx::query(&format!(
            "INSERT INTO policies (id, revision, document, source, created_ms, author, rollback_of) \
             SELECT $1, COALESCE(MAX(revision), 0) + 1, $2, $3, $4, $5, $6 FROM policies WHERE id = $1 \
             RETURNING {REVISION_COLUMNS}"
        ))
        .bind(id)
        .bind(document)
        .bind(source)
        .bind(now_ms())
        .bind(author)
        .bind(rollback_of)
        .fetch_one(&self.pool)
        .await?;
        decode(&row)
    }

    /// Every revision of a policy, oldest first (empty when it never existed).
    pub async fn policy_history(&self, id: &str) -> Result<Vec<PolicyRevision>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {REVISION_COLUMNS} FROM policies WHERE id = $1 ORDER BY revision"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// The revision of a policy in force (its latest, unless that is a removal).
    pub async fn current_policy(&self, id: &str) -> Result<Option<PolicyRevision>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {REVISION_COLUMNS} FROM policies WHERE id = $1 ORDER BY revision DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let revision: Option<PolicyRevision> = row.as_ref().map(decode).transpose()?;
        Ok(revision.filter(|r| !r.document.is_empty()))
    }

    /// Every policy in force, by id.
    pub async fn current_policies(&self) -> Result<Vec<PolicyRevision>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {REVISION_COLUMNS} FROM policies p WHERE revision = \
             (SELECT MAX(revision) FROM policies q WHERE q.id = p.id) AND document != '' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Makes revision `to` of policy `id` the one in force again, as a new revision. Errors name what
    /// exists when `to` does not.
    pub async fn rollback_policy(
        &self,
        id: &str,
        to: i64,
        author: &str,
    ) -> Result<PolicyRevision, StoreError> {
        let history = self.policy_history(id).await?;
        let Some(target) = history.iter().find(|r| r.revision == to) else {
            let known: Vec<String> = history.iter().map(|r| r.revision.to_string()).collect();
            return Err(StoreError::Invalid(match known.is_empty() {
                true => format!("no policy '{id}'"),
                false => format!(
                    "policy '{id}' has no revision {to} (revisions: {})",
                    known.join(", ")
                ),
            }));
        };
        if target.document.is_empty() {
            return Err(StoreError::Invalid(format!(
                "revision {to} of policy '{id}' is a removal; roll back to one that defines it"
            )));
        }
        self.put_policy(id, &target.document, &target.source, author, Some(to))
            .await
    }

    /// Appends an event.
    pub async fn record_event(&self, event: &NewEvent<'_>) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO events (at_ms, category, kind, sandbox, tenant, message, details) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
        )
        .bind(now_ms())
        .bind(event.category)
        .bind(event.kind)
        .bind(event.sandbox)
        .bind(event.tenant)
        .bind(event.message)
        .bind(event.details)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("seq")?)
    }

    /// Events, newest first.
    pub async fn events(&self, query: &EventQuery<'_>) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, category, kind, sandbox, tenant, message, details FROM events \
             WHERE ($1 IS NULL OR tenant = $1) AND ($2 IS NULL OR sandbox = $2) \
             AND ($3 IS NULL OR category = $3) AND ($4 IS NULL OR at_ms >= $4) \
             ORDER BY seq DESC LIMIT $5",
        )
        .bind(query.tenant)
        .bind(query.sandbox)
        .bind(query.category)
        .bind(query.since_ms)
        .bind(query.limit.unwrap_or(1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Removes events older than `before_ms` (retention); returns how many.
    pub async fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM events WHERE at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn policies_keep_every_revision_and_roll_back() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let one = store
                .put_policy("prod", r#"{"v":1}"#, "v: 1", "admin", None)
                .await
                .unwrap();
            let two = store
                .put_policy("prod", r#"{"v":2}"#, "v: 2", "admin", None)
                .await
                .unwrap();
            assert_eq!((one.revision, two.revision), (1, 2));
            assert_eq!(
                store.current_policy("prod").await.unwrap().unwrap().document,
                r#"{"v":2}"#
            );

            let three = store.rollback_policy("prod", 1, "ops").await.unwrap();
            assert_eq!((three.revision, three.rollback_of), (3, Some(1)));
            assert_eq!(three.document, r#"{"v":1}"#);
            assert_eq!(store.policy_history("prod").await.unwrap().len(), 3);

            let err = store
                .rollback_policy("prod", 9, "ops")
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("no revision 9") && err.contains("1, 2, 3"), "{err}");
            assert!(store.rollback_policy("nope", 1, "ops").await.is_err());
            // A failed rollback changes nothing.
            assert_eq!(store.current_policy("prod").await.unwrap().unwrap().revision, 3);

            // A removal takes it out of force; its history stays.
            store.put_policy("prod", "", "", "admin", None).await.unwrap();
            assert!(store.current_policy("prod").await.unwrap().is_none());
            assert!(store.current_policies().await.unwrap().is_empty());
            assert_eq!(store.rollback_policy("prod", 2, "ops").await.unwrap().revision, 5);
            assert_eq!(store.current_policies().await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn events_filter_and_expire() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for (kind, tenant) in [
                ("timeout.kill", "a"),
                ("start.failed", "b"),
                ("network.quarantine", "a"),
            ] {
                let category = if kind == "start.failed" {
                    "dead_letter"
                } else {
                    "enforcement"
                };
                store
                    .record_event(&NewEvent {
                        category,
                        kind,
                        sandbox: Some("sb_1"),
                        tenant: Some(tenant),
                        message: "m",
                        details: None,
                    })
                    .await
                    .unwrap();
            }
            let a = store
                .events(&EventQuery {
                    tenant: Some("a"),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(
                a.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
                ["network.quarantine", "timeout.kill"]
            );
            let dead = store
                .events(&EventQuery {
                    category: Some("dead_letter"),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(store.prune_events(now_ms() + 1).await.unwrap(), 3);
            assert!(store.events(&EventQuery::default()).await.unwrap().is_empty());
        }
    }
}
