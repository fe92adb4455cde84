//! The control plane on one machine: a REST API (axum) over long-lived sandboxes, API keys with tenants and
//! roles, an audit log, and restart safety.
//!
//! Place in the data flow: request → [`auth::Caller`] (key → tenant, role) → handler → [`sandboxes::Manager`]
//! → one `tartarus shim` per sandbox (the process runtime's supervisor) → state in [`tartarus_store`].
//! The server never forks sandboxes itself: it is multi-threaded, and shims outlive it, so a restart
//! re-adopts running sandboxes instead of losing them.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod connections;
pub mod e2b;
pub mod effects;
pub mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod images;
pub mod limits;
pub mod metrics;
pub mod node_agent;
pub mod policies;
pub mod sandbox_ports;
pub mod sandboxes;
pub mod tasks;
pub mod ui;
pub mod usage;

mod openapi;
pub mod routes;
mod startup;
mod state;

pub use openapi::ApiDoc;
pub use routes::{router, MAX_BODY};
pub use startup::{open_state, open_state_on, serve, serve_on, ServerConfig, ServerError};
pub use state::AppState;
pub(crate) use state::{audit, find, local_only, view};
