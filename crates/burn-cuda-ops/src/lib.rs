//! # burn-cuda-ops
//!
//! Fused GPU ops for Burn's CUDA backend, with their own backward: cuBLASLt GEMMs on cubecl's
//! CUDA stream and cubecl kernels. The crate knows nothing of adapters or of any model; it offers
//! tensor-level primitives that return `None` when the backend or the inputs are not ones it
//! covers, so callers keep a composed fallback:
//! - [`frozen_linear`]: `x W (+ bias)` for a frozen `W`, backward `dx` only;
//! - [`low_rank_linear`]: `x W (+ bias) + s (xd A) B` for a frozen `W` and trainable `A`, `B`
//!   (the low-rank term accumulated into `y` by the GEMM, beta = 1), backward `dx`, `dA`, `dB`,
//!   keeping only `x` (through Burn's checkpointer, so gradient checkpointing still applies) and
//!   `xd A`;
//! - [`attention`] (GQA, additive mask; the backward recomputes the probabilities, or takes
//!   those a checkpointed layer's recomputation kept: [`attention::keeping_probs`]),
//!   [`merge_heads`] (its output back in the token-major layout),
//!   [`linear_cross_entropy`] (row chunks, no `[tokens, vocab]` logits kept), [`rms_norm`]
//!   (and [`add_rms_norm`], the residual add fused in, for inference),
//!   [`swiglu`], [`rope`] (fused with the split into heads), [`dropout`] (masks hashed from a
//!   seed, never stored);
//! - the optimizer kernels [`adamw_update`], [`adamw_update_master`], [`sum_of_squares`] and
//!   [`grad_scale`] (the gradient norm and clip factor kept on the device);
//! - [`seeded_root`]: a backward started from given gradients of several tensors (no product,
//!   no reduction).
//!
//! They run on Burn's CUDA backend in bf16 or f32 (`burn::backend::Cuda<F>`, the raw
//! `CubeBackend<CudaRuntime, F, i32, u8>` unless Burn's `fusion` feature is on; with this crate's
//! `fusion` feature the fusion backend over it too), with or without `Autodiff` (and with
//! `BalancedCheckpointing`). The GEMMs are enqueued on cubecl's own CUDA stream, in order with
//! Burn's kernels ([`device`]). `libcublasLt.so` is loaded at run time from the loader path;
//! without it every op returns `None` (a warning is printed once).
//!
//! ## Switches
//! Process-wide, read from the environment on first use and settable from code so that one
//! binary can measure an op on and off: `PEFT_LORA_FUSED=0` (or [`set_enabled`]) turns every op
//! off; `PEFT_LORA_FUSED_ATTENTION=0` ([`set_attention_enabled`]) the attention, head +
//! cross-entropy and RMSNorm ops; `PEFT_LORA_ELEMENTWISE_KERNELS=0` SwiGLU, RoPE and dropout;
//! `PEFT_LORA_FUSED_ADAMW=0` ([`set_optimizer_kernels_enabled`]) the optimizer kernels;
//! `PEFT_LORA_DEVICE_CLIP=0` ([`set_device_clip_enabled`]) reads the optimizer's clip factor
//! on the host; `PEFT_LORA_LSE_KERNEL=0` ([`set_lse_kernel_enabled`]) the cross-entropy's row
//! kernels; `PEFT_LORA_ARGMAX_KERNEL=0` ([`set_argmax_kernel_enabled`]) Burn's `argmax` for
//! greedy decoding; `PEFT_LORA_DORA_NORM=0` ([`set_dora_norm_enabled`]) DoRA's column norms
//! from GEMMs and Burn's ops instead of two kernels; `PEFT_LORA_SAMPLE_KERNEL=0`
//! ([`set_sample_kernel_enabled`]) draws sampled tokens with Burn's ops instead of one kernel;
//! `PEFT_LORA_SEEDED_BACKWARD=0` ([`set_seeded_backward_enabled`]) makes [`seeded_root`]
//! return `None` (callers then seed their backward with a product);
//! `PEFT_LORA_KEEP_PROBS=0` ([`set_keep_attention_probs`]) makes the attention's backward
//! recompute the probabilities a checkpointed layer's recomputation just computed;
//! `PEFT_LORA_ADD_NORM=0` keeps inference's residual add apart from the RMSNorm after it,
//! `PEFT_LORA_ROPE_APPEND=0` a cached step's RoPE apart from its cache writes;
//! `PEFT_LORA_QUEUED_READ=0` ([`set_queued_read_enabled`]) makes [`start_read`] give the tensor
//! back instead of queuing its copy; `PEFT_LORA_ROW_BLOCK=0` ([`set_row_block_enabled`]) runs
//! routed rows as a masked input; opt-in: `PEFT_LORA_SHARED_INPUT=1`
//! ([`set_shared_input_enabled`]) runs linears over one input as one task (mixed on an H100:
//! +7% at batch 1, -2-4% at batch 64), and (slower or no gain measured on an H100)
//! `PEFT_LORA_DECODE_ATTENTION=1`
//! ([`set_decode_attention_enabled`]) the split-key decode attention,
//! `PEFT_LORA_SEEDED_ADAPTERS=1` ([`set_seeded_adapters_enabled`], read by peft-lora)
//! extends the seeded backward to a last projection one LoRA adapter trains,
//! `PEFT_LORA_MULTI_TENSOR=1` ([`set_multi_tensor_enabled`]) runs the optimizer's sums of
//! squares and [`adamw_update_master_many`] as one launch per run of tensors,
//! `PEFT_LORA_UNCHECKED_KERNELS=1` ([`set_unchecked_kernels_enabled`]) launches without
//! cubecl's bounds checks, `PEFT_LORA_MERGE_HEADS=1` ([`set_merge_heads_enabled`]) merges the
//! attention output's heads with one kernel each way;
//! `PEFT_LORA_SOFTMAX_KERNEL=0` the attention's softmax kernels; `PEFT_LORA_ASYNC_SUBMIT=0` makes
//! each op wait for its hand-off to cubecl's device thread; `PEFT_LORA_GEMM_AUTOTUNE=1` times
//! cuBLASLt's candidate algorithms per GEMM shape. (The names are those the project has always
//! documented.) Each takes `1` / `true` / `on` / `yes` or `0` / `false` / `off` / `no`; any other
//! value is reported once on stderr and leaves the switch at its default.
//!
//! ## Checks and benches
//! `cargo test --release -p burn-cuda-ops --test gpu_selftest` compares every op with an f64 host
//! reference on the GPU (it says it skipped when no CUDA GPU is present);
//! `cargo bench -p burn-cuda-ops --bench kernels` times each kernel alone at the Llama-8B shape.

#![warn(missing_docs)]

pub mod adamw;
pub mod argmax;
pub mod attention;
pub mod attention_decode;
pub mod autodiff;
pub mod backend;
pub mod causal_attention;
pub mod causal_plan;
pub mod causal_softmax;
pub mod cross_entropy;
mod cube_util;
pub mod device;
pub mod dora_norm;
pub mod dropout;
#[cfg(feature = "fusion")]
pub mod fusion;
mod gpu_timer;
pub mod heads;
pub mod kernels;
pub mod lse;
pub mod lt;
pub mod offload;
pub mod read;
pub mod rms_norm;
pub mod rope;
pub mod rope_append;
pub mod sample;
pub mod score_chunks;
pub mod seed;
pub mod shared_input;
pub mod softmax;
pub mod swiglu;
mod switch;

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
#[cfg(feature = "fusion")]
use burn_fusion::Fusion;
use cubecl_cuda::CudaRuntime;
use half::bf16;
use seed::seeded_prims;

pub use adamw::AdamWStep;
pub use attention::FusedAttention;
pub use autodiff::FusedLinear;
pub use causal_attention::{causal_blocks, set_causal_blocks, DEFAULT_CAUSAL_BLOCKS};
pub use cross_entropy::FusedCrossEntropy;
pub use device::{cubecl_stream_used, ordering, set_ordering, Ordering};
pub use kernels::LowRankInputs;
pub use seed::SeedOps;

