//! The web dashboard (`/ui`, docs/ui.md) in a real browser: this test starts a real server with real
//! process-lane sandboxes and three keys, then runs `ui-tests/dashboard.test.mjs` (Playwright driving
//! Debian's chromium, headless). Screenshots go to `$TARTARUS_ARTIFACTS_DIR/ui` (CI sets it) or
//! `target/tmp/ui-screenshots`.
//!
//! Fails, never skips, when node, chromium or `ui-tests/node_modules` is missing: `.ci/run` installs them
//! (`apt-get install chromium nodejs npm`, `npm ci --prefix ui-tests`).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::server::{new_key, DataDir, Server};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The browser: `TARTARUS_CHROMIUM`, else Debian's chromium (its real binary, not the wrapper script).
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("TARTARUS_CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("chromium is missing: `apt-get install chromium` (or set TARTARUS_CHROMIUM); the dashboard test needs a real browser")
    })
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    let tests = workspace().join("ui-tests");
    assert!(
        tests.join("node_modules/playwright-core/package.json").exists(),
        "ui-tests/node_modules is missing: run `npm ci --prefix ui-tests` (what .ci/run does)"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: `apt-get install nodejs npm`"
    );
    let browser = chromium();
    let screenshots = match std::env::var_os("TARTARUS_ARTIFACTS_DIR") {
        Some(dir) => PathBuf::from(dir).join("ui"),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"),
    };

    let dir = DataDir::new();
    let server = Server::start(dir.path());
    let out = Command::new("node")
        .arg(tests.join("dashboard.test.mjs"))
        .current_dir(&tests)
        .env("TARTARUS_URL", &server.base)
        .env("TARTARUS_USER_KEY", new_key(dir.path(), "team-a", "user"))
        .env("TARTARUS_VIEWER_KEY", new_key(dir.path(), "team-a", "viewer"))
        .env("TARTARUS_OTHER_KEY", new_key(dir.path(), "team-b", "user"))
        .env("TARTARUS_CHROMIUM", &browser)
        .env("TARTARUS_SCREENSHOTS", &screenshots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    eprintln!("screenshots: {}", screenshots.display());
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed, 0 failed"), "{stdout}");
}
