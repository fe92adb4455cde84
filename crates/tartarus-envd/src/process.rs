//! `process.Process`: processes started in their own session, with pipes or a pseudo-terminal, their
//! output fanned out to every attached stream and kept in a bounded replay buffer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::response::Response;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;

use crate::connect::{self, b64, field, get_bool, get_bytes, get_str, get_u32, Code, RpcError, RpcResult};
use crate::{Shared, MAX_ATTACHED_STREAMS, MAX_PROCESSES, MAX_REPLAY_BYTES};

/// Events queued per attached stream before the output readers wait for it.
const SUBSCRIBER_QUEUE: usize = 64;
/// How long after the process exits its output is still drained (a background grandchild may keep
/// the pipe open for ever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End {
        exit_code: i32,
        exited: bool,
        status: String,
        error: Option<String>,
    },
}

impl Event {
    fn len(&self) -> usize {
        match self {
            Event::Stdout(b) | Event::Stderr(b) | Event::Pty(b) => b.len(),
            Event::End { .. } => 0,
        }
    }
    fn to_json(&self) -> Value {
        let ev = match self {
            Event::Stdout(b) => json!({"data": {"stdout": b64(b)}}),
            Event::Stderr(b) => json!({"data": {"stderr": b64(b)}}),
            Event::Pty(b) => json!({"data": {"pty": b64(b)}}),
            Event::End {
                exit_code,
                exited,
                status,
                error,
            } => {
                let mut end = json!({"exitCode": exit_code, "exited": exited, "status": status});
                if let Some(e) = error {
                    end["error"] = Value::String(e.clone());
                }
                json!({"end": end})
            }
        };
        json!({"event": ev})
    }
}

#[derive(Clone, Debug)]
struct ProcConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Default)]
struct ProcState {
    replay: VecDeque<Event>,
    replay_bytes: usize,
    subscribers: Vec<mpsc::Sender<Event>>,
    ended: bool,
    end: Option<Event>,
}

struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcConfig,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pty_master: Option<Arc<std::fs::File>>,
    state: Mutex<ProcState>,
}

impl Proc {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a stream; with `replay`, also returns the buffered output.
    fn subscribe(&self, replay: bool) -> RpcResult<(mpsc::Receiver<Event>, Vec<Event>)> {
        let mut st = self.lock();
        if st.ended {
            // A process that has just exited: its output and end, on a stream that then closes.
            let (_, rx) = mpsc::channel(1);
            let mut snapshot: Vec<Event> = if replay {
                st.replay.iter().cloned().collect()
            } else {
                Vec::new()
            };
            snapshot.extend(st.end.clone());
            return Ok((rx, snapshot));
        }
        st.subscribers.retain(|s| !s.is_closed());
        if st.subscribers.len() >= MAX_ATTACHED_STREAMS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!(
                    "too many streams attached to process {} (at most {MAX_ATTACHED_STREAMS})",
                    self.pid
                ),
            ));
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        st.subscribers.push(tx);
        let snapshot = if replay {
            st.replay.iter().cloned().collect()
        } else {
            Vec::new()
        };
        Ok((rx, snapshot))
    }

    async fn publish(&self, ev: Event) {
        let subscribers = {
            let mut st = self.lock();
            if let Event::End { .. } = ev {
                st.ended = true;
                st.end = Some(ev.clone());
                std::mem::take(&mut st.subscribers)
            } else {
                st.replay_bytes += ev.len();
                st.replay.push_back(ev.clone());
                while st.replay_bytes > MAX_REPLAY_BYTES {
                    match st.replay.pop_front() {
                        Some(old) => st.replay_bytes -= old.len(),
                        None => break,
                    }
                }
                st.subscribers.retain(|s| !s.is_closed());
                st.subscribers.clone()
            }
        };
        for s in subscribers {
            // A stream that went away is simply skipped.
            let _ = s.send(ev.clone()).await;
        }
    }

    fn info(&self) -> Value {
        let mut config = json!({
            "cmd": self.config.cmd,
            "args": self.config.args,
            "envs": self.config.envs,
        });
        if let Some(cwd) = &self.config.cwd {
            config["cwd"] = Value::String(cwd.clone());
        }
        let mut v = json!({"config": config, "pid": self.pid});
        if let Some(tag) = &self.tag {
            v["tag"] = Value::String(tag.clone());
        }
        v
    }
}