/// Switches on or off the attention probabilities kept by a checkpointed layer's
/// recomputation for its backward ([`attention::keeping_probs`]; process-wide; default on
/// unless `PEFT_LORA_KEEP_PROBS=0`).
pub fn set_keep_attention_probs(on: bool) {
    switch::KEEP_PROBS.set(on);
}

/// Switches on or off the heads-merging kernel ([`merge_heads`]; process-wide; default off
/// unless `PEFT_LORA_MERGE_HEADS=1`).
pub fn set_merge_heads_enabled(on: bool) {
    switch::MERGE_HEADS.set(on);
}

/// Switches the fused CUDA attention, head + cross-entropy and RMSNorm ops on or off (process-wide;
/// default on unless `PEFT_LORA_FUSED_ATTENTION=0`; [`set_enabled`]`(false)` turns them off too).
pub fn set_attention_enabled(on: bool) {
    switch::STEP_OPS.set(on);
}

/// Switches [`grad_scale`] on or off (process-wide; default on unless
/// `PEFT_LORA_DEVICE_CLIP=0`): off, it returns `None`
/// and an optimizer reads the norm before it queues the updates (the AdamW kernels still run,
/// with the factor uploaded).
pub fn set_device_clip_enabled(on: bool) {
    switch::DEVICE_CLIP.set(on);
}

/// Launches this crate's kernels without cubecl's bounds checks (process-wide; default off
/// unless `PEFT_LORA_UNCHECKED_KERNELS=1`: on an H100 it changed no training step's speed
/// measurably, and cubecl's validate mode found no out-of-range index). Checked, cubecl
/// compares every global and shared-memory index with its buffer's length; Burn launches its
/// own kernels unchecked.
pub fn set_unchecked_kernels_enabled(on: bool) {
    switch::UNCHECKED.set(on);
}

/// Switches the cross-entropy's row kernels on or off: the one-kernel log-sum-exp of the forward
/// and the one-pass gradient of the backward (process-wide; default on unless
/// `PEFT_LORA_LSE_KERNEL=0`; off, Burn's max and sum reductions and f32 elementwise passes).
pub fn set_lse_kernel_enabled(on: bool) {
    switch::LSE_KERNEL.set(on);
}

/// Switches the one-kernel argmax of greedy decoding on or off (process-wide; default on unless
/// `PEFT_LORA_ARGMAX_KERNEL=0`; off, Burn's `argmax`).
pub fn set_argmax_kernel_enabled(on: bool) {
    switch::ARGMAX.set(on);
}

/// Switches DoRA's norm kernels ([`dora_norm`]) on or off (process-wide; default on unless
/// `PEFT_LORA_DORA_NORM=0`; off, the caller's GEMMs and Burn's ops).
pub fn set_dora_norm_enabled(on: bool) {
    switch::DORA_NORM.set(on);
}

/// Switches sampling's one-kernel token choice ([`sample_rows`]) on or off (process-wide;
/// default on unless `PEFT_LORA_SAMPLE_KERNEL=0`; off, the caller's composed ops).
pub fn set_sample_kernel_enabled(on: bool) {
    switch::SAMPLE.set(on);
}

/// Switches the split-key attention of decode steps ([`attention_decode`]: two kernels, no score
/// tensor) on or off (process-wide; default off unless `PEFT_LORA_DECODE_ATTENTION=1`: on an
/// H100 it measured slower than the GEMM path, -1.5% at batch 1 and -33% at batch 64; off, a
/// decode step runs the fused attention's GEMM path).
pub fn set_decode_attention_enabled(on: bool) {
    switch::DECODE_ATTENTION.set(on);
}

fn step_ops_enabled() -> bool {
    switch::STEP_OPS.on() && enabled()
}

/// Switches the fused CUDA path on or off (process-wide; default on unless `PEFT_LORA_FUSED=0`).
pub fn set_enabled(on: bool) {
    switch::FUSED.set(on);
}

/// Whether the fused CUDA path is on and cuBLASLt loads.
pub fn enabled() -> bool {
    if !switch::FUSED.on() {
        return false;
    }
    match lt::available() {
        Ok(()) => true,
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("burn-cuda-ops: fused CUDA ops off: {e}"));
            false
        }
    }
}

/// Whether a CUDA driver and at least one GPU are present (false rather than a panic when
/// `libcuda` cannot be loaded).
pub fn gpu_present() -> bool {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(|| {
        cudarc::driver::result::init().is_ok()
            && cudarc::driver::result::device::get_count().is_ok_and(|n| n > 0)
    })
    .unwrap_or(false);
    std::panic::set_hook(prev);
    found
}

fn cast<S: 'static, T: 'static>(v: S) -> T {
    let boxed: Box<dyn Any> = Box::new(v);
    *boxed
        .downcast::<T>()
        .expect("backend type checked by TypeId before the cast")
}

/// The raw (non-fusion) cubecl CUDA backend with Burn's default int and bool types.
pub type CubeCuda<F> = CubeBackend<CudaRuntime, F, i32, u8>;
type Cube<F> = CubeCuda<F>;

/// Calls `$f::<T>(args)` for the concrete backend `T` that `$b` is, casting the arguments and
/// the result; evaluates to `None` when `$b` is none of the supported CUDA backends.
#[cfg(not(feature = "fusion"))]
macro_rules! dispatch {
    ($b:ty, $f:ident ( $($arg:expr),* )) => {
        dispatch_raw!($b, $f ($($arg),*))
    };
}

/// With `fusion`: the raw backends and the fusion backends over them, in one chain (each
/// argument is moved in exactly one branch).
#[cfg(feature = "fusion")]
macro_rules! dispatch {
    ($b:ty, $f:ident ( $($arg:expr),* )) => {
        dispatch_try!($b, $f ($($arg),*);
            Cube<bf16>, Cube<f32>,
            Autodiff<Cube<bf16>>, Autodiff<Cube<f32>>,
            Autodiff<Cube<bf16>, BalancedCheckpointing>, Autodiff<Cube<f32>, BalancedCheckpointing>,
            Fusion<Cube<bf16>>, Fusion<Cube<f32>>,
            Autodiff<Fusion<Cube<bf16>>>, Autodiff<Fusion<Cube<f32>>>,
            Autodiff<Fusion<Cube<bf16>>, BalancedCheckpointing>,
            Autodiff<Fusion<Cube<f32>>, BalancedCheckpointing>)
    };
}

/// [`dispatch`] over the raw cubecl backends only (ops not registered with the fusion backend).
macro_rules! dispatch_raw {
    ($b:ty, $f:ident ( $($arg:expr),* )) => {
        dispatch_try!($b, $f ($($arg),*);
            Cube<bf16>, Cube<f32>,
            Autodiff<Cube<bf16>>, Autodiff<Cube<f32>>,
            Autodiff<Cube<bf16>, BalancedCheckpointing>, Autodiff<Cube<f32>, BalancedCheckpointing>)
    };
}

/// The `if TypeId == .. else if ..` chain of [`dispatch`].
macro_rules! dispatch_try {
    ($b:ty, $f:ident ( $($arg:expr),* ); $t:ty $(, $rest:ty)*) => {
        if TypeId::of::<$b>() == TypeId::of::<$t>() {
            Some(cast($f::<$t>($(cast($arg)),*)))
        } else {
            dispatch_try!($b, $f ($($arg),*); $($rest),*)
        }
    };
    ($b:ty, $f:ident ( $($arg:expr),* ); ) => {
        None
    };
}

/// Switches [`seeded_root`] on or off (process-wide; default on unless
/// `PEFT_LORA_SEEDED_BACKWARD=0`): off, it returns `None` and callers seed their backward with
/// a product.
pub fn set_seeded_backward_enabled(on: bool) {
    switch::SEEDED_BACKWARD.set(on);
}

/// Whether [`seeded_root`] builds roots (the switch; the backend is checked per call).
pub fn seeded_backward_enabled() -> bool {
    switch::SEEDED_BACKWARD.on()
}

