//! The server's task key: projects' credentials sealed at rest with ChaCha20-Poly1305 (a 32-byte key in
//! `DATA_DIR/task.key`, mode 0600, made on first start; every replica of a cluster needs the same file).
//! A sealed value is base64 of a random 12-byte nonce and the ciphertext with its tag; the project id is
//! the associated data, so a sealed value copied to another project does not open.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;

#[derive(Clone)]
pub struct TaskKey {
    cipher: ChaCha20Poly1305,
}

/// Never shows the key.
impl std::fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskKeyError {
    #[error("cannot read or create the task key {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the task key {path} is not 32 bytes: replace it with the file every replica uses")]
    Length { path: String },
    #[error("no randomness for a nonce")]
    Randomness,
    #[error("stored credentials do not open with this server's task key")]
    Open,
}

impl TaskKey {
    /// Reads `DATA_DIR/task.key`, creating it if missing.
    pub fn open_or_create(data_dir: &Path) -> Result<TaskKey, TaskKeyError> {
        let path = data_dir.join("task.key");
        let shown = path.display().to_string();
        let file_error = |source| TaskKeyError::File {
            path: shown.clone(),
            source,
        };
        if !path.exists() {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|_| TaskKeyError::Randomness)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(file_error)?;
            file.write_all(&key).map_err(file_error)?;
        }
        let bytes = std::fs::read(&path).map_err(file_error)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TaskKeyError::Length { path: shown.clone() })?;
        Ok(TaskKey::from_bytes(&key))
    }

    pub fn from_bytes(key: &[u8; 32]) -> TaskKey {
        TaskKey {
            cipher: ChaCha20Poly1305::new(key.into()),
        }
    }

    /// Seals `plaintext` for `project`.
    pub fn seal(&self, project: &str, plaintext: &[u8]) -> Result<String, TaskKeyError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| TaskKeyError::Randomness)?;
        let sealed = self
            .cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: project.as_bytes(),
                },
            )
            .map_err(|_| TaskKeyError::Open)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Opens what [`TaskKey::seal`] sealed for `project`.
    pub fn open(&self, project: &str, sealed: &str) -> Result<Vec<u8>, TaskKeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| TaskKeyError::Open)?;
        if bytes.len() < 12 + 16 {
            return Err(TaskKeyError::Open);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| TaskKeyError::Open)?;
        self.cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: ciphertext,
                    aad: project.as_bytes(),
                },
            )
            .map_err(|_| TaskKeyError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_credentials_open_only_for_their_project_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = TaskKey::open_or_create(dir.path()).unwrap();
        let sealed = key.seal("prj_1", b"s3cret").unwrap();
        assert!(!sealed.contains("s3cret"));
        assert_eq!(key.open("prj_1", &sealed).unwrap(), b"s3cret");
        assert!(key.open("prj_2", &sealed).is_err(), "opened for another project");
        let again = TaskKey::open_or_create(dir.path()).unwrap();
        assert_eq!(
            again.open("prj_1", &sealed).unwrap(),
            b"s3cret",
            "the key file was not reused"
        );
        let other = TaskKey::from_bytes(&[7; 32]);
        assert!(other.open("prj_1", &sealed).is_err(), "opened with another key");
        assert!(key.open("prj_1", "not base64!").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("task.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
