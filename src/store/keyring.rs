//! This machine's signing key pair and the public keys it trusts, kept in
//! the state directory:
//!
//! - `<state>/keys/signing-key.sec` (0600) and `signing-key.pub` (0644), in
//!   Nix's `name:base64` format, so `nix store sign --key-file` can use them;
//! - `<state>/trusted-keys`: one public key per line, what `store import`,
//!   `store verify` and offloaded builds trust by default.
//!
//! The key is named `<hostname>-1`, after Nix's convention for cache keys,
//! so that a signature says which machine made it.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::signature::{PublicKey, SecretKey, SignatureError, TrustedKeys};
use crate::bounded;

/// Why the key ring could not be read or changed.
#[derive(Debug, Error)]
pub enum KeyringError {
    #[error(transparent)]
    Key(#[from] SignatureError),
    #[error("cannot {action} '{}'", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no signing key in '{}': run `sandoff setup` first", path.display())]
    NoKey { path: PathBuf },
}

/// The key files of one state directory.
#[derive(Clone, Debug)]
pub struct Keyring {
    state: PathBuf,
}

impl Keyring {
    pub fn new(state: &Path) -> Keyring {
        Keyring {
            state: state.to_owned(),
        }
    }

    pub fn secret_key_path(&self) -> PathBuf {
        self.state.join("keys/signing-key.sec")
    }

    pub fn public_key_path(&self) -> PathBuf {
        self.state.join("keys/signing-key.pub")
    }

    pub fn trusted_keys_path(&self) -> PathBuf {
        self.state.join("trusted-keys")
    }

    /// Creates the key pair if there is none; returns the public key and
    /// whether it was created. A secret key without its public half gets the
    /// public file back.
    pub fn ensure_key_pair(&self, name: &str) -> Result<(PublicKey, bool), KeyringError> {
        let (sec, public) = (self.secret_key_path(), self.public_key_path());
        if sec.exists() {
            let key = SecretKey::read_file(&sec)?.to_public();
            if !public.exists() {
                key.write_file(&public)?;
            }
            return Ok((key, false));
        }
        let dir = self.state.join("keys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let secret = SecretKey::generate(name)?;
        // A stale public file from another key must not pair with the new secret.
        match fs::remove_file(&public) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove", &public)(e));
            }
            _ => {}
        }
        secret.write_file(&sec)?;
        secret.to_public().write_file(&public)?;
        Ok((secret.to_public(), true))
    }

    /// This machine's public key.
    pub fn public_key(&self) -> Result<PublicKey, KeyringError> {
        let path = self.public_key_path();
        if !path.exists() {
            return Err(KeyringError::NoKey { path });
        }
        Ok(PublicKey::read_file(&path)?)
    }

    /// This machine's secret key.
    pub fn secret_key(&self) -> Result<SecretKey, KeyringError> {
        let path = self.secret_key_path();
        if !path.exists() {
            return Err(KeyringError::NoKey { path });
        }
        Ok(SecretKey::read_file(&path)?)
    }

    /// The trusted keys (none when the file does not exist).
    pub fn trusted_keys(&self) -> Result<TrustedKeys, KeyringError> {
        Ok(TrustedKeys::read_file_or_empty(&self.trusted_keys_path())?)
    }

    /// Adds `keys` to the trusted keys file; returns how many were new. The
    /// file is replaced atomically, so a reader never sees half of it, and a
    /// key whose name is already trusted with other bytes is refused.
    pub fn authorize(&self, keys: &TrustedKeys) -> Result<usize, KeyringError> {
        let path = self.trusted_keys_path();
        let mut trusted = self.trusted_keys()?;
        let old = match bounded::read_file_to_string(&path, bounded::TRUSTED_KEYS_LIMIT) {
            Ok(text) => text,
            Err(e) if e.is_not_found() => String::new(),
            Err(source) => {
                return Err(SignatureError::Read {
                    path: path.clone(),
                    source,
                }
                .into())
            }
        };
        let mut text = old.clone();
        let mut added = 0;
        for key in keys.iter() {
            if trusted.get(key.name()) == Some(key) {
                continue;
            }
            trusted.insert(key.clone(), &format!("'{}'", path.display()))?;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&key.to_string());
            text.push('\n');
            added += 1;
        }
        if added > 0 {
            let dir = path.parent().unwrap_or(Path::new("."));
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            super::replace_file_atomically(&path, text.as_bytes())
                .map_err(io_err("replace", &path))?;
        }
        Ok(added)
    }
}

/// The default key name for this machine: `<hostname>-1`.
pub fn default_key_name() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-1", if host.is_empty() { "localhost" } else { host })
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> KeyringError + 'a {
    move |source| KeyringError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_pair_once() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(dir.path());
        let (pk, created) = ring.ensure_key_pair("host-1").unwrap();
        assert!(created);
        let (again, created) = ring.ensure_key_pair("host-1").unwrap();
        assert!(!created);
        assert_eq!(pk, again);
        assert_eq!(ring.public_key().unwrap(), pk);
        assert_eq!(ring.secret_key().unwrap().to_public(), pk);
    }

    #[test]
    fn restores_a_missing_public_half() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(dir.path());
        let (pk, _) = ring.ensure_key_pair("host-1").unwrap();
        fs::remove_file(ring.public_key_path()).unwrap();
        assert_eq!(ring.ensure_key_pair("host-1").unwrap(), (pk, false));
        assert!(ring.public_key_path().exists());
    }

    #[test]
    fn authorize_adds_each_key_once_and_refuses_a_conflicting_name() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::new(dir.path());
        let a = SecretKey::generate("a-1").unwrap().to_public();
        let b = SecretKey::generate("b-1").unwrap().to_public();
        let mut keys = TrustedKeys::new();
        keys.insert(a.clone(), "test").unwrap();
        assert_eq!(ring.authorize(&keys).unwrap(), 1);
        keys.insert(b.clone(), "test").unwrap();
        assert_eq!(ring.authorize(&keys).unwrap(), 1);
        assert_eq!(ring.authorize(&keys).unwrap(), 0);
        let trusted = ring.trusted_keys().unwrap();
        assert_eq!(trusted.len(), 2);
        let other_a = SecretKey::generate("a-1").unwrap().to_public();
        let mut clash = TrustedKeys::new();
        clash.insert(other_a, "test").unwrap();
        assert!(ring.authorize(&clash).is_err());
        assert_eq!(ring.trusted_keys().unwrap().len(), 2);
    }

    #[test]
    fn missing_key_says_to_run_setup() {
        let dir = tempfile::tempdir().unwrap();
        let err = Keyring::new(dir.path()).public_key().unwrap_err();
        assert!(err.to_string().contains("sandoff setup"), "{err}");
    }
}
