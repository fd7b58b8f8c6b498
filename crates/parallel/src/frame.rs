//! The wire format of the control channel: a JSON header plus raw tensors.
//!
//! ```text
//! "DSVL" | u32 header length | header (JSON) | u32 tensor count |
//!   per tensor: u8 dtype | u8 rank | u64 dims.. | u64 byte length | bytes (little endian)
//! ```
//! JSON keeps the small, evolving parts (plans, hellos) readable; tensors travel as raw bytes.

use std::io::{Read, Write};

use candle_core::{DType, Device, Tensor};

use crate::tensor_bytes;

const MAGIC: &[u8; 4] = b"DSVL";

/// How large a frame may be. Lengths on the wire are checked against these before anything
/// is allocated, and buffers grow only as bytes actually arrive, so a peer that announces a
/// huge frame and sends nothing costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest JSON header.
    pub max_header: usize,
    /// Most tensors in one frame.
    pub max_tensors: u32,
    /// Largest tensor.
    pub max_tensor_bytes: u64,
}

impl FrameLimits {
    /// Between members of a running group (plans, activations, KV geometry).
    pub const GROUP: Self =
        Self { max_header: 64 << 20, max_tensors: 4096, max_tensor_bytes: 16 << 30 };
    /// The leader's welcome, read before its proof is checked: KV geometry and the NCCL id.
    pub const WELCOME: Self = Self { max_header: 1 << 20, max_tensors: 0, max_tensor_bytes: 0 };
    /// Before a peer has proved membership: a small header, no tensors.
    pub const HANDSHAKE: Self = Self { max_header: 64 << 10, max_tensors: 0, max_tensor_bytes: 0 };
}

/// Reads exactly `len` bytes, growing the buffer as they arrive (1 MiB reserved ahead).
fn read_len(r: &mut impl Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(1 << 20));
    let got = r.take(len as u64).read_to_end(&mut buf)?;
    if got != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// A tensor as bytes on the wire.
#[derive(Debug, Clone)]
pub struct WireTensor {
    dtype: DType,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

fn dtype_code(d: DType) -> Option<u8> {
    Some(match d {
        DType::U8 => 0,
        DType::U32 => 1,
        DType::I64 => 2,
        DType::BF16 => 3,
        DType::F16 => 4,
        DType::F32 => 5,
        DType::F64 => 6,
        _ => return None,
    })
}

fn code_dtype(c: u8) -> Option<DType> {
    Some(match c {
        0 => DType::U8,
        1 => DType::U32,
        2 => DType::I64,
        3 => DType::BF16,
        4 => DType::F16,
        5 => DType::F32,
        6 => DType::F64,
        _ => return None,
    })
}

impl WireTensor {
    /// Copies a tensor (from any device) into wire form.
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let dims = t.dims().to_vec();
        let bytes = tensor_bytes::to_le_bytes(&t.to_device(&Device::Cpu)?)?;
        Ok(Self { dtype: t.dtype(), dims, bytes })
    }

    /// Restores the tensor on `device`, with the original shape.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        tensor_bytes::from_le_bytes(&self.bytes, self.dtype, &self.dims, device)
    }

    /// Shape of the tensor.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
}

/// One control-channel message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Small structured part.
    pub header: serde_json::Value,
    /// Bulk attachments.
    pub tensors: Vec<WireTensor>,
}

impl Message {
    /// A message without attachments.
    pub fn new(header: serde_json::Value) -> Self {
        Self { header, tensors: Vec::new() }
    }

    /// The header's `kind` field.
    pub fn kind(&self) -> &str {
        self.header.get("kind").and_then(|k| k.as_str()).unwrap_or("")
    }

    /// Serialises onto `w`.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let header = serde_json::to_vec(&self.header).map_err(std::io::Error::other)?;
        let mut buf = Vec::with_capacity(16 + header.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            buf.push(
                dtype_code(t.dtype).ok_or_else(|| std::io::Error::other("unsupported dtype"))?,
            );
            buf.push(t.dims.len() as u8);
            for d in &t.dims {
                buf.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            buf.extend_from_slice(&(t.bytes.len() as u64).to_le_bytes());
            w.write_all(&buf)?;
            buf.clear();
            w.write_all(&t.bytes)?;
        }
        if !buf.is_empty() {
            w.write_all(&buf)?;
        }
        w.flush()
    }

    /// Reads one message from a group member ([`FrameLimits::GROUP`]).
    pub fn read_from(r: &mut impl Read) -> std::io::Result<Self> {
        Self::read_limited(r, FrameLimits::GROUP)
    }

