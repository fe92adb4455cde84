//! Choosing a provider: `memory`, or a URL whose scheme names it (`postgres://…`, `nats://…`,
//! `redis://…`).

use std::sync::Arc;

use crate::{BusError, EventBus};

/// The kinds of bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Memory,
    Postgres,
    Nats,
    Redis,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Memory => "in-memory",
            Provider::Postgres => "postgres",
            Provider::Nats => "nats",
            Provider::Redis => "redis",
        })
    }
}

/// A validated bus setting.
#[derive(Clone, PartialEq, Eq)]
pub struct BusConfig {
    pub provider: Provider,
    /// The provider's URL (`None` for memory).
    url: Option<String>,
    /// Names the stream, key or tables (`[a-z0-9_]`, at most 32): buses with different namespaces on one
    /// server do not see each other's events.
    pub namespace: String,
    /// Events kept for consumers that are behind (the stream's or table's cap).
    pub retention: usize,
}

/// Never shows the URL: it may hold a password.
impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("provider", &self.provider)
            .field("namespace", &self.namespace)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl BusConfig {
    /// `memory`, `postgres://…` (or `postgresql://…`), `nats://…`, `redis://…`.
    pub fn parse(setting: &str) -> Result<BusConfig, BusError> {
        let provider = match setting.split_once("://").map(|(scheme, _)| scheme) {
            None if setting == "memory" => Provider::Memory,
            Some("postgres" | "postgresql") => Provider::Postgres,
            Some("nats") => Provider::Nats,
            Some("redis") => Provider::Redis,
            _ => {
                return Err(BusError::Config(
                    "use memory, postgres://HOST:PORT/DB, nats://HOST:PORT or redis://HOST:PORT".to_string(),
                ))
            }
        };
        if provider != Provider::Memory {
            url::Url::parse(setting)
                .map_err(|e| BusError::Config(format!("the {provider} URL does not parse: {e}")))?;
        }
        Ok(BusConfig {
            provider,
            url: (provider != Provider::Memory).then(|| setting.to_string()),
            namespace: "tartarus".to_string(),
            retention: 100_000,
        })
    }

    pub fn with_namespace(mut self, namespace: &str) -> Result<BusConfig, BusError> {
        let ok = !namespace.is_empty()
            && namespace.len() <= 32
            && namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && namespace.as_bytes()[0].is_ascii_lowercase();
        if !ok {
            return Err(BusError::Config(format!(
                "namespace '{}' must be 1 to 32 of a-z, 0-9 and '_', starting with a letter",
                namespace.escape_debug()
            )));
        }
        self.namespace = namespace.to_string();
        Ok(self)
    }

    pub fn with_retention(mut self, retention: usize) -> BusConfig {
        self.retention = retention.max(1);
        self
    }
}

/// Connects to the configured provider (each connection attempt bounded by [`crate::REQUEST_TIMEOUT`]).
pub async fn connect(config: &BusConfig) -> Result<Arc<dyn EventBus>, BusError> {
    let url = config.url.as_deref().unwrap_or_default();
    Ok(match config.provider {
        Provider::Memory => Arc::new(crate::memory::MemoryBus::new(config.retention)),
        Provider::Postgres => {
            Arc::new(crate::postgres::PostgresBus::connect(url, &config.namespace, config.retention).await?)
        }
        Provider::Nats => {
            Arc::new(crate::nats::NatsBus::connect(url, &config.namespace, config.retention).await?)
        }
        Provider::Redis => {
            Arc::new(crate::redis_streams::RedisBus::connect(url, &config.namespace, config.retention).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_their_provider() {
        assert_eq!(BusConfig::parse("memory").unwrap().provider, Provider::Memory);
        assert_eq!(
            BusConfig::parse("postgres://u:pw@db:5432/x").unwrap().provider,
            Provider::Postgres
        );
        assert_eq!(
            BusConfig::parse("nats://127.0.0.1:4222").unwrap().provider,
            Provider::Nats
        );
        assert_eq!(
            BusConfig::parse("redis://127.0.0.1:6379").unwrap().provider,
            Provider::Redis
        );
        for bad in ["", "kafka://x", "nats", "memory://", "nats://[::"] {
            assert!(BusConfig::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let config = BusConfig::parse("postgres://u:secret@db/x").unwrap();
        assert!(!format!("{config:?}").contains("secret"));
        assert!(config.clone().with_namespace("t_1").is_ok());
        for bad in ["", "1a", "A", "a-b", "a.b", &"a".repeat(33)] {
            assert!(
                config.clone().with_namespace(bad).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
