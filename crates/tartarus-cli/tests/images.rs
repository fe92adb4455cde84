//! `tartarus image …` and `tartarus run --image` end to end against a real registry (Debian's
//! `docker-registry`) on loopback: images built in memory and pushed with oci-client in OCI and Docker
//! media types, as indexes, with zstd layers, whiteouts, links and hostile entries; basic and token
//! auth; faults injected by a proxy; a full disk. See `common/registry.rs` for the harness.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::registry::*;
use common::{bin, code, stderr, stdout};
use serde_json::Value;

/// No single command in these tests should take anywhere near this long.
const DEADLINE: Duration = Duration::from_secs(180);

/// A data directory (and a HOME with no docker credentials) per test.
struct Env {
    root: tempfile::TempDir,
    data: PathBuf,
}

impl Env {
    fn new() -> Env {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        Env::with_data(root, data)
    }

    fn with_data(root: tempfile::TempDir, data: PathBuf) -> Env {
        std::fs::create_dir_all(root.path().join("home")).unwrap();
        Env { root, data }
    }

    fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    fn images(&self) -> PathBuf {
        self.data.join("images")
    }

    /// `tartarus ARGS` over this data dir; no proxies, no docker config unless a test sets one.
    fn command(&self, args: &[&str]) -> Command {
        command_of(bin(), &self.data, &self.home(), args)
    }

    fn tartarus(&self, args: &[&str]) -> Output {
        output_within(self.command(args), None)
    }

    fn pull(&self, reference: &str) -> Output {
        self.tartarus(&["image", "pull", "--insecure", reference])
    }

    /// Pulls and checks the contract's last line; returns the digest it names.
    fn pull_ok(&self, reference: &str) -> String {
        let out = self.pull(reference);
        pulled_digest(&out, reference)
    }

    fn ls(&self) -> Vec<Value> {
        let out = self.tartarus(&["image", "ls", "--json"]);
        let text = ok(&out);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("image ls --json: {e}: {text:?}"));
        v.as_array()
            .unwrap_or_else(|| panic!("image ls --json is not an array: {text}"))
            .clone()
    }

    fn inspect(&self, reference: &str) -> Value {
        let text = ok(&self.tartarus(&["image", "inspect", reference]));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("image inspect: {e}: {text:?}"))
    }

    /// `tartarus run --image REF [-- CMD…]`.
    fn run_image(&self, reference: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--image", reference];
        if !cmd.is_empty() {
            args.push("--");
            args.extend_from_slice(cmd);
        }
        self.tartarus(&args)
    }

    fn sh(&self, reference: &str, script: &str) -> String {
        ok(&self.run_image(reference, &["/bin/sh", "-c", script]))
    }

    /// After a failed pull: no temporary files or directories left in the store and `image ls` does
    /// not list `reference`.
    fn assert_nothing_partial(&self, reference: &str) {
        let images = self.images();
        let tmp = images.join("tmp");
        if tmp.exists() {
            let left: Vec<_> = std::fs::read_dir(&tmp)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
        }
        for path in walk(&images) {
            let name = path.file_name().unwrap().to_string_lossy().to_lowercase();
            let temporary = name.starts_with(".tmp")
                || name.ends_with(".tmp")
                || name.contains(".partial")
                || name.ends_with(".part")
                || name.contains("incomplete")
                || name.ends_with(".download");
            assert!(!temporary, "temporary file left in the store: {}", path.display());
        }
        let listed = self.ls();
        assert!(
            listed.iter().all(|i| i["reference"] != reference),
            "a failed pull is listed: {listed:?}"
        );
    }

    /// Bytes used by the image store (each inode once).
    fn store_usage(&self) -> u64 {
        disk_usage(&self.images())
    }
}

fn command_of(program: &str, data: &Path, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .env("TARTARUS_DATA_DIR", data)
        .env("HOME", home)
        .env_remove("DOCKER_CONFIG");
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        c.env_remove(var);
    }
    c
}

