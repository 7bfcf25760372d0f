//! RMSNorm with a frozen weight as one cubecl kernel each way (transformers' `LlamaRMSNorm`:
//! statistics in f32, the normalised value rounded to the model's dtype before the weight).
//! - forward, per row: `r = 1 / sqrt(mean(x^2) + eps)`, `y = w * dtype(x r)`; keeps `r` (f32);
//! - backward: `g = dtype(dy w)`, `dx = r g - r^3 x mean(g x)` in f32. Never `dw`.
//!
//! Burn's composed RMSNorm runs about nine kernels forward (cast, square, mean, add, sqrt,
//! reciprocal, multiply, cast, multiply) and more backward, each a pass over the activations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{grid, launch, reduce_sum, row_index, THREADS};
use super::kernels::{empty_as, Raw};

/// One cube of [`THREADS`] units per row; each unit loads vectors of `N` elements (8 where the
/// width allows). `hv` counts vectors per row, `h` elements.
#[cube(launch, launch_unchecked)]
pub(crate) fn rms_forward_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    w: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    rstd: &mut Tensor<f32>,
    rows: u32,
    hv: u32,
    h: u32,
    eps: f32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let hv = hv as usize;
    let base = row * hv;
    let mut acc = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < hv {
        acc += sum_of_squares::<N>(Vector::cast_from(x[base + j]));
        j += CUBE_DIM_X as usize;
    }
    let r = row_rstd(acc, h, eps, threads);
    if UNIT_POS_X == 0 {
        rstd[row] = r;
    }
    write_normed::<E, N>(x, w, out, base, hv, r);
}

/// The residual add before a norm, fused with it (inference): `s = dtype(x + d)` (rounded to
/// the model's dtype, as torch adds), `out = norm(s)` as [`rms_forward_kernel`]; writes both
/// `s` (the next residual) and `out`. Each unit reads back only what it wrote.
#[cube(launch, launch_unchecked)]
pub(crate) fn add_rms_forward_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    d: &Tensor<Vector<E, N>>,
    w: &Tensor<Vector<E, N>>,
    sum: &mut Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    rows: u32,
    hv: u32,
    h: u32,
    eps: f32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let hv = hv as usize;
    let base = row * hv;
    let mut acc = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < hv {
        let s = Vector::<E, N>::cast_from(
            Vector::<f32, N>::cast_from(x[base + j]) + Vector::<f32, N>::cast_from(d[base + j]),
        );
        sum[base + j] = s;
        acc += sum_of_squares::<N>(Vector::cast_from(s));
        j += CUBE_DIM_X as usize;
    }
    let r = row_rstd(acc, h, eps, threads);
    write_normed::<E, N>(sum, w, out, base, hv, r);
}

/// The sum of a vector's squared elements.
#[cube]
fn sum_of_squares<N: Size>(v: Vector<f32, N>) -> f32 {
    let sq = v * v;
    let mut acc = f32::new(0.0);
    #[unroll]
    for e in 0..v.size() {
        acc += sq[e];
    }
    acc
}

/// The row's `1 / sqrt(mean(x^2) + eps)` from each unit's partial sum of squares `acc` (a cube
/// of `threads` units per row).
#[cube]
fn row_rstd(acc: f32, h: u32, eps: f32, #[comptime] threads: u32) -> f32 {
    let mut sh = SharedMemory::<f32>::new(threads as usize);
    sh[UNIT_POS_X as usize] = acc;
    sync_cube();
    reduce_sum(&mut sh);
    f32::new(1.0) / (sh[0] / f32::cast_from(h) + eps).sqrt()
}

/// `out = w * dtype(src r)` on this unit's vectors of the row at `base` (`hv` vectors), with
/// transformers' rounding point: the normalised value in the model's dtype before the weight.
#[cube]
fn write_normed<E: Float, N: Size>(
    src: &Tensor<Vector<E, N>>,
    w: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    base: usize,
    hv: usize,
    r: f32,
) {
    let rv = Vector::new(r);
    let mut j = UNIT_POS_X as usize;
    while j < hv {
        let normed = Vector::<E, N>::cast_from(Vector::<f32, N>::cast_from(src[base + j]) * rv);
        out[base + j] = Vector::cast_from(
            Vector::<f32, N>::cast_from(normed) * Vector::<f32, N>::cast_from(w[j]),
        );
        j += CUBE_DIM_X as usize;
    }
}

