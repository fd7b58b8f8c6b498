//! Proving group membership in the rendezvous.
//!
//! Every rank of a group holds the same [`GroupKey`]: derived from the cluster secret (a
//! Kubernetes secret mounted in every pod of a multi-node group), or, for a group whose ranks
//! all run on one node, a throwaway key the leader makes and hands to the ranks it starts (in
//! their environment, [`GroupKey::ENV`], never on a command line).
//!
//! The handshake is a challenge-response in both directions:
//! ```text
//! leader -> worker   challenge {nonce_l}
//! worker -> leader   hello {rank, world, tag, nonce_w, proof = MAC(key, hello | nonce_l | nonce_w | fields)}
//! leader -> worker   welcome {extra sealed under (nonce_l, nonce_w),
//!                             proof = MAC(key, welcome | nonce_l | nonce_w | fields | sealed extra)}
//! ```
//! MAC is keyed BLAKE3 over length-prefixed parts. A connection whose hello does not verify is
//! dropped without an answer and without affecting the group; the leader's proof lets workers
//! refuse an impostor leader; the welcome's `extra` (the NCCL unique id, which lets its holder
//! join the NCCL communicator) is encrypted with a keystream from the key and both nonces
//! (BLAKE3's extendable output) and authenticated by the proof, so only members can read it.

use dsvl_core::ClusterSecret;

use crate::CommError;

/// Bytes in a nonce.
pub const NONCE_BYTES: usize = 32;

/// The key shared by the ranks of one group.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey([u8; 32]);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// Environment variable through which a leader hands the key to the ranks it starts.
    pub const ENV: &'static str = "DSVL_GROUP_KEY";

    /// The key of every group in a cluster with `secret`.
    pub fn from_secret(secret: &ClusterSecret) -> Self {
        Self(secret.derive("dsvl 2026-12 tensor-parallel group v1"))
    }

    /// A throwaway key for a group started by one process.
    pub fn random() -> Self {
        Self(dsvl_core::secret::random_bytes::<32>())
    }

    /// Hex form, for [`Self::ENV`].
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The key in [`Self::ENV`], if set.
    ///
    /// # Errors
    /// Set but not 64 hex digits.
    pub fn from_env() -> Result<Option<Self>, CommError> {
        match std::env::var(Self::ENV) {
            Err(_) => Ok(None),
            Ok(v) => unhex(v.trim())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(|k| Some(Self(k)))
                .ok_or_else(|| {
                    CommError::Rendezvous(format!("{} is not a 32-byte hex key", Self::ENV))
                }),
        }
    }

    /// Keyed BLAKE3 of `label` and `parts`, each length-prefixed (no two part lists collide).
    pub(crate) fn mac(&self, label: &str, parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        h.finalize()
    }

    /// Encrypts (or decrypts: the same operation) `data` with the keystream of this key and
    /// the two nonces of one handshake.
    pub(crate) fn xor_keystream(&self, nonce_l: &[u8], nonce_w: &[u8], data: &[u8]) -> Vec<u8> {
        let stream_key = self.mac("keystream", &[nonce_l, nonce_w]);
        let mut stream = vec![0u8; data.len()];
        blake3::Hasher::new_keyed(stream_key.as_bytes()).finalize_xof().fill(&mut stream);
        data.iter().zip(stream).map(|(d, s)| d ^ s).collect()
    }

    /// Whether `proof` (hex) is the MAC of `label` and `parts`, compared in constant time.
    pub(crate) fn verify(&self, proof: Option<&str>, label: &str, parts: &[&[u8]]) -> bool {
        let Some(bytes) = proof.and_then(unhex).and_then(|b| <[u8; 32]>::try_from(b).ok()) else {
            return false;
        };
        self.mac(label, parts) == blake3::Hash::from_bytes(bytes)
    }
}

/// A fresh nonce.
pub(crate) fn nonce() -> [u8; NONCE_BYTES] {
    dsvl_core::secret::random_bytes::<NONCE_BYTES>()
}

/// Lower-case hex.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex; `None` when malformed.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let k = GroupKey::random();
        assert_eq!(unhex(&k.to_hex()).unwrap(), k.0);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(unhex("é1").is_none());
    }

    #[test]
    fn proofs_need_the_key_and_the_exact_parts() {
        let k = GroupKey::random();
        let proof = hex(k.mac("hello", &[b"a", b"bc"]).as_bytes());
        assert!(k.verify(Some(&proof), "hello", &[b"a", b"bc"]));
        assert!(!k.verify(Some(&proof), "hello", &[b"ab", b"c"]), "parts are length-prefixed");
        assert!(!k.verify(Some(&proof), "welcome", &[b"a", b"bc"]));
        assert!(!GroupKey::random().verify(Some(&proof), "hello", &[b"a", b"bc"]));
        assert!(!k.verify(None, "hello", &[b"a", b"bc"]));
        assert!(!k.verify(Some("00"), "hello", &[b"a", b"bc"]));
    }

    #[test]
    fn the_keystream_hides_and_restores() {
        let k = GroupKey::random();
        let (a, b) = (nonce(), nonce());
        let secret = b"nccl unique id bytes".to_vec();
        let sealed = k.xor_keystream(&a, &b, &secret);
        assert_ne!(sealed, secret);
        assert_eq!(k.xor_keystream(&a, &b, &sealed), secret);
        assert_ne!(k.xor_keystream(&b, &a, &sealed), secret, "bound to the handshake's nonces");
        assert_ne!(GroupKey::random().xor_keystream(&a, &b, &sealed), secret);
    }

    #[test]
    fn keys_come_from_the_secret() {
        let s = ClusterSecret::random();
        assert_eq!(GroupKey::from_secret(&s), GroupKey::from_secret(&s));
        assert_ne!(GroupKey::from_secret(&s), GroupKey::from_secret(&ClusterSecret::random()));
    }
}
