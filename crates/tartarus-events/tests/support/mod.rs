//! Test support: the real servers (from the environment, with this machine's defaults), a namespace per
//! test, a TCP proxy that can cut a provider off, and waiting for conditions with deadlines.

#![allow(dead_code)]

pub mod proxy;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tartarus_events::{BusConfig, Delivery, EventBus, Provider, Subscription};

pub fn nats_url() -> String {
    std::env::var("TARTARUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

pub fn redis_url() -> String {
    std::env::var("TARTARUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

pub fn postgres_url() -> String {
    std::env::var("TARTARUS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// The provider's server URL (`None` for memory).
pub fn server_url(provider: Provider) -> Option<String> {
    match provider {
        Provider::Memory => None,
        Provider::Postgres => Some(postgres_url()),
        Provider::Nats => Some(nats_url()),
        Provider::Redis => Some(redis_url()),
    }
}

/// A namespace no other test uses.
pub fn fresh_namespace() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("randomness");
    format!("t{}", hex::encode(bytes))
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).expect("a URL");
    parsed.set_host(Some(&addr.ip().to_string())).expect("a host");
    parsed.set_port(Some(addr.port())).expect("a port");
    parsed.to_string()
}

/// A bus of `provider` on a fresh namespace, failing loudly when its server is not there.
pub async fn bus(provider: Provider, namespace: &str) -> Arc<dyn EventBus> {
    let setting = server_url(provider).unwrap_or_else(|| "memory".to_string());
    bus_at(provider, &setting, namespace).await
}

pub async fn bus_at(provider: Provider, setting: &str, namespace: &str) -> Arc<dyn EventBus> {
    let config = BusConfig::parse(setting)
        .and_then(|c| c.with_namespace(namespace))
        .expect("a bus setting");
    tartarus_events::connect(&config).await.unwrap_or_else(|e| {
        panic!(
            "the {provider} server is not reachable ({}); start it (.ci/run starts NATS with JetStream, \
             Redis and PostgreSQL when nothing listens)",
            e.chain()
        )
    })
}

/// Waits for `condition` to hold, polling every 20 ms, failing with `what` after `deadline`.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !condition().await {
        assert!(started.elapsed() < deadline, "after {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next delivery within `deadline`, failing with `what`.
pub async fn next(subscription: &mut Subscription, deadline: Duration, what: &str) -> Delivery {
    match tokio::time::timeout(deadline, subscription.next()).await {
        Ok(Some(delivery)) => delivery,
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!(
            "no delivery within {deadline:?} while waiting for {what} (last error: {:?})",
            subscription.last_error()
        ),
    }
}

/// Nothing is delivered within `quiet`.
pub async fn assert_quiet(subscription: &mut Subscription, quiet: Duration, what: &str) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, subscription.next()).await {
        panic!("{what}: unexpectedly delivered {:?}", delivery.event);
    }
}

/// Removes what a test left on the provider's server.
pub async fn cleanup(provider: Provider, namespace: &str) {
    match provider {
        Provider::Memory => {}
        Provider::Postgres => {
            let pool = sqlx::PgPool::connect(&postgres_url()).await.expect("postgres");
            for table in [
                format!("{namespace}_events"),
                format!("{namespace}_event_consumers"),
            ] {
                sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(&pool)
                    .await
                    .expect("dropping a test table");
            }
        }
        Provider::Nats => {
            let client = async_nats::connect(nats_url()).await.expect("nats");
            let jetstream = async_nats::jetstream::new(client);
            let _ = jetstream
                .delete_stream(format!("{}_EVENTS", namespace.to_ascii_uppercase()))
                .await;
        }
        Provider::Redis => {
            let client = redis::Client::open(redis_url()).expect("redis url");
            let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
            let _: i64 = redis::cmd("DEL")
                .arg(format!("{namespace}:events"))
                .query_async(&mut connection)
                .await
                .expect("deleting a test stream");
        }
    }
}
