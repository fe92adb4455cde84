//! Pulling images from OCI-distribution registries (Docker Hub, GHCR, ECR/GCR, a registry on loopback)
//! into the [`ImageStore`], with `oci-client` doing the protocol and token-auth flows.
//!
//! Each layer is streamed straight from the registry into a decompressor and the unpacker (no blob copy
//! on disk), its sha256 checked as the bytes arrive; the layer becomes visible only after the last byte
//! matched. Up to three layers download at once; a layer already in the store is not fetched, and
//! processes pulling the same layer at the same time wait on its lock so it is fetched once.

use std::io::{self, Read};
use std::sync::Arc;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::store::{normalize_reference, ImageRecord, ImageStore, LayerRecord, RunConfig, StoreError};

/// How to reach and authenticate to the registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP; allowed only for a registry on loopback.
    pub insecure: bool,
    /// Explicit credentials; otherwise the Docker config's (`$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`, including credential helpers), otherwise anonymous.
    pub credentials: Option<(String, String)>,
}

/// Progress of a pull, for the command line.
pub trait Progress: Send + Sync {
    fn manifest(&self, reference: &str, digest: &str, layers: usize);
    fn layer_started(&self, digest: &str, size: u64);
    fn layer_bytes(&self, digest: &str, bytes: u64);
    /// `fetched` is false when the layer was already in the store.
    fn layer_done(&self, digest: &str, fetched: bool);
}

/// Discards progress.
pub struct NoProgress;
impl Progress for NoProgress {
    fn manifest(&self, _: &str, _: &str, _: usize) {}
    fn layer_started(&self, _: &str, _: u64) {}
    fn layer_bytes(&self, _: &str, _: u64) {}
    fn layer_done(&self, _: &str, _: bool) {}
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "refusing plain HTTP to {0}: --insecure is allowed only for a registry on loopback \
         (localhost, 127.0.0.0/8, [::1])"
    )]
    InsecureNotLoopback(String),
    #[error("reading registry credentials for {registry}: {message}")]
    Credentials { registry: String, message: String },
    #[error("{reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("{reference}: the image config is not valid JSON")]
    Config {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("layer {digest}: download failed: {message}")]
    Download { digest: String, message: String },
    #[error("layer {digest}: the registry sent content with digest {actual}")]
    DigestMismatch { digest: String, actual: String },
    #[error("the unpacking task failed: {0}")]
    Task(String),
}

/// Pulls `reference` into `store` and records it; returns the image record.
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    options: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord, PullError> {
    let normalized = normalize_reference(reference)?;
    let parsed: Reference = normalized.parse().map_err(|e| PullError::Registry {
        reference: reference.to_string(),
        message: format!("{e}"),
    })?;
    let registry = parsed.resolve_registry().to_string();
    let protocol = if options.insecure {
        if !is_loopback(&registry) {
            return Err(PullError::InsecureNotLoopback(registry));
        }
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(std::time::Duration::from_secs(15)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    });
    let auth = registry_auth(&registry, options)?;
    let registry_err = |e: oci_client::errors::OciDistributionError| PullError::Registry {
        reference: reference.to_string(),
        message: describe_registry_error(
            &e,
            options.credentials.is_some() || !matches!(auth, RegistryAuth::Anonymous),
        ),
    };

    let _shared = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.lock_shared())
            .await
            .map_err(|e| PullError::Task(e.to_string()))??
    };
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&parsed, &auth)
        .await
        .map_err(registry_err)?;
    progress.manifest(&normalized, &digest, manifest.layers.len());
    let config: serde_json::Value = serde_json::from_str(&config).map_err(|source| PullError::Config {
        reference: reference.to_string(),
        source,
    })?;
    let diff_ids: Vec<Option<String>> = {
        let ids = config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        (0..manifest.layers.len())
            .map(|i| ids.get(i).and_then(|v| v.as_str()).map(str::to_string))
            .collect()
    };

    let client = Arc::new(client);
    // Built up front with owned inputs: the stream holds plain futures, which keeps the whole pull `Send`.
    let fetches: Vec<_> = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            fetch_layer(
                client.clone(),
                parsed.clone(),
                store.clone(),
                layer.clone(),
                diff_id,
                progress.clone(),
            )
        })
        .collect();
    let results: Vec<Result<LayerRecord, PullError>> =
        futures_util::stream::iter(fetches).buffered(3).collect().await;
    let mut size = 0;
    for result in results {
        size += result?.size;
    }
    let record = ImageRecord {
        reference: normalized,
        digest,
        config: run_config(&config),
        layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
        size,
        pulled_ms: now_ms(),
    };
    store.put(&record)?;
    Ok(record)
}

