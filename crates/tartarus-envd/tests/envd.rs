//! The daemon on the host (current user, a temporary HOME), driven over HTTP/1.1 with Connect-JSON
//! as the E2B SDK speaks it.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

struct Daemon {
    base: String,
    home: tempfile::TempDir,
}

fn daemon() -> Daemon {
    let home = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let config = tartarus_envd::Config {
        home: home.path().to_path_buf(),
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            tartarus_envd::serve(listener, config).await.expect("serve");
        });
    });
    Daemon {
        base: format!("http://{addr}"),
        home,
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap_or(""))
        .expect("base64")
}

impl Daemon {
    fn home(&self) -> PathBuf {
        self.home.path().to_path_buf()
    }

    fn post_raw(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        let result = ureq::post(&format!("{}{}", self.base, path))
            .set("Content-Type", content_type)
            .timeout(Duration::from_secs(30))
            .send_bytes(body);
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        let status = resp.status();
        let ct = resp.content_type().to_owned();
        let mut out = Vec::new();
        resp.into_reader().read_to_end(&mut out).expect("read body");
        (status, ct, out)
    }

    /// A unary call: (HTTP status, JSON body).
    fn unary(&self, method: &str, req: Value) -> (u16, Value) {
        let (status, ct, body) = self.post_raw(
            &format!("/{method}"),
            "application/json",
            req.to_string().as_bytes(),
        );
        assert_eq!(ct, "application/json", "unary {method} answered {ct}");
        (status, serde_json::from_slice(&body).expect("unary JSON"))
    }

    fn ok(&self, method: &str, req: Value) -> Value {
        let (status, v) = self.unary(method, req);
        assert_eq!(status, 200, "{method}: {v}");
        v
    }

    /// Opens a server stream.
    fn stream(&self, method: &str, req: Value) -> Frames {
        let payload = req.to_string();
        let mut body = vec![0u8];
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(payload.as_bytes());
        let resp = ureq::post(&format!("{}/{}", self.base, method))
            .set("Content-Type", "application/connect+json")
            .set("Keepalive-Ping-Interval", "1")
            .timeout(Duration::from_secs(30))
            .send_bytes(&body)
            .expect("stream request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.content_type(), "application/connect+json");
        Frames {
            reader: Box::new(resp.into_reader()),
        }
    }
}

struct Frames {
    reader: Box<dyn Read + Send>,
}

impl Frames {
    /// The next frame: (end-of-stream?, message).
    fn next(&mut self) -> Option<(bool, Value)> {
        let mut head = [0u8; 5];
        self.reader.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload).expect("frame payload");
        Some((
            head[0] & 0x02 != 0,
            serde_json::from_slice(&payload).expect("frame JSON"),
        ))
    }

    /// Process events (keepalives skipped) until the end of the stream: (events, end-of-stream).
    fn collect(&mut self) -> (Vec<Value>, Value) {
        let mut events = Vec::new();
        while let Some((end, v)) = self.next() {
            if end {
                return (events, v);
            }
            if v["event"].get("keepalive").is_none() {
                events.push(v["event"].clone());
            }
        }
        panic!("stream ended without an end-of-stream frame");
    }

    fn start_pid(&mut self) -> u32 {
        let (end, v) = self.next().expect("first frame");
        assert!(!end, "stream failed: {v}");
        v["event"]["start"]["pid"].as_u64().expect("start pid") as u32
    }

