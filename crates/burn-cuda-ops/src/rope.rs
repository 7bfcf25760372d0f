//! Rotary position embeddings (HF's `rotate_half` layout) fused with the head transpose, one
//! cubecl kernel each way:
//! - forward: `x [b, s, n, d]` (a projection's output as it lies) -> `y [b, n, s, d]`,
//!   `y = dtype(dtype(x cos) + dtype(rotate_half(x) sin))` (transformers' rounding points);
//! - backward: `dx = dtype(dtype(dy cos) + rotate_half^T(dtype(dy sin)))`, back in `[b, s, n, d]`.
//!
//! With a `group` of heads above 1 the heads are split as `n = (n / group) x group` and `y` is
//! `[b, n / group, s, group, d]` instead: position-major within each group of heads (the query
//! layout of [`crate::attention::Layout::Causal`], where the `group` query heads that share a
//! KV head sit side by side per position). `group = 1` is the layout above.
//!
//! `cos`, `sin` `[b, s, d]` are constants (no gradient). The composed version runs a transpose
//! copy, a negation, a concatenation, two products and a sum, each a pass over the activations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, THREADS};
use super::kernels::{empty_as, Raw};

/// One unit per output vector `(b, n / group, s, n % group, j)` of `y [b, heads / group, seq,
/// group, d]`; `d`, `j` and `half` count vectors of `N` elements (`N` divides `d / 2`, so no
/// vector straddles the halves).
#[cube(launch, launch_unchecked)]
pub(crate) fn rope_forward_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    cos: &Tensor<Vector<E, N>>,
    sin: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    total: u32,
    heads: u32,
    seq: u32,
    d: u32,
    group: u32,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= total as usize {
        terminate!();
    }
    let (heads, seq, d, group) = (heads as usize, seq as usize, d as usize, group as usize);
    let groups = heads / group;
    let j = i % d;
    let t = i / d;
    let hi = t % group;
    let t = t / group;
    let si = t % seq;
    let t = t / seq;
    let ni = (t % groups) * group + hi;
    let bi = t / groups;
    let src = ((bi * seq + si) * heads + ni) * d;
    out[i] = rotate_half_at::<E, N>(x, src, j, d, cos, sin, (bi * seq + si) * d);
}

/// Vector `j` of the rotated row of `d` vectors at `x[src..]`: `dtype(dtype(x cos) +
/// dtype(rotate_half(x) sin))` with `cos`, `sin` read at `cs + j` (transformers' rounding
/// points; the halves are `d / 2` vectors each).
#[cube]
pub(crate) fn rotate_half_at<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    src: usize,
    j: usize,
    d: usize,
    cos: &Tensor<Vector<E, N>>,
    sin: &Tensor<Vector<E, N>>,
    cs: usize,
) -> Vector<E, N> {
    let half = d / 2;
    // (`zero - v`: CUDA has no unary minus on cubecl's vector types.)
    let zero = Vector::new(f32::new(0.0));
    let partner = if j < half {
        zero - wide::<E, N>(x[src + j + half])
    } else {
        wide::<E, N>(x[src + j - half])
    };
    let a = Vector::<E, N>::cast_from(wide::<E, N>(x[src + j]) * wide::<E, N>(cos[cs + j]));
    let r = Vector::<E, N>::cast_from(partner * wide::<E, N>(sin[cs + j]));
    Vector::cast_from(wide::<E, N>(a) + wide::<E, N>(r))
}

/// One unit per input vector `(b, s, n, j)` of `dx [b, seq, heads, d]` (vectors as above),
/// from `dy` laid out as the forward's `y`.
#[cube(launch, launch_unchecked)]
pub(crate) fn rope_backward_kernel<E: Float, N: Size>(
    dy: &Tensor<Vector<E, N>>,
    cos: &Tensor<Vector<E, N>>,
    sin: &Tensor<Vector<E, N>>,
    dx: &mut Tensor<Vector<E, N>>,
    total: u32,
    heads: u32,
    seq: u32,
    d: u32,
    group: u32,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= total as usize {
        terminate!();
    }
    let (heads, seq, d, group) = (heads as usize, seq as usize, d as usize, group as usize);
    let half = d / 2;
    let j = i % d;
    let t = i / d;
    let ni = t % heads;
    let t = t / heads;
    let si = t % seq;
    let bi = t / seq;
    let o = (((bi * (heads / group) + ni / group) * seq + si) * group + ni % group) * d;
    let cs = (bi * seq + si) * d;
    let a = Vector::<E, N>::cast_from(wide::<E, N>(dy[o + j]) * wide::<E, N>(cos[cs + j]));
    let g = if j < half {
        wide::<E, N>(Vector::<E, N>::cast_from(
            wide::<E, N>(dy[o + j + half]) * wide::<E, N>(sin[cs + j + half]),
        ))
    } else {
        Vector::new(f32::new(0.0))
            - wide::<E, N>(Vector::<E, N>::cast_from(
                wide::<E, N>(dy[o + j - half]) * wide::<E, N>(sin[cs + j - half]),
            ))
    };
    dx[i] = Vector::cast_from(wide::<E, N>(a) + g);
}

