//! The durable queue of sandbox requests that cannot be placed yet.
//!
//! Three lanes — `swift` (expedited), `main` (standard), `deep` (bulk) — are served in that order, and
//! within a lane by priority (higher first), then by age. Delivery is a lease: [`Store::dequeue`] hands an
//! item to one worker until `lease_expires_ms`; the worker [`Store::ack`]s it (placed), or
//! [`Store::reject`]s it (retried after a backoff while attempts remain, else a dead letter). An item whose
//! lease runs out (its worker died) is delivered again. Past a configurable depth, [`Store::enqueue`]
//! refuses new items ([`Enqueue::Full`]): the API turns that into 429 with `Retry-After`.
//!
//! Concurrency: on PostgreSQL one statement picks and leases the head with `FOR UPDATE SKIP LOCKED`, so
//! concurrent workers never take the same item and never wait for each other; on SQLite the pick and the
//! lease run in one immediate (write-locked) transaction.

use std::str::FromStr;

use serde::Serialize;
use sqlx::Row;

use crate::columns::{decode, Record, UnknownValue};
use crate::{Backend, Store, StoreError};

/// A lane of the queue, in the order they are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Expedited: served before everything else.
    Swift,
    /// Standard.
    Main,
    /// Bulk: served when nothing else waits.
    Deep,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Swift, Lane::Main, Lane::Deep];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Swift => "swift",
            Lane::Main => "main",
            Lane::Deep => "deep",
        }
    }

    fn rank(self) -> i64 {
        self as i64
    }
}

impl FromStr for Lane {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "swift" => Ok(Lane::Swift),
            "main" => Ok(Lane::Main),
            "deep" => Ok(Lane::Deep),
            other => Err(StoreError::Invalid(format!(
                "unknown lane '{other}': use swift, main or deep"
            ))),
        }
    }
}

/// A stored lane.
impl TryFrom<String> for Lane {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        s.parse().map_err(|_| UnknownValue {
            value: s,
            expected: "swift, main or deep",
        })
    }
}

/// Where a queue item is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueState {
    /// Waiting to be delivered (from `not_before_ms`).
    Ready,
    /// Delivered to a worker until its lease expires.
    Leased,
    /// Placed.
    Done,
    /// Out of attempts: a dead letter.
    Dead,
}

/// A stored queue state.
impl TryFrom<String> for QueueState {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        match s.as_str() {
            "ready" => Ok(QueueState::Ready),
            "leased" => Ok(QueueState::Leased),
            "done" => Ok(QueueState::Done),
            "dead" => Ok(QueueState::Dead),
            _ => Err(UnknownValue {
                value: s,
                expected: "ready, leased, done or dead",
            }),
        }
    }
}

/// A request to enqueue.
#[derive(Debug, Clone)]
pub struct NewQueueItem<'a> {
    pub id: &'a str,
    pub lane: Lane,
    pub priority: i64,
    pub tenant: &'a str,
    /// The request (JSON).
    pub payload: &'a str,
    /// Deliveries before it becomes a dead letter (at least 1).
    pub max_attempts: i64,
    /// Why it waits (shown to the caller until it is placed).
    pub reason: Option<&'a str>,
}

/// What an enqueue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueue {
    Queued,
    /// The queue holds `depth` waiting items, at or past the limit: nothing was stored.
    Full {
        depth: i64,
    },
}

/// A queue item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct QueueItem {
    pub id: String,
    pub lane: Lane,
    pub priority: i64,
    pub tenant: String,
    pub payload: String,
    pub state: QueueState,
    pub attempts: i64,
    pub max_attempts: i64,
    pub enqueued_ms: i64,
    pub not_before_ms: i64,
    pub leased_by: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub finished_ms: Option<i64>,
    /// The sandbox it became, once dispatched.
    pub sandbox: Option<String>,
}

const COLUMNS: &str = "id, lane, priority, tenant, payload, state, attempts, max_attempts, enqueued_ms, \
    not_before_ms, leased_by, lease_expires_ms, reason, last_error, finished_ms, sandbox";

