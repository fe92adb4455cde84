//! Directory watching with inotify: the WatchDir stream and the polling watchers
//! (CreateWatcher / GetWatcherEvents / RemoveWatcher).
//!
//! Event types follow fsnotify, which E2B's envd uses: create and moved-in → CREATE, modify → WRITE,
//! delete → REMOVE, moved-away → RENAME, attribute change → CHMOD. Names are relative to the watched
//! directory (`sub/file` under a recursive watch). Pending kernel events are read synchronously when
//! a client polls, so a change made before the poll is always in its answer.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::response::Response;
use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::connect::{self, get_bool, get_str, Code, RpcError, RpcResult};
use crate::users::Names;
use crate::{Shared, MAX_WATCHERS, MAX_WATCHER_EVENTS};

struct Inner {
    dirs: HashMap<i32, PathBuf>,
    queue: VecDeque<Value>,
}

struct Watcher {
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    fd: AsyncFd<OwnedFd>,
    inner: Mutex<Inner>,
}

fn watch_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::MODIFY
        | WatchFlags::DELETE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MOVE_SELF
        | WatchFlags::ATTRIB
        | WatchFlags::ONLYDIR
}

impl Watcher {
    fn new(root: PathBuf, recursive: bool, include_entry: bool) -> RpcResult<Arc<Watcher>> {
        let shown = root.display().to_string();
        let meta = std::fs::metadata(&root).map_err(|e| RpcError::io(&shown, &e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid(format!("path is not a directory: {shown}")));
        }
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
            .map_err(|e| RpcError::internal(format!("inotify: {e}")))?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same descriptor until the
        // AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| RpcError::internal(format!("inotify: {e}")))?;
        let w = Watcher {
            root: root.clone(),
            recursive,
            include_entry,
            fd,
            inner: Mutex::new(Inner {
                dirs: HashMap::new(),
                queue: VecDeque::new(),
            }),
        };
        {
            let mut inner = w.lock();
            w.add(&mut inner, &root).map_err(|e| RpcError::io(&shown, &e))?;
        }
        Ok(Arc::new(w))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `dir` (and, when recursive, every directory below it).
    fn add(&self, inner: &mut Inner, dir: &Path) -> std::io::Result<()> {
        let wd = inotify::add_watch(self.fd.get_ref(), dir, watch_flags())?;
        inner.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        // A subdirectory that vanished or cannot be read is skipped.
                        let _ = self.add(inner, &e.path());
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads every pending kernel event into the queue. True when the fd is drained (EAGAIN).
    fn drain(&self) -> bool {
        let mut inner = self.lock();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut reader = inotify::Reader::new(self.fd.get_ref(), &mut buf);
        let mut raw = Vec::new();
        let drained = loop {
            match reader.next() {
                Ok(ev) => raw.push((
                    ev.wd(),
                    ev.events(),
                    ev.file_name()
                        .map(|n| PathBuf::from(OsStr::from_bytes(n.to_bytes()))),
                )),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break true,
                Err(_) => break false,
            }
        };
        let names = self.include_entry.then(Names::load);
        for (wd, flags, name) in raw {
            if flags.contains(ReadFlags::IGNORED) {
                inner.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = inner.dirs.get(&wd).cloned() else {
                continue;
            };
            let is_self = name.is_none();
            if is_self && dir != self.root {
                // A subdirectory's own deletion is reported by its parent.
                continue;
            }
            let full = match &name {
                Some(n) => dir.join(n),
                None => dir.clone(),
            };
            let kind = if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                "EVENT_TYPE_CREATE"
            } else if flags.contains(ReadFlags::MODIFY) {
                "EVENT_TYPE_WRITE"
            } else if flags.intersects(ReadFlags::DELETE | ReadFlags::DELETE_SELF) {
                "EVENT_TYPE_REMOVE"
            } else if flags.intersects(ReadFlags::MOVED_FROM | ReadFlags::MOVE_SELF) {
                "EVENT_TYPE_RENAME"
            } else if flags.contains(ReadFlags::ATTRIB) {
                "EVENT_TYPE_CHMOD"
            } else {
                continue;
            };
            if self.recursive
                && flags.contains(ReadFlags::ISDIR)
                && flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO)
            {
                let _ = self.add(&mut inner, &full);
            }
            let rel = full
                .strip_prefix(&self.root)
                .ok()
                .filter(|r| !r.as_os_str().is_empty())
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_else(|| {
                    full.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            let mut ev = json!({"name": rel, "type": kind});
            if let Some(names) = &names {
                if let Ok(entry) = crate::fs::entry_info(&full, names) {
                    ev["entry"] = entry;
                }
            }
            if inner.queue.len() >= MAX_WATCHER_EVENTS {
                inner.queue.pop_front();
            }
            inner.queue.push_back(ev);
        }
        drained
    }

    fn take(&self) -> Vec<Value> {
        self.lock().queue.drain(..).collect()
    }

    /// Drains the kernel queue whenever it becomes readable, until the watcher is dropped.
    async fn pump(self: &Arc<Self>, on_events: Option<&mpsc::Sender<Bytes>>) -> Result<(), ()> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|_| ())?;
            let drained = self.drain();
            if drained {
                guard.clear_ready();
            }
            if let Some(tx) = on_events {
                for ev in self.take() {
                    tx.send(connect::message_frame(&json!({"filesystem": ev})))
                        .await
                        .map_err(|_| ())?;
                }
            }
        }
    }
}