/// A vector widened to f32.
#[cube]
fn wide<E: Float, N: Size>(v: Vector<E, N>) -> Vector<f32, N> {
    Vector::cast_from(v)
}

fn launch(
    forward: bool,
    input: Raw,
    cos: Raw,
    sin: Raw,
    [b, s, n, d]: [usize; 4],
    group: usize,
    out_shape: Shape,
) -> Raw {
    let (input, cos, sin) = (
        into_contiguous(input),
        into_contiguous(cos),
        into_contiguous(sin),
    );
    let out = empty_as(&input, out_shape, input.dtype);
    // `d` is even (checked by the caller): the widest vector that divides `d / 2`.
    let v = super::cube_util::vector_size(d / 2);
    let total = b * s * n * d / v;
    let (dtype, client) = (input.dtype, input.client.clone());
    let args = (
        total as u32,
        n as u32,
        s as u32,
        (d / v) as u32,
        group as u32,
    );
    let (grid, dim) = (elem_grid(total), CubeDim::new_1d(THREADS));
    if forward {
        launch!(rope_forward_kernel::<CudaRuntime>(
            &client,
            grid,
            dim,
            v,
            input.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            dtype.into(),
        ));
    } else {
        launch!(rope_backward_kernel::<CudaRuntime>(
            &client,
            grid,
            dim,
            v,
            input.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            dtype.into(),
        ));
    }
    out
}

/// `y [b, n / group, s * group, d]` (`[b, n, s, d]` for `group = 1`; the heads of a group
/// position-major otherwise) from `x [b, s, n, d]` and `cos`, `sin` `[b, s, d]`; `group`
/// divides `n`.
pub fn forward(x: Raw, cos: Raw, sin: Raw, group: usize) -> Raw {
    let [b, s, n, d] = x.meta.shape().dims::<4>();
    let out = Shape::new([b, n / group, s * group, d]);
    launch(true, x, cos, sin, [b, s, n, d], group, out)
}

/// `dx [b, s, n, d]` from `dy` laid out as [`forward`]'s output for the same `group`.
pub fn backward(dy: Raw, cos: Raw, sin: Raw, group: usize) -> Raw {
    let [b, groups, sg, d] = dy.meta.shape().dims::<4>();
    let (n, s) = (groups * group, sg / group);
    launch(
        false,
        dy,
        cos,
        sin,
        [b, s, n, d],
        group,
        Shape::new([b, s, n, d]),
    )
}

/// Backends with the RoPE op (raw cubecl CUDA, with or without autodiff).
pub trait FusedRope: Backend {
    /// `x [b, s, n, d]` rotated and transposed to `[b, n, s, d]` (`group = 1`) or to
    /// `[b, n / group, s * group, d]` ([`forward`]); `cos`, `sin` `[b, s, d]` (plain tensors of
    /// the inner backend: no gradient flows to them).
    fn fused_rope(x: Prim<Self>, cos: Prim<Self>, sin: Prim<Self>, group: usize) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedRope
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_rope(x: Raw, cos: Raw, sin: Raw, group: usize) -> Raw {
        forward(x, cos, sin, group)
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<CudaRuntime, F, I, BT>, 1> for RopeBackward
{
    type State = (Raw, Raw, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
        let [px] = ops.parents;
        let dy = grads.consume::<Cb<F, I, BT>>(&ops.node);
        if let Some(node) = px {
            let (cos, sin, group) = ops.state;
            grads.register::<Cb<F, I, BT>>(node.id, backward(dy, cos, sin, group));
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedRope
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_rope(x: Prim<Self>, cos: Prim<Self>, sin: Prim<Self>, group: usize) -> Prim<Self> {
        let (cos, sin) = (cos.primitive, sin.primitive);
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = forward(x.primitive, cos.clone(), sin.clone(), group);
                prep.finish((cos, sin, group), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, cos, sin, group)),
        }
    }
}
