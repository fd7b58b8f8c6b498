//! The stored form of an embedding: a small self-describing header, then the raw tensor.
//!
//! ```text
//! "DSVLEMB\0" | u16 version=1 | u8 dtype | u8 ndim | u32 dims[ndim] | u16 fp_len | fingerprint |
//! u64 payload_len | [32] BLAKE3(everything before the checksum, then the payload) | payload
//! ```
//! Payload elements are little-endian. The checksum covers the header too, so no corrupted
//! byte anywhere passes. Decoding checks every length and the checksum: a corrupt or truncated value is an error
//! (the caller counts it and treats it as a miss), never a wrong embedding.

pub use crate::embedding::EmbeddingDType;

const MAGIC: &[u8; 8] = b"DSVLEMB\0";
const VERSION: u16 = 1;

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
    /// The payload does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
}

/// Serialises `payload` (row-major little-endian elements) with its header.
///
/// # Panics
/// When the payload length does not match the shape and dtype (a caller bug).
pub fn encode(header: &EmbeddingHeader, payload: &[u8]) -> Vec<u8> {
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
    let sum = checksum(&out, payload);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn checksum(header: &[u8], payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
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

/// Parses and verifies a stored value; returns the header and the payload.
pub fn decode(value: &[u8]) -> Result<(EmbeddingHeader, &[u8]), CodecError> {
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
    let sum: [u8; 32] = r.take(32, "checksum")?.try_into().expect("32 bytes");
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
    if checksum(header, payload).as_bytes() != &sum {
        return Err(CodecError::Checksum);
    }
    Ok((EmbeddingHeader { dtype, shape, model_fingerprint: fp.to_string() }, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let v = encode(&h, &p);
        let (h2, p2) = decode(&v).unwrap();
        assert_eq!((h2, p2), (h, p.as_slice()));
    }

    #[test]
    fn every_truncation_and_any_flipped_bit_is_rejected() {
        let (h, p) = sample();
        let v = encode(&h, &p);
        for n in 0..v.len() {
            assert!(decode(&v[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..v.len() {
            let mut w = v.clone();
            w[i] ^= 0x10;
            assert!(decode(&w).is_err(), "flip at {i} accepted");
        }
        let mut long = v.clone();
        long.push(0);
        assert!(decode(&long).is_err());
    }
}
