//! Cluster placement: which node a sandbox request goes to, and the reservations that hold its resources.
//!
//! Pure logic — no I/O, no clock, no async, no globals, no floating point — so decisions are exact and
//! reproducible. Place in the data flow (cluster mode): node agents register and report; the control
//! plane loads nodes and reservations from its database into a [`Cluster`], calls [`Cluster::reserve`]
//! for each sandbox request under one lock, persists the [`Reservation`] and its [`Placement`]
//! explanation (shown by `tartarus inspect`), and [`Cluster::release`]s it when the sandbox ends. Requests
//! that are [`Unschedulable`] are queued, or failed at once when [`Unschedulable::never_fits`].
//!
//! # Filters
//!
//! In this order; a rejected node counts under the first filter it fails ([`RejectReason`]):
//!
//! | # | filter | a node passes when |
//! | --- | --- | --- |
//! | 1 | state | it is [`NodeState::Ready`] (not unreachable, not draining) |
//! | 2 | quarantine | it is a quarantine node exactly when the request is quarantined (or of class `quarantine`) |
//! | 3 | pool | its pools are empty, or contain the request's class (a request without a class needs empty pools) |
//! | 4 | selector | it has every `key=value` of the request's selector |
//! | 5 | taints | the request tolerates each of its `NoSchedule` taints |
//! | 6 | lane | it runs the isolation lane the request names ([`Request::lane`]; a request naming none skips this) |
//! | 7 | capacity | capacity − allocated covers the request's CPU, memory and GPUs |
//!
//! # Scores
//!
//! Integers; the highest wins and the smaller node id breaks ties.
//!
//! | part | points |
//! | --- | --- |
//! | load ([`Strategy`]) | 0 to [`LOAD_SCALE`] (10 000): the mean share of CPU and memory (and GPUs, if requested) free after placement, in basis points; `least-loaded` takes it as is, `bin-pack` takes 10 000 minus it |
//! | affinity | + weight × [`WEIGHT_POINTS`] (100) per matching [`Request::affinity`] term |
//! | anti-affinity | − weight × 100 per matching [`Request::anti_affinity`] term |
//! | `PreferNoSchedule` | − [`PREFER_NO_SCHEDULE_PENALTY`] (10 000) per taint not tolerated |
//! | spread | − [`SPREAD_PENALTY`] (10 000) per reservation of the request's group on the node, when [`Request::spread`] |
//!
//! A weight-100 preference is worth the whole load range; a penalty of 10 000 makes a node the choice only
//! when every other candidate is as penalised (or preferred by affinity).
//!
//! # Example
//!
//! ```
//! use tartarus_scheduler::{Cluster, Node, Request, Resources, Strategy};
//!
//! const GIB: u64 = 1 << 30;
//! let nodes = [
//!     Node::new("node-1", Resources::new(8000, 32 * GIB, 0))?.with_label("zone", "eu"),
//!     Node::new("node-2", Resources::new(8000, 32 * GIB, 0))?.with_label("zone", "us"),
//! ];
//! let mut cluster = Cluster::new(nodes)?;
//! let request = Request::new("sbx-1", Resources::new(2000, 4 * GIB, 0)).with_selector("zone", "eu");
//! let reserved = cluster.reserve(&request, Strategy::LeastLoaded)?;
//! assert_eq!(reserved.reservation.node, "node-1");
//! assert_eq!(
//!     reserved.placement.explanation,
//!     "node-1: least-loaded score 8125 (cpu 75% free, memory 87% free after placement); \
//!      2 nodes: 1 fails selector zone=eu"
//! );
//! cluster.release("sbx-1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod cluster;
pub mod node;
pub mod place;
pub mod request;
pub mod resources;

pub use cluster::{Cluster, ClusterError, RemovedNode, Reservation, ReserveError, Reserved};
pub use node::{IdProblem, Node, NodeError, NodeState, Taint, TaintEffect, MAX_ID_LEN, QUARANTINE_CLASS};
pub use place::{
    place, Placement, RejectReason, Strategy, StrategyError, Unschedulable, LOAD_SCALE,
    PREFER_NO_SCHEDULE_PENALTY, SPREAD_PENALTY, WEIGHT_POINTS,
};
pub use request::{LabelTerm, Request, RequestError, Toleration, MAX_WEIGHT};
pub use resources::{ResourceKind, Resources};