impl Record for QueueItem {
    const TABLE: &'static str = "queue";
    const KEY: &'static [&'static str] = &["id"];
}

/// The delay before the next delivery after the `attempts`-th was rejected: 1 s, doubling, at most 5 min
/// ([`Store::reject`] writes its SQL from this).
pub fn retry_backoff_ms(attempts: i64) -> i64 {
    1_000i64
        .saturating_mul(1 << (attempts - 1).clamp(0, 9))
        .min(300_000)
}

/// [`Store::reject`]'s statement, its backoff table written out from [`retry_backoff_ms`] (the two engines
/// share no power function on integers).
static REJECT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let steps: String = (1..=9)
        .map(|attempts| format!("WHEN {attempts} THEN {} ", retry_backoff_ms(attempts)))
        .collect();
    format!(
        "UPDATE queue SET \
           state = CASE WHEN $1 = 1 AND attempts < max_attempts THEN 'ready' ELSE 'dead' END, \
           not_before_ms = $2 + CASE attempts {steps}ELSE {} END, \
           finished_ms = CASE WHEN $1 = 1 AND attempts < max_attempts THEN NULL ELSE $2 END, \
           last_error = $3, reason = $3, leased_by = NULL, lease_expires_ms = NULL \
         WHERE id = $4 AND state = 'leased' AND leased_by = $5",
        retry_backoff_ms(10)
    )
});

/// The condition of a deliverable item at `$1` (now): ready and due, or leased with an expired lease.
const DELIVERABLE: &str =
    "((state = 'ready' AND not_before_ms <= $1) OR (state = 'leased' AND lease_expires_ms <= $1))";

/// What a queue item is: the two never meet (a worker of one topic never leases the other's items, and
/// each has its own depth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// A sandbox request waiting for a node (the leader's dispatcher).
    Sandbox,
    /// An agent task waiting for a worker (docs/tasks.md).
    Task,
}

impl Topic {
    fn as_str(self) -> &'static str {
        match self {
            Topic::Sandbox => "sandbox",
            Topic::Task => "task",
        }
    }
}

impl Store {
    /// Adds a sandbox request unless `max_depth` items already wait (ready or leased).
    pub async fn enqueue(
        &self,
        item: &NewQueueItem<'_>,
        now_ms: i64,
        max_depth: i64,
    ) -> Result<Enqueue, StoreError> {
        self.enqueue_on(Topic::Sandbox, item, now_ms, max_depth).await
    }

