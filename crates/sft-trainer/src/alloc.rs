//! Exact-size allocation for the training step.
//!
//! cubecl's default memory pool carves tensors out of large pages whose sizes follow the
//! device's total memory (on an 80 GB card: 20 GB, 5 GB, 1.3 GB, 318 MB, ... pages), so one
//! 500 MB temporary reserves a 5 GB page. A training step repeats the same shapes, so the step
//! runs in cubecl's *persistent* mode instead: every buffer is allocated at its exact size and
//! reused by later buffers of that size. When the batch shape changes, the buffers of the old
//! shape are freed first ([`ExactAlloc::before_batch`]), so memory follows the current shape.
//! Backends without a memory pool run the step unchanged.

use burn::tensor::backend::Backend;

/// The environment switch: `PEFT_LORA_EXACT_ALLOC=0` keeps the memory pool's pages.
pub const ENV: &str = "PEFT_LORA_EXACT_ALLOC";

/// Exact-size allocation scopes for one training run.
#[derive(Debug)]
pub struct ExactAlloc {
    enabled: bool,
    shape: Option<[usize; 2]>,
}

impl ExactAlloc {
    /// On unless `PEFT_LORA_EXACT_ALLOC` is `0` / `false` / `off`.
    pub fn from_env() -> Self {
        Self {
            enabled: crate::switch::env_switch(ENV) != Some(false),
            shape: None,
        }
    }

    /// Called with each micro-batch's `[batch, seq]` before its step: a new shape returns the
    /// previous shape's free buffers to the device.
    pub fn before_batch<B: Backend>(&mut self, shape: [usize; 2], device: &B::Device) {
        if self.enabled && self.shape.is_some_and(|s| s != shape) {
            B::memory_cleanup(device);
        }
        self.shape = Some(shape);
    }

    /// Runs `f` with the device's allocations at their exact sizes (when enabled).
    pub fn run<B: Backend, R>(&self, device: &B::Device, f: impl FnOnce() -> R) -> R {
        if !self.enabled {
            return f();
        }
        /// Carries the step across `memory_persistent_allocations`' `Send` bound.
        struct Inline<T>(T);
        // SAFETY: nothing crosses a thread. Burn's default `memory_persistent_allocations` calls
        // `func(input)` directly; Autodiff and Fusion delegate to the inner backend; the cubecl
        // backend's client switches the allocation mode, calls `task(input)` on the calling
        // thread and switches it back (cubecl-runtime 0.10 `ComputeClient::
        // memory_persistent_allocation`).
        unsafe impl<T> Send for Inline<T> {}
        let Inline(out) =
            B::memory_persistent_allocations(device, Inline(f), |Inline(f)| Inline(f()));
        out
    }
}
