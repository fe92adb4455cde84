//! The SDK's in-sandbox calls: requests under [`super::PREFIX`] that carry `E2b-Sandbox-Id` (set by the
//! SDK when `E2B_SANDBOX_URL` is), forwarded to the port named by `E2b-Sandbox-Port` (the daemon's,
//! [`super::ENVD_PORT`], when absent) inside that sandbox.
//!
//! The credential is the sandbox's access token (`X-Access-Token`, from the create or connect answer),
//! or for ports other than the daemon's its traffic token (`E2B-Traffic-Access-Token`), not an API key:
//! the SDK sends no API key on these calls. A missing sandbox, one that has ended, one not
//! made through the E2B API and a wrong token all answer the same `502` the SDK reads as "not running",
//! so the answer tells nothing about other tenants' sandboxes.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::control::TEMPLATE_LABEL;
use super::{E2bError, ENVD_PORT};
use crate::AppState;

/// The middleware in front of the control routes: a request naming a sandbox goes into it.
pub async fn route_sandbox_traffic(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(id) = header(&request, "e2b-sandbox-id") else {
        return next.run(request).await;
    };
    match forward(&state, id, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The middleware in front of every route: with `--sandbox-domain D`, a request whose Host is
/// `{port}-{id}.D` (what the SDK's `get_host` returns) goes to that port of that sandbox, with the same
/// tokens as above. Other hosts pass.
pub async fn route_sandbox_hosts(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(domain) = state.e2b.domain.as_deref() else {
        return next.run(request).await;
    };
    let named = header(&request, "host").and_then(|host| sandbox_host(&host, domain));
    let Some((port, id)) = named else {
        return next.run(request).await;
    };
    let mut request = request;
    // What `forward` reads: the same headers the SDK sends to `E2B_SANDBOX_URL`.
    if let (Ok(id), Ok(port)) = (
        axum::http::HeaderValue::from_str(&id),
        axum::http::HeaderValue::from_str(&port.to_string()),
    ) {
        request.headers_mut().insert("e2b-sandbox-id", id);
        request.headers_mut().insert("e2b-sandbox-port", port);
    }
    let id = header(&request, "e2b-sandbox-id").unwrap_or_default();
    match forward(&state, id, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `{port}-{id}.DOMAIN[:listen port]` → the port and the sandbox id.
fn sandbox_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let name = host
        .rsplit_once(':')
        .map_or(host, |(name, port)| match port.parse::<u16>() {
            Ok(_) => name,
            Err(_) => host,
        });
    let name = name.to_ascii_lowercase();
    let label = name.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let valid_id =
        id.len() <= 64 && !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid_id.then(|| (port, id.to_string()))
}

fn header(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

async fn forward(state: &AppState, id: String, request: Request) -> Result<Response, E2bError> {
    let port = match header(&request, "e2b-sandbox-port") {
        None => ENVD_PORT,
        Some(port) => port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                format!("E2b-Sandbox-Port '{port}' is not a port number"),
            )
        })?,
    };
    // E2B's proxy's words, which the SDKs match ("was not found": killed or timed out).
    let not_running = || E2bError::new(StatusCode::BAD_GATEWAY, format!("The sandbox {id} was not found"));
    // The daemon's port takes the access token; the sandbox's other ports take it or the traffic token
    // (which is all the code interpreter's SDK sends).
    let access = header(&request, "x-access-token").unwrap_or_default();
    let traffic = header(&request, "e2b-traffic-access-token").unwrap_or_default();
    let allowed = state.e2b.tokens.verify(&id, &access)
        || (port != ENVD_PORT && state.e2b.tokens.verify_traffic(&id, &traffic));
    if !allowed {
        return Err(not_running());
    }
    let record = state
        .store
        .sandbox(&id, None)
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))?
        .filter(|r| r.status.is_live() && r.labels.contains_key(TEMPLATE_LABEL))
        .ok_or_else(not_running)?;
    let record = match record.paused && super::control::auto_resumes(&record) {
        true => super::control::auto_resume(state, record).await?,
        false => record,
    };
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let forwarded = crate::sandbox_ports::forward(state, &record, port, &path_and_query, request).await;
    match forwarded {
        Ok(response) => Ok(response),
        // Paused or ending: E2B's proxy answers a sandbox it cannot serve like a stopped one.
        Err(e) if e.status == StatusCode::CONFLICT => Err(not_running()),
        Err(e) if e.code == "port_closed" => Err(E2bError::new(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} is running but port {port} is not open"),
        )),
        Err(e) if e.status.is_server_error() => {
            // The shim gone or busy ending the sandbox: "not found" once the store says it ended.
            let ended = state
                .store
                .sandbox(&id, None)
                .await
                .ok()
                .flatten()
                .is_none_or(|r| !r.status.is_live());
            match ended {
                true => Err(not_running()),
                false => Err(E2bError::new(StatusCode::BAD_GATEWAY, e.message)),
            }
        }
        Err(e) => Err(E2bError::from(e)),
    }
}

