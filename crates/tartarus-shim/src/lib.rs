//! The seam between the server and the supervisor of one service sandbox (the *shim*).
//!
//! [`protocol`] is the contract both sides compile against: every message is a serde type with a version
//! field, so neither side builds JSON by hand nor reads a reply by string key. The server drives it through
//! its `ShimClient`; the shim process (`tartarus shim`) answers it on behalf of whichever runtime lane holds
//! the sandbox.

pub mod protocol;