    /// Reads until the concatenated stdout/pty output contains `needle`.
    fn read_until(&mut self, needle: &str) -> String {
        let mut out = Vec::new();
        while let Some((end, v)) = self.next() {
            assert!(
                !end,
                "stream ended before {needle:?}: {v}; output so far {:?}",
                String::from_utf8_lossy(&out)
            );
            let data = &v["event"]["data"];
            for k in ["stdout", "pty"] {
                if let Some(s) = data.get(k) {
                    out.extend(unb64(s));
                }
            }
            if String::from_utf8_lossy(&out).contains(needle) {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
        panic!("stream closed before {needle:?}");
    }
}

fn output(events: &[Value], key: &str) -> String {
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| e["data"].get(key))
        .flat_map(unb64)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn end_of(events: &[Value]) -> Value {
    events
        .iter()
        .rev()
        .find_map(|e| e.get("end").cloned())
        .expect("an end event")
}

fn bash(cmd: &str) -> Value {
    json!({"process": {"cmd": "/bin/bash", "args": ["-c", cmd]}})
}

#[test]
fn start_streams_output_and_exit_code() {
    let d = daemon();
    let mut s = d.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo out; echo err >&2; echo $FOO; pwd; exit 7"],
               "envs": {"FOO": "bar"}}}),
    );
    let pid = s.start_pid();
    assert!(pid > 0);
    let (events, eos) = s.collect();
    assert_eq!(eos, json!({}));
    let home = d.home().canonicalize().expect("home");
    assert_eq!(
        output(&events, "stdout"),
        format!("out\nbar\n{}\n", home.display())
    );
    assert_eq!(output(&events, "stderr"), "err\n");
    let end = end_of(&events);
    assert_eq!(end["exitCode"], 7);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 7");
}

#[test]
fn stdin_is_null_unless_asked_and_input_reaches_the_process() {
    let d = daemon();
    // Without stdin: cat sees EOF at once.
    let (events, _) = d
        .stream("process.Process/Start", bash("cat; echo done"))
        .collect();
    assert_eq!(output(&events, "stdout"), "done\n");

    let mut req = bash("cat");
    req["stdin"] = json!(true);
    let mut s = d.stream("process.Process/Start", req);
    let pid = s.start_pid();
    d.ok(
        "process.Process/SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
    );
    assert_eq!(s.read_until("hello\n"), "hello\n");
    d.ok("process.Process/CloseStdin", json!({"process": {"pid": pid}}));
    let (events, _) = s.collect();
    assert_eq!(end_of(&events)["exitCode"], 0);
}

#[test]
fn pty_output_and_resize() {
    let d = daemon();
    let mut s = d.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/bin/bash", "args": ["--norc", "--noprofile", "-i"]},
               "pty": {"size": {"cols": 80, "rows": 24}}}),
    );
    let pid = s.start_pid();
    let send = |text: &str| {
        d.ok(
            "process.Process/SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(text.as_bytes())}}),
        )
    };
    send("stty size; echo TERM=$TERM; tty\n");
    let out = s.read_until("TERM=xterm-256color");
    assert!(out.contains("24 80"), "{out:?}");
    d.ok(
        "process.Process/Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
    );
    send("stty size\n");
    s.read_until("30 100");
    send("exit 3\n");
    let (events, _) = s.collect();
    assert_eq!(end_of(&events)["exitCode"], 3);
}

/// Whether `pid` is gone (or a zombie waiting for its reaper).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn signal_kills_the_process_group() {
    let d = daemon();
    let mut s = d.stream(
        "process.Process/Start",
        bash("sleep 30 & echo $!; wait; echo never"),
    );
    let pid = s.start_pid();
    let background: u32 = s.read_until("\n").trim().parse().expect("background pid");
    assert!(!dead(background));
    d.ok(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    );
    let (events, _) = s.collect();
    let end = end_of(&events);
    assert_eq!(end["exited"], false, "{end}");
    assert_eq!(end["status"], "signal: killed");
    assert_eq!(output(&events, "stdout"), "");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dead(background) {
        assert!(
            Instant::now() < deadline,
            "the background child {background} survived the group kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, v) = d.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": 999_999_999u32}, "signal": "SIGNAL_SIGKILL"}),
    );
    assert_eq!(status, 404);
    assert_eq!(v["code"], "not_found");
}

