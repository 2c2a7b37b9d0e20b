//! Where the CA keeps its signing certificate and key between restarts.
//!
//! The trust root must survive restarts (agents hold it in their trust bundles),
//! so the CA loads its key material from a store on start and saves it only
//! when it had to create it: [`FileStore`] keeps it in a directory,
//! [`SecretStore`](super::SecretStore) in a Kubernetes Secret.

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// The future a [`CaStore`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The CA's signing certificate and private key, both PEM, and what a root rotation
/// left behind.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CaKeyMaterial {
    /// The signing certificate (the root itself, or the intermediate).
    pub cert_pem: String,
    /// The PKCS#8 private key matching `cert_pem`.
    pub key_pem: String,
    /// Roots that came before the current one and are still trusted (PEM, any number
    /// of certificates; empty when the root was never rotated). Agents keep accepting
    /// certificates issued under them until the operator retires them.
    pub previous_roots_pem: String,
    /// Certificates of newer roots signed by older ones (PEM, any number): what lets an
    /// agent anchored on an older root accept a newer one. See `ca::rotation`.
    pub cross_signed_pem: String,
}

impl fmt::Debug for CaKeyMaterial {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKeyMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("previous_roots_pem", &self.previous_roots_pem)
            .field("cross_signed_pem", &self.cross_signed_pem)
            .finish_non_exhaustive()
    }
}

/// Persistence of the CA's key material. Async because the Kubernetes Secret store
/// talks to the API server.
pub trait CaStore: Send + Sync {
    /// Where the material lives, for logs and errors ("directory /var/lib/mesh/ca").
    fn describe(&self) -> String;

    /// The stored material, or `None` when nothing usable has been stored yet.
    fn load(&self) -> StoreFuture<'_, Option<CaKeyMaterial>>;

    /// Replaces the stored material so that a crash never leaves a half-written file.
    fn save(&self, material: CaKeyMaterial) -> StoreFuture<'_, ()>;

    /// Stores `material` unless something was stored meanwhile, and returns what is
    /// stored afterwards: `material`, or what a concurrent writer (another replica that
    /// started at the same time) stored first, so that every replica ends up with the
    /// same root. The default, for single-writer stores, is [`CaStore::save`].
    fn create(&self, material: CaKeyMaterial) -> StoreFuture<'_, CaKeyMaterial> {
        Box::pin(async move {
            self.save(material.clone()).await?;
            Ok(material)
        })
    }
}

/// Why the store could not load or save.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "rename", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The certificate exists but its key does not: the CA cannot sign for a root that
    /// agents may already trust, and silently making a new one would split the mesh.
    #[error("{cert} exists but its key {key} is missing; restore the key or remove both files")]
    KeyMissing {
        /// The certificate file.
        cert: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// A call to the Kubernetes API about the CA's Secret failed.
    #[error("Secret {secret}: {action}: {reason}")]
    Kubernetes {
        /// `namespace/name` of the Secret.
        secret: String,
        /// What was being done ("get", "create", "update").
        action: &'static str,
        /// Why it failed, with the missing permission when the API server said 403.
        reason: String,
    },
    /// The Secret holds the certificate but not its key (same reasoning as
    /// [`StoreError::KeyMissing`]).
    #[error(
        "Secret {secret} has {cert_key:?} but no {key_key:?}; restore the key or delete the Secret to make a new root"
    )]
    SecretKeyMissing {
        /// `namespace/name` of the Secret.
        secret: String,
        /// The data key that is present.
        cert_key: &'static str,
        /// The data key that is missing.
        key_key: &'static str,
    },
    /// A data key of the Secret is not usable PEM text.
    #[error("Secret {secret}: data key {key:?}: {reason}")]
    SecretData {
        /// `namespace/name` of the Secret.
        secret: String,
        /// The data key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA key is encrypted at rest and could not be opened (no key, a wrong key,
    /// or altered); see `ca::sealed`.
    #[error("{store}: {reason}")]
    Sealed {
        /// Where the material lives.
        store: String,
        /// Why it did not open.
        reason: String,
    },
    /// The blocking file task could not complete.
    #[error("store task failed: {0}")]
    Task(String),
}

/// Stores the material as `ca.pem` and `ca-key.pem` in one directory (created 0700),
/// with `ca-previous.pem` and `ca-cross.pem` after a root rotation.
///
/// The key file is written with mode 0600. Each file goes to a temporary file in the same
/// directory, is synced, then renamed over the old one, and the directory is synced, so a
/// reader sees either the old or the new file. The key is renamed before the certificate:
/// a crash in between on first start leaves a key without a certificate, which loads as
/// "nothing stored" and is regenerated.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// The certificate file name inside the store directory.
pub const CERT_FILE: &str = "ca.pem";
/// The key file name inside the store directory.
pub const KEY_FILE: &str = "ca-key.pem";
/// The file of previous roots still trusted after a rotation.
pub const PREVIOUS_ROOTS_FILE: &str = "ca-previous.pem";
/// The file of cross-signed root certificates after a rotation.
pub const CROSS_SIGNED_FILE: &str = "ca-cross.pem";