/// Switches on or off the seeded backward's extension to a last projection that one plain LoRA
/// adapter trains (process-wide; default off unless `PEFT_LORA_SEEDED_ADAPTERS=1`). This crate
/// only keeps the switch: peft-lora's `LoraLinear::backward_seeds` reads it
/// ([`seeded_adapters_enabled`]).
pub fn set_seeded_adapters_enabled(on: bool) {
    switch::SEEDED_ADAPTERS.set(on);
}

/// Whether [`set_seeded_adapters_enabled`]'s switch is on.
pub fn seeded_adapters_enabled() -> bool {
    switch::SEEDED_ADAPTERS.on()
}

/// The `[1]` root whose `backward()` gives each `t` of `pairs` the gradient `g` as it is (each
/// `g` of `t`'s shape and dtype, untracked): the gradients of `sum_i <t_i, g_i>` with no
/// product, reduction or fill of ones over the tensors ([`seed`]). `None` when `B` is not one
/// of the autodiff CUDA backends, the switch is off ([`set_seeded_backward_enabled`]), `pairs`
/// is empty, or a `g` does not match its `t`.
pub fn seeded_root<B: Backend, const D: usize>(
    pairs: Vec<(Tensor<B, D>, Tensor<B, D>)>,
) -> Option<Tensor<B, 1>> {
    let matching = pairs
        .iter()
        .all(|(t, g)| t.dims() == g.dims() && t.dtype() == g.dtype());
    if pairs.is_empty() || !matching || !seeded_backward_enabled() {
        return None;
    }
    let pairs: Vec<_> = pairs.into_iter().map(|(t, g)| (prim(t), prim(g))).collect();
    #[cfg(not(feature = "fusion"))]
    let root = dispatch_try!(B, seeded_prims(pairs);
        Autodiff<Cube<bf16>>, Autodiff<Cube<f32>>,
        Autodiff<Cube<bf16>, BalancedCheckpointing>, Autodiff<Cube<f32>, BalancedCheckpointing>);
    #[cfg(feature = "fusion")]
    let root = dispatch_try!(B, seeded_prims(pairs);
        Autodiff<Cube<bf16>>, Autodiff<Cube<f32>>,
        Autodiff<Cube<bf16>, BalancedCheckpointing>, Autodiff<Cube<f32>, BalancedCheckpointing>,
        Autodiff<Fusion<Cube<bf16>>>, Autodiff<Fusion<Cube<f32>>>,
        Autodiff<Fusion<Cube<bf16>>, BalancedCheckpointing>,
        Autodiff<Fusion<Cube<f32>>, BalancedCheckpointing>);
    root.map(tensor::<B, 1>)
}

/// Whether `B` is one of the CUDA backends the fused ops run on.
pub fn supported<B: Backend>() -> bool {
    #[allow(clippy::extra_unused_type_parameters)]
    fn yes<T: Backend>() -> bool {
        true
    }
    dispatch!(B, yes()).unwrap_or(false)
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Whether `B` is a raw cubecl CUDA backend (no autodiff, no fusion).
fn raw_cuda<B: Backend>() -> bool {
    [TypeId::of::<Cube<bf16>>(), TypeId::of::<Cube<f32>>()].contains(&TypeId::of::<B>())
}

/// Queues the copy of an int tensor to the host now ([`read::PendingRead`]; wait for it with
/// [`read::PendingRead::wait`]) when `B`'s int tensors are cubecl CUDA's (the raw backend, with
/// or without autodiff) and the path is on (`PEFT_LORA_QUEUED_READ`, [`set_queued_read_enabled`]);
/// gives `t` back otherwise. Work queued after this call does not delay the
/// copy: a decode loop can queue its next step before it waits for the chosen ids.
pub fn start_read<B: Backend, const D: usize>(
    t: Tensor<B, D, Int>,
) -> Result<read::PendingRead, Tensor<B, D, Int>> {
    if !switch::QUEUED_READ.on() {
        return Err(t);
    }
    let boxed: Box<dyn Any> = Box::new(t.into_primitive());
    match boxed.downcast::<kernels::Raw>() {
        Ok(raw) => Ok(read::PendingRead::start(*raw)),
        Err(other) => Err(Tensor::from_primitive(
            *other
                .downcast::<B::IntTensorPrimitive>()
                .expect("the primitive was boxed from this type"),
        )),
    }
}

/// Switches [`start_read`]'s queued copy on or off (process-wide; default on unless
/// `PEFT_LORA_QUEUED_READ=0`).
pub fn set_queued_read_enabled(on: bool) {
    switch::QUEUED_READ.set(on);
}

/// A tensor parked in pinned host memory by [`offload`].
#[derive(Debug)]
pub struct Offloaded<B: Backend, const D: usize> {
    copy: offload::HostCopy,
    _backend: std::marker::PhantomData<B>,
}

/// Switches host offload of checkpointed activations on or off (process-wide; default on unless
/// `PEFT_LORA_OFFLOAD=0`).
pub fn set_offload_enabled(on: bool) {
    switch::OFFLOAD.set(on);
}

/// Starts copying `t` to pinned host memory ([`offload::HostCopy`]) when `B` is a raw cubecl
/// CUDA backend (no autodiff) and offload is on; gives `t` back otherwise. The host does not
/// wait; the device buffer stays held until [`Offloaded::release_device`].
pub fn offload<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Offloaded<B, D>, Tensor<B, D>> {
    if !raw_cuda::<B>() || !enabled() || !switch::OFFLOAD.on() {
        return Err(t);
    }
    let raw: kernels::Raw = cast(prim(t.clone()));
    match offload::HostCopy::new(raw) {
        Ok(copy) => Ok(Offloaded {
            copy,
            _backend: std::marker::PhantomData,
        }),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("burn-cuda-ops: host offload off: {e}"));
            Err(t)
        }
    }
}

impl<B: Backend, const D: usize> Offloaded<B, D> {
    /// Lets the device buffer go behind the copy (cubecl's stream waits for it).
    ///
    /// # Panics
    /// When the device refuses the queued work (as a failed fused op does).
    pub fn release_device(&mut self) {
        self.copy
            .release_device()
            .unwrap_or_else(|e| panic!("burn-cuda-ops offload: {e}"));
    }

    /// Queues the copy back to the device, so that [`Self::restore`] finds it under way.
    ///
    /// # Panics
    /// As [`Self::release_device`].
    pub fn prefetch(&mut self) {
        self.copy
            .prefetch()
            .unwrap_or_else(|e| panic!("burn-cuda-ops offload: {e}"));
    }

    /// The tensor on the device again, ordered after its copy back.
    ///
    /// # Panics
    /// As [`Self::release_device`].
    pub fn restore(self) -> Tensor<B, D> {
        let raw = self
            .copy
            .restore()
            .unwrap_or_else(|e| panic!("burn-cuda-ops offload: {e}"));
        tensor(cast::<kernels::Raw, B::FloatTensorPrimitive>(raw))
    }
}

fn frozen_impl<T: FusedLinear>(
    x: Tensor<T, 2>,
    w: Tensor<T, 2>,
    bias: Option<Tensor<T, 1>>,
) -> Tensor<T, 2> {
    tensor(T::frozen_linear(prim(x), prim(w), bias.map(prim)))
}

fn col_scale_impl<T: FusedLinear>(y: Tensor<T, 2>, g: Tensor<T, 2>) -> Tensor<T, 2> {
    tensor(T::col_scale(prim(y), prim(g)))
}

#[allow(clippy::type_complexity)]
fn low_rank_impl<T: FusedLinear>(
    args: (
        Tensor<T, 2>,
        Option<Tensor<T, 2>>,
        Tensor<T, 2>,
        Option<Tensor<T, 1>>,
        Tensor<T, 2>,
        Tensor<T, 2>,
        f32,
    ),
) -> Tensor<T, 2> {
    let (x, xd, w, bias, a, b, scale) = args;
    tensor(T::low_rank_linear(LowRankInputs {
        x: prim(x),
        xd: xd.map(prim),
        w: prim(w),
        bias: bias.map(prim),
        a: prim(a),
        b: prim(b),
        scale,
    }))
}

