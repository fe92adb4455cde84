//! Templates end to end: `tartarus template …` and `tartarus init template` against a real server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::bin;
use serde_json::{json, Value};
use tartarus_image::template::parse_template;

/// A server on a free loopback port over its own data directory (no sandboxes are started here).
struct Server {
    child: Child,
    base: String,
    admin: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin())
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .to_string();
        let admin = std::fs::read_to_string(dir.path().join("admin.key"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            child,
            base: format!("http://{addr}"),
            admin,
            dir,
        }
    }

    /// A new key of `tenant` with `role`.
    fn key(&self, tenant: &str, role: &str) -> String {
        let out = Command::new(bin())
            .args([
                "apikey",
                "create",
                "--tenant",
                tenant,
                "--role",
                role,
                "--data-dir",
            ])
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Runs a client command with `key` (config isolated in a temp dir).
    fn cli(&self, key: &str, args: &[&str], stdin: &[u8]) -> Output {
        let config = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin())
            .args(args)
            .env("TARTARUS_HOST", &self.base)
            .env("TARTARUS_API_KEY", key)
            .env("XDG_CONFIG_HOME", config.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let request = ureq::request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {key}"));
        let response = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match response {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts a Tartarus failure (exit 125) whose message contains `needle`.
fn fails_with(o: Output, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(125),
        "stdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(needle),
        "wanted {needle:?} in: {}",
        stderr(&o)
    );
}

fn seed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../templates")
        .join(name)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn test_template_create_ls_inspect_rm_round_trip() {
    let server = Server::start();
    let key = server.key("team-a", "user");
    let file = seed("python-ds.yaml");
    let original = parse_template(&std::fs::read_to_string(&file).unwrap(), "python-ds.yaml").unwrap();

    let created = ok(server.cli(&key, &["template", "create", "-f", file.to_str().unwrap()], b""));
    assert_eq!(created.trim(), "python-ds");

    let table = ok(server.cli(&key, &["template", "ls"], b""));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{table}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("python-ds") && row.contains("python:3.11-slim") && row.contains("team-a"),
        "{table}"
    );
    let list: Value =
        serde_json::from_str(&ok(server.cli(&key, &["template", "ls", "--json"], b""))).unwrap();
    assert_eq!(list[0]["id"], "python-ds");
    assert_eq!(list[0]["template"]["resources"]["max_memory"], 32768);

    let yaml = ok(server.cli(&key, &["template", "inspect", "python-ds"], b""));
    assert_eq!(parse_template(&yaml, "inspect").unwrap(), original, "{yaml}");
    let record: Value = serde_json::from_str(&ok(server.cli(
        &key,
        &["template", "inspect", "python-ds", "--json"],
        b"",
    )))
    .unwrap();
    assert_eq!(record["tenant"], "team-a");
    assert_eq!(record["template"]["warmup_language"], "python");

    // What inspect prints is accepted back as it is (it replaces the template).
    ok(server.cli(&key, &["template", "create", "-f", "-"], yaml.as_bytes()));

    let removed = server.cli(&key, &["template", "rm", "python-ds"], b"");
    assert!(
        stderr(&removed).contains("template python-ds removed"),
        "{}",
        stderr(&removed)
    );
    ok(removed);
    assert_eq!(
        ok(server.cli(&key, &["template", "ls"], b"")).lines().count(),
        1,
        "only the header is left"
    );
    fails_with(
        server.cli(&key, &["template", "rm", "python-ds"], b""),
        "no template 'python-ds' (not_found, HTTP 404)",
    );
    fails_with(
        server.cli(&key, &["template", "inspect", "python-ds"], b""),
        "HTTP 404",
    );

    let (_, audit) = server.call("GET", "/v1/audit", &server.admin, None);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["template.delete", "template.replace", "template.create"],
        "newest first"
    );
}

#[test]
fn test_every_seed_template_is_accepted_by_the_server() {
    let server = Server::start();
    for name in ["python-ds", "pytorch-ml", "r-analytics", "julia-sci"] {
        let file = seed(&format!("{name}.yaml"));
        let out = server.cli(
            &server.admin,
            &["template", "create", "-f", file.to_str().unwrap()],
            b"",
        );
        assert_eq!(ok(out).trim(), name);
    }
    let (status, list) = server.call("GET", "/v1/templates", &server.admin, None);
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["julia-sci", "python-ds", "pytorch-ml", "r-analytics"]);
    assert!(
        list.as_array().unwrap().iter().all(|t| t["tenant"].is_null()),
        "admin templates are shared"
    );
}

