//! The local image store: image records and unpacked layers, content-addressed under the data directory.
//!
//! ```text
//! DATA_DIR/images/
//!   store.lock                   shared by pulls, exclusive for rm/prune (no layer vanishes mid-pull)
//!   refs/<sha256(reference)>.json  one ImageRecord per pulled reference
//!   layers/sha256/<hex>/         one unpacked layer (an overlayfs lower directory), keyed by blob digest
//!   layers/sha256/<hex>.json     its LayerRecord; written last, so a layer exists iff its record does
//!   locks/<hex>.lock             flock held while one process downloads and unpacks that layer
//!   tmp/<pid>-<random>/          staging; renamed into place when complete, removed on any failure
//! ```
//!
//! Every visible change is a rename of something complete, so a crash, a digest mismatch or a full disk
//! leaves at most staging entries, which the next open removes once their owner process is gone.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::unpack::{self, Compression, UnpackError, UnpackOptions};

/// Largest unpacked size of one layer (a tar bomb guard).
pub const MAX_LAYER_BYTES: u64 = 64 << 30;
/// Most entries in one layer.
pub const MAX_LAYER_ENTRIES: u64 = 4_000_000;

/// The parts of an image's configuration a sandbox uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

/// One pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The full reference, e.g. `docker.io/library/python:3.11-slim`.
    pub reference: String,
    /// Digest of the (platform) image manifest.
    pub digest: String,
    pub config: RunConfig,
    /// Layer blob digests, bottom layer first.
    pub layers: Vec<String>,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    pub pulled_ms: u64,
}

/// One unpacked layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    /// Compressed size.
    pub size: u64,
    /// Bytes of regular files after unpacking.
    pub unpacked_size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub layers: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {0} is not in the local store: pull it with `tartarus image pull {0}`")]
    NotFound(String),
    #[error("invalid image reference '{reference}': {message}")]
    Reference { reference: String, message: String },
    #[error("unsupported digest '{0}': only sha256 digests are supported")]
    Digest(String),
    #[error("layer {digest}: {message}")]
    Layer { digest: String, message: String },
    #[error("layer {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error(
        "sandboxes cannot reach the image layers: {} has mode {mode:o}, without search permission for \
         others (sandbox ids are unprivileged on the host); run `chmod o+x {}` or use a data directory \
         outside it",
        path.display(),
        path.display()
    )]
    NotTraversable { path: PathBuf, mode: u32 },
    #[error("record {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The canonical form of an image reference (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize_reference(reference: &str) -> Result<String, StoreError> {
    Ok(parse_reference(reference)?.to_string())
}

fn parse_reference(reference: &str) -> Result<crate::reference::ImageReference, StoreError> {
    crate::reference::ImageReference::parse(reference).map_err(|e| StoreError::Reference {
        reference: reference.to_string(),
        message: e.0,
    })
}

/// The registry host (and port) a reference pulls from, e.g. `docker.io` or `127.0.0.1:5000`.
pub fn registry_of(reference: &str) -> Result<String, StoreError> {
    Ok(parse_reference(reference)?.registry)
}

/// The hex part of a `sha256:` digest, checked.
pub fn sha256_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(StoreError::Digest(digest.to_string())),
    }
}

/// A lock file held with `flock`; released on drop.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path, exclusive: bool) -> Result<FileLock, StoreError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("opening lock", path))?;
        let op = match exclusive {
            true => rustix::fs::FlockOperation::LockExclusive,
            false => rustix::fs::FlockOperation::LockShared,
        };
        loop {
            match rustix::fs::flock(file.as_fd(), op) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err("locking", path)(e.into())),
            }
        }
    }
}

/// The image store of one data directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Added to layer file owners when unpacking (root supervisor; see [`UnpackOptions::id_shift`]).
    id_shift: Option<u32>,
}

