//! The event bus: what happened in the control plane — `task.*`, `sandbox.*`, `enforcement.*` — published
//! once and delivered to every subscriber that asked for it, on a provider chosen by configuration.
//!
//! Place in the data flow: the server publishes through a [`Publisher`] (a bounded outbox that never makes a
//! request wait for the bus and retries a bus that is down with backoff); integrations and the outbound
//! [`webhooks`] subscribe with a durable consumer name through [`EventBus::subscribe`].
//!
//! Contract of every provider (checked by one conformance suite, `tests/conformance.rs`, against each):
//! - events of one subject reach a subscriber in the order they were published;
//! - delivery is at least once per consumer name: an event a subscriber did not [`Delivery::ack`] is
//!   delivered again after it subscribes again, and events published while no subscriber of that name was
//!   connected are delivered when one is (a new consumer starts with the events published after it);
//! - every buffer is bounded: a slow subscriber fills its own buffer and never stalls a publisher;
//! - a provider that is down is a [`BusError`] naming the provider and its address, within a bounded
//!   time; subscriptions retry with backoff on their own.
//!
//! Providers: [`memory`] (one process), [`postgres`] (a table and LISTEN/NOTIFY), [`nats`] (a JetStream
//! stream with durable pull consumers) and [`redis_streams`] (a stream with consumer groups).

mod backoff;
mod config;
mod event;
pub mod memory;
pub mod nats;
pub mod postgres;
mod publisher;
pub mod redis_streams;
mod subscription;
pub mod webhooks;

use std::time::Duration;

pub use backoff::Backoff;
pub use config::{connect, BusConfig, Provider};
pub use event::{Event, Subject, SubjectFilter, MAX_EVENT_BYTES};
pub use publisher::{BusHealth, Publisher};
pub use subscription::{Delivery, Subscription};

/// Longest wait for a provider to connect or answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most deliveries a subscription may buffer.
pub const MAX_SUBSCRIPTION_BUFFER: usize = 10_000;

/// The bus seam: one implementation per provider.
#[async_trait::async_trait]
pub trait EventBus: Send + Sync + 'static {
    fn provider(&self) -> Provider;

    /// Stores `event` on the bus. Returns once the provider has it (for NATS and Redis, once the server
    /// acknowledged it; for PostgreSQL, once committed).
    async fn publish(&self, event: &Event) -> Result<(), BusError>;

    /// Starts delivering the events matching `options.filter` to the consumer `options.consumer`. One
    /// subscriber per consumer name at a time.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError>;
}

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// The durable name under which the bus remembers what was acknowledged (`[A-Za-z0-9_-]`, at most 64).
    pub consumer: String,
    pub filter: SubjectFilter,
    /// Deliveries held for the subscriber before the provider is no longer read (1 to
    /// [`MAX_SUBSCRIPTION_BUFFER`]).
    pub buffer: usize,
    /// How long a delivered event may stay unacknowledged before a provider that tracks deliveries (NATS)
    /// hands it out again.
    pub redelivery_after: Duration,
}

impl SubscribeOptions {
    pub fn new(consumer: &str, filter: SubjectFilter) -> SubscribeOptions {
        SubscribeOptions {
            consumer: consumer.to_string(),
            filter,
            buffer: 256,
            redelivery_after: Duration::from_secs(30),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), BusError> {
        let name_ok = !self.consumer.is_empty()
            && self.consumer.len() <= 64
            && self
                .consumer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(BusError::Config(format!(
                "consumer name '{}' must be 1 to 64 of A-Z, a-z, 0-9, '_' and '-'",
                self.consumer.escape_debug()
            )));
        }
        if self.buffer == 0 || self.buffer > MAX_SUBSCRIPTION_BUFFER {
            return Err(BusError::Config(format!(
                "subscription buffer must be 1 to {MAX_SUBSCRIPTION_BUFFER}, not {}",
                self.buffer
            )));
        }
        if self.redelivery_after < Duration::from_millis(100) {
            return Err(BusError::Config(
                "redelivery_after must be at least 100ms".to_string(),
            ));
        }
        Ok(())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the {provider} event bus at {address} is unreachable")]
    Unavailable {
        provider: Provider,
        address: String,
        #[source]
        source: BoxError,
    },
    #[error("the {provider} event bus at {address} did not answer within {timeout:?}")]
    Timeout {
        provider: Provider,
        address: String,
        timeout: Duration,
    },
    #[error("the {provider} event bus at {address} refused {operation}")]
    Provider {
        provider: Provider,
        address: String,
        operation: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("invalid event subject '{subject}': {reason}")]
    InvalidSubject { subject: String, reason: &'static str },
    #[error("invalid subject filter '{filter}': {reason}")]
    InvalidFilter { filter: String, reason: &'static str },
    #[error("an event of {size} bytes is larger than the {MAX_EVENT_BYTES}-byte limit")]
    TooLarge { size: usize },
    #[error("event bus configuration: {0}")]
    Config(String),
}

impl BusError {
    /// The error and its sources on one line, for health reports and logs.
    pub fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            line.push_str(": ");
            line.push_str(&cause.to_string());
            source = cause.source();
        }
        line
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
