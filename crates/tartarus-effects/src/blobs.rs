//! The content-addressed blob store (`docs/spec/effects-v1.md` §9): streaming put and verified get of blobs of
//! any size, range reads with proofs a client checks against the [`Cid`] alone, per-tenant references and
//! quotas, and garbage collection.
//!
//! A blob's id is the raw [`Cid`] of its bytes, whose digest is BLAKE3 of the whole content. BLAKE3 is a
//! Merkle tree over 1 KiB chunks; next to each blob the store keeps a **bao outboard** (the `bao-tree`
//! crate's post-order layout) holding the hash pairs of that tree down to chunk groups of
//! [`GROUP_BYTES`] (16 KiB). With it every group read from disk is checked against the id before it is
//! handed out, and any byte range is served with the few hashes that link it to the id.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory); the data file's rename is the
//! commit point. One [`BlobStore`] (one process) owns a root directory at a time: the store serialises its
//! commits, reference updates and [`BlobStore::gc`] with an in-process lock and does no file locking.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use bao_tree::io::outboard::PostOrderOutboard;
use bao_tree::io::sync::{encode_ranges_validated, DecodeResponseIter, Outboard, ReadAt};
use bao_tree::io::{round_up_to_chunks, BaoContentItem, DecodeError, EncodeError};
use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, BlockSize, ByteRanges, ChunkNum, ChunkRanges};
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};
use serde::{Deserialize, Serialize};

use crate::cid::{Cid, Codec};

/// Chunk group size of every outboard: 2⁴ BLAKE3 chunks of 1 KiB.
pub const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);
/// Bytes per chunk group, the unit of verification (16 KiB).
pub const GROUP_BYTES: usize = 16 * 1024;
/// Bytes of the range proof header: blob size, offset and length, each a little-endian u64.
pub const PROOF_HEADER_BYTES: usize = 24;

/// Format name of a tenant's reference file.
const REFS_FORMAT: &str = "tartarus-effects/v1/blob-refs";
/// Groups read per `read` call while putting: 64 groups (1 MiB).
const PUT_BUFFER_BYTES: usize = 64 * GROUP_BYTES;
/// Read buffer of a full verified read.
const GET_BUFFER_BYTES: usize = 1 << 20;
const OUTBOARD_SUFFIX: &str = "obao";
const MAX_TENANT_LEN: usize = 128;

/// Why a blob could not be stored, read, proven or collected.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store's own files could not be read or written.
    #[error("blob store {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The reader given to [`BlobStore::put`] failed.
    #[error("reading the blob to store")]
    Input(#[source] io::Error),
    /// The writer given to [`BlobStore::get`] failed.
    #[error("writing the blob out")]
    Output(#[source] io::Error),
    /// No blob with this id is stored.
    #[error("blob {cid} not found")]
    NotFound {
        /// The id asked for.
        cid: Cid,
    },
    /// The id names a DAG-CBOR object, not a blob.
    #[error("{cid} is not a blob id (codec raw, 0x55)")]
    NotABlob {
        /// The id given.
        cid: Cid,
    },
    /// A tenant name that is empty, too long or not made of `[A-Za-z0-9._-]` (or starts with a dot).
    #[error("invalid tenant name {tenant:?}")]
    InvalidTenant {
        /// The name given.
        tenant: String,
    },
    /// Storing the blob would take the tenant over its quota; nothing was stored.
    #[error("tenant {tenant} would use {needed} bytes, over its quota of {limit} (nothing stored)")]
    QuotaExceeded {
        /// The tenant.
        tenant: String,
        /// Bytes the tenant would reference after the put (a lower bound when the stream was cut short).
        needed: u64,
        /// The tenant's quota in bytes.
        limit: u64,
    },
    /// Bytes of a stored blob do not hash to its id: the data file was altered or damaged.
    #[error("blob {cid} is corrupt in bytes {offset}..{end}")]
    CorruptBlob {
        /// The blob.
        cid: Cid,
        /// First byte of the chunk group (or region) that fails.
        offset: u64,
        /// End of that group.
        end: u64,
    },
    /// A stored outboard does not match the blob's id or its data file.
    #[error("outboard of blob {cid} is corrupt: {reason}")]
    CorruptOutboard {
        /// The blob.
        cid: Cid,
        /// What does not match.
        reason: String,
    },
    /// A range that does not lie within the blob (or whose end overflows).
    #[error("range {offset}+{len} is outside the blob ({size} bytes)")]
    RangeOutOfBounds {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Size of the blob.
        size: u64,
    },
    /// A range proof that does not establish the claimed bytes under the id.
    #[error("range proof does not verify: {reason}")]
    InvalidProof {
        /// Where the check failed.
        reason: String,
    },
    /// A tenant reference file that cannot be parsed.
    #[error("reference file {path}: {reason}")]
    CorruptRefs {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl BlobError {
    /// A stable code for the kind of error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Input(_) => "input",
            Self::Output(_) => "output",
            Self::NotFound { .. } => "not_found",
            Self::NotABlob { .. } => "not_a_blob",
            Self::InvalidTenant { .. } => "invalid_tenant",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::CorruptBlob { .. } => "corrupt_blob",
            Self::CorruptOutboard { .. } => "corrupt_outboard",
            Self::RangeOutOfBounds { .. } => "range_out_of_bounds",
            Self::InvalidProof { .. } => "invalid_proof",
            Self::CorruptRefs { .. } => "corrupt_refs",
        }
    }
}

/// How many bytes each tenant may reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The sum of the sizes of the distinct blobs one tenant references may not exceed this.
    pub bytes_per_tenant: u64,
}