/// `GET`/`POST /files?path=…&signature=v1_…`: the SDK's signed file URLs (`download_url`, `upload_url`).
///
/// With `E2B_SANDBOX_URL` set, the SDK builds them on the server's root, without any sandbox id: the
/// signature, SHA-256 over `path:operation:username:access_token[:expiration]`, is what names the
/// sandbox, since only its access token produces it. The live E2B sandboxes are tried in turn (one hash
/// each); an expired, tampered or unknown signature is a 401 that tells nothing more.
pub async fn signed_files(State(state): State<AppState>, request: Request) -> Response {
    match signed_files_inner(&state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn signed_files_inner(state: &AppState, request: Request) -> Result<Response, E2bError> {
    let refused = || {
        E2bError::new(
            StatusCode::UNAUTHORIZED,
            "the file URL's signature is invalid or has expired",
        )
    };
    let query = request.uri().query().unwrap_or("").to_string();
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let (Some(path), Some(signature)) = (param("path"), param("signature")) else {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "a signed file URL needs 'path' and 'signature' (made by the SDK's download_url/upload_url)",
        ));
    };
    let operation = match *request.method() {
        axum::http::Method::GET => "read",
        axum::http::Method::POST => "write",
        _ => {
            return Err(E2bError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "signed file URLs are GET or POST",
            ))
        }
    };
    let user = param("username").unwrap_or("");
    let expiration = param("signature_expiration");
    if let Some(expiration) = expiration {
        let at: i64 = expiration.parse().map_err(|_| refused())?;
        if at.saturating_mul(1000) < tartarus_store::now_ms() {
            // E2B's daemon's own words, which clients match.
            return Err(E2bError::new(
                StatusCode::UNAUTHORIZED,
                "signature is already expired",
            ));
        }
    }
    let live = state
        .store
        .sandboxes(None, Some(tartarus_store::SandboxStatus::Running))
        .await
        .map_err(|e| E2bError::from(crate::error::ApiError::from(e)))?;
    let record = live
        .into_iter()
        .filter(|r| r.labels.contains_key(TEMPLATE_LABEL))
        .find(|r| {
            let token = state.e2b.tokens.access_token(&r.id);
            let expected = file_signature(path, operation, user, &token, expiration);
            super::constant_time_eq(&expected, signature)
        })
        .ok_or_else(refused)?;
    let kept: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "signature" && k != "signature_expiration")
        .collect();
    let target = format!(
        "/files?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept.iter().map(|(k, v)| (k, v)))
            .finish()
    );
    crate::sandbox_ports::forward(state, &record, ENVD_PORT, &target, request)
        .await
        .map_err(E2bError::from)
}

/// The SDK's v1 file-URL signature.
fn file_signature(path: &str, operation: &str, user: &str, token: &str, expiration: Option<&str>) -> String {
    use base64::Engine;
    use sha2::Digest;
    let raw = match expiration {
        Some(at) => format!("{path}:{operation}:{user}:{token}:{at}"),
        None => format!("{path}:{operation}:{user}:{token}"),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn sandbox_host_names_are_port_dash_id_under_the_domain() {
        let d = "sbx.example.org";
        assert_eq!(
            super::sandbox_host("8000-sb_0a1b.sbx.example.org", d),
            Some((8000, "sb_0a1b".into()))
        );
        assert_eq!(
            super::sandbox_host("49983-SB_0A1B.SBX.example.org:443", d),
            Some((49983, "sb_0a1b".into()))
        );
        assert_eq!(super::sandbox_host("sbx.example.org", d), None);
        assert_eq!(super::sandbox_host("8000-sb_0a1b.evil.org", d), None);
        assert_eq!(
            super::sandbox_host("8000-sb_0a1b.xsbx.example.org", d),
            None,
            "a label boundary"
        );
        assert_eq!(super::sandbox_host("0-sb_0a1b.sbx.example.org", d), None);
        assert_eq!(super::sandbox_host("99999-sb_0a1b.sbx.example.org", d), None);
        assert_eq!(super::sandbox_host("8000-sb/../x.sbx.example.org", d), None);
    }

    #[test]
    fn the_file_signature_is_the_sdks() {
        // From the SDK: get_signature("a.txt", "read", "user", "tok", None) with hashlib and base64.
        let expected = {
            use base64::Engine;
            use sha2::Digest;
            let digest = sha2::Sha256::digest(b"a.txt:read:user:tok");
            format!(
                "v1_{}",
                base64::engine::general_purpose::STANDARD
                    .encode(digest)
                    .trim_end_matches('=')
            )
        };
        assert_eq!(
            super::file_signature("a.txt", "read", "user", "tok", None),
            expected
        );
        assert_ne!(
            super::file_signature("a.txt", "read", "user", "tok", Some("5")),
            super::file_signature("a.txt", "read", "user", "tok", None)
        );
    }
}