/// The live processes, by pid.
#[derive(Default)]
pub struct Table {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// Recently exited processes, newest last: a Connect just after the exit still gets the output
    /// and the exit status (List, SendInput and SendSignal no longer see them).
    exited: Mutex<VecDeque<(Instant, Arc<Proc>)>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_exited(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Arc<Proc>)>> {
        let mut exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        while exited
            .front()
            .is_some_and(|(at, _)| at.elapsed() > crate::EXITED_KEPT_FOR)
        {
            exited.pop_front();
        }
        exited
    }

    fn retire(&self, proc: Arc<Proc>) {
        let mut exited = self.lock_exited();
        if exited.len() >= crate::EXITED_KEPT {
            exited.pop_front();
        }
        exited.push_back((Instant::now(), proc));
    }
}

/// The process a Connect names: a live one, else one that exited moments ago.
fn selected_for_connect(state: &Shared, req: &Value) -> RpcResult<Arc<Proc>> {
    let err = match selected(state, req) {
        Ok(p) => return Ok(p),
        Err(e) if e.code == Code::NotFound => e,
        Err(e) => return Err(e),
    };
    let sel = field(req, "process", "process").ok_or_else(|| err.clone())?;
    let pid = get_u32(sel, "pid", "pid")?;
    let tag = get_str(sel, "tag", "tag")?;
    let exited = state.processes.lock_exited();
    exited
        .iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| match (pid, &tag) {
            (Some(pid), _) => p.pid == pid,
            (None, Some(tag)) => p.tag.as_deref() == Some(tag.as_str()),
            (None, None) => false,
        })
        .cloned()
        .ok_or(err)
}

fn selected(state: &Shared, req: &Value) -> RpcResult<Arc<Proc>> {
    let sel =
        field(req, "process", "process").ok_or_else(|| RpcError::invalid("missing process selector"))?;
    let procs = state.processes.lock();
    if let Some(pid) = get_u32(sel, "pid", "pid")? {
        return procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| RpcError::not_found(format!("process with pid {pid} not found")));
    }
    if let Some(tag) = get_str(sel, "tag", "tag")? {
        return procs
            .values()
            .find(|p| p.tag.as_deref() == Some(tag.as_str()))
            .cloned()
            .ok_or_else(|| RpcError::not_found(format!("process with tag {tag} not found")));
    }
    Err(RpcError::invalid("process selector needs a pid or a tag"))
}

fn parse_config(req: &Value) -> RpcResult<ProcConfig> {
    let p = field(req, "process", "process").ok_or_else(|| RpcError::invalid("missing process config"))?;
    let cmd = get_str(p, "cmd", "cmd")?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| RpcError::invalid("missing cmd"))?;
    let args = match field(p, "args", "args") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| RpcError::invalid("args must be strings"))
            })
            .collect::<RpcResult<_>>()?,
        Some(_) => return Err(RpcError::invalid("args must be a list of strings")),
    };
    let envs = match field(p, "envs", "envs") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_owned()))
                    .ok_or_else(|| RpcError::invalid("envs values must be strings"))
            })
            .collect::<RpcResult<_>>()?,
        Some(_) => return Err(RpcError::invalid("envs must be a map of strings")),
    };
    for (k, v) in &envs {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(RpcError::invalid(format!("invalid environment variable {k:?}")));
        }
    }
    if cmd.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(RpcError::invalid("cmd and args must not contain NUL bytes"));
    }
    Ok(ProcConfig {
        cmd,
        args,
        envs,
        cwd: get_str(p, "cwd", "cwd")?.filter(|c| !c.is_empty()),
    })
}

fn pty_size(req: &Value) -> RpcResult<Option<(u16, u16)>> {
    let Some(pty) = field(req, "pty", "pty") else {
        return Ok(None);
    };
    let size = field(pty, "size", "size");
    let (cols, rows) = match size {
        Some(s) => (
            get_u32(s, "cols", "cols")?.unwrap_or(80),
            get_u32(s, "rows", "rows")?.unwrap_or(24),
        ),
        None => (80, 24),
    };
    let clamp = |v: u32| v.clamp(1, u16::MAX as u32) as u16;
    Ok(Some((clamp(cols), clamp(rows))))
}

fn open_pty(cols: u16, rows: u16) -> std::io::Result<(std::fs::File, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?
        .into();
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok((std::fs::File::from(master), slave))
}

