//! Cluster mode in the store: node join tokens, node registrations and heartbeats, and leadership of the
//! control plane's background loops.
//!
//! A node id is claimed by one agent process (`instance`) at a time. A registration while another live
//! instance holds the id is refused; one after that instance went quiet takes the id over and raises the
//! node's `epoch`, so heartbeats from the superseded instance no longer count.
//!
//! Leadership ([`Store::try_lead`]): on PostgreSQL a session advisory lock held on a connection of its own
//! (the lock goes when the connection does: a killed leader hands over as soon as the database notices);
//! on SQLite the one server that owns the data directory always leads. Each acquisition starts a new term
//! (a fencing token) recorded in `leader_terms`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tartarus_scheduler::{NodeState, Resources, Taint};

use crate::columns::{decode, Flag, JsonText, NodeStateText, Record};
use crate::{hash_secret, random_hex, Backend, Store, StoreError};

/// The prefix of node join tokens (API keys use another).
pub const NODE_TOKEN_PREFIX: &str = "tn_";

/// An isolation lane a node's agent reports it can run, as its own server probed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLane {
    /// The lane's name, as a create's `runtime` names it (`process`, `gvisor`).
    pub name: String,
    /// The engine's version on the node (the kernel's release, `runsc …`).
    #[serde(default)]
    pub version: Option<String>,
    /// Why the lane runs too slowly on the node for an automatic choice (a microVM lane under TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulated: Option<String>,
}

/// A node as its agent last reported it. Labels, taints, resources, pools and lanes are stored as JSON text
/// and read back typed: a row that does not read is [`StoreError::Corrupt`], never a node with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct NodeRecord {
    pub id: String,
    pub instance: String,
    pub epoch: i64,
    pub address: String,
    #[sqlx(try_from = "JsonText<BTreeMap<String, String>>")]
    pub labels: BTreeMap<String, String>,
    #[sqlx(try_from = "JsonText<Vec<Taint>>")]
    pub taints: Vec<Taint>,
    #[sqlx(try_from = "JsonText<Resources>")]
    pub capacity: Resources,
    #[sqlx(try_from = "JsonText<Resources>")]
    pub usage: Resources,
    #[sqlx(try_from = "NodeStateText")]
    pub state: NodeState,
    pub registered_ms: i64,
    pub last_heartbeat_ms: i64,
    /// The key the control plane uses to call the node's agent (never shown).
    #[serde(skip)]
    pub api_key: String,
    /// The resource classes it is dedicated to (empty: any).
    #[sqlx(try_from = "JsonText<BTreeSet<String>>")]
    pub pools: BTreeSet<String>,
    /// Takes only quarantined work.
    #[sqlx(try_from = "Flag")]
    pub quarantine: bool,
    /// The isolation lanes it reported (empty: its agent reports none).
    #[sqlx(try_from = "JsonText<Vec<NodeLane>>")]
    pub lanes: Vec<NodeLane>,
}

/// A registration as an agent sends it (validated by the server).
#[derive(Debug, Clone)]
pub struct NodeRegistration<'a> {
    pub id: &'a str,
    pub instance: &'a str,
    pub address: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub taints: &'a [Taint],
    pub capacity: Resources,
    pub usage: Resources,
    /// The key the control plane will use to call the agent.
    pub api_key: &'a str,
    /// Resource classes it is dedicated to.
    pub pools: &'a BTreeSet<String>,
    pub quarantine: bool,
    /// The isolation lanes it can run.
    pub lanes: &'a [NodeLane],
    pub now_ms: i64,
    /// Another instance that has not sent a heartbeat for this long has lost the id.
    pub stale_after_ms: i64,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The agent holds the id with this epoch.
    Accepted { epoch: i64 },
    /// Another live agent holds the id.
    Duplicate {
        instance: String,
        last_heartbeat_ms: i64,
    },
}

/// A held leadership: dropping it releases the lock (on PostgreSQL by closing its connection).
pub struct Leadership {
    pub term: i64,
    connection: Option<sqlx::AnyConnection>,
}

