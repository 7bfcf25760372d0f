//! The attention softmax as two cubecl kernels:
//! - forward `P = softmax(f32(S) + mask)` (f32 inside, `P` written in the scores' dtype);
//! - backward `dS = scale * P * (dP - sum_j P dP)` (f32 inside).
//!
//! Burn's composed softmax makes about eight passes over f32 `[rows, t]` tensors (cast, add the
//! mask, max, subtract, exp, sum, divide, cast) and its backward as many; these kernels read
//! their inputs twice (the second read mostly from cache) and write once.
//!
//! One plane (warp) per row, [`ROWS_PER_CUBE`] rows per cube: the row's reductions are plane
//! shuffles, with no shared memory or cube barrier. Each unit loads vectors of up to 8 elements
//! (16 bytes of bf16), the widest that divides the row, so a warp moves 512 bytes per load.
//! The forward finds the row's maximum and the sum of exponentials in one pass (the running
//! sum is rescaled when the maximum grows, as in online softmax), then writes `P`.

use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{exp_sum, grid, launch, row_index, vector_max, vector_size, vector_sum};
use super::kernels::{empty_as, Raw};

/// Rows per cube (one plane each).
const ROWS_PER_CUBE: u32 = 8;
/// Units per plane on NVIDIA GPUs.
const PLANE: u32 = 32;

#[cube(launch, launch_unchecked)]
pub(crate) fn softmax_forward_kernel<E: Float, N: Size>(
    scores: &Tensor<Vector<E, N>>,
    mask: &Tensor<Vector<f32, N>>,
    out: &mut Tensor<Vector<E, N>>,
    rows: u32,
    tv: u32,
    s: u32,
    rows_per_mask: u32,
    row0: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index() * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if row >= rows as usize {
        terminate!();
    }
    let n = scores.vector_size();
    let tv = tv as usize;
    let s = s as usize;
    let base = row * tv;
    // Rows are [mask batch, heads, s] from row `row0` on: query position r % s of mask batch
    // r / rows_per_mask, for r = row0 + row. The mask's rows may be pitched (Burn pads rows of
    // odd widths; the host checks that the strides are whole vectors): its strides.
    let r = row0 as usize + row;
    let mbase = ((r / rows_per_mask as usize) * mask.stride(0) + (r % s) * mask.stride(2)) / n;

    // One pass: this unit's maximum and its sum of exp(v - maximum).
    let mut mx = f32::new(-3.0e38);
    let mut sum = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < tv {
        let v = Vector::<f32, N>::cast_from(scores[base + j]) + mask[mbase + j];
        let vmax = vector_max::<N>(v, mx, n);
        sum = sum * (mx - vmax).exp() + exp_sum::<N>(v, vmax, n);
        mx = vmax;
        j += CUBE_DIM_X as usize;
    }
    let row_max = plane_max(mx);
    let total = plane_sum(sum * (mx - row_max).exp());
    let inv = Vector::new(f32::new(1.0) / total);
    let row_max = Vector::new(row_max);

    let mut j = UNIT_POS_X as usize;
    while j < tv {
        let v = Vector::<f32, N>::cast_from(scores[base + j]) + mask[mbase + j];
        out[base + j] = Vector::cast_from((v - row_max).exp() * inv);
        j += CUBE_DIM_X as usize;
    }
}

