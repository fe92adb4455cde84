//! The E2B-compatible surface against a real server, from a hostile caller's side: keys in the SDK's
//! form, other tenants, forged and stale access tokens, reserved metadata, unsupported features named in
//! E2B's error shape. (The SDKs themselves, and E2B's own suites, run in `.ci/e2b`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::server::{new_key, DataDir, Server};
use serde_json::{json, Value};

/// E2B's form of a Tartarus key, as `tartarus e2b env` prints it.
fn sdk_key(key: &str) -> String {
    format!(
        "e2b_{}",
        key.bytes().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// A call as the SDK makes it: `X-API-Key`, and the sandbox headers when given.
fn e2b(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value, Vec<(String, String)>) {
    let mut request =
        ureq::request(method, &format!("{}/e2b{path}", server.base)).timeout(Duration::from_secs(60));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    let response = match response {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|n| (n.clone(), response.header(&n).unwrap_or_default().to_string()))
        .collect();
    let body = response.into_string().unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
        headers,
    )
}

#[test]
fn tenants_tokens_and_bad_input_get_e2b_errors_and_learn_nothing() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = sdk_key(&new_key(dir.path(), "alice", "user"));
    let mallory = sdk_key(&new_key(dir.path(), "mallory", "user"));
    let as_alice = [("X-API-Key", alice.as_str())];
    let as_mallory = [("X-API-Key", mallory.as_str())];

    // No key, an unknown key: 401 in E2B's shape.
    let (status, body, _) = e2b(&server, "GET", "/sandboxes", &[], None);
    assert_eq!(status, 401);
    assert_eq!(body["code"], 401, "{body}");
    let (status, _, _) = e2b(&server, "GET", "/sandboxes", &[("X-API-Key", "e2b_00")], None);
    assert_eq!(status, 401);

    let (status, created, _) = e2b(
        &server,
        "POST",
        "/sandboxes",
        &as_alice,
        Some(json!({"templateID": "base", "timeout": 120, "metadata": {"owner": "alice"}})),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(created["templateID"], "base");

    // The daemon answers with the right token...
    let sandbox_headers = |token: &str| {
        vec![
            ("E2b-Sandbox-Id".to_string(), id.clone()),
            ("E2b-Sandbox-Port".to_string(), "49983".to_string()),
            ("X-Access-Token".to_string(), token.to_string()),
        ]
    };
    let call_daemon = |token: &str| {
        let headers = sandbox_headers(token);
        let borrowed: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        e2b(&server, "GET", "/health", &borrowed, None)
    };
    assert_eq!(call_daemon(&token).0, 204);
    // ...and a forged one gets exactly what a sandbox that does not exist gets.
    let (status, forged, _) = call_daemon("ea_0000000000000000000000000000000000000000");
    assert_eq!(status, 502);
    let missing_headers = [
        ("E2b-Sandbox-Id", "sb_000000000000"),
        ("X-Access-Token", token.as_str()),
    ];
    let (_, missing, _) = e2b(&server, "GET", "/health", &missing_headers, None);
    assert_eq!(
        forged["message"].as_str().unwrap().replace(&id, "ID"),
        missing["message"]
            .as_str()
            .unwrap()
            .replace("sb_000000000000", "ID")
    );
    // A port that is not a port.
    let bad_port = [
        ("E2b-Sandbox-Id", id.as_str()),
        ("E2b-Sandbox-Port", "70000"),
        ("X-Access-Token", token.as_str()),
    ];
    assert_eq!(e2b(&server, "GET", "/health", &bad_port, None).0, 400);

    // Mallory: Alice's sandbox does not exist for her, in every call.
    for (method, path, body) in [
        ("GET", format!("/sandboxes/{id}"), None),
        ("DELETE", format!("/sandboxes/{id}"), None),
        (
            "POST",
            format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 1})),
        ),
        ("POST", format!("/sandboxes/{id}/pause"), None),
        (
            "POST",
            format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 10})),
        ),
    ] {
        let (status, body, _) = e2b(&server, method, &path, &as_mallory, body);
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (_, listed, _) = e2b(&server, "GET", "/v2/sandboxes", &as_mallory, None);
    assert_eq!(listed, json!([]));

    // Alice's own calls work, and metadata filters select.
    let (status, detail, _) = e2b(&server, "GET", &format!("/sandboxes/{id}"), &as_alice, None);
    assert_eq!(status, 200, "{detail}");
    assert_eq!(
        detail["metadata"],
        json!({"owner": "alice"}),
        "this API's own labels are not metadata"
    );
    assert_eq!(detail["envdAccessToken"], token.as_str());
    let (_, hit, _) = e2b(
        &server,
        "GET",
        "/v2/sandboxes?metadata=owner%3Dalice",
        &as_alice,
        None,
    );
    assert_eq!(hit.as_array().unwrap().len(), 1);
    let (_, miss, _) = e2b(
        &server,
        "GET",
        "/v2/sandboxes?metadata=owner%3Dbob",
        &as_alice,
        None,
    );
    assert_eq!(miss, json!([]));
    let (status, _, _) = e2b(&server, "GET", "/v2/sandboxes?state=exploded", &as_alice, None);
    assert_eq!(status, 400);

    // Bad input: E2B's 400 naming what was wrong; nothing is created.
    for (body, wanted) in [
        (json!({"timeout": 10}), "templateID"),
        (json!({"templateID": "base", "timeout": 999999}), "timeout"),
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}),
            "volume mounts",
        ),
        (json!({"templateID": "base", "mcp": {"x": {}}}), "MCP"),
        (
            json!({"templateID": "base", "metadata": {"e2b.template": "x"}}),
            "reserved",
        ),
        (
            json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false}),
            "filesystem-only",
        ),
    ] {
        let (status, answer, _) = e2b(&server, "POST", "/sandboxes", &as_alice, Some(body.clone()));
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(wanted),
            "{body}: {answer}"
        );
    }
    let (_, all, _) = e2b(&server, "GET", "/sandboxes", &as_alice, None);
    assert_eq!(
        all.as_array().unwrap().len(),
        1,
        "only the one good create made a sandbox"
    );
    // A feature Tartarus lacks is named in E2B's shape.
    let (status, answer, _) = e2b(
        &server,
        "POST",
        &format!("/sandboxes/{id}/snapshots"),
        &as_alice,
        Some(json!({})),
    );
    assert_eq!(status, 404);
    assert!(
        answer["message"].as_str().unwrap().contains("not supported"),
        "{answer}"
    );

    // Killed: gone for the control API and for the token.
    assert_eq!(
        e2b(&server, "DELETE", &format!("/sandboxes/{id}"), &as_alice, None).0,
        204
    );
    assert_eq!(
        e2b(&server, "GET", &format!("/sandboxes/{id}"), &as_alice, None).0,
        404
    );
    assert_eq!(call_daemon(&token).0, 502);
}

