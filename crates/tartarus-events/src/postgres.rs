//! The PostgreSQL provider: events in a table (a dense sequence, written under one advisory lock so that
//! sequence order is commit order), each consumer's acknowledged position in another, and NOTIFY to wake
//! subscribers, which also poll every second in case a notification was lost with a connection.
//!
//! The tables are `{namespace}_events` and `{namespace}_event_consumers`, created when the bus connects.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::mpsc;

use crate::subscription::{Acker, PumpStatus};
use crate::{
    Backoff, BusError, Delivery, Event, EventBus, Provider, SubscribeOptions, Subscription, REQUEST_TIMEOUT,
};

/// Events read per query of a pump.
const BATCH: i64 = 64;
/// How often a pump looks without a notification.
const POLL: Duration = Duration::from_secs(1);
/// Events kept: every this many publishes, older ones beyond the retention are deleted.
const PRUNE_EVERY: i64 = 1024;

pub struct PostgresBus {
    pool: PgPool,
    url: String,
    address: String,
    tables: Tables,
    retention: i64,
}

#[derive(Clone)]
struct Tables {
    events: String,
    consumers: String,
    channel: String,
    /// The advisory lock every publish takes.
    lock_key: i64,
}

impl PostgresBus {
    /// Connects (within [`REQUEST_TIMEOUT`]) and creates the tables if they are missing.
    pub async fn connect(url: &str, namespace: &str, retention: usize) -> Result<PostgresBus, BusError> {
        let address = redacted_address(url);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(REQUEST_TIMEOUT)
            .connect(url)
            .await
            .map_err(|e| unavailable(&address, e))?;
        let tables = Tables {
            events: format!("{namespace}_events"),
            consumers: format!("{namespace}_event_consumers"),
            channel: format!("{namespace}_events"),
            lock_key: i64::from_le_bytes(fnv1a(namespace.as_bytes()).to_le_bytes()),
        };
        let bus = PostgresBus {
            pool,
            url: url.to_string(),
            address,
            tables,
            retention: i64::try_from(retention.max(1)).unwrap_or(i64::MAX),
        };
        bus.create_tables().await?;
        Ok(bus)
    }

    async fn create_tables(&self) -> Result<(), BusError> {
        let Tables {
            events,
            consumers,
            lock_key,
            ..
        } = &self.tables;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.refused("creating tables", e))?;
        // Two servers creating the tables at once would collide in the catalog: one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.refused("creating tables", e))?;
        for statement in [
            format!(
                "CREATE TABLE IF NOT EXISTS {events} (seq BIGINT PRIMARY KEY, subject TEXT NOT NULL, \
                 body TEXT NOT NULL, at_ms BIGINT NOT NULL)"
            ),
            format!("CREATE TABLE IF NOT EXISTS {consumers} (name TEXT PRIMARY KEY, acked BIGINT NOT NULL)"),
        ] {
            sqlx::query(&statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.refused("creating tables", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| self.refused("creating tables", e))?;
        Ok(())
    }

    fn refused(&self, operation: &'static str, source: sqlx::Error) -> BusError {
        classify(&self.address, operation, source)
    }
}

/// A stable 64-bit advisory lock key from the namespace (FNV-1a: no cryptography needed).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The URL without its password, for messages.
fn redacted_address(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(5432)
        ),
        Err(_) => "(unparseable url)".to_string(),
    }
}

fn unavailable(address: &str, source: sqlx::Error) -> BusError {
    BusError::Unavailable {
        provider: Provider::Postgres,
        address: address.to_string(),
        source: Box::new(source),
    }
}

fn classify(address: &str, operation: &'static str, source: sqlx::Error) -> BusError {
    match source {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            unavailable(address, source)
        }
        other => BusError::Provider {
            provider: Provider::Postgres,
            address: address.to_string(),
            operation,
            source: Box::new(other),
        },
    }
}