    /// Reads one message from `r`, refusing frames beyond `limits` before allocating them.
    pub fn read_limited(r: &mut impl Read, limits: FrameLimits) -> std::io::Result<Self> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid(format!("bad frame magic {magic:?}")));
        }
        let header_len = read_u32(r)? as usize;
        if header_len > limits.max_header {
            return Err(invalid(format!("header of {header_len} bytes")));
        }
        let header = read_len(r, header_len)?;
        let header =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("header: {e}")))?;
        let count = read_u32(r)?;
        if count > limits.max_tensors {
            return Err(invalid(format!("{count} tensors in one frame")));
        }
        let mut tensors = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let mut tag = [0u8; 2];
            r.read_exact(&mut tag)?;
            let dtype =
                code_dtype(tag[0]).ok_or_else(|| invalid(format!("dtype code {}", tag[0])))?;
            let dims = (0..tag[1])
                .map(|_| read_u64(r).map(|d| d as usize))
                .collect::<std::io::Result<Vec<_>>>()?;
            let len = read_u64(r)?;
            let expected =
                dims.iter().try_fold(dtype.size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64));
            if len > limits.max_tensor_bytes || Some(len) != expected {
                return Err(invalid(format!("tensor of {len} bytes for shape {dims:?} {dtype:?}")));
            }
            let bytes = read_len(r, len as usize)?;
            tensors.push(WireTensor { dtype, dims, bytes });
        }
        Ok(Self { header, tensors })
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_header_and_tensors() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12., &dev)?.reshape((3, 4))?;
        let b = Tensor::new(&[1u32, 2, 3], &dev)?;
        let c = a.to_dtype(DType::BF16)?;
        let msg = Message {
            header: serde_json::json!({"kind": "plan", "n": 3}),
            tensors: vec![
                WireTensor::from_tensor(&a)?,
                WireTensor::from_tensor(&b)?,
                WireTensor::from_tensor(&c)?,
            ],
        };
        let mut buf = Vec::new();
        msg.write_to(&mut buf)?;
        let back = Message::read_from(&mut buf.as_slice())?;
        assert_eq!(back.kind(), "plan");
        assert_eq!(back.tensors[0].to_tensor(&dev)?.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        assert_eq!(back.tensors[1].to_tensor(&dev)?.to_vec1::<u32>()?, vec![1, 2, 3]);
        assert_eq!(back.tensors[2].to_tensor(&dev)?.dtype(), DType::BF16);
        Ok(())
    }

    #[test]
    fn announced_sizes_are_bounded_before_allocation() {
        // A header claiming 4 GiB, a tensor claiming 16 EiB: refused from the length alone.
        let mut huge = b"DSVL".to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::read_limited(&mut huge.as_slice(), FrameLimits::GROUP).is_err());
        let mut frame = Vec::new();
        Message::new(serde_json::json!({"kind": "x"})).write_to(&mut frame).unwrap();
        frame.truncate(frame.len() - 4);
        frame.extend_from_slice(&1u32.to_le_bytes()); // one tensor
        frame.extend_from_slice(&[5, 2]); // f32, rank 2
        frame.extend_from_slice(&(1u64 << 62).to_le_bytes());
        frame.extend_from_slice(&(1u64 << 62).to_le_bytes()); // overflows
        frame.extend_from_slice(&0u64.to_le_bytes());
        let e = Message::read_limited(&mut frame.as_slice(), FrameLimits::GROUP).unwrap_err();
        assert!(e.to_string().contains("tensor of 0 bytes"), "{e}");
        // Before authentication a frame may carry no tensors and only a small header.
        let mut with_tensor = Vec::new();
        let t = WireTensor::from_tensor(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        Message { header: serde_json::json!({}), tensors: vec![t] }
            .write_to(&mut with_tensor)
            .unwrap();
        assert!(Message::read_limited(&mut with_tensor.as_slice(), FrameLimits::HANDSHAKE).is_err());
        let mut big = Vec::new();
        Message::new(serde_json::json!({"pad": "x".repeat(70_000)})).write_to(&mut big).unwrap();
        assert!(Message::read_limited(&mut big.as_slice(), FrameLimits::HANDSHAKE).is_err());
        assert!(Message::read_limited(&mut big.as_slice(), FrameLimits::GROUP).is_ok());
    }

    #[test]
    fn rejects_garbage_and_lying_lengths() {
        assert!(Message::read_from(&mut &b"HTTP/1.1 200 OK"[..]).is_err());
        let mut buf = Vec::new();
        Message::new(serde_json::json!({"kind": "x"})).write_to(&mut buf).unwrap();
        buf.truncate(buf.len() - 1);
        assert!(Message::read_from(&mut buf.as_slice()).is_err());
    }
}