#[test]
fn connect_reattaches_with_replay_and_list_shows_processes() {
    let d = daemon();
    let mut req = bash("echo early; sleep 1; echo late");
    req["tag"] = json!("job-1");
    let mut s = d.stream("process.Process/Start", req);
    let pid = s.start_pid();
    assert_eq!(s.read_until("early"), "early\n");
    drop(s); // the first client goes away; the process keeps running

    let list = d.ok("process.Process/List", json!({}));
    let p = list["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .cloned();
    let p = p.expect("listed");
    assert_eq!(p["tag"], "job-1");
    assert_eq!(p["config"]["cmd"], "/bin/bash");
    assert_eq!(
        p["config"]["args"],
        json!(["-c", "echo early; sleep 1; echo late"])
    );

    let mut c = d.stream("process.Process/Connect", json!({"process": {"tag": "job-1"}}));
    assert_eq!(c.start_pid(), pid);
    let (events, _) = c.collect();
    assert_eq!(output(&events, "stdout"), "early\nlate\n");
    assert_eq!(end_of(&events)["exitCode"], 0);

    // Just after it ended, a Connect still gets its output and exit status; List and signals no
    // longer see it.
    let mut late = d.stream("process.Process/Connect", json!({"process": {"pid": pid}}));
    assert_eq!(late.start_pid(), pid);
    let (events, eos) = late.collect();
    assert_eq!(eos, json!({}));
    assert_eq!(output(&events, "stdout"), "early\nlate\n");
    assert_eq!(end_of(&events)["exitCode"], 0);
    let list = d.ok("process.Process/List", json!({}));
    assert!(
        list["processes"]
            .as_array()
            .is_none_or(|a| a.iter().all(|p| p["pid"] != pid)),
        "{list}"
    );
    let (status, _) = d.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}),
    );
    assert_eq!(status, 404);

    // A process never seen is not found.
    let mut gone = d.stream(
        "process.Process/Connect",
        json!({"process": {"pid": 999_999_999u32}}),
    );
    let (end, v) = gone.next().expect("end frame");
    assert!(end);
    assert_eq!(v["error"]["code"], "not_found");
}

#[test]
fn keepalives_are_sent_at_the_requested_interval() {
    let d = daemon();
    let mut s = d.stream("process.Process/Start", bash("sleep 2.5"));
    s.start_pid();
    let mut keepalives = 0;
    while let Some((end, v)) = s.next() {
        if end {
            break;
        }
        if v["event"].get("keepalive").is_some() {
            keepalives += 1;
        }
    }
    assert!(keepalives >= 2, "{keepalives} keepalives in 2.5 s at 1 s");
}

