//! A real OCI registry on loopback for image tests: Debian's `docker-registry` (the CNCF distribution
//! registry) started per test, anonymous, behind htpasswd basic auth or behind token auth with a small
//! token server; images built in memory (tar + gzip / zstd) and pushed with `oci-client`; and a TCP
//! proxy in front of the registry that counts requests and injects faults.
//!
//! Needs the Debian packages `docker-registry`, `busybox-static`, `python3` (its `crypt` module makes
//! the bcrypt htpasswd line; `htpasswd` from `apache2-utils` is used where it is missing), `python3-jwt`
//! and `python3-cryptography` (the token server), all at their Debian paths.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
pub const BUSYBOX: &str = "/bin/busybox";
/// Debian's interpreter (with python3-jwt and python3-cryptography), not whatever `python3` is first
/// on PATH.
pub const PYTHON: &str = "/usr/bin/python3";

/// The account the basic-auth and token-auth registries accept.
pub const USER: &str = "tester";
pub const PASSWORD: &str = "correct horse battery";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const READY_DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The hex part of a `sha256:` digest.
pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// ---------------------------------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    /// htpasswd basic auth accepting [`USER`] / [`PASSWORD`].
    Basic,
    /// Bearer tokens from a token server that grants pull and push to [`USER`] / [`PASSWORD`] and, to
    /// anonymous callers, pull on repositories under `public/`.
    Token,
}

/// A running `docker-registry` on 127.0.0.1 with its storage in a temporary directory; killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub auth: Auth,
    token: Option<TokenServer>,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn anonymous() -> Registry {
        Registry::start(Auth::Anonymous)
    }

    pub fn basic() -> Registry {
        Registry::start(Auth::Basic)
    }

    pub fn token() -> Registry {
        Registry::start(Auth::Token)
    }

    pub fn start(auth: Auth) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install the Debian package docker-registry"
        );
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let (auth_yaml, token) = match auth {
            Auth::Anonymous => (String::new(), None),
            Auth::Basic => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, htpasswd_line(USER, PASSWORD)).unwrap();
                (
                    format!(
                        "auth:\n  htpasswd:\n    realm: tartarus-test\n    path: {}\n",
                        path.display()
                    ),
                    None,
                )
            }
            Auth::Token => {
                let token = TokenServer::start(dir.path());
                (
                    format!(
                        "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {}\n    \
                         issuer: {}\n    rootcertbundle: {}\n",
                        token.port,
                        TokenServer::SERVICE,
                        TokenServer::ISSUER,
                        token.cert.display()
                    ),
                    Some(token),
                )
            }
        };
        // The port is chosen by binding :0 and releasing it; another process may take it in between,
        // so a registry that exits before answering is retried on a fresh port.
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: tartarus-test-secret\n\
                     {auth_yaml}",
                    storage = storage.display(),
                ),
            )
            .unwrap();
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let log_file = File::create(&log).unwrap();
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log_file.try_clone().unwrap()))
                .stderr(Stdio::from(log_file))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {REGISTRY_BIN}: {e}"));
            let mut child = child;
            if wait_ready(&mut child, port, &log) {
                return Registry {
                    child,
                    port,
                    auth,
                    token,
                    dir,
                };
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The registry's own log (access log and messages), for failure messages.
    pub fn log(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        paths.sort();
        for p in paths {
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    /// The token server's request log (empty without token auth).
    pub fn token_log(&self) -> String {
        self.token.as_ref().map(TokenServer::log).unwrap_or_default()
    }

    fn credentials(&self) -> RegistryAuth {
        match self.auth {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic | Auth::Token => RegistryAuth::Basic(USER.into(), PASSWORD.into()),
        }
    }

    /// Pushes `image` as `repo:tag` in `format`; returns what a test needs to know about it.
    pub fn push(&self, repo: &str, tag: &str, image: &Image, format: Format) -> Pushed {
        let pushed = self.push_manifest_of(repo, Some(tag), image, format);
        assert!(pushed.digest.starts_with("sha256:"));
        pushed
    }

    /// Pushes each platform's image by digest, then an index (OCI) or manifest list (Docker) naming
    /// them, in the given order, as `repo:tag`. Returns the index digest and each image.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[(&str, &Image)],
        format: Format,
    ) -> (String, Vec<Pushed>) {
        let mut entries = Vec::new();
        let mut pushed = Vec::new();
        for (arch, image) in platforms {
            let p = self.push_manifest_of(repo, None, image, format);
            entries.push(json!({
                "mediaType": format.manifest_type(),
                "digest": p.digest,
                "size": p.manifest.len(),
                "platform": platform_json(arch),
            }));
            pushed.push(p);
        }
        let index_type = match format {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_LIST,
        };
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": entries,
        }))
        .unwrap();
        let digest = sha256(&index);
        let reference = Reference::with_tag(self.host(), repo.into(), tag.into());
        block_on(async {
            let client = self.client(&reference).await;
            client
                .push_manifest_raw(&reference, index.clone(), index_type.parse().unwrap())
                .await
                .unwrap_or_else(|e| panic!("push index {repo}:{tag}: {e}\n{}", self.log()));
        });
        (digest, pushed)
    }

    async fn client(&self, reference: &Reference) -> Client {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        client
            .auth(reference, &self.credentials(), RegistryOperation::Push)
            .await
            .unwrap_or_else(|e| panic!("auth for push: {e}\n{}", self.log()));
        client
    }

    fn push_manifest_of(&self, repo: &str, tag: Option<&str>, image: &Image, format: Format) -> Pushed {
        let config = image.config_json(format);
        let config_digest = sha256(&config);
        let layers: Vec<Value> = image
            .layers
            .iter()
            .map(|l| json!({"mediaType": l.media_type(format), "digest": l.digest, "size": l.data.len()}))
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_type(),
            "config": {"mediaType": format.config_type(), "digest": config_digest, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        let digest = sha256(&manifest);
        let reference = match tag {
            Some(tag) => Reference::with_tag(self.host(), repo.into(), tag.into()),
            None => Reference::with_digest(self.host(), repo.into(), digest.clone()),
        };
        block_on(async {
            let client = self.client(&reference).await;
            for layer in &image.layers {
                client
                    .push_blob(&reference, layer.data.clone(), &layer.digest)
                    .await
                    .unwrap_or_else(|e| panic!("push layer {}: {e}\n{}", layer.digest, self.log()));
            }
            client
                .push_blob(&reference, config.clone(), &config_digest)
                .await
                .unwrap_or_else(|e| panic!("push config: {e}\n{}", self.log()));
            client
                .push_manifest_raw(
                    &reference,
                    manifest.clone(),
                    format.manifest_type().parse().unwrap(),
                )
                .await
                .unwrap_or_else(|e| panic!("push manifest {repo}: {e}\n{}", self.log()));
        });
        Pushed {
            repo: repo.into(),
            tag: tag.map(String::from),
            digest,
            manifest,
            config_digest,
            layers: image.layers.iter().map(|l| l.digest.clone()).collect(),
        }
    }
}

