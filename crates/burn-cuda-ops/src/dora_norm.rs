//! DoRA's column norms `||W + s A B||` (one per output of a Burn-layout `[in, out]` weight) in
//! two cubecl kernels, from `W` and two small GEMM results the caller makes (`A^T W` and the
//! Gram matrix `A^T A`):
//!
//! `||W_o + s (A B)_o||^2 = ||W_o||^2 + 2 s sum_k (A^T W)[k, o] B[k, o]
//!                          + s^2 sum_{k, j} B[k, o] (A^T A)[k, j] B[j, o]`.
//!
//! 1. [`col_sq_partial_kernel`]: partial sums of `W^2` down each column, one chunk of rows per
//!    cube row of the grid (f32), so that a `4096 x 4096` weight spreads over ~128 cubes.
//! 2. [`dora_norm_kernel`]: per column, the chunks' total and the two low-rank terms in f32,
//!    `sqrt(max(., 0))` written in the weight's dtype.
//!
//! The same sum composed of Burn ops took ~20 launches (casts, products, row sums, the square
//! root) beside the GEMMs: DoRA's layer was host-bound (1.0 ms above LoRA's at 4096 tokens
//! `4096 -> 4096` on an H100, its GPU work ~0.15 ms of that).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, vector_size, THREADS};
use super::kernels::{empty_as, Raw};

/// Rows of `W` per chunk of the partial sums.
pub const CHUNK_ROWS: usize = 64;

/// `partial[c, o] = sum of W[i, o]^2 over the rows i of chunk c` (`CUBE_POS_Y` is the chunk,
/// units across vectors of `N` columns), for `w [rows, cv vectors]`, f32 out `[chunks, cv * N]`.
#[cube(launch, launch_unchecked)]
pub(crate) fn col_sq_partial_kernel<E: Float, N: Size>(
    w: &Tensor<Vector<E, N>>,
    partial: &mut Tensor<Vector<f32, N>>,
    rows: u32,
    cv: u32,
    chunk_rows: u32,
    #[define(E)] _dtype: StorageType,
) {
    let c = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let cv = cv as usize;
    if c >= cv {
        terminate!();
    }
    let chunk = CUBE_POS_Y as usize;
    let start = chunk * chunk_rows as usize;
    let mut end = start + chunk_rows as usize;
    if end > rows as usize {
        end = rows as usize;
    }
    let mut acc = Vector::<f32, N>::new(f32::new(0.0));
    let mut i = start;
    while i < end {
        let v = Vector::<f32, N>::cast_from(w[i * cv + c]);
        acc += v * v;
        i += 1;
    }
    partial[chunk * cv + c] = acc;
}

/// Per column `o < cols`: `norm[o] = sqrt(max(sum_c partial[c, o] + 2 s sum_k aw[k, o] b[k, o]
/// + s^2 sum_{k, j} b[k, o] gram[k, j] b[j, o], 0))` in `E`; `aw`, `b` `[r, cols]`,
/// `gram [r, r]`.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dora_norm_kernel<E: Float>(
    partial: &Tensor<f32>,
    aw: &Tensor<E>,
    b: &Tensor<E>,
    gram: &Tensor<E>,
    norm: &mut Tensor<E>,
    cols: u32,
    chunks: u32,
    r: u32,
    s: f32,
    #[define(E)] _dtype: StorageType,
) {
    let o = elem_index();
    let cols = cols as usize;
    if o >= cols {
        terminate!();
    }
    let r = r as usize;
    let mut w_sq = f32::new(0.0);
    let mut c = 0usize;
    while c < chunks as usize {
        w_sq += partial[c * cols + o];
        c += 1;
    }
    let mut cross = f32::new(0.0);
    let mut quad = f32::new(0.0);
    let mut k = 0usize;
    while k < r {
        let bk = f32::cast_from(b[k * cols + o]);
        cross += f32::cast_from(aw[k * cols + o]) * bk;
        let mut gb = f32::new(0.0);
        let mut j = 0usize;
        while j < r {
            gb += f32::cast_from(gram[k * r + j]) * f32::cast_from(b[j * cols + o]);
            j += 1;
        }
        quad += gb * bk;
        k += 1;
    }
    let mut sq = w_sq + f32::new(2.0) * s * cross + s * s * quad;
    if sq < f32::new(0.0) {
        sq = f32::new(0.0);
    }
    norm[o] = E::cast_from(sq.sqrt());
}

/// `||W + s A B||` per output column, `[out]` in `w`'s dtype, from `w [in, out]`,
/// `aw = A^T W [r, out]`, `gram = A^T A [r, r]` and `b [r, out]` (all one float dtype).
pub fn norm(w: Raw, aw: Raw, gram: Raw, b: Raw, s: f32) -> Raw {
    let w = into_contiguous(w);
    let (aw, gram, b) = (
        into_contiguous(aw),
        into_contiguous(gram),
        into_contiguous(b),
    );
    let [rows, cols] = w.meta.shape().dims::<2>();
    let r = b.meta.shape().dims::<2>()[0];
    let dtype = w.dtype;
    let v = vector_size(cols);
    let cv = cols / v;
    let chunks = rows.div_ceil(CHUNK_ROWS).max(1);
    let partial = empty_as(&w, Shape::new([chunks, cols]), DType::F32);
    let client = w.client.clone();
    launch!(col_sq_partial_kernel::<CudaRuntime>(
        &client,
        CubeCount::Static(cv.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
        CubeDim::new_1d(THREADS),
        v,
        w.clone().into_tensor_arg(),
        partial.clone().into_tensor_arg(),
        rows as u32,
        cv as u32,
        CHUNK_ROWS as u32,
        dtype.into(),
    ));
    let out = empty_as(&w, Shape::new([cols]), dtype);
    launch!(dora_norm_kernel::<CudaRuntime>(
        &client,
        elem_grid(cols),
        CubeDim::new_1d(THREADS),
        partial.into_tensor_arg(),
        aw.into_tensor_arg(),
        b.into_tensor_arg(),
        gram.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        cols as u32,
        chunks as u32,
        r as u32,
        s,
        dtype.into(),
    ));
    out
}

/// Backends that run [`norm`]: the raw cubecl CUDA backend, and autodiff over it (untracked:
/// DoRA's norm is detached).
pub trait FusedDoraNorm: burn::tensor::backend::Backend {
    /// `||W + s A B||` per output column (see [`norm`]).
    fn fused_dora_norm(
        w: Prim<Self>,
        aw: Prim<Self>,
        gram: Prim<Self>,
        b: Prim<Self>,
        s: f32,
    ) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedDoraNorm
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_dora_norm(w: Raw, aw: Raw, gram: Raw, b: Raw, s: f32) -> Raw {
        norm(w, aw, gram, b, s)
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedDoraNorm
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_dora_norm(
        w: Prim<Self>,
        aw: Prim<Self>,
        gram: Prim<Self>,
        b: Prim<Self>,
        s: f32,
    ) -> Prim<Self> {
        let n = norm(w.primitive, aw.primitive, gram.primitive, b.primitive, s);
        <Self as AutodiffBackend>::from_inner(n)
    }
}
