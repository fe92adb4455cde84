//! The seam between the server and the supervisor of one service sandbox (the *shim*).
//!
//! [`protocol`] is the contract both sides compile against: every message is a serde type with a version
//! field, so neither side builds JSON by hand nor reads a reply by string key. The server drives it through
//! its `ShimClient`; the shim process ([`serve`], run as `tartarus shim`) answers it on behalf of whichever
//! runtime lane holds the sandbox ([`lane`]).
//!
//! This crate is linked into the lean `tartarus` binary that starts for every sandbox: no async runtime,
//! no HTTP stack.

pub mod lane;
pub mod protocol;
pub mod serve;
