//! Agent tasks end to end (docs/tasks.md): a real git server on loopback (`git http-backend` behind a
//! small HTTP server in this file, with basic auth), a `tartarus server` with scripted agent types, and
//! tasks that push a branch, find no changes, time out, are cancelled, or meet a remote that refuses the
//! push or the credentials. Secrets never show in logs or views.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::server::{call, new_key, DataDir, Server};
use serde_json::{json, Value};

const USER: &str = "bot";
const PASSWORD: &str = "s3cr3t-git-token-9f2c";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bare repository `name.git` under `root` with one commit on main (a README).
fn bare_repository(root: &Path, name: &str) -> PathBuf {
    let bare = root.join(format!("{name}.git"));
    git(
        root,
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            bare.to_str().unwrap(),
        ],
    );
    let seed = root.join(format!("{name}-seed"));
    std::fs::create_dir(&seed).unwrap();
    git(&seed, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(seed.join("README.md"), "# Demo\n").unwrap();
    git(&seed, &["add", "README.md"]);
    git(
        &seed,
        &[
            "-c",
            "user.name=Seed",
            "-c",
            "user.email=seed@example.com",
            "commit",
            "--quiet",
            "-m",
            "seed",
        ],
    );
    git(&seed, &["push", "--quiet", bare.to_str().unwrap(), "main"]);
    bare
}

/// `git http-backend` (CGI) behind an HTTP/1.1 server on loopback that wants basic auth as USER:PASSWORD.
fn git_http_server(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let expected = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{USER}:{PASSWORD}")
        )
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            let expected = expected.clone();
            std::thread::spawn(move || serve_git(stream, &root, &expected));
        }
    });
    base
}

fn serve_git(stream: std::net::TcpStream, root: &Path, expected_auth: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let mut headers = std::collections::HashMap::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = vec![
        0;
        headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    ];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let stream = reader.get_mut();
    if headers.get("authorization").map(String::as_str) != Some(expected_auth) {
        let _ = stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"git\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        return;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut child = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env(
            "CONTENT_TYPE",
            headers.get("content-type").cloned().unwrap_or_default(),
        )
        .env("CONTENT_LENGTH", body.len().to_string())
        .env(
            "GIT_PROTOCOL",
            headers.get("git-protocol").cloned().unwrap_or_default(),
        )
        .env("REMOTE_USER", USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&body).unwrap();
    let output = child.wait_with_output().unwrap();
    let split = output
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| {
            output
                .stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
        })
        .unwrap_or((0, 0));
    let (head, rest) = output.stdout.split_at(split.0);
    let cgi_body = &rest[split.1..];
    let head = String::from_utf8_lossy(head);
    let mut status = "200 OK".to_string();
    let mut response_headers = String::new();
    for header in head.lines().filter(|l| !l.trim().is_empty()) {
        match header.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => status = value.trim().to_string(),
            Some(_) => response_headers.push_str(&format!("{}\r\n", header.trim())),
            None => {}
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\n{response_headers}content-length: {}\r\nconnection: close\r\n\r\n",
        cgi_body.len()
    );
    let _ = stream.write_all(cgi_body);
}

const GITHUB_TOKEN: &str = "ghp_testtoken0123456789";

/// What the GitHub double was sent: (authorization header, request body).
type PullRequests = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A double of GitHub's REST API with the one endpoint tasks use, "Create a pull request"
/// (`POST /repos/{owner}/{repo}/pulls`), answered as GitHub documents it: 201 with the pull request
/// (`number`, `html_url`, `state`, `head`/`base` refs, …), 401 without the token, 422 "Validation Failed"
/// without `title`, `head` or `base`.
fn github_double() -> (String, PullRequests) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let requests: PullRequests = Default::default();
    let seen = requests.clone();
    let html = base.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = std::collections::HashMap::new();
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
                }
            }
            let mut body = vec![
                0;
                headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0)
            ];
            let _ = reader.read_exact(&mut body);
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let auth = headers.get("authorization").cloned().unwrap_or_default();
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let (status, answer) =
                if method != "POST" || !path.ends_with("/pulls") || !path.starts_with("/repos/") {
                    ("404 Not Found", json!({"message": "Not Found"}))
                } else if auth != format!("Bearer {GITHUB_TOKEN}") {
                    ("401 Unauthorized", json!({"message": "Bad credentials"}))
                } else if ["title", "head", "base"].iter().any(|k| !request[*k].is_string()) {
                    (
                        "422 Unprocessable Entity",
                        json!({"message": "Validation Failed"}),
                    )
                } else {
                    let number = {
                        let mut seen = seen.lock().unwrap();
                        seen.push((auth.clone(), request.clone()));
                        seen.len()
                    };
                    let repo = path.trim_start_matches("/repos/").trim_end_matches("/pulls");
                    (
                        "201 Created",
                        json!({
                            "id": 1000 + number, "number": number, "state": "open",
                            "url": format!("{html}/repos/{repo}/pulls/{number}"),
                            "html_url": format!("{html}/{repo}/pull/{number}"),
                            "title": request["title"], "body": request["body"],
                            "head": {"ref": request["head"]}, "base": {"ref": request["base"]},
                        }),
                    )
                };
            let text = answer.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (base, requests)
}

