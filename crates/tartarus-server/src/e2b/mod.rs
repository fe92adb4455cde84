//! The E2B-compatible surface: the unmodified E2B SDKs (`e2b`, `e2b-code-interpreter`) work against a
//! Tartarus server with `E2B_API_URL` and `E2B_SANDBOX_URL` set to `http://HOST:PORT/e2b`
//! (`tartarus e2b env` prints the lines; docs/e2b.md).
//!
//! - [`control`]: E2B's control-plane REST calls (create, list, get, kill, timeout, pause, resume,
//!   connect), translated to Tartarus sandboxes: the same admission, policies, lanes, quotas and audit as
//!   `POST /v1/sandboxes`, with the SDK's `X-API-Key` mapped to a Tartarus API key.
//! - [`traffic`]: the SDK's in-sandbox calls (its daemon on port 49983, the code interpreter on 49999, any
//!   port), routed by the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers and authorised by the sandbox's
//!   access token, forwarded into the sandbox by [`crate::sandbox_ports`]. Inside the sandbox the E2B
//!   daemon protocol is served by `tartarus envd` (crate `tartarus-envd`), the sandbox's main command, under
//!   the sandbox's own walls.
//!
//! Errors answer E2B's shape, `{"code": STATUS, "message": "..."}`, with the status the SDK maps to its
//! exceptions (404 not found, 401/403 authentication, 429 rate limit).

pub mod control;
pub mod traffic;
mod wire;

use std::path::Path;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

/// Where the E2B surface is served on the API's listener.
pub const PREFIX: &str = "/e2b";
/// The port of the E2B daemon inside a sandbox.
pub const ENVD_PORT: u16 = 49983;
/// The port of the code interpreter's server inside a `code-interpreter-v1` sandbox.
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The E2B daemon version Tartarus's daemon (`tartarus envd`) speaks: the SDK enables features by it.
pub use tartarus_envd::ENVD_VERSION;

/// What the E2B surface needs of the server: the token key and the code interpreter's server file.
#[derive(Debug)]
pub struct E2bState {
    pub tokens: TokenKey,
    /// Host path of the code interpreter's server, mounted into `code-interpreter-v1` sandboxes.
    pub code_interpreter: std::path::PathBuf,
    /// The domain of sandbox host names (`{port}-{id}.DOMAIN`), when the server serves them.
    pub domain: Option<String>,
    /// Host directory of the commands E2B's `base` template has and the host system lacks
    /// ([`COMPAT_COMMANDS`]), mounted at [`COMPAT_BIN`] and first in `PATH`.
    pub compat_bin: std::path::PathBuf,
}

/// Where E2B sandboxes see [`E2bState::compat_bin`].
pub const COMPAT_BIN: &str = "/.tartarus/bin";

/// Commands of E2B's `base` template that a Debian host system lacks: `python` (E2B's is Python 3), and
/// `sudo`, which in a Tartarus sandbox cannot give root: it says so on stderr and runs the command as the
/// sandbox user with the reset environment sudo would give it.
const COMPAT_COMMANDS: [(&str, &str); 2] = [
    ("python", "#!/bin/sh\nexec python3 \"$@\"\n"),
    (
        "sudo",
        "#!/bin/sh\n\
         # Tartarus sandboxes have no root: run the command as the sandbox user, with sudo's reset environment.\n\
         while [ $# -gt 0 ]; do\n\
           case \"$1\" in\n\
             -u|-g|-C|-h|-p|-r|-t|-U|-D) shift 2 ;;\n\
             --) shift; break ;;\n\
             -*) shift ;;\n\
             *) break ;;\n\
           esac\n\
         done\n\
         [ $# -gt 0 ] || { echo 'usage: sudo COMMAND' >&2; exit 1; }\n\
         echo 'sudo: Tartarus sandboxes have no root; running as' \"$(id -un)\" >&2\n\
         exec env -i PATH=\"$PATH\" HOME=\"$HOME\" USER=\"$USER\" LOGNAME=\"$LOGNAME\" SHELL=/bin/bash \"$@\"\n",
    ),
];

impl E2bState {
    /// Loads (or creates) the token key and writes the code interpreter's server under `data_dir`.
    pub fn open(data_dir: &Path, domain: Option<String>) -> std::io::Result<Self> {
        let tokens = TokenKey::load_or_create(data_dir)?;
        let dir = data_dir.join("e2b");
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        // Sandboxes' unprivileged ids open it as a mount source.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let code_interpreter = dir.join("code-interpreter.py");
        let staging = dir.join(format!("code-interpreter.py.{}", std::process::id()));
        std::fs::write(&staging, CODE_INTERPRETER_SERVER)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&staging, &code_interpreter)?;
        let compat_bin = dir.join("bin");
        std::fs::create_dir_all(&compat_bin)?;
        std::fs::set_permissions(&compat_bin, std::fs::Permissions::from_mode(0o755))?;
        for (name, script) in COMPAT_COMMANDS {
            let staging = compat_bin.join(format!(".{name}.{}", std::process::id()));
            std::fs::write(&staging, script)?;
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&staging, compat_bin.join(name))?;
        }
        Ok(E2bState {
            tokens,
            code_interpreter,
            domain: domain.map(|d| d.trim_matches('.').to_ascii_lowercase()),
            compat_bin,
        })
    }
}

use tartarus_envd::CODE_INTERPRETER_SERVER;

