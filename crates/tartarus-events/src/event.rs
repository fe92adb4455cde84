//! Events, their subjects and the filters subscribers choose them by.

use serde::{Deserialize, Serialize};

use crate::BusError;

/// The largest encoded event a provider is given.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

const MAX_SUBJECT_LEN: usize = 128;

/// What happened, as dot-separated tokens of `a-z`, `0-9`, `_` and `-`: `task.created`,
/// `sandbox.ended`, `enforcement.network_violation`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subject(String);

impl Subject {
    pub fn new(subject: &str) -> Result<Subject, BusError> {
        let invalid = |reason| BusError::InvalidSubject {
            subject: subject.escape_debug().to_string(),
            reason,
        };
        if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
            return Err(invalid("must be 1 to 128 characters"));
        }
        for token in subject.split('.') {
            if token.is_empty() {
                return Err(invalid("has an empty token"));
            }
            if !token
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(invalid("tokens may hold only a-z, 0-9, '_' and '-'"));
            }
        }
        Ok(Subject(subject.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Subject {
    type Error = BusError;
    fn try_from(s: String) -> Result<Subject, BusError> {
        Subject::new(&s)
    }
}

impl From<Subject> for String {
    fn from(s: Subject) -> String {
        s.0
    }
}

/// Which subjects a subscriber wants, in NATS's syntax: tokens, `*` for any one token, and a final `>` for
/// one or more tokens (`task.>`, `sandbox.*`, `>` for everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectFilter(String);

impl SubjectFilter {
    pub fn new(filter: &str) -> Result<SubjectFilter, BusError> {
        let invalid = |reason| BusError::InvalidFilter {
            filter: filter.escape_debug().to_string(),
            reason,
        };
        if filter.is_empty() || filter.len() > MAX_SUBJECT_LEN {
            return Err(invalid("must be 1 to 128 characters"));
        }
        let tokens: Vec<&str> = filter.split('.').collect();
        for (n, token) in tokens.iter().enumerate() {
            match *token {
                "*" => {}
                ">" if n + 1 == tokens.len() => {}
                ">" => return Err(invalid("'>' may only be the last token")),
                "" => return Err(invalid("has an empty token")),
                token
                    if token
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') => {}
                _ => {
                    return Err(invalid(
                        "tokens may hold only a-z, 0-9, '_', '-', '*' and a last '>'",
                    ))
                }
            }
        }
        Ok(SubjectFilter(filter.to_string()))
    }

    /// Every subject.
    pub fn all() -> SubjectFilter {
        SubjectFilter(">".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, subject: &Subject) -> bool {
        let mut wanted = self.0.split('.');
        let mut have = subject.0.split('.');
        loop {
            match (wanted.next(), have.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(w), Some(h)) if w == h => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl std::fmt::Display for SubjectFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique (`evt_` and 32 hex digits): a receiver that sees an id twice has seen a redelivery.
    pub id: String,
    pub subject: Subject,
    /// When it was published, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The tenant it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What happened, by subject (docs/events.md).
    pub data: serde_json::Value,
}

impl Event {
    /// A new event with a fresh id, at the current time.
    pub fn new(subject: Subject, tenant: Option<&str>, data: serde_json::Value) -> Event {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // Without the OS's randomness, uniqueness from the clock and a process counter is enough
            // for an id (it is never a secret).
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            bytes[..8].copy_from_slice(&crate::now_ms().to_le_bytes());
            bytes[8..].copy_from_slice(&(n ^ u64::from(std::process::id())).to_le_bytes());
        }
        Event {
            id: format!("evt_{}", hex::encode(bytes)),
            subject,
            at_ms: crate::now_ms(),
            tenant: tenant.map(str::to_string),
            data,
        }
    }

    /// The wire form (JSON), refused past [`MAX_EVENT_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, BusError> {
        let body =
            serde_json::to_vec(self).map_err(|e| BusError::Config(format!("unencodable event: {e}")))?;
        if body.len() > MAX_EVENT_BYTES {
            return Err(BusError::TooLarge { size: body.len() });
        }
        Ok(body)
    }

    /// The wire form read back; `None` (logged by the caller) for bytes that are not an event.
    pub fn decode(body: &[u8]) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(s: &str) -> Subject {
        Subject::new(s).unwrap()
    }

    #[test]
    fn subjects_are_dotted_lowercase_tokens() {
        for good in [
            "task.created",
            "sandbox.ended",
            "enforcement.network_violation",
            "a-b.c_d.9",
        ] {
            assert!(Subject::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Task.created",
            "task..created",
            ".task",
            "task.",
            "task.*",
            "task.>",
            "a b",
        ] {
            assert!(Subject::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Subject::new(&"a".repeat(129)).is_err());
    }

    #[test]
    fn filters_match_like_nats() {
        let cases = [
            (">", "task.created", true),
            ("task.>", "task.created", true),
            ("task.>", "task", false),
            ("task.>", "sandbox.created", false),
            ("task.*", "task.created", true),
            ("task.*", "task.created.more", false),
            ("*.created", "sandbox.created", true),
            ("task.created", "task.created", true),
            ("task.created", "task.create", false),
            ("task", "task.created", false),
        ];
        for (filter, s, expected) in cases {
            assert_eq!(
                SubjectFilter::new(filter).unwrap().matches(&subject(s)),
                expected,
                "{filter} ~ {s}"
            );
        }
        for bad in ["", ">.task", "task.>.x", "task..x", "Task.*", "t x"] {
            assert!(SubjectFilter::new(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn events_round_trip_and_are_bounded() {
        let event = Event::new(
            subject("task.created"),
            Some("team-a"),
            serde_json::json!({"task": "t1"}),
        );
        assert!(event.id.starts_with("evt_") && event.id.len() == 36);
        let body = event.encode().unwrap();
        assert_eq!(Event::decode(&body).unwrap(), event);
        let big = Event::new(
            subject("task.created"),
            None,
            serde_json::json!("x".repeat(MAX_EVENT_BYTES)),
        );
        assert!(matches!(big.encode(), Err(BusError::TooLarge { .. })));
        assert!(Event::decode(br#"{"id":"x","subject":"Bad..","at_ms":1,"data":null}"#).is_err());
    }
}