/// Polls GET /v2/ until the registry answers (any HTTP status), or it exits, or the deadline.
fn wait_ready(child: &mut Child, port: u16, log: &Path) -> bool {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let url = format!("http://127.0.0.1:{}/v2/", port);
    let deadline = Instant::now() + READY_DEADLINE;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        match agent.get(&url).call() {
            // Our registry logs its own start; another process that happens to hold the port
            // would answer too, so make sure the log is ours and says it listens.
            Ok(_) | Err(ureq::Error::Status(..)) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.contains("listening on") {
                    return true;
                }
            }
            Err(ureq::Error::Transport(_)) => {}
        }
        std::thread::sleep(POLL);
    }
    false
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What was pushed: enough to name the image and to recognise its blobs in request logs.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub repo: String,
    pub tag: Option<String>,
    /// The manifest's digest.
    pub digest: String,
    pub manifest: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<String>,
}

impl Pushed {
    /// `HOST/repo:tag` (or `HOST/repo@digest` when pushed without a tag), `HOST` being the registry or
    /// a proxy in front of it.
    pub fn reference(&self, host: &str) -> String {
        match &self.tag {
            Some(tag) => format!("{host}/{}:{tag}", self.repo),
            None => self.by_digest(host),
        }
    }

    pub fn by_digest(&self, host: &str) -> String {
        format!("{host}/{}@{}", self.repo, self.digest)
    }

    /// Every blob the image references: its config and its layers.
    pub fn blobs(&self) -> Vec<String> {
        let mut all = vec![self.config_digest.clone()];
        all.extend(self.layers.iter().cloned());
        all
    }