/// Runs `cmd` with piped output (and `stdin` written then closed), killing it after [`DEADLINE`].
fn output_within(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let _ = w.write_all(data); // it may exit without reading
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn ok(o: &Output) -> String {
    assert_eq!(code(o), 0, "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    stdout(o)
}

/// The digest in the final `pulled REF sha256:…` line of a successful pull, after checking that the
/// progress before it is plain text (stdout is a pipe here).
fn pulled_digest(out: &Output, reference: &str) -> String {
    let text = ok(out);
    assert!(
        !text.contains('\r') && !text.contains('\u{1b}'),
        "progress on a pipe must be plain lines: {text:?}"
    );
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let digest = last
        .strip_prefix(&format!("pulled {reference} "))
        .unwrap_or_else(|| panic!("last line is not `pulled {reference} sha256:…`: {text}"));
    assert!(
        digest.len() == 71
            && digest.starts_with("sha256:")
            && digest[7..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{last}"
    );
    digest.to_string()
}

/// A failed command's one-line `error: …` (or `tartarus: …`) on stderr.
fn one_line_error(o: &Output) -> String {
    assert_ne!(
        code(o),
        0,
        "expected a failure\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    eprintln!("expected failure: {}", lines[0]);
    // The contract says `error: …`; every other tartarus command says `tartarus: …`. Either is one
    // clear line.
    assert!(
        lines[0].starts_with("error: ") || lines[0].starts_with("tartarus: "),
        "{err}"
    );
    lines[0].to_string()
}

fn contains_any(text: &str, needles: &[&str]) -> bool {
    let lower = text.to_lowercase();
    needles.iter().any(|n| lower.contains(n))
}

/// Every path under `dir` (not following symlinks), `dir` excluded.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Bytes of regular files under `dir`, each inode counted once (layers may be shared by hard links).
fn disk_usage(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.file_type().is_file() && seen.insert((m.dev(), m.ino())))
        .map(|m| m.len())
        .sum()
}

/// The standard test image: the busybox base (gzip) and the default config.
fn base_image() -> Image {
    Image::new(vec![base_layer(Compression::Gzip)], RunConfig::default())
}

// ---------------------------------------------------------------------------------------------------
// The harness itself (no tartarus): so a broken harness is told apart from a broken implementation.
// ---------------------------------------------------------------------------------------------------

#[test]
fn harness_registries_serve_what_was_pushed_and_the_proxy_injects_faults() {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).build();

    // Anonymous: the manifest and blobs come back byte for byte.
    let registry = Registry::anonymous();
    let pushed = registry.push("test/base", "1", &base_image(), Format::Oci);
    let url = format!("http://{}/v2/test/base/manifests/1", registry.host());
    let r = agent.get(&url).set("Accept", OCI_MANIFEST).call().unwrap();
    assert_eq!(r.header("Docker-Content-Digest"), Some(pushed.digest.as_str()));
    let mut body = Vec::new();
    r.into_reader().read_to_end(&mut body).unwrap();
    assert_eq!(body, pushed.manifest);
    let layer = &pushed.layers[0];
    let blob_url = format!("http://{}{}", registry.host(), pushed.blob_path(layer));
    let mut blob = Vec::new();
    agent
        .get(&blob_url)
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut blob)
        .unwrap();
    assert_eq!(&sha256(&blob), layer);

    // The proxy counts requests and corrupts or cuts the blob it is told to.
    let proxy = Proxy::start(registry.addr());
    let via = format!("http://{}{}", proxy.host(), pushed.blob_path(layer));
    let mut clean = Vec::new();
    agent
        .get(&via)
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut clean)
        .unwrap();
    assert_eq!(clean, blob);
    proxy.set_fault(Fault::CorruptByte(layer.clone()));
    let mut corrupt = Vec::new();
    agent
        .get(&via)
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut corrupt)
        .unwrap();
    assert_eq!(corrupt.len(), blob.len());
    assert_eq!(corrupt.iter().zip(&blob).filter(|(a, b)| a != b).count(), 1);
    proxy.set_fault(Fault::ResetMidBody(layer.clone()));
    let cut = agent.get(&via).call().map_err(|e| e.to_string()).and_then(|r| {
        let mut v = Vec::new();
        r.into_reader()
            .read_to_end(&mut v)
            .map(|_| v)
            .map_err(|e| e.to_string())
    });
    assert!(cut.is_err(), "a reset body must not read as complete");
    assert_eq!(proxy.count("GET", &pushed.blob_path(layer)), 3);

    // Basic auth: 401 without credentials, 200 with them.
    let registry = Registry::basic();
    registry.push("test/base", "1", &base_image(), Format::Docker);
    let v2 = format!("http://{}/v2/", registry.host());
    match agent.get(&v2).call() {
        Err(ureq::Error::Status(401, r)) => {
            assert!(r.header("WWW-Authenticate").unwrap_or("").starts_with("Basic"))
        }
        other => panic!("expected 401: {other:?}"),
    }
    let basic = format!("Basic {}", base64_encode(&format!("{USER}:{PASSWORD}")));
    agent.get(&v2).set("Authorization", &basic).call().unwrap();

    // Token auth: the challenge names our token server, which issues a token the registry accepts.
    let registry = Registry::token();
    registry.push("private/app", "1", &base_image(), Format::Oci);
    let challenge = match agent
        .get(&format!("http://{}/v2/private/app/manifests/1", registry.host()))
        .call()
    {
        Err(ureq::Error::Status(401, r)) => r.header("WWW-Authenticate").unwrap_or("").to_string(),
        other => panic!("expected 401: {other:?}"),
    };
    assert!(
        challenge.starts_with("Bearer realm=\"http://127.0.0.1:"),
        "{challenge}"
    );
    let realm = challenge.split('"').nth(1).unwrap();
    let token: Value = agent
        .get(realm)
        .query("service", "tartarus-test-registry")
        .query("scope", "repository:private/app:pull")
        .set("Authorization", &basic)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let token = token["token"].as_str().unwrap();
    agent
        .get(&format!("http://{}/v2/private/app/manifests/1", registry.host()))
        .set("Accept", OCI_MANIFEST)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap_or_else(|e| panic!("{e}\n{}", registry.log()));
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

