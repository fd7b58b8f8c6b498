//! The stored form of an embedding: a small self-describing header, then the raw tensor.
//!
//! ```text
//! "DSVLEMB\0" | u16 version=2 | u8 dtype | u8 ndim | u32 dims[ndim] | u16 fp_len | fingerprint |
//! u64 payload_len | [32] seal | payload
//! ```
//! Payload elements are little-endian. The seal is a keyed BLAKE3 MAC
//! ([`EmbeddingSeal::mac`]) over the cache key the value is stored under, everything before the
//! seal and the payload: no corrupted byte anywhere passes, a value copied under another key
//! (another tenant's) does not verify, and without the cluster secret no value can be forged.
//! Decoding checks every length, the seal, and that every element is finite: a corrupt,
//! misplaced, forged or NaN/Inf value is an error (the caller counts it and treats it as a
//! miss), never a wrong embedding.

use crate::secret::EmbeddingSeal;

pub use crate::embedding::EmbeddingDType;

const MAGIC: &[u8; 8] = b"DSVLEMB\0";
const VERSION: u16 = 2;

/// What a stored value says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingHeader {
    /// Element type.
    pub dtype: EmbeddingDType,
    /// Shape, `[tokens, hidden]`.
    pub shape: Vec<u32>,
    /// Model fingerprint of the producer.
    pub model_fingerprint: String,
}

/// Why a stored value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Shorter than its own header says.
    #[error("truncated value ({0})")]
    Truncated(&'static str),
    /// Not an embedding value, or an unknown version.
    #[error("not a dsvl embedding value: {0}")]
    Format(String),
    /// The seal does not verify: corrupted, stored under another key, or forged without the
    /// cluster secret.
    #[error(
        "seal mismatch (corrupted, copied from another key, or written without the cluster secret)"
    )]
    Seal,
    /// An element is NaN or infinite.
    #[error("element {index} is not finite")]
    NotFinite {
        /// The first such element.
        index: usize,
    },
}

/// Serialises `payload` (row-major little-endian elements) with its header, sealed for
/// storage under `cache_key`.
///
/// # Panics
/// When the payload length does not match the shape and dtype (a caller bug).
pub fn encode(
    header: &EmbeddingHeader,
    payload: &[u8],
    seal: &EmbeddingSeal,
    cache_key: &str,
) -> Vec<u8> {
    let elems: usize = header.shape.iter().map(|&d| d as usize).product();
    assert_eq!(
        elems * header.dtype.size(),
        payload.len(),
        "payload does not match shape and dtype"
    );
    let fp = header.model_fingerprint.as_bytes();
    let mut out = Vec::with_capacity(64 + fp.len() + 4 * header.shape.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(header.dtype.code());
    out.push(header.shape.len() as u8);
    for d in &header.shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&(fp.len() as u16).to_le_bytes());
    out.extend_from_slice(fp);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = seal.mac(cache_key, &out, payload);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(payload);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// Parses and verifies a value read from under `cache_key`; returns the header and the payload.
///
/// # Errors
/// Truncated, malformed, a seal that does not verify, or a NaN/Inf element.
pub fn decode<'v>(
    value: &'v [u8],
    seal: &EmbeddingSeal,
    cache_key: &str,
) -> Result<(EmbeddingHeader, &'v [u8]), CodecError> {
    let mut r = Reader(value);
    if r.take(8, "magic")? != MAGIC {
        return Err(CodecError::Format("bad magic".into()));
    }
    let version = u16::from_le_bytes(r.take(2, "version")?.try_into().expect("2 bytes"));
    if version != VERSION {
        return Err(CodecError::Format(format!("version {version}")));
    }
    let dtype = r.take(1, "dtype")?[0];
    let dtype = EmbeddingDType::from_code(dtype)
        .ok_or_else(|| CodecError::Format(format!("dtype code {dtype}")))?;
    let ndim = r.take(1, "rank")?[0] as usize;
    let shape: Vec<u32> = (0..ndim)
        .map(|_| r.take(4, "shape").map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))))
        .collect::<Result<_, _>>()?;
    let fp_len =
        u16::from_le_bytes(r.take(2, "fingerprint length")?.try_into().expect("2 bytes")) as usize;
    let fp = std::str::from_utf8(r.take(fp_len, "fingerprint")?)
        .map_err(|_| CodecError::Format("fingerprint is not UTF-8".into()))?;
    let len = u64::from_le_bytes(r.take(8, "payload length")?.try_into().expect("8 bytes"));
    let header = &value[..value.len() - r.0.len()];
    let sum: [u8; 32] = r.take(32, "seal")?.try_into().expect("32 bytes");
    let elems = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(u64::from(d)))
        .ok_or_else(|| CodecError::Format("shape overflows".into()))?;
    if elems.checked_mul(dtype.size() as u64) != Some(len) {
        return Err(CodecError::Format(format!(
            "payload of {len} bytes for shape {shape:?} {}",
            dtype.name()
        )));
    }
    let payload = r.take(len as usize, "payload")?;
    if !r.0.is_empty() {
        return Err(CodecError::Format(format!("{} trailing bytes", r.0.len())));
    }
    // `blake3::Hash` compares in constant time.
    if seal.mac(cache_key, header, payload) != blake3::Hash::from_bytes(sum) {
        return Err(CodecError::Seal);
    }
    check_finite(dtype, payload)?;
    Ok((EmbeddingHeader { dtype, shape, model_fingerprint: fp.to_string() }, payload))
}

