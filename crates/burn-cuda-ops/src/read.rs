//! A tensor's copy to the host queued now and waited for later.
//!
//! Burn's `into_data` is an `async fn`: nothing is queued until the host waits, and then the copy
//! lands behind everything queued meanwhile. Here the copy is queued on cubecl's stream when the
//! read starts, so a host that queues more work before waiting (the next decode step) waits only
//! for the work before the copy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use burn::tensor::{DType, Shape, TensorData};
use cubecl::client::ComputeClient;
use cubecl::server::{CopyDescriptor, ServerError};
use cubecl_common::bytes::Bytes;
use cubecl_cuda::CudaRuntime;

use super::kernels::Raw;

type Read = Pin<Box<dyn Future<Output = Result<Bytes, ServerError>> + Send>>;

/// The client of `t`'s device, kept for the rest of the process (one per device).
fn client_of(t: &Raw) -> &'static ComputeClient<CudaRuntime> {
    static CLIENTS: Mutex<Vec<(usize, &'static ComputeClient<CudaRuntime>)>> =
        Mutex::new(Vec::new());
    let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    let index = t.device.index;
    if let Some((_, c)) = clients.iter().find(|(i, _)| *i == index) {
        return c;
    }
    let c: &'static ComputeClient<CudaRuntime> = Box::leak(Box::new(t.client.clone()));
    clients.push((index, c));
    c
}

/// A copy to the host under way ([`super::start_read`]).
pub struct PendingRead {
    read: Read,
    shape: Shape,
    dtype: DType,
}

impl std::fmt::Debug for PendingRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRead")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl PendingRead {
    /// Queues the copy of `t` (made contiguous first, as Burn's read does).
    pub(crate) fn start(t: Raw) -> Self {
        let t = burn_cubecl::kernel::into_contiguous(t);
        let (shape, dtype) = (t.meta.shape().clone(), t.dtype);
        let descriptor = CopyDescriptor::new(
            t.handle.clone().binding(),
            shape.clone(),
            t.meta.strides().clone(),
            dtype.size(),
        );
        // `read_one_tensor_async` hands the copy to the device thread before it returns; its
        // future borrows the client, hence one client kept for the process per device.
        let read = Box::pin(client_of(&t).read_one_tensor_async(descriptor));
        PendingRead { read, shape, dtype }
    }

    /// Waits for the copy (and the work queued before it) and returns the data.
    pub fn wait(self) -> Result<TensorData, String> {
        let bytes = cubecl::future::block_on(self.read).map_err(|e| format!("{e}"))?;
        Ok(TensorData::from_bytes(bytes, self.shape, self.dtype))
    }
}
