//! NCCL collectives for ranks on GPUs (feature `nccl`).
//!
//! Written against the cudarc that candle re-exports (`candle_core::cuda_backend::cudarc`,
//! cudarc 0.19): one `Comm` per process, created from the NCCL unique id that the leader puts
//! in its rendezvous welcome, on the rank's CUDA stream. `Comm` is not thread-safe; the
//! communicator is created on, and stays on, the rank's model thread (it is not `Send`).
//! Collectives run as candle custom ops so they read and write device memory in place of
//! copying through the host.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::{CommError, Communicator};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// A fresh NCCL unique id (leader only), as bytes for the rendezvous welcome.
pub fn new_unique_id() -> Result<Vec<u8>, CommError> {
    let id = Id::new().map_err(|e| CommError::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// [`Communicator`] over NCCL.
pub struct NcclCommunicator {
    comm: Comm,
}

impl NcclCommunicator {
    /// Joins the NCCL clique `id` as `rank` of `world` on `device` (a CUDA device).
    pub fn new(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Self, CommError> {
        let Device::Cuda(device) = device else {
            return Err(CommError::Nccl("NCCL needs a CUDA device".into()));
        };
        if id.len() != NCCL_ID_BYTES {
            return Err(CommError::Nccl(format!("NCCL id of {} bytes", id.len())));
        }
        let mut internal = [0 as std::ffi::c_char; NCCL_ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(device.cuda_stream(), rank, world, Id::uninit(internal))
            .map_err(|e| CommError::Nccl(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self { comm })
    }
}

enum Op {
    AllReduce,
    AllGather,
}

struct Collective<'a> {
    comm: &'a Comm,
    op: Op,
}

impl Collective<'_> {
    fn run<T>(
        &self,
        s: &CudaStorage,
        l: &Layout,
        world: usize,
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl: contiguous tensors only")
        };
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let n = end - start;
        let dev = &s.device;
        let (out_len, shape) = match self.op {
            Op::AllReduce => (n, l.shape().clone()),
            Op::AllGather => {
                let mut dims = vec![world];
                dims.extend_from_slice(l.shape().dims());
                (n * world, Shape::from_dims(&dims))
            }
        };
        let mut dst = dev.alloc_zeros::<T>(out_len)?;
        match self.op {
            Op::AllReduce => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Op::AllGather => self.comm.all_gather(&src, &mut dst),
        }
        .map_err(|e| candle_core::Error::Msg(format!("nccl: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), shape))
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.op {
            Op::AllReduce => "nccl-all-reduce",
            Op::AllGather => "nccl-all-gather",
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let world = self.comm.world_size();
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l, world),
            DType::BF16 => self.run::<half::bf16>(s, l, world),
            DType::F16 => self.run::<half::f16>(s, l, world),
            other => candle_core::bail!("nccl: dtype {other:?}"),
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor, CommError> {
        Ok(x.contiguous()?.apply_op1_no_bwd(&Collective { comm: &self.comm, op: Op::AllReduce })?)
    }

    fn all_gather_last_dim(&self, x: &Tensor) -> Result<Tensor, CommError> {
        // NCCL concatenates rank-major along a new leading axis; move it next to the last axis.
        let gathered = x
            .contiguous()?
            .apply_op1_no_bwd(&Collective { comm: &self.comm, op: Op::AllGather })?;
        // gathered: [world, d0, .., d(n-1)] -> [d0, .., d(n-2), world, d(n-1)].
        let dims = x.dims();
        let mut perm: Vec<usize> = (1..dims.len()).collect();
        perm.push(0);
        perm.push(dims.len());
        let moved = gathered.permute(perm)?.contiguous()?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one axis") *= self.comm.world_size();
        Ok(moved.reshape(out_dims)?)
    }
}
