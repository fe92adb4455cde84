//! The HTTP handlers, one module per area of the API. Each module's `routes()` is merged into the
//! router in `crate::router`; handlers parse the request, call the domain code, and turn its error into
//! an [`crate::error::ApiError`] once.

pub mod datasets;
pub mod episodes;
pub mod evaluators;
pub mod keys;
pub mod nodes;
pub mod queue;
pub mod receipts;
pub mod signals;
pub mod tools;