    /// Adds an item of `topic` unless `max_depth` items of it already wait.
    pub async fn enqueue_on(
        &self,
        topic: Topic,
        item: &NewQueueItem<'_>,
        now_ms: i64,
        max_depth: i64,
    ) -> Result<Enqueue, StoreError> {
        if item.max_attempts < 1 {
            return Err(StoreError::Invalid("max_attempts must be at least 1".to_string()));
        }
        // One statement: the depth check and the insert cannot be split by another enqueue.
        let done = sqlx::query(
            "INSERT INTO queue (id, lane, lane_rank, priority, tenant, payload, state, attempts, max_attempts, \
             not_before_ms, enqueued_ms, reason, topic) \
             SELECT $1, $2, $3, $4, $5, $6, 'ready', 0, $7, $8, $8, $9, $11 \
             WHERE (SELECT COUNT(*) FROM queue WHERE state IN ('ready', 'leased') AND topic = $11) < $10",
        )
        .bind(item.id)
        .bind(item.lane.as_str())
        .bind(item.lane.rank())
        .bind(item.priority)
        .bind(item.tenant)
        .bind(item.payload)
        .bind(item.max_attempts)
        .bind(now_ms)
        .bind(item.reason)
        .bind(max_depth)
        .bind(topic.as_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Enqueue::Queued);
        }
        let depth = self.topic_depth(topic).await?;
        Ok(Enqueue::Full { depth })
    }

    /// Leases the next deliverable item to `worker` until `now_ms + lease_ms`: swift before main before
    /// deep, higher priority first, then oldest. `None` when nothing is deliverable.
    pub async fn dequeue(
        &self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<QueueItem>, StoreError> {
        self.dequeue_on(Topic::Sandbox, worker, now_ms, lease_ms).await
    }

    /// [`Store::dequeue`] for the items of `topic`.
    pub async fn dequeue_on(
        &self,
        topic: Topic,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<QueueItem>, StoreError> {
        let deliverable = format!("topic = '{}' AND {DELIVERABLE}", topic.as_str());
        let order = "ORDER BY lane_rank, priority DESC, enqueued_ms, id LIMIT 1";
        let row = match self.backend {
            Backend::Postgres => {
                sqlx::query(&format!(
                    "UPDATE queue SET state = 'leased', leased_by = $2, lease_expires_ms = $3, \
                     attempts = attempts + 1 WHERE id = (SELECT id FROM queue WHERE {deliverable} {order} \
                     FOR UPDATE SKIP LOCKED) RETURNING {COLUMNS}"
                ))
                .bind(now_ms)
                .bind(worker)
                .bind(now_ms.saturating_add(lease_ms))
                .fetch_optional(&self.pool)
                .await?
            }
            Backend::Sqlite => {
                let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                let head = sqlx::query(&format!("SELECT id FROM queue WHERE {deliverable} {order}"))
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                let row = match head {
                    None => None,
                    Some(head) => {
                        let id: String = head.try_get("id")?;
                        sqlx::query(&format!(
                            "UPDATE queue SET state = 'leased', leased_by = $1, lease_expires_ms = $2, \
                             attempts = attempts + 1 WHERE id = $3 RETURNING {COLUMNS}"
                        ))
                        .bind(worker)
                        .bind(now_ms.saturating_add(lease_ms))
                        .bind(&id)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                };
                tx.commit().await?;
                row
            }
        };
        row.as_ref().map(decode).transpose()
    }

    /// The item was placed: done. False when `worker` no longer holds its lease (it was delivered again).
    pub async fn ack(&self, id: &str, worker: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.ack_with(id, worker, None, now_ms).await
    }

    /// [`Store::ack`], recording the sandbox the item became.
    pub async fn ack_with(
        &self,
        id: &str,
        worker: &str,
        sandbox: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE queue SET state = 'done', finished_ms = $1, reason = NULL, sandbox = $4 \
             WHERE id = $2 AND state = 'leased' AND leased_by = $3",
        )
        .bind(now_ms)
        .bind(id)
        .bind(worker)
        .bind(sandbox)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The item could not be placed now. With `retry` and attempts left it waits again (after
    /// [`retry_backoff_ms`]); otherwise it becomes a dead letter. False when `worker` no longer holds it.
    pub async fn reject(
        &self,
        id: &str,
        worker: &str,
        error: &str,
        retry: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&REJECT_SQL)
            .bind(i64::from(retry))
            .bind(now_ms)
            .bind(error)
            .bind(id)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records why a waiting item waits (e.g. "no node fits: 3 lack capacity").
    pub async fn set_queue_reason(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE queue SET reason = $1 WHERE id = $2 AND state IN ('ready', 'leased')")
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Items of `topic` waiting (ready or leased).
    pub async fn topic_depth(&self, topic: Topic) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS depth FROM queue WHERE state IN ('ready', 'leased') AND topic = $1",
        )
        .bind(topic.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("depth")?)
    }

    /// Sandbox requests waiting (ready or leased), in all lanes or one.
    pub async fn queue_depth(&self, lane: Option<Lane>) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS depth FROM queue WHERE state IN ('ready', 'leased') AND topic = 'sandbox' \
             AND ($1 IS NULL OR lane = $1)",
        )
        .bind(lane.map(Lane::as_str))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("depth")?)
    }

    pub async fn queue_item(&self, id: &str) -> Result<Option<QueueItem>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM queue WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Items waiting (ready or leased), in dequeue order, of one tenant or all.
    pub async fn queued(&self, tenant: Option<&str>) -> Result<Vec<QueueItem>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM queue WHERE state IN ('ready', 'leased') AND topic = 'sandbox' \
             AND ($1 IS NULL OR tenant = $1) \
             ORDER BY lane_rank, priority DESC, enqueued_ms, id"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Dead letters, oldest first, of one tenant or all.
    pub async fn dead_letters(&self, tenant: Option<&str>) -> Result<Vec<QueueItem>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM queue WHERE state = 'dead' AND topic = 'sandbox' AND ($1 IS NULL OR tenant = $1) \
             ORDER BY finished_ms, id"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item<'a>(id: &'a str, lane: Lane, priority: i64) -> NewQueueItem<'a> {
        NewQueueItem {
            id,
            lane,
            priority,
            tenant: "team-a",
            payload: "{}",
            max_attempts: 2,
            reason: Some("no node fits yet"),
        }
    }

    #[tokio::test]
    async fn lanes_then_priority_then_age() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for (n, (id, lane, priority)) in [
                ("deep-hi", Lane::Deep, 9),
                ("main-lo", Lane::Main, 1),
                ("main-hi", Lane::Main, 5),
                ("swift", Lane::Swift, 0),
                ("main-hi-later", Lane::Main, 5),
            ]
            .into_iter()
            .enumerate()
            {
                let queued = store
                    .enqueue(&item(id, lane, priority), n as i64, 100)
                    .await
                    .unwrap();
                assert_eq!(queued, Enqueue::Queued);
            }
            assert_eq!(store.queue_depth(None).await.unwrap(), 5);
            assert_eq!(store.queue_depth(Some(Lane::Main)).await.unwrap(), 3);
            let mut order = Vec::new();
            while let Some(next) = store.dequeue("w", 100, 1_000).await.unwrap() {
                assert_eq!(next.state, QueueState::Leased);
                assert_eq!(next.attempts, 1);
                order.push(next.id);
            }
            assert_eq!(order, ["swift", "main-hi", "main-hi-later", "main-lo", "deep-hi"]);
        }
    }

    #[tokio::test]
    async fn backpressure_refuses_past_the_depth() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            assert_eq!(
                store.enqueue(&item("a", Lane::Main, 0), 0, 2).await.unwrap(),
                Enqueue::Queued
            );
            assert_eq!(
                store.enqueue(&item("b", Lane::Main, 0), 0, 2).await.unwrap(),
                Enqueue::Queued
            );
            assert_eq!(
                store.enqueue(&item("c", Lane::Swift, 0), 0, 2).await.unwrap(),
                Enqueue::Full { depth: 2 }
            );
            assert!(
                store.queue_item("c").await.unwrap().is_none(),
                "a refused item was stored"
            );
            // Done items leave room.
            let a = store.dequeue("w", 1, 1_000).await.unwrap().unwrap();
            assert!(store.ack(&a.id, "w", 2).await.unwrap());
            assert_eq!(
                store.enqueue(&item("c", Lane::Swift, 0), 3, 2).await.unwrap(),
                Enqueue::Queued
            );
        }
    }

    #[tokio::test]
    async fn retries_back_off_then_dead_letter_and_leases_expire() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.enqueue(&item("x", Lane::Main, 0), 0, 10).await.unwrap();
            let first = store.dequeue("w1", 0, 1_000).await.unwrap().unwrap();
            assert!(store
                .reject(&first.id, "w1", "no node has a GPU", true, 10)
                .await
                .unwrap());
            let waiting = store.queue_item("x").await.unwrap().unwrap();
            assert_eq!(waiting.state, QueueState::Ready);
            assert_eq!(waiting.not_before_ms, 10 + retry_backoff_ms(1));
            assert_eq!(waiting.reason.as_deref(), Some("no node has a GPU"));
            // Not before its backoff.
            assert!(store.dequeue("w1", 500, 1_000).await.unwrap().is_none());
            let second = store.dequeue("w2", 2_000, 1_000).await.unwrap().unwrap();
            assert_eq!(second.attempts, 2);
            // w2 dies holding it: after the lease it is delivered again, and w2's late ack is refused.
            let third = store.dequeue("w3", 3_500, 1_000).await.unwrap().unwrap();
            assert_eq!(third.id, "x");
            assert!(!store.ack("x", "w2", 3_600).await.unwrap());
            // Out of attempts: a dead letter.
            assert!(store
                .reject("x", "w3", "still no GPU", true, 3_700)
                .await
                .unwrap());
            let dead = store.dead_letters(Some("team-a")).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].last_error.as_deref(), Some("still no GPU"));
            assert_eq!(store.queue_depth(None).await.unwrap(), 0);
            assert!(store.dequeue("w4", 1_000_000, 1_000).await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn concurrent_workers_take_each_item_once() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for i in 0..40 {
                let id = format!("item-{i:02}");
                store
                    .enqueue(&item(&id, Lane::Main, i % 3), i, 1_000)
                    .await
                    .unwrap();
            }
            let mut workers = Vec::new();
            for w in 0..6 {
                let store = store.clone();
                workers.push(tokio::spawn(async move {
                    let worker = format!("worker-{w}");
                    let mut taken = Vec::new();
                    while let Some(item) = store.dequeue(&worker, 1_000, 60_000).await.unwrap() {
                        assert!(store.ack(&item.id, &worker, 1_001).await.unwrap());
                        taken.push(item.id);
                    }
                    taken
                }));
            }
            let mut all = Vec::new();
            for worker in workers {
                all.extend(worker.await.unwrap());
            }
            all.sort();
            let expected: Vec<String> = (0..40).map(|i| format!("item-{i:02}")).collect();
            assert_eq!(all, expected, "an item was delivered twice or lost");
        }
    }

    #[tokio::test]
    async fn unknown_lane_or_state_is_an_error_naming_the_item() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.enqueue(&item("x", Lane::Main, 0), 0, 10).await.unwrap();
            store.enqueue(&item("y", Lane::Main, 0), 0, 10).await.unwrap();
            test_store
                .execute_unchecked(
                    "UPDATE queue SET lane = 'express' WHERE id = 'x'; \
                     UPDATE queue SET state = 'parked' WHERE id = 'y'",
                )
                .await;
            crate::testing::assert_corrupt(store.queue_item("x").await, ("queue", "x", "lane"), "'express'");
            crate::testing::assert_corrupt(store.queue_item("y").await, ("queue", "y", "state"), "'parked'");
        }
    }

    #[tokio::test]
    async fn topics_never_meet() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store
                .enqueue(&item("sandbox-1", Lane::Main, 0), 0, 1)
                .await
                .unwrap();
            assert_eq!(
                store
                    .enqueue_on(Topic::Task, &item("task-1", Lane::Main, 0), 0, 1)
                    .await
                    .unwrap(),
                Enqueue::Queued,
                "a full sandbox queue refused a task"
            );
            assert_eq!(store.queue_depth(None).await.unwrap(), 1);
            assert_eq!(store.topic_depth(Topic::Task).await.unwrap(), 1);
            let task = store
                .dequeue_on(Topic::Task, "w", 1, 1_000)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(task.id, "task-1");
            assert!(store
                .dequeue_on(Topic::Task, "w", 1, 1_000)
                .await
                .unwrap()
                .is_none());
            let sandbox = store.dequeue("w", 1, 1_000).await.unwrap().unwrap();
            assert_eq!(sandbox.id, "sandbox-1");
            assert!(store.queued(None).await.unwrap().iter().all(|i| i.id != "task-1"));
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_backoff_ms(1), 1_000);
        assert_eq!(retry_backoff_ms(2), 2_000);
        assert_eq!(retry_backoff_ms(9), 256_000);
        assert_eq!(retry_backoff_ms(10), 300_000);
        assert_eq!(retry_backoff_ms(50), 300_000);
        assert!("bulk"
            .parse::<Lane>()
            .unwrap_err()
            .to_string()
            .contains("swift, main or deep"));
    }
}