/// The live watchers: polling ones by id, and a count of streaming ones.
#[derive(Default)]
pub struct Watchers {
    polling: Mutex<HashMap<String, (Arc<Watcher>, tokio::task::AbortHandle)>>,
    streaming: AtomicUsize,
    next_id: AtomicU64,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Watcher>, tokio::task::AbortHandle)>> {
        self.polling.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn check_room(&self) -> RpcResult<()> {
        if self.lock().len() + self.streaming.load(Ordering::Relaxed) >= MAX_WATCHERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("too many watchers (at most {MAX_WATCHERS}); remove one first"),
            ));
        }
        Ok(())
    }
}

fn parse(state: &Shared, req: &Value) -> RpcResult<Arc<Watcher>> {
    let path = get_str(req, "path", "path")?.unwrap_or_default();
    let root = crate::fs::resolve(&state.config.home, &path);
    let recursive = get_bool(req, "recursive", "recursive")?;
    let include_entry = get_bool(req, "includeEntry", "include_entry")?;
    // allowNetworkMounts is accepted: no directory is refused for being a network mount.
    get_bool(req, "allowNetworkMounts", "allow_network_mounts")?;
    Watcher::new(root, recursive, include_entry)
}

pub async fn watch_dir(state: &Shared, req: Value, keepalive: Option<Duration>) -> RpcResult<Response> {
    state.watchers.check_room()?;
    let watcher = parse(state, &req)?;
    state.watchers.streaming.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let st = state.clone();
    tokio::spawn(async move {
        if tx
            .send(connect::message_frame(&json!({"start": {}})))
            .await
            .is_ok()
        {
            let period = keepalive.unwrap_or(Duration::from_secs(3600 * 24 * 365));
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            let pump = watcher.pump(Some(&tx));
            tokio::pin!(pump);
            loop {
                tokio::select! {
                    _ = &mut pump => break,
                    _ = ticker.tick(), if keepalive.is_some() => {
                        if tx.send(connect::message_frame(&json!({"keepalive": {}}))).await.is_err() {
                            break;
                        }
                    }
                    _ = tx.closed() => break,
                }
            }
        }
        st.watchers.streaming.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(connect::stream_response(rx))
}

pub fn create_watcher(state: &Shared, req: Value) -> RpcResult<Value> {
    state.watchers.check_room()?;
    let watcher = parse(state, &req)?;
    let n = state.watchers.next_id.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = format!("w{n}-{nanos:08x}");
    let w = watcher.clone();
    let task = tokio::spawn(async move {
        let _ = w.pump(None).await;
    });
    state
        .watchers
        .lock()
        .insert(id.clone(), (watcher, task.abort_handle()));
    Ok(json!({"watcherId": id}))
}

fn watcher_id(req: &Value) -> RpcResult<String> {
    get_str(req, "watcherId", "watcher_id")?.ok_or_else(|| RpcError::invalid("missing watcherId"))
}

pub fn get_watcher_events(state: &Shared, req: Value) -> RpcResult<Value> {
    let id = watcher_id(&req)?;
    let watcher = state
        .watchers
        .lock()
        .get(&id)
        .map(|(w, _)| w.clone())
        .ok_or_else(|| RpcError::not_found(format!("watcher {id} not found")))?;
    watcher.drain();
    Ok(json!({"events": watcher.take()}))
}

pub fn remove_watcher(state: &Shared, req: Value) -> RpcResult<Value> {
    let id = watcher_id(&req)?;
    match state.watchers.lock().remove(&id) {
        Some((_, task)) => {
            task.abort();
            Ok(json!({}))
        }
        None => Err(RpcError::not_found(format!("watcher {id} not found"))),
    }
}
