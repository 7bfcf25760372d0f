//! The NCCL communicator (feature `nccl`): the collective every multi-GPU PyTorch job uses,
//! through cudarc's safe `nccl` API. NCCL's unique id travels over the TCP [`rendezvous`], so
//! the same code runs on one host and across hosts.
//!
//! Buffers are host slices: each collective uploads them to a device buffer of its own stream,
//! runs NCCL on it and reads the result back. What the trainer reduces is small (the adapter
//! gradients, a few to a few tens of MB per optimizer step), so the two copies cost
//! milliseconds against steps of about a second.
//!
//! `libnccl` is loaded at run time by cudarc, which asks the dynamic loader for `libnccl.so` or
//! `libnccl.so.<CUDA major>`; NCCL and its pip wheel ship `libnccl.so.2`. The launcher
//! ([`crate::launch`]) puts a folder where `libnccl.so` resolves on the children's
//! `LD_LIBRARY_PATH` ([`crate::nccl_loader_dir`]); a process started by hand needs the same
//! (`ln -s .../libnccl.so.2 <dir>/libnccl.so` and `LD_LIBRARY_PATH=<dir>:$LD_LIBRARY_PATH`).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::options::RendezvousOptions;
use crate::rendezvous::{rendezvous, Rendezvous};
use crate::world::World;

/// One rank's NCCL communicator on one GPU.
pub struct Nccl {
    inner: Mutex<Inner>,
    rank: usize,
    world_size: usize,
}

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls on one communicator
// are not concurrent; every use goes through the mutex.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

/// CUDA devices visible to this process; an error naming the driver library when it cannot be
/// loaded (cudarc would panic).
pub fn cuda_device_count() -> Result<usize> {
    // SAFETY: only tries to load the library (libloading), nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Nccl(
            "the CUDA driver library (libcuda.so) could not be loaded: data-parallel training \
             needs NVIDIA GPUs and their driver"
                .into(),
        ));
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| nccl_err("cuDeviceGetCount", e))
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Nccl(format!("{what}: {e:?}"))
}

impl Nccl {
    /// Joins the world on GPU `ordinal` (usually `world.local_rank`): rank 0 makes NCCL's
    /// unique id, the rendezvous at `master_addr:master_port` hands it to every rank, and each
    /// initialises its communicator. The rendezvous is returned for the watchdog
    /// ([`Rendezvous::into_watchdog`]).
    pub fn connect(
        world: &World,
        ordinal: usize,
        opts: &RendezvousOptions,
    ) -> Result<(Nccl, Rendezvous)> {
        // cudarc panics on a library it cannot load; say what is missing instead.
        let gpus = cuda_device_count()?;
        if ordinal >= gpus {
            return Err(Error::Nccl(format!(
                "rank {} asks for GPU {ordinal} (LOCAL_RANK) but this host has {gpus}",
                world.rank
            )));
        }
        // SAFETY: only tries to load the library (libloading), nothing is called.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::Nccl(format!(
                "libnccl.so could not be loaded. NCCL ships libnccl.so.2 (system packages, or \
                 the pip wheel nvidia-nccl-cu12 under site-packages/nvidia/nccl/lib); link \
                 libnccl.so to it in a folder on LD_LIBRARY_PATH, or start the processes with \
                 `news2stock train --nproc-per-node N`, whose launcher does it{}",
                match crate::nccl_library_dir() {
                    Some(d) => format!(" (found NCCL in {})", d.display()),
                    None => String::new(),
                }
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| nccl_err(&format!("CUDA device {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let mut id_err = None;
        let rdv = rendezvous(
            world,
            || match Id::new() {
                Ok(id) => id.internal().iter().map(|c| *c as u8).collect(),
                Err(e) => {
                    id_err = Some(nccl_err("ncclGetUniqueId", e));
                    Vec::new()
                }
            },
            opts,
        )?;
        if let Some(e) = id_err {
            return Err(e);
        }
        let bytes = rdv.payload();
        if bytes.len() != 128 {
            return Err(Error::Nccl(format!(
                "the NCCL unique id from rank 0 has {} bytes; expected 128 (did rank 0 fail to \
                 load libnccl?)",
                bytes.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            world.rank,
            world.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok((
            Nccl {
                inner: Mutex::new(Inner { comm, stream }),
                rank: world.rank,
                world_size: world.world_size,
            },
            rdv,
        ))
    }

    fn run(
        &self,
        buf: &mut [f32],
        what: &str,
        op: impl FnOnce(
            &Comm,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<
            cudarc::nccl::result::NcclStatus,
            cudarc::nccl::result::NcclError,
        >,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let inner = self
            .inner
            .lock()
            .map_err(|_| Error::Nccl(format!("{what}: a previous collective panicked")))?;
        let mut dev = inner
            .stream
            .clone_htod(buf)
            .map_err(|e| nccl_err(&format!("{what}: upload"), e))?;
        op(&inner.comm, &mut dev).map_err(|e| nccl_err(what, e))?;
        inner
            .stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| nccl_err(&format!("{what}: download"), e))?;
        inner
            .stream
            .synchronize()
            .map_err(|e| nccl_err(&format!("{what}: synchronize"), e))
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.run(buf, "ncclAllReduce", |c, d| {
            c.all_reduce_in_place(d, &ReduceOp::Sum)
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.run(buf, "ncclBroadcast", |c, d| {
            c.broadcast_in_place(d, root as i32)
        })
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }
}