/// What the SDK's key check accepts: `e2b_` and hex. `tartarus e2b env` writes a Tartarus key this way
/// (its bytes in hex), which [`api_key_from_header`] turns back.
pub const KEY_PREFIX: &str = "e2b_";

/// The routes under [`PREFIX`]: the control plane, and in-sandbox traffic for requests that name a sandbox.
pub fn routes(state: AppState) -> Router<AppState> {
    control::routes().layer(axum::middleware::from_fn_with_state(
        state,
        traffic::route_sandbox_traffic,
    ))
}

/// A Tartarus API key as E2B's SDK carries it: `e2b_` followed by the key's bytes in hex.
pub fn e2b_api_key(key: &str) -> String {
    format!("{KEY_PREFIX}{}", hex::encode(key.as_bytes()))
}

/// The Tartarus key in an `X-API-Key` value: decoded from [`e2b_api_key`]'s form, else taken as it is.
pub fn api_key_from_header(value: &str) -> String {
    value
        .strip_prefix(KEY_PREFIX)
        .and_then(|hex_part| hex::decode(hex_part).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| value.to_string())
}

/// The secret behind sandboxes' access tokens, kept in `DATA_DIR/e2b-token.key` (created on first use,
/// mode 0600).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("e2b-token.key");
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                return Ok(TokenKey(key));
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not 32 bytes",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let hex_key = tartarus_hostsys::random_hex(32)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(&hex_key, &mut key).map_err(std::io::Error::other)?;
        let staging = data_dir.join(format!("e2b-token.key.{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)?;
        file.write_all(&key)?;
        file.sync_all()?;
        // Two servers starting at once on one data directory: the first rename wins, both read it back.
        match std::fs::hard_link(&staging, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                return Err(e);
            }
        }
        let _ = std::fs::remove_file(&staging);
        Self::load_or_create(data_dir)
    }

    /// The access token of sandbox `id`: what the SDK sends as `X-Access-Token` on its in-sandbox calls.
    /// Derived, so every create and connect answers the same one and nothing secret is stored per sandbox.
    pub fn access_token(&self, id: &str) -> String {
        let mac = blake3::keyed_hash(&self.0, format!("e2b-access-token:{id}").as_bytes());
        format!("ea_{}", &mac.to_hex()[..40])
    }

    /// The traffic token of sandbox `id`: what the SDK sends as `E2B-Traffic-Access-Token` to the
    /// sandbox's ports other than the daemon's (the code interpreter's).
    pub fn traffic_token(&self, id: &str) -> String {
        let mac = blake3::keyed_hash(&self.0, format!("e2b-traffic-token:{id}").as_bytes());
        format!("et_{}", &mac.to_hex()[..40])
    }

    /// Whether `token` is sandbox `id`'s traffic token.
    pub fn verify_traffic(&self, id: &str, token: &str) -> bool {
        constant_time_eq(&self.traffic_token(id), token)
    }

    /// Whether `token` is sandbox `id`'s, compared in constant time.
    pub fn verify(&self, id: &str, token: &str) -> bool {
        constant_time_eq(&self.access_token(id), token)
    }

    /// A MAC of `message` under this key (hex, 40 digits): signed URLs.
    pub fn mac(&self, message: &str) -> String {
        let mac = blake3::keyed_hash(&self.0, message.as_bytes());
        mac.to_hex()[..40].to_string()
    }
}

/// Whether two strings are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// An error in E2B's shape.
#[derive(Debug)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        E2bError {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        // E2B answers a malformed request 400, where Tartarus says 422.
        let status = match e.status {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        };
        E2bError {
            status,
            message: e.message,
        }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_through_the_sdk_form_and_a_plain_key_is_taken_as_it_is() {
        let key = "tk_abc.DEF-123";
        let sdk_form = e2b_api_key(key);
        assert!(sdk_form.starts_with("e2b_"));
        assert!(sdk_form[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(api_key_from_header(&sdk_form), key);
        assert_eq!(api_key_from_header(key), key);
        // `e2b_` with something that is not hex of UTF-8 stays as sent (an unknown key, refused later).
        assert_eq!(api_key_from_header("e2b_zz"), "e2b_zz");
    }

    #[test]
    fn access_tokens_are_per_sandbox_and_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::load_or_create(dir.path()).unwrap();
        let again = TokenKey::load_or_create(dir.path()).unwrap();
        assert_eq!(
            key.access_token("sb_1"),
            again.access_token("sb_1"),
            "the key persists"
        );
        assert_ne!(key.access_token("sb_1"), key.access_token("sb_2"));
        assert!(key.verify("sb_1", &key.access_token("sb_1")));
        assert!(!key.verify("sb_2", &key.access_token("sb_1")));
        assert!(!key.verify("sb_1", ""));
        assert!(key.verify_traffic("sb_1", &key.traffic_token("sb_1")));
        assert!(
            !key.verify("sb_1", &key.traffic_token("sb_1")),
            "the traffic token is not the access token"
        );
        assert!(!key.verify_traffic("sb_1", &key.access_token("sb_1")));
        let other = tempfile::tempdir().unwrap();
        let other = TokenKey::load_or_create(other.path()).unwrap();
        assert!(!other.verify("sb_1", &key.access_token("sb_1")));
        let mode = std::fs::metadata(dir.path().join("e2b-token.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