#[test]
fn test_bad_templates_are_refused_with_file_line_and_column() {
    let server = Server::start();
    let key = server.key("team-a", "user");
    let dir = tempfile::tempdir().unwrap();

    let broken = "id: a\nname: A\nbase_image: alpine\nresources:\n  default_cpu: 1\n default_memory: 2\n";
    let broken = write(dir.path(), "broken.yaml", broken);
    let out = server.cli(&key, &["template", "create", "-f", &broken], b"");
    fails_with(out, "broken.yaml:6:2: did not find expected key");

    let typo = "id: python-ds\nname: P\nbase_image: python:3.11-slim\nresorces: {default_cpu: 2}\n";
    let typo = write(dir.path(), "python-ds.yaml", typo);
    fails_with(
        server.cli(&key, &["template", "create", "-f", &typo], b""),
        "python-ds.yaml:4:1: unknown field `resorces`, expected one of",
    );

    let nested = "id: a\nname: A\nbase_image: alpine\nresources:\n  max_cpu: 2\n  default_cpu: 4\n";
    let nested = write(dir.path(), "cpu.yaml", nested);
    fails_with(
        server.cli(&key, &["template", "create", "-f", &nested], b""),
        "cpu.yaml:6:3: resources.default_cpu (4) is more than resources.max_cpu (2) (invalid_request, HTTP 422)",
    );

    let bad_id = write(
        dir.path(),
        "id.yaml",
        "id: Python_DS\nname: A\nbase_image: alpine\n",
    );
    fails_with(
        server.cli(&key, &["template", "create", "-f", &bad_id], b""),
        "id.yaml:1:1: id 'Python_DS' is invalid",
    );

    // The API takes the template as a JSON object too, and refuses unknown keys there as well.
    let (status, body) = server.call(
        "POST",
        "/v1/templates",
        &key,
        Some(json!({"id": "j", "name": "J", "base_image": "julia:1.10", "colour": "red"})),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{body}"
    );
    let (status, body) = server.call(
        "POST",
        "/v1/templates",
        &key,
        Some(json!({"id": "j", "name": "J", "base_image": "julia:1.10"})),
    );
    assert_eq!(
        (status, body["template"]["resources"]["default_cpu"].as_f64()),
        (201, Some(1.0))
    );
    let (status, _) = server.call("GET", "/v1/templates/nope", &key, None);
    assert_eq!(status, 404);
    let (status, _) = server.call("DELETE", "/v1/templates/nope", &key, None);
    assert_eq!(status, 404);
}

#[test]
fn test_roles_and_tenants_limit_who_changes_templates() {
    let server = Server::start();
    let viewer = server.key("team-a", "viewer");
    let user_a = server.key("team-a", "user");
    let user_b = server.key("team-b", "user");
    let file = seed("julia-sci.yaml");
    let file = file.to_str().unwrap();

    fails_with(
        server.cli(&viewer, &["template", "create", "-f", file], b""),
        "viewer role and cannot change anything (forbidden, HTTP 403)",
    );
    ok(server.cli(&server.admin, &["template", "create", "-f", file], b""));
    // Everyone sees a shared template; only admins change it.
    assert!(ok(server.cli(&viewer, &["template", "ls"], b"")).contains("julia-sci"));
    fails_with(
        server.cli(&viewer, &["template", "rm", "julia-sci"], b""),
        "HTTP 403",
    );
    fails_with(
        server.cli(&user_a, &["template", "rm", "julia-sci"], b""),
        "template 'julia-sci' is shared; only admin keys may delete it",
    );
    fails_with(
        server.cli(&user_a, &["template", "create", "-f", file], b""),
        "only admin keys may replace it (forbidden, HTTP 403)",
    );

    // A tenant's template is invisible to other tenants, whose ids cannot take it over.
    ok(server.cli(
        &user_a,
        &[
            "template",
            "create",
            "-f",
            seed("r-analytics.yaml").to_str().unwrap(),
        ],
        b"",
    ));
    fails_with(
        server.cli(&user_b, &["template", "inspect", "r-analytics"], b""),
        "no template 'r-analytics'",
    );
    assert!(!ok(server.cli(&user_b, &["template", "ls"], b"")).contains("r-analytics"));
    fails_with(
        server.cli(
            &user_b,
            &[
                "template",
                "create",
                "-f",
                seed("r-analytics.yaml").to_str().unwrap(),
            ],
            b"",
        ),
        "template id 'r-analytics' is taken; choose another id (conflict, HTTP 409)",
    );
    let (status, list) = server.call("GET", "/v1/templates", &server.admin, None);
    assert_eq!((status, list.as_array().unwrap().len()), (200, 2));
    ok(server.cli(&user_a, &["template", "rm", "r-analytics"], b""));
}

#[test]
fn test_init_template_output_is_accepted_by_create() {
    let server = Server::start();
    let key = server.key("team-a", "user");
    let dir = tempfile::tempdir().unwrap();

    // Written without a server.
    let out = Command::new(bin())
        .args(["init", "template", "--name", "my-python", "--from", "python:3.11"])
        .env_remove("TARTARUS_HOST")
        .env_remove("TARTARUS_API_KEY")
        .output()
        .unwrap();
    let yaml = ok(out);
    assert!(
        yaml.starts_with('#') && yaml.contains("base_image: \"python:3.11\""),
        "{yaml}"
    );
    assert_eq!(
        ok(server.cli(&key, &["template", "create", "-f", "-"], yaml.as_bytes())).trim(),
        "my-python"
    );

    let path = dir.path().join("data.yaml");
    let path = path.to_str().unwrap();
    let init = [
        "init",
        "template",
        "--name",
        "Data Team",
        "--from",
        "ghcr.io/org/img:1",
        "-o",
        path,
    ];
    ok(server.cli(&key, &init, b""));
    assert_eq!(
        ok(server.cli(&key, &["template", "create", "-f", path], b"")).trim(),
        "data-team"
    );
    fails_with(server.cli(&key, &init, b""), "cannot create");
    let bad = ["init", "template", "--name", "x", "--from", "not an image"];
    fails_with(server.cli(&key, &bad, b""), "must not contain whitespace");
}

#[test]
fn test_openapi_lists_the_template_routes() {
    let server = Server::start();
    let doc: Value = ureq::get(&format!("{}/v1/openapi.json", server.base))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let paths = &doc["paths"];
    assert!(paths["/v1/templates"]["post"].is_object() && paths["/v1/templates"]["get"].is_object());
    assert!(
        paths["/v1/templates/{id}"]["delete"].is_object() && paths["/v1/templates/{id}"]["get"].is_object()
    );
    assert!(doc["components"]["schemas"]["TemplateView"].is_object());
}
