//! The cluster secret: one file (a Kubernetes secret in a cluster, a throwaway file under
//! `dsvl up`) from which every purpose derives its own key, so one leaked derived key says
//! nothing about the others:
//!
//! * the **embedding seal** ([`EmbeddingSeal`]): a keyed BLAKE3 MAC binding a stored embedding
//!   to its cache key, so a value copied to another key (another tenant's), or written by anyone
//!   without the secret, fails verification and is a miss;
//! * the **group key** of tensor-parallel ranks (`dsvl_parallel::auth`): membership proofs in the
//!   rendezvous and the sealed NCCL id.
//!
//! The gateway never holds it: it only asks Redis whether keys exist.

use std::path::Path;

/// Fewest bytes a secret file may hold (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// The shared secret of one cluster.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// A secret file that cannot serve as one.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Unreadable.
    #[error("cannot read the cluster secret {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Too short to be a key.
    #[error("the cluster secret {path} holds {len} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")]
    TooShort {
        /// The file.
        path: String,
        /// Bytes after trimming whitespace.
        len: usize,
    },
}

impl ClusterSecret {
    /// Reads a secret file; surrounding whitespace (a trailing newline) is not part of it.
    ///
    /// # Errors
    /// Unreadable, or shorter than [`MIN_SECRET_BYTES`].
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw = std::fs::read(path)
            .map_err(|source| SecretError::Read { path: path.display().to_string(), source })?;
        Self::from_bytes(&raw).ok_or(SecretError::TooShort {
            path: path.display().to_string(),
            len: raw.trim_ascii().len(),
        })
    }

    /// A secret from bytes (whitespace around them trimmed); `None` when too short.
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        let s = raw.trim_ascii();
        (s.len() >= MIN_SECRET_BYTES).then(|| Self(s.to_vec()))
    }

    /// A fresh random secret (a throwaway cluster: `dsvl up`, tests): 256 random bits as 64
    /// hex digits, so it can be written to a file as it is.
    pub fn random() -> Self {
        Self(
            random_bytes::<32>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        )
    }

    /// The secret as a file body, for writing a throwaway secret file ([`Self::random`]).
    pub fn to_file_contents(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// The key for one purpose (`context`: a fixed, unique string per purpose and version).
    pub fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }
}

/// The cluster secret a service runs with, from its `--cluster-secret-file`. `needs` names what
/// requires one in this configuration (a shared cache, a group spanning nodes); without a file
/// that is refused unless the service was started with `--insecure`, so nothing runs without
/// integrity by accident.
///
/// # Errors
/// An unreadable or short file, or a missing one where `needs` requires it.
pub fn cluster_secret(
    file: Option<&Path>,
    insecure: bool,
    needs: Option<&str>,
) -> Result<Option<ClusterSecret>, crate::ConfigError> {
    let bad = |reason: String| crate::ConfigError { field: "cluster-secret-file", reason };
    match (file, needs) {
        (Some(path), _) => ClusterSecret::from_file(path).map(Some).map_err(|e| bad(e.to_string())),
        (None, Some(what)) if !insecure => Err(bad(format!(
            "{what} needs the cluster secret (DSVL_CLUSTER_SECRET_FILE); pass --insecure to run without integrity protection"
        ))),
        (None, _) => Ok(None),
    }
}

/// `N` bytes from the operating system's random source.
///
/// # Panics
/// When the operating system has no random source (nothing secure can run then).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

const SEAL_CONTEXT: &str = "dsvl 2026-12 embedding seal v2";

/// The key that seals stored embeddings ([`crate::codec`]).
#[derive(Clone)]
pub struct EmbeddingSeal {
    key: [u8; 32],
    keyed: bool,
}

impl std::fmt::Debug for EmbeddingSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmbeddingSeal {{ keyed: {} }}", self.keyed)
    }
}

impl EmbeddingSeal {
    /// The seal of a cluster with `secret`.
    pub fn keyed(secret: &ClusterSecret) -> Self {
        Self { key: secret.derive(SEAL_CONTEXT), keyed: true }
    }

    /// The seal without a secret (`--insecure`, or no shared cache): values are still bound to
    /// their key, but anyone can forge one.
    pub fn public() -> Self {
        Self { key: blake3::derive_key(SEAL_CONTEXT, b"no secret"), keyed: false }
    }

    /// `secret`'s seal, or the public one.
    pub fn from_secret(secret: Option<&ClusterSecret>) -> Self {
        secret.map_or_else(Self::public, Self::keyed)
    }

    /// Whether forging needs the cluster secret.
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// The MAC of a value stored under `cache_key` whose header bytes are `header`.
    pub fn mac(&self, cache_key: &str, header: &[u8], payload: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(cache_key.len() as u64).to_le_bytes());
        h.update(cache_key.as_bytes());
        h.update(header);
        h.update(payload);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_trimmed_and_must_be_long_enough() {
        assert!(ClusterSecret::from_bytes(b"short\n").is_none());
        let a = ClusterSecret::from_bytes(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let b = ClusterSecret::from_bytes(b"  0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(a.derive("x"), b.derive("x"));
        assert_ne!(a.derive("x"), a.derive("y"), "each purpose has its own key");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "tiny").unwrap();
        assert!(matches!(
            ClusterSecret::from_file(&path),
            Err(SecretError::TooShort { len: 4, .. })
        ));
        let r = ClusterSecret::random();
        std::fs::write(&path, r.to_file_contents()).unwrap();
        assert_eq!(ClusterSecret::from_file(&path).unwrap().derive("x"), r.derive("x"));
    }

    #[test]
    fn seals_bind_key_and_secret() {
        let s1 = EmbeddingSeal::keyed(&ClusterSecret::random());
        let s2 = EmbeddingSeal::keyed(&ClusterSecret::random());
        let m = s1.mac("k1", b"h", b"p");
        assert_eq!(m, s1.mac("k1", b"h", b"p"));
        assert_ne!(m, s1.mac("k2", b"h", b"p"));
        assert_ne!(m, s2.mac("k1", b"h", b"p"));
        assert_ne!(m, EmbeddingSeal::public().mac("k1", b"h", b"p"));
        // The key's length is part of the MAC: no shifting bytes between key and header.
        assert_ne!(s1.mac("k1h", b"", b"p"), s1.mac("k1", b"h", b"p"));
    }
}
