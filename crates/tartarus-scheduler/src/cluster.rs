//! An in-memory cluster: nodes and the reservations placed on them, placing and accounting in one step.
//!
//! Single-threaded by design: every change takes `&mut self` and nothing inside locks. The server keeps
//! one `Cluster` behind a mutex and holds the lock across [`Cluster::reserve`] (placement and accounting
//! together, so two requests never both take the last free core), persists the reservation, and calls
//! [`Cluster::release`] if persisting fails.
//!
//! Accounting: the cluster owns `allocated` and `groups` of its nodes. What a node brings to
//! [`Cluster::new`] or [`Cluster::upsert_node`] is usage outside the cluster's reservations (usually
//! nothing); each reservation adds to it and each release takes it away again, and `upsert_node` keeps the
//! reservations' share when a node's description changes. So a description passed to `upsert_node` must
//! come from the node (its agent or the store), not from [`Cluster::node`], whose `allocated` already
//! includes the reservations. After a restart the server builds the cluster from the stored nodes (with
//! nothing allocated) and [`Cluster::restore`]s each stored reservation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::node::{Node, NodeError, NodeState};
use crate::place::{place_at, Placement, Strategy, Unschedulable};
use crate::request::{Request, RequestError};
use crate::resources::Resources;

/// Resources held on a node for a request until released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The request's id.
    pub request_id: String,
    /// The node's id.
    pub node: String,
    /// What is held.
    pub resources: Resources,
    /// The request's group, counted in the node's [`Node::groups`] while the reservation lasts.
    #[serde(default)]
    pub group: Option<String>,
}

/// A reservation just made, with the placement that chose its node (for the record and `tartarus inspect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    /// What is now held.
    pub reservation: Reservation,
    /// Why that node.
    pub placement: Placement,
}

/// A node taken out of the cluster, with the reservations that were on it (now gone from the cluster; the
/// caller decides what becomes of their sandboxes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedNode {
    /// The node as it was (its `allocated` includes the reservations).
    pub node: Node,
    /// Its reservations, by request id.
    pub reservations: Vec<Reservation>,
}

/// Nodes and the reservations on them. See the module docs for threading and accounting.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// Sorted by id, ids unique; `allocated` and `groups` include the reservations.
    nodes: Vec<Node>,
    /// By request id.
    reservations: BTreeMap<String, Reservation>,
    /// Node id → ids of the requests reserved on it (no empty sets).
    by_node: BTreeMap<String, BTreeSet<String>>,
}