struct Fixture {
    _dir: DataDir,
    _repos: tempfile::TempDir,
    repos: PathBuf,
    git_base: String,
    server: Server,
    key: String,
    pulls: PullRequests,
    github: String,
}

fn fixture() -> Fixture {
    let repos = tempfile::tempdir().unwrap();
    let root = repos.path().to_path_buf();
    bare_repository(&root, "demo");
    let refusing = bare_repository(&root, "refusing");
    let hook = refusing.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'pushes are refused by policy here' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let git_base = git_http_server(root.clone());
    let dir = DataDir::new();
    let (github, pulls) = github_double();
    let token_file = dir.path().join("github.token");
    std::fs::write(&token_file, format!("{GITHUB_TOKEN}\n")).unwrap();
    let token_file = token_file.display().to_string();
    let script = r#"script=printf '\n## From the agent\n%s\n' "$(cat)" >> README.md && echo "agent env:" && env | sort"#;
    let server = Server::start_with(
        dir.path(),
        &[],
        &[
            "--agent-type",
            script,
            "--agent-type",
            "noop=cat >/dev/null; echo nothing to do",
            "--agent-type",
            "hang=echo started; sleep 600",
            "--task-timeout",
            "4s",
            "--task-author",
            "Task Bot <bot@tasks.example>",
            "--github-api-url",
            &github,
            "--github-token-file",
            &token_file,
            "--public-url",
            "https://tartarus.example",
        ],
    );
    let key = new_key(dir.path(), "team-a", "user");
    Fixture {
        _dir: dir,
        repos: root,
        _repos: repos,
        git_base,
        server,
        key,
        pulls,
        github,
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    fn project(&self, name: &str, repo: &str, password: &str) -> Value {
        self.project_with(name, repo, password, None)
    }

    fn project_with(&self, name: &str, repo: &str, password: &str, github_repo: Option<&str>) -> Value {
        let (status, project) = call(
            "POST",
            &self.url("/v1/projects"),
            Some(&self.key),
            Some(
                json!({"name": name, "repo_url": format!("{}/{repo}.git", self.git_base),
                        "github_repo": github_repo,
                        "credentials": {"username": USER, "password": password}}),
            ),
        );
        assert_eq!(status, 201, "{project}");
        project
    }

    fn task(&self, project: &str, agent: &str, prompt: &str) -> String {
        let (status, task) = call(
            "POST",
            &self.url("/v1/tasks"),
            Some(&self.key),
            Some(json!({"project": project, "agent_type": agent, "prompt": prompt})),
        );
        assert_eq!(status, 202, "{task}");
        assert_eq!(task["status"], "pending");
        task["id"].as_str().unwrap().to_string()
    }

    fn get(&self, id: &str) -> Value {
        let (status, task) = call(
            "GET",
            &self.url(&format!("/v1/tasks/{id}")),
            Some(&self.key),
            None,
        );
        assert_eq!(status, 200, "{task}");
        task
    }

    fn wait(&self, id: &str, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        common::poll_until(limit, &format!("{what} (task {id})"), || {
            last = self.get(id);
            done(&last)
        });
        last
    }

    fn wait_ended(&self, id: &str) -> Value {
        self.wait(id, Duration::from_secs(60), "the task to end", |t| {
            matches!(t["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
    }

    fn logs(&self, id: &str) -> String {
        ureq::get(&self.url(&format!("/v1/tasks/{id}/logs")))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }
}

#[test]
fn a_task_pushes_its_agents_changes_on_a_new_branch() {
    let f = fixture();
    let project = f.project("demo", "demo", PASSWORD);
    assert_eq!(project["has_credentials"], true);
    assert!(
        !project.to_string().contains(PASSWORD),
        "the project shows its password"
    );
    let id = f.task("demo", "script", "add a README section");
    let task = f.wait_ended(&id);
    assert_eq!(task["status"], "succeeded", "{task}\nlogs:\n{}", f.logs(&id));
    let branch = format!("tartarus/{id}");
    assert_eq!(task["branch"], branch.as_str());
    assert_eq!(task["output"], format!("pushed branch {branch}"));
    let kinds: Vec<&str> = task["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["task.created", "task.started", "task.completed"],
        "{task}"
    );

    // The branch is on the git server, with the agent's change, the configured author and the prompt.
    let bare = f.repos.join("demo.git");
    let readme = git(&bare, &["show", &format!("{branch}:README.md")]);
    assert_eq!(readme, "# Demo\n\n## From the agent\nadd a README section\n");
    let author = git(&bare, &["log", "-1", "--format=%an <%ae>|%s", &branch]);
    assert_eq!(author.trim(), "Task Bot <bot@tasks.example>|add a README section");
    assert_eq!(
        git(&bare, &["rev-parse", "main"]),
        git(&bare, &["rev-parse", &format!("{branch}~1")]),
        "branched off main"
    );

    // The agent ran in the sandbox (its env is logged) without the credentials.
    let logs = f.logs(&id);
    assert!(
        logs.contains("agent env:") && logs.contains("TARTARUS_TASK_ID="),
        "{logs}"
    );
    let encoded = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{USER}:{PASSWORD}"),
    );
    for secret in [PASSWORD, encoded.as_str()] {
        assert!(!logs.contains(secret), "a secret in the logs:\n{logs}");
        assert!(
            !f.get(&id).to_string().contains(secret),
            "a secret in the task's view"
        );
    }
    let (_, list) = call("GET", &f.url("/v1/tasks"), Some(&f.key), None);
    assert_eq!(list.as_array().unwrap().len(), 1);

    // The same through the CLI, waiting for the end.
    let out = common::server::cli(
        &f.server,
        &f.key,
        &[
            "task",
            "create",
            "--project",
            "demo",
            "--agent",
            "script",
            "--prompt",
            "from the CLI",
            "--wait",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(String::from_utf8_lossy(&out.stderr).contains("succeeded: pushed branch"));
    let readme = git(&bare, &["show", &format!("tartarus/{cli_id}:README.md")]);
    assert!(readme.ends_with("from the CLI\n"), "{readme}");
    let out = common::server::cli(&f.server, &f.key, &["task", "ls"], b"");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(&cli_id) && listing.contains(&id), "{listing}");
}

#[test]
fn a_project_on_github_gets_a_pull_request() {
    let f = fixture();
    f.project_with("demo", "demo", PASSWORD, Some("acme/demo"));
    let id = f.task("demo", "script", "document the API\n\nin more detail");
    let task = f.wait_ended(&id);
    assert_eq!(task["status"], "succeeded", "{task}\nlogs:\n{}", f.logs(&id));
    let url = format!("{}/acme/demo/pull/1", f.github);
    assert_eq!(task["pull_request"], url.as_str(), "{task}");
    assert_eq!(task["output"], format!("opened pull request {url}"));
    let pulls = f.pulls.lock().unwrap().clone();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let (_, request) = &pulls[0];
    assert_eq!(request["head"], format!("tartarus/{id}"));
    assert_eq!(request["base"], "main");
    assert_eq!(request["title"], "document the API");
    let body = request["body"].as_str().unwrap();
    assert!(body.starts_with("document the API\n\nin more detail"), "{body}");
    assert!(
        body.contains(&format!("https://tartarus.example/v1/tasks/{id}/logs")),
        "{body}"
    );
    let logs = f.logs(&id);
    assert!(logs.contains("opened pull request #1"), "{logs}");
    assert!(
        !logs.contains(GITHUB_TOKEN) && !task.to_string().contains(GITHUB_TOKEN),
        "the token leaked"
    );
    // The branch it names is on the git server.
    git(
        &f.repos.join("demo.git"),
        &["rev-parse", "--verify", &format!("tartarus/{id}")],
    );
}

#[test]
fn no_changes_timeouts_cancels_and_refusals_end_as_they_should() {
    let f = fixture();
    f.project("demo", "demo", PASSWORD);
    f.project("refusing", "refusing", PASSWORD);
    f.project("locked", "demo", "the-wrong-password");

    let nothing = f.task("demo", "noop", "look around");
    let hang = f.task("demo", "hang", "never finish");
    let refused = f.task("refusing", "script", "change something");
    let locked = f.task("locked", "noop", "clone me");

    let task = f.wait_ended(&nothing);
    assert_eq!(
        (task["status"].as_str(), task["output"].as_str()),
        (Some("succeeded"), Some("no changes")),
        "{task}"
    );
    assert!(task["branch"].is_null());

    let task = f.wait_ended(&hang);
    assert_eq!(task["status"], "failed");
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .contains("did not finish within 4s"),
        "{task}"
    );
    assert!(
        f.logs(&hang).contains("started"),
        "the logs of a failed task are kept"
    );

    let task = f.wait_ended(&refused);
    assert_eq!(task["status"], "failed");
    assert!(task["error"].as_str().unwrap().contains("push"), "{task}");
    assert!(
        git(&f.repos.join("refusing.git"), &["branch", "--list", "tartarus/*"])
            .trim()
            .is_empty()
    );

    let task = f.wait(
        &locked,
        Duration::from_secs(60),
        "the clone's retries to run out",
        |t| t["status"] == "failed",
    );
    assert_eq!(task["attempts"], 3, "{task}");
    let error = task["error"].as_str().unwrap();
    assert!(
        error.contains("clone") && error.contains("after 3 attempts"),
        "{error}"
    );
    assert!(
        !task.to_string().contains("the-wrong-password") && !f.logs(&locked).contains("the-wrong-password")
    );

    // Cancel: a running agent's sandbox is killed.
    let running = f.task("demo", "hang", "wait for a cancel");
    let task = f.wait(&running, Duration::from_secs(30), "the agent to start", |t| {
        t["status"] == "running" && t["sandbox"].is_string()
    });
    let sandbox = task["sandbox"].as_str().unwrap().to_string();
    let (status, body) = call(
        "POST",
        &f.url(&format!("/v1/tasks/{running}/cancel")),
        Some(&f.key),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let task = f.wait_ended(&running);
    assert_eq!(task["status"], "cancelled", "{task}");
    let (_, record) = call(
        "GET",
        &f.url(&format!("/v1/sandboxes/{sandbox}")),
        Some(&f.server.admin),
        None,
    );
    assert_ne!(
        record["status"], "running",
        "the sandbox outlived its task: {record}"
    );
    let (status, _) = call(
        "POST",
        &f.url(&format!("/v1/tasks/{running}/cancel")),
        Some(&f.key),
        None,
    );
    assert_eq!(status, 409, "cancelling an ended task");
}

#[test]
fn bad_requests_are_refused_with_4xx() {
    let f = fixture();
    f.project("demo", "demo", PASSWORD);
    let cases = [
        (
            "/v1/tasks",
            json!({"project": "demo", "agent_type": "unknown", "prompt": "x"}),
            422,
        ),
        (
            "/v1/tasks",
            json!({"project": "nope", "agent_type": "noop", "prompt": "x"}),
            404,
        ),
        (
            "/v1/tasks",
            json!({"project": "demo", "agent_type": "noop", "prompt": ""}),
            422,
        ),
        (
            "/v1/tasks",
            json!({"project": "demo", "agent_type": "noop", "prompt": "x", "parent_task_id": "task_0"}),
            404,
        ),
        (
            "/v1/tasks",
            json!({"project": "demo", "agent_type": "noop", "prompt": "x", "extra": 1}),
            422,
        ),
        (
            "/v1/projects",
            json!({"name": "demo", "repo_url": "https://git.example/x.git"}),
            409,
        ),
        (
            "/v1/projects",
            json!({"name": "p2", "repo_url": "https://u:pw@git.example/x.git"}),
            422,
        ),
        (
            "/v1/projects",
            json!({"name": "p3", "repo_url": "file:///etc"}),
            422,
        ),
        (
            "/v1/projects",
            json!({"name": "Bad Name", "repo_url": "https://git.example/x.git"}),
            422,
        ),
        (
            "/v1/projects",
            json!({"name": "p4", "repo_url": "https://git.example/x.git", "default_branch": "--upload-pack=x"}),
            422,
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = call("POST", &f.url(path), Some(&f.key), Some(body.clone()));
        assert_eq!(status, expected, "{path} {body}: {answer}");
    }
    let other = new_key(f._dir.path(), "team-b", "user");
    let (status, _) = call("GET", &f.url("/v1/projects/demo"), Some(&other), None);
    assert_eq!(status, 404, "another tenant's project");

    // The tenant's policy applies to a task's sandbox: refused once, not retried.
    let policy = "id: short\nversion: 1\ntenants: [team-b]\nresources: {max_duration: 30s}\n";
    let (status, body) = call(
        "POST",
        &f.url("/v1/policies"),
        Some(&f.server.admin),
        Some(json!({"yaml": policy, "source": "short.yaml"})),
    );
    assert!(status < 300, "{body}");
    let (status, body) = call(
        "POST",
        &f.url("/v1/projects"),
        Some(&other),
        Some(
            json!({"name": "demo", "repo_url": format!("{}/demo.git", f.git_base),
                    "credentials": {"username": USER, "password": PASSWORD}}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    let (status, task) = call(
        "POST",
        &f.url("/v1/tasks"),
        Some(&other),
        Some(json!({"project": "demo", "agent_type": "noop", "prompt": "x"})),
    );
    assert_eq!(status, 202, "{task}");
    let id = task["id"].as_str().unwrap();
    let mut last = Value::Null;
    common::poll_until(Duration::from_secs(30), "the refused task to fail", || {
        last = call("GET", &f.url(&format!("/v1/tasks/{id}")), Some(&other), None).1;
        last["status"] == "failed"
    });
    assert!(
        last["error"].as_str().unwrap().contains("admission refused"),
        "{last}"
    );
    assert_eq!(last["attempts"], 1, "a refusal was retried: {last}");
}