async fn fetch_layer(
    client: Arc<Client>,
    reference: Reference,
    store: ImageStore,
    layer: OciDescriptor,
    diff_id: Option<String>,
    progress: Arc<dyn Progress>,
) -> Result<LayerRecord, PullError> {
    let digest = layer.digest.clone();
    crate::store::sha256_hex(&digest)?;
    if let Some(record) = store.layer(&digest)? {
        progress.layer_done(&digest, false);
        return Ok(record);
    }
    let lock = {
        let store = store.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || store.lock_layer(&digest))
            .await
            .map_err(|e| PullError::Task(e.to_string()))??
    };
    // Another process may have installed it while we waited for the lock.
    if let Some(record) = store.layer(&digest)? {
        progress.layer_done(&digest, false);
        return Ok(record);
    }
    progress.layer_started(&digest, layer.size.max(0) as u64);

    let (sender, receiver) = mpsc::channel::<Chunk>(64);
    let unpack = {
        let store = store.clone();
        let digest = digest.clone();
        let media_type = layer.media_type.clone();
        let size = layer.size.max(0) as u64;
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let blob = ChannelReader {
                receiver,
                current: Vec::new(),
                offset: 0,
            };
            store.install_layer(&digest, &media_type, size, diff_id.as_deref(), blob)
        })
    };
    let download = async {
        let mut stream =
            client
                .pull_blob_stream(&reference, &layer)
                .await
                .map_err(|e| PullError::Download {
                    digest: digest.clone(),
                    message: describe_registry_error(&e, false),
                })?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| PullError::Download {
                digest: digest.clone(),
                message: e.to_string(),
            })?;
            hasher.update(&chunk);
            progress.layer_bytes(&digest, chunk.len() as u64);
            if sender.send(Chunk::Data(chunk.to_vec())).await.is_err() {
                // The unpacker stopped (its error is reported below).
                return Ok(());
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(PullError::DigestMismatch {
                digest: digest.clone(),
                actual,
            });
        }
        let _ = sender.send(Chunk::End).await;
        Ok(())
    };
    let downloaded = download.await;
    // Dropping the sender without `End` makes the unpacker fail, so a failed download installs nothing.
    drop(sender);
    let installed = unpack.await.map_err(|e| PullError::Task(e.to_string()))?;
    downloaded?;
    let record = installed?;
    progress.layer_done(&digest, true);
    Ok(record)
}

enum Chunk {
    Data(Vec<u8>),
    /// The whole blob arrived and matched its digest.
    End,
}

/// The blob as a blocking reader: an error unless the downloader ended it with [`Chunk::End`].
struct ChannelReader {
    receiver: mpsc::Receiver<Chunk>,
    current: Vec<u8>,
    offset: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.current.len() {
            match self.receiver.blocking_recv() {
                Some(Chunk::Data(data)) => {
                    self.current = data;
                    self.offset = 0;
                }
                Some(Chunk::End) => return Ok(0),
                None => return Err(io::Error::other("the download did not complete")),
            }
        }
        let n = buf.len().min(self.current.len() - self.offset);
        buf[..n].copy_from_slice(&self.current[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

fn registry_auth(registry: &str, options: &PullOptions) -> Result<RegistryAuth, PullError> {
    if let Some((user, password)) = &options.credentials {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    // Docker Hub's credentials are stored under its legacy index address.
    let server = match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        other => other,
    };
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(RegistryAuth::Basic(user, password)),
        Ok(DockerCredential::IdentityToken(token)) => Ok(RegistryAuth::Bearer(token)),
        Err(E::ConfigNotFound | E::NoCredentialConfigured | E::ConfigReadError) => {
            Ok(RegistryAuth::Anonymous)
        }
        Err(e) => Err(PullError::Credentials {
            registry: registry.to_string(),
            message: e.to_string(),
        }),
    }
}

/// Whether a registry host (with optional port) is on loopback.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One line for a registry error; `with_credentials` says whether credentials were offered (a refusal
/// then means they are wrong, not missing).
fn describe_registry_error(e: &oci_client::errors::OciDistributionError, with_credentials: bool) -> String {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    match e {
        E::AuthenticationFailure(m) => format!("authentication failed: {m} (check the credentials)"),
        E::UnauthorizedError { url } if with_credentials => {
            format!("the registry refused the credentials for {url}: check the user name and password")
        }
        E::UnauthorizedError { url } => {
            format!(
                "not authorized for {url}: give credentials with --username/--password-stdin or docker login"
            )
        }
        E::ImageManifestNotFoundError(m) => format!("no such image or tag: {m}"),
        E::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown)) =>
        {
            "no such image or tag in the registry (check the repository name and tag)".to_string()
        }
        E::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            match with_credentials {
                true => "the registry refused the credentials: check the user name and password".to_string(),
                false => {
                    "the registry requires credentials: give --username/--password-stdin or docker login"
                        .to_string()
                }
            }
        }
        other => {
            let mut text = tartarus_runtime::error_chain(other);
            if text.contains("InvalidContentType") || text.contains("corrupt message") {
                text.push_str(" (is it a plain-HTTP registry? use --insecure for one on loopback)");
            }
            text
        }
    }
}

fn run_config(config: &serde_json::Value) -> RunConfig {
    let c = config.get("config").cloned().unwrap_or_default();
    let strings = |key: &str| -> Option<Vec<String>> {
        c.get(key)?
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
    };
    let string = |key: &str| {
        c.get(key)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    RunConfig {
        env: strings("Env").unwrap_or_default(),
        cmd: strings("Cmd"),
        entrypoint: strings("Entrypoint"),
        user: string("User"),
        workdir: string("WorkingDir"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_may_be_insecure() {
        for yes in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "registry.example.com",
            "10.0.0.1:5000",
            "docker.io",
            "localhost.evil.com:80",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn run_config_reads_the_docker_config_fields() {
        let config =
            serde_json::json!({"config": {"Env": ["A=1"], "Cmd": ["sh"], "User": "", "WorkingDir": "/w"}});
        let run = run_config(&config);
        assert_eq!(run.env, vec!["A=1"]);
        assert_eq!(run.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(run.user, None);
        assert_eq!(run.workdir.as_deref(), Some("/w"));
        assert_eq!(run.entrypoint, None);
    }
}
