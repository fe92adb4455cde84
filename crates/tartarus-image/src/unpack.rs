//! Unpacking one OCI / Docker image layer into a directory that overlayfs can use directly as a read-only lower
//! layer (mounted with `userxattr` inside the sandbox's user namespace).
//!
//! The layer is untrusted: it comes from an arbitrary registry. The `tar` crate only *parses* the stream
//! (headers, GNU long names, pax extensions); every filesystem write happens here, through rustix, relative to
//! directory file descriptors:
//!
//! - the target directory is opened once; every parent directory is opened with `openat2` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, missing parents are created one component
//!   at a time, and the final component is created with `*at` calls that never follow a symlink;
//! - paths lose a leading `/` and `.` components, and any `..` component is refused, so nothing is ever written
//!   outside the target, whatever symlinks earlier entries planted;
//! - OCI whiteouts become overlayfs whiteouts (`.wh.NAME` → character device 0:0, `.wh..wh..opq` →
//!   `user.overlay.opaque=y`);
//! - setuid/setgid bits are stripped, device nodes are skipped, and only `user.*` xattrs survive (never
//!   `user.overlay.*`, which would let an image forge overlay metadata);
//! - the entry count and the regular-file bytes are capped against tar bombs, and so are the headers of
//!   each entry (GNU long names, pax extensions, sparse maps), which `tar` reads into memory whole.
//!
//! On error the target is left half-written: the caller (the layer store) unpacks into a temporary directory
//! and deletes it on failure. Requires Linux 5.6+ for `openat2`.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use tar::{Archive, Entry, EntryType};

/// Ids a sandbox's user namespace maps (0..65536); a tar id outside it cannot be shifted.
const ID_RANGE: u64 = 65_536;
/// Prefix of OCI whiteout names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of the OCI special whiteout names, of which only the opaque marker is defined.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// OCI opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The xattr overlayfs reads, with `userxattr`, to make a directory opaque.
const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Pax key prefix for extended attributes (the GNU tar / star convention).
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Mode of directories created for parents the layer does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Permission bits kept from the tar header: setuid and setgid are stripped, sticky is kept.
const KEPT_MODE_BITS: u32 = 0o1777;
/// Longest relative path accepted (`PATH_MAX` less the terminating NUL).
const MAX_PATH_LEN: usize = 4095;
/// Copy buffer for regular-file contents.
const COPY_BUF_LEN: usize = 64 * 1024;
/// How often an `openat2` that failed with `EAGAIN` (a concurrent rename somewhere) is retried.
const OPENAT2_RETRIES: usize = 8;
/// Most bytes `tar` may read for one entry's headers: its GNU long name and long link, pax extensions
/// and sparse map, which it keeps in memory whole, plus the padding of the entry before. A path needs
/// 4 KiB and a few xattrs some more; without a cap, a declared size and a compressed run of zeros would
/// fill the supervisor's memory.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (possibly several concatenated members).
    Gzip,
    /// zstd (possibly several concatenated frames).
    Zstd,
}

impl Compression {
    /// The compression of a layer from its OCI or Docker media type.
    ///
    /// Accepts the OCI `application/vnd.oci.image.layer.v1.tar[+gzip|+zstd]` types, their deprecated
    /// `nondistributable` twins, and Docker's `application/vnd.docker.image.rootfs.diff.tar.gzip` and
    /// `…rootfs.foreign.diff.tar.gzip` (foreign layers are ordinary gzip tars; whether to fetch them at all is
    /// the puller's decision). Anything else, e.g. an encrypted layer or a config blob, is an `Err` naming it.
    pub fn from_media_type(media_type: &str) -> Result<Compression, String> {
        // Parameters (`; charset=…`) are not part of the type.
        let essence = media_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
            _ => Err(format!("unsupported layer media type {media_type:?}")),
        }
    }
}

/// How to unpack a layer.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// When `Some(base)`: chown every entry to (tar uid + base, tar gid + base) — used when the supervisor is
    /// root and the sandbox's user namespace maps ids 0..65536 to base..base+65536; ids >= 65536 in the tar
    /// are an error, and parent directories the tar does not list belong to (base, base). When `None`:
    /// nothing is chowned (rootless; everything stays owned by the caller).
    pub id_shift: Option<u32>,
    /// Refuse the layer once its unpacked regular-file bytes exceed this (tar bomb guard).
    pub max_bytes: u64,
    /// Refuse the layer past this many entries (pax and GNU long-name headers are not entries).
    pub max_entries: u64,
}

/// What unpacking a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnpackStats {
    /// Tar entries seen, including skipped ones.
    pub entries: u64,
    /// Regular-file bytes written.
    pub bytes: u64,
    /// Whiteouts and opaque markers turned into their overlayfs form.
    pub whiteouts: u64,
    /// Character and block device entries skipped.
    pub skipped_devices: u64,
}

