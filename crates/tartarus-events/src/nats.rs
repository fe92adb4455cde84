//! The NATS JetStream provider: one stream `{NAMESPACE}_EVENTS` over the subjects `{namespace}.events.>`
//! (an event `task.created` is the message `{namespace}.events.task.created`, its id the message id the
//! stream deduplicates a retried publish by), and a durable pull consumer per consumer name with explicit
//! acknowledgements: an unacknowledged message is delivered again after `redelivery_after`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::subscription::{Acker, PumpStatus};
use crate::{
    Backoff, BusError, Delivery, Event, EventBus, Provider, SubscribeOptions, Subscription, REQUEST_TIMEOUT,
};

pub struct NatsBus {
    jetstream: jetstream::Context,
    address: String,
    stream: String,
    prefix: String,
}

impl NatsBus {
    /// Connects (within [`REQUEST_TIMEOUT`]) and creates the stream if it is missing, keeping at most
    /// `retention` events.
    pub async fn connect(url: &str, namespace: &str, retention: usize) -> Result<NatsBus, BusError> {
        let address = address_of(url);
        let unavailable = |source: crate::BoxError| BusError::Unavailable {
            provider: Provider::Nats,
            address: address.clone(),
            source,
        };
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT,
            async_nats::ConnectOptions::new()
                .connection_timeout(REQUEST_TIMEOUT)
                .request_timeout(Some(REQUEST_TIMEOUT))
                .connect(url),
        )
        .await
        .map_err(|_| BusError::Timeout {
            provider: Provider::Nats,
            address: address.clone(),
            timeout: REQUEST_TIMEOUT,
        })?
        .map_err(|e| unavailable(Box::new(e)))?;
        let jetstream = jetstream::new(client);
        let stream = format!("{}_EVENTS", namespace.to_ascii_uppercase());
        let prefix = format!("{namespace}.events");
        jetstream
            .get_or_create_stream(stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{prefix}.>")],
                max_messages: i64::try_from(retention.max(1)).unwrap_or(i64::MAX),
                discard: stream::DiscardPolicy::Old,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Provider {
                provider: Provider::Nats,
                address: address.clone(),
                operation: "creating the stream",
                source: Box::new(e),
            })?;
        Ok(NatsBus {
            jetstream,
            address,
            stream,
            prefix,
        })
    }

    fn refused(&self, operation: &'static str, source: crate::BoxError) -> BusError {
        BusError::Provider {
            provider: Provider::Nats,
            address: self.address.clone(),
            operation,
            source,
        }
    }
}

/// HOST:PORT of a `nats://` URL, for messages (never its credentials).
fn address_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(4222)
        ),
        Err(_) => "(unparseable url)".to_string(),
    }
}