/// Refuses a payload holding NaN or an infinity (a poisoned or broken producer): one such row
/// would turn every later hidden state of the sequence into NaN.
///
/// # Errors
/// [`CodecError::NotFinite`] with the first offending element.
pub fn check_finite(dtype: EmbeddingDType, payload: &[u8]) -> Result<(), CodecError> {
    // An element is NaN or infinite exactly when its exponent bits are all ones.
    let bad = match dtype {
        EmbeddingDType::F32 => payload.chunks_exact(4).position(|b| {
            u32::from_le_bytes(b.try_into().expect("4 bytes")) & 0x7f80_0000 == 0x7f80_0000
        }),
        EmbeddingDType::BF16 => payload
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
        EmbeddingDType::F16 => payload
            .chunks_exact(2)
            .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
    };
    bad.map_or(Ok(()), |index| Err(CodecError::NotFinite { index }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::ClusterSecret;

    fn sample() -> (EmbeddingHeader, Vec<u8>) {
        let h = EmbeddingHeader {
            dtype: EmbeddingDType::BF16,
            shape: vec![3, 4],
            model_fingerprint: "abc".into(),
        };
        (h, (0..24).collect())
    }

    #[test]
    fn round_trips() {
        let (h, p) = sample();
        let seal = EmbeddingSeal::keyed(&ClusterSecret::random());
        let v = encode(&h, &p, &seal, "k");
        let (h2, p2) = decode(&v, &seal, "k").unwrap();
        assert_eq!((h2, p2), (h, p.as_slice()));
    }

    #[test]
    fn every_truncation_and_any_flipped_bit_is_rejected() {
        let (h, p) = sample();
        let seal = EmbeddingSeal::public();
        let v = encode(&h, &p, &seal, "k");
        for n in 0..v.len() {
            assert!(decode(&v[..n], &seal, "k").is_err(), "truncated to {n}");
        }
        for i in 0..v.len() {
            let mut w = v.clone();
            w[i] ^= 0x10;
            assert!(decode(&w, &seal, "k").is_err(), "flip at {i} accepted");
        }
        let mut long = v.clone();
        long.push(0);
        assert!(decode(&long, &seal, "k").is_err());
    }

    #[test]
    fn moved_or_forged_values_do_not_verify() {
        let (h, p) = sample();
        let ours = EmbeddingSeal::keyed(&ClusterSecret::random());
        let v = encode(&h, &p, &ours, "tenant-a:img");
        assert_eq!(decode(&v, &ours, "tenant-b:img").unwrap_err(), CodecError::Seal);
        // Written by someone without our secret (with another one, or none at all).
        for forger in [EmbeddingSeal::keyed(&ClusterSecret::random()), EmbeddingSeal::public()] {
            let forged = encode(&h, &p, &forger, "tenant-a:img");
            assert_eq!(decode(&forged, &ours, "tenant-a:img").unwrap_err(), CodecError::Seal);
        }
    }

    #[test]
    fn nan_and_inf_are_refused_even_when_sealed() {
        let seal = EmbeddingSeal::public();
        let cases: [(EmbeddingDType, Vec<u8>); 4] = [
            (
                EmbeddingDType::F32,
                [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (
                EmbeddingDType::F32,
                [f32::NEG_INFINITY, 0.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (EmbeddingDType::BF16, vec![0x80, 0x3f, 0xc0, 0x7f]), // 1.0, NaN
            (EmbeddingDType::F16, vec![0x00, 0x7c, 0x00, 0x3c]),  // +Inf, 1.0
        ];
        for (dtype, payload) in cases {
            let h = EmbeddingHeader { dtype, shape: vec![1, 2], model_fingerprint: "fp".into() };
            let v = encode(&h, &payload, &seal, "k");
            assert!(
                matches!(decode(&v, &seal, "k"), Err(CodecError::NotFinite { .. })),
                "{dtype:?}"
            );
        }
        let fine: Vec<u8> = [f32::MAX, -0.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(check_finite(EmbeddingDType::F32, &fine).is_ok());
    }
}