    /// The request path of one of its blobs.
    pub fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.repo)
    }
}

fn platform_json(arch: &str) -> Value {
    match arch {
        "arm64" => json!({"architecture": "arm64", "os": "linux", "variant": "v8"}),
        _ => json!({"architecture": arch, "os": "linux"}),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `USER:BCRYPT` for the registry's htpasswd file (it accepts bcrypt only).
fn htpasswd_line(user: &str, password: &str) -> String {
    let script = "import crypt, sys\n\
                  print(sys.argv[1] + ':' + crypt.crypt(sys.argv[2], crypt.mksalt(crypt.METHOD_BLOWFISH)))";
    let out = Command::new(PYTHON)
        .args(["-W", "ignore", "-c", script, user, password])
        .output();
    if let Ok(out) = out {
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && line.contains(":$2") {
            return format!("{line}\n");
        }
    }
    // Python 3.13 dropped `crypt`: fall back to apache2-utils.
    let out = Command::new("htpasswd")
        .args(["-nbB", user, password])
        .output()
        .expect("no way to make a bcrypt htpasswd line: need python3 with crypt, or apache2-utils");
    assert!(out.status.success(), "htpasswd failed");
    format!("{}\n", String::from_utf8_lossy(&out.stdout).trim())
}

// ---------------------------------------------------------------------------------------------------
// The token server
// ---------------------------------------------------------------------------------------------------

/// The token service of the distribution auth spec, in Python (python3-jwt, python3-cryptography):
/// it makes a P-256 key and a self-signed certificate (written for the registry's `rootcertbundle`),
/// answers GET /token?service=&scope= with an ES256 JWT carrying the certificate in `x5c`. Callers
/// with the right basic credentials get every pull/push they ask for; wrong credentials get 401;
/// anonymous callers get pull on `public/*` only.
const TOKEN_SERVER: &str = r#"
import base64, datetime, json, sys, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

cert_path, user, password, service, issuer = sys.argv[1:6]
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tartarus test token issuer")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
with open(cert_path, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/token":
            return self.reply(404, {"error": "not found"})
        query = parse_qs(url.query)
        account = None
        header = self.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            try:
                u, _, p = base64.b64decode(value).decode().partition(":")
            except Exception:
                u, p = None, None
            if scheme.lower() != "basic" or (u, p) != (user, password):
                sys.stderr.write("TOKEN DENIED %s\n" % (u,))
                sys.stderr.flush()
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]})
            account = u
        access = []
        for scopes in query.get("scope", []):
            for scope in scopes.split(" "):
                parts = scope.split(":")
                if len(parts) < 3 or parts[0] != "repository":
                    continue
                repo, actions = ":".join(parts[1:-1]), parts[-1].split(",")
                if account:
                    granted = [a for a in actions if a in ("pull", "push")]
                elif repo.startswith("public/"):
                    granted = [a for a in actions if a == "pull"]
                else:
                    granted = []
                access.append({"type": "repository", "name": repo, "actions": granted})
        t = int(time.time())
        claims = {"iss": issuer, "sub": account or "", "aud": service, "exp": t + 600, "nbf": t - 60,
                  "iat": t, "jti": uuid.uuid4().hex, "access": access}
        token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": x5c})
        sys.stderr.write("TOKEN ISSUED account=%s access=%s\n" % (account or "-", json.dumps(access)))
        sys.stderr.flush()
        self.reply(200, {"token": token, "access_token": token, "expires_in": 600,
                         "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})

    def log_message(self, fmt, *args):
        sys.stderr.write("REQUEST %s\n" % (fmt % args))
        sys.stderr.flush()

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct TokenServer {
    child: Child,
    port: u16,
    cert: PathBuf,
    log: PathBuf,
}

impl TokenServer {
    const SERVICE: &'static str = "tartarus-test-registry";
    const ISSUER: &'static str = "tartarus-test-issuer";

    fn start(dir: &Path) -> TokenServer {
        let script = dir.join("token_server.py");
        std::fs::write(&script, TOKEN_SERVER).unwrap();
        let cert = dir.join("token.pem");
        let log = dir.join("token-server.txt");
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(&cert)
            .args([USER, PASSWORD, Self::SERVICE, Self::ISSUER])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(&log).unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PYTHON}: {e}"));
        // The script listens before it prints its port.
        let mut line = String::new();
        let mut stdout = child.stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "token server did not start (needs python3-jwt and python3-cryptography): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        TokenServer {
            child,
            port,
            cert,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OCI manifest, config and layer media types.
    Oci,
    /// Docker image manifest v2 schema 2 media types.
    Docker,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_MANIFEST,
            Format::Docker => DOCKER_MANIFEST,
        }
    }

    pub fn config_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_CONFIG,
            Format::Docker => DOCKER_CONFIG,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One compressed layer blob.
#[derive(Clone, Debug)]
pub struct Layer {
    pub compression: Compression,
    /// The blob as pushed.
    pub data: Vec<u8>,
    /// The blob's digest.
    pub digest: String,
    /// The digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    pub tar_size: usize,
}

impl Layer {
    pub fn media_type(&self, format: Format) -> &'static str {
        match (format, self.compression) {
            (Format::Docker, Compression::Gzip) => DOCKER_LAYER_GZIP,
            (_, Compression::Gzip) => OCI_LAYER_GZIP,
            (_, Compression::Zstd) => OCI_LAYER_ZSTD,
            (_, Compression::None) => OCI_LAYER_TAR,
        }
    }
}

