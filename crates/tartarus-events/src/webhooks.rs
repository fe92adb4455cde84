//! Outbound webhooks: every event matching a hook's filter is POSTed to its URL as the event's JSON, signed
//! with HMAC-SHA256 so the receiver can tell it came from this server and was not altered or replayed
//! late.
//!
//! Headers: `X-Tartarus-Event` (the subject), `X-Tartarus-Delivery` (the event id: the same on every
//! retry), `X-Tartarus-Timestamp` (Unix seconds of this attempt) and `X-Tartarus-Signature-256`:
//! `sha256=` and the hex HMAC-SHA256, keyed with the hook's secret, of `TIMESTAMP.BODY`. A receiver checks
//! it with [`verify`] (constant time) and refuses old timestamps.
//!
//! Each hook is a durable consumer of the bus (`webhook-NAME`), served in order: an event is acknowledged
//! once the receiver answered 2xx, or after the last attempt failed (logged). Attempts are bounded in time
//! (no redirects followed) and, across all hooks, in number at once.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::{Backoff, BusError, EventBus, SubjectFilter, SubscribeOptions};

pub const SIGNATURE_HEADER: &str = "x-tartarus-signature-256";
pub const TIMESTAMP_HEADER: &str = "x-tartarus-timestamp";
pub const EVENT_HEADER: &str = "x-tartarus-event";
pub const DELIVERY_HEADER: &str = "x-tartarus-delivery";

/// One receiver.
#[derive(Clone)]
pub struct Webhook {
    /// Names the hook's consumer (`[A-Za-z0-9_-]`).
    pub name: String,
    pub url: url::Url,
    pub secret: Vec<u8>,
    pub filter: SubjectFilter,
}

impl Webhook {
    /// `URL` or `URL FILTER` (default `>`, every event). The hook's name comes from its URL, so a hook
    /// keeps its consumer (what it was sent) across restarts and reorderings of the hooks.
    pub fn parse(setting: &str, secret: &[u8]) -> Result<Webhook, BusError> {
        let (url, filter) = setting.trim().split_once(' ').unwrap_or((setting.trim(), ">"));
        let url =
            url::Url::parse(url).map_err(|e| BusError::Config(format!("the URL does not parse: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(BusError::Config("use an http:// or https:// URL".to_string()));
        }
        if secret.len() < 16 {
            return Err(BusError::Config(
                "a webhook secret needs at least 16 bytes".to_string(),
            ));
        }
        let filter = SubjectFilter::new(filter.trim())?;
        let digest = <Sha256 as sha2::Digest>::digest(url.as_str().as_bytes());
        Ok(Webhook {
            name: format!("hook-{}", hex::encode(&digest[..6])),
            url,
            secret: secret.to_vec(),
            filter,
        })
    }
}

/// Never shows the secret.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

/// Bounds on delivery.
#[derive(Debug, Clone)]
pub struct WebhookLimits {
    /// Requests in flight at once, over all hooks.
    pub concurrency: usize,
    /// One attempt, connection to the end of the answer.
    pub timeout: Duration,
    /// Attempts per event.
    pub attempts: u32,
    /// The delay after the first failed attempt (doubling, at most 5 min).
    pub first_retry: Duration,
}

impl Default for WebhookLimits {
    fn default() -> WebhookLimits {
        WebhookLimits {
            concurrency: 8,
            timeout: Duration::from_secs(10),
            attempts: 6,
            first_retry: Duration::from_secs(1),
        }
    }
}

/// `sha256=HEX` of `timestamp.body` under `secret`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `header` is the signature of `timestamp.body` under `secret`, compared in constant time.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(given) = header.strip_prefix("sha256=").and_then(|h| hex::decode(h).ok()) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&given).is_ok()
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Starts one delivery task per hook; they run until the runtime stops.
pub async fn spawn(
    bus: Arc<dyn EventBus>,
    hooks: Vec<Webhook>,
    limits: WebhookLimits,
) -> Result<Vec<tokio::task::JoinHandle<()>>, BusError> {
    let client = reqwest::Client::builder()
        .timeout(limits.timeout)
        .connect_timeout(limits.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| BusError::Config(format!("webhook client: {e}")))?;
    let permits = Arc::new(Semaphore::new(limits.concurrency.max(1)));
    let mut tasks = Vec::new();
    for hook in hooks {
        let mut options = SubscribeOptions::new(&format!("webhook-{}", hook.name), hook.filter.clone());
        options.buffer = 64;
        let mut subscription = bus.subscribe(options).await?;
        let client = client.clone();
        let permits = permits.clone();
        let limits = limits.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let body = match delivery.event.encode() {
                    Ok(body) => body,
                    Err(e) => {
                        tracing::error!(hook = %hook.name, error = %e.chain(), "webhook: unencodable event");
                        continue;
                    }
                };
                deliver(&client, &permits, &hook, &limits, &delivery.event, &body).await;
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(hook = %hook.name, error = %e.chain(), "webhook: ack failed; the event may be sent again");
                }
            }
        }));
    }
    Ok(tasks)
}