impl Leadership {
    /// Gives the leadership up now: the session's advisory locks are released before its connection
    /// closes (the server would release them too, but only once its backend has exited, a moment later).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.connection.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }

    /// Whether the leadership still holds: on PostgreSQL, whether its connection (and so its lock) is alive.
    pub async fn check(&mut self) -> bool {
        match self.connection.as_mut() {
            None => true,
            Some(conn) => sqlx::Connection::ping(conn).await.is_ok(),
        }
    }
}

const NODE_COLUMNS: &str =
    "id, instance, epoch, address, labels, taints, capacity, usage, state, registered_ms, \
    last_heartbeat_ms, api_key, pools, quarantine, lanes";

impl Record for NodeRecord {
    const TABLE: &'static str = "nodes";
    const KEY: &'static [&'static str] = &["id"];
}

fn to_json<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode { what, source })
}

impl Store {
    /// Creates (or replaces) node `node_id`'s join token; returns the secret, shown once.
    pub async fn create_node_token(&self, node_id: &str) -> Result<String, StoreError> {
        let secret = format!("{NODE_TOKEN_PREFIX}{}", random_hex(32)?);
        sqlx::query(
            "INSERT INTO node_tokens (node_id, token_hash, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (node_id) DO UPDATE SET token_hash = excluded.token_hash, created_ms = excluded.created_ms",
        )
        .bind(node_id)
        .bind(hash_secret(&secret))
        .bind(crate::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(secret)
    }

    /// The node id a join token belongs to.
    pub async fn node_for_token(&self, secret: &str) -> Result<Option<String>, StoreError> {
        if !secret.starts_with(NODE_TOKEN_PREFIX) {
            return Ok(None);
        }
        let row = sqlx::query("SELECT node_id FROM node_tokens WHERE token_hash = $1")
            .bind(hash_secret(secret))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("node_id")).transpose()?)
    }

    /// Registers an agent for a node id (see the module docs for who wins).
    pub async fn register_node(&self, r: &NodeRegistration<'_>) -> Result<Registered, StoreError> {
        let labels = to_json("node labels", r.labels)?;
        let taints = to_json("node taints", r.taints)?;
        let capacity = to_json("node capacity", &r.capacity)?;
        let usage = to_json("node usage", &r.usage)?;
        let pools = to_json("node pools", r.pools)?;
        let lanes = to_json("node lanes", r.lanes)?;
        for _ in 0..4 {
            let inserted = sqlx::query(&format!(
                "INSERT INTO nodes ({NODE_COLUMNS}) VALUES ($1, $2, 1, $3, $4, $5, $6, $7, 'ready', $8, $8, $9, $10, $11, $12) \
                 ON CONFLICT (id) DO NOTHING"
            ))
            .bind(r.id)
            .bind(r.instance)
            .bind(r.address)
            .bind(&labels)
            .bind(&taints)
            .bind(&capacity)
            .bind(&usage)
            .bind(r.now_ms)
            .bind(r.api_key)
            .bind(&pools)
            .bind(i64::from(r.quarantine))
            .bind(&lanes)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Registered::Accepted { epoch: 1 });
            }
            // Taken over when it is this instance again, or the holder went quiet or unreachable.
            let updated = sqlx::query(&format!(
                "UPDATE nodes SET instance = $2, epoch = epoch + 1, address = $3, labels = $4, taints = $5, \
                 capacity = $6, usage = $7, state = 'ready', registered_ms = $8, last_heartbeat_ms = $8, api_key = $10, \
                 pools = $11, quarantine = $12, lanes = $13 \
                 WHERE id = $1 AND (instance = $2 OR state = 'unreachable' OR last_heartbeat_ms < $9) \
                 RETURNING {NODE_COLUMNS}"
            ))
            .bind(r.id)
            .bind(r.instance)
            .bind(r.address)
            .bind(&labels)
            .bind(&taints)
            .bind(&capacity)
            .bind(&usage)
            .bind(r.now_ms)
            .bind(r.now_ms - r.stale_after_ms)
            .bind(r.api_key)
            .bind(&pools)
            .bind(i64::from(r.quarantine))
            .bind(&lanes)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = updated {
                return Ok(Registered::Accepted {
                    epoch: row.try_get("epoch")?,
                });
            }
            // Only who holds it: a holder's row need not be readable to refuse a duplicate.
            let holder = sqlx::query("SELECT instance, last_heartbeat_ms FROM nodes WHERE id = $1")
                .bind(r.id)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(holder) = holder {
                return Ok(Registered::Duplicate {
                    instance: holder.try_get("instance")?,
                    last_heartbeat_ms: holder.try_get("last_heartbeat_ms")?,
                });
            }
        }
        Err(StoreError::Invalid(format!(
            "node '{}' is contended; retry",
            r.id
        )))
    }

    /// Records a heartbeat, with the node's lanes when it reports them (`None` keeps those it registered
    /// with); false when this instance and epoch no longer hold the node (re-register).
    pub async fn node_heartbeat(
        &self,
        id: &str,
        instance: &str,
        epoch: i64,
        usage: Resources,
        lanes: Option<&[NodeLane]>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let usage = to_json("node usage", &usage)?;
        let lanes = lanes.map(|l| to_json("node lanes", l)).transpose()?;
        let done = sqlx::query(
            "UPDATE nodes SET usage = $1, last_heartbeat_ms = $2, \
             state = CASE WHEN state = 'draining' THEN 'draining' ELSE 'ready' END, \
             lanes = COALESCE($6, lanes) \
             WHERE id = $3 AND instance = $4 AND epoch = $5",
        )
        .bind(&usage)
        .bind(now_ms)
        .bind(id)
        .bind(instance)
        .bind(epoch)
        .bind(lanes)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One node; an unreadable row is [`StoreError::Corrupt`].
    pub async fn node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Every node, by id. Each row that cannot be read is its own [`StoreError::Corrupt`], so that a
    /// caller can leave that node out (saying why) and go on with the others.
    pub async fn nodes(&self) -> Result<Vec<Result<NodeRecord, StoreError>>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(decode).collect())
    }

    /// Removes a node and its join token (its agent can no longer register); false when unknown.
    pub async fn delete_node(&self, id: &str) -> Result<bool, StoreError> {
        let token = sqlx::query("DELETE FROM node_tokens WHERE node_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        let node = sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(token.rows_affected() + node.rows_affected() > 0)
    }

    /// Marks ready nodes whose last heartbeat is older than `before_ms` unreachable; returns their ids.
    pub async fn mark_unreachable(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE nodes SET state = 'unreachable' WHERE state <> 'unreachable' AND last_heartbeat_ms < $1 \
             RETURNING id",
        )
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut ids = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<Vec<String>, _>>()?;
        ids.sort();
        Ok(ids)
    }

    /// Tries to become the leader of `name`'s background loops; `None` while another holds it.
    pub async fn try_lead(&self, name: &str, holder: &str) -> Result<Option<Leadership>, StoreError> {
        let connection = match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                // A connection of its own, detached from the pool: closing it (or the process dying)
                // releases the lock.
                let mut conn = self.pool.acquire().await?.detach();
                let got: bool = sqlx::query("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS got")
                    .bind(format!("tartarus-leader:{name}"))
                    .fetch_one(&mut conn)
                    .await?
                    .try_get("got")?;
                if !got {
                    let _ = sqlx::Connection::close(conn).await;
                    return Ok(None);
                }
                Some(conn)
            }
        };
        let term: i64 = sqlx::query(
            "INSERT INTO leader_terms (name, term, holder, since_ms) VALUES ($1, 1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET term = leader_terms.term + 1, holder = excluded.holder, \
             since_ms = excluded.since_ms RETURNING term",
        )
        .bind(name)
        .bind(holder)
        .bind(crate::now_ms())
        .fetch_one(&self.pool)
        .await?
        .try_get("term")?;
        Ok(Some(Leadership { term, connection }))
    }

    /// The current leader of `name` as recorded: (holder, term, since).
    pub async fn leader(&self, name: &str) -> Result<Option<(String, i64, i64)>, StoreError> {
        let row = sqlx::query("SELECT holder, term, since_ms FROM leader_terms WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("holder")?, r.try_get("term")?, r.try_get("since_ms")?)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tartarus_scheduler::TaintEffect;

    const NO_LABELS: &BTreeMap<String, String> = &BTreeMap::new();
    const NO_POOLS: &BTreeSet<String> = &BTreeSet::new();

    fn registration<'a>(id: &'a str, instance: &'a str, now_ms: i64) -> NodeRegistration<'a> {
        NodeRegistration {
            id,
            instance,
            address: "10.0.0.1:7071",
            labels: NO_LABELS,
            taints: &[],
            capacity: Resources::new(2000, 1 << 30, 0),
            usage: Resources::ZERO,
            api_key: "tk_node",
            pools: NO_POOLS,
            quarantine: false,
            lanes: &[],
            now_ms,
            stale_after_ms: 1_000,
        }
    }

    #[tokio::test]
    async fn tokens_registration_heartbeats_and_reaping() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let token = store.create_node_token("n1").await.unwrap();
            assert_eq!(store.node_for_token(&token).await.unwrap().as_deref(), Some("n1"));
            assert_eq!(store.node_for_token("tn_wrong").await.unwrap(), None);
            assert_eq!(
                store.register_node(&registration("n1", "a", 0)).await.unwrap(),
                Registered::Accepted { epoch: 1 }
            );
            // Another agent claiming the live id is refused.
            assert!(matches!(
                store.register_node(&registration("n1", "b", 500)).await.unwrap(),
                Registered::Duplicate { .. }
            ));
            assert!(store
                .node_heartbeat("n1", "a", 1, Resources::ZERO, None, 800)
                .await
                .unwrap());
            // Quiet for longer than the timeout: unreachable, and then another agent may take the id.
            assert_eq!(store.mark_unreachable(1_500).await.unwrap(), ["n1"]);
            assert_eq!(
                store.node("n1").await.unwrap().unwrap().state,
                NodeState::Unreachable
            );
            assert_eq!(
                store
                    .register_node(&registration("n1", "b", 2_000))
                    .await
                    .unwrap(),
                Registered::Accepted { epoch: 2 }
            );
            // The superseded agent's heartbeats no longer count.
            assert!(!store
                .node_heartbeat("n1", "a", 1, Resources::ZERO, None, 2_100)
                .await
                .unwrap());
            assert!(store
                .node_heartbeat("n1", "b", 2, Resources::new(500, 0, 0), None, 2_100)
                .await
                .unwrap());
            let nodes = store.nodes().await.unwrap();
            assert_eq!(nodes.len(), 1);
            let node = nodes[0].as_ref().unwrap();
            assert_eq!(
                (node.state, node.usage),
                (NodeState::Ready, Resources::new(500, 0, 0))
            );
            // Removed: gone, and its token with it.
            assert!(store.delete_node("n1").await.unwrap());
            assert!(store.nodes().await.unwrap().is_empty());
            assert_eq!(store.node_for_token(&token).await.unwrap(), None);
            assert!(!store.delete_node("n1").await.unwrap());
        }
    }

    #[tokio::test]
    async fn typed_fields_round_trip() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            let labels = BTreeMap::from([("zone".to_string(), "eu-1".to_string())]);
            let taints = [Taint::new("gpu", "true", TaintEffect::NoSchedule)];
            let pools = BTreeSet::from(["inferno".to_string()]);
            let lane = |name: &str, version: Option<&str>| NodeLane {
                emulated: None,
                name: name.to_string(),
                version: version.map(str::to_string),
            };
            let lanes = [
                lane("process", Some("6.1.0")),
                lane("gvisor", Some("runsc 20221219.0")),
            ];
            let r = NodeRegistration {
                labels: &labels,
                taints: &taints,
                pools: &pools,
                quarantine: true,
                lanes: &lanes,
                ..registration("n1", "a", 0)
            };
            store.register_node(&r).await.unwrap();
            let node = store.node("n1").await.unwrap().unwrap();
            assert_eq!(
                (&node.labels, &node.taints[..], &node.pools, node.quarantine),
                (&labels, &taints[..], &pools, true)
            );
            assert_eq!(node.lanes, lanes);
            // A heartbeat without lanes keeps them; one with lanes replaces them.
            assert!(store
                .node_heartbeat("n1", "a", 1, Resources::ZERO, None, 1)
                .await
                .unwrap());
            assert_eq!(store.node("n1").await.unwrap().unwrap().lanes, lanes);
            let fewer = [lane("process", None)];
            assert!(store
                .node_heartbeat("n1", "a", 1, Resources::ZERO, Some(&fewer), 2)
                .await
                .unwrap());
            assert_eq!(store.node("n1").await.unwrap().unwrap().lanes, fewer);
            assert_eq!(
                (node.capacity, node.state),
                (Resources::new(2000, 1 << 30, 0), NodeState::Ready)
            );
        }
    }

    #[tokio::test]
    async fn test_node_with_corrupt_taints_is_an_error_and_the_others_still_read() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            for id in ["n1", "n2", "n3"] {
                store.register_node(&registration(id, id, 0)).await.unwrap();
            }
            // Read as "no taints", n2 would tolerate everything.
            sqlx::query(
                "UPDATE nodes SET taints = '[{\"key\": \"gpu\", \"effect\": \"NoSchedul' WHERE id = 'n2'",
            )
            .execute(&store.pool)
            .await
            .unwrap();
            let nodes = store.nodes().await.unwrap();
            assert_eq!(nodes.len(), 3, "an unreadable node is reported, not dropped");
            assert_eq!(nodes[0].as_ref().unwrap().id, "n1");
            assert_eq!(nodes[2].as_ref().unwrap().id, "n3");
            let mut nodes = nodes;
            crate::testing::assert_corrupt(nodes.remove(1), ("nodes", "n2", "taints"), "EOF");
            crate::testing::assert_corrupt(store.node("n2").await, ("nodes", "n2", "taints"), "EOF");
            // Its agent can still be told apart from a duplicate, and registering again repairs it.
            assert!(matches!(
                store
                    .register_node(&registration("n2", "other", 1))
                    .await
                    .unwrap(),
                Registered::Duplicate { .. }
            ));
            store.register_node(&registration("n2", "n2", 2)).await.unwrap();
            assert!(store.node("n2").await.unwrap().unwrap().taints.is_empty());
        }
    }

    #[tokio::test]
    async fn test_node_with_unknown_state_is_an_error() {
        for test_store in crate::testing::stores().await {
            let store = test_store.store.clone();
            store.register_node(&registration("n1", "a", 0)).await.unwrap();
            test_store
                .execute_unchecked("UPDATE nodes SET state = 'cordoned' WHERE id = 'n1'")
                .await;
            crate::testing::assert_corrupt(store.node("n1").await, ("nodes", "n1", "state"), "'cordoned'");
        }
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_terms_increase() {
        let test_store = crate::testing::TestStore::postgres().await;
        let store = test_store.store.clone();
        let first = store
            .try_lead("loops", "replica-1")
            .await
            .unwrap()
            .expect("first leads");
        assert!(store.try_lead("loops", "replica-2").await.unwrap().is_none());
        assert_eq!(store.leader("loops").await.unwrap().unwrap().0, "replica-1");
        first.release().await; // the connection closes: the lock goes with it
        let mut second = store
            .try_lead("loops", "replica-2")
            .await
            .unwrap()
            .expect("the second replica takes over");
        assert!(second.check().await);
        let (holder, term, _) = store.leader("loops").await.unwrap().unwrap();
        assert_eq!((holder.as_str(), term), ("replica-2", 2));
    }
}
