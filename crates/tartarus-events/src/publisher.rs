//! The publishing side the server uses: a bounded outbox drained by one task, so that a request never
//! waits for the bus, a bus that is down is retried with backoff (events keep their order), and a bus down
//! for long costs at most the outbox (past it, events are dropped and counted).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{Backoff, Event, EventBus, Provider};

/// The sending side of the outbox; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    outbox: mpsc::Sender<Event>,
    health: Arc<Health>,
}

struct Health {
    provider: Provider,
    /// Events accepted and not yet published or dropped (the one being retried included).
    pending: AtomicUsize,
    published: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What `GET /healthz` and operators see of the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BusHealth {
    pub provider: String,
    /// False while the last attempt to publish failed.
    pub healthy: bool,
    /// Events waiting in the outbox.
    pub pending: usize,
    pub published: u64,
    /// Events dropped because the outbox was full.
    pub dropped: u64,
    /// The provider's last failure, until a publish succeeds again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Publisher {
    /// Starts the task that drains an outbox of `capacity` events into `bus`.
    pub fn spawn(bus: Arc<dyn EventBus>, capacity: usize) -> Publisher {
        let (outbox, mut pending) = mpsc::channel::<Event>(capacity.max(1));
        let health = Arc::new(Health {
            provider: bus.provider(),
            pending: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let drained = health.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::standard();
            while let Some(event) = pending.recv().await {
                loop {
                    match bus.publish(&event).await {
                        Ok(()) => {
                            drained.published.fetch_add(1, Ordering::Relaxed);
                            drained.pending.fetch_sub(1, Ordering::Relaxed);
                            drained.set_error(None);
                            backoff.reset();
                            break;
                        }
                        Err(crate::BusError::TooLarge { size }) => {
                            tracing::error!(subject = %event.subject, size, "event bus: an event too large to publish, dropped");
                            drained.dropped.fetch_add(1, Ordering::Relaxed);
                            drained.pending.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e.chain(), retry_in = ?delay, "event bus: publish failed");
                            drained.set_error(Some(e.chain()));
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            }
        });
        Publisher { outbox, health }
    }

    /// Queues `event` for the bus without waiting; a full outbox drops it (counted in
    /// [`BusHealth::dropped`]).
    pub fn publish(&self, event: Event) {
        // Counted before it is sent, so that the drain never counts it down first.
        self.health.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.outbox.try_send(event) {
            self.health.pending.fetch_sub(1, Ordering::Relaxed);
            self.health.dropped.fetch_add(1, Ordering::Relaxed);
            let subject = match &e {
                mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event) => {
                    event.subject.to_string()
                }
            };
            tracing::warn!(%subject, "event bus: the outbox is full, an event was dropped");
        }
    }

    pub fn health(&self) -> BusHealth {
        let last_error = self.health.last_error.lock().ok().and_then(|e| e.clone());
        BusHealth {
            provider: self.health.provider.to_string(),
            healthy: last_error.is_none(),
            pending: self.health.pending.load(Ordering::Relaxed),
            published: self.health.published.load(Ordering::Relaxed),
            dropped: self.health.dropped.load(Ordering::Relaxed),
            last_error,
        }
    }
}

impl Health {
    fn set_error(&self, error: Option<String>) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
    }
}
