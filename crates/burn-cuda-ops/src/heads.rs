//! Attention heads back into the token-major layout, one cubecl kernel each way:
//! `[b, heads, s, d] -> [b, s, heads * d]` (the attention output before `o_proj`, as
//! `x.swap_dims(1, 2).reshape([b, s, heads * d])`), and the inverse for the gradient.
//!
//! Both directions swap the two middle axes of a dense `[b, p, q, d]` tensor: each unit copies a
//! vector of up to 8 elements (one 16-byte bf16 load) of a row of `d`, writing the output in
//! order. Burn's copy to contiguous of the transposed view indexes element by element.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, vector_size, THREADS};
use super::kernels::{empty_as, Raw};

/// `out[b, j, i, :] = x[b, i, j, :]` for a dense `x [b, p, q, dv]` in vectors of `N` elements
/// (`dv` vectors a row); one unit per output vector, `len` of them.
#[cube(launch, launch_unchecked)]
pub(crate) fn swap_middle_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    len: u32,
    p: u32,
    q: u32,
    dv: u32,
    #[define(E)] _dtype: StorageType,
) {
    let o = elem_index();
    if o >= len as usize {
        terminate!();
    }
    // `o` walks `out [b, q, p, dv]` in order.
    let (p, q, dv) = (p as usize, q as usize, dv as usize);
    let e = o % dv;
    let row = o / dv;
    let i = row % p;
    let rest = row / p;
    let j = rest % q;
    let b = rest / q;
    out[o] = x[((b * p + i) * q + j) * dv + e];
}

/// `[b, p, q, d] -> [b, q, p, d]`, dense.
pub fn swap_middle(x: Raw) -> Raw {
    let x = into_contiguous(x);
    let s = x.meta.shape().clone();
    let (b, p, q, d) = (s[0], s[1], s[2], s[3]);
    let v = vector_size(d);
    let len = b * p * q * d / v;
    let out = empty_as(&x, Shape::new([b, q, p, d]), x.dtype);
    let dtype = x.dtype;
    launch!(swap_middle_kernel::<CudaRuntime>(
        &x.client.clone(),
        elem_grid(len),
        CubeDim::new_1d(THREADS),
        v,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        len as u32,
        p as u32,
        q as u32,
        (d / v) as u32,
        dtype.into(),
    ));
    out
}

/// Backends with the heads op (raw cubecl CUDA, with or without autodiff).
pub trait FusedMergeHeads: Backend {
    /// `[b, heads, s, d] -> [b, s, heads, d]`; the gradient goes back the other way.
    fn fused_merge_heads(x: Prim<Self>) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedMergeHeads
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_merge_heads(x: Raw) -> Raw {
        swap_middle(x)
    }
}

#[derive(Debug)]
struct MergeHeadsBackward;

impl<F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<CudaRuntime, F, I, BT>, 1> for MergeHeadsBackward
{
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
        let [parent] = ops.parents;
        let dy = grads.consume::<Cb<F, I, BT>>(&ops.node);
        if let Some(node) = parent {
            grads.register::<Cb<F, I, BT>>(node.id, swap_middle(dy));
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedMergeHeads
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_merge_heads(x: Prim<Self>) -> Prim<Self> {
        MergeHeadsBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateless(swap_middle(x.primitive))
    }
}
