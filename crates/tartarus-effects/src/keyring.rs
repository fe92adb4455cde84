//! Ed25519 keys: a [`Keyring`] with one current signing key and older verify-only keys, the exported
//! [`PublicKeys`], and their directory on disk (effects-v1 §5).
//!
//! A key is named by its key id, the first 16 hex digits (8 bytes) of BLAKE3 of the 32-byte public key;
//! the id is derived, never chosen, so a key store cannot name one key with another's id.
//!
//! On disk (`Keyring::load_or_create`):
//!
//! | file | content |
//! | --- | --- |
//! | `signing.key` | the current key's 32-byte seed as 64 lower-case hex digits and a newline; mode 0600, refused otherwise |
//! | `public-keys.json` | every public key, current and retired ([`PublicKeys::to_json`]); mode 0644 |
//!
//! The directory is created with mode 0700. Rotation writes the new public key first and then replaces
//! `signing.key` by rename, so a crash leaves either the old key current or the new one, and every
//! signature made stays verifiable. A retired key's seed is gone after rotation: it verifies, it cannot sign.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::EffectsError;

/// File name of the current signing key inside a key directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// File name of the exported public keys inside a key directory.
pub const PUBLIC_KEYS_FILE: &str = "public-keys.json";
/// The `format` field of a public-keys JSON document.
pub const PUBLIC_KEYS_FORMAT: &str = "tartarus-effects/v1/public-keys";

/// The key id of a public key: the first 16 lower-case hex digits of BLAKE3 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

/// Where a verifier finds the public key an envelope names.
pub trait VerifyingKeys {
    /// The public key with this key id, if known.
    fn verifying_key(&self, kid: &str) -> Option<VerifyingKey>;
}

/// Public keys by key id: what a verifier needs, and what a keyring exports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicKeys {
    keys: BTreeMap<String, VerifyingKey>,
    current: Option<String>,
}

/// The JSON form of [`PublicKeys`] (also embedded in other documents, e.g. an episode's keys).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublicKeysDocument {
    format: String,
    current: Option<String>,
    keys: Vec<PublicKeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyEntry {
    kid: String,
    algorithm: String,
    public_key: String,
}

impl PublicKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (a no-op if present) and returns its key id.
    pub fn insert(&mut self, key: VerifyingKey) -> String {
        let kid = key_id(&key);
        self.keys.insert(kid.clone(), key);
        kid
    }

    /// The key id of the keyring's signing key when exported, if any.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Every key id, sorted.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The JSON export: `{"format": "tartarus-effects/v1/public-keys", "current": kid or null,
    /// "keys": [{"kid", "algorithm": "ed25519", "public_key": hex}]}`, keys sorted by id.
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string_pretty(&self.document())
            .unwrap_or_else(|_| unreachable!("strings and lists always serialise"));
        json.push('\n');
        json
    }

    /// The export as a serde value.
    pub(crate) fn document(&self) -> PublicKeysDocument {
        PublicKeysDocument {
            format: PUBLIC_KEYS_FORMAT.into(),
            current: self.current.clone(),
            keys: self
                .keys
                .iter()
                .map(|(kid, key)| PublicKeyEntry {
                    kid: kid.clone(),
                    algorithm: "ed25519".into(),
                    public_key: hex::encode(key.as_bytes()),
                })
                .collect(),
        }
    }

    /// Parses the JSON export, checking every key id against its key. `source` names the text in errors.
    pub fn from_json(text: &str, source: &Path) -> Result<Self, EffectsError> {
        let document: PublicKeysDocument =
            serde_json::from_str(text).map_err(|e| EffectsError::InvalidKeyStore {
                path: source.to_path_buf(),
                reason: format!("not a public-keys document: {e}"),
            })?;
        Self::from_document(document, source)
    }

    /// Checks a parsed export: its format, and every key id against its key.
    pub(crate) fn from_document(document: PublicKeysDocument, source: &Path) -> Result<Self, EffectsError> {
        let invalid = |reason: String| EffectsError::InvalidKeyStore {
            path: source.to_path_buf(),
            reason,
        };
        if document.format != PUBLIC_KEYS_FORMAT {
            return Err(invalid(format!(
                "format {:?} is not {PUBLIC_KEYS_FORMAT:?}",
                document.format
            )));
        }
        let mut keys = Self::new();
        for entry in document.keys {
            if entry.algorithm != "ed25519" {
                return Err(invalid(format!(
                    "key {}: algorithm {:?} is not ed25519",
                    entry.kid, entry.algorithm
                )));
            }
            let key = parse_public_key(&entry.public_key)
                .map_err(|e| invalid(format!("key {}: {e}", entry.kid)))?;
            let kid = keys.insert(key);
            if kid != entry.kid {
                return Err(invalid(format!(
                    "key id {} does not match its key (which has id {kid})",
                    entry.kid
                )));
            }
        }
        if let Some(current) = &document.current {
            if !keys.keys.contains_key(current) {
                return Err(invalid(format!("current key {current} is not among the keys")));
            }
        }
        keys.current = document.current;
        Ok(keys)
    }

    /// Reads a `public-keys.json` file.
    pub fn load(path: &Path) -> Result<Self, EffectsError> {
        let text = fs::read_to_string(path).map_err(|source| EffectsError::KeyStore {
            path: path.into(),
            source,
        })?;
        Self::from_json(&text, path)
    }
}