/// Why a layer could not be unpacked. `path` is the entry's name as the tar spells it.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The target directory could not be opened.
    #[error("cannot open the target directory {}", path.display())]
    Target {
        /// The target given to [`unpack_layer`].
        path: PathBuf,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// The stream is not a valid (compressed) tar.
    #[error("cannot read the layer stream")]
    Stream(#[source] io::Error),
    /// The entry's path has a `..` component.
    #[error("entry {path:?} escapes the layer")]
    Escapes {
        /// The entry.
        path: String,
    },
    /// A hard link's target has a `..` component.
    #[error("entry {path:?} is a hard link to {target:?}, which escapes the layer")]
    LinkEscapes {
        /// The entry.
        path: String,
        /// The link target as the tar spells it.
        target: String,
    },
    /// A parent directory of the entry (or of its hard link target) is a symlink.
    #[error("entry {path:?} goes through a symlink in {through:?}")]
    ThroughSymlink {
        /// The entry.
        path: String,
        /// The directory path that contains a symlink.
        through: String,
    },
    /// The entry is well-formed tar but not acceptable in a layer.
    #[error("entry {path:?}: {reason}")]
    Refused {
        /// The entry.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The entry would take the layer's regular-file bytes past [`UnpackOptions::max_bytes`].
    #[error("entry {path:?} takes the layer past its limit of {limit} bytes")]
    TooManyBytes {
        /// The entry.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// An entry's headers (long names, pax extensions, sparse map) take more than [`MAX_HEADER_BYTES`].
    #[error("an entry's headers (long names, pax extensions) take more than {limit} bytes")]
    HeadersTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The entry is one past [`UnpackOptions::max_entries`].
    #[error("entry {path:?} takes the layer past its limit of {limit} entries")]
    TooManyEntries {
        /// The entry.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// A filesystem operation for the entry failed.
    #[error("entry {path:?}: cannot {op}")]
    Io {
        /// The entry.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Unpacks one layer from `reader` into `target`, which must be an existing, empty directory.
///
/// Nothing is written outside `target`. On error `target` holds a partial layer that the caller must delete.
/// Data after the tar end-of-archive marker is not read, so a caller that checks the blob's digest must hash
/// the compressed stream itself.
pub fn unpack_layer(
    reader: impl Read,
    compression: Compression,
    target: &Path,
    options: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let root = rfs::open(
        target,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Target {
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    let unpacker = Unpacker {
        root,
        options,
        stats: UnpackStats::default(),
        dirs: BTreeMap::new(),
        buf: vec![0; COPY_BUF_LEN],
    };
    match compression {
        Compression::None => unpacker.run(reader),
        Compression::Gzip => unpacker.run(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(reader).map_err(UnpackError::Stream)?;
            unpacker.run(decoder)
        }
    }
}

/// Metadata of one entry, taken from its header and pax extensions.
struct Meta {
    /// Permission bits, setuid/setgid already stripped.
    mode: u32,
    /// Shifted owner, when [`UnpackOptions::id_shift`] is set.
    owner: Option<(Uid, Gid)>,
    mtime: Timespec,
    /// `user.*` xattrs to set (regular files and directories only: the kernel refuses `user.*` elsewhere).
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Directory metadata applied after every entry is written, so that a read-only directory does not block
/// its children and creating children does not bump its mtime.
struct DeferredDir {
    mode: u32,
    mtime: Timespec,
}

/// One unpack in progress.
struct Unpacker<'o> {
    root: OwnedFd,
    options: &'o UnpackOptions,
    stats: UnpackStats,
    /// Directories listed by the layer, by sanitized path.
    dirs: BTreeMap<PathBuf, DeferredDir>,
    buf: Vec<u8>,
}

/// What is wrong with a path from the tar.
enum PathProblem {
    Escapes,
    Nul,
    TooLong,
}

/// The layer-relative form of a tar path: no leading `/`, no empty or `.` components; `..` is refused.
/// The empty path is the layer root.
fn sanitize(raw: &[u8]) -> Result<PathBuf, PathProblem> {
    if raw.contains(&0) {
        return Err(PathProblem::Nul);
    }
    let mut out = PathBuf::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(PathProblem::Escapes),
            name => out.push(OsStr::from_bytes(name)),
        }
    }
    if out.as_os_str().len() > MAX_PATH_LEN {
        return Err(PathProblem::TooLong);
    }
    Ok(out)
}

/// Splits a non-empty sanitized path into its parent and final component.
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent()?, rel.file_name()?))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses a pax time (`[-]SECONDS[.FRACTION]`).
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut tv_sec: i64 = secs.parse().ok()?;
    let mut tv_nsec: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        tv_nsec += i64::from(digit - b'0') * 10_i64.pow(8 - i as u32);
    }
    if negative {
        tv_sec = -tv_sec;
        if tv_nsec > 0 {
            tv_sec -= 1;
            tv_nsec = 1_000_000_000 - tv_nsec;
        }
    }
    Some(Timespec { tv_sec, tv_nsec })
}

/// Removes the directory `name` in `parent` with everything under it, never following a symlink.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<()> {
    let dir = rfs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Read every name before unlinking anything so the directory stream is not disturbed.
    let mut children = Vec::new();
    for child in rfs::Dir::read_from(&dir)? {
        let child = child?;
        let child = child.file_name().to_bytes();
        if child != b"." && child != b".." {
            children.push(OsString::from_vec(child.to_vec()));
        }
    }
    for child in children {
        match rfs::unlinkat(&dir, &child, AtFlags::empty()) {
            Err(Errno::ISDIR) => remove_tree(dir.as_fd(), &child)?,
            other => other?,
        }
    }
    rfs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// Opens the directory `path` beneath `dirfd` without following any symlink or leaving `dirfd`.
fn open_beneath(dirfd: BorrowedFd<'_>, path: &Path) -> rustix::io::Result<OwnedFd> {
    let path: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let mut attempts = 0;
    loop {
        let opened = rfs::openat2(
            dirfd,
            path,
            // Not O_NOFOLLOW: with O_DIRECTORY it turns a trailing symlink into ENOTDIR, while
            // RESOLVE_NO_SYMLINKS already refuses it (and any other) with ELOOP.
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        );
        match opened {
            Err(Errno::AGAIN) if attempts < OPENAT2_RETRIES => attempts += 1,
            other => return other,
        }
    }
}

/// How much the stream may still give before the next entry is returned; `None` while an entry's data
/// is read (that has limits of its own).
#[derive(Debug, Default)]
struct HeaderBudget {
    left: Cell<Option<u64>>,
    exceeded: Cell<bool>,
}

/// The layer stream as `tar` reads it, refusing to go past the [`HeaderBudget`].
struct Budgeted<R> {
    inner: R,
    budget: Rc<HeaderBudget>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.budget.left.get() else {
            return self.inner.read(buf);
        };
        if left == 0 && !buf.is_empty() {
            self.budget.exceeded.set(true);
            return Err(io::Error::other("entry headers over the limit"));
        }
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..len])?;
        self.budget.left.set(Some(left - read as u64));
        Ok(read)
    }
}

