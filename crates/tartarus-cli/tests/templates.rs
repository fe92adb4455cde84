//! Templates end to end: `tartarus template …` and `tartarus init template` against a real server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::server::{admin_audit, call, cli, new_key, DataDir, Server};
use common::{bin, ok, stderr, stdout};
use serde_json::{json, Value};
use tartarus_image::template::parse_template;

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
    let data = DataDir::new();
    let server = Server::start(data.path());
    let key = new_key(data.path(), "team-a", "user");
    let file = seed("python-ds.yaml");
    let original = parse_template(&std::fs::read_to_string(&file).unwrap(), "python-ds.yaml").unwrap();

    let created = ok(cli(
        &server,
        &key,
        &["template", "create", "-f", file.to_str().unwrap()],
        b"",
    ));
    assert_eq!(created.trim(), "python-ds");

    let table = ok(cli(&server, &key, &["template", "ls"], b""));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID"), "{table}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("python-ds")
            && row.contains("quay.io/jupyter/scipy-notebook")
            && row.contains("team-a"),
        "{table}"
    );
    let list: Value =
        serde_json::from_str(&ok(cli(&server, &key, &["template", "ls", "--json"], b""))).unwrap();
    assert_eq!(list[0]["id"], "python-ds");
    assert_eq!(list[0]["template"]["resources"]["max_memory"], 32768);

    let yaml = ok(cli(&server, &key, &["template", "inspect", "python-ds"], b""));
    assert_eq!(parse_template(&yaml, "inspect").unwrap(), original, "{yaml}");
    let record: Value = serde_json::from_str(&ok(cli(
        &server,
        &key,
        &["template", "inspect", "python-ds", "--json"],
        b"",
    )))
    .unwrap();
    assert_eq!(record["tenant"], "team-a");
    assert_eq!(record["template"]["warmup_language"], "python");

    // What inspect prints is accepted back as it is (it replaces the template).
    ok(cli(
        &server,
        &key,
        &["template", "create", "-f", "-"],
        yaml.as_bytes(),
    ));

    let removed = cli(&server, &key, &["template", "rm", "python-ds"], b"");
    assert!(
        stderr(&removed).contains("template python-ds removed"),
        "{}",
        stderr(&removed)
    );
    ok(removed);
    assert_eq!(
        ok(cli(&server, &key, &["template", "ls"], b"")).lines().count(),
        1,
        "only the header is left"
    );
    fails_with(
        cli(&server, &key, &["template", "rm", "python-ds"], b""),
        "no template 'python-ds' (not_found, HTTP 404)",
    );
    fails_with(
        cli(&server, &key, &["template", "inspect", "python-ds"], b""),
        "HTTP 404",
    );

    let audit = admin_audit(&server);
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
    let data = DataDir::new();
    let server = Server::start(data.path());
    for name in ["python-ds", "pytorch-ml", "r-analytics", "julia-sci"] {
        let file = seed(&format!("{name}.yaml"));
        let out = cli(
            &server,
            &server.admin,
            &["template", "create", "-f", file.to_str().unwrap()],
            b"",
        );
        assert_eq!(ok(out).trim(), name);
    }
    let (status, list) = call(
        "GET",
        &format!("{}/v1/templates", server.base),
        Some(&server.admin),
        None,
    );
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
    let data = DataDir::new();
    let server = Server::start(data.path());
    let key = new_key(data.path(), "team-a", "user");
    let dir = tempfile::tempdir().unwrap();

    let broken = "id: a\nname: A\nbase_image: alpine\nresources:\n  default_cpu: 1\n default_memory: 2\n";
    let broken = write(dir.path(), "broken.yaml", broken);
    let out = cli(&server, &key, &["template", "create", "-f", &broken], b"");
    fails_with(out, "broken.yaml:6:2: did not find expected key");

    let typo = "id: python-ds\nname: P\nbase_image: python:3.11-slim\nresorces: {default_cpu: 2}\n";
    let typo = write(dir.path(), "python-ds.yaml", typo);
    fails_with(
        cli(&server, &key, &["template", "create", "-f", &typo], b""),
        "python-ds.yaml:4:1: unknown field `resorces`, expected one of",
    );

    let nested = "id: a\nname: A\nbase_image: alpine\nresources:\n  max_cpu: 2\n  default_cpu: 4\n";
    let nested = write(dir.path(), "cpu.yaml", nested);
    fails_with(
        cli(&server, &key, &["template", "create", "-f", &nested], b""),
        "cpu.yaml:6:3: resources.default_cpu (4) is more than resources.max_cpu (2) (invalid_request, HTTP 422)",
    );

    let bad_id = write(
        dir.path(),
        "id.yaml",
        "id: Python_DS\nname: A\nbase_image: alpine\n",
    );
    fails_with(
        cli(&server, &key, &["template", "create", "-f", &bad_id], b""),
        "id.yaml:1:1: id 'Python_DS' is invalid",
    );

    // The API takes the template as a JSON object too, and refuses unknown keys there as well.
    let (status, body) = call(
        "POST",
        &format!("{}/v1/templates", server.base),
        Some(&key),
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
    let (status, body) = call(
        "POST",
        &format!("{}/v1/templates", server.base),
        Some(&key),
        Some(json!({"id": "j", "name": "J", "base_image": "julia:1.10"})),
    );
    assert_eq!(
        (status, body["template"]["resources"]["default_cpu"].as_f64()),
        (201, Some(1.0))
    );
    let (status, _) = call(
        "GET",
        &format!("{}/v1/templates/nope", server.base),
        Some(&key),
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = call(
        "DELETE",
        &format!("{}/v1/templates/nope", server.base),
        Some(&key),
        None,
    );
    assert_eq!(status, 404);
}

#[test]
fn test_roles_and_tenants_limit_who_changes_templates() {
    let data = DataDir::new();
    let server = Server::start(data.path());
    let viewer = new_key(data.path(), "team-a", "viewer");
    let user_a = new_key(data.path(), "team-a", "user");
    let user_b = new_key(data.path(), "team-b", "user");
    let file = seed("julia-sci.yaml");
    let file = file.to_str().unwrap();

    fails_with(
        cli(&server, &viewer, &["template", "create", "-f", file], b""),
        "viewer role and cannot change anything (forbidden, HTTP 403)",
    );
    ok(cli(
        &server,
        &server.admin,
        &["template", "create", "-f", file],
        b"",
    ));
    // Everyone sees a shared template; only admins change it.
    assert!(ok(cli(&server, &viewer, &["template", "ls"], b"")).contains("julia-sci"));
    fails_with(
        cli(&server, &viewer, &["template", "rm", "julia-sci"], b""),
        "HTTP 403",
    );
    fails_with(
        cli(&server, &user_a, &["template", "rm", "julia-sci"], b""),
        "template 'julia-sci' is shared; only admin keys may delete it",
    );
    fails_with(
        cli(&server, &user_a, &["template", "create", "-f", file], b""),
        "only admin keys may replace it (forbidden, HTTP 403)",
    );

    // A tenant's template is invisible to other tenants; ids are per tenant, so another tenant's create
    // with the same id makes its own template (answering as for a free id) and takes nothing over.
    ok(cli(
        &server,
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
        cli(&server, &user_b, &["template", "inspect", "r-analytics"], b""),
        "no template 'r-analytics'",
    );
    assert!(!ok(cli(&server, &user_b, &["template", "ls"], b"")).contains("r-analytics"));
    let created = ok(cli(
        &server,
        &user_b,
        &[
            "template",
            "create",
            "-f",
            seed("r-analytics.yaml").to_str().unwrap(),
        ],
        b"",
    ));
    assert!(created.contains("r-analytics"), "{created}");
    let (status, list) = call(
        "GET",
        &format!("{}/v1/templates", server.base),
        Some(&server.admin),
        None,
    );
    assert_eq!((status, list.as_array().unwrap().len()), (200, 3));
    ok(cli(&server, &user_a, &["template", "rm", "r-analytics"], b""));
    assert!(ok(cli(&server, &user_b, &["template", "ls"], b"")).contains("r-analytics"));
}

#[test]
fn test_init_template_output_is_accepted_by_create() {
    let data = DataDir::new();
    let server = Server::start(data.path());
    let key = new_key(data.path(), "team-a", "user");
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
        ok(cli(
            &server,
            &key,
            &["template", "create", "-f", "-"],
            yaml.as_bytes()
        ))
        .trim(),
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
    ok(cli(&server, &key, &init, b""));
    assert_eq!(
        ok(cli(&server, &key, &["template", "create", "-f", path], b"")).trim(),
        "data-team"
    );
    fails_with(cli(&server, &key, &init, b""), "cannot create");
    let bad = ["init", "template", "--name", "x", "--from", "not an image"];
    fails_with(cli(&server, &key, &bad, b""), "must not contain whitespace");
}

#[test]
fn test_openapi_lists_the_template_routes() {
    let data = DataDir::new();
    let server = Server::start(data.path());
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