impl VerifyingKeys for PublicKeys {
    fn verifying_key(&self, kid: &str) -> Option<VerifyingKey> {
        self.keys.get(kid).copied()
    }
}

fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(text)
        .map_err(|e| format!("public key is not hex: {e}"))?
        .try_into()
        .map_err(|bytes: Vec<u8>| format!("public key is {} bytes, not 32", bytes.len()))?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| "public key is not a curve point".to_string())?;
    if key.is_weak() {
        return Err("public key is a weak (small-order) point".into());
    }
    Ok(key)
}

/// Named Ed25519 keys: one current signing key, older verify-only keys.
///
/// Only the current key signs; [`Keyring::rotate`] makes a new current key and keeps the old one's public
/// half, so what it signed still verifies.
pub struct Keyring {
    signing: SigningKey,
    kid: String,
    public: PublicKeys,
    dir: Option<PathBuf>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.kid)
            .field("keys", &self.public.keys.keys())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// An in-memory keyring whose current key has this seed: for tests and conformance vectors, where
    /// Ed25519's deterministic signatures make the output fixed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self::with_signing_key(SigningKey::from_bytes(&seed), PublicKeys::new(), None)
    }

    /// An in-memory keyring with a fresh key from operating system randomness.
    pub fn generate() -> Result<Self, EffectsError> {
        Ok(Self::with_signing_key(
            new_signing_key()?,
            PublicKeys::new(),
            None,
        ))
    }

    fn with_signing_key(signing: SigningKey, mut public: PublicKeys, dir: Option<PathBuf>) -> Self {
        let kid = public.insert(signing.verifying_key());
        public.current = Some(kid.clone());
        Self {
            signing,
            kid,
            public,
            dir,
        }
    }

    /// Opens the key directory `dir`, creating it and a first key if it does not exist or is empty.
    ///
    /// Refuses a `signing.key` readable by group or others, a `public-keys.json` whose ids do not match its
    /// keys, and a directory with public keys but no signing key (restore `signing.key` rather than
    /// silently starting a new identity).
    pub fn load_or_create(dir: &Path) -> Result<Self, EffectsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| EffectsError::KeyStore {
                path: dir.into(),
                source,
            })?;
        let signing_path = dir.join(SIGNING_KEY_FILE);
        let public_path = dir.join(PUBLIC_KEYS_FILE);
        let public = if public_path.exists() {
            PublicKeys::load(&public_path)?
        } else {
            PublicKeys::new()
        };
        let signing = if signing_path.exists() {
            read_signing_key(&signing_path)?
        } else if public.is_empty() {
            let signing = new_signing_key()?;
            let mut public = public.clone();
            public.insert(signing.verifying_key());
            // Public half first: a crash before the seed is written leaves an unused public key, never a
            // signing key whose signatures nobody can verify.
            write_file(&public_path, public.to_json().as_bytes(), 0o644)?;
            write_signing_key(&signing_path, &signing)?;
            signing
        } else {
            return Err(EffectsError::InvalidKeyStore {
                path: dir.into(),
                reason: format!("{PUBLIC_KEYS_FILE} lists keys but {SIGNING_KEY_FILE} is missing"),
            });
        };
        let keyring = Self::with_signing_key(signing, public.clone(), Some(dir.into()));
        if keyring.public != public {
            write_file(&public_path, keyring.public.to_json().as_bytes(), 0o644)?;
        }
        Ok(keyring)
    }

    /// Makes a new current key; the old one becomes verify-only. Persists first when the keyring has a
    /// directory. Returns the new key id.
    pub fn rotate(&mut self) -> Result<&str, EffectsError> {
        let signing = new_signing_key()?;
        let mut public = self.public.clone();
        let kid = public.insert(signing.verifying_key());
        public.current = Some(kid.clone());
        if let Some(dir) = &self.dir {
            write_file(&dir.join(PUBLIC_KEYS_FILE), public.to_json().as_bytes(), 0o644)?;
            write_signing_key(&dir.join(SIGNING_KEY_FILE), &signing)?;
        }
        self.signing = signing;
        self.kid = kid;
        self.public = public;
        Ok(&self.kid)
    }

    /// The key id of the current signing key.
    pub fn current_kid(&self) -> &str {
        &self.kid
    }

    /// Every public key, current and retired.
    pub fn public_keys(&self) -> &PublicKeys {
        &self.public
    }

    /// Signs with the current key; the only way a keyring signs.
    pub(crate) fn sign(&self, message: &[u8]) -> Signature {
        self.signing.sign(message)
    }
}