impl ImageStore {
    /// Opens (creating) the store under `data_dir/images` and removes staging entries of dead processes.
    pub fn open(data_dir: &Path, id_shift: Option<u32>) -> Result<ImageStore, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let root = data_dir.join("images");
        // Sandboxes reach layers as unprivileged host ids: the path to them is traversable (o+x) but not
        // listable; the rest is private.
        for (dir, mode) in [
            ("", 0o711),
            ("layers", 0o711),
            ("layers/sha256", 0o711),
            ("refs", 0o700),
            ("locks", 0o700),
            ("tmp", 0o700),
        ] {
            let path = root.join(dir);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&path)
                .map_err(io_err("creating", &path))?;
        }
        let store = ImageStore { root, id_shift };
        store.remove_stale_staging();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Held (shared) for the whole of a pull; `rm` and `prune` take it exclusively.
    pub fn lock_shared(&self) -> Result<FileLock, StoreError> {
        FileLock::acquire(&self.root.join("store.lock"), false)
    }

    fn lock_exclusive(&self) -> Result<FileLock, StoreError> {
        FileLock::acquire(&self.root.join("store.lock"), true)
    }

    /// Serialises the download of one layer between processes (blocks).
    pub fn lock_layer(&self, digest: &str) -> Result<FileLock, StoreError> {
        let hex = sha256_hex(digest)?;
        FileLock::acquire(&self.root.join("locks").join(format!("{hex}.lock")), true)
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let key = hex::encode(Sha256::digest(reference.as_bytes()));
        self.root.join("refs").join(format!("{key}.json"))
    }

    /// The unpacked directory of a layer (exists iff [`ImageStore::layer`] returns a record).
    pub fn layer_dir(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("layers/sha256").join(sha256_hex(digest)?))
    }

    fn layer_record_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join("layers/sha256")
            .join(format!("{}.json", sha256_hex(digest)?)))
    }

    /// The record of a complete layer, if present.
    pub fn layer(&self, digest: &str) -> Result<Option<LayerRecord>, StoreError> {
        read_json(&self.layer_record_path(digest)?)
    }

    /// The image pulled as `reference` (any spelling), if present.
    pub fn find(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        let reference = normalize_reference(reference)?;
        read_json(&self.ref_path(&reference))
    }

    /// Like [`ImageStore::find`], but an error naming the pull command when absent, and checking that
    /// every layer is still there.
    pub fn get(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let record = self
            .find(reference)?
            .ok_or_else(|| StoreError::NotFound(reference.to_string()))?;
        for digest in &record.layers {
            if self.layer(digest)?.is_none() {
                return Err(StoreError::NotFound(reference.to_string()));
            }
        }
        Ok(record)
    }

    /// Host directories of the image's layers, bottom first. With a root supervisor the sandbox opens
    /// them as an unprivileged host id, so every directory above them must be traversable by others.
    pub fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>, StoreError> {
        if self.id_shift.is_some() {
            self.check_traversable()?;
        }
        record.layers.iter().map(|d| self.layer_dir(d)).collect()
    }

    fn check_traversable(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let layers = self.root.join("layers/sha256");
        let absolute = fs::canonicalize(&layers).map_err(io_err("resolving", &layers))?;
        for dir in absolute.ancestors() {
            let mode = fs::metadata(dir)
                .map_err(io_err("reading", dir))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                return Err(StoreError::NotTraversable {
                    path: dir.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(())
    }

    /// Every pulled image, by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("refs");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("reading", &dir))? {
            let path = entry.map_err(io_err("reading", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(record) = read_json::<ImageRecord>(&path)? {
                    records.push(record);
                }
            }
        }
        records.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(records)
    }

    /// Records (or replaces) an image whose layers are all present.
    pub fn put(&self, record: &ImageRecord) -> Result<(), StoreError> {
        write_json_atomic(&self.tmp_path(), &self.ref_path(&record.reference), record)
    }

    /// Forgets an image; its layers stay until `prune`. Returns whether it existed.
    pub fn remove(&self, reference: &str) -> Result<bool, StoreError> {
        let reference = normalize_reference(reference)?;
        let _lock = self.lock_exclusive()?;
        let path = self.ref_path(&reference);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Removes layers no image references, and leftovers of interrupted pulls.
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let _lock = self.lock_exclusive()?;
        let referenced: std::collections::HashSet<String> =
            self.list()?.into_iter().flat_map(|r| r.layers).collect();
        let dir = self.root.join("layers/sha256");
        let mut report = PruneReport::default();
        for entry in fs::read_dir(&dir).map_err(io_err("reading", &dir))? {
            let path = entry.map_err(io_err("reading", &dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let hex = name.trim_end_matches(".json");
            if referenced.contains(&format!("sha256:{hex}")) {
                continue;
            }
            if let Some(record) = path
                .extension()
                .is_some_and(|e| e == "json")
                .then(|| read_json::<LayerRecord>(&path))
                .transpose()?
                .flatten()
            {
                // The record goes first: a layer without one is invisible even if removing the tree fails.
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                // No pull runs while the store lock is held exclusively, so no one holds this layer's lock.
                let _ = fs::remove_file(self.root.join("locks").join(format!("{hex}.lock")));
                report.layers += 1;
                report.bytes += record.unpacked_size;
            } else if path.is_dir() {
                remove_tree(&path)?;
            }
        }
        Ok(report)
    }

    fn tmp_path(&self) -> PathBuf {
        let random = tartarus_hostsys::random_hex(8).unwrap_or_else(|_| format!("{:x}", std::process::id()));
        self.root
            .join("tmp")
            .join(format!("{}-{random}", std::process::id()))
    }

    fn remove_stale_staging(&self) {
        let dir = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok());
            if owner.is_some_and(|pid| !tartarus_hostsys::process_exists(pid)) {
                let _ = remove_tree(&entry.path());
            }
        }
    }

    /// Unpacks a layer from its compressed blob stream into the store. The caller holds the layer's lock
    /// and has checked it is absent. The blob's own digest is the caller's to verify: `blob` must return an
    /// error (not end-of-file) if the download fails or does not match, and is read to its end here, so a
    /// layer is installed only after its last byte was checked. The uncompressed stream is checked against
    /// `diff_id` when the image config names one.
    pub fn install_layer(
        &self,
        digest: &str,
        media_type: &str,
        size: u64,
        diff_id: Option<&str>,
        blob: impl Read,
    ) -> Result<LayerRecord, StoreError> {
        let final_dir = self.layer_dir(digest)?;
        let layer_err = |message: String| StoreError::Layer {
            digest: digest.to_string(),
            message,
        };
        let compression = Compression::from_media_type(media_type).map_err(layer_err)?;
        let staging = self.tmp_path();
        fs::create_dir(&staging).map_err(io_err("creating", &staging))?;
        let result = (|| {
            let tree = staging.join("tree");
            fs::create_dir(&tree).map_err(io_err("creating", &tree))?;
            let mut tar =
                HashingReader::new(decompress(blob, compression).map_err(io_err("decompressing", &tree))?);
            let options = UnpackOptions {
                id_shift: self.id_shift,
                max_bytes: MAX_LAYER_BYTES,
                max_entries: MAX_LAYER_ENTRIES,
            };
            let stats =
                unpack::unpack_layer(&mut tar, Compression::None, &tree, &options).map_err(|source| {
                    StoreError::Unpack {
                        digest: digest.to_string(),
                        source,
                    }
                })?;
            // The tar ends before its padding; the blob's digest covers everything, so read it all.
            io::copy(&mut tar, &mut io::sink()).map_err(|e| layer_err(format!("reading the blob: {e}")))?;
            let actual = format!("sha256:{}", hex::encode(tar.hasher.finalize_reset()));
            if let Some(expected) = diff_id {
                if actual != expected {
                    return Err(layer_err(format!(
                        "uncompressed content has digest {actual}, but the image config says {expected}"
                    )));
                }
            }
            let record = LayerRecord {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
                size,
                unpacked_size: stats.bytes,
                diff_id: actual,
            };
            fs::rename(&tree, &final_dir).map_err(io_err("installing layer", &final_dir))?;
            let record_path = self.layer_record_path(digest)?;
            if let Err(e) = write_json_atomic(&staging.join("record"), &record_path, &record) {
                let _ = remove_tree(&final_dir);
                return Err(e);
            }
            Ok(record)
        })();
        let _ = remove_tree(&staging);
        result
    }
}

fn decompress<'a>(blob: impl Read + 'a, compression: Compression) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(
            1 << 16,
            blob,
        ))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
    })
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Record {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// Writes `value` to `staging`, syncs it and renames it to `path`.
fn write_json_atomic<T: Serialize>(staging: &Path, path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Record {
        path: path.to_path_buf(),
        source,
    })?;
    let result = (|| {
        let mut file = File::create(staging)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(staging, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(staging);
    }
    result.map_err(io_err("writing", path))
}

/// Removes a tree without following symlinks (layers hold arbitrary symlinks).
fn remove_tree(path: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            // Unpacked directories may be read-only (mode 0555); make them writable to empty them.
            make_tree_writable(path);
            fs::remove_dir_all(path).map_err(io_err("removing", path))
        }
        Ok(_) => fs::remove_file(path).map_err(io_err("removing", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

fn make_tree_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.is_dir() {
            let mode = meta.permissions().mode();
            if mode & 0o700 != 0o700 {
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700));
            }
            if let Ok(entries) = fs::read_dir(path) {
                for entry in entries.flatten() {
                    make_tree_writable(&entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised() {
        assert_eq!(
            normalize_reference("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("127.0.0.1:5000/a/b:1").unwrap(),
            "127.0.0.1:5000/a/b:1"
        );
        assert!(normalize_reference("library/UPPER:x").is_err());
        assert!(normalize_reference("has space").is_err());
    }

    #[test]
    fn digests_are_checked() {
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(sha256_hex("sha256:../../etc").is_err());
        assert!(sha256_hex(&format!("sha512:{}", "a".repeat(128))).is_err());
    }

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_layer_is_installed_whole_or_not_at_all() {
        let data = tempfile::tempdir().unwrap();
        let store = ImageStore::open(data.path(), None).unwrap();
        let tar = tar_with(&[("hello.txt", b"hi")]);
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let digest = format!("sha256:{}", "b".repeat(64));
        let media = "application/vnd.oci.image.layer.v1.tar";

        // A wrong diff id: refused, nothing installed, staging empty.
        let wrong = format!("sha256:{}", "c".repeat(64));
        let err = store
            .install_layer(&digest, media, tar.len() as u64, Some(&wrong), &tar[..])
            .unwrap_err();
        assert!(err.to_string().contains("image config says"), "{err}");
        assert!(store.layer(&digest).unwrap().is_none());
        assert!(!store.layer_dir(&digest).unwrap().exists());
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);

        // A blob stream that fails after the tar: refused too (the download's error wins over EOF).
        let failing = (&tar[..]).chain(FailingReader);
        assert!(store.install_layer(&digest, media, 0, None, failing).is_err());
        assert!(store.layer(&digest).unwrap().is_none());
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);

        let record = store
            .install_layer(&digest, media, tar.len() as u64, Some(&diff_id), &tar[..])
            .unwrap();
        assert_eq!(record.unpacked_size, 2);
        assert_eq!(
            fs::read(store.layer_dir(&digest).unwrap().join("hello.txt")).unwrap(),
            b"hi"
        );
        assert_eq!(store.layer(&digest).unwrap(), Some(record));

        // Unreferenced: prune removes it.
        let report = store.prune().unwrap();
        assert_eq!(report.layers, 1);
        assert!(!store.layer_dir(&digest).unwrap().exists());
    }

    #[test]
    fn layers_behind_a_private_directory_are_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let outer = tempfile::tempdir().unwrap();
        let private = outer.path().join("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        let record = ImageRecord {
            reference: "x".into(),
            digest: String::new(),
            config: RunConfig::default(),
            layers: vec![format!("sha256:{}", "d".repeat(64))],
            size: 0,
            pulled_ms: 0,
        };
        let store = ImageStore::open(&private.join("data"), Some(100_000_000)).unwrap();
        let err = store.layer_dirs(&record).unwrap_err().to_string();
        assert!(err.contains("chmod o+x") && err.contains("private"), "{err}");
        // Rootless sandboxes map the caller's own id: nothing to check.
        let own = ImageStore::open(&private.join("data"), None).unwrap();
        assert_eq!(own.layer_dirs(&record).unwrap().len(), 1);
        fs::set_permissions(&private, fs::Permissions::from_mode(0o711)).unwrap();
        assert!(store.layer_dirs(&record).is_ok());
    }

    struct FailingReader;
    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("connection reset"))
        }
    }
}