pub async fn start(state: &Shared, req: Value, keepalive: Option<Duration>) -> RpcResult<Response> {
    let config = parse_config(&req)?;
    let tag = get_str(&req, "tag", "tag")?;
    let want_stdin = get_bool(&req, "stdin", "stdin")?;
    let pty = pty_size(&req)?;
    if state.processes.lock().len() >= MAX_PROCESSES {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("too many processes (at most {MAX_PROCESSES} may run at once)"),
        ));
    }
    let cwd: PathBuf = match &config.cwd {
        Some(c) => crate::fs::resolve(&state.config.home, c),
        None => state.config.home.clone(),
    };
    if !cwd.is_dir() {
        return Err(RpcError::invalid(format!(
            "cwd {} does not exist or is not a directory",
            cwd.display()
        )));
    }

    let mut cmd = tokio::process::Command::new(&config.cmd);
    cmd.args(&config.args).current_dir(&cwd).kill_on_drop(false);
    if pty.is_some() && !config.envs.contains_key("TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(&config.envs);
    let mut master = None;
    if let Some((cols, rows)) = pty {
        let (m, slave) =
            open_pty(cols, rows).map_err(|e| RpcError::internal(format!("cannot open a pty: {e}")))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| RpcError::internal(format!("dup: {e}")))
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        master = Some(Arc::new(m));
        // SAFETY: between fork and exec only async-signal-safe calls: signal, setsid and ioctl on
        // fd 0, which is the pty's slave end set up above.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        cmd.stdin(if want_stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only signal and setsid, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            Code::NotFound
        } else {
            Code::Internal
        };
        RpcError::new(code, format!("cannot start {}: {e}", config.cmd))
    })?;
    let Some(pid) = child.id() else {
        return Err(RpcError::internal("the process ended before it was tracked"));
    };
    // The command's own copies of the slave end are closed with `cmd` (dropped below), so reading
    // the master ends with EIO once every process on the terminal has exited.
    drop(cmd);
    let proc = Arc::new(Proc {
        pid,
        tag,
        config,
        stdin: tokio::sync::Mutex::new(child.stdin.take()),
        pty_master: master.clone(),
        state: Mutex::new(ProcState::default()),
    });
    state.processes.lock().insert(pid, proc.clone());
    let (rx, _) = proc.subscribe(false)?;

    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(pump(out, proc.clone(), Event::Stdout)));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(pump(err, proc.clone(), Event::Stderr)));
    }
    if let Some(m) = master {
        let reader = m
            .try_clone()
            .map_err(|e| RpcError::internal(format!("dup: {e}")))?;
        let p = proc.clone();
        let handle = tokio::runtime::Handle::current();
        readers.push(tokio::task::spawn_blocking(move || pty_pump(reader, p, handle)));
    }
    let waited = proc.clone();
    let st = state.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        let drain = async {
            for r in readers {
                let _ = r.await;
            }
        };
        let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, drain).await;
        let end = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Event::End {
                    exit_code: code,
                    exited: true,
                    status: format!("exit status {code}"),
                    error: None,
                },
                (None, Some(sig)) => Event::End {
                    exit_code: -1,
                    exited: false,
                    status: format!("signal: {}", signal_name(sig)),
                    error: None,
                },
                (None, None) => Event::End {
                    exit_code: -1,
                    exited: false,
                    status: "unknown".into(),
                    error: None,
                },
            },
            Err(e) => Event::End {
                exit_code: -1,
                exited: false,
                status: "unknown".into(),
                error: Some(format!("waiting for the process failed: {e}")),
            },
        };
        st.processes.lock().remove(&waited.pid);
        waited.publish(end).await;
        st.processes.retire(waited);
    });

    Ok(stream_events(pid, rx, Vec::new(), keepalive))
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGQUIT => "quit".into(),
        n => format!("signal {n}"),
    }
}

async fn pump(mut r: impl AsyncRead + Unpin, proc: Arc<Proc>, wrap: fn(Bytes) -> Event) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => proc.publish(wrap(Bytes::copy_from_slice(&buf[..n]))).await,
        }
    }
}

fn pty_pump(mut master: std::fs::File, proc: Arc<Proc>, rt: tokio::runtime::Handle) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match master.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => rt.block_on(proc.publish(Event::Pty(Bytes::copy_from_slice(&buf[..n])))),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: every process on the terminal has gone.
            Err(_) => return,
        }
    }
}