/// Builds a layer tarball in memory. Paths are relative to the image root.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        LayerBuilder { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, path: &str, contents: &[u8], mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        self.tar.append_data(&mut h, path, contents).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A hard link at `path` to the earlier entry `target` (a path relative to the root, as in tar).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    /// Deletes `dir/name` of lower layers (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// Hides everything lower layers have in `dir` (`dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// An entry written byte for byte, with no path checks: for hostile layers (`..`, absolute link
    /// targets). Long names and link names use GNU long-name records.
    pub fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8], mode: u32) -> Self {
        let long = |tar: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, value: &[u8]| {
            let mut h = Self::header(kind, 0o644, value.len() as u64 + 1);
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            h.set_cksum();
            let mut v = value.to_vec();
            v.push(0);
            tar.append(&h, &v[..]).unwrap();
        };
        if name.len() > 100 {
            long(&mut self.tar, tar::EntryType::GNULongName, name);
        }
        if link.len() > 100 {
            long(&mut self.tar, tar::EntryType::GNULongLink, link);
        }
        let mut h = Self::header(kind, mode, data.len() as u64);
        {
            let gnu = h.as_gnu_mut().unwrap();
            let n = name.len().min(100);
            gnu.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(100);
            gnu.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    pub fn build(self, compression: Compression) -> Layer {
        let tar = self.tar.into_inner().unwrap();
        let data = match compression {
            Compression::None => tar.clone(),
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&tar).unwrap();
                gz.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).unwrap(),
        };
        Layer {
            compression,
            digest: sha256(&data),
            diff_id: sha256(&tar),
            tar_size: tar.len(),
            data,
        }
    }
}

/// The busybox applets the base layer links into /bin.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "pwd", "env", "stat", "readlink", "wc", "head", "touch", "mkdir", "rm",
    "true", "false", "test",
];

/// The size of the host's static busybox.
pub fn busybox_size() -> u64 {
    std::fs::metadata(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e}: install the Debian package busybox-static"))
        .len()
}

/// A minimal root: the usual directories, /etc/passwd and group, /bin/busybox (static) with its
/// applets as symlinks, and an empty /work.
pub fn base_layer_builder() -> LayerBuilder {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| panic!("{BUSYBOX}: {e}: install busybox-static"));
    let mut b = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("dev", 0o755)
        .dir("etc", 0o755)
        .dir("home", 0o755)
        .dir("proc", 0o755)
        .dir("root", 0o700)
        .dir("sys", 0o755)
        .dir("tmp", 0o1777)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("var", 0o755)
        .dir("work", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nimguser:x:1234:1234:image user:/work:/bin/sh\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\nimguser:x:1234:\n", 0o644)
        .file("bin/busybox", &busybox, 0o755);
    for applet in APPLETS {
        b = b.symlink(&format!("bin/{applet}"), "busybox");
    }
    b
}

pub fn base_layer(compression: Compression) -> Layer {
    base_layer_builder().build(compression)
}

/// What the image config says about running it.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