#[cube(launch, launch_unchecked)]
pub(crate) fn softmax_backward_kernel<E: Float, N: Size>(
    probs: &Tensor<Vector<E, N>>,
    dprobs: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    rows: u32,
    tv: u32,
    scale: f32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index() * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if row >= rows as usize {
        terminate!();
    }
    let n = probs.vector_size();
    let tv = tv as usize;
    let base = row * tv;

    let mut dot = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < tv {
        let pd = Vector::<f32, N>::cast_from(probs[base + j])
            * Vector::<f32, N>::cast_from(dprobs[base + j]);
        dot += vector_sum::<N>(pd, n);
        j += CUBE_DIM_X as usize;
    }
    let row_dot = Vector::new(plane_sum(dot));
    let scale = Vector::new(scale);

    let mut j = UNIT_POS_X as usize;
    while j < tv {
        let p = Vector::<f32, N>::cast_from(probs[base + j]);
        let dp = Vector::<f32, N>::cast_from(dprobs[base + j]);
        out[base + j] = Vector::cast_from(scale * p * (dp - row_dot));
        j += CUBE_DIM_X as usize;
    }
}

/// The grid and cube for `rows` rows, one plane each.
pub(crate) fn rows_launch(rows: usize) -> (CubeCount, CubeDim) {
    let cubes = rows.div_ceil(ROWS_PER_CUBE as usize);
    (grid(cubes), CubeDim::new_2d(PLANE, ROWS_PER_CUBE))
}

/// `softmax(f32(scores) + mask)` over the last axis, in the scores' dtype. `scores [g, m, t]`
/// whose `g * m` rows are `[mb, heads, s]`; `mask [mb, 1, s, t]` f32.
pub fn forward(scores: Raw, mask: Raw) -> Raw {
    let [g, m, _] = scores.meta.shape().dims::<3>();
    forward_rows(scores, mask, 0, g * m)
}

/// [`forward`] over a chunk of the rows: `scores [g, m, t]` holds rows `row0..row0 + g * m` of
/// the `total_rows` (`[mb, heads, s]`) that `mask [mb, 1, s, t]` covers; `row0` a multiple of
/// `s`.
pub fn forward_rows(scores: Raw, mask: Raw, row0: usize, total_rows: usize) -> Raw {
    let scores = into_contiguous(scores);
    let [g, m, t] = scores.meta.shape().dims::<3>();
    let n = vector_size(t);
    // The mask is read at its own strides when its keys are adjacent and its rows start on
    // whole vectors (the decode step's mask over a cache of odd capacity is pitched; copying it
    // would cost a launch per layer).
    let ms = mask.meta.strides();
    let mask = if ms[3] == 1 && ms[0].is_multiple_of(n) && ms[2].is_multiple_of(n) {
        mask
    } else {
        into_contiguous(mask)
    };
    let ms = mask.meta.shape();
    let (mb, s) = (ms[0], ms[2]);
    let rows = g * m;
    debug_assert!(
        row0.is_multiple_of(s) && row0 + rows <= total_rows && total_rows.is_multiple_of(mb)
    );
    let out = empty_as(&scores, scores.meta.shape().clone(), scores.dtype);
    let dtype = scores.dtype;
    let (count, dim) = rows_launch(rows);
    launch!(softmax_forward_kernel::<CudaRuntime>(
        &scores.client.clone(),
        count,
        dim,
        n,
        scores.into_tensor_arg(),
        mask.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        (t / n) as u32,
        s as u32,
        (total_rows / mb) as u32,
        row0 as u32,
        dtype.into(),
    ));
    out
}

/// `scale * P * (dP - rowsum(P dP))`, `[g, m, t]`, in `probs`' dtype.
pub fn backward(probs: Raw, dprobs: Raw, scale: f32) -> Raw {
    let probs = into_contiguous(probs);
    let dprobs = into_contiguous(dprobs);
    let [g, m, t] = probs.meta.shape().dims::<3>();
    let rows = g * m;
    let out = empty_as(&probs, probs.meta.shape().clone(), probs.dtype);
    let dtype = probs.dtype;
    let n = vector_size(t);
    let (count, dim) = rows_launch(rows);
    launch!(softmax_backward_kernel::<CudaRuntime>(
        &probs.client.clone(),
        count,
        dim,
        n,
        probs.into_tensor_arg(),
        dprobs.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        (t / n) as u32,
        scale,
        dtype.into(),
    ));
    out
}
