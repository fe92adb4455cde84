//! The CLI as a client of `tartarus server`: where the server is, with which key, and typed calls.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `~/.config/tartarus/config.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host: Option<String>,
    pub api_key: Option<String>,
}

pub fn config_path() -> PathBuf {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config"),
    };
    base.join("tartarus").join("config.toml")
}

impl Config {
    pub fn load() -> anyhow::Result<Config> {
        let path = config_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the file with mode 0600 (it holds a key).
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let path = config_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = toml::to_string(self)?;
        let tmp = path.with_extension("toml.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// A server error, printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

pub struct Client {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Client {
    /// From `TARTARUS_HOST`/`TARTARUS_API_KEY`, else the config file.
    pub fn from_env() -> anyhow::Result<Client> {
        let (base, key) = host_and_key(None, None)?;
        Ok(Client {
            base,
            key,
            agent: ureq::AgentBuilder::new().build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key))
    }

    fn finish(result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<ureq::Response> {
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                Err(ApiError {
                    status,
                    code: body["error"]["code"].as_str().unwrap_or("error").to_string(),
                    message: body["error"]["message"]
                        .as_str()
                        .unwrap_or("request failed")
                        .to_string(),
                }
                .into())
            }
            Err(e) => Err(anyhow::anyhow!("cannot reach the server: {e}")),
        }
    }

    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let request = self.request(method, path);
        let response = Self::finish(match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        })?;
        Ok(response.into_json().unwrap_or(Value::Null))
    }

    /// POSTs JSON and returns the response body as a reader (for streamed responses).
    pub fn post_stream(&self, path: &str, body: Value) -> anyhow::Result<Box<dyn Read + Send + Sync>> {
        Ok(Self::finish(self.request("POST", path).send_json(body))?.into_reader())
    }

    pub fn put_bytes(&self, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
        Self::finish(self.request("PUT", path).send_bytes(bytes)).map(|_| ())
    }

    /// PUTs a stream (sent chunked: any size) and returns the JSON answer.
    pub fn put_reader(&self, path: &str, reader: impl Read) -> anyhow::Result<Value> {
        let request = self
            .request("PUT", path)
            .set("Content-Type", "application/octet-stream");
        Ok(Self::finish(request.send(reader))?
            .into_json()
            .unwrap_or(Value::Null))
    }

    /// POSTs bytes of a content type and returns the JSON answer.
    pub fn post_bytes(&self, path: &str, content_type: &str, bytes: &[u8]) -> anyhow::Result<Value> {
        let request = self.request("POST", path).set("Content-Type", content_type);
        Ok(Self::finish(request.send_bytes(bytes))?
            .into_json()
            .unwrap_or(Value::Null))
    }

    /// GETs a body as a reader, asking for a media type.
    pub fn get_accepting(&self, path: &str, accept: &str) -> anyhow::Result<Box<dyn Read + Send + Sync>> {
        Ok(Self::finish(self.request("GET", path).set("Accept", accept).call())?.into_reader())
    }

    /// GETs a public path (no key needed) as text.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        Ok(Self::finish(self.agent.get(&format!("{}{path}", self.base)).call())?.into_string()?)
    }

    pub fn get_reader(&self, path: &str) -> anyhow::Result<Box<dyn Read + Send + Sync>> {
        Ok(Self::finish(self.request("GET", path).call())?.into_reader())
    }
}

/// `path` with `name=value` pairs (values already encoded) as its query string, if there are any.
pub fn with_query(path: &str, query: &[String]) -> String {
    match query.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{}", query.join("&")),
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The server's base URL and the API key: `host`/`key` when given, else `TARTARUS_HOST`/`TARTARUS_API_KEY`,
/// else the config file.
pub fn host_and_key(host: Option<String>, key: Option<String>) -> anyhow::Result<(String, String)> {
    let config = Config::load()?;
    let host = host
        .or_else(|| std::env::var("TARTARUS_HOST").ok())
        .or(config.host)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no server configured: set TARTARUS_HOST or run `tartarus config set host http://HOST:PORT`"
            )
        })?;
    let key = key
        .or_else(|| std::env::var("TARTARUS_API_KEY").ok())
        .or(config.api_key)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no API key configured: set TARTARUS_API_KEY or run `tartarus config set api-key KEY`"
            )
        })?;
    let base = if host.contains("://") {
        host
    } else {
        format!("http://{host}")
    };
    Ok((base.trim_end_matches('/').to_string(), key))
}
