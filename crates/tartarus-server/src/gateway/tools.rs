//! Declared tools: the declaration and its rules, and the declarations as stored.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tartarus_store::Store;
use utoipa::ToSchema;

use super::GatewayError;
use crate::effects::Effects;
use crate::error::ApiError;

/// A tool's default time limit.
const DEFAULT_TIMEOUT_S: u64 = 30;
/// The longest time limit a tool may declare.
const MAX_TIMEOUT_S: u64 = 3600;
/// The longest tool name.
const MAX_NAME_LEN: usize = 64;

/// A declared tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    /// 1–64 of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `http` or `command`.
    pub kind: String,
    /// For `http`: the upstream URL (http or https) every call goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// For `http`: the method (default POST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For `http`: headers added to every call (credentials live here, never in the sandbox; their values
    /// are redacted from traces).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// For `command`: the program (absolute path) and its arguments, run on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Time limit of one call in seconds (default 30, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Tenants that may call it (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

/// A tool declaration that cannot be accepted; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolDefinitionError {
    #[error("tool name '{name}': use 1-{MAX_NAME_LEN} lower-case letters, digits, '-' or '_'")]
    Name { name: String },
    #[error("timeout_s must be between 1 and {MAX_TIMEOUT_S}")]
    Timeout,
    #[error("unknown tool kind '{kind}': use http or command")]
    Kind { kind: String },
    #[error("an http tool has no 'command'")]
    CommandOnHttp,
    #[error("an http tool needs 'url'")]
    MissingUrl,
    #[error("url '{url}'")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("url '{url}': use http:// or https:// with a host")]
    UrlScheme { url: String },
    #[error("method '{method}' is not an HTTP method")]
    Method { method: String },
    #[error("header name '{name}' is not valid")]
    HeaderName { name: String },
    #[error("header '{name}' has an invalid value")]
    HeaderValue { name: String },
    #[error("a command tool has no 'url', 'method' or 'headers'")]
    HttpOnCommand,
    #[error("a command tool needs 'command' starting with an absolute path")]
    CommandPath,
}

impl ToolDefinition {
    /// Checks the declaration.
    pub fn validate(&self) -> Result<(), ToolDefinitionError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_LEN
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(ToolDefinitionError::Name {
                name: self.name.clone(),
            });
        }
        if self.timeout_s.is_some_and(|t| !(1..=MAX_TIMEOUT_S).contains(&t)) {
            return Err(ToolDefinitionError::Timeout);
        }
        match self.kind.as_str() {
            "http" => self.validate_http(),
            "command" => self.validate_command(),
            other => Err(ToolDefinitionError::Kind {
                kind: other.to_string(),
            }),
        }
    }

    fn validate_http(&self) -> Result<(), ToolDefinitionError> {
        if self.command.is_some() {
            return Err(ToolDefinitionError::CommandOnHttp);
        }
        let url = self.url.as_deref().ok_or(ToolDefinitionError::MissingUrl)?;
        let parsed = reqwest::Url::parse(url).map_err(|source| ToolDefinitionError::Url {
            url: url.to_string(),
            source,
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ToolDefinitionError::UrlScheme { url: url.to_string() });
        }
        if let Some(method) = &self.method {
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| ToolDefinitionError::Method {
                method: method.clone(),
            })?;
        }
        for (name, value) in &self.headers {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ToolDefinitionError::HeaderName { name: name.clone() })?;
            HeaderValue::from_str(value)
                .map_err(|_| ToolDefinitionError::HeaderValue { name: name.clone() })?;
        }
        Ok(())
    }

    fn validate_command(&self) -> Result<(), ToolDefinitionError> {
        if self.url.is_some() || self.method.is_some() || !self.headers.is_empty() {
            return Err(ToolDefinitionError::HttpOnCommand);
        }
        match self.command.as_deref().unwrap_or_default().first() {
            Some(program) if program.starts_with('/') => Ok(()),
            _ => Err(ToolDefinitionError::CommandPath),
        }
    }

    /// The time limit of one call.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))
    }

    /// Whether `tenant`'s sandboxes may call it.
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|allowed| allowed == tenant))
    }

    /// The declaration as a tenant sees it (API keys that are not admin, sandboxes): what to call and how
    /// long it may take. The URL (often a credential itself: webhooks, query tokens), headers, command and
    /// the other tenants allowed are the operator's.
    pub fn summary(&self) -> ToolDefinition {
        ToolDefinition {
            name: self.name.clone(),
            description: self.description.clone(),
            kind: self.kind.clone(),
            url: None,
            method: None,
            headers: BTreeMap::new(),
            command: None,
            timeout_s: self.timeout_s,
            tenants: None,
        }
    }

    /// The declaration as shown to admins: header values hidden.
    pub fn public(&self) -> ToolDefinition {
        ToolDefinition {
            headers: self
                .headers
                .keys()
                .map(|k| (k.clone(), "(hidden)".to_string()))
                .collect(),
            ..self.clone()
        }
    }
}