#[test]
fn filesystem_calls() {
    let d = daemon();
    let home = d.home();
    let v = d.ok("filesystem.Filesystem/MakeDir", json!({"path": "a/b/c"}));
    assert_eq!(v["entry"]["path"], format!("{}/a/b/c", home.display()));
    assert_eq!(v["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(v["entry"]["mode"], 0o755);
    assert_eq!(v["entry"]["permissions"], "drwxr-xr-x");
    let (status, v) = d.unary("filesystem.Filesystem/MakeDir", json!({"path": "a/b/c"}));
    assert_eq!((status, v["code"].as_str()), (409, Some("already_exists")));

    std::fs::write(home.join("a/f.txt"), "hello").expect("write");
    std::os::unix::fs::symlink("f.txt", home.join("a/link")).expect("symlink");
    let v = d.ok("filesystem.Filesystem/Stat", json!({"path": "a/link"}));
    assert_eq!(v["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(v["entry"]["size"], "5");
    let canon = home.canonicalize().expect("canon");
    assert_eq!(
        v["entry"]["symlinkTarget"],
        format!("{}/a/f.txt", canon.display())
    );
    let owner = v["entry"]["owner"].as_str().expect("owner");
    assert!(
        !owner.is_empty() && owner.parse::<u32>().is_err(),
        "owner is a name: {owner}"
    );
    assert!(v["entry"]["modifiedTime"].as_str().expect("time").ends_with('Z'));

    let names = |depth: u32| -> Vec<String> {
        let v = d.ok(
            "filesystem.Filesystem/ListDir",
            json!({"path": "a", "depth": depth}),
        );
        v["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["name"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(names(1), ["b", "f.txt", "link"]);
    assert_eq!(names(3), ["b", "c", "f.txt", "link"]);

    let v = d.ok(
        "filesystem.Filesystem/Move",
        json!({"source": "a/f.txt", "destination": "moved/g.txt"}),
    );
    assert_eq!(v["entry"]["path"], format!("{}/moved/g.txt", home.display()));
    assert!(!home.join("a/f.txt").exists() && home.join("moved/g.txt").exists());
    let (status, v) = d.unary(
        "filesystem.Filesystem/Move",
        json!({"source": "nope", "destination": "x"}),
    );
    assert_eq!((status, v["code"].as_str()), (404, Some("not_found")));

    d.ok("filesystem.Filesystem/Remove", json!({"path": "a"}));
    assert!(!home.join("a").exists());
    let (status, _) = d.unary("filesystem.Filesystem/Stat", json!({"path": "a"}));
    assert_eq!(status, 404);
    let (status, v) = d.unary("filesystem.Filesystem/ListDir", json!({"path": "moved/g.txt"}));
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")));
}

#[test]
fn watching_reports_events() {
    let d = daemon();
    let home = d.home();
    std::fs::create_dir_all(home.join("w/sub")).expect("mkdir");
    let mut s = d.stream(
        "filesystem.Filesystem/WatchDir",
        json!({"path": "w", "recursive": true, "includeEntry": true}),
    );
    let (end, first) = s.next().expect("start");
    assert!(!end && first.get("start").is_some(), "{first}");
    std::fs::write(home.join("w/sub/new.txt"), "x").expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let (end, v) = s.next().expect("event");
        assert!(!end, "{v}");
        if let Some(ev) = v.get("filesystem") {
            seen.push((
                ev["type"].as_str().unwrap_or("").to_owned(),
                ev["name"].as_str().unwrap_or("").to_owned(),
            ));
            if ev["type"] == "EVENT_TYPE_WRITE" {
                assert_eq!(ev["entry"]["path"], format!("{}/w/sub/new.txt", home.display()));
                break;
            }
        }
    }
    assert_eq!(
        seen[0],
        ("EVENT_TYPE_CREATE".to_owned(), "sub/new.txt".to_owned()),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(|s| s.0.as_str()), Some("EVENT_TYPE_WRITE"));

    // The polling watcher: a change made before the poll is in its answer.
    let id = d.ok("filesystem.Filesystem/CreateWatcher", json!({"path": "w"}))["watcherId"]
        .as_str()
        .expect("id")
        .to_owned();
    std::fs::remove_file(home.join("w/sub/new.txt")).expect("rm");
    std::fs::rename(home.join("w/sub"), home.join("w/sub2")).expect("mv");
    let v = d.ok("filesystem.Filesystem/GetWatcherEvents", json!({"watcherId": id}));
    let kinds: Vec<(String, String)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_owned(),
                e["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("EVENT_TYPE_RENAME".to_owned(), "sub".to_owned()),
            ("EVENT_TYPE_CREATE".to_owned(), "sub2".to_owned())
        ]
    );
    d.ok("filesystem.Filesystem/RemoveWatcher", json!({"watcherId": id}));
    let (status, _) = d.unary("filesystem.Filesystem/GetWatcherEvents", json!({"watcherId": id}));
    assert_eq!(status, 404);
    let (status, _) = d.unary("filesystem.Filesystem/CreateWatcher", json!({"path": "missing"}));
    assert_eq!(status, 404);
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn download(d: &Daemon, path: &str) -> (u16, Vec<u8>) {
    let resp = match ureq::get(&format!("{}/files", d.base)).query("path", path).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = resp.status();
    let mut out = Vec::new();
    resp.into_reader().read_to_end(&mut out).expect("read");
    (status, out)
}

#[test]
fn files_upload_and_download_round_trip() {
    let d = daemon();
    let data = pseudo_random(12 << 20);

    // application/octet-stream into a directory that does not exist yet.
    let resp = ureq::post(&format!("{}/files", d.base))
        .query("path", "deep/dir/big.bin")
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&data)
        .expect("upload");
    let v: Value = serde_json::from_reader(resp.into_reader()).expect("json");
    assert_eq!(
        v,
        json!([{"name": "big.bin", "type": "file", "path": format!("{}/deep/dir/big.bin", d.home().display())}])
    );
    let (status, got) = download(&d, "deep/dir/big.bin");
    assert_eq!(status, 200);
    assert!(got == data, "download differs from upload");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.home().join("deep/dir/big.bin"))
            .expect("meta")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o644);

    // A gzip download, when asked for.
    let resp = ureq::get(&format!("{}/files", d.base))
        .query("path", "deep/dir/big.bin")
        .set("Accept-Encoding", "gzip")
        .call()
        .expect("gzip download");
    assert_eq!(resp.header("content-encoding"), Some("gzip"));
    let mut got = Vec::new();
    flate2::read::GzDecoder::new(resp.into_reader())
        .read_to_end(&mut got)
        .expect("gunzip");
    assert!(got == data, "gzip download differs from upload");

    // gzip-encoded octet-stream.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &data[..1 << 20]).expect("gzip");
    let gz = gz.finish().expect("gzip");
    ureq::post(&format!("{}/files", d.base))
        .query("path", "gz.bin")
        .set("Content-Type", "application/octet-stream")
        .set("Content-Encoding", "gzip")
        .send_bytes(&gz)
        .expect("gzip upload");
    assert!(download(&d, "gz.bin").1 == data[..1 << 20]);

    // multipart with two files named by their part file names, plus metadata.
    let boundary = "XyZbOuNdArY";
    let mut body = Vec::new();
    for (name, content) in [("one.txt", &b"first"[..]), ("sub/two.bin", &data[..3 << 20])] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let resp = ureq::post(&format!("{}/files", d.base))
        .set(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .set("X-Metadata-Author", "me")
        .send_bytes(&body)
        .expect("multipart");
    let v: Value = serde_json::from_reader(resp.into_reader()).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(2), "{v}");
    assert_eq!(v[1]["path"], format!("{}/sub/two.bin", d.home().display()));
    assert_eq!(v[0]["metadata"], json!({"author": "me"}));
    assert_eq!(download(&d, "one.txt").1, b"first");
    assert!(download(&d, "sub/two.bin").1 == data[..3 << 20]);

    // A FIFO is refused both ways instead of hanging the request.
    let fifo = d.home().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    assert_eq!(download(&d, "fifo").0, 400);
    let status = match ureq::post(&format!("{}/files", d.base))
        .query("path", "fifo")
        .set("Content-Type", "application/octet-stream")
        .timeout(Duration::from_secs(10))
        .send_bytes(b"x")
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status, 400);

    // Missing file: 404 with a JSON message.
    let (status, body) = download(&d, "nope.txt");
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).expect("json error");
    assert_eq!(v["code"], 404);
    assert!(v["message"].as_str().is_some());
}