impl FileStore {
    /// A store in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> FileStore {
        FileStore { dir: dir.into() }
    }

    /// The certificate file's path.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// The key file's path.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    fn load_blocking(&self) -> Result<Option<CaKeyMaterial>, StoreError> {
        let (cert_path, key_path) = (self.cert_path(), self.key_path());
        let cert_pem = read_if_exists(&cert_path)?;
        let key_pem = read_if_exists(&key_path)?;
        match (cert_pem, key_pem) {
            (Some(cert_pem), Some(key_pem)) => Ok(Some(CaKeyMaterial {
                cert_pem,
                key_pem,
                previous_roots_pem: read_if_exists(&self.dir.join(PREVIOUS_ROOTS_FILE))?.unwrap_or_default(),
                cross_signed_pem: read_if_exists(&self.dir.join(CROSS_SIGNED_FILE))?.unwrap_or_default(),
            })),
            (Some(_), None) => Err(StoreError::KeyMissing { cert: cert_path, key: key_path }),
            // No certificate was ever published: whatever key is there is unused.
            (None, _) => Ok(None),
        }
    }

    fn save_blocking(&self, material: &CaKeyMaterial) -> Result<(), StoreError> {
        create_private_dir(&self.dir)?;
        // The rotation's files first: a crash before the new root lands leaves them
        // next to the old root, which ignores what does not fit it (`ca::rotation`).
        for (file, pem) in [
            (PREVIOUS_ROOTS_FILE, &material.previous_roots_pem),
            (CROSS_SIGNED_FILE, &material.cross_signed_pem),
        ] {
            let path = self.dir.join(file);
            if pem.trim().is_empty() {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove", &path)(e)),
                }
            } else {
                write_atomically(&path, pem.as_bytes(), 0o644)?;
            }
        }
        write_atomically(&self.key_path(), material.key_pem.as_bytes(), 0o600)?;
        write_atomically(&self.cert_path(), material.cert_pem.as_bytes(), 0o644)?;
        let dir = std::fs::File::open(&self.dir).map_err(io_err("open", &self.dir))?;
        dir.sync_all().map_err(io_err("sync", &self.dir))
    }
}

impl CaStore for FileStore {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn load(&self) -> StoreFuture<'_, Option<CaKeyMaterial>> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.load_blocking())
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }

    fn save(&self, material: CaKeyMaterial) -> StoreFuture<'_, ()> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.save_blocking(&material))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

fn read_if_exists(path: &Path) -> Result<Option<String>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// Writes `contents` to `path` through a synced temporary file and a rename.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // A leftover from a crashed run of this same pid would make create_new fail.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err("rename", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn material(n: u8) -> CaKeyMaterial {
        CaKeyMaterial { cert_pem: format!("cert {n}"), key_pem: format!("key {n}"), ..Default::default() }
    }

    #[tokio::test]
    async fn a_rotation_s_files_are_kept_and_removed_with_the_material() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let rotated = CaKeyMaterial {
            previous_roots_pem: "old root".into(),
            cross_signed_pem: "cross".into(),
            ..material(1)
        };
        store.save(rotated.clone()).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(rotated));
        assert!(dir.path().join(PREVIOUS_ROOTS_FILE).exists());

        // Retired: saving without them removes the files.
        store.save(material(2)).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(material(2)));
        assert!(!dir.path().join(PREVIOUS_ROOTS_FILE).exists());
        assert!(!dir.path().join(CROSS_SIGNED_FILE).exists());
    }

    #[tokio::test]
    async fn saves_and_loads_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("ca"));
        assert_eq!(store.load().await.unwrap(), None);

        store.save(material(1)).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(material(1)));
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.key_path()), 0o600);
        assert_eq!(mode(dir.path().join("ca")), 0o700);

        store.save(material(2)).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(material(2)));
        assert_eq!(mode(store.key_path()), 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    }

    #[tokio::test]
    async fn a_certificate_without_its_key_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.save(material(1)).await.unwrap();
        std::fs::remove_file(store.key_path()).unwrap();
        assert!(matches!(store.load().await, Err(StoreError::KeyMissing { .. })));
    }

    #[tokio::test]
    async fn a_key_without_a_certificate_loads_as_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.save(material(1)).await.unwrap();
        std::fs::remove_file(store.cert_path()).unwrap();
        assert_eq!(store.load().await.unwrap(), None);
    }
}
