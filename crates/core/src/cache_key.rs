//! Content-addressed keys for the embedding cache.
//!
//! A key is `dsvl:emb:v2:` + the full 256-bit BLAKE3 hash (64 hex digits) of length-prefixed,
//! domain-tagged fields: the tenant salt (set by the gateway, never by the client), the model
//! fingerprint (vision tower + aligner weights and config), the embedding dtype, the
//! preprocessing version, and the image's [`ImageDigest`] (BLAKE3 of its bytes). The digest is
//! computed once per process when an image arrives and serves routing, the caller's
//! `client_digest` check and the key alike, so no process hashes an image twice. (v1 keys
//! hashed the image bytes directly.) Length prefixes make the encoding injective, so
//! no two different field tuples hash the same input; the full-width hash keeps collisions out
//! of reach (truncated keys have caused cross-image collisions in other systems).

/// Version of the image preprocessing algorithm (decoding rules, resize, padding, rescale);
/// part of every key, so a change there never serves embeddings made by an older pipeline.
pub const PREPROCESS_VERSION: u32 = 1;

/// Prefix of every embedding key.
pub const KEY_PREFIX: &str = "dsvl:emb:v2:";
/// Prefix of the cross-replica single-flight lease of a key.
pub const LEASE_PREFIX: &str = "dsvl:lease:v2:";

/// Inputs of a cache key.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// Tenant salt (may be empty for a single-tenant deployment).
    pub salt: &'a [u8],
    /// Fingerprint of the vision tower + aligner weights and config.
    pub model_fingerprint: &'a str,
    /// Element type of the stored embedding (`f32`, `bf16`, ...).
    pub dtype: &'a str,
    /// Preprocessing algorithm version.
    pub preprocess_version: u32,
    /// Digest of the encoded image bytes as received.
    pub image: &'a ImageDigest,
}

fn field(h: &mut blake3::Hasher, tag: &[u8], value: &[u8]) {
    h.update(&(tag.len() as u64).to_le_bytes());
    h.update(tag);
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value);
}

/// The cache key of an image's embedding.
pub fn embedding_key(p: &KeyParts<'_>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"dsvl/embedding-key/v2");
    field(&mut h, b"salt", p.salt);
    field(&mut h, b"model", p.model_fingerprint.as_bytes());
    field(&mut h, b"dtype", p.dtype.as_bytes());
    field(&mut h, b"preprocess", &p.preprocess_version.to_le_bytes());
    field(&mut h, b"image", &p.image.0);
    format!("{KEY_PREFIX}{}", h.finalize().to_hex())
}

/// The lease key guarding the computation of `key` across replicas.
pub fn lease_key(key: &str) -> String {
    format!("{LEASE_PREFIX}{}", key.strip_prefix(KEY_PREFIX).unwrap_or(key))
}

/// BLAKE3 of an image's encoded bytes: the routing hash, the `client_digest` the gateway sends
/// and the image field of the cache key. Compute it once per process, where the image arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    /// Hashes `image`.
    pub fn of(image: &[u8]) -> Self {
        Self(*blake3::hash(image).as_bytes())
    }

    /// Lower-case hex (64 digits).
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex).ok().map(|h| Self(*h.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(salt: &'a [u8], image: &'a [u8]) -> KeyParts<'a> {
        let image = Box::leak(Box::new(ImageDigest::of(image)));
        KeyParts { salt, model_fingerprint: "fp", dtype: "bf16", preprocess_version: 1, image }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = embedding_key(&parts(b"t1", b"img"));
        assert!(base.starts_with(KEY_PREFIX) && base.len() == KEY_PREFIX.len() + 64);
        assert_ne!(base, embedding_key(&parts(b"t2", b"img")));
        assert_ne!(base, embedding_key(&parts(b"t1", b"img2")));
        assert_ne!(
            base,
            embedding_key(&KeyParts { model_fingerprint: "fp2", ..parts(b"t1", b"img") })
        );
        assert_ne!(base, embedding_key(&KeyParts { dtype: "f32", ..parts(b"t1", b"img") }));
        assert_ne!(
            base,
            embedding_key(&KeyParts { preprocess_version: 2, ..parts(b"t1", b"img") })
        );
        assert_eq!(base, embedding_key(&parts(b"t1", b"img")));
    }

    #[test]
    fn length_prefixes_prevent_field_shifting() {
        // Moving a byte from the salt into the image must not give the same key.
        assert_ne!(embedding_key(&parts(b"ab", b"c")), embedding_key(&parts(b"a", b"bc")));
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = ImageDigest::of(b"png bytes");
        assert_eq!(d.to_hex(), blake3::hash(b"png bytes").to_hex().to_string());
        assert_eq!(ImageDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(ImageDigest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(ImageDigest::from_hex("abc"), None);
    }

    #[test]
    fn lease_key_is_derived() {
        let k = embedding_key(&parts(b"", b"x"));
        assert!(lease_key(&k).starts_with(LEASE_PREFIX));
        assert_ne!(lease_key(&k), k);
    }
}
