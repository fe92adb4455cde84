//! The OCI layer unpacker (`tartarus-image/src/unpack.rs`): arbitrary bytes as a plain, gzip or zstd tar
//! stream, unpacked into a fresh directory. The first byte picks the compression and whether ids are
//! shifted (as a root supervisor does); the rest is the layer.
//!
//! Properties, whether the unpack succeeds or fails half-way: nothing outside the target changes — a
//! sibling directory that hostile `..` paths and symlinks aim at, and a fixed absolute one that the seeds
//! and the dictionary aim at, are compared with their state before; the target holds no setuid or setgid
//! file, no device but overlay whiteouts (0:0 character devices), no socket, no xattr outside `user.*`
//! and no overlay xattr but the opaque marker; with an id shift every entry is owned inside the shifted
//! range; the regular-file bytes stay within the limit; a successful unpack's counts are within its limits.
//!
//! Run it as root (CI and the fuzz/run script do): whiteouts are device nodes, and id shifts are chowns.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tartarus_image::unpack::{unpack_layer, Compression, UnpackOptions};

/// An absolute directory the seeds' and the dictionary's absolute symlinks and paths aim at.
const SHARED_VICTIM: &str = "/tmp/tartarus-fuzz-victim";
/// The limits of one fuzzed layer: small, so that the fuzzer reaches them.
const MAX_BYTES: u64 = 1 << 20;
const MAX_ENTRIES: u64 = 256;
/// The id shift of a root supervisor's layer store.
const ID_BASE: u32 = 100_000;

/// What one path is, as far as a write through it would change it.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    mtime: i64,
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

/// Every path under `root` (not following symlinks), relative to it.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            if let Ok(entries) = fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
        nodes.insert(
            path.strip_prefix(root).unwrap_or(&path).to_path_buf(),
            Node {
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                rdev: meta.rdev(),
                mtime: meta.mtime(),
                content: kind.is_file().then(|| fs::read(&path).unwrap_or_default()),
                link: kind
                    .is_symlink()
                    .then(|| fs::read_link(&path).unwrap_or_default()),
            },
        );
    }
    nodes
}

/// A directory that hostile layers aim at, with a file, a directory and a symlink in it.
fn make_victim(dir: &Path) {
    let _ = fs::create_dir_all(dir.join("dir"));
    let _ = fs::write(dir.join("canary"), b"canary\n");
    let _ = std::os::unix::fs::symlink("canary", dir.join("link"));
}

struct Place {
    /// Holds `layer` (the target, made anew for each input) and `victim`.
    base: PathBuf,
    victim: PathBuf,
    before: BTreeMap<PathBuf, Node>,
    shared_before: BTreeMap<PathBuf, Node>,
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| {
        // tmpfs when there is one: fast, and it keeps user xattrs.
        let parent = match Path::new("/dev/shm").is_dir() {
            true => PathBuf::from("/dev/shm"),
            false => std::env::temp_dir(),
        };
        let base = parent.join(format!("tartarus-fuzz-unpack.{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).expect("creating the fuzz directory");
        let victim = base.join("victim");
        make_victim(&victim);
        make_victim(Path::new(SHARED_VICTIM));
        Place {
            before: snapshot(&victim),
            shared_before: snapshot(Path::new(SHARED_VICTIM)),
            base,
            victim,
        }
    })
}

/// The properties of the target's tree, whatever the outcome.
fn check_tree(target: &Path, id_shift: Option<u32>) -> u64 {
    let mut inodes = BTreeSet::new();
    let mut bytes = 0;
    for (rel, node) in snapshot(target) {
        let path = target.join(&rel);
        let kind = fs::symlink_metadata(&path).expect("a listed path").file_type();
        assert_eq!(
            node.mode & 0o6000,
            0,
            "{rel:?} is setuid or setgid: {:o}",
            node.mode
        );
        assert!(!kind.is_block_device() && !kind.is_socket(), "{rel:?}: {kind:?}");
        if kind.is_char_device() {
            assert_eq!(node.rdev, 0, "{rel:?} is a device other than a whiteout");
        }
        if let Some(base) = id_shift {
            if !rel.as_os_str().is_empty() {
                let range = base..base + 65_536;
                assert!(
                    range.contains(&node.uid) && range.contains(&node.gid),
                    "{rel:?} owned by {}:{}",
                    node.uid,
                    node.gid
                );
            }
        }
        check_xattrs(&path, &rel, kind.is_dir());
        if kind.is_file() && inodes.insert(fs::symlink_metadata(&path).map(|m| m.ino()).unwrap_or(0)) {
            bytes += node.content.map_or(0, |c| c.len() as u64);
        }
    }
    bytes
}

fn check_xattrs(path: &Path, rel: &Path, is_dir: bool) {
    let mut names = vec![0u8; 64 * 1024];
    let Ok(len) = rustix::fs::llistxattr(path, &mut names) else {
        return;
    };
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let shown = String::from_utf8_lossy(name);
        assert!(name.starts_with(b"user."), "{rel:?} carries xattr {shown}");
        if name.starts_with(b"user.overlay.") {
            assert_eq!(
                name, b"user.overlay.opaque",
                "{rel:?} carries overlay xattr {shown}"
            );
            assert!(is_dir, "{rel:?}: opaque marker on a non-directory");
            let mut value = [0u8; 16];
            let len = rustix::fs::lgetxattr(path, "user.overlay.opaque", &mut value).unwrap_or(0);
            assert_eq!(&value[..len], b"y", "{rel:?}: opaque marker other than y");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, layer)) = data.split_first() else {
        return;
    };
    let compression = match selector & 0x03 {
        1 => Compression::Gzip,
        2 => Compression::Zstd,
        _ => Compression::None,
    };
    let id_shift = (selector & 0x04 != 0).then_some(ID_BASE);
    let options = UnpackOptions {
        id_shift,
        max_bytes: MAX_BYTES,
        max_entries: MAX_ENTRIES,
    };
    let place = place();
    let target = place.base.join("layer");
    let _ = fs::remove_dir_all(&target);
    fs::create_dir(&target).expect("creating the target");

    let result = unpack_layer(layer, compression, &target, &options);

    assert_eq!(
        snapshot(&place.victim),
        place.before,
        "the layer changed a directory beside it ({result:?})"
    );
    assert_eq!(
        snapshot(Path::new(SHARED_VICTIM)),
        place.shared_before,
        "the layer changed {SHARED_VICTIM} ({result:?})"
    );
    let beside: BTreeSet<_> = fs::read_dir(&place.base)
        .expect("listing the fuzz directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        beside,
        BTreeSet::from(["layer".into(), "victim".into()]),
        "the layer wrote beside itself"
    );
    let bytes = check_tree(&target, id_shift);
    assert!(
        bytes <= MAX_BYTES,
        "{bytes} bytes unpacked, over the limit of {MAX_BYTES}"
    );
    if let Ok(stats) = result {
        assert!(
            stats.entries <= MAX_ENTRIES && stats.bytes <= MAX_BYTES,
            "{stats:?}"
        );
        assert!(
            bytes <= stats.bytes,
            "{bytes} bytes on disk but {} counted",
            stats.bytes
        );
    }
    let _ = fs::remove_dir_all(&target);
});