#[cube(launch, launch_unchecked)]
pub(crate) fn rms_backward_kernel<E: Float, N: Size>(
    dy: &Tensor<Vector<E, N>>,
    x: &Tensor<Vector<E, N>>,
    w: &Tensor<Vector<E, N>>,
    rstd: &Tensor<f32>,
    dx: &mut Tensor<Vector<E, N>>,
    rows: u32,
    hv: u32,
    h: u32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = x.vector_size();
    let hv = hv as usize;
    let tid = UNIT_POS_X as usize;
    let base = row * hv;
    let r = rstd[row];
    let mut sh = SharedMemory::<f32>::new(threads as usize);
    let mut acc = f32::new(0.0);
    let mut j = tid;
    while j < hv {
        let g = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(
            Vector::<f32, N>::cast_from(dy[base + j]) * Vector::<f32, N>::cast_from(w[j]),
        ));
        let gx = g * Vector::<f32, N>::cast_from(x[base + j]);
        #[unroll]
        for e in 0..n {
            acc += gx[e];
        }
        j += CUBE_DIM_X as usize;
    }
    sh[tid] = acc;
    sync_cube();
    reduce_sum(&mut sh);
    let mean_gx = sh[0] / f32::cast_from(h);
    let rv = Vector::new(r);
    let cv = Vector::new(r * r * r * mean_gx);
    let mut j = tid;
    while j < hv {
        let g = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(
            Vector::<f32, N>::cast_from(dy[base + j]) * Vector::<f32, N>::cast_from(w[j]),
        ));
        let xv = Vector::<f32, N>::cast_from(x[base + j]);
        dx[base + j] = Vector::cast_from(rv * g - cv * xv);
        j += CUBE_DIM_X as usize;
    }
}

/// `(y, r)` for `x [rows, h]`, `w [h]`.
pub fn forward(x: Raw, w: Raw, eps: f32) -> (Raw, Raw) {
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    let [rows, h] = x.meta.shape().dims::<2>();
    let y = empty_as(&x, Shape::new([rows, h]), x.dtype);
    let r = empty_as(&x, Shape::new([rows]), DType::F32);
    let dtype = x.dtype;
    let v = super::cube_util::vector_size(h);
    launch!(rms_forward_kernel::<CudaRuntime>(
        &x.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        v,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        r.clone().into_tensor_arg(),
        rows as u32,
        (h / v) as u32,
        h as u32,
        eps,
        THREADS,
        dtype.into(),
    ));
    (y, r)
}

/// `(s, y)` for `x`, `d [rows, h]`, `w [h]`: the residual sum `s = x + d` and `y = norm(s)`
/// ([`add_rms_forward_kernel`]; no statistics kept, for inference).
pub fn add_forward(x: Raw, d: Raw, w: Raw, eps: f32) -> (Raw, Raw) {
    let (x, d, w) = (into_contiguous(x), into_contiguous(d), into_contiguous(w));
    let [rows, h] = x.meta.shape().dims::<2>();
    let s = empty_as(&x, Shape::new([rows, h]), x.dtype);
    let y = empty_as(&x, Shape::new([rows, h]), x.dtype);
    let dtype = x.dtype;
    let v = super::cube_util::vector_size(h);
    launch!(add_rms_forward_kernel::<CudaRuntime>(
        &x.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        v,
        x.into_tensor_arg(),
        d.into_tensor_arg(),
        w.into_tensor_arg(),
        s.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rows as u32,
        (h / v) as u32,
        h as u32,
        eps,
        THREADS,
        dtype.into(),
    ));
    (s, y)
}

/// `dx` from `dy [rows, h]`, the input, the weight and the kept `r`.
pub fn backward(dy: Raw, x: Raw, w: Raw, r: Raw) -> Raw {
    let (dy, x, w, r) = (
        into_contiguous(dy),
        into_contiguous(x),
        into_contiguous(w),
        into_contiguous(r),
    );
    let [rows, h] = x.meta.shape().dims::<2>();
    let dx = empty_as(&x, Shape::new([rows, h]), x.dtype);
    let dtype = x.dtype;
    let v = super::cube_util::vector_size(h);
    launch!(rms_backward_kernel::<CudaRuntime>(
        &x.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        v,
        dy.into_tensor_arg(),
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        r.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        rows as u32,
        (h / v) as u32,
        h as u32,
        THREADS,
        dtype.into(),
    ));
    dx
}

/// Backends with the RMSNorm op (raw cubecl CUDA, with or without autodiff).
pub trait FusedRmsNorm: Backend {
    /// `w * dtype(x / sqrt(mean(x^2) + eps))` over the last axis of `x [rows, h]`.
    fn fused_rms_norm(x: Prim<Self>, w: Prim<Self>, eps: f32) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedRmsNorm
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_rms_norm(x: Raw, w: Raw, eps: f32) -> Raw {
        forward(x, w, eps).0
    }
}

#[derive(Debug, Clone)]
struct RmsState<T> {
    x: NodeId,
    w: T,
    r: T,
}

#[derive(Debug)]
struct RmsBackward;

impl<F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<CudaRuntime, F, I, BT>, 1> for RmsBackward
{
    type State = RmsState<Raw>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
        let [px] = ops.parents;
        let dy = grads.consume::<Cb<F, I, BT>>(&ops.node);
        let st = ops.state;
        if let Some(node) = px {
            let x = ckpt.retrieve_node_output::<Raw>(st.x);
            grads.register::<Cb<F, I, BT>>(node.id, backward(dy, x, st.w, st.r));
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedRmsNorm
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_rms_norm(x: Prim<Self>, w: Prim<Self>, eps: f32) -> Prim<Self> {
        let w = w.primitive;
        match RmsBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let saved = prep.checkpoint(&x);
                let (y, r) = forward(x.primitive, w.clone(), eps);
                prep.finish(RmsState { x: saved, w, r }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w, eps).0),
        }
    }
}