#[async_trait::async_trait]
impl EventBus for PostgresBus {
    fn provider(&self) -> Provider {
        Provider::Postgres
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let body = String::from_utf8(event.encode()?).map_err(|e| BusError::Config(e.to_string()))?;
        let Tables {
            events,
            channel,
            lock_key,
            ..
        } = &self.tables;
        let publish = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(lock_key)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(&format!(
                "INSERT INTO {events} (seq, subject, body, at_ms) \
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3 FROM {events} RETURNING seq"
            ))
            .bind(event.subject.as_str())
            .bind(&body)
            .bind(event.at_ms)
            .fetch_one(&mut *tx)
            .await?;
            let seq: i64 = row.try_get("seq")?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(seq.to_string())
                .execute(&mut *tx)
                .await?;
            if seq % PRUNE_EVERY == 0 {
                sqlx::query(&format!("DELETE FROM {events} WHERE seq <= $1"))
                    .bind(seq - self.retention)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, publish).await {
            Ok(result) => result.map_err(|e| self.refused("a publish", e)),
            Err(_) => Err(BusError::Timeout {
                provider: Provider::Postgres,
                address: self.address.clone(),
                timeout: REQUEST_TIMEOUT,
            }),
        }
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError> {
        options.validate()?;
        let Tables {
            events, consumers, ..
        } = &self.tables;
        sqlx::query(&format!(
            "INSERT INTO {consumers} (name, acked) SELECT $1, COALESCE(MAX(seq), 0) FROM {events} \
             ON CONFLICT (name) DO NOTHING"
        ))
        .bind(&options.consumer)
        .execute(&self.pool)
        .await
        .map_err(|e| self.refused("a new consumer", e))?;
        let row = sqlx::query(&format!("SELECT acked FROM {consumers} WHERE name = $1"))
            .bind(&options.consumer)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.refused("reading a consumer", e))?;
        let start: i64 = row
            .try_get("acked")
            .map_err(|e| self.refused("reading a consumer", e))?;
        let (sender, receiver) = mpsc::channel(options.buffer);
        let status = PumpStatus::default();
        let pump = tokio::spawn(pump(
            Source {
                pool: self.pool.clone(),
                url: self.url.clone(),
                address: self.address.clone(),
                tables: self.tables.clone(),
            },
            options,
            start,
            sender,
            status.clone(),
        ));
        Ok(Subscription::new(receiver, pump, status))
    }
}

struct Source {
    pool: PgPool,
    url: String,
    address: String,
    tables: Tables,
}

async fn pump(
    source: Source,
    options: SubscribeOptions,
    mut position: i64,
    sender: mpsc::Sender<Delivery>,
    status: PumpStatus,
) {
    let mut backoff = Backoff::standard();
    let mut listener: Option<PgListener> = None;
    let query = format!(
        "SELECT seq, subject, body FROM {} WHERE seq > $1 ORDER BY seq LIMIT {BATCH}",
        source.tables.events
    );
    loop {
        if listener.is_none() {
            match listen(&source).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    status.failed(&e);
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let rows = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            sqlx::query(&query).bind(position).fetch_all(&source.pool),
        )
        .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                status.failed(&classify(&source.address, "reading events", e));
                backoff.wait().await;
                continue;
            }
            Err(_) => {
                status.failed(&BusError::Timeout {
                    provider: Provider::Postgres,
                    address: source.address.clone(),
                    timeout: REQUEST_TIMEOUT,
                });
                backoff.wait().await;
                continue;
            }
        };
        status.ok();
        backoff.reset();
        if rows.is_empty() {
            if let Some(l) = listener.as_mut() {
                match tokio::time::timeout(POLL, l.recv()).await {
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(e)) => {
                        status.failed(&classify(&source.address, "listening", e));
                        listener = None;
                        backoff.wait().await;
                    }
                }
            }
            continue;
        }
        for row in rows {
            let (seq, body): (i64, String) = match (row.try_get("seq"), row.try_get("body")) {
                (Ok(seq), Ok(body)) => (seq, body),
                _ => {
                    tracing::error!(table = %source.tables.events, "event bus: an unreadable row");
                    continue;
                }
            };
            position = seq;
            let event = match Event::decode(body.as_bytes()) {
                Ok(event) => event,
                Err(e) => {
                    tracing::error!(table = %source.tables.events, seq, error = %e, "event bus: an unreadable event, skipped");
                    continue;
                }
            };
            if !options.filter.matches(&event.subject) {
                continue;
            }
            let acker = Acker::Postgres(PostgresAck {
                pool: source.pool.clone(),
                address: source.address.clone(),
                consumers: source.tables.consumers.clone(),
                consumer: options.consumer.clone(),
                seq,
            });
            if sender.send(Delivery { event, acker }).await.is_err() {
                return;
            }
        }
    }
}

async fn listen(source: &Source) -> Result<PgListener, BusError> {
    let listen = async {
        let mut listener = PgListener::connect(&source.url).await?;
        listener.listen(&source.tables.channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, listen).await {
        Ok(result) => result.map_err(|e| classify(&source.address, "LISTEN", e)),
        Err(_) => Err(BusError::Timeout {
            provider: Provider::Postgres,
            address: source.address.clone(),
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

pub(crate) struct PostgresAck {
    pool: PgPool,
    address: String,
    consumers: String,
    consumer: String,
    seq: i64,
}

impl PostgresAck {
    pub(crate) async fn ack(self) -> Result<(), BusError> {
        let statement = format!(
            "UPDATE {} SET acked = GREATEST(acked, $1) WHERE name = $2",
            self.consumers
        );
        let update = sqlx::query(&statement)
            .bind(self.seq)
            .bind(&self.consumer)
            .execute(&self.pool);
        match tokio::time::timeout(REQUEST_TIMEOUT, update).await {
            Ok(result) => result
                .map(|_| ())
                .map_err(|e| classify(&self.address, "an ack", e)),
            Err(_) => Err(BusError::Timeout {
                provider: Provider::Postgres,
                address: self.address,
                timeout: REQUEST_TIMEOUT,
            }),
        }
    }
}