/// The response stream of Start / Connect: `start{pid}`, the replayed then live events, keepalives.
fn stream_events(
    pid: u32,
    mut rx: mpsc::Receiver<Event>,
    replay: Vec<Event>,
    keepalive: Option<Duration>,
) -> Response {
    let (tx, out) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if tx
            .send(connect::message_frame(&json!({"event": {"start": {"pid": pid}}})))
            .await
            .is_err()
        {
            return;
        }
        for ev in replay {
            if tx.send(connect::message_frame(&ev.to_json())).await.is_err() {
                return;
            }
        }
        let period = keepalive.unwrap_or(Duration::from_secs(3600 * 24 * 365));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        let end = matches!(ev, Event::End { .. });
                        if tx.send(connect::message_frame(&ev.to_json())).await.is_err() {
                            return;
                        }
                        if end {
                            break;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick(), if keepalive.is_some() => {
                    if tx.send(connect::message_frame(&json!({"event": {"keepalive": {}}}))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
        let _ = tx.send(connect::end_frame(None)).await;
    });
    connect::stream_response(out)
}

pub async fn connect(state: &Shared, req: Value, keepalive: Option<Duration>) -> RpcResult<Response> {
    let proc = selected_for_connect(state, &req)?;
    let (rx, replay) = proc.subscribe(true)?;
    Ok(stream_events(proc.pid, rx, replay, keepalive))
}

pub fn list(state: &Shared) -> RpcResult<Value> {
    let mut procs: Vec<Arc<Proc>> = state.processes.lock().values().cloned().collect();
    procs.sort_by_key(|p| p.pid);
    Ok(json!({"processes": procs.iter().map(|p| p.info()).collect::<Vec<_>>()}))
}

pub async fn send_input(state: &Shared, req: Value) -> RpcResult<Value> {
    let proc = selected(state, &req)?;
    let input = field(&req, "input", "input").ok_or_else(|| RpcError::invalid("missing input"))?;
    let pty_data = get_bytes(input, "pty", "pty")?;
    let stdin_data = get_bytes(input, "stdin", "stdin")?;
    match (pty_data, stdin_data) {
        (Some(data), _) | (None, Some(data)) if proc.pty_master.is_some() => {
            let master = proc
                .pty_master
                .clone()
                .ok_or_else(|| RpcError::internal("pty vanished"))?;
            tokio::task::spawn_blocking(move || (&*master).write_all(&data))
                .await
                .map_err(|e| RpcError::internal(e.to_string()))?
                .map_err(|e| RpcError::io("writing to the pty", &e))?;
        }
        (Some(_), _) => return Err(RpcError::invalid("the process has no pty")),
        (None, Some(data)) => {
            let mut stdin = proc.stdin.lock().await;
            let pipe = stdin.as_mut().ok_or_else(|| {
                RpcError::new(
                    Code::FailedPrecondition,
                    "the process's stdin is not open (start it with stdin: true)",
                )
            })?;
            pipe.write_all(&data)
                .await
                .map_err(|e| RpcError::io("writing to stdin", &e))?;
            pipe.flush()
                .await
                .map_err(|e| RpcError::io("writing to stdin", &e))?;
        }
        (None, None) => {}
    }
    Ok(json!({}))
}

pub async fn close_stdin(state: &Shared, req: Value) -> RpcResult<Value> {
    let proc = selected(state, &req)?;
    if let Some(master) = &proc.pty_master {
        // EOF on a terminal is ^D.
        let master = master.clone();
        let _ = tokio::task::spawn_blocking(move || (&*master).write_all(&[4])).await;
    } else {
        proc.stdin.lock().await.take();
    }
    Ok(json!({}))
}

pub fn send_signal(state: &Shared, req: Value) -> RpcResult<Value> {
    let proc = selected(state, &req)?;
    let sig = match field(&req, "signal", "signal") {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
        Some(Value::Number(n)) if n.as_i64() == Some(9) => libc::SIGKILL,
        Some(Value::Number(n)) if n.as_i64() == Some(15) => libc::SIGTERM,
        other => return Err(RpcError::invalid(format!("unsupported signal {other:?}"))),
    };
    let pid = proc.pid as libc::pid_t;
    // SAFETY: kill(2) has no memory effects; the process group is the one setsid made for it.
    let group = unsafe { libc::kill(-pid, sig) };
    if group != 0 {
        // SAFETY: as above, for the process alone.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(RpcError::io(
                "sending the signal",
                &std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(json!({}))
}

pub fn update(state: &Shared, req: Value) -> RpcResult<Value> {
    let proc = selected(state, &req)?;
    let Some((cols, rows)) = pty_size(&req)? else {
        return Ok(json!({}));
    };
    let master = proc
        .pty_master
        .as_ref()
        .ok_or_else(|| RpcError::invalid("the process has no pty"))?;
    rustix::termios::tcsetwinsize(
        master.as_ref(),
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .map_err(|e| RpcError::io("resizing the pty", &e.into()))?;
    Ok(json!({}))
}
