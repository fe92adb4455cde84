//! `filesystem.Filesystem` unary calls and the EntryInfo message they share with watching and /files.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::connect::{get_str, get_u32, RpcError, RpcResult};
use crate::users::Names;
use crate::{Shared, MAX_LIST_ENTRIES};

/// The extended-attribute namespace that holds a file's user metadata.
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// A request path made absolute: relative paths (and `~`, `~/…`) are under `home`; `.` and `..` are
/// resolved lexically so the returned paths are clean.
pub fn resolve(home: &Path, p: &str) -> PathBuf {
    let joined = if p.is_empty() || p == "~" {
        home.to_path_buf()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home.join(rest)
    } else if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        home.join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Go's `FileMode.String()` form: a type letter then `rwxrwxrwx`.
pub fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'L',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 'S',
        libc::S_IFBLK | libc::S_IFCHR => 'D',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// RFC 3339 in UTC with nanoseconds, as proto3 JSON writes a Timestamp.
pub fn timestamp(secs: i64, nanos: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let nanos = nanos.clamp(0, 999_999_999);
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}")
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The `user.e2b.*` extended attributes of `path` (following symlinks), prefix stripped.
pub fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 64 * 1024];
    let Ok(n) = rustix::fs::listxattr(path, &mut list[..]) else {
        return out;
    };
    let mut value = vec![0u8; 64 * 1024];
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX) else {
            continue;
        };
        if let Ok(len) = rustix::fs::getxattr(path, name, &mut value[..]) {
            out.insert(
                key.to_owned(),
                String::from_utf8_lossy(&value[..len]).into_owned(),
            );
        }
    }
    out
}