fn usable<B: Backend>(ts: &[&Tensor<B, 2>]) -> bool {
    let dtype = ts[0].dtype();
    ts.iter()
        .all(|t| t.dtype() == dtype && t.dims().iter().all(|d| *d > 0))
}

/// `x W (+ bias)` for a frozen `W` `[in, out]`: the fused cuBLASLt op when `B` is a supported
/// CUDA backend and the path is on, else `None`.
pub fn frozen_linear<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    if !supported::<B>() || !enabled() || !usable(&[x, w]) {
        return None;
    }
    if w.is_require_grad() || bias.is_some_and(|b| b.is_require_grad()) {
        return None;
    }
    if bias.is_some_and(|b| b.dtype() != x.dtype()) {
        return None;
    }
    dispatch!(B, frozen_impl(x.clone(), w.clone(), bias.cloned()))
}

/// `y * g` with `g` of shape `[1, out]` broadcast over the rows of `y` (`[rows, out]`), whose
/// backward sums `dz * y` over the rows with one GEMM (see [`FusedLinear::col_scale`]). `None`
/// where the fused ops do not run (another backend, the switch off, mixed dtypes, other shapes).
pub fn col_scale<B: Backend>(y: &Tensor<B, 2>, g: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !supported::<B>() || !enabled() || !usable(&[y, g]) {
        return None;
    }
    if g.dims() != [1, y.dims()[1]] {
        return None;
    }
    dispatch!(B, col_scale_impl(y.clone(), g.clone()))
}

/// `x W (+ bias) + s (xd A) B` with a frozen `W` (`xd = x` when `None`): the fused op when `B` is
/// a supported CUDA backend and the path is on, else `None`.
#[allow(clippy::too_many_arguments)]
pub fn low_rank_linear<B: Backend>(
    x: &Tensor<B, 2>,
    xd: Option<&Tensor<B, 2>>,
    w: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    scale: f64,
) -> Option<Tensor<B, 2>> {
    if !supported::<B>() || !enabled() || !usable(&[x, w, a, b]) {
        return None;
    }
    if xd.is_some_and(|t| !usable(&[x, t])) {
        return None;
    }
    if w.is_require_grad() || bias.is_some_and(|b| b.is_require_grad()) {
        return None;
    }
    if bias.is_some_and(|b| b.dtype() != x.dtype()) {
        return None;
    }
    let args = (
        x.clone(),
        xd.cloned(),
        w.clone(),
        bias.cloned(),
        a.clone(),
        b.clone(),
        scale as f32,
    );
    dispatch!(B, low_rank_impl(args))
}

/// `x W (+ bias)` on every row of `x` and `+ s (x A) B` on the rows `rows` only, for inference
/// ([`shared_input::forward`] with one part: the adapter's GEMMs address the block by offset;
/// one queued task, no mask) when `B` is a raw cubecl CUDA backend without autodiff and the
/// path is on (`PEFT_LORA_ROW_BLOCK`, [`set_row_block_enabled`]), else `None`. `x [n, in]`,
/// `w [in, out]` frozen, `a [in, r]`, `b [r, out]`, `rows` non-empty inside `0..n`.
#[allow(clippy::too_many_arguments)]
pub fn low_rank_linear_rows<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    scale: f64,
    rows: std::ops::Range<usize>,
) -> Option<Tensor<B, 2>> {
    if !raw_cuda::<B>() || !switch::ROW_BLOCK.on() || !enabled() || !usable(&[x, w, a, b]) {
        return None;
    }
    if bias.is_some_and(|b| b.dtype() != x.dtype()) {
        return None;
    }
    let raw2 = |t: &Tensor<B, 2>| -> kernels::Raw { cast(prim(t.clone())) };
    // One linear with its term on a run of rows: the shared-input op with one part.
    let part = shared_input::SharedPart {
        w: raw2(w),
        bias: bias.map(|t| cast(prim(t.clone()))),
        low_rank: Some((raw2(a), raw2(b), scale as f32)),
        rows: Some(rows),
    };
    let y = shared_input::forward(raw2(x), vec![part]).ok()?;
    Some(tensor::<B, 2>(cast(y)))
}

/// Switches [`low_rank_linear_rows`] on or off (process-wide; default on unless
/// `PEFT_LORA_ROW_BLOCK=0`; off, routed rows run as a masked input).
pub fn set_row_block_enabled(on: bool) {
    switch::ROW_BLOCK.set(on);
}

/// One linear of a [`shared_input_linear`] group: a frozen weight `[in, out]`, an optional
/// frozen bias `[out]` and an optional low-rank term `s (x A) B` (`A [in, r]`, `B [r, out]`).
pub struct SharedLinear<'a, B: Backend> {
    /// Frozen weight `[in, out]`.
    pub w: &'a Tensor<B, 2>,
    /// Frozen bias `[out]`.
    pub bias: Option<&'a Tensor<B, 1>>,
    /// `(A, B, s)` of the low-rank term.
    pub low_rank: Option<(&'a Tensor<B, 2>, &'a Tensor<B, 2>, f64)>,
    /// The rows of `x` the low-rank term acts on (`None`: all; the others get the base alone).
    pub rows: Option<std::ops::Range<usize>>,
}

/// Linears that read one input `x [n, in]` (a decoder's q, k and v; an MLP's gate and up) as
/// one queued task: `[n, sum out_i]` with part `i`'s `x W_i (+ bias_i) + s_i (x A_i) B_i` in
/// its columns, in order ([`shared_input::forward`]: one GEMM for all the bases when the weights
/// are adjacent column blocks of one buffer, see [`shared_input`]), when `B` is a raw cubecl
/// CUDA backend without autodiff and `PEFT_LORA_SHARED_INPUT=1` ([`set_shared_input_enabled`]),
/// else `None`.
pub fn shared_input_linear<B: Backend>(
    x: &Tensor<B, 2>,
    parts: &[SharedLinear<'_, B>],
) -> Option<Tensor<B, 2>> {
    if !raw_cuda::<B>() || !switch::SHARED_INPUT.on() || !enabled() || parts.is_empty() {
        return None;
    }
    let dtype = x.dtype();
    let fits = parts.iter().all(|p| {
        usable(&[x, p.w])
            && p.bias.is_none_or(|b| b.dtype() == dtype)
            && p.low_rank.is_none_or(|(a, b, _)| usable(&[x, a, b]))
    });
    if !fits {
        return None;
    }
    let raw2 = |t: &Tensor<B, 2>| -> kernels::Raw { cast(prim(t.clone())) };
    let raw_parts = parts
        .iter()
        .map(|p| shared_input::SharedPart {
            w: raw2(p.w),
            bias: p.bias.map(|t| cast(prim(t.clone()))),
            low_rank: p.low_rank.map(|(a, b, s)| (raw2(a), raw2(b), s as f32)),
            rows: p.rows.clone(),
        })
        .collect();
    let y = shared_input::forward(raw2(x), raw_parts).ok()?;
    Some(tensor::<B, 2>(cast(y)))
}

/// Switches [`shared_input_linear`] on or off (process-wide; default off unless
/// `PEFT_LORA_SHARED_INPUT=1`: on an H100 +7% at batch 1, within that figure's spread, and
/// 2-4% slower at batch 64).
pub fn set_shared_input_enabled(on: bool) {
    switch::SHARED_INPUT.set(on);
}

/// Whether [`shared_input_linear`] is switched on (whether packing weights for it pays).
pub fn shared_input_enabled() -> bool {
    switch::SHARED_INPUT.on()
}

fn attention_impl<T: FusedAttention>(
    args: (
        Tensor<T, 3>,
        Tensor<T, 3>,
        Tensor<T, 3>,
        Tensor<T, 4>,
        f32,
        attention::Layout,
    ),
) -> Tensor<T, 3> {
    let (q, k, v, mask, scale, layout) = args;
    tensor(T::fused_attention(
        prim(q),
        prim(k),
        prim(v),
        prim(mask),
        scale,
        layout,
    ))
}

/// `softmax(scale q k^T + mask) v` as one op with its own backward ([`attention`]) when `B` is a
/// raw cubecl CUDA backend (with or without autodiff) and the path is on, else `None`.
///
/// `q [b, g, m, d]`, `k`, `v [b, g, t, d]`; `mask [b or 1, 1, s, t]` additive (f32), where the
/// `g * m` query rows of a batch are `heads x s` in order (GQA: `g` KV heads, `m = rep * s`).
pub fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    attention_as(q, k, v, mask, scale, attention::Layout::Full)
}