// ---------------------------------------------------------------------------------------------------
// Pull, list, inspect, run
// ---------------------------------------------------------------------------------------------------

#[test]
fn pull_lists_and_inspects_an_image() {
    let registry = Registry::anonymous();
    let image = base_image();
    let pushed = registry.push("test/base", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());

    assert_eq!(env.pull_ok(&reference), pushed.digest);

    let listed = env.ls();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["reference"], reference.as_str());
    assert_eq!(listed[0]["digest"], pushed.digest.as_str());
    let compressed: u64 = image.layers.iter().map(|l| l.data.len() as u64).sum();
    let size = listed[0]["size"].as_u64().unwrap_or(0);
    assert!(
        size >= compressed,
        "size {size} < layers {compressed}: {listed:?}"
    );

    // The table form and the control binary show the same store.
    let table = ok(&env.tartarus(&["image", "ls"]));
    assert!(table.contains("test/base") && table.contains('1'), "{table}");
    let control = env!("CARGO_BIN_EXE_tartarus-control");
    let via_control = output_within(
        command_of(control, &env.data, &env.home(), &["image", "ls", "--json"]),
        None,
    );
    let via_control: Value = serde_json::from_str(&ok(&via_control)).unwrap();
    assert_eq!(via_control.as_array().unwrap(), &listed);

    let info = env.inspect(&reference);
    assert_eq!(info["reference"], reference.as_str());
    assert_eq!(info["digest"], pushed.digest.as_str());
    let config = &info["config"];
    let env_list: Vec<&str> = config["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        env_list.contains(&"GREETING=hello") && env_list.contains(&IMAGE_PATH),
        "{info}"
    );
    assert_eq!(
        config["cmd"],
        serde_json::json!(RunConfig::default().cmd.unwrap())
    );
    assert_eq!(config["workdir"], "/work");
    assert!(
        config["entrypoint"].is_null() || config["entrypoint"] == serde_json::json!([]),
        "{info}"
    );
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{info}");
    assert_eq!(layers[0]["digest"], pushed.layers[0].as_str());
    assert_eq!(layers[0]["media_type"], OCI_LAYER_GZIP);
    assert_eq!(
        layers[0]["size"].as_u64(),
        Some(image.layers[0].data.len() as u64)
    );
    let unpacked = layers[0]["unpacked_size"].as_u64().unwrap_or(0);
    assert!(unpacked >= busybox_size(), "unpacked_size {unpacked}: {info}");

    // Pulling again is a no-op that still succeeds; by digest works too and names the same manifest.
    assert_eq!(env.pull_ok(&reference), pushed.digest);
    let by_digest = pushed.by_digest(&registry.host());
    assert_eq!(env.pull_ok(&by_digest), pushed.digest);
    assert!(env.ls().iter().any(|i| i["reference"] == reference.as_str()));
}

