//! Bounds on the work one caller can start: documents (templates, policies) parsed off the async runtime a
//! few at a time with a time budget, and per-sandbox caps on concurrent execs and tool calls, answered
//! `429 too_many_requests` with `Retry-After` past the cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// Documents parsed at once: parsing is CPU work on blocking threads, so a burst of large documents
/// occupies this many threads and no more.
pub const PARSE_SLOTS: usize = 2;

/// How long a document may wait for a parse slot.
pub const PARSE_WAIT: Duration = Duration::from_secs(10);

/// How long a document may take to parse before the request gets 422 (the parse ends in the background,
/// holding its slot).
pub const PARSE_BUDGET: Duration = Duration::from_secs(10);

/// Concurrent execs per sandbox (buffered or streamed, until their end).
pub const EXECS_PER_SANDBOX: usize = 16;

/// Concurrent connections forwarded into one sandbox's ports (preview URLs, the E2B daemons), until each
/// connection closes.
pub const PORT_CONNECTIONS_PER_SANDBOX: usize = 128;

/// Concurrent tool calls per sandbox (until each call's end, even if its caller hung up).
pub const TOOL_CALLS_PER_SANDBOX: usize = 16;

static PARSERS: Semaphore = Semaphore::const_new(PARSE_SLOTS);

/// Runs `parse` (a document's parse and validation) on a blocking thread, within [`PARSE_SLOTS`] and
/// [`PARSE_BUDGET`], so that no document stalls the async runtime that serves every tenant.
pub async fn parse_document<T: Send + 'static>(
    parse: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let slot = match tokio::time::timeout(PARSE_WAIT, PARSERS.acquire()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) | Err(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many documents are being parsed; retry later",
            ))
        }
    };
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        parse()
    });
    match tokio::time::timeout(PARSE_BUDGET, task).await {
        Ok(Ok(parsed)) => Ok(parsed),
        Ok(Err(e)) => Err(ApiError::internal(format!("parsing a document failed: {e}"))),
        Err(_) => Err(ApiError::invalid(format!(
            "the document took longer than {} s to parse; simplify it",
            PARSE_BUDGET.as_secs()
        ))),
    }
}

/// `429 too_many_requests` with `Retry-After: 1`.
pub fn too_many_requests(message: impl Into<String>) -> Response {
    let mut response =
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Up to `max` holders at once per key (a sandbox id). A key's entry lives while it has holders.
#[derive(Debug)]
pub struct PerKey {
    max: usize,
    keys: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// One of a key's places, given back when dropped.
#[derive(Debug)]
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
    key: String,
    keys: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl PerKey {
    pub fn new(max: usize) -> Self {
        PerKey {
            max,
            keys: Arc::default(),
        }
    }

    /// A place for `key`, or `None` when it has `max` holders already.
    pub fn try_hold(&self, key: &str) -> Option<Held> {
        let mut keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let semaphore = keys
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max)));
        let permit = Arc::clone(semaphore).try_acquire_owned().ok()?;
        Some(Held {
            permit: Some(permit),
            key: key.to_string(),
            keys: Arc::clone(&self.keys),
        })
    }

    /// How many keys have holders.
    pub fn keys(&self) -> usize {
        self.keys.lock().map_or(0, |keys| keys.len())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Under the lock, so that no place is taken between the release and the check.
        let mut keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(self.permit.take());
        // Only the map holds the semaphore: nobody holds a place.
        if keys.get(&self.key).is_some_and(|s| Arc::strong_count(s) == 1) {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_at_most_max_holders_and_its_entry_goes_with_the_last() {
        let limit = PerKey::new(2);
        let a1 = limit.try_hold("a").unwrap();
        let a2 = limit.try_hold("a").unwrap();
        assert!(limit.try_hold("a").is_none());
        let b = limit.try_hold("b").unwrap();
        assert_eq!(limit.keys(), 2);
        drop(a1);
        let a3 = limit.try_hold("a").unwrap();
        drop((a2, a3, b));
        assert_eq!(limit.keys(), 0);
    }

    #[tokio::test]
    async fn documents_parse_on_another_thread() {
        let runtime_thread = std::thread::current().id();
        let parse_thread = parse_document(|| std::thread::current().id()).await.unwrap();
        assert_ne!(parse_thread, runtime_thread);
    }
}