/// Replaces the file's `user.e2b.*` attributes with `metadata`.
pub fn write_metadata(path: &Path, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
    for key in read_metadata(path).keys() {
        if !metadata.contains_key(key) {
            let _ = rustix::fs::removexattr(path, format!("{METADATA_XATTR_PREFIX}{key}").as_str());
        }
    }
    for (key, value) in metadata {
        rustix::fs::setxattr(
            path,
            format!("{METADATA_XATTR_PREFIX}{key}").as_str(),
            value.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    Ok(())
}

pub fn metadata_json(metadata: &BTreeMap<String, String>) -> Value {
    Value::Object(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// The EntryInfo of `path`: a symlink is described by what it points to (type, size, mode), with
/// `symlinkTarget` its resolved absolute target; a dangling one is of type SYMLINK.
pub fn entry_info(path: &Path, names: &Names) -> std::io::Result<Value> {
    let lmeta = std::fs::symlink_metadata(path)?;
    let (meta, target) = if lmeta.file_type().is_symlink() {
        let target = std::fs::canonicalize(path).ok().or_else(|| {
            let t = std::fs::read_link(path).ok()?;
            Some(resolve(
                path.parent().unwrap_or(Path::new("/")),
                &t.to_string_lossy(),
            ))
        });
        match std::fs::metadata(path) {
            Ok(m) => (m, target),
            Err(_) => (lmeta, target),
        }
    } else {
        (lmeta, None)
    };
    let file_type = if meta.is_dir() {
        "FILE_TYPE_DIRECTORY"
    } else if meta.file_type().is_symlink() {
        "FILE_TYPE_SYMLINK"
    } else {
        "FILE_TYPE_FILE"
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let mut v = json!({
        "name": name,
        "type": file_type,
        "path": path_str(path),
        "size": meta.len().to_string(),
        "mode": meta.permissions().mode() & 0o777,
        "permissions": permissions_string(meta.mode()),
        "owner": names.user(meta.uid()),
        "group": names.group(meta.gid()),
        "modifiedTime": timestamp(meta.mtime(), meta.mtime_nsec()),
    });
    if let Some(t) = target {
        v["symlinkTarget"] = Value::String(path_str(&t));
    }
    let md = read_metadata(path);
    if !md.is_empty() {
        v["metadata"] = metadata_json(&md);
    }
    Ok(v)
}

fn required_path(state: &Shared, req: &Value, camel: &str, snake: &str) -> RpcResult<PathBuf> {
    let p = get_str(req, camel, snake)?.unwrap_or_default();
    Ok(resolve(&state.config.home, &p))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> RpcResult<T> + Send + 'static) -> RpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(RpcError::internal(format!("filesystem task failed: {e}"))))
}

pub async fn stat(state: &Shared, req: Value) -> RpcResult<Value> {
    let path = required_path(state, &req, "path", "path")?;
    blocking(move || {
        let entry = entry_info(&path, &Names::load()).map_err(|e| RpcError::io(&path_str(&path), &e))?;
        Ok(json!({"entry": entry}))
    })
    .await
}

/// Creates `path` and its missing parents with mode 0755 (whatever the umask).
pub fn make_dirs(path: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        if std::fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p.to_path_buf());
        cur = p.parent();
    }
    for p in missing.iter().rev() {
        match std::fs::create_dir(p) {
            Ok(()) => std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub async fn make_dir(state: &Shared, req: Value) -> RpcResult<Value> {
    let path = required_path(state, &req, "path", "path")?;
    blocking(move || {
        let shown = path_str(&path);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(RpcError::new(
                    crate::connect::Code::AlreadyExists,
                    format!("directory already exists: {shown}"),
                ))
            }
            Ok(_) => {
                return Err(RpcError::invalid(format!(
                    "path already exists and is not a directory: {shown}"
                )))
            }
            Err(_) => {}
        }
        make_dirs(&path).map_err(|e| RpcError::io(&shown, &e))?;
        let entry = entry_info(&path, &Names::load()).map_err(|e| RpcError::io(&shown, &e))?;
        Ok(json!({"entry": entry}))
    })
    .await
}

pub async fn move_entry(state: &Shared, req: Value) -> RpcResult<Value> {
    let source = required_path(state, &req, "source", "source")?;
    let destination = required_path(state, &req, "destination", "destination")?;
    blocking(move || {
        std::fs::symlink_metadata(&source).map_err(|e| RpcError::io(&path_str(&source), &e))?;
        if let Some(parent) = destination.parent() {
            make_dirs(parent).map_err(|e| RpcError::io(&path_str(parent), &e))?;
        }
        std::fs::rename(&source, &destination).map_err(|e| {
            RpcError::io(
                &format!("move {} to {}", path_str(&source), path_str(&destination)),
                &e,
            )
        })?;
        let entry = entry_info(&destination, &Names::load())
            .map_err(|e| RpcError::io(&path_str(&destination), &e))?;
        Ok(json!({"entry": entry}))
    })
    .await
}

pub async fn list_dir(state: &Shared, req: Value) -> RpcResult<Value> {
    let path = required_path(state, &req, "path", "path")?;
    // proto3 JSON omits a zero depth, so absent means the SDK's default, 1.
    let depth = get_u32(&req, "depth", "depth")?.unwrap_or(1).max(1);
    blocking(move || {
        let shown = path_str(&path);
        let meta = std::fs::metadata(&path).map_err(|e| RpcError::io(&shown, &e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid(format!("path is not a directory: {shown}")));
        }
        let names = Names::load();
        let mut entries = Vec::new();
        walk(&path, depth, &names, &mut entries).map_err(|e| RpcError::io(&shown, &e))?;
        if entries.len() > MAX_LIST_ENTRIES {
            return Err(RpcError::new(
                crate::connect::Code::ResourceExhausted,
                format!("more than {MAX_LIST_ENTRIES} entries under {shown}; list with a smaller depth"),
            ));
        }
        Ok(json!({"entries": entries}))
    })
    .await
}

/// Pre-order, in name order, down to `depth` levels; symlinked directories are not descended into.
fn walk(dir: &Path, depth: u32, names: &Names, out: &mut Vec<Value>) -> std::io::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    children.sort();
    for child in children {
        if out.len() > MAX_LIST_ENTRIES {
            return Ok(());
        }
        let Ok(info) = entry_info(&child, names) else {
            continue;
        };
        out.push(info);
        let is_real_dir = std::fs::symlink_metadata(&child)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if depth > 1 && is_real_dir {
            // An unreadable subdirectory is listed but not descended into.
            let _ = walk(&child, depth - 1, names, out);
        }
    }
    Ok(())
}

pub async fn remove(state: &Shared, req: Value) -> RpcResult<Value> {
    let path = required_path(state, &req, "path", "path")?;
    blocking(move || {
        let shown = path_str(&path);
        let result = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            // Removing what is not there succeeds, as the SDK expects.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        result.map_err(|e| RpcError::io(&shown, &e))?;
        Ok(json!({}))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_against_home() {
        let home = Path::new("/home/user");
        assert_eq!(resolve(home, "a/b"), PathBuf::from("/home/user/a/b"));
        assert_eq!(resolve(home, ""), PathBuf::from("/home/user"));
        assert_eq!(resolve(home, "~/x"), PathBuf::from("/home/user/x"));
        assert_eq!(resolve(home, "/etc/../tmp/./x"), PathBuf::from("/tmp/x"));
        assert_eq!(resolve(home, "../../../.."), PathBuf::from("/"));
    }

    #[test]
    fn permissions_like_go() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(timestamp(951_782_400, 0), "2000-02-29T00:00:00Z");
    }
}
