//! Master keys for encrypted channels: from a keyfile or from a password (DESIGN.md section 7).
//!
//! A keyfile is any file of at least 32 bytes; its whole content is reduced with a BLAKE3
//! `derive_key`, so a hex key, a raw key or a long passphrase file all work. A password is
//! stretched with Argon2id (64 MiB, 3 passes), salted with a hash of the channel name so that
//! the same password gives different keys on different channels.

use std::io::Write;
use std::path::Path;

use crate::channel::MasterKey;

const CTX_KEYFILE: &str = "lcfs 2026-11 keyfile v1";
const CTX_SALT: &str = "lcfs 2026-11 password salt v1";
pub const MIN_KEYFILE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read keyfile {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("keyfile {path} holds {len} bytes; a keyfile needs at least {MIN_KEYFILE} (make one with `lcfs keygen --out FILE`)")]
    Short { path: String, len: usize },
    #[error("password key derivation failed: {0}")]
    Argon(String),
    #[error("cannot write keyfile {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

pub fn from_keyfile(path: &Path) -> Result<MasterKey, KeyError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    if bytes.len() < MIN_KEYFILE {
        return Err(KeyError::Short {
            path: shown,
            len: bytes.len(),
        });
    }
    Ok(MasterKey::from_bytes(blake3::derive_key(
        CTX_KEYFILE,
        &bytes,
    )))
}

pub fn from_password(password: &str, channel: &str) -> Result<MasterKey, KeyError> {
    let salt = blake3::derive_key(CTX_SALT, channel.as_bytes());
    let params = argon2::Params::new(64 * 1024, 3, 1, Some(32))
        .map_err(|e| KeyError::Argon(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(password.as_bytes(), &salt[..16], &mut out)
        .map_err(|e| KeyError::Argon(e.to_string()))?;
    Ok(MasterKey::from_bytes(out))
}

/// Writes a new random keyfile (64 hex digits and a newline) with mode 0600, refusing to
/// overwrite an existing file.
pub fn write_keyfile(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| KeyError::Write {
            path: shown.clone(),
            source,
        })?;
    writeln!(f, "{}", new_key_hex()).map_err(|source| KeyError::Write {
        path: shown,
        source,
    })
}

pub fn new_key_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyfiles_and_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_keyfile(&p).unwrap();
        assert!(write_keyfile(&p).is_err(), "never overwrites");
        let a = from_keyfile(&p).unwrap();
        assert_eq!(a.0, from_keyfile(&p).unwrap().0);
        std::fs::write(dir.path().join("short"), b"abc").unwrap();
        let e = from_keyfile(&dir.path().join("short")).unwrap_err();
        assert!(e.to_string().contains("lcfs keygen"));
        let p1 = from_password("pw", "chan").unwrap();
        assert_ne!(p1.0, from_password("pw", "other").unwrap().0);
    }
}