impl VerifyingKeys for Keyring {
    fn verifying_key(&self, kid: &str) -> Option<VerifyingKey> {
        self.public.verifying_key(kid)
    }
}

fn new_signing_key() -> Result<SigningKey, EffectsError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|e| EffectsError::Randomness(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn read_signing_key(path: &Path) -> Result<SigningKey, EffectsError> {
    let io = |source| EffectsError::KeyStore {
        path: path.into(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(EffectsError::InsecureKeyFile {
            path: path.into(),
            mode,
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim_end_matches('\n'), seed.as_mut()).map_err(|e| {
        EffectsError::InvalidKeyStore {
            path: path.into(),
            reason: format!("not a 64-digit hex seed: {e}"),
        }
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), EffectsError> {
    let mut text = Zeroizing::new(hex::encode(key.as_bytes()));
    text.push('\n');
    write_file(path, text.as_bytes(), 0o600)
}

/// Replaces `path` atomically: a fresh temporary file with `mode` in the same directory, synced, renamed.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), EffectsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EffectsError::KeyStore { path, source }
    };
    // A leftover from a crash may have any mode; `mode` below applies only to a file it creates.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&temporary)(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io(&temporary))?;
    file.write_all(contents).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    fs::rename(&temporary, path).map_err(io(path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7; 32];

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn test_key_id_is_16_hex_of_blake3() {
        let keyring = Keyring::from_seed(SEED);
        let public = SigningKey::from_bytes(&SEED).verifying_key();
        let expected = &blake3::hash(public.as_bytes()).to_hex()[..16];
        assert_eq!(keyring.current_kid(), expected);
    }

    #[test]
    fn test_rotate_keeps_old_key_verify_only() {
        let mut keyring = Keyring::from_seed(SEED);
        let old = keyring.current_kid().to_string();
        let new = keyring.rotate().unwrap().to_string();
        assert_ne!(old, new);
        assert_eq!(keyring.current_kid(), new);
        assert!(keyring.verifying_key(&old).is_some());
        assert_eq!(keyring.public_keys().current(), Some(new.as_str()));
        assert_eq!(keyring.public_keys().len(), 2);
    }

    #[test]
    fn test_load_or_create_creates_private_files_and_reloads_same_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = Keyring::load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SIGNING_KEY_FILE)), 0o600);
        // The public file's group/other bits depend on the umask; the owner can always read and write it.
        assert_eq!(mode(&dir.join(PUBLIC_KEYS_FILE)) & 0o600, 0o600);
        let again = Keyring::load_or_create(&dir).unwrap();
        assert_eq!(first.current_kid(), again.current_kid());
        let exported = PublicKeys::load(&dir.join(PUBLIC_KEYS_FILE)).unwrap();
        assert_eq!(&exported, first.public_keys());
    }

    #[test]
    fn test_rotation_persists_and_destroys_old_seed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut keyring = Keyring::load_or_create(tmp.path()).unwrap();
        let old = keyring.current_kid().to_string();
        let old_seed = fs::read_to_string(tmp.path().join(SIGNING_KEY_FILE)).unwrap();
        let new = keyring.rotate().unwrap().to_string();
        let reloaded = Keyring::load_or_create(tmp.path()).unwrap();
        assert_eq!(reloaded.current_kid(), new);
        assert!(reloaded.verifying_key(&old).is_some());
        assert_ne!(
            fs::read_to_string(tmp.path().join(SIGNING_KEY_FILE)).unwrap(),
            old_seed
        );
        assert_eq!(mode(&tmp.path().join(SIGNING_KEY_FILE)), 0o600);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn test_load_refuses_group_readable_signing_key() {
        let tmp = tempfile::tempdir().unwrap();
        Keyring::load_or_create(tmp.path()).unwrap();
        let path = tmp.path().join(SIGNING_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Keyring::load_or_create(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), "insecure_key_file");
        assert!(err.to_string().contains("make it 0600"), "{err}");
    }

    #[test]
    fn test_load_refuses_public_keys_without_signing_key() {
        let tmp = tempfile::tempdir().unwrap();
        Keyring::load_or_create(tmp.path()).unwrap();
        fs::remove_file(tmp.path().join(SIGNING_KEY_FILE)).unwrap();
        assert_eq!(
            Keyring::load_or_create(tmp.path()).unwrap_err().kind(),
            "invalid_key_store"
        );
    }

    #[test]
    fn test_load_refuses_garbled_seed() {
        let tmp = tempfile::tempdir().unwrap();
        Keyring::load_or_create(tmp.path()).unwrap();
        let path = tmp.path().join(SIGNING_KEY_FILE);
        fs::write(&path, "not hex\n").unwrap();
        assert_eq!(
            Keyring::load_or_create(tmp.path()).unwrap_err().kind(),
            "invalid_key_store"
        );
    }

    #[test]
    fn test_public_keys_json_rejects_mismatched_kid() {
        let keyring = Keyring::from_seed(SEED);
        let json = keyring
            .public_keys()
            .to_json()
            .replace(keyring.current_kid(), "0000000000000000");
        let err = PublicKeys::from_json(&json, Path::new("keys.json")).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn test_public_keys_json_round_trips() {
        let mut keyring = Keyring::from_seed(SEED);
        keyring.rotate().unwrap();
        let json = keyring.public_keys().to_json();
        assert!(json.contains("\"algorithm\": \"ed25519\""), "{json}");
        assert_eq!(
            &PublicKeys::from_json(&json, Path::new("k")).unwrap(),
            keyring.public_keys()
        );
    }

    #[test]
    fn test_debug_does_not_show_the_seed() {
        let keyring = Keyring::from_seed(SEED);
        let debug = format!("{keyring:?}");
        assert!(
            !debug.contains(&hex::encode(SEED)) && !debug.contains("7, 7, 7"),
            "{debug}"
        );
    }
}