#[async_trait::async_trait]
impl EventBus for NatsBus {
    fn provider(&self) -> Provider {
        Provider::Nats
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let body = event.encode()?;
        let subject = format!("{}.{}", self.prefix, event.subject);
        let publish = async {
            let acked = self
                .jetstream
                .send_publish(
                    subject,
                    jetstream::message::PublishMessage::build()
                        .payload(body.into())
                        .message_id(&event.id),
                )
                .await
                .map_err(|e| self.refused("a publish", Box::new(e)))?;
            acked.await.map_err(|e| self.refused("a publish", Box::new(e)))?;
            Ok(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, publish)
            .await
            .map_err(|_| BusError::Timeout {
                provider: Provider::Nats,
                address: self.address.clone(),
                timeout: REQUEST_TIMEOUT,
            })?
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError> {
        options.validate()?;
        let consumer = self.consumer(&options).await?;
        let (sender, receiver) = mpsc::channel(options.buffer);
        let status = PumpStatus::default();
        let pump = tokio::spawn(pump(
            Source {
                jetstream: self.jetstream.clone(),
                address: self.address.clone(),
                stream: self.stream.clone(),
                prefix: self.prefix.clone(),
            },
            consumer,
            options,
            sender,
            status.clone(),
        ));
        Ok(Subscription::new(receiver, pump, status))
    }
}

impl NatsBus {
    async fn consumer(&self, options: &SubscribeOptions) -> Result<consumer::PullConsumer, BusError> {
        Source {
            jetstream: self.jetstream.clone(),
            address: self.address.clone(),
            stream: self.stream.clone(),
            prefix: self.prefix.clone(),
        }
        .consumer(options)
        .await
    }
}

struct Source {
    jetstream: jetstream::Context,
    address: String,
    stream: String,
    prefix: String,
}

impl Source {
    async fn consumer(&self, options: &SubscribeOptions) -> Result<consumer::PullConsumer, BusError> {
        let refused = |operation, source: crate::BoxError| BusError::Provider {
            provider: Provider::Nats,
            address: self.address.clone(),
            operation,
            source,
        };
        let lookup = async {
            let stream = self
                .jetstream
                .get_stream(&self.stream)
                .await
                .map_err(|e| refused("reading the stream", Box::new(e)))?;
            stream
                .get_or_create_consumer(
                    &options.consumer,
                    consumer::pull::Config {
                        durable_name: Some(options.consumer.clone()),
                        filter_subject: format!("{}.{}", self.prefix, options.filter),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: options.redelivery_after,
                        deliver_policy: consumer::DeliverPolicy::New,
                        max_ack_pending: i64::try_from(options.buffer.saturating_mul(2)).unwrap_or(i64::MAX),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| refused("a consumer", Box::new(e)))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, lookup)
            .await
            .map_err(|_| BusError::Timeout {
                provider: Provider::Nats,
                address: self.address.clone(),
                timeout: REQUEST_TIMEOUT,
            })?
    }
}

async fn pump(
    source: Source,
    mut consumer: consumer::PullConsumer,
    options: SubscribeOptions,
    sender: mpsc::Sender<Delivery>,
    status: PumpStatus,
) {
    let mut backoff = Backoff::standard();
    let batch = options.buffer.min(256);
    loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(e) => {
                status.failed(&BusError::Provider {
                    provider: Provider::Nats,
                    address: source.address.clone(),
                    operation: "a pull",
                    source: Box::new(e),
                });
                backoff.wait().await;
                if let Ok(again) = source.consumer(&options).await {
                    consumer = again;
                }
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    status.failed(&BusError::Provider {
                        provider: Provider::Nats,
                        address: source.address.clone(),
                        operation: "a pull",
                        source: Box::new(e),
                    });
                    backoff.wait().await;
                    continue;
                }
            };
            status.ok();
            backoff.reset();
            let event = match Event::decode(&message.payload) {
                Ok(event) => event,
                Err(e) => {
                    tracing::error!(subject = %message.subject, error = %e, "event bus: an unreadable event, skipped");
                    let _ = message.ack().await;
                    continue;
                }
            };
            let acker = Acker::Nats(Box::new(NatsAck {
                message,
                address: source.address.clone(),
            }));
            if sender.send(Delivery { event, acker }).await.is_err() {
                return;
            }
        }
        backoff.wait().await;
    }
}

pub(crate) struct NatsAck {
    message: jetstream::Message,
    address: String,
}

impl NatsAck {
    pub(crate) async fn ack(self) -> Result<(), BusError> {
        // Confirmed by the server, so that an acknowledged event is not delivered again after a reconnect.
        match tokio::time::timeout(REQUEST_TIMEOUT, self.message.double_ack()).await {
            Ok(result) => result.map_err(|source| BusError::Provider {
                provider: Provider::Nats,
                address: self.address,
                operation: "an ack",
                source,
            }),
            Err(_) => Err(BusError::Timeout {
                provider: Provider::Nats,
                address: self.address,
                timeout: REQUEST_TIMEOUT,
            }),
        }
    }
}