/// Causal attention in row blocks ([`causal_attention`](mod@crate::causal_attention)), when `B` is
/// a raw cubecl CUDA backend (with or without autodiff) and the path is on
/// (`PEFT_LORA_CAUSAL_ATTENTION=1`, [`set_causal_attention_enabled`]), else `None`.
///
/// `q [b, g, s * rep, d]` position-major (row `i * rep + h` is position `i` of the `h`-th query
/// head of KV head `g`: [`rope_grouped`] with `group = rep` lays the queries out so), `k`, `v [b,
/// g, s, d]`; `mask [b or 1, 1, s, s]` additive (f32) and causal: it must hide every key after
/// its query's position (padding may hide more), which the op relies on and does not check.
/// The output is laid out as `q`. A query whose visible keys are all masked averages the values
/// up to its position rather than all values (see [`causal_attention`](mod@crate::causal_attention)).
pub fn causal_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    if !switch::CAUSAL_ATTENTION.on() {
        return None;
    }
    let (m, t, s) = (q.dims()[2], k.dims()[2], mask.dims()[2]);
    if s == 0 || t != s || !m.is_multiple_of(s) || mask.dims()[3] != s {
        return None;
    }
    let layout = attention::Layout::Causal {
        rep: m / s,
        blocks: causal_blocks(),
    };
    attention_as(q, k, v, mask, scale, layout)
}

/// Switches [`causal_attention()`] on or off (process-wide; default off unless
/// `PEFT_LORA_CAUSAL_ATTENTION=1`).
pub fn set_causal_attention_enabled(on: bool) {
    switch::CAUSAL_ATTENTION.set(on);
}

/// Whether [`causal_attention()`] is switched on (whether laying the queries out for it pays).
pub fn causal_attention_enabled() -> bool {
    switch::CAUSAL_ATTENTION.on()
}

/// [`attention`] or [`causal_attention`] by `layout`, once the shapes are checked.
fn attention_as<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
    layout: attention::Layout,
) -> Option<Tensor<B, 4>> {
    if !supported::<B>() || !step_ops_enabled() {
        return None;
    }
    let [b, g, m, d] = q.dims();
    let [bk, gk, t, dk] = k.dims();
    let [mb, one, s, mt] = mask.dims();
    let fits = [bk, gk, t, dk] == v.dims()
        && bk == b
        && gk == g
        && dk == d
        && one == 1
        && mt == t
        && (mb == 1 || mb == b)
        && s > 0
        && (g * m) % s == 0
        && [b, g, m, t, d].iter().all(|n| *n > 0);
    let dtype = q.dtype();
    if !fits || k.dtype() != dtype || v.dtype() != dtype || mask.dtype() != burn::tensor::DType::F32
    {
        return None;
    }
    // (A mask shared by the batch broadcasts over batch x heads: the op flattens them.)
    let rows = |t: &Tensor<B, 4>, n: usize| t.clone().reshape([b * g, n, d]);
    let args = (
        rows(q, m),
        rows(k, t),
        rows(v, t),
        mask.clone(),
        scale as f32,
        layout,
    );
    let out: Tensor<B, 3> = dispatch!(B, attention_impl(args))?;
    Some(out.reshape([b, g, m, d]))
}

fn cross_entropy_impl<T: FusedCrossEntropy>(
    args: (Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 1, burn::tensor::Int>),
) -> Tensor<T, 1> {
    let (h, w, targets) = args;
    tensor(T::fused_linear_cross_entropy(
        prim(h),
        prim(w),
        targets.into_primitive(),
    ))
}

/// `sum_i -log softmax(h_i W)[targets_i]` (f32, `[1]`) for a frozen head `W [hidden, vocab]`,
/// as one op that never holds the `[n, vocab]` logits beyond a chunk of rows
/// ([`cross_entropy`]), when `B` is a raw cubecl CUDA backend and the path is on; else `None`.
/// `targets` must lie in `0..vocab` (the caller drops ignored positions).
pub fn linear_cross_entropy<B: Backend>(
    h: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    targets: &Tensor<B, 1, burn::tensor::Int>,
) -> Option<Tensor<B, 1>> {
    if !supported::<B>() || !step_ops_enabled() || !usable(&[h, w]) {
        return None;
    }
    let ([n, hid], [w_in, _]) = (h.dims(), w.dims());
    if w.is_require_grad() || w_in != hid || targets.dims() != [n] {
        return None;
    }
    let args = (h.clone(), w.clone(), targets.clone());
    dispatch!(B, cross_entropy_impl(args))
}

fn argmax_impl<T: argmax::FusedArgmax>(x: Tensor<T, 2>) -> Tensor<T, 1, Int> {
    Tensor::from_primitive(T::fused_argmax(prim(x)))
}

/// The index of each row's maximum (torch's `argmax(dim=1)`: the first index on ties, a NaN
/// largest), `[rows]`, as one kernel ([`argmax`]) when `B` is a raw cubecl CUDA backend (with or
/// without autodiff) and the kernel is on, else `None`.
pub fn argmax_rows<B: Backend>(x: &Tensor<B, 2>) -> Option<Tensor<B, 1, Int>> {
    // (`supported` first: `enabled` loads cuBLASLt, and warns when it cannot. Under Burn's
    // fusion backend `dispatch_raw!` answers `None`.)
    if !supported::<B>() || !switch::ARGMAX.on() || !enabled() {
        return None;
    }
    let [rows, width] = x.dims();
    if rows * width == 0 || width >= 1 << 24 || rows > u32::MAX as usize {
        return None;
    }
    dispatch_raw!(B, argmax_impl(x.clone()))
}

fn dora_norm_impl<T: dora_norm::FusedDoraNorm>(
    args: (Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 2>, f32),
) -> Tensor<T, 1> {
    let (w, aw, gram, b, s) = args;
    tensor(T::fused_dora_norm(
        prim(w),
        prim(aw),
        prim(gram),
        prim(b),
        s,
    ))
}

/// DoRA's column norms `||W + s A B||` (detached), `[out]`, from `w [in, out]`, `aw = A^T W
/// [r, out]`, `gram = A^T A [r, r]` and `b [r, out]` (one float dtype), as two kernels
/// ([`dora_norm`]) when `B` is a raw cubecl CUDA backend (with or without autodiff) and the
/// kernels are on ([`set_dora_norm_enabled`]), else `None`.
pub fn dora_norm<B: Backend>(
    w: &Tensor<B, 2>,
    aw: &Tensor<B, 2>,
    gram: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    s: f64,
) -> Option<Tensor<B, 1>> {
    if !supported::<B>() || !switch::DORA_NORM.on() || !enabled() {
        return None;
    }
    let ([d_in, out], [r, aw_out], [g0, g1], [b_r, b_out]) =
        (w.dims(), aw.dims(), gram.dims(), b.dims());
    let dtype = w.dtype();
    let same = [aw, gram, b].iter().all(|t| t.dtype() == dtype);
    if !same || aw_out != out || b_out != out || b_r != r || g0 != r || g1 != r || d_in * out == 0 {
        return None;
    }
    let args = (w.clone(), aw.clone(), gram.clone(), b.clone(), s as f32);
    dispatch_raw!(B, dora_norm_impl(args))
}

fn sample_impl<T: sample::FusedSample>(
    args: (Tensor<T, 2>, Tensor<T, 1>, sample::SampleParams),
) -> Tensor<T, 1, Int> {
    let (x, u, params) = args;
    Tensor::from_primitive(T::fused_sample(prim(x), prim(u), params))
}