#[test]
fn set_timeout_and_auto_pause_act_at_the_deadline() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = sdk_key(&new_key(dir.path(), "alice", "user"));
    let as_alice = [("X-API-Key", alice.as_str())];
    let create = |body: Value| {
        let (status, created, _) = e2b(&server, "POST", "/sandboxes", &as_alice, Some(body));
        assert_eq!(status, 201, "{created}");
        created["sandboxID"].as_str().unwrap().to_string()
    };
    let state = |id: &str| e2b(&server, "GET", &format!("/sandboxes/{id}"), &as_alice, None);

    let stopped = create(json!({"templateID": "base", "timeout": 300}));
    let paused = create(json!({"templateID": "base", "timeout": 300, "autoPause": true}));
    for id in [&stopped, &paused] {
        let (status, _, _) = e2b(
            &server,
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            &as_alice,
            Some(json!({"timeout": 0})),
        );
        assert_eq!(status, 204);
    }
    common::poll_until(Duration::from_secs(20), "the deadlines acted", || {
        state(&stopped).0 == 404 && state(&paused).1["state"] == "paused"
    });
    // Connect resumes the paused one, with a new timeout.
    let (status, resumed, _) = e2b(
        &server,
        "POST",
        &format!("/sandboxes/{paused}/connect"),
        &as_alice,
        Some(json!({"timeout": 60})),
    );
    assert_eq!(status, 201, "{resumed}");
    assert_eq!(state(&paused).1["state"], "running");
}

/// The code interpreter's suite kills a sandbox from one thread while another request is in flight, then
/// kills it again: kills that race each other all succeed, and once it is gone a kill is E2B's 404.
#[test]
fn kills_that_race_each_other_all_succeed_and_a_later_kill_is_not_found() {
    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let alice = sdk_key(&new_key(dir.path(), "alice", "user"));
    let as_alice = [("X-API-Key", alice.as_str())];
    for round in 0..3 {
        let (status, created, _) = e2b(
            &server,
            "POST",
            "/sandboxes",
            &as_alice,
            Some(json!({"templateID": "base", "timeout": 120})),
        );
        assert_eq!(status, 201, "{created}");
        let id = created["sandboxID"].as_str().unwrap().to_string();
        let path = format!("/sandboxes/{id}");
        let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
            let kills: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        let (status, body, _) = e2b(&server, "DELETE", &path, &as_alice, None);
                        (status, body)
                    })
                })
                .collect();
            kills.into_iter().map(|k| k.join().unwrap()).collect()
        });
        for (status, body) in &answers {
            assert!(
                *status == 204 || *status == 404,
                "round {round}: a racing kill answered {status}: {body}"
            );
        }
        assert!(
            answers.iter().any(|(status, _)| *status == 204),
            "round {round}: {answers:?}"
        );
        assert_eq!(e2b(&server, "DELETE", &path, &as_alice, None).0, 404);
    }
}

#[test]
fn sandbox_host_names_route_to_the_sandbox_with_its_token_only() {
    use std::io::{Read, Write};
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--sandbox-domain", "sbx.test"]);
    let alice = sdk_key(&new_key(dir.path(), "alice", "user"));
    let (status, created, _) = e2b(
        &server,
        "POST",
        "/sandboxes",
        &[("X-API-Key", alice.as_str())],
        Some(json!({"templateID": "base", "timeout": 60})),
    );
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["domain"], "sbx.test",
        "the SDK's get_host builds names under it"
    );
    let id = created["sandboxID"].as_str().unwrap();
    let token = created["envdAccessToken"].as_str().unwrap();
    let addr = server.base.trim_start_matches("http://");
    let status_of = |host: &str, token: Option<&str>| {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = token
            .map(|t| format!("X-Access-Token: {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET /health HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head[9..12]).into_owned()
    };
    assert_eq!(status_of(&format!("49983-{id}.sbx.test"), Some(token)), "204");
    assert_eq!(status_of(&format!("49983-{id}.sbx.test:443"), Some(token)), "204");
    assert_eq!(
        status_of(&format!("49983-{id}.sbx.test"), None),
        "502",
        "no token: not running"
    );
    assert_eq!(
        status_of(&format!("49983-{id}.other.test"), Some(token)),
        "404",
        "another domain is the API's"
    );
}