#[test]
fn run_image_uses_the_image_root_env_workdir_and_cmd() {
    let registry = Registry::anonymous();
    let pushed = registry.push("test/base", "1", &base_image(), Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    env.pull_ok(&reference);

    // No command: the image's Cmd, with its Env and WorkingDir.
    assert_eq!(ok(&env.run_image(&reference, &[])), "cmd says hello from /work\n");
    assert_eq!(env.sh(&reference, "echo $GREETING; pwd"), "hello\n/work\n");
    let vars = ok(&env.run_image(&reference, &["env"]));
    assert!(vars.lines().any(|l| l == "GREETING=hello"), "{vars}");
    assert!(vars.lines().any(|l| l == IMAGE_PATH), "{vars}");
    // The root is the image, not the host.
    assert_eq!(
        env.sh(
            &reference,
            "cat /etc/passwd; test -e /usr/bin/python3 && echo host-root || echo image-root"
        ),
        "root:x:0:0:root:/root:/bin/sh\nimguser:x:1234:1234:image user:/work:/bin/sh\nimage-root\n"
    );
    // A bare command name is found through the image's PATH.
    assert_eq!(
        ok(&env.run_image(&reference, &["echo", "via", "path"])),
        "via path\n"
    );
}

#[test]
fn run_image_honours_the_image_user() {
    let registry = Registry::anonymous();
    let config = RunConfig {
        user: Some("1234:1234".into()),
        ..RunConfig::default()
    };
    let image = Image::new(vec![base_layer(Compression::Gzip)], config);
    let pushed = registry.push("test/user", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    env.pull_ok(&reference);
    assert_eq!(env.inspect(&reference)["config"]["user"], "1234:1234");
    assert_eq!(env.sh(&reference, "id -u; id -g"), "1234\n1234\n");
}

#[test]
fn run_image_without_a_command_runs_entrypoint_with_cmd() {
    let registry = Registry::anonymous();
    let config = RunConfig {
        entrypoint: Some(vec!["/bin/echo".into(), "entry:".into()]),
        cmd: Some(vec!["default-arg".into()]),
        ..RunConfig::default()
    };
    let image = Image::new(vec![base_layer(Compression::Gzip)], config);
    let pushed = registry.push("test/entry", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    env.pull_ok(&reference);
    assert_eq!(
        env.inspect(&reference)["config"]["entrypoint"],
        serde_json::json!(["/bin/echo", "entry:"])
    );
    assert_eq!(ok(&env.run_image(&reference, &[])), "entry: default-arg\n");
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() {
    let registry = Registry::anonymous();
    let middle = LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/keep", b"kept\n", 0o644)
        .file("data/gone", b"should be deleted\n", 0o644)
        .dir("data/olddir", 0o755)
        .file("data/olddir/inner", b"inner\n", 0o644)
        .dir("opaque", 0o755)
        .file("opaque/lower", b"lower\n", 0o644)
        .dir("opaque/sub", 0o755)
        .file("opaque/sub/deep", b"deep\n", 0o644)
        .build(Compression::Gzip);
    let top = LayerBuilder::new()
        .dir("data", 0o755)
        .whiteout("data/gone")
        .whiteout("data/olddir")
        .dir("opaque", 0o755)
        .opaque("opaque")
        .file("opaque/upper", b"upper\n", 0o644)
        .build(Compression::Gzip);
    let image = Image::new(
        vec![base_layer(Compression::Gzip), middle, top],
        RunConfig::default(),
    );
    let pushed = registry.push("test/layers", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    env.pull_ok(&reference);
    assert_eq!(env.inspect(&reference)["layers"].as_array().unwrap().len(), 3);
    assert_eq!(
        env.sh(
            &reference,
            "ls -A /data; echo --; ls -A /opaque; echo --; cat /data/keep /opaque/upper; \
             test -e /data/gone || echo gone-is-gone; test -e /opaque/sub/deep || echo deep-is-hidden"
        ),
        "keep\n--\nupper\n--\nkept\nupper\ngone-is-gone\ndeep-is-hidden\n"
    );
}

#[test]
fn hard_links_and_symlinks_survive() {
    let registry = Registry::anonymous();
    let links = LayerBuilder::new()
        .dir("links", 0o755)
        .file("links/target", b"linked\n", 0o644)
        .hardlink("links/hard", "links/target")
        .symlink("links/soft", "target")
        .symlink("links/abs", "/links/target")
        .symlink("links/dir", "/work")
        .build(Compression::Gzip);
    let image = Image::new(vec![base_layer(Compression::Gzip), links], RunConfig::default());
    let pushed = registry.push("test/links", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    env.pull_ok(&reference);
    let out = env.sh(
        &reference,
        "a=$(stat -c %i /links/target); b=$(stat -c %i /links/hard); \
         test \"$a\" = \"$b\" && echo same-inode; stat -c %h /links/target; \
         readlink /links/soft; readlink /links/abs; readlink /links/dir; \
         cat /links/hard /links/soft /links/abs; readlink /bin/sh",
    );
    assert_eq!(
        out,
        "same-inode\n2\ntarget\n/links/target\n/work\nlinked\nlinked\nlinked\nbusybox\n"
    );
}

#[test]
fn docker_v2_media_types_pull_and_run() {
    let registry = Registry::anonymous();
    let extra = LayerBuilder::new()
        .file("docker-marker", b"docker v2\n", 0o644)
        .build(Compression::Gzip);
    let image = Image::new(vec![base_layer(Compression::Gzip), extra], RunConfig::default());
    let pushed = registry.push("test/docker", "v2", &image, Format::Docker);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    assert_eq!(env.pull_ok(&reference), pushed.digest);
    let info = env.inspect(&reference);
    for layer in info["layers"].as_array().unwrap() {
        assert_eq!(layer["media_type"], DOCKER_LAYER_GZIP, "{info}");
    }
    assert_eq!(
        env.sh(&reference, "cat /docker-marker; echo $GREETING"),
        "docker v2\nhello\n"
    );
}

#[test]
fn an_index_resolves_to_the_host_platform() {
    let registry = Registry::anonymous();
    let base = base_layer(Compression::Gzip);
    let marker = |arch: &str| {
        LayerBuilder::new()
            .file("platform", format!("{arch}\n").as_bytes(), 0o644)
            .build(Compression::Gzip)
    };
    let other = if host_arch() == "arm64" { "amd64" } else { "arm64" };
    // The foreign platform comes first, so taking the first entry is caught.
    let foreign = Image::new(vec![base.clone(), marker(other)], RunConfig::default()).with_arch(other);
    let native = Image::new(vec![base.clone(), marker(host_arch())], RunConfig::default());
    for (format, tag) in [(Format::Oci, "oci-index"), (Format::Docker, "docker-list")] {
        let (index_digest, images) = registry.push_index(
            "test/multi",
            tag,
            &[(other, &foreign), (host_arch(), &native)],
            format,
        );
        let env = Env::new();
        let reference = format!("{}/test/multi:{tag}", registry.host());
        let digest = env.pull_ok(&reference);
        assert!(
            digest == index_digest || digest == images[1].digest,
            "{tag}: pulled {digest}, index {index_digest}, {} {}, {other} {}",
            host_arch(),
            images[1].digest,
            images[0].digest
        );
        let info = env.inspect(&reference);
        let layers: Vec<&str> = info["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        assert_eq!(
            layers,
            images[1].layers.iter().map(String::as_str).collect::<Vec<_>>(),
            "{tag}"
        );
        assert_eq!(
            env.sh(&reference, "cat /platform"),
            format!("{}\n", host_arch()),
            "{tag}"
        );
    }
}

#[test]
fn zstd_layers_pull_and_run() {
    let registry = Registry::anonymous();
    let extra = LayerBuilder::new()
        .file("zstd-marker", b"zstd works\n", 0o644)
        .build(Compression::Zstd);
    let image = Image::new(vec![base_layer(Compression::Zstd), extra], RunConfig::default());
    let pushed = registry.push("test/zstd", "1", &image, Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());
    assert_eq!(env.pull_ok(&reference), pushed.digest);
    let info = env.inspect(&reference);
    for layer in info["layers"].as_array().unwrap() {
        assert_eq!(layer["media_type"], OCI_LAYER_ZSTD, "{info}");
    }
    assert_eq!(env.sh(&reference, "cat /zstd-marker"), "zstd works\n");
}

// ---------------------------------------------------------------------------------------------------
// Sharing, concurrency, removal
// ---------------------------------------------------------------------------------------------------

/// Two images on the same busybox base, with different top layers.
fn two_images_sharing_a_base(registry: &Registry) -> (Pushed, Pushed) {
    let base = base_layer(Compression::Gzip);
    let top = |name: &str| {
        LayerBuilder::new()
            .file(name, format!("{name}\n").as_bytes(), 0o644)
            .build(Compression::Gzip)
    };
    let a = Image::new(vec![base.clone(), top("a")], RunConfig::default());
    let b = Image::new(vec![base, top("b")], RunConfig::default());
    (
        registry.push("test/a", "1", &a, Format::Oci),
        registry.push("test/b", "1", &b, Format::Oci),
    )
}

#[test]
fn a_shared_base_layer_is_fetched_and_stored_once() {
    let registry = Registry::anonymous();
    let (a, b) = two_images_sharing_a_base(&registry);
    assert_eq!(a.layers[0], b.layers[0]);
    let proxy = Proxy::start(registry.addr());
    let env = Env::new();
    let ref_a = a.reference(&proxy.host());
    let ref_b = b.reference(&proxy.host());

    env.pull_ok(&ref_a);
    let one = env.store_usage();
    assert!(
        one >= busybox_size(),
        "store holds {one} bytes after pulling busybox"
    );
    env.pull_ok(&ref_b);
    let two = env.store_usage();
    assert!(
        two - one < busybox_size() / 4,
        "the second image added {} bytes: the shared base was stored again",
        two - one
    );
    // B's base is the blob A brought (possibly in another repository: the store is content-addressed).
    let base_gets =
        proxy.count("GET", &a.blob_path(&a.layers[0])) + proxy.count("GET", &b.blob_path(&b.layers[0]));
    assert_eq!(
        base_gets,
        1,
        "base layer fetched {base_gets} times: {:#?}",
        proxy.requests()
    );
    assert_eq!(env.sh(&ref_a, "cat /a"), "a\n");
    assert_eq!(env.sh(&ref_b, "cat /b"), "b\n");
    assert_eq!(env.ls().len(), 2);
}

#[test]
fn concurrent_pulls_of_one_image_fetch_each_blob_once() {
    let registry = Registry::anonymous();
    let image = Image::new(
        vec![
            base_layer(Compression::Gzip),
            LayerBuilder::new()
                .file("big", &noise(1 << 20, 7), 0o644)
                .build(Compression::Gzip),
        ],
        RunConfig::default(),
    );
    let pushed = registry.push("test/concurrent", "1", &image, Format::Oci);
    let proxy = Proxy::start(registry.addr());
    let env = Env::new();
    let reference = pushed.reference(&proxy.host());

    let pullers: Vec<_> = (0..4)
        .map(|_| {
            let cmd = env.command(&["image", "pull", "--insecure", &reference]);
            std::thread::spawn(move || output_within(cmd, None))
        })
        .collect();
    for p in pullers {
        let out = p.join().unwrap();
        assert_eq!(pulled_digest(&out, &reference), pushed.digest);
    }
    // Layers are the bulk: each is downloaded once, the others wait for it. The config is small
    // metadata, like the manifest every puller reads: at most once per puller.
    for layer in &pushed.layers {
        let gets = proxy.count("GET", &pushed.blob_path(layer));
        assert_eq!(
            gets,
            1,
            "layer {layer} fetched {gets} times by 4 concurrent pulls: {:#?}",
            proxy.requests()
        );
    }
    let config_gets = proxy.count("GET", &pushed.blob_path(&pushed.config_digest));
    assert!(
        (1..=4).contains(&config_gets),
        "config fetched {config_gets} times"
    );
    let listed = env.ls();
    assert_eq!(listed.len(), 1, "{listed:?}");
    env.assert_nothing_partial("none");
    assert_eq!(env.sh(&reference, "wc -c < /big"), format!("{}\n", 1 << 20));
}

#[test]
fn rm_then_prune_frees_the_layers() {
    let registry = Registry::anonymous();
    let (a, b) = two_images_sharing_a_base(&registry);
    let env = Env::new();
    let ref_a = a.reference(&registry.host());
    let ref_b = b.reference(&registry.host());
    env.pull_ok(&ref_a);
    env.pull_ok(&ref_b);
    let full = env.store_usage();

    // rm forgets the image; prune keeps what B still uses.
    ok(&env.tartarus(&["image", "rm", &ref_a]));
    let listed = env.ls();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["reference"], ref_b.as_str());
    ok(&env.tartarus(&["image", "prune"]));
    assert_eq!(env.sh(&ref_b, "cat /b"), "b\n");
    let kept = env.store_usage();
    assert!(
        kept >= busybox_size() && kept <= full,
        "after pruning A: {kept} of {full} bytes"
    );
    let out = env.run_image(&ref_a, &["/bin/true"]);
    assert_ne!(code(&out), 0, "a removed image still runs");

    // Removing the last user frees the shared base too.
    ok(&env.tartarus(&["image", "rm", &ref_b]));
    assert!(env.ls().is_empty());
    ok(&env.tartarus(&["image", "prune"]));
    let left = env.store_usage();
    assert!(
        left < 256 * 1024,
        "{left} bytes left after removing everything and pruning"
    );
    let hexes: Vec<&str> = a.layers.iter().chain(&b.layers).map(|d| hex_of(d)).collect();
    // Layer directories and blobs named by digest are gone (empty files such as lock files may stay).
    for path in walk(&env.images()) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let holds_data = meta.is_dir() || meta.len() > 0;
        assert!(
            !(holds_data && hexes.iter().any(|h| name.contains(h))),
            "layer left after prune: {}",
            path.display()
        );
    }
    let out = env.tartarus(&["image", "rm", &ref_b]);
    one_line_error(&out);
}

// ---------------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------------

fn pull_with_password(env: &Env, reference: &str, user: &str, password: &str) -> Output {
    let cmd = env.command(&[
        "image",
        "pull",
        "--insecure",
        "--username",
        user,
        "--password-stdin",
        reference,
    ]);
    output_within(cmd, Some(format!("{password}\n").as_bytes()))
}

fn write_docker_config(dir: &Path, host: &str, user: &str, password: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64_encode(&format!("{user}:{password}"));
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({"auths": {host: {"auth": auth}}}).to_string(),
    )
    .unwrap();
}

const AUTH_WORDS: &[&str] = &[
    "unauthorized",
    "authenticat",
    "credential",
    "denied",
    "401",
    "password",
];

#[test]
fn basic_auth_with_password_stdin_and_docker_config() {
    let registry = Registry::basic();
    let pushed = registry.push("test/private", "1", &base_image(), Format::Oci);
    let env = Env::new();
    let reference = pushed.reference(&registry.host());

    // No credentials, then wrong ones: a clear error and nothing stored.
    let err = one_line_error(&env.pull(&reference));
    assert!(contains_any(&err, AUTH_WORDS), "{err}");
    env.assert_nothing_partial(&reference);
    let err = one_line_error(&pull_with_password(&env, &reference, USER, "wrong password"));
    assert!(contains_any(&err, AUTH_WORDS), "{err}");
    assert!(!err.contains("wrong password"), "the password is echoed: {err}");
    env.assert_nothing_partial(&reference);

    // --password-stdin.
    let out = pull_with_password(&env, &reference, USER, PASSWORD);
    assert_eq!(pulled_digest(&out, &reference), pushed.digest);
    assert_eq!(env.sh(&reference, "echo $GREETING"), "hello\n");
    ok(&env.tartarus(&["image", "rm", &reference]));

    // $DOCKER_CONFIG/config.json.
    let docker = env.root.path().join("docker-config");
    write_docker_config(&docker, &registry.host(), USER, PASSWORD);
    let mut cmd = env.command(&["image", "pull", "--insecure", &reference]);
    cmd.env("DOCKER_CONFIG", &docker);
    assert_eq!(
        pulled_digest(&output_within(cmd, None), &reference),
        pushed.digest
    );
    ok(&env.tartarus(&["image", "rm", &reference]));

    // ~/.docker/config.json.
    write_docker_config(&env.home().join(".docker"), &registry.host(), USER, PASSWORD);
    assert_eq!(env.pull_ok(&reference), pushed.digest);
    ok(&env.tartarus(&["image", "rm", &reference]));

    // A config.json with the wrong password fails like a wrong --password-stdin.
    let wrong = env.root.path().join("wrong-config");
    write_docker_config(&wrong, &registry.host(), USER, "nope");
    let mut cmd = env.command(&["image", "pull", "--insecure", &reference]);
    cmd.env("DOCKER_CONFIG", &wrong);
    let err = one_line_error(&output_within(cmd, None));
    assert!(contains_any(&err, AUTH_WORDS), "{err}");
    env.assert_nothing_partial(&reference);
}

#[test]
fn token_auth_anonymous_and_with_credentials() {
    let registry = Registry::token();
    let private = registry.push("private/app", "1", &base_image(), Format::Oci);
    let public = registry.push("public/app", "1", &base_image(), Format::Oci);
    let env = Env::new();
    let private_ref = private.reference(&registry.host());
    let public_ref = public.reference(&registry.host());

    // Anonymous token for a public repository.
    assert_eq!(env.pull_ok(&public_ref), public.digest);
    assert!(
        registry.token_log().contains("TOKEN ISSUED account=- access=[{\"type\": \"repository\", \"name\": \"public/app\", \"actions\": [\"pull\"]}]"),
        "no anonymous token was asked for:\n{}",
        registry.token_log()
    );
    assert_eq!(env.sh(&public_ref, "echo $GREETING"), "hello\n");

    // Anonymous on a private repository: the token grants nothing.
    let err = one_line_error(&env.pull(&private_ref));
    assert!(contains_any(&err, AUTH_WORDS), "{err}");
    env.assert_nothing_partial(&private_ref);

    // Wrong credentials: the token server says no.
    let err = one_line_error(&pull_with_password(&env, &private_ref, USER, "wrong"));
    assert!(contains_any(&err, AUTH_WORDS), "{err}");
    assert!(
        registry.token_log().contains("TOKEN DENIED"),
        "{}",
        registry.token_log()
    );
    env.assert_nothing_partial(&private_ref);

    // Right credentials: a token for our account.
    let out = pull_with_password(&env, &private_ref, USER, PASSWORD);
    assert_eq!(pulled_digest(&out, &private_ref), private.digest);
    assert!(
        registry
            .token_log()
            .lines()
            .any(|l| l.starts_with("TOKEN ISSUED account=tester")
                && l.contains("private/app")
                && l.contains("pull")),
        "{}",
        registry.token_log()
    );
    assert_eq!(env.ls().len(), 2);
}

// ---------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------

#[test]
fn an_unknown_tag_is_a_clear_error_naming_the_reference() {
    let registry = Registry::anonymous();
    registry.push("test/base", "1", &base_image(), Format::Oci);
    let env = Env::new();
    for reference in [
        format!("{}/test/base:no-such-tag", registry.host()),
        format!("{}/test/no-such-repo:1", registry.host()),
    ] {
        let err = one_line_error(&env.pull(&reference));
        let short = reference.split_once('/').unwrap().1;
        assert!(err.contains(short), "the error does not name {short}: {err}");
        env.assert_nothing_partial(&reference);
    }
    let err = one_line_error(&env.tartarus(&["image", "inspect", "127.0.0.1:1/never/pulled:1"]));
    assert!(err.contains("never/pulled"), "{err}");
}

#[test]
fn plain_http_is_refused_for_registries_off_loopback() {
    // In a fresh network namespace nothing can leave the machine even if the refusal were missing.
    let env = Env::new();
    for reference in ["registry.invalid/test/base:1", "192.0.2.1:5000/test/base:1"] {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", bin(), "image", "pull", "--insecure", reference])
            .env("TARTARUS_DATA_DIR", &env.data)
            .env("HOME", env.home());
        let err = one_line_error(&output_within(cmd, None));
        assert!(contains_any(&err, &["loopback"]), "{reference}: {err}");
        env.assert_nothing_partial(reference);
    }
}

#[test]
fn a_reset_or_corrupt_blob_fails_cleanly_and_a_healthy_retry_succeeds() {
    let registry = Registry::anonymous();
    let image = Image::new(
        vec![
            base_layer(Compression::Gzip),
            LayerBuilder::new()
                .file("extra", b"extra\n", 0o644)
                .build(Compression::Gzip),
        ],
        RunConfig::default(),
    );
    let pushed = registry.push("test/faulty", "1", &image, Format::Oci);
    let proxy = Proxy::start(registry.addr());
    let env = Env::new();
    let reference = pushed.reference(&proxy.host());
    let big = pushed.layers[0].clone();

    proxy.set_fault(Fault::ResetMidBody(big.clone()));
    let out = env.pull(&reference);
    one_line_error(&out);
    assert!(
        proxy.count("GET", &pushed.blob_path(&big)) >= 1,
        "{:#?}",
        proxy.requests()
    );
    env.assert_nothing_partial(&reference);
    assert!(env.ls().is_empty());

    // Each corrupt blob in a fresh store, so it is really fetched (a store may keep the complete,
    // verified layers of a failed pull).
    for blob in [
        big.clone(),
        pushed.layers[1].clone(),
        pushed.config_digest.clone(),
    ] {
        let env = Env::new();
        proxy.clear();
        proxy.set_fault(Fault::CorruptByte(blob.clone()));
        let err = one_line_error(&env.pull(&reference));
        assert_eq!(
            proxy.count("GET", &pushed.blob_path(&blob)),
            1,
            "{:#?}",
            proxy.requests()
        );
        assert!(
            contains_any(
                &err,
                &["digest", "sha256", "mismatch", "corrupt", "checksum", "invalid"]
            ),
            "corrupt {blob}: {err}"
        );
        env.assert_nothing_partial(&reference);
        assert!(env.ls().is_empty());
    }

    proxy.set_fault(Fault::None);
    assert_eq!(env.pull_ok(&reference), pushed.digest);
    assert_eq!(env.sh(&reference, "cat /extra; echo $GREETING"), "extra\nhello\n");
}

#[test]
fn hostile_layers_are_rejected_and_nothing_escapes() {
    let registry = Registry::anonymous();
    let env = Env::new();
    let outside = env.root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret\n").unwrap();
    let outside_rel = outside.to_str().unwrap().trim_start_matches('/').to_string();
    let ups = "../".repeat(40);
    let file = tar::EntryType::Regular;

    let hostile: Vec<(&str, Layer)> = vec![
        (
            "dotdot",
            LayerBuilder::new()
                .raw(file, b"../escape", b"", b"escaped\n", 0o644)
                .build(Compression::Gzip),
        ),
        (
            "deep-dotdot",
            LayerBuilder::new()
                .raw(
                    file,
                    format!("{ups}{outside_rel}/escape").as_bytes(),
                    b"",
                    b"escaped\n",
                    0o644,
                )
                .build(Compression::Gzip),
        ),
        (
            "symlink-write-through",
            LayerBuilder::new()
                .symlink("evil", outside.to_str().unwrap())
                .file("evil/pwned", b"pwned\n", 0o644)
                .build(Compression::Gzip),
        ),
        (
            "relative-symlink-write-through",
            LayerBuilder::new()
                .symlink("evil", &format!("{ups}{outside_rel}"))
                .file("evil/pwned", b"pwned\n", 0o644)
                .build(Compression::Gzip),
        ),
        (
            "hardlink-out",
            LayerBuilder::new()
                .raw(
                    tar::EntryType::Link,
                    b"stolen",
                    format!("{ups}{outside_rel}/secret").as_bytes(),
                    b"",
                    0o644,
                )
                .build(Compression::Gzip),
        ),
    ];
    for (name, layer) in hostile {
        let image = Image::new(vec![base_layer(Compression::Gzip), layer], RunConfig::default());
        let pushed = registry.push(&format!("evil/{name}"), "1", &image, Format::Oci);
        let reference = pushed.reference(&registry.host());
        let out = env.pull(&reference);
        let err = one_line_error(&out);
        assert!(
            contains_any(
                &err,
                &["layer", "path", "link", "unsafe", "outside", "escape", "invalid"]
            ),
            "{name}: {err}"
        );

        // Nothing written outside the store.
        let mut left: Vec<String> = std::fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["secret"], "{name}: written outside the store");
        let secret = std::fs::symlink_metadata(outside.join("secret")).unwrap();
        assert_eq!(
            secret.nlink(),
            1,
            "{name}: a hard link to a file outside the store was made"
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "secret\n"
        );
        let mut top: Vec<String> = std::fs::read_dir(env.root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(top, ["data", "home", "outside"], "{name}");
        for path in walk(env.root.path()) {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                !["escape", "pwned", "stolen"].contains(&file.as_str()),
                "{name}: {} exists",
                path.display()
            );
        }
        for p in ["/escape", "/tmp/escape"] {
            assert!(!Path::new(p).exists(), "{name}: {p} was written");
        }
        // The store is consistent: nothing half-written and the image is not listed.
        env.assert_nothing_partial(&reference);
    }
    assert!(env.ls().is_empty(), "{:?}", env.ls());

    // And still usable.
    let good = registry.push("test/base", "1", &base_image(), Format::Oci);
    let reference = good.reference(&registry.host());
    env.pull_ok(&reference);
    assert_eq!(env.sh(&reference, "echo $GREETING"), "hello\n");
}

/// A tmpfs mounted for one test; unmounted (lazily, so a busy mount cannot leak) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tartarus-test",
                at.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_cleanly() {
    let registry = Registry::anonymous();
    let image = Image::new(
        vec![
            base_layer(Compression::Gzip),
            LayerBuilder::new()
                .file("noise", &noise(3 << 20, 11), 0o644)
                .build(Compression::Gzip),
        ],
        RunConfig::default(),
    );
    let pushed = registry.push("test/big", "1", &image, Format::Oci);
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let env = Env::with_data(root, data.clone());
    // Declared after `env`, so it is unmounted before the directory is removed.
    let mount = Tmpfs::mount(&data, "2m");
    let reference = pushed.reference(&registry.host());

    let err = one_line_error(&env.pull(&reference));
    assert!(contains_any(&err, &["space", "disk", "full", "quota"]), "{err}");
    env.assert_nothing_partial(&reference);
    assert!(env.ls().is_empty());
    // Whatever complete layers were kept, prune gives the space back.
    ok(&env.tartarus(&["image", "prune"]));
    let left = disk_usage(&data);
    assert!(left < 256 * 1024, "{left} bytes left on the 2 MiB disk");

    // With room, the same image pulls.
    drop(mount);
    let env2 = Env::new();
    assert_eq!(env2.pull_ok(&reference), pushed.digest);
}
