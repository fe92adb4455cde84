//! Sandboxes from images and templates over the API, and the Python zygote of warm templates, against a
//! real registry on loopback and a real server.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::registry::{base_layer, Compression, Format, Image, Registry, RunConfig};
use common::server::{call, create, exec, DataDir, Server};
use serde_json::{json, Value};

/// Builds the host's Debian python3 into an image (bench/python-image) and pushes it to `registry`.
fn push_python_image(registry: &Registry, repo: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/python-image");
    let reference = format!("{}/{repo}:1", registry.host());
    let out = Command::new(&script).arg(&reference).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (needs umoci, skopeo, /usr/bin/python3.11, busybox-static): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

fn admin_post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{}{path}", server.base),
        Some(&server.admin),
        Some(body),
    )
}

/// Polls the template until `warm` sandboxes are ready (the pool pulls and warms in the background).
fn wait_warm(server: &Server, id: &str, warm: u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, view) = call(
            "GET",
            &format!("{}/v1/templates/{id}", server.base),
            Some(&server.admin),
            None,
        );
        if view["warm"].as_u64() == Some(warm) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "template {id} never got {warm} warm sandboxes: {view}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(server: &Server, id: &str, body: Value) -> Value {
    let (status, result) = exec(server, &server.admin, id, body);
    assert_eq!(status, 200, "{result}");
    result
}

fn python(server: &Server, id: &str, code: &str) -> Value {
    run(server, id, json!({"cmd": ["python3", "-c", code]}))
}

#[test]
fn python_in_a_template_sandbox_forks_from_the_warm_zygote() {
    let registry = Registry::anonymous();
    let reference = push_python_image(&registry, "test/python");
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--insecure-registry", &registry.host()]);
    // `decimal` is not imported by a plain interpreter's start-up: seeing it loaded proves the program
    // was forked from the warmed zygote.
    let template = json!({
        "id": "py",
        "name": "Python",
        "base_image": reference,
        "warmup_script": "import decimal\nimport json\n",
        "env": {"FROM_TEMPLATE": "yes"},
        "pool": {"size": 1},
    });
    let (status, body) = admin_post(&server, "/v1/templates", template);
    assert_eq!(status, 201, "{body}");
    wait_warm(&server, "py", 1);

    let sandbox = create(&server, &server.admin, json!({"template": "py"}));
    let id = sandbox["id"].as_str().unwrap();
    assert_eq!(sandbox["template"], "py");

    let warm = python(&server, id, "import sys; print('decimal' in sys.modules)");
    assert_eq!(
        (warm["exit_code"].as_i64(), warm["stdout"].as_str()),
        (Some(0), Some("True\n")),
        "{warm}"
    );

    // A real program: stdin, environment (template's and request's), working directory, both streams.
    let io = run(
        &server,
        id,
        json!({
            "cmd": ["python3", "-c",
                "import os, sys; print(sys.stdin.read().upper(), os.environ['FOO'], \
                 os.environ['FROM_TEMPLATE'], os.getcwd(), sys.argv); print('err', file=sys.stderr)",
                "arg1"],
            "stdin": "abc",
            "env": {"FOO": "bar"},
            "cwd": "/tmp",
        }),
    );
    assert_eq!(io["stdout"], "ABC bar yes /tmp ['-c', 'arg1']\n", "{io}");
    assert_eq!(io["stderr"], "err\n", "{io}");

    // Exit statuses and tracebacks come through.
    assert_eq!(python(&server, id, "import sys; sys.exit(3)")["exit_code"], 3);
    let failed = python(&server, id, "1/0");
    assert_eq!(failed["exit_code"], 1, "{failed}");
    assert!(
        failed["stderr"].as_str().unwrap().contains("ZeroDivisionError"),
        "{failed}"
    );

    // Every program starts from the pristine zygote: module state never carries over.
    let first = python(
        &server,
        id,
        "import decimal; decimal.LEAK = 1; print(decimal.LEAK)",
    );
    assert_eq!(first["stdout"], "1\n", "{first}");
    let second = python(&server, id, "import decimal; print(hasattr(decimal, 'LEAK'))");
    assert_eq!(second["stdout"], "False\n", "{second}");

    // The program is inside the sandbox: the image's root, not the host's.
    let inside = python(
        &server,
        id,
        "import os; print(os.path.exists('/usr/lib/python3.11'), os.path.exists(os.environ.get('CARGO_HOME', '/root/.cargo')))",
    );
    assert_eq!(inside["stdout"], "True False\n", "{inside}");

    // Options the zygote does not take run the image's own interpreter.
    let version = run(&server, id, json!({"cmd": ["python3", "-V"]}));
    assert!(
        version["stdout"].as_str().unwrap().starts_with("Python 3.11"),
        "{version}"
    );

    // A child interpreter is warm too, unless it inherits a descriptor beyond stdio, which only a real
    // interpreter can receive.
    let children = python(
        &server,
        id,
        "import os, subprocess, sys\n\
         probe = 'import sys; print(\"decimal\" in sys.modules)'\n\
         subprocess.run([sys.executable, '-c', probe], check=True)\n\
         r, w = os.pipe()\n\
         writer = probe + '; import os; os.write(int(sys.argv[1]), b\"via-fd\")'\n\
         subprocess.run([sys.executable, '-c', writer, str(w)], pass_fds=[w], check=True)\n\
         os.close(w)\n\
         print(os.read(r, 100).decode())",
    );
    assert_eq!(children["stdout"], "True\nFalse\nvia-fd\n", "{children}");

    // A timed-out program is killed, not left running in the zygote. (Forked programs all carry the
    // zygote's command line, so the program names itself in a file.)
    let slow = run(
        &server,
        id,
        json!({"cmd": ["python3", "-c",
            "import os, time; open('/tmp/slow.pid', 'w').write(str(os.getpid())); time.sleep(600)"],
            "timeout_s": 1}),
    );
    assert_eq!(slow["timed_out"], true, "{slow}");
    let alive = "import os; pid = open('/tmp/slow.pid').read()\n\
        try:\n\
        \x20   state = open(f'/proc/{pid}/stat').read().split(')')[1].split()[0]\n\
        except OSError:\n\
        \x20   state = 'gone'\n\
        print(state)";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = python(&server, id, alive);
        if left["stdout"] == "gone\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out program still runs: {left}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Another sandbox from the same template shares nothing with this one.
    python(&server, id, "open('/tmp/secret', 'w').write('x')");
    let other = create(&server, &server.admin, json!({"template": "py"}));
    let other_id = other["id"].as_str().unwrap();
    let isolated = python(
        &server,
        other_id,
        "import os; print(os.path.exists('/tmp/secret'))",
    );
    assert_eq!(isolated["stdout"], "False\n", "{isolated}");
}

