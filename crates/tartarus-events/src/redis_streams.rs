//! The Redis streams provider: one stream `{namespace}:events` (capped near the retention with
//! `MAXLEN ~`), a consumer group per consumer name. A subscription first reads back what its group was
//! given and never acknowledged (its pending entries), then new entries; `XACK` acknowledges one.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use tokio::sync::mpsc;

use crate::subscription::{Acker, PumpStatus};
use crate::{
    Backoff, BusError, Delivery, Event, EventBus, Provider, SubscribeOptions, Subscription, REQUEST_TIMEOUT,
};

/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_secs(1);
/// The one consumer inside each group (one subscriber per consumer name).
const MEMBER: &str = "subscriber";

pub struct RedisBus {
    client: redis::Client,
    connection: ConnectionManager,
    address: String,
    key: String,
    retention: usize,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REQUEST_TIMEOUT))
        // A blocking read waits up to BLOCK on its own connection.
        .set_response_timeout(Some(REQUEST_TIMEOUT + BLOCK))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(5))
}

impl RedisBus {
    /// Connects within [`REQUEST_TIMEOUT`].
    pub async fn connect(url: &str, namespace: &str, retention: usize) -> Result<RedisBus, BusError> {
        let address = address_of(url);
        let client = redis::Client::open(url).map_err(|e| BusError::Config(format!("redis url: {e}")))?;
        let connection = connect_manager(&client, &address).await?;
        Ok(RedisBus {
            client,
            connection,
            address,
            key: format!("{namespace}:events"),
            retention: retention.max(1),
        })
    }
}

async fn connect_manager(client: &redis::Client, address: &str) -> Result<ConnectionManager, BusError> {
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        ConnectionManager::new_with_config(client.clone(), manager_config()),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(BusError::Unavailable {
            provider: Provider::Redis,
            address: address.to_string(),
            source: Box::new(e),
        }),
        Err(_) => Err(timeout(address)),
    }
}

fn timeout(address: &str) -> BusError {
    BusError::Timeout {
        provider: Provider::Redis,
        address: address.to_string(),
        timeout: REQUEST_TIMEOUT,
    }
}

fn classify(address: &str, operation: &'static str, source: redis::RedisError) -> BusError {
    if source.is_io_error()
        || source.is_connection_dropped()
        || source.is_connection_refusal()
        || source.is_timeout()
    {
        BusError::Unavailable {
            provider: Provider::Redis,
            address: address.to_string(),
            source: Box::new(source),
        }
    } else {
        BusError::Provider {
            provider: Provider::Redis,
            address: address.to_string(),
            operation,
            source: Box::new(source),
        }
    }
}

/// HOST:PORT of a `redis://` URL, for messages (never its credentials).
fn address_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(6379)
        ),
        Err(_) => "(unparseable url)".to_string(),
    }
}

/// Runs one command within [`REQUEST_TIMEOUT`] (plus the block of a blocking read).
async fn query<T: redis::FromRedisValue>(
    command: &redis::Cmd,
    connection: &mut ConnectionManager,
    address: &str,
    operation: &'static str,
) -> Result<T, BusError> {
    match tokio::time::timeout(REQUEST_TIMEOUT + BLOCK, command.query_async::<T>(connection)).await {
        Ok(result) => result.map_err(|e| classify(address, operation, e)),
        Err(_) => Err(timeout(address)),
    }
}

#[async_trait::async_trait]
impl EventBus for RedisBus {
    fn provider(&self) -> Provider {
        Provider::Redis
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let body = event.encode()?;
        let mut command = redis::cmd("XADD");
        command
            .arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.retention)
            .arg("*")
            .arg("event")
            .arg(body);
        let mut connection = self.connection.clone();
        query::<String>(&command, &mut connection, &self.address, "a publish").await?;
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError> {
        options.validate()?;
        let group = group_of(&options.consumer);
        let mut create = redis::cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(&self.key)
            .arg(&group)
            .arg("$")
            .arg("MKSTREAM");
        let mut connection = self.connection.clone();
        match query::<String>(&create, &mut connection, &self.address, "a new consumer group").await {
            Ok(_) => {}
            Err(BusError::Provider { source, .. }) if source.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        // Blocking reads get their own connection, so that they never hold up publishes and acks.
        let reader = connect_manager(&self.client, &self.address).await?;
        let (sender, receiver) = mpsc::channel(options.buffer);
        let status = PumpStatus::default();
        let pump = tokio::spawn(pump(
            Source {
                reader,
                acks: self.connection.clone(),
                address: self.address.clone(),
                key: self.key.clone(),
                group,
            },
            options,
            sender,
            status.clone(),
        ));
        Ok(Subscription::new(receiver, pump, status))
    }
}

fn group_of(consumer: &str) -> String {
    format!("consumer-{consumer}")
}

struct Source {
    reader: ConnectionManager,
    acks: ConnectionManager,
    address: String,
    key: String,
    group: String,
}

async fn pump(
    mut source: Source,
    options: SubscribeOptions,
    sender: mpsc::Sender<Delivery>,
    status: PumpStatus,
) {
    let mut backoff = Backoff::standard();
    let count = options.buffer.min(256);
    // "0": this group's pending entries (delivered before, never acknowledged); ">": new ones.
    let mut pending_from = Some("0".to_string());
    loop {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&source.group)
            .arg(MEMBER)
            .arg("COUNT")
            .arg(count);
        if pending_from.is_none() {
            read.arg("BLOCK").arg(BLOCK.as_millis() as u64);
        }
        read.arg("STREAMS")
            .arg(&source.key)
            .arg(pending_from.as_deref().unwrap_or(">"));
        let reply: Option<StreamReadReply> =
            match query(&read, &mut source.reader, &source.address, "a read").await {
                Ok(reply) => reply,
                Err(e) => {
                    status.failed(&e);
                    backoff.wait().await;
                    continue;
                }
            };
        status.ok();
        backoff.reset();
        let entries: Vec<redis::streams::StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            // Done with the pending entries (or none came within the block): read new ones.
            pending_from = None;
            continue;
        }
        for entry in entries {
            if pending_from.is_some() {
                pending_from = Some(entry.id.clone());
            }
            let ack = RedisAck {
                connection: source.acks.clone(),
                address: source.address.clone(),
                key: source.key.clone(),
                group: source.group.clone(),
                id: entry.id.clone(),
            };
            let body: Option<Vec<u8>> = entry.get("event");
            let event = match body.map(|b| Event::decode(&b)) {
                Some(Ok(event)) => event,
                // An entry trimmed away while pending has no fields left; anything else is not ours.
                other => {
                    if let Some(Err(e)) = other {
                        tracing::error!(key = %source.key, id = %entry.id, error = %e, "event bus: an unreadable event, skipped");
                    }
                    let _ = ack.ack().await;
                    continue;
                }
            };
            if !options.filter.matches(&event.subject) {
                let _ = ack.ack().await;
                continue;
            }
            if sender
                .send(Delivery {
                    event,
                    acker: Acker::Redis(ack),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

pub(crate) struct RedisAck {
    connection: ConnectionManager,
    address: String,
    key: String,
    group: String,
    id: String,
}

impl RedisAck {
    pub(crate) async fn ack(mut self) -> Result<(), BusError> {
        let mut command = redis::cmd("XACK");
        command.arg(&self.key).arg(&self.group).arg(&self.id);
        query::<i64>(&command, &mut self.connection, &self.address, "an ack").await?;
        Ok(())
    }
}
