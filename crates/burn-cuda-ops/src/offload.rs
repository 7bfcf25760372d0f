//! Parking a tensor in pinned host memory while the GPU does other work, as the activation
//! offload of Unsloth's gradient checkpointing does for the layer inputs it keeps.
//!
//! - [`HostCopy::new`] queues a device-to-host copy on a copy stream of its own, which first
//!   waits for everything queued on cubecl's stream so far (the tensor's producer included).
//!   The device tensor stays held until [`HostCopy::release_device`], which makes cubecl's
//!   stream wait for the copy and then drops it: only then can the memory pool hand the buffer
//!   to later work.
//! - [`HostCopy::prefetch`] queues the copy back into a new device buffer on the copy stream;
//!   [`HostCopy::restore`] makes cubecl's stream wait for it and returns the tensor (the held
//!   tensor itself when the device copy was never released).
//!
//! One copy stream per cubecl stream, so copies run in the order they were queued and a pinned
//! buffer is never written before the copy that read it has finished. Pinned buffers are kept
//! in a process-wide pool by size (pinning is slow; a training step offloads the same sizes
//! every step). Events order the streams; the host never waits.

use std::collections::HashMap;
use std::sync::Mutex;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl_cuda::{CudaDevice, CudaRuntime};
use cubecl_runtime::client::ComputeClient;
use cudarc::driver::result::{event, stream};
use cudarc::driver::sys::{self, CUevent, CUevent_flags, CUevent_wait_flags, CUstream};

use super::device;
use super::kernels::Raw;

/// Pinned host buffers not in use, by size in bytes (pointers as `usize`).
static PINNED: Mutex<Option<HashMap<usize, Vec<usize>>>> = Mutex::new(None);

/// The copy stream of each cubecl stream (keyed by the cubecl stream as `usize`).
static COPY_STREAMS: Mutex<Option<HashMap<usize, CopyStream>>> = Mutex::new(None);

/// A copy stream and the two events that order it with its cubecl stream, created once and
/// re-recorded at every use (a wait queued on an event takes the event's state at that call,
/// and every use happens on cubecl's one runner thread, so a re-record never races a wait).
#[derive(Clone, Copy)]
struct CopyStream {
    stream: usize,
    /// Recorded on the cubecl stream, waited on by the copy stream.
    to_copy: usize,
    /// Recorded on the copy stream, waited on by the cubecl stream.
    from_copy: usize,
}

/// A pinned buffer of `bytes` from the pool, or a new one. A new one is allocated on cubecl's
/// device thread, where the device's context is current (the caller's thread may have none);
/// the host waits for that thread once per buffer, in the first step.
fn pinned_take(bytes: usize, device: &CudaDevice) -> Result<usize, String> {
    let mut pool = PINNED
        .lock()
        .map_err(|_| "pinned pool poisoned".to_string())?;
    if let Some(p) = pool
        .get_or_insert_with(HashMap::new)
        .get_mut(&bytes)
        .and_then(Vec::pop)
    {
        return Ok(p);
    }
    drop(pool);
    device::run(device, Vec::new(), move |_, _| {
        // SAFETY: a plain pinned host allocation in the device's context, kept for the process
        // (returned to the pool).
        unsafe { cudarc::driver::result::malloc_host(bytes.max(1), 0) }
            .map(|p| p as usize)
            .map_err(|e| format!("cuMemHostAlloc of {bytes} bytes: {e:?}"))
    })
}

fn pinned_give(bytes: usize, ptr: usize) {
    if let Ok(mut pool) = PINNED.lock() {
        pool.get_or_insert_with(HashMap::new)
            .entry(bytes)
            .or_default()
            .push(ptr);
    }
}

/// The copy stream paired with `main` (created on first use, kept for the process).
fn copy_stream(main: usize) -> Result<CopyStream, String> {
    let mut map = COPY_STREAMS
        .lock()
        .map_err(|_| "copy streams poisoned".to_string())?;
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(s) = map.get(&main) {
        return Ok(*s);
    }
    let ev = || {
        event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(|e| e as usize)
            .map_err(|e| format!("cuEventCreate: {e:?}"))
    };
    let s = CopyStream {
        stream: stream::create(stream::StreamKind::NonBlocking)
            .map_err(|e| format!("cuStreamCreate: {e:?}"))? as usize,
        to_copy: ev()?,
        from_copy: ev()?,
    };
    map.insert(main, s);
    Ok(s)
}