fn decode(name: &str, definition: &str) -> Result<ToolDefinition, GatewayError> {
    serde_json::from_str(definition).map_err(|source| GatewayError::StoredTool {
        name: name.to_string(),
        source,
    })
}

/// The declared tool `name`.
pub async fn stored(store: &Store, name: &str) -> Result<Option<ToolDefinition>, GatewayError> {
    match store.tool(name).await? {
        Some(record) => decode(name, &record.definition).map(Some),
        None => Ok(None),
    }
}

/// Every declared tool.
pub async fn declared(store: &Store) -> Result<Vec<ToolDefinition>, GatewayError> {
    let records = store.tools().await?;
    records
        .iter()
        .map(|record| decode(&record.name, &record.definition))
        .collect()
}

/// The tools `tenant` may call, as shown to its keys and sandboxes ([`ToolDefinition::summary`]); a
/// declaration that cannot be read is left out rather than hiding the others.
pub async fn callable_by(store: &Store, tenant: &str) -> Result<Vec<ToolDefinition>, GatewayError> {
    let records = store.tools().await?;
    Ok(records
        .iter()
        .filter_map(|record| serde_json::from_str::<ToolDefinition>(&record.definition).ok())
        .filter(|tool| tool.allows(tenant))
        .map(|tool| tool.summary())
        .collect())
}

/// Declares (or replaces) `tool`.
pub async fn declare(effects: &Effects, tool: &ToolDefinition) -> Result<(), GatewayError> {
    tool.validate()?;
    let json = serde_json::to_string(tool).map_err(|source| GatewayError::Encode {
        name: tool.name.clone(),
        source,
    })?;
    effects.store.put_tool(&tool.name, &json).await?;
    refresh_secrets(effects).await
}

/// Removes the tool `name`.
pub async fn remove(effects: &Effects, name: &str) -> Result<(), GatewayError> {
    if !effects.store.delete_tool(name).await? {
        return Err(GatewayError::NotDeclared {
            name: name.to_string(),
        });
    }
    refresh_secrets(effects).await
}

/// Makes the declared tools' header values (credentials) secrets that traces never show.
pub async fn refresh_secrets(effects: &Effects) -> Result<(), GatewayError> {
    let mut secrets = Vec::new();
    for record in effects.store.tools().await? {
        if let Ok(tool) = serde_json::from_str::<ToolDefinition>(&record.definition) {
            secrets.extend(tool.headers.into_values());
        }
    }
    if let Ok(mut slot) = effects.tool_secrets.write() {
        *slot = secrets;
    }
    Ok(())
}