impl Unpacker<'_> {
    fn run<R: Read>(mut self, reader: R) -> Result<UnpackStats, UnpackError> {
        let budget = Rc::new(HeaderBudget::default());
        let mut archive = Archive::new(Budgeted {
            inner: reader,
            budget: Rc::clone(&budget),
        });
        let mut entries = archive.entries().map_err(UnpackError::Stream)?;
        loop {
            // What `tar` reads from here to the next entry is that entry's headers, kept in memory.
            budget.left.set(Some(MAX_HEADER_BYTES));
            let next = entries.next();
            budget.left.set(None);
            let Some(entry) = next else { break };
            let mut entry = entry.map_err(|e| match budget.exceeded.get() {
                true => UnpackError::HeadersTooLarge {
                    limit: MAX_HEADER_BYTES,
                },
                false => UnpackError::Stream(e),
            })?;
            self.entry(&mut entry)?;
            // Data the entry left unread (a skipped type, a link with a size) is skipped here, not inside
            // the next entry's budget.
            io::copy(&mut entry, &mut io::sink()).map_err(UnpackError::Stream)?;
        }
        self.apply_deferred_dirs()?;
        Ok(self.stats)
    }

    fn entry<R: Read>(&mut self, entry: &mut Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = lossy(&raw_path);

        self.stats.entries += 1;
        if self.stats.entries > self.options.max_entries {
            return Err(UnpackError::TooManyEntries {
                path: shown,
                limit: self.options.max_entries,
            });
        }

        let mut kind = entry.header().entry_type();
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo
            | EntryType::Char
            | EntryType::Block => {}
            other => {
                tracing::debug!(path = %shown, kind = ?other, "skipping layer entry of unsupported type");
                return Ok(());
            }
        }
        // Pre-POSIX tars mark directories only by a trailing slash.
        if kind == EntryType::Regular && raw_path.ends_with(b"/") {
            kind = EntryType::Directory;
        }

        let rel = self.sanitized(&raw_path, &shown)?;

        // A whiteout is recognised by its name whatever its type, like Docker and containerd do.
        if let Some(name) = rel.file_name() {
            if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                return self.whiteout(&rel, &shown);
            }
        }

        if matches!(kind, EntryType::Char | EntryType::Block) {
            self.stats.skipped_devices += 1;
            tracing::debug!(path = %shown, kind = ?kind, "skipping device node in layer");
            return Ok(());
        }

        let meta = self.meta(entry, &shown)?;

        if kind == EntryType::Directory {
            return self.directory(&rel, meta, &shown);
        }
        if rel.as_os_str().is_empty() {
            return Err(refused(&shown, "a non-directory cannot replace the layer root"));
        }
        match kind {
            EntryType::Symlink => {
                let target = match entry.link_name_bytes() {
                    Some(target) if !target.is_empty() => target.into_owned(),
                    _ => return Err(refused(&shown, "symlink without a target")),
                };
                self.symlink(&rel, &target, meta, &shown)
            }
            EntryType::Link => {
                let target = match entry.link_name_bytes() {
                    Some(target) if !target.is_empty() => target.into_owned(),
                    _ => return Err(refused(&shown, "hard link without a target")),
                };
                self.hard_link(&rel, &target, &shown)
            }
            EntryType::Fifo => self.fifo(&rel, meta, &shown),
            _ => self.regular(&rel, entry, meta, &shown),
        }
    }

    fn sanitized(&self, raw: &[u8], shown: &str) -> Result<PathBuf, UnpackError> {
        sanitize(raw).map_err(|problem| match problem {
            PathProblem::Escapes => UnpackError::Escapes {
                path: shown.to_owned(),
            },
            PathProblem::Nul => refused(shown, "path contains a NUL byte"),
            PathProblem::TooLong => refused(shown, "path is longer than PATH_MAX"),
        })
    }

    /// Reads mode, owner, mtime and xattrs from the entry's header and pax extensions.
    fn meta<R: Read>(&self, entry: &mut Entry<'_, R>, shown: &str) -> Result<Meta, UnpackError> {
        let header = entry.header();
        let malformed = |e: io::Error| refused(shown, &format!("malformed header: {e}"));
        let mode = header.mode().map_err(malformed)? & KEPT_MODE_BITS;
        let owner = match self.options.id_shift {
            None => None,
            Some(base) => {
                let uid = shift_id(header.uid().map_err(malformed)?, base, "uid", shown)?;
                let gid = shift_id(header.gid().map_err(malformed)?, base, "gid", shown)?;
                Some((Uid::from_raw(uid), Gid::from_raw(gid)))
            }
        };
        let mut mtime = Timespec {
            tv_sec: i64::try_from(header.mtime().map_err(malformed)?).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };

        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(UnpackError::Stream)? {
            for extension in extensions {
                let extension =
                    extension.map_err(|e| refused(shown, &format!("malformed pax header: {e}")))?;
                let key = extension.key_bytes();
                if key == b"mtime" {
                    mtime = parse_pax_time(extension.value_bytes())
                        .ok_or_else(|| refused(shown, "malformed pax mtime"))?;
                    continue;
                }
                let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) else {
                    continue;
                };
                if name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.") {
                    return Err(refused(
                        shown,
                        &format!("carries overlay metadata xattr {:?}", lossy(name)),
                    ));
                }
                if name.starts_with(b"user.") {
                    xattrs.push((
                        OsString::from_vec(name.to_vec()),
                        extension.value_bytes().to_vec(),
                    ));
                } else {
                    // security.capability would grant file capabilities, trusted.* and system.* (ACLs) are
                    // the host's business; none of them belongs in an unprivileged lower layer.
                    tracing::debug!(path = %shown, xattr = %lossy(name), "ignoring non-user xattr in layer");
                }
            }
        }
        Ok(Meta {
            mode,
            owner,
            mtime,
            xattrs,
        })
    }

    /// Opens the directory `rel` beneath the target, creating missing components (mode 0755) when `create`.
    /// `shown` names the entry in errors.
    fn open_dir(&self, rel: &Path, create: bool, shown: &str) -> Result<OwnedFd, UnpackError> {
        match open_beneath(self.root.as_fd(), rel) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) if create => {}
            Err(e) => return Err(resolve_error(e, rel, shown)),
        }
        let mut current =
            open_beneath(self.root.as_fd(), Path::new("")).map_err(|e| resolve_error(e, rel, shown))?;
        let mut walked = PathBuf::new();
        for component in rel.iter() {
            walked.push(component);
            let next = match open_beneath(current.as_fd(), Path::new(component)) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => self.create_implicit_dir(current.as_fd(), component, &walked, shown)?,
                Err(e) => return Err(resolve_error(e, &walked, shown)),
            };
            current = next;
        }
        Ok(current)
    }

    /// Creates a parent directory the layer does not list and opens it.
    fn create_implicit_dir(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        walked: &Path,
        shown: &str,
    ) -> Result<OwnedFd, UnpackError> {
        let created = match rfs::mkdirat(parent, name, Mode::from_raw_mode(IMPLICIT_DIR_MODE)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(io_error(shown, "create a parent directory", e)),
        };
        let fd = open_beneath(parent, Path::new(name)).map_err(|e| resolve_error(e, walked, shown))?;
        if created {
            // The umask must not decide the mode; container root owns what the layer leaves implicit.
            rfs::fchmod(&fd, Mode::from_raw_mode(IMPLICIT_DIR_MODE))
                .map_err(|e| io_error(shown, "set a parent directory's mode", e))?;
            if let Some(base) = self.options.id_shift {
                rfs::fchown(&fd, Some(Uid::from_raw(base)), Some(Gid::from_raw(base)))
                    .map_err(|e| io_error(shown, "chown a parent directory", e))?;
            }
        }
        Ok(fd)
    }

    /// Makes room for a new entry `name` in `parent`: an old non-directory is unlinked, an old directory is
    /// removed recursively unless `keep_dir`. Returns whether a directory was kept.
    fn clear_slot(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        keep_dir: bool,
        shown: &str,
    ) -> Result<bool, UnpackError> {
        let stat = match rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(io_error(shown, "inspect the entry it replaces", e)),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if keep_dir {
                return Ok(true);
            }
            remove_tree(parent, name).map_err(|e| io_error(shown, "remove the directory it replaces", e))?;
            self.dirs.retain(|dir, _| !dir.starts_with(rel));
        } else {
            rfs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| io_error(shown, "remove the entry it replaces", e))?;
        }
        Ok(false)
    }

    fn directory(&mut self, rel: &Path, meta: Meta, shown: &str) -> Result<(), UnpackError> {
        let Some((parent_rel, name)) = split(rel) else {
            // The store owns the layer root's metadata.
            tracing::debug!(path = %shown, "ignoring layer root entry");
            return Ok(());
        };
        let parent = self.open_dir(parent_rel, true, shown)?;
        if !self.clear_slot(parent.as_fd(), name, rel, true, shown)? {
            rfs::mkdirat(&parent, name, Mode::from_raw_mode(IMPLICIT_DIR_MODE))
                .map_err(|e| io_error(shown, "create the directory", e))?;
        }
        let dir = open_beneath(parent.as_fd(), Path::new(name)).map_err(|e| resolve_error(e, rel, shown))?;
        if let Some((uid, gid)) = meta.owner {
            rfs::fchown(&dir, Some(uid), Some(gid)).map_err(|e| io_error(shown, "chown the directory", e))?;
        }
        set_xattrs(dir.as_fd(), &meta.xattrs, shown)?;
        self.dirs.insert(
            rel.to_path_buf(),
            DeferredDir {
                mode: meta.mode,
                mtime: meta.mtime,
            },
        );
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        rel: &Path,
        entry: &mut Entry<'_, R>,
        meta: Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let limit = self.options.max_bytes;
        if self.stats.bytes.saturating_add(entry.size()) > limit {
            return Err(UnpackError::TooManyBytes {
                path: shown.to_owned(),
                limit,
            });
        }
        let (parent_rel, name) = split(rel).ok_or_else(|| refused(shown, "no file name"))?;
        let parent = self.open_dir(parent_rel, true, shown)?;
        self.clear_slot(parent.as_fd(), name, rel, false, shown)?;
        let fd = rfs::openat(
            &parent,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_error(shown, "create the file", e))?;
        // Owned by the sandbox's ids before any byte is written: a layer cut short leaves no content of
        // its own owned by the host's root.
        if let Some((uid, gid)) = meta.owner {
            rfs::fchown(&fd, Some(uid), Some(gid)).map_err(|e| io_error(shown, "chown the file", e))?;
        }
        let mut file = std::fs::File::from(fd);
        copy_limited(entry, &mut file, &mut self.buf, &mut self.stats.bytes, limit).map_err(|e| match e {
            CopyError::Limit => UnpackError::TooManyBytes {
                path: shown.to_owned(),
                limit,
            },
            CopyError::Read(source) => UnpackError::Io {
                path: shown.to_owned(),
                op: "read its content from the layer",
                source,
            },
            CopyError::Write(source) => UnpackError::Io {
                path: shown.to_owned(),
                op: "write the file",
                source,
            },
        })?;
        set_xattrs(file.as_fd(), &meta.xattrs, shown)?;
        apply_fd_meta(file.as_fd(), &meta, shown)
    }

    fn symlink(&mut self, rel: &Path, target: &[u8], meta: Meta, shown: &str) -> Result<(), UnpackError> {
        let (parent_rel, name) = split(rel).ok_or_else(|| refused(shown, "no file name"))?;
        let parent = self.open_dir(parent_rel, true, shown)?;
        self.clear_slot(parent.as_fd(), name, rel, false, shown)?;
        // The link text is kept verbatim: it is only ever resolved inside the sandbox's root.
        rfs::symlinkat(OsStr::from_bytes(target), &parent, name)
            .map_err(|e| io_error(shown, "create the symlink", e))?;
        if let Some((uid, gid)) = meta.owner {
            rfs::chownat(&parent, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_error(shown, "chown the symlink", e))?;
        }
        if !meta.xattrs.is_empty() {
            tracing::debug!(path = %shown, "ignoring xattrs on a symlink");
        }
        rfs::utimensat(&parent, name, &timestamps(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_error(shown, "set the symlink's mtime", e))
    }

    fn hard_link(&mut self, rel: &Path, raw_target: &[u8], shown: &str) -> Result<(), UnpackError> {
        let target_shown = lossy(raw_target);
        let target = sanitize(raw_target).map_err(|problem| match problem {
            PathProblem::Escapes => UnpackError::LinkEscapes {
                path: shown.to_owned(),
                target: target_shown.clone(),
            },
            PathProblem::Nul | PathProblem::TooLong => refused(shown, "malformed hard link target"),
        })?;
        let Some((target_parent_rel, target_name)) = split(&target) else {
            return Err(refused(shown, "hard link to the layer root"));
        };
        if target == rel {
            tracing::debug!(path = %shown, "ignoring hard link to itself");
            return Ok(());
        }
        let (parent_rel, name) = split(rel).ok_or_else(|| refused(shown, "no file name"))?;
        let target_parent = self.open_dir(target_parent_rel, false, shown)?;
        let parent = self.open_dir(parent_rel, true, shown)?;
        self.clear_slot(parent.as_fd(), name, rel, false, shown)?;
        // Without AT_SYMLINK_FOLLOW a symlink target is linked itself, never what it points to.
        rfs::linkat(&target_parent, target_name, &parent, name, AtFlags::empty()).map_err(|e| match e {
            Errno::NOENT => refused(
                shown,
                &format!("hard link target {target_shown:?} is not in the layer"),
            ),
            e => io_error(shown, "create the hard link", e),
        })
    }

    fn fifo(&mut self, rel: &Path, meta: Meta, shown: &str) -> Result<(), UnpackError> {
        let (parent_rel, name) = split(rel).ok_or_else(|| refused(shown, "no file name"))?;
        let parent = self.open_dir(parent_rel, true, shown)?;
        self.clear_slot(parent.as_fd(), name, rel, false, shown)?;
        rfs::mknodat(&parent, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            .map_err(|e| io_error(shown, "create the fifo", e))?;
        // A non-blocking read-only open of a FIFO returns at once; it gives an fd for metadata that cannot
        // be redirected by a symlink.
        let fd = rfs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_error(shown, "open the fifo", e))?;
        apply_fd_meta(fd.as_fd(), &meta, shown)
    }

    /// Turns an OCI whiteout into its overlayfs form.
    fn whiteout(&mut self, rel: &Path, shown: &str) -> Result<(), UnpackError> {
        let (parent_rel, name) = split(rel).ok_or_else(|| refused(shown, "no file name"))?;
        let name = name.as_bytes();
        if name == OPAQUE_MARKER {
            let dir = self.open_dir(parent_rel, true, shown)?;
            rfs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| io_error(shown, "mark the directory opaque", e))?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            return Err(refused(shown, "unsupported special whiteout"));
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(refused(shown, "whiteout without a name to hide"));
        }
        let hidden = OsStr::from_bytes(hidden);
        let parent = self.open_dir(parent_rel, true, shown)?;
        match rfs::statat(&parent, hidden, AtFlags::SYMLINK_NOFOLLOW) {
            // The OCI spec: a whiteout hides only lower layers, never an entry of its own layer.
            Ok(_) => {
                tracing::debug!(path = %shown, "whiteout of an entry in the same layer has no effect");
                return Ok(());
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(io_error(shown, "inspect the entry it hides", e)),
        }
        rfs::mknodat(
            &parent,
            hidden,
            FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .map_err(|e| io_error(shown, "create the overlay whiteout", e))?;
        // Like the parents the layer leaves implicit, a whiteout belongs to the sandbox's root.
        if let Some(base) = self.options.id_shift {
            let root = (Some(Uid::from_raw(base)), Some(Gid::from_raw(base)));
            rfs::chownat(&parent, hidden, root.0, root.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_error(shown, "chown the overlay whiteout", e))?;
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest first.
    fn apply_deferred_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(rel, _)| Reverse(rel.components().count()));
        for (rel, deferred) in dirs {
            let shown = rel.display().to_string();
            let dir = open_beneath(self.root.as_fd(), &rel).map_err(|e| resolve_error(e, &rel, &shown))?;
            rfs::fchmod(&dir, Mode::from_raw_mode(deferred.mode))
                .map_err(|e| io_error(&shown, "set the directory's mode", e))?;
            rfs::futimens(&dir, &timestamps(deferred.mtime))
                .map_err(|e| io_error(&shown, "set the directory's mtime", e))?;
        }
        Ok(())
    }
}

/// Why [`copy_limited`] stopped.
enum CopyError {
    Limit,
    Read(io::Error),
    Write(io::Error),
}

/// Copies `reader` to `writer`, adding to `total` and stopping before writing the chunk that takes it past
/// `limit`: a header's declared size is not trusted (a sparse entry expands beyond it).
fn copy_limited(
    reader: &mut impl Read,
    writer: &mut impl Write,
    buf: &mut [u8],
    total: &mut u64,
    limit: u64,
) -> Result<(), CopyError> {
    loop {
        let read = match reader.read(buf) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        *total = total.saturating_add(read as u64);
        if *total > limit {
            return Err(CopyError::Limit);
        }
        writer.write_all(&buf[..read]).map_err(CopyError::Write)?;
    }
}

/// Maps a tar id into the sandbox's range of host ids.
fn shift_id(id: u64, base: u32, what: &str, shown: &str) -> Result<u32, UnpackError> {
    if id >= ID_RANGE {
        return Err(refused(
            shown,
            &format!("{what} {id} is outside the sandbox's {ID_RANGE} mapped ids"),
        ));
    }
    // id < 65536, so it fits in u32.
    base.checked_add(id as u32)
        .ok_or_else(|| refused(shown, &format!("{what} {id} shifted by {base} overflows")))
}

/// Sets owner, mode and mtime through an fd (chown first: it may clear mode bits).
fn apply_fd_meta(fd: BorrowedFd<'_>, meta: &Meta, shown: &str) -> Result<(), UnpackError> {
    if let Some((uid, gid)) = meta.owner {
        rfs::fchown(fd, Some(uid), Some(gid)).map_err(|e| io_error(shown, "chown", e))?;
    }
    rfs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| io_error(shown, "set its mode", e))?;
    rfs::futimens(fd, &timestamps(meta.mtime)).map_err(|e| io_error(shown, "set its mtime", e))
}