#[test]
fn malformed_input_is_an_error_not_a_crash() {
    let d = daemon();
    let (status, ct, body) = d.post_raw("/process.Process/List", "application/json", b"{not json");
    assert_eq!((status, ct.as_str()), (400, "application/json"));
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["code"], "invalid_argument");

    // A stream method called as unary: the codec it expects is not the one sent.
    let (status, _, _) = d.post_raw("/process.Process/Start", "application/json", b"{}");
    assert_eq!(status, 415);

    for bad in [
        &b"\x00\x00\x00"[..],
        b"\x00\x00\x00\x00\x10{}",
        b"\x00\x00\x00\x00\x02[]",
        b"\x01\x00\x00\x00\x02{}",
    ] {
        let (status, ct, body) = d.post_raw("/process.Process/Start", "application/connect+json", bad);
        assert_eq!((status, ct.as_str()), (200, "application/connect+json"));
        assert_eq!(body[0], 0x02, "an end-of-stream frame");
        let v: Value = serde_json::from_slice(&body[5..]).expect("json");
        assert!(
            v["error"]["code"] == "invalid_argument" || v["error"]["code"] == "unimplemented",
            "{v}"
        );
    }
    let (status, _, _) = d.post_raw("/process.Process/List", "application/proto", b"");
    assert_eq!(status, 415);
    let (status, v) = d.unary("process.Process/Nope", json!({}));
    assert_eq!((status, v["code"].as_str()), (501, Some("unimplemented")));
    let (status, v) = d.unary(
        "process.Process/SendSignal",
        json!({"process": {"pid": "x"}, "signal": 9}),
    );
    assert_eq!((status, v["code"].as_str()), (400, Some("invalid_argument")));
    let mut s = d.stream(
        "process.Process/Start",
        json!({"process": {"cmd": "/definitely/not/here"}}),
    );
    let (end, v) = s.next().expect("frame");
    assert!(end && v["error"]["code"] == "not_found", "{v}");
    let big = vec![b' '; 17 << 20];
    let (status, _, _) = d.post_raw("/process.Process/List", "application/json", &big);
    assert_eq!(status, 429);

    // Still serving.
    let resp = ureq::get(&format!("{}/health", d.base)).call().expect("health");
    assert_eq!(resp.status(), 204);
}