pub const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Default for RunConfig {
    /// Env GREETING=hello and PATH, WorkingDir /work, Cmd printing both.
    fn default() -> Self {
        RunConfig {
            env: vec![IMAGE_PATH.into(), "GREETING=hello".into()],
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"cmd says $GREETING from $(pwd)\"".into(),
            ]),
            entrypoint: None,
            workdir: Some("/work".into()),
            user: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Image {
    pub arch: String,
    pub layers: Vec<Layer>,
    pub config: RunConfig,
}

impl Image {
    pub fn new(layers: Vec<Layer>, config: RunConfig) -> Image {
        Image {
            arch: host_arch().into(),
            layers,
            config,
        }
    }

    pub fn with_arch(mut self, arch: &str) -> Image {
        self.arch = arch.into();
        self
    }

    pub fn config_json(&self, _format: Format) -> Vec<u8> {
        let c = &self.config;
        let mut config = json!({"Env": c.env});
        if let Some(cmd) = &c.cmd {
            config["Cmd"] = json!(cmd);
        }
        if let Some(ep) = &c.entrypoint {
            config["Entrypoint"] = json!(ep);
        }
        if let Some(w) = &c.workdir {
            config["WorkingDir"] = json!(w);
        }
        if let Some(u) = &c.user {
            config["User"] = json!(u);
        }
        let mut doc = json!({
            "architecture": self.arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
            "history": self.layers.iter().map(|_| json!({"created_by": "tartarus test"})).collect::<Vec<_>>(),
        });
        if self.arch == "arm64" {
            doc["variant"] = json!("v8");
        }
        serde_json::to_vec(&doc).unwrap()
    }
}

/// The OCI name of the host's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------------

/// What the proxy does to the response of a GET of one blob (every time it is asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Sends the headers and half the body, then resets the connection.
    ResetMidBody(String),
    /// Flips one byte in the middle of the body (the length stays right).
    CorruptByte(String),
}

struct ProxyState {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    requests: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// A loopback HTTP proxy in front of a registry: one request per connection (it asks both sides for
/// `Connection: close`), every request line recorded before the request is forwarded, so once a client
/// has its answer the request is counted; faults as set with [`Proxy::set_fault`].
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream,
            fault: Mutex::new(Fault::None),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, &s);
                });
            }
        });
        Proxy { addr, state }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// Every request line seen so far (`GET /v2/... HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// How many times `METHOD path` was requested (query strings ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|line| {
                let mut parts = line.split(' ');
                let m = parts.next().unwrap_or("");
                let p = parts.next().unwrap_or("");
                m == method && p.split('?').next() == Some(path)
            })
            .count()
    }

    pub fn clear(&self) {
        self.state.requests.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn proxy_one(mut client: TcpStream, state: &ProxyState) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    // The request head (pulls send no bodies, but one announced by Content-Length is passed on).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let mut out = format!("{request_line}\r\n");
    let mut body_len = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            body_len = v.trim().parse().unwrap_or(0);
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut body = buf[head_end..].to_vec();
    while body.len() < body_len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    state.requests.lock().unwrap().push(request_line.clone());

    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let fault = state.fault.lock().unwrap().clone();
    let blob_of = |d: &str| method == "GET" && path.ends_with(&format!("/blobs/{d}"));
    let fault = match fault {
        Fault::ResetMidBody(d) if blob_of(&d) => Fault::ResetMidBody(d),
        Fault::CorruptByte(d) if blob_of(&d) => Fault::CorruptByte(d),
        _ => Fault::None,
    };

    let mut upstream = TcpStream::connect(state.upstream)?;
    upstream.write_all(out.as_bytes())?;
    upstream.write_all(&body)?;
    if fault == Fault::None {
        let mut up_read = upstream.try_clone()?;
        std::io::copy(&mut up_read, &mut client)?;
        let _ = client.shutdown(Shutdown::Write);
        return Ok(());
    }
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;
    let body_start = find(&response, b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    let body_len = response.len() - body_start;
    match fault {
        Fault::ResetMidBody(_) => {
            client.write_all(&response[..body_start + body_len / 2])?;
            client.flush()?;
            // SO_LINGER 0: close sends RST instead of FIN.
            rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO))?;
            drop(client);
        }
        Fault::CorruptByte(_) => {
            if body_len > 0 {
                response[body_start + body_len / 2] ^= 0x5a;
            }
            client.write_all(&response)?;
            let _ = client.shutdown(Shutdown::Write);
        }
        Fault::None => unreachable!(),
    }
    Ok(())
}