/// The token drawn from each row of `logits [rows, vocab]` at `u [rows]` (f32 in `[0, 1)`)
/// after transformers' temperature, top-k and top-p, `[rows]`, as one kernel ([`sample`]) when
/// `B` is a raw cubecl CUDA backend (with or without autodiff) and the kernel is on, else
/// `None`. Every row must hold a finite logit.
pub fn sample_rows<B: Backend>(
    logits: &Tensor<B, 2>,
    u: &Tensor<B, 1>,
    params: sample::SampleParams,
) -> Option<Tensor<B, 1, Int>> {
    if !supported::<B>() || !switch::SAMPLE.on() || !enabled() {
        return None;
    }
    let [rows, width] = logits.dims();
    let ok_params = params.temperature > 0.0 && params.top_p > 0.0;
    let ok_u = u.dims() == [rows] && u.dtype() == DType::F32;
    if rows * width == 0 || width >= 1 << 24 || !ok_u || !ok_params {
        return None;
    }
    dispatch_raw!(B, sample_impl((logits.clone(), u.clone(), params)))
}

fn rms_norm_impl<T: rms_norm::FusedRmsNorm>(
    args: (Tensor<T, 2>, Tensor<T, 1>, f32),
) -> Tensor<T, 2> {
    let (x, w, eps) = args;
    tensor(T::fused_rms_norm(prim(x), prim(w), eps))
}

/// RMSNorm with a frozen weight (`w * dtype(x / sqrt(mean(x^2) + eps))` over the last axis,
/// statistics in f32, as transformers' `LlamaRMSNorm`) as one op each way ([`rms_norm`]) when
/// `B` is a raw cubecl CUDA backend (with or without autodiff) and the path is on, else `None`.
pub fn rms_norm<B: Backend>(x: &Tensor<B, 3>, w: &Tensor<B, 1>, eps: f64) -> Option<Tensor<B, 3>> {
    if !supported::<B>() || !step_ops_enabled() {
        return None;
    }
    let [b, s, h] = x.dims();
    if w.is_require_grad() || w.dims() != [h] || w.dtype() != x.dtype() || b * s * h == 0 {
        return None;
    }
    let args = (x.clone().reshape([b * s, h]), w.clone(), eps as f32);
    let out: Tensor<B, 2> = dispatch_raw!(B, rms_norm_impl(args))?;
    Some(out.reshape([b, s, h]))
}

/// The residual add fused with the RMSNorm after it, for inference: `(x + delta, norm(x +
/// delta))` with the sum rounded to the model's dtype as torch adds ([`rms_norm::add_forward`],
/// one kernel instead of two) when `B` is a raw cubecl CUDA backend without autodiff (no
/// backward) and the path is on, else `None`. `x`, `delta` `[b, s, h]`, `w [h]` frozen.
pub fn add_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    delta: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
    if !raw_cuda::<B>() || !switch::ADD_NORM.on() || !step_ops_enabled() {
        return None;
    }
    let [b, s, h] = x.dims();
    let dtype = x.dtype();
    if delta.dims() != [b, s, h]
        || delta.dtype() != dtype
        || w.dims() != [h]
        || w.dtype() != dtype
        || b * s * h == 0
    {
        return None;
    }
    let raw = |t: Tensor<B, 2>| -> kernels::Raw { cast(prim(t)) };
    let (sum, y) = rms_norm::add_forward(
        raw(x.clone().reshape([b * s, h])),
        raw(delta.clone().reshape([b * s, h])),
        cast(prim(w.clone())),
        eps as f32,
    );
    let back = |r: kernels::Raw| tensor::<B, 2>(cast(r)).reshape([b, s, h]);
    Some((back(sum), back(y)))
}

/// Whether the SwiGLU, RoPE and dropout kernels run (on unless
/// `PEFT_LORA_ELEMENTWISE_KERNELS=0`, for measuring them on and off with the same binary).
fn elementwise_ops_enabled() -> bool {
    switch::ELEMENTWISE.on() && step_ops_enabled()
}

fn swiglu_impl<T: swiglu::FusedSwiglu>(args: (Tensor<T, 2>, Tensor<T, 2>)) -> Tensor<T, 2> {
    let (gate, up) = args;
    tensor(T::fused_swiglu(prim(gate), prim(up)))
}

/// `silu(gate) * up` (transformers' rounding points) as one op each way ([`swiglu`]) when `B` is
/// a raw cubecl CUDA backend (with or without autodiff) and the path is on, else `None`.
pub fn swiglu<B: Backend>(gate: &Tensor<B, 3>, up: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    if !supported::<B>() || !elementwise_ops_enabled() {
        return None;
    }
    let [b, s, i] = gate.dims();
    if up.dims() != [b, s, i] || up.dtype() != gate.dtype() || b * s * i == 0 {
        return None;
    }
    let args = (
        gate.clone().reshape([b * s, i]),
        up.clone().reshape([b * s, i]),
    );
    let out: Tensor<B, 2> = dispatch_raw!(B, swiglu_impl(args))?;
    Some(out.reshape([b, s, i]))
}

fn merge_heads_impl<T: heads::FusedMergeHeads>(x: Tensor<T, 4>) -> Tensor<T, 4> {
    tensor(T::fused_merge_heads(prim(x)))
}

/// The attention heads back in the token-major layout, `x [b, heads, s, d]` -> `[b, s, heads *
/// d]` (as `x.swap_dims(1, 2).reshape([b, s, heads * d])`), one kernel each way ([`heads`]),
/// when `B` is a raw cubecl CUDA backend (with or without autodiff) and the kernel is on
/// (`PEFT_LORA_MERGE_HEADS=1`), else `None`.
pub fn merge_heads<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 3>> {
    if !supported::<B>() || !switch::MERGE_HEADS.on() || !elementwise_ops_enabled() {
        return None;
    }
    let [b, h, s, d] = x.dims();
    // (The kernel counts its vectors in u32.)
    let n = b * h * s * d;
    if n == 0 || n / cube_util::vector_size(d) > u32::MAX as usize {
        return None;
    }
    let out: Tensor<B, 4> = dispatch_raw!(B, merge_heads_impl(x.clone()))?;
    Some(out.reshape([b, s, h * d]))
}

fn rope_impl<T: rope::FusedRope>(
    args: (Tensor<T, 4>, Tensor<T, 3>, Tensor<T, 3>, usize),
) -> Tensor<T, 4> {
    let (x, cos, sin, group) = args;
    tensor(T::fused_rope(prim(x), prim(cos), prim(sin), group))
}

/// Rotary embeddings in HF's `rotate_half` layout fused with the split into heads ([`rope`]):
/// `x [b, s, heads * d]` -> `[b, heads, s, d]`, as `x.reshape([b, s, heads, d]).swap_dims(1, 2)`
/// followed by `x cos + rotate_half(x) sin`, when `B` is a raw cubecl CUDA backend (with or
/// without autodiff) and the path is on, else `None`. `cos`, `sin` `[b, 1, s, d]` get no gradient.
pub fn rope<B: Backend>(
    x: &Tensor<B, 3>,
    heads: usize,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    rope_grouped(x, heads, 1, cos, sin)
}

/// [`rope`] with the heads in groups of `group` laid out position-major within each group:
/// `x [b, s, heads * d]` -> `[b, heads / group, s * group, d]`, as
/// `x.reshape([b, s, heads / group, group, d]).swap_dims(1, 2)` rotated and flattened (the query
/// layout [`causal_attention()`] reads, `group` = the query heads per KV head). `None` as
/// [`rope`], or when `group` does not divide `heads`.
pub fn rope_grouped<B: Backend>(
    x: &Tensor<B, 3>,
    heads: usize,
    group: usize,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if !supported::<B>() || !elementwise_ops_enabled() {
        return None;
    }
    let [b, s, hd] = x.dims();
    if heads == 0 || hd % heads != 0 || group == 0 || !heads.is_multiple_of(group) {
        return None;
    }
    let d = hd / heads;
    let dtype = x.dtype();
    let fits = |t: &Tensor<B, 4>| t.dims() == [b, 1, s, d] && t.dtype() == dtype;
    if !d.is_multiple_of(2) || b * s * d == 0 || !fits(cos) || !fits(sin) {
        return None;
    }
    let table = |t: &Tensor<B, 4>| t.clone().detach().reshape([b, s, d]);
    let args = (
        x.clone().reshape([b, s, heads, d]),
        table(cos),
        table(sin),
        group,
    );
    dispatch_raw!(B, rope_impl(args))
}