impl Quota {
    /// No limit.
    pub const UNLIMITED: Self = Self {
        bytes_per_tenant: u64::MAX,
    };

    /// At most `bytes` per tenant.
    pub fn bytes_per_tenant(bytes: u64) -> Self {
        Self {
            bytes_per_tenant: bytes,
        }
    }
}

/// What [`BlobStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutResult {
    /// The blob's id.
    pub cid: Cid,
    /// Its size in bytes.
    pub size: u64,
    /// False when the content was already stored (by any tenant). Internal: never tell a tenant, it says
    /// what other tenants hold.
    pub stored: bool,
    /// True when the tenant did not hold a reference to this content before: the per-tenant answer.
    pub added: bool,
}

/// Bytes of a range together with the proof that they are that range of the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRead {
    /// Bytes `offset..offset + len` of the blob.
    pub data: Vec<u8>,
    /// The proof for [`verify_range`]: header, then the bao encoding of the covering chunks (§9.4).
    pub proof: Vec<u8>,
}

/// What [`BlobStore::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed because no tenant referenced them.
    pub blobs_removed: u64,
    /// Bytes freed: their data and outboard files, and orphan outboards.
    pub bytes_freed: u64,
}

/// A tenant's reference file (`refs/<tenant>.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefsState {
    format: String,
    /// Blob id (text) to size in bytes.
    blobs: BTreeMap<String, u64>,
}

/// A content-addressed blob store under one root directory.
///
/// Layout: `blobs/<hh>/<hex>` (the data), `blobs/<hh>/<hex>.obao` (the outboard), `refs/<tenant>.json`, `tmp/`;
/// `<hex>` is the 64-digit BLAKE3 digest and `<hh>` its first two digits.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    quota: Quota,
    /// Serialises commits, reference updates and collection.
    lock: Mutex<()>,
}