impl Cluster {
    /// A cluster of these nodes, with no reservations. Refuses invalid nodes and repeated ids.
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self, ClusterError> {
        let mut nodes: Vec<Node> = nodes.into_iter().collect();
        for node in &nodes {
            node.validate()?;
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = nodes.windows(2).find(|pair| pair[0].id == pair[1].id) {
            return Err(ClusterError::DuplicateNode {
                node: pair[0].id.clone(),
            });
        }
        Ok(Cluster {
            nodes,
            reservations: BTreeMap::new(),
            by_node: BTreeMap::new(),
        })
    }

    /// The nodes, by id, with the reservations in their `allocated` and `groups`.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// One node, with the reservations in its `allocated` and `groups`.
    pub fn node(&self, node_id: &str) -> Option<&Node> {
        self.index(node_id).ok().map(|index| &self.nodes[index])
    }

    /// Adds a node, or replaces its description (labels, taints, capacity, pools, state, …) keeping its
    /// reservations. A node whose capacity shrank below its reservations takes nothing new until enough
    /// is released.
    pub fn upsert_node(&mut self, node: Node) -> Result<(), ClusterError> {
        node.validate()?;
        let mut node = node;
        let held = self.by_node.get(&node.id).into_iter().flatten();
        for reservation in held.filter_map(|request_id| self.reservations.get(request_id)) {
            add(&mut node, reservation)?;
        }
        match self.index(&node.id) {
            Ok(index) => self.nodes[index] = node,
            Err(index) => self.nodes.insert(index, node),
        }
        Ok(())
    }

    /// Takes a node out, with its reservations; `None` if there is no such node.
    pub fn remove_node(&mut self, node_id: &str) -> Option<RemovedNode> {
        let node = self.nodes.remove(self.index(node_id).ok()?);
        let held = self.by_node.remove(node_id).unwrap_or_default();
        let reservations = held
            .iter()
            .filter_map(|request_id| self.reservations.remove(request_id))
            .collect();
        Some(RemovedNode { node, reservations })
    }

    /// Sets a node's state (an agent stopped answering, an operator drains it, …).
    pub fn mark(&mut self, node_id: &str, state: NodeState) -> Result<(), ClusterError> {
        let index = self.index(node_id).map_err(|_| ClusterError::UnknownNode {
            node: node_id.to_string(),
        })?;
        self.nodes[index].state = state;
        Ok(())
    }

    /// Where `request` would go now, without reserving anything.
    pub fn place(&self, request: &Request, strategy: Strategy) -> Result<Placement, Unschedulable> {
        place_at(request, &self.nodes, strategy).map(|(_, placement)| placement)
    }

    /// Places `request` and reserves its resources on the chosen node, in one step: on any error nothing
    /// changed. Refuses an invalid request and a request id that already holds a reservation.
    pub fn reserve(&mut self, request: &Request, strategy: Strategy) -> Result<Reserved, ReserveError> {
        request.validate()?;
        if let Some(existing) = self.reservations.get(&request.id) {
            return Err(ReserveError::AlreadyReserved {
                request_id: request.id.clone(),
                node: existing.node.clone(),
            });
        }
        let (index, placement) = place_at(request, &self.nodes, strategy)?;
        let reservation = Reservation {
            request_id: request.id.clone(),
            node: placement.node.clone(),
            resources: request.resources,
            group: request.group.clone(),
        };
        let node = &mut self.nodes[index];
        // The capacity filter passed, so allocated + request ≤ capacity in every kind the request asks
        // for: neither sum can saturate.
        node.allocated = node.allocated.saturating_add(request.resources);
        if let Some(group) = &request.group {
            let count = node.groups.entry(group.clone()).or_insert(0);
            *count = count.saturating_add(1);
        }
        self.by_node
            .entry(node.id.clone())
            .or_default()
            .insert(request.id.clone());
        self.reservations.insert(request.id.clone(), reservation.clone());
        Ok(Reserved {
            reservation,
            placement,
        })
    }

    /// Records a reservation made earlier (loaded from the store after a restart) without placing it. Its
    /// node must exist; capacity is not checked, because the reservation already exists.
    pub fn restore(&mut self, reservation: Reservation) -> Result<(), ClusterError> {
        if let Some(existing) = self.reservations.get(&reservation.request_id) {
            return Err(ClusterError::AlreadyReserved {
                request_id: reservation.request_id.clone(),
                node: existing.node.clone(),
            });
        }
        let index = self
            .index(&reservation.node)
            .map_err(|_| ClusterError::UnknownNode {
                node: reservation.node.clone(),
            })?;
        add(&mut self.nodes[index], &reservation)?;
        self.by_node
            .entry(reservation.node.clone())
            .or_default()
            .insert(reservation.request_id.clone());
        self.reservations
            .insert(reservation.request_id.clone(), reservation);
        Ok(())
    }

    /// Gives back a request's reservation; `None` if it holds none (already released, never reserved, or
    /// its node was removed), so releasing twice is harmless.
    pub fn release(&mut self, request_id: &str) -> Option<Reservation> {
        let reservation = self.reservations.remove(request_id)?;
        if let Some(held) = self.by_node.get_mut(&reservation.node) {
            held.remove(request_id);
            if held.is_empty() {
                self.by_node.remove(&reservation.node);
            }
        }
        if let Ok(index) = self.index(&reservation.node) {
            let node = &mut self.nodes[index];
            // The reservation is part of allocated, so this takes away exactly what it added.
            node.allocated = node.allocated.saturating_sub(reservation.resources);
            if let Some(group) = &reservation.group {
                if let Some(count) = node.groups.get_mut(group) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        node.groups.remove(group);
                    }
                }
            }
        }
        Some(reservation)
    }

    /// A request's reservation.
    pub fn reservation(&self, request_id: &str) -> Option<&Reservation> {
        self.reservations.get(request_id)
    }

    /// Every reservation, by request id.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// The reservations on a node, by request id (none for an unknown node).
    pub fn reservations_on(&self, node_id: &str) -> Vec<&Reservation> {
        let held = self.by_node.get(node_id).into_iter().flatten();
        held.filter_map(|request_id| self.reservations.get(request_id))
            .collect()
    }

    fn index(&self, node_id: &str) -> Result<usize, usize> {
        self.nodes.binary_search_by(|node| node.id.as_str().cmp(node_id))
    }
}

/// Adds a reservation to a node's accounting.
fn add(node: &mut Node, reservation: &Reservation) -> Result<(), ClusterError> {
    let overflow = || ClusterError::Overflow {
        node: node.id.clone(),
    };
    let allocated = node
        .allocated
        .checked_add(reservation.resources)
        .ok_or_else(overflow)?;
    if let Some(group) = &reservation.group {
        let count = node.group_count(group).checked_add(1).ok_or_else(overflow)?;
        node.groups.insert(group.clone(), count);
    }
    node.allocated = allocated;
    Ok(())
}

/// A change to the cluster that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The node description makes no sense.
    #[error(transparent)]
    InvalidNode(#[from] NodeError),
    /// Two nodes have the same id.
    #[error("node {node} is listed twice")]
    DuplicateNode {
        /// The id.
        node: String,
    },
    /// There is no node with this id.
    #[error("no node {node} in the cluster")]
    UnknownNode {
        /// The id.
        node: String,
    },
    /// The request id already holds a reservation.
    #[error("request {request_id} is already reserved on node {node}")]
    AlreadyReserved {
        /// The request.
        request_id: String,
        /// Where it is reserved.
        node: String,
    },
    /// Adding the reservations would overflow the node's accounting.
    #[error("node {node}: allocated resources would overflow")]
    Overflow {
        /// The node.
        node: String,
    },
}

/// Why [`Cluster::reserve`] reserved nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The request makes no sense.
    #[error(transparent)]
    InvalidRequest(#[from] RequestError),
    /// The request id already holds a reservation (release it first).
    #[error("request {request_id} is already reserved on node {node}")]
    AlreadyReserved {
        /// The request.
        request_id: String,
        /// Where it is reserved.
        node: String,
    },
    /// No node can take it now (see [`Unschedulable::never_fits`] for whether one ever could).
    #[error(transparent)]
    Unschedulable(#[from] Unschedulable),
}