/// The queries, keys and values of a cached step, one kernel ([`rope_append`], inference):
/// [`rope`] of `q` (`[b, s, heads * d]` -> `[b, heads, s, d]`) and of `k`, both written with `v`
/// (`[b, s, kv_heads * d]`) into the caches `[b, kv_heads, capacity, d]` at positions `pos..pos +
/// s`, in place. Returns the rotated queries and the caches, or gives the caches back untouched
/// (`Err`) where the op does not apply: `B` not a raw cubecl CUDA backend (no autodiff), the
/// switch off, shapes or dtypes that do not fit, no room, or a cache buffer that is shared or
/// not contiguous (writing into it would change another tensor).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn rope_append<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), (Tensor<B, 4>, Tensor<B, 4>)> {
    if !raw_cuda::<B>() || !switch::ROPE_APPEND.on() || !elementwise_ops_enabled() {
        return Err((k_cache, v_cache));
    }
    let [b, s, qd] = q.dims();
    let [cb, kv_heads, capacity, d] = k_cache.dims();
    let dtype = q.dtype();
    let same = |t: &Tensor<B, 4>, shape: [usize; 4]| t.dims() == shape && t.dtype() == dtype;
    let fits = cb == b
        && d > 0
        && d.is_multiple_of(2)
        && qd.is_multiple_of(d)
        && b * s * kv_heads > 0
        && k.dims() == [b, s, kv_heads * d]
        && v.dims() == [b, s, kv_heads * d]
        && k.dtype() == dtype
        && v.dtype() == dtype
        && same(cos, [b, 1, s, d])
        && same(sin, [b, 1, s, d])
        && same(&k_cache, [b, kv_heads, capacity, d])
        && same(&v_cache, [b, kv_heads, capacity, d])
        && pos + s <= capacity
        && capacity < u32::MAX as usize;
    if !fits {
        return Err((k_cache, v_cache));
    }
    let (kc, vc): (kernels::Raw, kernels::Raw) = (cast(prim(k_cache)), cast(prim(v_cache)));
    let back = |r: kernels::Raw| tensor::<B, 4>(cast(r));
    let writable = |r: &kernels::Raw| r.can_mut() && r.is_contiguous();
    if !writable(&kc) || !writable(&vc) {
        return Err((back(kc), back(vc)));
    }
    let raw = |t: &Tensor<B, 3>| -> kernels::Raw { cast(prim(t.clone())) };
    let table = |t: &Tensor<B, 4>| -> kernels::Raw { cast(prim(t.clone().reshape([b, s, d]))) };
    let out = rope_append::forward(
        raw(q),
        raw(k),
        raw(v),
        table(cos),
        table(sin),
        &kc,
        &vc,
        qd / d,
        pos,
    );
    Ok((back(out), back(kc), back(vc)))
}

/// Switches the optimizer kernels ([`adamw_update`], [`adamw_update_master`],
/// [`sum_of_squares`]) on or off (process-wide; default on unless `PEFT_LORA_FUSED_ADAMW=0`).
pub fn set_optimizer_kernels_enabled(on: bool) {
    switch::ADAMW.set(on);
}

/// Switches the optimizer's multi-tensor launches on or off: the sums of squares
/// ([`sum_of_squares`], [`grad_scale`]) as one launch per run of up to 32 tensors of one dtype,
/// and [`adamw_update_master_many`] (process-wide; default off unless
/// `PEFT_LORA_MULTI_TENSOR=1`; off, one launch per tensor, and `adamw_update_master_many`
/// returns `None`).
pub fn set_multi_tensor_enabled(on: bool) {
    switch::MULTI_TENSOR.set(on);
}

/// Whether the multi-tensor launches are on ([`set_multi_tensor_enabled`]).
pub fn multi_tensor_enabled() -> bool {
    switch::MULTI_TENSOR.on()
}

/// Whether the optimizer's kernels ([`adamw_update`], [`sum_of_squares`], [`grad_scale`]) run:
/// `B` is a raw cubecl CUDA backend, the fused path is on, and `PEFT_LORA_FUSED_ADAMW` is not
/// `0`. A caller can then keep its clip factor on the device.
pub fn optimizer_kernels_on<B: Backend>() -> bool {
    switch::ADAMW.on() && supported::<B>() && enabled()
}

/// Whether a tensor has no elements (the kernels are not launched on those).
fn is_empty<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dims().contains(&0)
}

#[allow(clippy::type_complexity)]
fn adamw_impl<T: adamw::FusedAdamW>(
    args: (
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 1>,
        AdamWStep,
    ),
) -> (Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 2>) {
    let (p, g, m, v, scale, h) = args;
    let (p, m, v) = T::fused_adamw(prim(p), prim(g), prim(m), prim(v), prim(scale), h);
    (tensor(p), tensor(m), tensor(v))
}

/// Whether `scale` is a one-element f32 tensor (the gradient's scale of [`grad_scale`]).
fn is_scale<B: Backend>(scale: &Tensor<B, 1>) -> bool {
    scale.dims() == [1] && scale.dtype() == DType::F32
}

/// One AdamW update (`torch.optim.AdamW`'s rule) of parameter `p` with gradient `g` times
/// `scale` (one f32 element on the device: the clip factor of [`grad_scale`], or 1; a negative
/// one leaves `p`, `m` and `v` as they are) and moments `m`, `v` as one kernel ([`adamw`]):
/// `Some((p, m, v))` when `B` is a raw cubecl CUDA backend (the inner backend of training), the
/// four tensors share shape and dtype, and the fused path is on (`PEFT_LORA_FUSED_ADAMW=0` turns
/// this op alone off); else `None`.
#[allow(clippy::type_complexity)]
pub fn adamw_update<B: Backend>(
    p: &Tensor<B, 2>,
    g: &Tensor<B, 2>,
    m: &Tensor<B, 2>,
    v: &Tensor<B, 2>,
    scale: &Tensor<B, 1>,
    h: AdamWStep,
) -> Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
    if !optimizer_kernels_on::<B>() || !is_scale(scale) {
        return None;
    }
    let same = [g, m, v]
        .iter()
        .all(|t| t.dims() == p.dims() && t.dtype() == p.dtype());
    if !same || is_empty(p) {
        return None;
    }
    let args = (p.clone(), g.clone(), m.clone(), v.clone(), scale.clone(), h);
    dispatch_try!(B, adamw_impl(args); Cube<bf16>, Cube<f32>)
}

#[allow(clippy::type_complexity)]
fn adamw_master_impl<T: adamw::FusedAdamW>(
    args: (
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 2>,
        Tensor<T, 1>,
        AdamWStep,
    ),
) -> (Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 2>, Tensor<T, 2>) {
    let (p, g, m, v, scale, h) = args;
    let (p, m, v, low) = T::fused_adamw_master(prim(p), prim(g), prim(m), prim(v), prim(scale), h);
    (tensor(p), tensor(m), tensor(v), tensor(low))
}

