//! Plain HTTP: `GET /files` (download), `POST /files` (upload), `GET /envs`.
//!
//! Errors are JSON `{"code": <http status>, "message": ...}` as envd answers them. Bodies are streamed:
//! a download reads the file in chunks, an upload writes each chunk as it arrives.

// The error side of these helpers is the HTTP response itself, built once per failed request.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::fs::{make_dirs, metadata_json, resolve, write_metadata};
use crate::Shared;

const METADATA_HEADER_PREFIX: &str = "x-metadata-";

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({"code": status.as_u16(), "message": message.into()});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn io_error(what: &str, e: &std::io::Error) -> Response {
    use std::io::ErrorKind::*;
    let status = match e.kind() {
        NotFound => StatusCode::NOT_FOUND,
        PermissionDenied => StatusCode::FORBIDDEN,
        IsADirectory | NotADirectory | InvalidInput | AlreadyExists => StatusCode::BAD_REQUEST,
        StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, format!("{what}: {e}"))
}

pub async fn envs() -> Response {
    let map: BTreeMap<String, String> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    axum::Json(map).into_response()
}

/// Whether the client accepts a gzip-encoded body (`Accept-Encoding: gzip`, q not 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            coding.eq_ignore_ascii_case("gzip") && !q_zero
        })
}

/// A writer that hands each compressed block to the response body.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The file gzip-compressed on a blocking thread, block by block (never whole in memory).
fn gzip_body(file: std::fs::File) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        let err_tx = tx.clone();
        let mut enc = flate2::write::GzEncoder::new(
            std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter(tx)),
            flate2::Compression::fast(),
        );
        let result = std::io::copy(&mut file, &mut enc)
            .and_then(|_| enc.finish())
            .and_then(|mut w| w.flush());
        if let Err(e) = result {
            // The body ends with an error, so the client sees a broken transfer, not a short file.
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Body::from_stream(stream)
}

pub async fn download(
    State(state): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(p) = q.get("path").filter(|p| !p.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "missing path");
    };
    let path = resolve(&state.config.home, p);
    let shown = path.display().to_string();
    // O_NONBLOCK: opening a FIFO must not hang the request (it is refused below, not read).
    let file = match tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .await
    {
        Ok(f) => f,
        Err(e) => return io_error(&shown, &e),
    };
    match file.metadata().await {
        Ok(m) if m.is_dir() => {
            return error(StatusCode::BAD_REQUEST, format!("path is a directory: {shown}"))
        }
        Ok(m) if !m.is_file() => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("path is not a regular file: {shown}"),
            )
        }
        Ok(_) => {}
        Err(e) => return io_error(&shown, &e),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let disposition = format!(
        "inline; filename=\"{}\"",
        name.replace(['"', '\\', '\r', '\n'], "_")
    );
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::VARY, "Accept-Encoding");
    let response = if accepts_gzip(&headers) {
        let file = file.into_std().await;
        builder
            .header(header::CONTENT_ENCODING, "gzip")
            .body(gzip_body(file))
    } else {
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
        builder.body(Body::from_stream(stream))
    };
    response.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The `X-Metadata-*` headers: keys must be HTTP tokens, values printable ASCII.
fn metadata_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, Response> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER_PREFIX) else {
            continue;
        };
        let valid_key = !key.is_empty()
            && key.len() <= 200
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_key {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid metadata key {key:?}"),
            ));
        }
        let bytes = value.as_bytes();
        if bytes.len() > 4096 || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid value for metadata key {key:?}"),
            ));
        }
        out.insert(key.to_owned(), String::from_utf8_lossy(bytes).into_owned());
    }
    Ok(out)
}

/// Where upload bytes go: the file, through a gzip decoder when the body is compressed.
enum Sink {
    Plain(std::fs::File),
    Gzip(Box<flate2::write::GzDecoder<std::fs::File>>),
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(f) => f.write_all(data),
            Sink::Gzip(d) => d.write_all(data),
        }
    }
    fn finish(self) -> std::io::Result<std::fs::File> {
        match self {
            Sink::Plain(f) => Ok(f),
            Sink::Gzip(d) => d.finish(),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// Writes a stream of chunks to `path` (parents created 0755, the file 0644, metadata replaced).
async fn write_file<S, E>(
    path: PathBuf,
    gzip: bool,
    metadata: &BTreeMap<String, String>,
    chunks: S,
) -> Result<Value, Response>
where
    S: futures_util::Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let mut chunks = std::pin::pin!(chunks);
    let shown = path.display().to_string();
    let p = path.clone();
    let file = blocking(move || {
        if let Some(parent) = p.parent() {
            make_dirs(parent)?;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "path is a directory",
                ))
            }
            // A FIFO or device would block or misbehave; only regular files are written.
            Ok(m) if !m.is_file() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "path is not a regular file",
                ))
            }
            _ => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&p)
    })
    .await
    .map_err(|e| io_error(&shown, &e))?;
    let mut sink = Some(if gzip {
        Sink::Gzip(Box::new(flate2::write::GzDecoder::new(file)))
    } else {
        Sink::Plain(file)
    });
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        let Some(mut s) = sink.take() else { break };
        s = blocking(move || s.write(&chunk).map(|()| s)).await.map_err(|e| {
            let status = if gzip {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            error(status, format!("writing {shown}: {e}"))
        })?;
        sink = Some(s);
    }
    let md = metadata.clone();
    let p = path.clone();
    blocking(move || {
        let Some(s) = sink else { return Ok(()) };
        let f = s.finish()?;
        // The mode is 0644 whatever the umask or the file's earlier mode.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        drop(f);
        write_metadata(&p, &md)
    })
    .await
    .map_err(|e| io_error(&format!("finishing {}", path.display()), &e))?;
    let mut v = json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
        "path": path.display().to_string(),
    });
    if !metadata.is_empty() {
        v["metadata"] = metadata_json(metadata);
    }
    Ok(v)
}

pub async fn upload(
    State(state): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let metadata = match metadata_headers(req.headers()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let query_path = q
        .get("path")
        .filter(|p| !p.is_empty())
        .map(|p| resolve(&state.config.home, p));
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = match Multipart::from_request(req, &state).await {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")),
        };
        let mut written = Vec::new();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")),
            };
            if field.name() != Some("file") {
                continue;
            }
            let target = match (&query_path, field.file_name()) {
                (Some(p), _) => p.clone(),
                (None, Some(name)) if !name.is_empty() => resolve(&state.config.home, name),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "a file part needs a path (query) or a file name",
                    )
                }
            };
            match write_file(target, false, &metadata, field).await {
                Ok(v) => written.push(v),
                Err(r) => return r,
            }
        }
        if written.is_empty() {
            return error(StatusCode::BAD_REQUEST, "no file in the upload");
        }
        return axum::Json(written).into_response();
    }
    if content_type.starts_with("application/octet-stream") || content_type.is_empty() {
        let Some(path) = query_path else {
            return error(StatusCode::BAD_REQUEST, "missing path");
        };
        let encoding = req
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .trim()
            .to_ascii_lowercase();
        let gzip = match encoding.as_str() {
            "gzip" => true,
            "identity" | "" => false,
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unsupported Content-Encoding {other:?}"),
                )
            }
        };
        let stream = req.into_body().into_data_stream();
        return match write_file(path, gzip, &metadata, stream).await {
            Ok(v) => axum::Json(vec![v]).into_response(),
            Err(r) => r,
        };
    }
    error(
        StatusCode::BAD_REQUEST,
        format!("unsupported content type {content_type:?}"),
    )
}