#[test]
fn a_broken_warm_up_still_gives_a_working_sandbox() {
    let registry = Registry::anonymous();
    let reference = push_python_image(&registry, "test/python-broken");
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--insecure-registry", &registry.host()]);
    let template = json!({
        "id": "broken", "name": "Broken", "base_image": reference,
        "warmup_script": "import no_such_module_anywhere\n", "pool": {"size": 1},
    });
    assert_eq!(admin_post(&server, "/v1/templates", template).0, 201);
    wait_warm(&server, "broken", 1);
    let sandbox = create(&server, &server.admin, json!({"template": "broken"}));
    let result = python(&server, sandbox["id"].as_str().unwrap(), "print(6 * 7)");
    assert_eq!(result["stdout"], "42\n", "{result}");
}

#[test]
fn image_and_template_sandboxes_over_the_api() {
    let registry = Registry::anonymous();
    let image = Image::new(vec![base_layer(Compression::Gzip)], RunConfig::default());
    let pushed = registry.push("test/base", "1", &image, Format::Oci);
    let reference = pushed.reference(&registry.host());
    let dir = DataDir::new();
    let server = Server::start_with(dir.path(), &[], &["--insecure-registry", &registry.host()]);

    // An image: pulled on first use, its env and working directory apply, the root is writable.
    let sandbox = create(&server, &server.admin, json!({"image": reference}));
    let id = sandbox["id"].as_str().unwrap();
    let out = run(
        &server,
        id,
        json!({"cmd": ["sh", "-c", "echo $GREETING; pwd; echo x > /etc/new && cat /etc/new"]}),
    );
    assert_eq!(out["stdout"], "hello\n/work\nx\n", "{out}");

    // A main command follows the image's entrypoint and ends the sandbox with its status.
    let (status, body) = admin_post(
        &server,
        "/v1/sandboxes",
        json!({"image": reference, "cmd": ["sh", "-c", "exit 7"]}),
    );
    assert_eq!(status, 201, "{body}");
    let wait = call(
        "POST",
        &format!(
            "{}/v1/sandboxes/{}/wait",
            server.base,
            body["id"].as_str().unwrap()
        ),
        Some(&server.admin),
        None,
    );
    assert_eq!(wait.1["exit_code"], 7, "{wait:?}");

    // A template without warm-up: defaults and caps.
    let template = json!({
        "id": "base", "name": "Base", "base_image": reference,
        "env": {"TEAM": "data"}, "workdir": "/srv",
        "resources": {"default_cpu": 1, "default_memory": 256, "max_cpu": 1, "max_memory": 512},
    });
    assert_eq!(admin_post(&server, "/v1/templates", template).0, 201);
    let from_template = create(&server, &server.admin, json!({"template": "base"}));
    let out = run(
        &server,
        from_template["id"].as_str().unwrap(),
        json!({"cmd": ["sh", "-c", "echo $TEAM $GREETING; pwd"]}),
    );
    assert_eq!(out["stdout"], "data hello\n/srv\n", "{out}");

    // Bad requests: clear 422s, nothing created.
    let cases = [
        (json!({"template": "base", "resources": {"cpus": 2}}), "max_cpu"),
        (
            json!({"template": "base", "resources": {"memory_mb": 1024}}),
            "max_memory",
        ),
        (json!({"template": "nope"}), "unknown template"),
        (json!({"template": "base", "image": reference}), "at most one"),
        (
            json!({"image": format!("{}/test/missing:1", registry.host())}),
            "no such image",
        ),
        (json!({"image": "Not A Reference"}), "invalid image reference"),
    ];
    for (body, needle) in cases {
        let (status, reply) = admin_post(&server, "/v1/sandboxes", body.clone());
        assert_eq!(status, 422, "{body}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{body}: wanted {needle:?} in {message:?}"
        );
    }
}
