//! A sandbox's saved state on disk: the lane's files in one directory, sealed by a manifest that names
//! every part's size and BLAKE3 hash, so that a snapshot is checked whole before anything trusts it.
//!
//! Place in the data flow: a lane's [`crate::ServiceSandbox::hibernate`] writes its parts into an empty
//! directory; the supervisor then [`seal`]s it — each part synced, hashed and read back — and a restore
//! [`verify`]s it first: a part missing, cut short or changed, a snapshot of another spec, lane or
//! format is refused with what was wrong, and the directory is left as it was for inspection.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a snapshot directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// The largest manifest read (a handful of parts).
const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// What a sealed snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// The lane that wrote the parts (only it can restore them).
    pub lane: String,
    /// The Tartarus version that wrote it.
    pub writer: String,
    /// BLAKE3 of the sandbox's spec as stored, mount sources left out ([`spec_identity`]): a restore is
    /// of the same spec only.
    pub spec_blake3: String,
    /// What was left of the sandbox's lifetime (`timeout`) when it was saved; `None`: no timeout.
    pub timeout_left_ms: Option<u64>,
    /// Every file of the snapshot but the manifest, by name.
    pub parts: Vec<Part>,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub name: String,
    pub bytes: u64,
    pub blake3: String,
}

impl Manifest {
    /// Bytes of every part together.
    pub fn total_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// What the snapshot is of, as its writer states it.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub lane: &'a str,
    /// The spec exactly as stored (its bytes are hashed).
    pub spec: &'a [u8],
    pub timeout_left_ms: Option<u64>,
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {dir} has no readable manifest ({MANIFEST})")]
    Manifest {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot {dir} has format {found}; this build reads format {FORMAT}")]
    Format { dir: PathBuf, found: u32 },
    #[error("snapshot {dir} was written by the {found} lane, not {expected}")]
    Lane {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error("snapshot {dir} is of another sandbox spec than the one restoring it")]
    Spec { dir: PathBuf },
    #[error("snapshot {dir} is corrupt: part {part} {why}; the snapshot is kept for inspection")]
    Corrupt { dir: PathBuf, part: String, why: String },
    #[error("sealing snapshot {dir} failed: {what}")]
    Seal {
        dir: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Seals the parts a lane wrote into `dir`: syncs and hashes each regular file, writes the manifest
/// (whole, then renamed, then the directory synced), and reads every part back against it. A directory
/// holding anything but regular files is refused.
pub fn seal(dir: &Path, origin: Origin<'_>) -> Result<Manifest, SnapshotError> {
    let fail = |what: &str, source: io::Error| SnapshotError::Seal {
        dir: dir.to_path_buf(),
        what: what.to_string(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| fail("listing its parts", e))? {
        let entry = entry.map_err(|e| fail("listing its parts", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        let kind = entry.file_type().map_err(|e| fail("listing its parts", e))?;
        if !kind.is_file() {
            return Err(fail(
                &format!("{name} is not a regular file"),
                io::Error::from(io::ErrorKind::InvalidData),
            ));
        }
        names.push(name);
    }
    names.sort();
    let mut parts = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(|e| fail(&format!("opening {name}"), e))?;
        file.sync_all().map_err(|e| fail(&format!("syncing {name}"), e))?;
        let (bytes, hash) = hash_file(file).map_err(|e| fail(&format!("hashing {name}"), e))?;
        parts.push(Part {
            name,
            bytes,
            blake3: hash,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        lane: origin.lane.to_string(),
        writer: env!("CARGO_PKG_VERSION").to_string(),
        spec_blake3: spec_identity(origin.spec),
        timeout_left_ms: origin.timeout_left_ms,
        parts,
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| fail("encoding the manifest", e.into()))?;
    let partial = dir.join(format!("{MANIFEST}.partial"));
    let write = || -> io::Result<()> {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&partial, dir.join(MANIFEST))?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        fail("writing the manifest", e)
    })?;
    check_parts(dir, &manifest)?;
    Ok(manifest)
}

/// Reads the manifest of `dir` and checks every part against it, and that the snapshot is of `lane` and
/// of exactly `spec`.
pub fn verify(dir: &Path, lane: &str, spec: &[u8]) -> Result<Manifest, SnapshotError> {
    let manifest = read_manifest(dir)?;
    if manifest.lane != lane {
        return Err(SnapshotError::Lane {
            dir: dir.to_path_buf(),
            found: manifest.lane,
            expected: lane.to_string(),
        });
    }
    if manifest.spec_blake3 != spec_identity(spec) {
        return Err(SnapshotError::Spec {
            dir: dir.to_path_buf(),
        });
    }
    check_parts(dir, &manifest)?;
    Ok(manifest)
}

/// What a restore must match of a spec: its BLAKE3, with the sources of its mounts left out — the targets
/// stay — since each sandbox restored from one snapshot (a fork's children) has its own host directories
/// behind the same paths (the tool gateway's). A spec that is not JSON is hashed as it is.
pub fn spec_identity(spec: &[u8]) -> String {
    let canonical = match serde_json::from_slice::<serde_json::Value>(spec) {
        Ok(mut value) => {
            if let Some(mounts) = value.get_mut("mounts").and_then(|m| m.as_array_mut()) {
                for mount in mounts {
                    if let Some(mount) = mount.as_object_mut() {
                        mount.remove("source");
                    }
                }
            }
            value.to_string().into_bytes()
        }
        Err(_) => spec.to_vec(),
    };
    blake3::hash(&canonical).to_hex().to_string()
}

/// The manifest of `dir`, without checking the parts.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let manifest_err = |source: io::Error| SnapshotError::Manifest {
        dir: dir.to_path_buf(),
        source,
    };
    let mut text = Vec::new();
    std::fs::File::open(dir.join(MANIFEST))
        .map_err(manifest_err)?
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(manifest_err)?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(manifest_err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the manifest is larger than any this build writes",
        )));
    }
    // The format is read first, so that a newer manifest is named as such rather than as unreadable.
    let format = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["format"].as_u64());
    if let Some(found) = format.filter(|f| *f != u64::from(FORMAT)) {
        return Err(SnapshotError::Format {
            dir: dir.to_path_buf(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
        });
    }
    serde_json::from_slice(&text).map_err(|e| manifest_err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

fn check_parts(dir: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let corrupt = |part: &str, why: String| SnapshotError::Corrupt {
        dir: dir.to_path_buf(),
        part: part.to_string(),
        why,
    };
    for part in &manifest.parts {
        if part.name.contains('/') || part.name == ".." || part.name.is_empty() {
            return Err(corrupt(&part.name, "is not a plain file name".into()));
        }
        let file = std::fs::File::open(dir.join(&part.name))
            .map_err(|e| corrupt(&part.name, format!("cannot be read ({e})")))?;
        let (bytes, hash) =
            hash_file(file).map_err(|e| corrupt(&part.name, format!("cannot be read ({e})")))?;
        if bytes != part.bytes {
            return Err(corrupt(
                &part.name,
                format!("holds {bytes} bytes, the manifest says {}", part.bytes),
            ));
        }
        if hash != part.blake3 {
            return Err(corrupt(&part.name, "does not match its hash".into()));
        }
    }
    Ok(())
}

fn hash_file(mut file: std::fs::File) -> io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher.finalize().to_hex().to_string()))
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(spec: &[u8]) -> Origin<'_> {
        Origin {
            lane: "gvisor",
            spec,
            timeout_left_ms: Some(5000),
        }
    }

    fn sealed() -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint.img"), vec![7u8; 3000]).unwrap();
        std::fs::write(dir.path().join("extra"), b"x").unwrap();
        let manifest = seal(dir.path(), origin(b"{\"command\":[]}")).unwrap();
        (dir, manifest)
    }

    #[test]
    fn test_a_sealed_snapshot_names_every_part_and_verifies() {
        let (dir, manifest) = sealed();
        let names: Vec<_> = manifest.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["checkpoint.img", "extra"]);
        assert_eq!(manifest.total_bytes(), 3001);
        assert_eq!(manifest.timeout_left_ms, Some(5000));
        let read = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap();
        assert_eq!(read, manifest);
    }

    #[test]
    fn test_a_changed_a_cut_or_a_missing_part_is_corrupt_and_left_in_place() {
        let (dir, _) = sealed();
        let image = dir.path().join("checkpoint.img");
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[1234] ^= 1;
        std::fs::write(&image, &bytes).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(
            err.to_string()
                .contains("part checkpoint.img does not match its hash"),
            "{err}"
        );
        assert!(image.exists(), "kept for inspection");
        std::fs::write(&image, &bytes[..100]).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(
            err.to_string()
                .contains("holds 100 bytes, the manifest says 3000"),
            "{err}"
        );
        std::fs::remove_file(&image).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }

    #[test]
    fn test_a_snapshot_of_another_spec_lane_or_format_is_refused() {
        let (dir, _) = sealed();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[\"other\"]}").unwrap_err();
        assert!(matches!(err, SnapshotError::Spec { .. }), "{err}");
        let err = verify(dir.path(), "microvm", b"{\"command\":[]}").unwrap_err();
        assert!(
            err.to_string()
                .contains("written by the gvisor lane, not microvm"),
            "{err}"
        );
        let path = dir.path().join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"format\": 1", "\"format\": 9");
        std::fs::write(&path, text).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(
            err.to_string()
                .contains("has format 9; this build reads format 1"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(matches!(err, SnapshotError::Manifest { .. }), "{err}");
    }

    #[test]
    fn test_the_spec_identity_leaves_mount_sources_out_and_nothing_else() {
        let spec = |source: &str, target: &str, command: &str| {
            format!(
                r#"{{"command":["{command}"],"mounts":[{{"source":"{source}","target":"{target}","writable":false}}]}}"#
            )
        };
        let parent = spec_identity(spec("/data/gateway/sb_1", "/run/tartarus", "sh").as_bytes());
        assert_eq!(
            parent,
            spec_identity(spec("/data/gateway/sb_2", "/run/tartarus", "sh").as_bytes())
        );
        assert_ne!(
            parent,
            spec_identity(spec("/data/gateway/sb_1", "/elsewhere", "sh").as_bytes())
        );
        assert_ne!(
            parent,
            spec_identity(spec("/data/gateway/sb_1", "/run/tartarus", "python3").as_bytes())
        );
    }

    #[test]
    fn test_a_part_name_cannot_leave_the_snapshot_directory() {
        let (dir, mut manifest) = sealed();
        manifest.parts[0].name = "../../etc/passwd".into();
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let err = verify(dir.path(), "gvisor", b"{\"command\":[]}").unwrap_err();
        assert!(err.to_string().contains("is not a plain file name"), "{err}");
    }

    #[test]
    fn test_sealing_refuses_a_directory_among_the_parts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        let err = seal(dir.path(), origin(b"{}")).unwrap_err();
        assert!(err.to_string().contains("nested is not a regular file"), "{err}");
        assert!(!dir.path().join(MANIFEST).exists());
    }
}
