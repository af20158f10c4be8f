//! Master keys for encrypted channels: from a keyfile or from a password (DESIGN.md section 7).
//!
//! A keyfile is any file of at least 32 bytes; its whole content is reduced with a BLAKE3
//! `derive_key`, so a hex key, a raw key or a long passphrase file all work. A password is
//! stretched with Argon2id (64 MiB, 3 passes), salted with a hash of the channel name so that
//! the same password gives different keys on different channels.

use std::io::Write;
use std::path::Path;

use zeroize::{Zeroize, Zeroizing};

use crate::wire::channel::MasterKey;

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
    let bytes = Zeroizing::new(read_secret(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?);
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
    let key = MasterKey::from_bytes(out);
    out.zeroize();
    Ok(key)
}

/// Reads a file that holds a secret, warning (as ssh does) when other users may read it or
/// it is not ours: anyone who can read a keyfile can read, and forge, the channel.
pub fn read_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    for w in secret_file_warnings(path, meta.mode(), meta.uid(), euid) {
        tracing::warn!("{w}");
    }
    let mut bytes = Vec::with_capacity(meta.len().min(1 << 20) as usize);
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
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

/// What is wrong with a secret file's mode `mode` and owner `uid`, read by user `euid`.
fn secret_file_warnings(path: &Path, mode: u32, uid: u32, euid: u32) -> Vec<String> {
    let mut out = Vec::new();
    if mode & 0o077 != 0 {
        out.push(format!(
            "{} is open to other users (mode {:04o}): anyone who can read it holds the key; run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    if uid != euid && uid != 0 {
        out.push(format!(
            "{} belongs to uid {uid}, not to you (uid {euid}): its owner can change the key",
            path.display()
        ));
    }
    out
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
        assert!(secret_file_warnings(&p, 0o100600, 0, 0).is_empty());
        let w = secret_file_warnings(&p, 0o100644, 1000, 0);
        assert!(w[0].contains("chmod 600"), "{w:?}");
        assert!(
            secret_file_warnings(&p, 0o100600, 0, 1000).is_empty(),
            "root's files are trusted"
        );
        assert!(secret_file_warnings(&p, 0o100600, 1000, 1001)[0].contains("uid 1000"));
        let p1 = from_password("pw", "chan").unwrap();
        assert_ne!(p1.0, from_password("pw", "other").unwrap().0);
    }
}

/// Publisher keys: Ed25519 key pairs that sign root records of unencrypted (or encrypted)
/// channels, so that receivers given the public key refuse any root the publisher did not sign.
pub mod publisher {
    use std::path::{Path, PathBuf};

    use ed25519_dalek::{SigningKey, VerifyingKey};

    #[derive(Debug, thiserror::Error)]
    pub enum PublisherKeyError {
        #[error("cannot read {path}: {source}")]
        Read {
            path: String,
            source: std::io::Error,
        },
        #[error(
            "{what} is not a publisher key: expected 64 hex digits (made by `lcfs keygen --sign`)"
        )]
        Format { what: String },
        #[error("cannot write {path}: {source}")]
        Write {
            path: String,
            source: std::io::Error,
        },
    }

    fn parse_hex32(text: &str, what: &str) -> Result<[u8; 32], PublisherKeyError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| PublisherKeyError::Format {
            what: what.to_owned(),
        })?;
        Ok(out)
    }

    /// Reads a signing key (the secret half) from a file written by `lcfs keygen --sign`.
    pub fn read_signing_key(path: &Path) -> Result<SigningKey, PublisherKeyError> {
        let shown = path.display().to_string();
        let text = zeroize::Zeroizing::new(super::read_secret(path).map_err(|source| {
            PublisherKeyError::Read {
                path: shown.clone(),
                source,
            }
        })?);
        let text = std::str::from_utf8(&text).map_err(|_| PublisherKeyError::Format {
            what: shown.clone(),
        })?;
        let mut secret = parse_hex32(text, &shown)?;
        let key = SigningKey::from_bytes(&secret);
        zeroize::Zeroize::zeroize(&mut secret);
        Ok(key)
    }

    /// A public key given as 64 hex digits or as the path of a `.pub` file.
    pub fn parse_public_key(arg: &str) -> Result<VerifyingKey, PublisherKeyError> {
        let text = if Path::new(arg).is_file() {
            std::fs::read_to_string(arg).map_err(|source| PublisherKeyError::Read {
                path: arg.to_owned(),
                source,
            })?
        } else {
            arg.to_owned()
        };
        let bytes = parse_hex32(&text, arg)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| PublisherKeyError::Format {
            what: arg.to_owned(),
        })
    }

    /// Writes a new key pair: the secret to `path` (mode 0600, never overwriting) and the
    /// public key to `path.pub`. Returns the public key's hex.
    pub fn write_key_pair(path: &Path) -> Result<String, PublisherKeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = hex::encode(key.verifying_key().to_bytes());
        let err = |p: &Path| {
            let path = p.display().to_string();
            move |source| PublisherKeyError::Write { path, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err(path))?;
        writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(err(path))?;
        let pub_path = PathBuf::from(format!("{}.pub", path.display()));
        std::fs::write(&pub_path, format!("{public}\n")).map_err(err(&pub_path))?;
        Ok(public)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn key_pairs_round_trip() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("pub-key");
            let public = write_key_pair(&p).unwrap();
            let sk = read_signing_key(&p).unwrap();
            let pk_file = parse_public_key(&format!("{}.pub", p.display())).unwrap();
            assert_eq!(pk_file, parse_public_key(&public).unwrap());
            assert_eq!(sk.verifying_key(), pk_file);
            assert!(write_key_pair(&p).is_err(), "never overwrites");
            assert!(parse_public_key("abcd")
                .unwrap_err()
                .to_string()
                .contains("lcfs keygen --sign"));
        }
    }
}