/// [`adamw_update`] on the f32 master copy of a 16-bit parameter: `Some((master, m, v, p))`
/// with `p` the new master rounded to `low` (bf16 or f16), when `master`, `m` and `v` are f32,
/// `g` is of dtype `low` (one kernel) or f32 (gradients summed in f32; one more cast), all of
/// one shape, on a raw cubecl CUDA backend with the fused path on.
#[allow(clippy::type_complexity)]
pub fn adamw_update_master<B: Backend>(
    master: &Tensor<B, 2>,
    g: &Tensor<B, 2>,
    m: &Tensor<B, 2>,
    v: &Tensor<B, 2>,
    scale: &Tensor<B, 1>,
    h: AdamWStep,
    low: DType,
) -> Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
    if !optimizer_kernels_on::<B>() || !is_scale(scale) {
        return None;
    }
    let same = [master, m, v]
        .iter()
        .all(|t| t.dims() == master.dims() && t.dtype() == DType::F32);
    let g_ok = g.dims() == master.dims() && (g.dtype() == low || g.dtype() == DType::F32);
    if !same || !g_ok || !matches!(low, DType::BF16 | DType::F16) || is_empty(master) {
        return None;
    }
    let args = (
        master.clone(),
        g.clone(),
        m.clone(),
        v.clone(),
        scale.clone(),
        h,
    );
    let (master, m, v, p): (Tensor<B, 2>, _, _, Tensor<B, 2>) =
        dispatch_try!(B, adamw_master_impl(args); Cube<bf16>, Cube<f32>)?;
    let p = if p.dtype() == low {
        p
    } else {
        p.cast(burn::tensor::FloatDType::from(low))
    };
    Some((master, m, v, p))
}

/// One tensor of [`adamw_update_master_many`]: `(master, g, m, v)` in, `(master, m, v, p)` out.
pub type MasterUpdate<B> = (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>);

#[allow(clippy::type_complexity)]
fn adamw_master_many_impl<T: adamw::FusedAdamW>(
    args: (Vec<MasterUpdate<T>>, Tensor<T, 1>, AdamWStep),
) -> Vec<MasterUpdate<T>> {
    let (items, scale, h) = args;
    let items = items
        .into_iter()
        .map(|(p, g, m, v)| (prim(p), prim(g), prim(m), prim(v)))
        .collect();
    T::fused_adamw_master_many(items, prim(scale), h)
        .into_iter()
        .map(|(p, m, v, low)| (tensor(p), tensor(m), tensor(v), tensor(low)))
        .collect()
}

/// [`adamw_update_master`] of every `(master, g, m, v)` of `items` under one step `h` and
/// factor `scale`, as one launch per run of up to 8 tensors instead of one each: `Some` of the
/// `(master, m, v, p)` of each, in order, when the multi-tensor launches are on
/// ([`set_multi_tensor_enabled`]) and every item is what [`adamw_update_master`] takes with
/// `g` of dtype `low` itself (not f32); `None` otherwise (update them one by one then).
pub fn adamw_update_master_many<B: Backend>(
    items: &[MasterUpdate<B>],
    scale: &Tensor<B, 1>,
    h: AdamWStep,
    low: DType,
) -> Option<Vec<MasterUpdate<B>>> {
    if items.is_empty()
        || !switch::MULTI_TENSOR.on()
        || !optimizer_kernels_on::<B>()
        || !is_scale(scale)
        || !matches!(low, DType::BF16 | DType::F16)
    {
        return None;
    }
    let fits = |(p, g, m, v): &MasterUpdate<B>| {
        [p, m, v]
            .iter()
            .all(|t| t.dims() == p.dims() && t.dtype() == DType::F32)
            && g.dims() == p.dims()
            && g.dtype() == low
            && !is_empty(p)
    };
    if !items.iter().all(fits) {
        return None;
    }
    let args = (items.to_vec(), scale.clone(), h);
    dispatch_try!(B, adamw_master_many_impl(args); Cube<bf16>, Cube<f32>)
}

fn sums_of_squares_impl<T: adamw::FusedAdamW>(ts: Vec<Tensor<T, 2>>) -> Tensor<T, 1> {
    tensor(T::fused_sums_of_squares(ts.into_iter().map(prim).collect()))
}

/// The sum of the squares of every element of `ts` (f64 on the host; one read), with one kernel
/// per tensor, when `B` is a raw cubecl CUDA backend and the fused path is on (the switch of
/// [`adamw_update`]); else `None`.
pub fn sum_of_squares<B: Backend>(ts: &[Tensor<B, 2>]) -> Option<f64> {
    if ts.is_empty() || !optimizer_kernels_on::<B>() || ts.iter().any(is_empty) {
        return None;
    }
    let sums: Tensor<B, 1> =
        dispatch_try!(B, sums_of_squares_impl(ts.to_vec()); Cube<bf16>, Cube<f32>)?;
    let host = sums.into_data().convert::<f32>().to_vec::<f32>().ok()?;
    Some(host.iter().map(|v| *v as f64).sum())
}

/// The global gradient norm and the clip factor of an optimizer step, each one f32 element left
/// on the device ([`grad_scale`]).
#[derive(Debug, Clone)]
pub struct GradScale<B: Backend> {
    /// The square root of the sum of squares of every gradient element.
    pub norm: Tensor<B, 1>,
    /// The factor the updates scale the gradients by: `max_norm / (norm + 1e-6)` above
    /// `max_norm`, else 1; -1 when the norm is not finite (the updates then change nothing).
    pub scale: Tensor<B, 1>,
}

fn grad_scale_impl<T: adamw::FusedAdamW>(
    args: (Vec<Tensor<T, 2>>, Option<f32>),
) -> (Tensor<T, 1>, Tensor<T, 1>) {
    let (ts, max_norm) = args;
    let partials = T::fused_sums_of_squares(ts.into_iter().map(prim).collect());
    let (norm, scale) = T::fused_grad_scale(partials, max_norm);
    (tensor(norm), tensor(scale))
}

/// The global norm of the gradients `ts` and their clip factor to `max_norm` (`None`: no
/// clipping), computed and kept on the device ([`grad_scale`]): the optimizer queues its
/// updates with the factor and reads the norm after them, so the device does not idle while the
/// host queues the updates. `Some` when `B` is a raw cubecl CUDA backend and the optimizer
/// kernels are on (the switch of [`adamw_update`]); else `None`.
pub fn grad_scale<B: Backend>(ts: &[Tensor<B, 2>], max_norm: Option<f64>) -> Option<GradScale<B>> {
    let on = optimizer_kernels_on::<B>() && switch::DEVICE_CLIP.on();
    if ts.is_empty() || !on || ts.iter().any(is_empty) {
        return None;
    }
    let args = (ts.to_vec(), max_norm.map(|m| m as f32));
    let (norm, scale): (Tensor<B, 1>, Tensor<B, 1>) =
        dispatch_try!(B, grad_scale_impl(args); Cube<bf16>, Cube<f32>)?;
    Some(GradScale { norm, scale })
}

fn dropout_impl<T: dropout::FusedDropout>(args: (Tensor<T, 2>, dropout::DropMask)) -> Tensor<T, 2> {
    let (x, mask) = args;
    tensor(T::fused_dropout(prim(x), mask))
}

/// Inverted dropout with drop probability `p` as one kernel each way, the mask hashed from the
/// 64-bit seed `seed()` returns and never stored ([`dropout`]), when `B` is a raw cubecl CUDA
/// backend (with or without autodiff) and the step ops are on; else `None` (and `seed` is not
/// called, so a caller's seed stream advances only when the kernel runs).
pub fn dropout<B: Backend>(
    x: &Tensor<B, 2>,
    p: f64,
    seed: impl FnOnce() -> u64,
) -> Option<Tensor<B, 2>> {
    if !supported::<B>() || !elementwise_ops_enabled() || !(0.0..1.0).contains(&p) {
        return None;
    }
    if is_empty(x) || x.dims().iter().product::<usize>() > u32::MAX as usize {
        return None;
    }
    if !raw_backend::<B>() {
        return None;
    }
    let mask = dropout::DropMask::new(p, seed());
    dispatch_raw!(B, dropout_impl((x.clone(), mask)))
}

#[allow(clippy::extra_unused_type_parameters)]
fn is_raw<T: Backend>() -> bool {
    true
}

/// Whether `B` is a raw cubecl CUDA backend (with or without autodiff), where every op of this
/// module runs; under Burn's fusion backend only the linear, attention and head + cross-entropy
/// ops are registered.
pub fn raw_backend<B: Backend>() -> bool {
    dispatch_raw!(B, is_raw()).unwrap_or(false)
}

#[cfg(test)]
mod kernel_tests;
