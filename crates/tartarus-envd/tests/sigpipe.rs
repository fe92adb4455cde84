//! With SIGPIPE at its default disposition (as in the `tartarus` binary, which has no Rust runtime
//! start-up), input for a process that closed its stdin must not kill the daemon. Its own test
//! binary, since it changes a process-wide signal disposition.

use std::io::Read;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

fn post(base: &str, method: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let resp = match ureq::post(&format!("{base}/{method}"))
        .set("Content-Type", content_type)
        .timeout(Duration::from_secs(30))
        .send_bytes(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method}: {e}"),
    };
    let status = resp.status();
    let mut out = Vec::new();
    resp.into_reader().read_to_end(&mut out).expect("body");
    (status, out)
}

#[test]
fn input_to_a_closed_stdin_is_an_error_not_a_crash() {
    // SAFETY: restores the default disposition; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    std::thread::spawn(move || tartarus_envd::run(addr));
    let base = format!("http://{addr}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ureq::get(&format!("{base}/health")).call().is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let payload = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "exec 0<&-; echo closed; sleep 5"]}, "stdin": true})
        .to_string();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    let resp = ureq::post(&format!("{base}/process.Process/Start"))
        .set("Content-Type", "application/connect+json")
        .send_bytes(&frame)
        .expect("start");
    let mut reader = resp.into_reader();
    let mut head = [0u8; 5];
    reader.read_exact(&mut head).expect("start frame");
    let mut msg = vec![0u8; u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize];
    reader.read_exact(&mut msg).expect("start frame");
    let v: serde_json::Value = serde_json::from_slice(&msg).expect("json");
    let pid = v["event"]["start"]["pid"].as_u64().expect("pid");
    // Wait for the process to have closed its stdin.
    reader.read_exact(&mut head).expect("data frame");

    let data = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 256 * 1024]);
    let req = json!({"process": {"pid": pid}, "input": {"stdin": data}}).to_string();
    let (status, body) = post(
        &base,
        "process.Process/SendInput",
        "application/json",
        req.as_bytes(),
    );
    assert!(
        status >= 400,
        "writing to a closed pipe succeeded: {}",
        String::from_utf8_lossy(&body)
    );
    let (status, _) = post(&base, "process.Process/List", "application/json", b"{}");
    assert_eq!(status, 200, "the daemon still serves");
    let kill = json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}).to_string();
    post(
        &base,
        "process.Process/SendSignal",
        "application/json",
        kill.as_bytes(),
    );
}