/// Makes `waiter` wait for everything queued on `on` so far, through `ev` (re-recorded).
fn order(ev: usize, on: usize, waiter: usize) -> Result<(), String> {
    // SAFETY: an event and streams of this context, kept for the process.
    unsafe {
        event::record(ev as CUevent, on as CUstream)
            .map_err(|e| format!("cuEventRecord: {e:?}"))?;
        stream::wait_event(
            waiter as CUstream,
            ev as CUevent,
            CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .map_err(|e| format!("cuStreamWaitEvent: {e:?}"))
    }
}

/// Makes the copy stream wait for everything queued on cubecl's stream `main` so far.
fn copy_after_main(main: usize) -> Result<usize, String> {
    let cs = copy_stream(main)?;
    order(cs.to_copy, main, cs.stream)?;
    Ok(cs.stream)
}

/// A tensor's bytes in pinned host memory (see the module docs).
pub struct HostCopy {
    host: usize,
    bytes: usize,
    shape: Shape,
    dtype: DType,
    client: ComputeClient<CudaRuntime>,
    device: CudaDevice,
    /// The device tensor, until [`Self::release_device`].
    held: Option<Raw>,
    /// The copy back, queued by [`Self::prefetch`].
    back: Option<Raw>,
}

impl HostCopy {
    /// Queues the copy of `t` to pinned host memory (the host does not wait).
    pub fn new(t: Raw) -> Result<Self, String> {
        let t = into_contiguous(t);
        let bytes = t.meta.shape().num_elements() * t.dtype.size();
        let host = pinned_take(bytes, &t.device)?;
        let copy = HostCopy {
            host,
            bytes,
            shape: t.meta.shape().clone(),
            dtype: t.dtype,
            client: t.client.clone(),
            device: t.device.clone(),
            held: Some(t.clone()),
            back: None,
        };
        device::enqueue(&t.device, vec![t.handle.clone()], move |ctx, p| {
            let cs = copy_after_main(ctx.stream)?;
            // SAFETY: `host` holds `bytes` pinned bytes; `p[0]` is the tensor's buffer, kept
            // alive (held) until cubecl's stream has waited for this copy.
            unsafe { sys::cuMemcpyDtoHAsync_v2(host as *mut _, p[0], bytes, cs as CUstream) }
                .result()
                .map_err(|e| format!("cuMemcpyDtoHAsync: {e:?}"))
        })?;
        Ok(copy)
    }

    /// Lets the device buffer go once the copy is done: cubecl's stream waits for it first.
    pub fn release_device(&mut self) -> Result<(), String> {
        match self.held.take() {
            Some(t) => after_copies(t),
            None => Ok(()),
        }
    }

    /// Queues the copy back to the device (nothing when the device tensor is still held or the
    /// copy back is already queued).
    pub fn prefetch(&mut self) -> Result<(), String> {
        if self.held.is_some() || self.back.is_some() {
            return Ok(());
        }
        let out = CubeTensor::new_contiguous(
            self.client.clone(),
            self.device.clone(),
            self.shape.clone(),
            self.client.empty(self.bytes.max(1)),
            self.dtype,
        );
        let (host, bytes) = (self.host, self.bytes);
        device::enqueue(&out.device, vec![out.handle.clone()], move |ctx, p| {
            // The new buffer's earlier users (queued on cubecl's stream) come first.
            let cs = copy_after_main(ctx.stream)?;
            // SAFETY: `p[0]` is the new buffer of `bytes` bytes; `host` stays in the pool
            // until this copy and every later copy on this stream are done.
            unsafe { sys::cuMemcpyHtoDAsync_v2(p[0], host as *const _, bytes, cs as CUstream) }
                .result()
                .map_err(|e| format!("cuMemcpyHtoDAsync: {e:?}"))
        })?;
        self.back = Some(out);
        Ok(())
    }

    /// The tensor on the device again, ordered after its copy back.
    pub fn restore(mut self) -> Result<Raw, String> {
        if let Some(t) = self.held.take() {
            return Ok(t);
        }
        self.prefetch()?;
        let t = self.back.take().expect("prefetch queued the copy back");
        let out = t.clone();
        after_copies(t)?;
        Ok(out)
    }
}

impl std::fmt::Debug for HostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCopy")
            .field("bytes", &self.bytes)
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("on_device", &self.held.is_some())
            .field("copying_back", &self.back.is_some())
            .finish()
    }
}

/// Makes cubecl's stream wait for every copy queued so far, then drops `t` (whose buffer a
/// copy may be reading or writing until then).
fn after_copies(t: Raw) -> Result<(), String> {
    device::enqueue(&t.device, vec![t.handle.clone()], move |ctx, _| {
        let cs = copy_stream(ctx.stream)?;
        order(cs.from_copy, cs.stream, ctx.stream)
    })
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // A buffer a copy still uses is released only behind it.
        for t in [self.held.take(), self.back.take()].into_iter().flatten() {
            if let Err(e) = after_copies(t) {
                eprintln!("burn-cuda-ops offload: {e}");
            }
        }
        // Later copies into this buffer run on the same copy stream, after the ones queued.
        pinned_give(self.bytes, self.host);
    }
}
