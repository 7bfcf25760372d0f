//! Inverted dropout on the adapter input as one cubecl kernel each way, with the mask hashed
//! from `(seed, element index)` instead of stored:
//! - forward: `y = keep ? dtype(x / (1 - p)) : 0`;
//! - backward: `dx = keep ? dtype(dy / (1 - p)) : 0`, the mask recomputed from the seed.
//!
//! Burn's composed dropout draws a Bernoulli tensor (a kernel writing a full-size tensor), then
//! multiplies twice, and keeps the mask for its backward; this keeps nothing.
//!
//! `keep` is `hash(i) >= threshold` with `threshold = round(p 2^32)`, the hash two rounds of
//! murmur3's 32-bit finaliser keyed by two seed words. The caller supplies the seed (e.g. from a
//! per-thread stream it can restart, so a recomputed layer under per-layer gradient
//! checkpointing draws the same masks).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, vector_size, THREADS};
use super::kernels::{empty_as, Raw};

/// The mask of one call: two seed words, the drop threshold and the keep scale `1 / (1 - p)`.
#[derive(Debug, Clone, Copy)]
pub struct DropMask {
    /// Seed words.
    pub seeds: (u32, u32),
    /// Elements whose hash is below this are dropped.
    pub threshold: u32,
    /// `1 / (1 - p)`.
    pub scale: f32,
}

impl DropMask {
    /// The mask for drop probability `p` (in `[0, 1)`) from a 64-bit seed.
    pub fn new(p: f64, seed: u64) -> Self {
        DropMask {
            seeds: (seed as u32, (seed >> 32) as u32),
            threshold: (p * 4_294_967_296.0).round().min(4_294_967_295.0) as u32,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// Whether element `i` is kept (the kernel's hash, on the host: for tests).
    pub fn keeps(&self, i: u32) -> bool {
        fn fmix(mut x: u32) -> u32 {
            x ^= x >> 16;
            x = x.wrapping_mul(0x85eb_ca6b);
            x ^= x >> 13;
            x = x.wrapping_mul(0xc2b2_ae35);
            x ^ (x >> 16)
        }
        fmix(fmix(i ^ self.seeds.0).wrapping_add(self.seeds.1)) >= self.threshold
    }
}

#[cube]
fn fmix(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16u32;
    x *= 2_246_822_507u32;
    x ^= x >> 13u32;
    x *= 3_266_489_909u32;
    x ^ (x >> 16u32)
}

/// `out = keep(i) ? dtype(inp * scale) : 0`, the forward and the backward alike, over `nv`
/// vectors of `N` elements (element `i` of the tensor is lane `i % N` of vector `i / N`, so the
/// mask is the same at any vector width).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dropout_kernel<E: Float, N: Size>(
    inp: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    nv: u32,
    seed0: u32,
    seed1: u32,
    threshold: u32,
    scale: f32,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= nv as usize {
        terminate!();
    }
    let n = inp.vector_size();
    let x = Vector::<f32, N>::cast_from(inp[i]);
    let mut y = Vector::<f32, N>::new(f32::new(0.0));
    #[unroll]
    for e in 0..n {
        let h = fmix(fmix((i * n + e) as u32 ^ seed0) + seed1);
        if h >= threshold {
            y[e] = x[e] * scale;
        }
    }
    out[i] = Vector::<E, N>::cast_from(y);
}

/// Applies the mask to `t` (forward on `x`, backward on `dy`), 8 elements per unit where the
/// size allows (one 16-byte load of bf16).
pub fn apply(t: Raw, mask: DropMask) -> Raw {
    let t = into_contiguous(t);
    let shape = t.meta.shape().clone();
    let n = shape.num_elements();
    let out = empty_as(&t, shape, t.dtype);
    let (dtype, client) = (t.dtype, t.client.clone());
    let v = vector_size(n);
    launch!(dropout_kernel::<CudaRuntime>(
        &client,
        elem_grid(n / v),
        CubeDim::new_1d(THREADS),
        v,
        t.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (n / v) as u32,
        mask.seeds.0,
        mask.seeds.1,
        mask.threshold,
        mask.scale,
        dtype.into(),
    ));
    out
}

/// Backends with the hashed dropout op (raw cubecl CUDA, with or without autodiff).
pub trait FusedDropout: Backend {
    /// `x` with `mask` applied.
    fn fused_dropout(x: Prim<Self>, mask: DropMask) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedDropout
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_dropout(x: Raw, mask: DropMask) -> Raw {
        apply(x, mask)
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl<F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<CudaRuntime, F, I, BT>, 1> for DropoutBackward
{
    type State = DropMask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
        let [px] = ops.parents;
        let dy = grads.consume::<Cb<F, I, BT>>(&ops.node);
        if let Some(node) = px {
            grads.register::<Cb<F, I, BT>>(node.id, apply(dy, ops.state));
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedDropout
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_dropout(x: Prim<Self>, mask: DropMask) -> Prim<Self> {
        match DropoutBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(mask, apply(x.primitive, mask)),
            OpsKind::UnTracked(prep) => prep.finish(apply(x.primitive, mask)),
        }
    }
}