impl BlobStore {
    /// Opens (creating if needed) the store at `root`, removing temporary files that a crashed put left.
    pub fn open(root: impl Into<PathBuf>, quota: Quota) -> Result<Self, BlobError> {
        let store = Self {
            root: root.into(),
            quota,
            lock: Mutex::new(()),
        };
        for dir in [store.blobs_dir(), store.refs_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        let tmp = store.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let path = entry.map_err(io_at(&tmp))?.path();
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores everything `reader` yields as one blob referenced by `tenant`.
    ///
    /// The content is hashed and its outboard built in the same pass that writes it to a temporary file, so
    /// the input is read once. The files are committed whether or not the content was already stored
    /// (`stored: false`), so a put takes as long either way and its timing does not tell one tenant what
    /// another holds; the tenant's reference is added either way (`added` says whether it is new). Fails with [`BlobError::QuotaExceeded`], storing nothing, when the
    /// tenant's referenced bytes would exceed the quota; a stream longer than the whole quota is cut short.
    pub fn put(&self, tenant: &str, mut reader: impl Read) -> Result<PutResult, BlobError> {
        check_tenant(tenant)?;
        let limit = self.quota.bytes_per_tenant;
        let tmp = self.tmp_dir();
        let mut data = tempfile::Builder::new()
            .prefix("data-")
            .tempfile_in(&tmp)
            .map_err(io_at(&tmp))?;
        let outboard = tempfile::Builder::new()
            .prefix("obao-")
            .tempfile_in(&tmp)
            .map_err(io_at(&tmp))?;
        let data_path = data.path().to_path_buf();
        let outboard_path = outboard.path().to_path_buf();

        let mut tree = TreeBuilder::new(BufWriter::with_capacity(1 << 16, outboard));
        let mut buf = vec![0; PUT_BUFFER_BYTES];
        let mut filled = 0;
        let mut written: u64 = 0;
        loop {
            let eof = fill(&mut reader, &mut buf, &mut filled).map_err(BlobError::Input)?;
            if written.saturating_add(filled as u64) > limit {
                return Err(BlobError::QuotaExceeded {
                    tenant: tenant.to_owned(),
                    needed: written.saturating_add(filled as u64),
                    limit,
                });
            }
            if eof {
                break;
            }
            // The buffer is full and more may follow: every group but the last is known not to end the blob.
            let done = filled - GROUP_BYTES;
            for group in buf[..done].chunks(GROUP_BYTES) {
                tree.push(group).map_err(io_at(&outboard_path))?;
            }
            data.write_all(&buf[..done]).map_err(io_at(&data_path))?;
            written += done as u64;
            buf.copy_within(done..filled, 0);
            filled = GROUP_BYTES;
        }
        let last_start = filled.saturating_sub(1) / GROUP_BYTES * GROUP_BYTES;
        for group in buf[..last_start].chunks(GROUP_BYTES) {
            tree.push(group).map_err(io_at(&outboard_path))?;
        }
        let (root, mut outboard_writer) = tree
            .finish(&buf[last_start..filled])
            .map_err(io_at(&outboard_path))?;
        data.write_all(&buf[..filled]).map_err(io_at(&data_path))?;
        let size = written + filled as u64;
        outboard_writer
            .write_all(&size.to_le_bytes())
            .map_err(io_at(&outboard_path))?;
        let outboard = outboard_writer
            .into_inner()
            .map_err(|e| io_at(&outboard_path)(e.into_error()))?;
        data.as_file().sync_all().map_err(io_at(&data_path))?;
        outboard.as_file().sync_all().map_err(io_at(&outboard_path))?;
        let cid = Cid::from_digest(Codec::Raw, *root.as_bytes());

        let _guard = self.lock();
        let refs_path = self.refs_path(tenant);
        let mut refs = read_refs(&refs_path)?;
        let key = cid.to_string();
        if !refs.blobs.contains_key(&key) {
            let needed = refs.blobs.values().fold(size, |a, b| a.saturating_add(*b));
            if needed > limit {
                return Err(BlobError::QuotaExceeded {
                    tenant: tenant.to_owned(),
                    needed,
                    limit,
                });
            }
        }
        let final_data = self.data_path(&cid);
        let stored = !matches!(fs::metadata(&final_data), Ok(meta) if meta.len() == size);
        let dir = final_data.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            sync_dir(&self.blobs_dir())?;
        }
        let final_outboard = self.outboard_path(&cid);
        // The outboard first: a data file (the commit point) never exists without its outboard. Content
        // already there is replaced by identical bytes (same hash), atomically for readers.
        outboard
            .persist(&final_outboard)
            .map_err(|e| io_at(&final_outboard)(e.error))?;
        data.persist(&final_data)
            .map_err(|e| io_at(&final_data)(e.error))?;
        sync_dir(&dir)?;
        let added = refs.blobs.insert(key, size).is_none();
        if added {
            write_refs(&refs_path, &mut refs, &tmp)?;
        }
        Ok(PutResult {
            cid,
            size,
            stored,
            added,
        })
    }

    /// Writes the whole blob to `out`, checking each 16 KiB group against the id before writing it.
    ///
    /// Returns the size. On [`BlobError::CorruptBlob`] or [`BlobError::CorruptOutboard`] the bytes already
    /// written are a verified prefix of the blob; nothing unverified is ever written.
    pub fn get(&self, cid: &Cid, mut out: impl Write) -> Result<u64, BlobError> {
        let blob = self.open_blob(cid)?;
        let tree = blob.outboard.tree;
        let mut reader = BufReader::with_capacity(GET_BUFFER_BYTES, &blob.data);
        let mut stack = vec![blob.outboard.root];
        let mut buf = vec![0; GROUP_BYTES];
        let all = ChunkRanges::all();
        for item in tree.ranges_pre_order_chunks_iter_ref(&all, 0) {
            match item {
                BaoChunk::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    ..
                } => {
                    let expected = stack.pop();
                    let pair = blob.outboard.load(node).map_err(io_at(&blob.outboard_path))?;
                    let Some((l, r)) = pair.filter(|(l, r)| Some(parent_cv(l, r, is_root)) == expected)
                    else {
                        let range = node.chunk_range();
                        return Err(BlobError::CorruptOutboard {
                            cid: *cid,
                            reason: format!(
                                "hash pair for bytes {}..{} does not match",
                                range.start.to_bytes(),
                                range.end.to_bytes().min(tree.size())
                            ),
                        });
                    };
                    if right {
                        stack.push(r);
                    }
                    if left {
                        stack.push(l);
                    }
                }
                BaoChunk::Leaf {
                    start_chunk,
                    size,
                    is_root,
                    ..
                } => {
                    let group = &mut buf[..size];
                    reader.read_exact(group).map_err(io_at(&blob.data_path))?;
                    if Some(leaf_cv(start_chunk, group, is_root)) != stack.pop() {
                        let offset = start_chunk.to_bytes();
                        return Err(BlobError::CorruptBlob {
                            cid: *cid,
                            offset,
                            end: offset + size as u64,
                        });
                    }
                    out.write_all(group).map_err(BlobError::Output)?;
                }
            }
        }
        Ok(tree.size())
    }

