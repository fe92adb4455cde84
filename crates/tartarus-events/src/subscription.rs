//! A subscriber's end: a bounded buffer of deliveries filled by a pump task that reads the provider.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::{BusError, Event};

/// Deliveries of one consumer, in order. Dropping it stops reading the provider; what was not acknowledged
/// is delivered again to the next subscription of the same consumer name.
pub struct Subscription {
    deliveries: mpsc::Receiver<Delivery>,
    pump: tokio::task::JoinHandle<()>,
    status: PumpStatus,
}

impl Subscription {
    pub(crate) fn new(
        deliveries: mpsc::Receiver<Delivery>,
        pump: tokio::task::JoinHandle<()>,
        status: PumpStatus,
    ) -> Self {
        Subscription {
            deliveries,
            pump,
            status,
        }
    }

    /// The next delivery; `None` once the subscription can deliver nothing more.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// The provider's last failure while this subscription was reading it, until a read succeeds again.
    pub fn last_error(&self) -> Option<String> {
        self.status.last_error()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// What a pump reports about its provider.
#[derive(Debug, Clone, Default)]
pub(crate) struct PumpStatus(Arc<Mutex<Option<String>>>);

impl PumpStatus {
    pub(crate) fn failed(&self, error: &BusError) {
        tracing::warn!(error = %error.chain(), "event bus subscription: retrying");
        if let Ok(mut last) = self.0.lock() {
            *last = Some(error.chain());
        }
    }

    pub(crate) fn ok(&self) {
        if let Ok(mut last) = self.0.lock() {
            *last = None;
        }
    }

    fn last_error(&self) -> Option<String> {
        self.0.lock().ok().and_then(|last| last.clone())
    }
}

/// One event handed to a subscriber, to [`Delivery::ack`] once handled.
pub struct Delivery {
    pub event: Event,
    pub(crate) acker: Acker,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Tells the bus this consumer is done with the event (and, for the providers that keep one position
    /// per consumer, with every earlier one).
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }
}

/// How each provider records an acknowledgement.
pub(crate) enum Acker {
    Memory(crate::memory::MemoryAck),
    Postgres(crate::postgres::PostgresAck),
    Nats(Box<crate::nats::NatsAck>),
    Redis(crate::redis_streams::RedisAck),
}

impl Acker {
    async fn ack(self) -> Result<(), BusError> {
        match self {
            Acker::Memory(ack) => {
                ack.ack();
                Ok(())
            }
            Acker::Postgres(ack) => ack.ack().await,
            Acker::Nats(ack) => ack.ack().await,
            Acker::Redis(ack) => ack.ack().await,
        }
    }
}