fn set_xattrs(fd: BorrowedFd<'_>, xattrs: &[(OsString, Vec<u8>)], shown: &str) -> Result<(), UnpackError> {
    for (name, value) in xattrs {
        rfs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty())
            .map_err(|e| io_error(shown, "set an xattr", e))?;
    }
    Ok(())
}

fn timestamps(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn refused(shown: &str, reason: &str) -> UnpackError {
    UnpackError::Refused {
        path: shown.to_owned(),
        reason: reason.to_owned(),
    }
}

fn io_error(shown: &str, op: &'static str, errno: Errno) -> UnpackError {
    UnpackError::Io {
        path: shown.to_owned(),
        op,
        source: errno.into(),
    }
}

/// Turns an `openat2` failure on `dir` into an error that says what the layer did wrong.
fn resolve_error(errno: Errno, dir: &Path, shown: &str) -> UnpackError {
    match errno {
        Errno::LOOP => UnpackError::ThroughSymlink {
            path: shown.to_owned(),
            through: dir.display().to_string(),
        },
        // RESOLVE_BENEATH refused a step out of the target; sanitized paths cannot do that, but say so.
        Errno::XDEV => UnpackError::Escapes {
            path: shown.to_owned(),
        },
        Errno::NOTDIR => refused(
            shown,
            &format!("{:?} is not a directory", dir.display().to_string()),
        ),
        Errno::NOENT => refused(
            shown,
            &format!("directory {:?} is not in the layer", dir.display().to_string()),
        ),
        e => io_error(shown, "open a parent directory", e),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::{Builder, Header};
    use tempfile::TempDir;

    use super::*;

    const MTIME: u64 = 1_600_000_000;

    /// An in-memory layer; names are written raw into the header so malicious ones survive.
    struct Layer {
        builder: Builder<Vec<u8>>,
    }

    /// One entry's header fields.
    struct Spec<'a> {
        path: &'a [u8],
        kind: EntryType,
        mode: u32,
        data: &'a [u8],
        link: Option<&'a [u8]>,
        ids: (u64, u64),
        device: (u32, u32),
    }

    impl<'a> Spec<'a> {
        fn new(path: &'a str, kind: EntryType) -> Self {
            Spec {
                path: path.as_bytes(),
                kind,
                mode: 0o644,
                data: b"",
                link: None,
                ids: (0, 0),
                device: (0, 0),
            }
        }
    }

    impl Layer {
        fn new() -> Self {
            Layer {
                builder: Builder::new(Vec::new()),
            }
        }

        fn push(mut self, spec: Spec<'_>) -> Self {
            let mut header = Header::new_gnu();
            header.as_old_mut().name[..spec.path.len()].copy_from_slice(spec.path);
            header.set_entry_type(spec.kind);
            header.set_mode(spec.mode);
            header.set_size(spec.data.len() as u64);
            header.set_mtime(MTIME);
            header.set_uid(spec.ids.0);
            header.set_gid(spec.ids.1);
            if let Some(link) = spec.link {
                header.set_link_name_literal(link).unwrap();
            }
            if matches!(spec.kind, EntryType::Char | EntryType::Block) {
                header.set_device_major(spec.device.0).unwrap();
                header.set_device_minor(spec.device.1).unwrap();
            }
            header.set_cksum();
            self.builder.append(&header, spec.data).unwrap();
            self
        }

        fn file(self, path: &str, data: &[u8], mode: u32) -> Self {
            self.push(Spec {
                data,
                mode,
                ..Spec::new(path, EntryType::Regular)
            })
        }

        fn dir(self, path: &str, mode: u32) -> Self {
            self.push(Spec {
                mode,
                ..Spec::new(path, EntryType::Directory)
            })
        }

        fn symlink(self, path: &str, target: &str) -> Self {
            self.push(Spec {
                link: Some(target.as_bytes()),
                mode: 0o777,
                ..Spec::new(path, EntryType::Symlink)
            })
        }

        fn hard_link(self, path: &str, target: &str) -> Self {
            self.push(Spec {
                link: Some(target.as_bytes()),
                ..Spec::new(path, EntryType::Link)
            })
        }

        /// A pax extended header applying to the next entry.
        fn pax(self, records: &[(&str, &[u8])]) -> Self {
            let mut body = Vec::new();
            for (key, value) in records {
                let rest = 1 + key.len() + 1 + value.len() + 1;
                let mut len = rest + 1;
                while len != rest + len.to_string().len() {
                    len = rest + len.to_string().len();
                }
                body.extend_from_slice(format!("{len} {key}=").as_bytes());
                body.extend_from_slice(value);
                body.push(b'\n');
            }
            self.push(Spec {
                data: &body,
                ..Spec::new("PaxHeaders/entry", EntryType::XHeader)
            })
        }

        fn finish(self) -> Vec<u8> {
            self.builder.into_inner().unwrap()
        }
    }

    /// A temporary directory holding the empty `layer` target and an empty sibling `outside`.
    struct Sandbox {
        tmp: TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("layer")).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            Sandbox { tmp }
        }

        fn layer(&self) -> PathBuf {
            self.tmp.path().join("layer")
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        fn unpack(&self, tar: &[u8], options: &UnpackOptions) -> Result<UnpackStats, UnpackError> {
            unpack_layer(tar, Compression::None, &self.layer(), options)
        }

        /// Asserts that nothing but `layer` and `outside` exists in the temp dir and `outside` is empty.
        fn assert_outside_untouched(&self) {
            let mut names: Vec<_> = fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, vec![OsString::from("layer"), OsString::from("outside")]);
            assert_eq!(fs::read_dir(self.outside()).unwrap().count(), 0);
        }
    }

    fn options() -> UnpackOptions {
        UnpackOptions {
            id_shift: None,
            max_bytes: 1 << 20,
            max_entries: 1000,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = [0_u8; 256];
        match rfs::lgetxattr(path, name, &mut buf[..]) {
            Ok(len) => Some(buf[..len].to_vec()),
            Err(Errno::NODATA) => None,
            Err(e) => panic!("lgetxattr {}: {e}", path.display()),
        }
    }

    #[test]
    fn test_unpack_creates_files_dirs_links_and_fifo() {
        let sandbox = Sandbox::new();
        let root_mode = mode_of(&sandbox.layer());
        let tar = Layer::new()
            .dir("./", 0o700)
            .dir("etc/", 0o750)
            .file("etc/passwd", b"root:x:0:0", 0o640)
            .symlink("etc/abs", "/usr/bin/env")
            .symlink("etc/rel", "passwd")
            .hard_link("etc/hl", "etc/passwd")
            .push(Spec {
                mode: 0o620,
                ..Spec::new("run/pipe", EntryType::Fifo)
            })
            .file("./usr/bin/tool", b"#!", 0o755)
            .finish();

        let stats = sandbox.unpack(&tar, &options()).unwrap();

        let layer = sandbox.layer();
        assert_eq!(
            stats,
            UnpackStats {
                entries: 8,
                bytes: 12,
                whiteouts: 0,
                skipped_devices: 0
            }
        );
        assert_eq!(fs::read(layer.join("etc/passwd")).unwrap(), b"root:x:0:0");
        assert_eq!(mode_of(&layer), root_mode, "the root entry is ignored");
        assert_eq!(mode_of(&layer.join("etc")), 0o750);
        assert_eq!(mode_of(&layer.join("etc/passwd")), 0o640);
        assert_eq!(mode_of(&layer.join("usr/bin/tool")), 0o755);
        assert_eq!(mode_of(&layer.join("usr")), IMPLICIT_DIR_MODE);
        assert_eq!(
            fs::read_link(layer.join("etc/abs")).unwrap(),
            Path::new("/usr/bin/env")
        );
        assert_eq!(fs::read_link(layer.join("etc/rel")).unwrap(), Path::new("passwd"));
        let passwd = fs::metadata(layer.join("etc/passwd")).unwrap();
        let hard_link = fs::symlink_metadata(layer.join("etc/hl")).unwrap();
        assert_eq!(hard_link.ino(), passwd.ino());
        assert_eq!(passwd.nlink(), 2);
        let fifo = fs::symlink_metadata(layer.join("run/pipe")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o620);
        for path in [
            "etc",
            "etc/passwd",
            "etc/abs",
            "etc/rel",
            "run/pipe",
            "usr/bin/tool",
        ] {
            let mtime = fs::symlink_metadata(layer.join(path)).unwrap().mtime();
            assert_eq!(mtime, MTIME as i64, "mtime of {path}");
        }
    }

    #[test]
    fn test_unpack_strips_setuid_keeps_sticky_and_defers_directory_metadata() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("bin/su", b"x", 0o4755)
            .file("bin/sg", b"x", 0o2711)
            .dir("tmp/", 0o1777)
            .dir("ro/", 0o555)
            .file("ro/child", b"x", 0o444)
            .dir("ro/sub/", 0o500)
            .file("ro/sub/leaf", b"x", 0o400)
            .finish();

        sandbox.unpack(&tar, &options()).unwrap();

        let layer = sandbox.layer();
        assert_eq!(mode_of(&layer.join("bin/su")), 0o755);
        assert_eq!(mode_of(&layer.join("bin/sg")), 0o711);
        assert_eq!(mode_of(&layer.join("tmp")), 0o1777);
        assert_eq!(mode_of(&layer.join("ro")), 0o555);
        assert_eq!(mode_of(&layer.join("ro/sub")), 0o500);
        assert_eq!(fs::read(layer.join("ro/sub/leaf")).unwrap(), b"x");
        // Children were created after the directory entries; the mtimes must still be the tar's.
        assert_eq!(fs::metadata(layer.join("ro")).unwrap().mtime(), MTIME as i64);
        assert_eq!(fs::metadata(layer.join("ro/sub")).unwrap().mtime(), MTIME as i64);
    }

    #[test]
    fn test_unpack_pax_mtime_with_fraction_and_user_xattrs() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .pax(&[
                ("mtime", b"1700000000.25"),
                ("SCHILY.xattr.user.mime", b"text/plain"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
            ])
            .file("f", b"data", 0o644)
            .finish();

        let stats = sandbox.unpack(&tar, &options()).unwrap();

        let f = sandbox.layer().join("f");
        let meta = fs::metadata(&f).unwrap();
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_700_000_000, 250_000_000));
        assert_eq!(xattr(&f, "user.mime").as_deref(), Some(&b"text/plain"[..]));
        assert_eq!(xattr(&f, "security.capability"), None);
        assert_eq!(stats.entries, 1);
    }

    #[test]
    fn test_parse_pax_time_handles_negative_fractions() {
        let t = parse_pax_time(b"-1.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
        let t = parse_pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 0));
        assert!(parse_pax_time(b"1.x").is_none());
        assert!(parse_pax_time(b"").is_none());
    }

    #[test]
    fn test_unpack_id_shift_chowns_by_base() {
        let sandbox = Sandbox::new();
        let base = 100_000;
        let tar = Layer::new()
            .push(Spec {
                ids: (5, 6),
                mode: 0o755,
                ..Spec::new("d/", EntryType::Directory)
            })
            .push(Spec {
                ids: (1000, 2000),
                data: b"x",
                ..Spec::new("d/file", EntryType::Regular)
            })
            .push(Spec {
                ids: (7, 8),
                link: Some(b"file"),
                ..Spec::new("d/link", EntryType::Symlink)
            })
            .push(Spec {
                ids: (0, 0),
                ..Spec::new("implicit/file", EntryType::Regular)
            })
            .finish();
        let options = UnpackOptions {
            id_shift: Some(base),
            ..options()
        };

        sandbox.unpack(&tar, &options).unwrap();

        let ids = |path: &str| {
            let meta = fs::symlink_metadata(sandbox.layer().join(path)).unwrap();
            (meta.uid(), meta.gid())
        };
        assert_eq!(ids("d"), (base + 5, base + 6));
        assert_eq!(ids("d/file"), (base + 1000, base + 2000));
        assert_eq!(ids("d/link"), (base + 7, base + 8));
        assert_eq!(ids("implicit"), (base, base));
        assert_eq!(ids("implicit/file"), (base, base));
    }

    /// A stream that fails.
    struct Failing;

    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("the stream broke"))
        }
    }

    #[test]
    fn test_unpack_id_shift_owns_whiteouts_and_a_file_cut_short() {
        let sandbox = Sandbox::new();
        let base = 100_000;
        let mut tar = Layer::new()
            .file(".wh.gone", b"", 0o644)
            .push(Spec {
                ids: (1000, 2000),
                data: b"truncated",
                ..Spec::new("f", EntryType::Regular)
            })
            .finish();
        // The stream fails inside the file's data (a download cut, a corrupt gzip member): its header and
        // four of its nine bytes arrive.
        tar.truncate(2 * 512 + 4);
        let failing = io::Read::chain(tar.as_slice(), Failing);
        let options = UnpackOptions {
            id_shift: Some(base),
            ..options()
        };

        let err = unpack_layer(failing, Compression::None, &sandbox.layer(), &options).unwrap_err();

        assert!(
            matches!(
                err,
                UnpackError::Io {
                    op: "read its content from the layer",
                    ..
                }
            ),
            "{err:?}"
        );
        let ids = |path: &str| {
            let meta = fs::symlink_metadata(sandbox.layer().join(path)).unwrap();
            (meta.uid(), meta.gid())
        };
        assert_eq!(ids("gone"), (base, base));
        assert_eq!(ids("f"), (base + 1000, base + 2000));
    }

    #[test]
    fn test_unpack_id_shift_refuses_ids_outside_the_map() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .push(Spec {
                ids: (70_000, 0),
                ..Spec::new("f", EntryType::Regular)
            })
            .finish();
        let options = UnpackOptions {
            id_shift: Some(100_000),
            ..options()
        };

        let err = sandbox.unpack(&tar, &options).unwrap_err();

        assert!(
            matches!(&err, UnpackError::Refused { path, reason } if path == "f" && reason.contains("70000")),
            "{err:?}"
        );
    }

    #[test]
    fn test_unpack_without_id_shift_keeps_caller_ownership() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .push(Spec {
                ids: (1000, 1000),
                ..Spec::new("f", EntryType::Regular)
            })
            .finish();

        sandbox.unpack(&tar, &options()).unwrap();

        let meta = fs::metadata(sandbox.layer().join("f")).unwrap();
        assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());
        assert_eq!(meta.gid(), rustix::process::getegid().as_raw());
    }

    #[test]
    fn test_unpack_gzip_and_zstd_round_trip() {
        let tar = Layer::new().file("a/b", b"compressed", 0o644).finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gzip = gz.finish().unwrap();
        let zstd = zstd::encode_all(&tar[..], 3).unwrap();

        for (compression, blob) in [(Compression::Gzip, gzip), (Compression::Zstd, zstd)] {
            let sandbox = Sandbox::new();
            let stats = unpack_layer(&blob[..], compression, &sandbox.layer(), &options()).unwrap();
            assert_eq!(stats.bytes, 10, "{compression:?}");
            assert_eq!(fs::read(sandbox.layer().join("a/b")).unwrap(), b"compressed");
        }
    }

    /// A GNU long-name header ('L') declaring `declared` bytes of name, followed by `actual` zero bytes.
    fn long_name_header(declared: u64, actual: usize) -> Vec<u8> {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_entry_type(EntryType::GNULongName);
        header.set_mode(0o644);
        header.set_size(declared);
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.resize(tar.len() + actual, 0);
        tar
    }

    /// Counts what a reader gave.
    struct Counting<R> {
        inner: R,
        read: Rc<Cell<u64>>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    #[test]
    fn test_unpack_refuses_a_long_name_past_the_header_limit_without_reading_it() {
        // 8 GiB declared; 64 MiB of zeros follow, which `tar` would read into one buffer, all of it.
        let tar = long_name_header(8 << 30, 64 << 20);
        let read = Rc::new(Cell::new(0));
        let sandbox = Sandbox::new();
        let stream = Counting {
            inner: tar.as_slice(),
            read: Rc::clone(&read),
        };
        let err = unpack_layer(stream, Compression::None, &sandbox.layer(), &options()).unwrap_err();
        assert!(
            matches!(
                err,
                UnpackError::HeadersTooLarge {
                    limit: MAX_HEADER_BYTES
                }
            ),
            "{err:?}"
        );
        assert!(
            read.get() <= MAX_HEADER_BYTES + (128 << 10),
            "read {} bytes",
            read.get()
        );
        sandbox.assert_outside_untouched();
    }

    #[test]
    fn test_unpack_refuses_pax_extensions_past_the_header_limit() {
        let value = vec![b'v'; (MAX_HEADER_BYTES as usize) + 1];
        let tar = Layer::new()
            .pax(&[("SCHILY.xattr.user.big", &value)])
            .file("f", b"x", 0o644)
            .finish();
        let err = Sandbox::new().unpack(&tar, &options()).unwrap_err();
        assert!(matches!(err, UnpackError::HeadersTooLarge { .. }), "{err:?}");
    }

    #[test]
    fn test_unpack_takes_long_names_and_skips_unread_data_within_the_limits() {
        // 3000 bytes, in components of at most NAME_MAX.
        let name = format!("d/{}f", format!("{}/", "n".repeat(199)).repeat(15));
        let mut builder = Builder::new(Vec::new());
        let mut header = Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        builder.append_data(&mut header, &name, &b"abc"[..]).unwrap();
        // A symlink whose header gives it 2 MiB of data: more than the header limit, skipped as data.
        let mut link = Header::new_gnu();
        link.set_entry_type(EntryType::Symlink);
        link.set_mode(0o777);
        link.set_link_name("d").unwrap();
        link.set_size(2 << 20);
        link.set_cksum();
        builder
            .append_data(&mut link, "l", &vec![0u8; 2 << 20][..])
            .unwrap();
        let mut last = Header::new_gnu();
        last.set_size(1);
        last.set_mode(0o644);
        builder.append_data(&mut last, "after", &b"z"[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let sandbox = Sandbox::new();
        let stats = sandbox.unpack(&tar, &options()).unwrap();
        assert_eq!(stats.entries, 3);
        assert_eq!(fs::read(sandbox.layer().join(&name)).unwrap(), b"abc");
        assert_eq!(fs::read(sandbox.layer().join("after")).unwrap(), b"z");
    }

    #[test]
    fn test_unpack_garbage_stream_is_a_stream_error() {
        let sandbox = Sandbox::new();
        let err = unpack_layer(
            &b"not gzip at all"[..],
            Compression::Gzip,
            &sandbox.layer(),
            &options(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::Stream(_)), "{err:?}");
    }

    #[test]
    fn test_unpack_whiteouts_become_overlay_whiteouts() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file(".wh.gone", b"", 0o644)
            .file("dir/.wh.old", b"", 0o644)
            .dir("opq/", 0o755)
            .file("opq/.wh..wh..opq", b"", 0o644)
            .file("implicit/.wh..wh..opq", b"", 0o644)
            .file("dir/keep", b"k", 0o644)
            .file("dir/.wh.keep", b"", 0o644)
            .finish();

        let stats = sandbox.unpack(&tar, &options()).unwrap();

        let layer = sandbox.layer();
        for path in ["gone", "dir/old"] {
            let meta = fs::symlink_metadata(layer.join(path)).unwrap();
            assert!(meta.file_type().is_char_device(), "{path}");
            assert_eq!(meta.rdev(), 0, "{path}");
        }
        assert!(!layer.join(".wh.gone").exists());
        assert_eq!(
            xattr(&layer.join("opq"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            xattr(&layer.join("implicit"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(!layer.join("opq/.wh..wh..opq").exists());
        // A whiteout never hides an entry of its own layer.
        assert_eq!(fs::read(layer.join("dir/keep")).unwrap(), b"k");
        assert_eq!(stats.whiteouts, 4);
    }

    #[test]
    fn test_unpack_refuses_unknown_special_whiteout() {
        let sandbox = Sandbox::new();
        let tar = Layer::new().file("d/.wh..wh.plnk", b"", 0o644).finish();

        let err = sandbox.unpack(&tar, &options()).unwrap_err();

        assert!(
            matches!(&err, UnpackError::Refused { path, .. } if path == "d/.wh..wh.plnk"),
            "{err:?}"
        );
    }

    #[test]
    fn test_unpack_refuses_dot_dot_and_writes_nothing_outside() {
        for name in ["../escape", "a/../../escape", "../outside/escape"] {
            let sandbox = Sandbox::new();
            let tar = Layer::new().file(name, b"pwned", 0o644).finish();

            let err = sandbox.unpack(&tar, &options()).unwrap_err();

            assert!(
                matches!(&err, UnpackError::Escapes { path } if path == name),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains("escapes the layer"));
            sandbox.assert_outside_untouched();
        }
    }

    #[test]
    fn test_unpack_absolute_path_stays_under_target() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("/tartarus-unpack-test-abs/file", b"abs", 0o644)
            .finish();

        sandbox.unpack(&tar, &options()).unwrap();

        assert_eq!(
            fs::read(sandbox.layer().join("tartarus-unpack-test-abs/file")).unwrap(),
            b"abs"
        );
        assert!(!Path::new("/tartarus-unpack-test-abs").exists());
        sandbox.assert_outside_untouched();
    }

    #[test]
    fn test_unpack_refuses_writing_through_a_symlink() {
        let sandbox = Sandbox::new();
        let outside = sandbox.outside();
        let cases = [
            (outside.to_str().unwrap().to_owned(), "link/file"),
            ("../outside".to_owned(), "link/file"),
            (outside.to_str().unwrap().to_owned(), "link/sub/file"),
        ];
        for (target, name) in cases {
            let sandbox = Sandbox::new();
            let tar = Layer::new()
                .symlink("link", &target)
                .file(name, b"pwned", 0o644)
                .finish();

            let err = sandbox.unpack(&tar, &options()).unwrap_err();

            assert!(
                matches!(&err, UnpackError::ThroughSymlink { path, .. } if path == name),
                "{target} {name}: {err:?}"
            );
            sandbox.assert_outside_untouched();
        }
    }

    #[test]
    fn test_unpack_refuses_escaping_hard_links() {
        let sandbox = Sandbox::new();
        fs::write(sandbox.outside().join("secret"), b"s").unwrap();
        let tar = Layer::new().hard_link("x", "../../x").finish();

        let err = sandbox.unpack(&tar, &options()).unwrap_err();
        assert!(
            matches!(&err, UnpackError::LinkEscapes { path, target } if path == "x" && target == "../../x"),
            "{err:?}"
        );

        let outside = sandbox.outside();
        let tar = Layer::new()
            .symlink("l", outside.to_str().unwrap())
            .hard_link("h", "l/secret")
            .finish();
        let err = sandbox.unpack(&tar, &options()).unwrap_err();
        assert!(
            matches!(&err, UnpackError::ThroughSymlink { path, .. } if path == "h"),
            "{err:?}"
        );
        assert!(!sandbox.layer().join("h").exists());
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn test_unpack_hard_link_to_a_symlink_links_the_symlink_itself() {
        let sandbox = Sandbox::new();
        let outside = sandbox.outside();
        fs::write(outside.join("secret"), b"s").unwrap();
        let secret = outside.join("secret");
        let tar = Layer::new()
            .symlink("l", secret.to_str().unwrap())
            .hard_link("h", "l")
            .finish();

        sandbox.unpack(&tar, &options()).unwrap();

        let h = fs::symlink_metadata(sandbox.layer().join("h")).unwrap();
        assert!(h.file_type().is_symlink());
        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    }

    #[test]
    fn test_unpack_skips_device_nodes() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .push(Spec {
                device: (1, 3),
                ..Spec::new("dev/null", EntryType::Char)
            })
            .push(Spec {
                device: (8, 0),
                ..Spec::new("dev/sda", EntryType::Block)
            })
            .finish();

        let stats = sandbox.unpack(&tar, &options()).unwrap();

        assert_eq!(stats.skipped_devices, 2);
        assert_eq!(stats.entries, 2);
        assert!(!sandbox.layer().join("dev/null").exists());
        assert!(!sandbox.layer().join("dev/sda").exists());
    }

    #[test]
    fn test_unpack_refuses_past_max_bytes() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("a", &[1; 40], 0o644)
            .file("b", &[2; 40], 0o644)
            .finish();
        let options = UnpackOptions {
            max_bytes: 50,
            ..options()
        };

        let err = sandbox.unpack(&tar, &options).unwrap_err();

        assert!(
            matches!(&err, UnpackError::TooManyBytes { path, limit: 50 } if path == "b"),
            "{err:?}"
        );
        assert!(!sandbox.layer().join("b").exists(), "refused before writing");
    }

    #[test]
    fn test_copy_limited_stops_before_the_chunk_past_the_limit() {
        // Longer than any header would declare, as a sparse entry's expansion can be.
        let mut reader = &b"abcdefghij"[..];
        let mut written = Vec::new();
        let mut total = 1;

        let result = copy_limited(&mut reader, &mut written, &mut [0; 4], &mut total, 6);

        assert!(matches!(result, Err(CopyError::Limit)));
        assert_eq!(written, b"abcd");
    }

    #[test]
    fn test_unpack_refuses_past_max_entries() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("a", b"", 0o644)
            .file("b", b"", 0o644)
            .file("c", b"", 0o644)
            .finish();
        let options = UnpackOptions {
            max_entries: 2,
            ..options()
        };

        let err = sandbox.unpack(&tar, &options).unwrap_err();

        assert!(
            matches!(&err, UnpackError::TooManyEntries { path, limit: 2 } if path == "c"),
            "{err:?}"
        );
    }

    #[test]
    fn test_unpack_later_entry_replaces_earlier() {
        let sandbox = Sandbox::new();
        let tar = Layer::new()
            .file("a", b"one", 0o644)
            .file("a", b"two", 0o600)
            .dir("d/", 0o755)
            .file("d/x", b"x", 0o644)
            .dir("d/deep/", 0o555)
            .file("d/deep/y", b"y", 0o644)
            .file("d", b"now a file", 0o644)
            .dir("e/", 0o755)
            .file("e/y", b"y", 0o644)
            .dir("e/", 0o700)
            .symlink("s", "/")
            .dir("s/", 0o750)
            .file("s/inside", b"i", 0o644)
            .file("f", b"f", 0o644)
            .symlink("f", "a")
            .finish();

        sandbox.unpack(&tar, &options()).unwrap();

        let layer = sandbox.layer();
        assert_eq!(fs::read(layer.join("a")).unwrap(), b"two");
        assert_eq!(mode_of(&layer.join("a")), 0o600);
        assert!(fs::symlink_metadata(layer.join("d")).unwrap().is_file());
        assert_eq!(fs::read(layer.join("d")).unwrap(), b"now a file");
        assert_eq!(fs::read(layer.join("e/y")).unwrap(), b"y");
        assert_eq!(mode_of(&layer.join("e")), 0o700);
        assert!(fs::symlink_metadata(layer.join("s")).unwrap().is_dir());
        assert_eq!(mode_of(&layer.join("s")), 0o750);
        assert_eq!(fs::read(layer.join("s/inside")).unwrap(), b"i");
        assert_eq!(fs::read_link(layer.join("f")).unwrap(), Path::new("a"));
    }

    #[test]
    fn test_unpack_refuses_forged_overlay_xattrs() {
        for key in [
            "SCHILY.xattr.user.overlay.opaque",
            "SCHILY.xattr.trusted.overlay.redirect",
        ] {
            let sandbox = Sandbox::new();
            let tar = Layer::new().pax(&[(key, b"y")]).dir("d/", 0o755).finish();

            let err = sandbox.unpack(&tar, &options()).unwrap_err();

            assert!(
                matches!(&err, UnpackError::Refused { path, reason } if path == "d/" && reason.contains("overlay")),
                "{key}: {err:?}"
            );
            assert_eq!(xattr(&sandbox.layer(), OPAQUE_XATTR), None);
        }
    }

    #[test]
    fn test_compression_from_media_type() {
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Compression::Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Compression::Zstd),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
        ];
        for (media_type, expected) in cases {
            assert_eq!(
                Compression::from_media_type(media_type),
                Ok(expected),
                "{media_type}"
            );
        }
        for unknown in [
            "application/vnd.oci.image.layer.v1.tar+encrypted",
            "application/vnd.oci.image.config.v1+json",
            "",
        ] {
            let err = Compression::from_media_type(unknown).unwrap_err();
            assert!(err.contains("unsupported layer media type"), "{err}");
        }
    }
}