    /// Bytes `offset..offset + len` of the blob with a proof that [`verify_range`] checks against `cid` alone.
    ///
    /// The covering groups are checked against the outboard before the proof is built, so a damaged blob or
    /// outboard is reported here rather than by the client.
    pub fn get_range(&self, cid: &Cid, offset: u64, len: u64) -> Result<RangeRead, BlobError> {
        let blob = self.open_blob(cid)?;
        let size = blob.outboard.tree.size();
        let ranges = proof_ranges(size, offset, len)?;
        let mut proof = Vec::with_capacity(PROOF_HEADER_BYTES + proof_capacity(len));
        for field in [size, offset, len] {
            proof.extend_from_slice(&field.to_le_bytes());
        }
        encode_ranges_validated(&blob.data, &blob.outboard, &ranges, &mut proof).map_err(|e| match e {
            EncodeError::LeafHashMismatch(chunk) => {
                let offset = ChunkNum::chunk_group_start(chunk, BLOCK_SIZE).to_bytes();
                BlobError::CorruptBlob {
                    cid: *cid,
                    offset,
                    end: (offset + GROUP_BYTES as u64).min(size),
                }
            }
            EncodeError::ParentHashMismatch(node) => BlobError::CorruptOutboard {
                cid: *cid,
                reason: format!(
                    "hash pair for bytes {}..{} does not match",
                    node.chunk_range().start.to_bytes(),
                    node.chunk_range().end.to_bytes().min(size)
                ),
            },
            EncodeError::Io(e) => io_at(&blob.data_path)(e),
            other => io_at(&blob.data_path)(io::Error::other(other.to_string())),
        })?;
        let mut data = vec![0; usize_of(len)?];
        blob.data
            .read_exact_at(offset, &mut data)
            .map_err(io_at(&blob.data_path))?;
        Ok(RangeRead { data, proof })
    }

    /// Whether a blob with this id is stored (its data file exists; its content is not checked).
    pub fn contains(&self, cid: &Cid) -> bool {
        cid.codec() == Codec::Raw && self.data_path(cid).is_file()
    }

    /// Bytes the tenant references: the sum of the sizes of the distinct blobs it holds.
    pub fn usage(&self, tenant: &str) -> Result<u64, BlobError> {
        check_tenant(tenant)?;
        let _guard = self.lock();
        let refs = read_refs(&self.refs_path(tenant))?;
        Ok(refs.blobs.values().fold(0, |a, b| a.saturating_add(*b)))
    }

    /// The size of a blob the tenant references, or `None` when it references no blob with this id (whether
    /// or not another tenant stored it: a tenant reads only what it holds).
    pub fn referenced_size(&self, tenant: &str, cid: &Cid) -> Result<Option<u64>, BlobError> {
        check_tenant(tenant)?;
        let _guard = self.lock();
        let refs = read_refs(&self.refs_path(tenant))?;
        Ok(refs.blobs.get(&cid.to_string()).copied())
    }

    /// Drops the tenant's reference to the blob; returns whether it had one. The blob stays until [`Self::gc`].
    pub fn release(&self, tenant: &str, cid: &Cid) -> Result<bool, BlobError> {
        check_tenant(tenant)?;
        let _guard = self.lock();
        let path = self.refs_path(tenant);
        let mut refs = read_refs(&path)?;
        if refs.blobs.remove(&cid.to_string()).is_none() {
            return Ok(false);
        }
        if refs.blobs.is_empty() {
            fs::remove_file(&path).map_err(io_at(&path))?;
        } else {
            write_refs(&path, &mut refs, &self.tmp_dir())?;
        }
        Ok(true)
    }