/// [`refresh_secrets`] for the server's start-up, which reads an API error's message.
pub async fn refresh_redactor(effects: &Effects) -> Result<(), ApiError> {
    Ok(refresh_secrets(effects).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_tool() -> ToolDefinition {
        ToolDefinition {
            name: "weather".to_string(),
            description: Some("the forecast".to_string()),
            kind: "http".to_string(),
            url: Some("https://api.example.com/v1/forecast".to_string()),
            method: Some("GET".to_string()),
            headers: BTreeMap::from([("Authorization".to_string(), "Bearer s3cr3t".to_string())]),
            command: None,
            timeout_s: Some(10),
            tenants: None,
        }
    }

    fn command_tool() -> ToolDefinition {
        ToolDefinition {
            name: "stamp".to_string(),
            description: None,
            kind: "command".to_string(),
            url: None,
            method: None,
            headers: BTreeMap::new(),
            command: Some(vec!["/usr/bin/date".to_string(), "-u".to_string()]),
            timeout_s: None,
            tenants: Some(vec!["team-a".to_string()]),
        }
    }

    fn with(tool: ToolDefinition, change: impl FnOnce(&mut ToolDefinition)) -> ToolDefinition {
        let mut tool = tool;
        change(&mut tool);
        tool
    }

    #[test]
    fn test_sensible_http_and_command_tools_are_accepted() {
        assert_eq!(http_tool().validate(), Ok(()));
        assert_eq!(command_tool().validate(), Ok(()));
        let minimal = with(http_tool(), |t| {
            t.method = None;
            t.headers.clear();
            t.timeout_s = None;
            t.url = Some("http://127.0.0.1:8080/".to_string());
        });
        assert_eq!(minimal.validate(), Ok(()));
    }

    #[test]
    fn test_names_are_1_to_64_of_lower_case_digits_dash_and_underscore() {
        for (name, ok) in [
            ("a", true),
            ("tool-1_b", true),
            ("x".repeat(MAX_NAME_LEN).as_str(), true),
            ("x".repeat(MAX_NAME_LEN + 1).as_str(), false),
            ("", false),
            ("Weather", false),
            ("a b", false),
            ("a.b", false),
            ("a/b", false),
            ("é", false),
        ] {
            let tool = with(http_tool(), |t| t.name = name.to_string());
            let expected = if ok {
                Ok(())
            } else {
                Err(ToolDefinitionError::Name {
                    name: name.to_string(),
                })
            };
            assert_eq!(tool.validate(), expected, "{name:?}");
        }
    }

    #[test]
    fn test_timeouts_are_1_to_3600_seconds_and_default_to_30() {
        for (timeout_s, ok) in [
            (0, false),
            (1, true),
            (MAX_TIMEOUT_S, true),
            (MAX_TIMEOUT_S + 1, false),
        ] {
            let tool = with(command_tool(), |t| t.timeout_s = Some(timeout_s));
            let expected = if ok {
                Ok(())
            } else {
                Err(ToolDefinitionError::Timeout)
            };
            assert_eq!(tool.validate(), expected, "{timeout_s}");
        }
        assert_eq!(command_tool().timeout(), Duration::from_secs(DEFAULT_TIMEOUT_S));
        assert_eq!(http_tool().timeout(), Duration::from_secs(10));
    }

    #[test]
    fn test_an_unknown_kind_is_refused() {
        let tool = with(http_tool(), |t| t.kind = "grpc".to_string());
        assert_eq!(
            tool.validate(),
            Err(ToolDefinitionError::Kind {
                kind: "grpc".to_string()
            })
        );
    }

    #[test]
    fn test_an_http_tool_needs_an_http_or_https_url_with_a_host() {
        assert_eq!(
            with(http_tool(), |t| t.url = None).validate(),
            Err(ToolDefinitionError::MissingUrl)
        );
        let relative = with(http_tool(), |t| t.url = Some("/v1/forecast".to_string())).validate();
        assert!(
            matches!(&relative, Err(ToolDefinitionError::Url { url, .. }) if url == "/v1/forecast"),
            "{relative:?}"
        );
        for url in [
            "ftp://files.example.com/",
            "file:///etc/passwd",
            "unix:/run/x.sock",
        ] {
            assert_eq!(
                with(http_tool(), |t| t.url = Some(url.to_string())).validate(),
                Err(ToolDefinitionError::UrlScheme { url: url.to_string() }),
                "{url}"
            );
        }
    }

    #[test]
    fn test_an_http_tool_has_no_command() {
        let tool = with(http_tool(), |t| t.command = Some(vec!["/bin/true".to_string()]));
        assert_eq!(tool.validate(), Err(ToolDefinitionError::CommandOnHttp));
    }

    #[test]
    fn test_methods_must_be_http_methods() {
        for method in ["GET", "POST", "PATCH", "PROPFIND"] {
            let tool = with(http_tool(), |t| t.method = Some(method.to_string()));
            assert_eq!(tool.validate(), Ok(()), "{method}");
        }
        for method in ["", "GE T", "GET\n"] {
            let tool = with(http_tool(), |t| t.method = Some(method.to_string()));
            assert_eq!(
                tool.validate(),
                Err(ToolDefinitionError::Method {
                    method: method.to_string()
                }),
                "{method:?}"
            );
        }
    }

    #[test]
    fn test_header_names_and_values_must_be_valid() {
        let bad_name = with(http_tool(), |t| {
            t.headers.insert("X Token".to_string(), "v".to_string());
        });
        assert_eq!(
            bad_name.validate(),
            Err(ToolDefinitionError::HeaderName {
                name: "X Token".to_string()
            })
        );
        let bad_value = with(http_tool(), |t| {
            t.headers
                .insert("X-Token".to_string(), "a\r\nInjected: yes".to_string());
        });
        assert_eq!(
            bad_value.validate(),
            Err(ToolDefinitionError::HeaderValue {
                name: "X-Token".to_string()
            })
        );
    }

    #[test]
    fn test_a_command_tool_needs_an_absolute_program_and_nothing_of_http() {
        for command in [
            None,
            Some(vec![]),
            Some(vec!["date".to_string()]),
            Some(vec!["./date".to_string()]),
        ] {
            let tool = with(command_tool(), |t| t.command = command.clone());
            assert_eq!(
                tool.validate(),
                Err(ToolDefinitionError::CommandPath),
                "{command:?}"
            );
        }
        let changes: [fn(&mut ToolDefinition); 3] = [
            |t| t.url = Some("http://127.0.0.1/".to_string()),
            |t| t.method = Some("POST".to_string()),
            |t| {
                t.headers.insert("A".to_string(), "b".to_string());
            },
        ];
        for change in changes {
            assert_eq!(
                with(command_tool(), change).validate(),
                Err(ToolDefinitionError::HttpOnCommand)
            );
        }
    }

    #[test]
    fn test_tenants_limit_who_may_call_and_none_means_everyone() {
        assert!(http_tool().allows("anyone"));
        assert!(command_tool().allows("team-a"));
        assert!(!command_tool().allows("team-b"));
        assert!(!with(command_tool(), |t| t.tenants = Some(vec![])).allows("team-a"));
    }

    #[test]
    fn test_the_public_declaration_hides_header_values_only() {
        let shown = http_tool().public();
        assert_eq!(
            shown.headers.get("Authorization").map(String::as_str),
            Some("(hidden)")
        );
        assert_eq!(
            ToolDefinition {
                headers: http_tool().headers,
                ..shown
            },
            http_tool()
        );
    }

    #[test]
    fn test_the_summary_keeps_only_what_a_tenant_needs_to_call_it() {
        for tool in [http_tool(), command_tool()] {
            let shown = tool.summary();
            assert_eq!(
                (shown.name.as_str(), shown.kind.as_str()),
                (tool.name.as_str(), tool.kind.as_str())
            );
            assert_eq!(shown.description, tool.description);
            assert_eq!(shown.timeout_s, tool.timeout_s);
            assert_eq!(shown.url, None);
            assert_eq!(shown.method, None);
            assert!(shown.headers.is_empty());
            assert_eq!(shown.command, None);
            assert_eq!(shown.tenants, None);
            let text = serde_json::to_string(&shown).unwrap();
            for secret in ["api.example.com", "s3cr3t", "/usr/bin/date", "team-a"] {
                assert!(!text.contains(secret), "{text} shows {secret}");
            }
        }
    }
}