async fn deliver(
    client: &reqwest::Client,
    permits: &Semaphore,
    hook: &Webhook,
    limits: &WebhookLimits,
    event: &crate::Event,
    body: &[u8],
) {
    let mut backoff = Backoff::new(limits.first_retry, Duration::from_secs(300));
    for attempt in 1..=limits.attempts.max(1) {
        let outcome = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            let timestamp = crate::now_ms() / 1000;
            client
                .post(hook.url.clone())
                .header("content-type", "application/json")
                .header(EVENT_HEADER, event.subject.as_str())
                .header(DELIVERY_HEADER, &event.id)
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, sign(&hook.secret, timestamp, body))
                .body(body.to_vec())
                .send()
                .await
        };
        let failure = match outcome {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => format!("answered {}", response.status()),
            // reqwest's errors name the URL, never the secret (which is only in a header).
            Err(e) => e.to_string(),
        };
        if attempt == limits.attempts.max(1) {
            tracing::error!(hook = %hook.name, event = %event.id, attempts = attempt, %failure, "webhook: giving up on an event");
            return;
        }
        let delay = backoff.next_delay();
        tracing::warn!(hook = %hook.name, event = %event.id, attempt, %failure, retry_in = ?delay, "webhook: delivery failed");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_parse_with_a_stable_name() {
        let secret = b"0123456789abcdef";
        let hook = Webhook::parse("https://hooks.example/in task.>", secret).unwrap();
        assert_eq!(hook.filter.as_str(), "task.>");
        assert_eq!(
            hook.name,
            Webhook::parse("https://hooks.example/in", secret).unwrap().name
        );
        assert_eq!(Webhook::parse("http://h/x", secret).unwrap().filter.as_str(), ">");
        assert!(!format!("{hook:?}").contains("0123456789abcdef"));
        for bad in ["ftp://h/x", "not a url", "http://h/x Task..x"] {
            assert!(Webhook::parse(bad, secret).is_err(), "{bad:?} was accepted");
        }
        assert!(Webhook::parse("http://h/x", b"short").is_err());
    }

    #[test]
    fn signatures_verify_and_detect_changes() {
        let signature = sign(b"k3y", 1_700_000_000, b"{\"a\":1}");
        assert!(signature.starts_with("sha256=") && signature.len() == 7 + 64);
        assert!(verify(b"k3y", 1_700_000_000, b"{\"a\":1}", &signature));
        assert!(!verify(b"other", 1_700_000_000, b"{\"a\":1}", &signature));
        assert!(!verify(b"k3y", 1_700_000_001, b"{\"a\":1}", &signature));
        assert!(!verify(b"k3y", 1_700_000_000, b"{\"a\":2}", &signature));
        assert!(!verify(b"k3y", 1_700_000_000, b"{\"a\":1}", "sha256=zz"));
        assert!(!verify(b"k3y", 1_700_000_000, b"{\"a\":1}", &signature[7..]));
    }
}