    /// Bytes of blob data stored, over all tenants (outboards and staging files not counted). Reads the
    /// directory without the store's lock: a put or gc running meanwhile may or may not be counted.
    pub fn stored_bytes(&self) -> Result<u64, BlobError> {
        let blobs = self.blobs_dir();
        let mut total = 0u64;
        for shard in fs::read_dir(&blobs).map_err(io_at(&blobs))? {
            let shard = shard.map_err(io_at(&blobs))?.path();
            let Ok(entries) = fs::read_dir(&shard) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_data = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.len() == 64 && !n.contains('.'));
                if let (true, Ok(meta)) = (is_data, entry.metadata()) {
                    total = total.saturating_add(meta.len());
                }
            }
        }
        Ok(total)
    }

    /// Removes every blob no tenant references, and outboards without a blob.
    pub fn gc(&self) -> Result<GcReport, BlobError> {
        let _guard = self.lock();
        let live = self.live_digests()?;
        let mut report = GcReport::default();
        let blobs = self.blobs_dir();
        for shard in fs::read_dir(&blobs).map_err(io_at(&blobs))? {
            let shard = shard.map_err(io_at(&blobs))?.path();
            if !shard.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&shard).map_err(io_at(&shard))? {
                let path = entry.map_err(io_at(&shard))?.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let (hex, is_outboard) = match name.split_once('.') {
                    None => (name, false),
                    Some((hex, OUTBOARD_SUFFIX)) => (hex, true),
                    Some(_) => continue,
                };
                if hex.len() != 64 || live.contains(hex) {
                    continue;
                }
                // A live outboard's data file exists; a dead blob's data goes before its outboard.
                if is_outboard && path.with_extension("").exists() {
                    continue;
                }
                // The listing may still name an outboard removed below with its blob.
                let Some(len) = remove_counted(&path)? else {
                    continue;
                };
                report.bytes_freed += len;
                if !is_outboard {
                    report.blobs_removed += 1;
                    let outboard = path.with_extension(OUTBOARD_SUFFIX);
                    report.bytes_freed += remove_counted(&outboard)?.unwrap_or(0);
                }
            }
        }
        Ok(report)
    }

    fn live_digests(&self) -> Result<HashSet<String>, BlobError> {
        let dir = self.refs_dir();
        let mut live = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let path = entry.map_err(io_at(&dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                for key in read_refs(&path)?.blobs.keys() {
                    let cid = parse_ref(&path, key)?;
                    live.insert(hex::encode(cid.digest()));
                }
            }
        }
        Ok(live)
    }

    fn open_blob(&self, cid: &Cid) -> Result<StoredBlob, BlobError> {
        if cid.codec() != Codec::Raw {
            return Err(BlobError::NotABlob { cid: *cid });
        }
        let data_path = self.data_path(cid);
        let data = match File::open(&data_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound { cid: *cid }),
            Err(e) => return Err(io_at(&data_path)(e)),
        };
        let outboard_path = self.outboard_path(cid);
        let outboard = File::open(&outboard_path).map_err(|e| BlobError::CorruptOutboard {
            cid: *cid,
            reason: format!("cannot open: {e}"),
        })?;
        let outboard_len = outboard.metadata().map_err(io_at(&outboard_path))?.len();
        let mut suffix = [0; 8];
        if outboard_len < 8 {
            return Err(corrupt_outboard(cid, "shorter than its size suffix"));
        }
        outboard
            .read_exact_at(outboard_len - 8, &mut suffix)
            .map_err(io_at(&outboard_path))?;
        let size = u64::from_le_bytes(suffix);
        let tree = BaoTree::new(size, BLOCK_SIZE);
        if tree.outboard_size().checked_add(8) != Some(outboard_len) {
            return Err(corrupt_outboard(cid, "length does not fit the size it records"));
        }
        let data_len = data.metadata().map_err(io_at(&data_path))?.len();
        if data_len != size {
            return Err(BlobError::CorruptBlob {
                cid: *cid,
                offset: data_len.min(size),
                end: data_len.max(size),
            });
        }
        Ok(StoredBlob {
            data,
            data_path,
            outboard: PostOrderOutboard {
                root: blake3::Hash::from(cid.digest()),
                tree,
                data: outboard,
            },
            outboard_path,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded state lives on disk and each update is atomic there, so a panicked holder left it whole.
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    fn refs_dir(&self) -> PathBuf {
        self.root.join("refs")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn refs_path(&self, tenant: &str) -> PathBuf {
        self.refs_dir().join(format!("{tenant}.json"))
    }

    fn data_path(&self, cid: &Cid) -> PathBuf {
        let hex = hex::encode(cid.digest());
        self.blobs_dir().join(&hex[..2]).join(hex)
    }

    fn outboard_path(&self, cid: &Cid) -> PathBuf {
        self.data_path(cid).with_extension(OUTBOARD_SUFFIX)
    }
}

/// Checks a range proof from [`BlobStore::get_range`] against the blob id and returns the proven bytes,
/// exactly `len` of them starting at `offset`.
///
/// The proof must be for this very range, carry exactly the hashes and chunks that the range and the
/// blob's last chunk need, and nothing after them. The last chunk is always included so that the blob size
/// in the header is proven too; a range beyond that size fails with [`BlobError::RangeOutOfBounds`].
pub fn verify_range(cid: &Cid, offset: u64, len: u64, proof: &[u8]) -> Result<Vec<u8>, BlobError> {
    if cid.codec() != Codec::Raw {
        return Err(BlobError::NotABlob { cid: *cid });
    }
    let Some((header, mut encoded)) = proof.split_first_chunk::<PROOF_HEADER_BYTES>() else {
        return Err(invalid_proof("shorter than its header".into()));
    };
    let field = |i: usize| {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&header[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    let (size, proven_offset, proven_len) = (field(0), field(1), field(2));
    if (proven_offset, proven_len) != (offset, len) {
        return Err(invalid_proof(format!(
            "it is for range {proven_offset}+{proven_len}, not {offset}+{len}"
        )));
    }
    let ranges = proof_ranges(size, offset, len)?;
    // The encoding carries every byte of the range, so a shorter proof is refused before allocating for it.
    if (encoded.len() as u64) < len {
        return Err(invalid_proof(format!(
            "{} bytes cannot carry {len}",
            encoded.len()
        )));
    }
    let mut data = vec![0; usize_of(len)?];
    let root = blake3::Hash::from(cid.digest());
    let tree = BaoTree::new(size, BLOCK_SIZE);
    for item in DecodeResponseIter::new(root, tree, &mut encoded, &ranges) {
        let item = item.map_err(|e| invalid_proof(decode_reason(&e)))?;
        if let BaoContentItem::Leaf(leaf) = item {
            copy_overlap(&mut data, offset, leaf.offset, &leaf.data);
        }
    }
    if !encoded.is_empty() {
        return Err(invalid_proof(format!("{} bytes after its end", encoded.len())));
    }
    Ok(data)
}

/// The chunks a proof for `offset..offset + len` carries: those covering the range, and the last chunk.
fn proof_ranges(size: u64, offset: u64, len: u64) -> Result<ChunkRanges, BlobError> {
    let end = offset
        .checked_add(len)
        .filter(|end| *end <= size)
        .ok_or(BlobError::RangeOutOfBounds { offset, len, size })?;
    let last = ChunkNum::chunks(size).0.max(1) - 1;
    let mut ranges = round_up_to_chunks(&ByteRanges::from(offset..end));
    ranges |= ChunkRanges::from(ChunkNum(last)..ChunkNum(last + 1));
    Ok(ranges)
}

/// Copies the part of `chunk` (which starts at `chunk_offset` in the blob) that falls in the window.
fn copy_overlap(window: &mut [u8], window_offset: u64, chunk_offset: u64, chunk: &[u8]) {
    let window_end = window_offset + window.len() as u64;
    let start = chunk_offset.max(window_offset);
    let end = (chunk_offset + chunk.len() as u64).min(window_end);
    if start < end {
        // All four offsets are within `window` or `chunk`, both in memory, so they fit usize.
        let (w, c, n) = (
            (start - window_offset) as usize,
            (start - chunk_offset) as usize,
            (end - start) as usize,
        );
        window[w..w + n].copy_from_slice(&chunk[c..c + n]);
    }
}

fn decode_reason(e: &DecodeError) -> String {
    match e {
        DecodeError::ParentNotFound(node) => format!(
            "ends before the hash pair for chunks {}..",
            node.chunk_range().start.0
        ),
        DecodeError::LeafNotFound(chunk) => format!("ends before the data at byte {}", chunk.to_bytes()),
        DecodeError::ParentHashMismatch(node) => format!(
            "hash pair for chunks {}..{} does not match",
            node.chunk_range().start.0,
            node.chunk_range().end.0
        ),
        DecodeError::LeafHashMismatch(chunk) => {
            format!("data at byte {} does not match", chunk.to_bytes())
        }
        DecodeError::Io(e) => e.to_string(),
    }
}

/// Upper bound of a proof's encoding for `len` bytes, for one allocation: the data, two extra chunk groups
/// at the edges, and hash pairs for two root-to-leaf paths.
fn proof_capacity(len: u64) -> usize {
    usize::try_from(len)
        .unwrap_or(usize::MAX)
        .saturating_add(3 * GROUP_BYTES + 2 * 64 * 64)
        .min(1 << 30)
}

/// Builds the post-order outboard of a stream in one pass, a chunk group at a time.
///
/// A group is pushed only once it is known not to be the last, so completed subtrees can be merged at once
/// as non-root nodes; merges happen, and their hash pairs are written, in post order (`bao-tree`'s layout).
struct TreeBuilder<W> {
    /// Chaining values of the completed subtrees not yet merged, largest first.
    stack: Vec<ChainingValue>,
    groups: u64,
    out: W,
}

impl<W: Write> TreeBuilder<W> {
    fn new(out: W) -> Self {
        Self {
            stack: Vec::new(),
            groups: 0,
            out,
        }
    }

    /// Adds a full group that is not the last.
    fn push(&mut self, group: &[u8]) -> io::Result<()> {
        let mut cv = group_cv(self.groups, group);
        self.groups += 1;
        let mut completed = self.groups;
        while completed & 1 == 0 {
            let Some(left) = self.stack.pop() else { break };
            self.out.write_all(&left)?;
            self.out.write_all(&cv)?;
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            completed >>= 1;
        }
        self.stack.push(cv);
        Ok(())
    }

    /// Adds the last group (possibly partial or, for the empty blob, empty) and returns the root hash.
    fn finish(mut self, last: &[u8]) -> io::Result<(blake3::Hash, W)> {
        if self.groups == 0 {
            return Ok((blake3::hash(last), self.out));
        }
        let mut right = group_cv(self.groups, last);
        while let Some(left) = self.stack.pop() {
            self.out.write_all(&left)?;
            self.out.write_all(&right)?;
            if self.stack.is_empty() {
                return Ok((merge_subtrees_root(&left, &right, Mode::Hash), self.out));
            }
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        unreachable!("the stack held at least one subtree")
    }
}

/// Non-root chaining value of group `index`.
fn group_cv(index: u64, group: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(index * GROUP_BYTES as u64);
    hasher.update(group);
    hasher.finalize_non_root()
}

fn leaf_cv(start_chunk: ChunkNum, data: &[u8], is_root: bool) -> blake3::Hash {
    if is_root {
        blake3::hash(data)
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(start_chunk.to_bytes());
        hasher.update(data);
        blake3::Hash::from(hasher.finalize_non_root())
    }
}

fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    if is_root {
        merge_subtrees_root(left.as_bytes(), right.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            left.as_bytes(),
            right.as_bytes(),
            Mode::Hash,
        ))
    }
}

/// Reads until `buf` is full or the input ends; returns whether it ended.
fn fill(reader: &mut impl Read, buf: &mut [u8], filled: &mut usize) -> io::Result<bool> {
    while *filled < buf.len() {
        match reader.read(&mut buf[*filled..]) {
            Ok(0) => return Ok(true),
            Ok(n) => *filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

struct StoredBlob {
    data: File,
    data_path: PathBuf,
    outboard: PostOrderOutboard<File>,
    outboard_path: PathBuf,
}

fn check_tenant(tenant: &str) -> Result<(), BlobError> {
    let ok = !tenant.is_empty()
        && tenant.len() <= MAX_TENANT_LEN
        && !tenant.starts_with('.')
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidTenant {
            tenant: tenant.to_owned(),
        })
    }
}

fn read_refs(path: &Path) -> Result<RefsState, BlobError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(RefsState {
                format: REFS_FORMAT.into(),
                blobs: BTreeMap::new(),
            })
        }
        Err(e) => return Err(io_at(path)(e)),
    };
    let refs: RefsState = serde_json::from_slice(&text).map_err(|e| BlobError::CorruptRefs {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if refs.format != REFS_FORMAT {
        return Err(BlobError::CorruptRefs {
            path: path.to_path_buf(),
            reason: format!("format {:?} is not {REFS_FORMAT:?}", refs.format),
        });
    }
    for key in refs.blobs.keys() {
        parse_ref(path, key)?;
    }
    Ok(refs)
}

fn parse_ref(path: &Path, key: &str) -> Result<Cid, BlobError> {
    Cid::from_str(key)
        .ok()
        .filter(|cid| cid.codec() == Codec::Raw)
        .ok_or_else(|| BlobError::CorruptRefs {
            path: path.to_path_buf(),
            reason: format!("{key:?} is not a blob id"),
        })
}

fn write_refs(path: &Path, refs: &mut RefsState, tmp: &Path) -> Result<(), BlobError> {
    refs.format = REFS_FORMAT.into();
    let mut text = serde_json::to_vec_pretty(refs).map_err(|e| io_at(path)(io::Error::other(e)))?;
    text.push(b'\n');
    let mut file = tempfile::Builder::new()
        .prefix("refs-")
        .tempfile_in(tmp)
        .map_err(io_at(tmp))?;
    file.write_all(&text).map_err(io_at(path))?;
    file.as_file().sync_all().map_err(io_at(path))?;
    file.persist(path).map_err(|e| io_at(path)(e.error))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes a file and returns its length, or `None` if it was already gone.
fn remove_counted(path: &Path) -> Result<Option<u64>, BlobError> {
    let len = match fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(path)(e)),
    };
    match fs::remove_file(path) {
        Ok(()) => Ok(Some(len)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt_outboard(cid: &Cid, reason: &str) -> BlobError {
    BlobError::CorruptOutboard {
        cid: *cid,
        reason: reason.into(),
    }
}

fn invalid_proof(reason: String) -> BlobError {
    BlobError::InvalidProof { reason }
}

fn usize_of(len: u64) -> Result<usize, BlobError> {
    usize::try_from(len).map_err(|_| BlobError::RangeOutOfBounds {
        offset: 0,
        len,
        size: usize::MAX as u64,
    })
}

#[cfg(test)]
mod tests {
    use bao_tree::io::sync::outboard_post_order;

    use super::*;

    fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
        let mut data = vec![0; len];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut data);
        data
    }

    fn build(data: &[u8]) -> (blake3::Hash, Vec<u8>) {
        let mut tree = TreeBuilder::new(Vec::new());
        let last_start = data.len().saturating_sub(1) / GROUP_BYTES * GROUP_BYTES;
        for group in data[..last_start].chunks(GROUP_BYTES) {
            tree.push(group).unwrap();
        }
        tree.finish(&data[last_start..]).unwrap()
    }

    #[test]
    fn test_tree_builder_matches_bao_tree_and_blake3_for_every_shape() {
        let data = pseudo_random(40 * GROUP_BYTES + 3000, 1);
        let mut sizes = vec![0, 1, 1023, 1024, 1025, 2048, 4095];
        for groups in 1..=40 {
            let edge = groups * GROUP_BYTES;
            sizes.extend([edge - 1, edge, edge + 1, edge + 1024]);
        }
        for size in sizes {
            let data = &data[..size];
            let (root, outboard) = build(data);
            assert_eq!(root, blake3::hash(data), "size {size}");
            let tree = BaoTree::new(size as u64, BLOCK_SIZE);
            let mut expected = Vec::new();
            let expected_root = outboard_post_order(data, tree, &mut expected).unwrap();
            assert_eq!(root, expected_root, "size {size}");
            assert_eq!(outboard, expected, "size {size}");
            assert_eq!(outboard.len() as u64, tree.outboard_size(), "size {size}");
        }
    }

    #[test]
    fn test_proof_ranges_always_include_the_last_chunk() {
        let ranges = proof_ranges(10_000, 0, 10).unwrap();
        assert_eq!(
            ranges,
            ChunkRanges::from(ChunkNum(0)..ChunkNum(1)) | ChunkRanges::from(ChunkNum(9)..ChunkNum(10))
        );
        assert_eq!(
            proof_ranges(0, 0, 0).unwrap(),
            ChunkRanges::from(ChunkNum(0)..ChunkNum(1))
        );
        assert_eq!(proof_ranges(10, 5, 6).unwrap_err().kind(), "range_out_of_bounds");
        assert_eq!(
            proof_ranges(10, u64::MAX, 2).unwrap_err().kind(),
            "range_out_of_bounds"
        );
    }

    #[test]
    fn test_copy_overlap_clips_to_the_window() {
        let mut window = [0u8; 4];
        copy_overlap(&mut window, 10, 8, &[1, 2, 3, 4, 5]);
        assert_eq!(window, [3, 4, 5, 0]);
        copy_overlap(&mut window, 10, 13, &[9, 9]);
        assert_eq!(window, [3, 4, 5, 9]);
        copy_overlap(&mut window, 10, 100, &[7]);
        assert_eq!(window, [3, 4, 5, 9]);
    }

    #[test]
    fn test_check_tenant_refuses_paths() {
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert_eq!(check_tenant(bad).unwrap_err().kind(), "invalid_tenant", "{bad:?}");
        }
        for good in ["team-a", "t.1_x", "A"] {
            check_tenant(good).unwrap();
        }
    }
}
