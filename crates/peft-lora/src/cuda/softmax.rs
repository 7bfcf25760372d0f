//! The attention softmax as two cubecl kernels, one pass each over the `[rows, t]` scores:
//! - forward `P = softmax(f32(S) + mask)` (f32 inside, `P` written in the scores' dtype);
//! - backward `dS = scale * P * (dP - sum_j P dP)` (f32 inside).
//!
//! Burn's composed softmax makes about eight passes over f32 `[rows, t]` tensors (cast, add the
//! mask, max, subtract, exp, sum, divide, cast) and its backward as many; these kernels read
//! their inputs once and write once. One cube of [`THREADS`] threads per row: each thread
//! strides over the row, then the cube reduces through shared memory.

use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{grid, reduce_max, reduce_sum, row_index, THREADS};
use super::kernels::{empty_as, Raw};

#[cube(launch)]
fn softmax_forward_kernel<E: Float>(
    scores: &Tensor<E>,
    mask: &Tensor<f32>,
    out: &mut Tensor<E>,
    rows: u32,
    t: u32,
    s: u32,
    rows_per_mask: u32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let t = t as usize;
    let s = s as usize;
    let tid = UNIT_POS_X as usize;
    let base = row * t;
    // Rows are [mask batch, heads, s]: query position row % s of mask batch row / rows_per_mask.
    let mbase = ((row / rows_per_mask as usize) * s + row % s) * t;
    let mut sh = SharedMemory::<f32>::new(threads as usize);

    let mut mx = f32::new(-3.0e38);
    let mut j = tid;
    while j < t {
        let v = f32::cast_from(scores[base + j]) + mask[mbase + j];
        if v > mx {
            mx = v;
        }
        j += CUBE_DIM_X as usize;
    }
    sh[tid] = mx;
    sync_cube();
    reduce_max(&mut sh);
    let row_max = sh[0];
    sync_cube();

    let mut sum = f32::new(0.0);
    let mut j = tid;
    while j < t {
        let v = f32::cast_from(scores[base + j]) + mask[mbase + j];
        sum += (v - row_max).exp();
        j += CUBE_DIM_X as usize;
    }
    sh[tid] = sum;
    sync_cube();
    reduce_sum(&mut sh);
    let inv = f32::new(1.0) / sh[0];

    let mut j = tid;
    while j < t {
        let v = f32::cast_from(scores[base + j]) + mask[mbase + j];
        out[base + j] = E::cast_from((v - row_max).exp() * inv);
        j += CUBE_DIM_X as usize;
    }
}

#[cube(launch)]
fn softmax_backward_kernel<E: Float>(
    probs: &Tensor<E>,
    dprobs: &Tensor<E>,
    out: &mut Tensor<E>,
    rows: u32,
    t: u32,
    scale: f32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let t = t as usize;
    let tid = UNIT_POS_X as usize;
    let base = row * t;
    let mut sh = SharedMemory::<f32>::new(threads as usize);

    let mut dot = f32::new(0.0);
    let mut j = tid;
    while j < t {
        dot += f32::cast_from(probs[base + j]) * f32::cast_from(dprobs[base + j]);
        j += CUBE_DIM_X as usize;
    }
    sh[tid] = dot;
    sync_cube();
    reduce_sum(&mut sh);
    let row_dot = sh[0];

    let mut j = tid;
    while j < t {
        let p = f32::cast_from(probs[base + j]);
        let dp = f32::cast_from(dprobs[base + j]);
        out[base + j] = E::cast_from(scale * p * (dp - row_dot));
        j += CUBE_DIM_X as usize;
    }
}

/// `softmax(f32(scores) + mask)` over the last axis, in the scores' dtype. `scores [g, m, t]`
/// whose `g * m` rows are `[mb, heads, s]`; `mask [mb, 1, s, t]` f32.
pub fn forward(scores: Raw, mask: Raw) -> Raw {
    let scores = into_contiguous(scores);
    let mask = into_contiguous(mask);
    let [g, m, t] = scores.meta.shape().dims::<3>();
    let ms = mask.meta.shape();
    let (mb, s) = (ms[0], ms[2]);
    let rows = g * m;
    let out = empty_as(&scores, scores.meta.shape().clone(), scores.dtype);
    let dtype = scores.dtype;
    softmax_forward_kernel::launch::<CudaRuntime>(
        &scores.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        scores.into_tensor_arg(),
        mask.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        t as u32,
        s as u32,
        (rows / mb) as u32,
        THREADS,
        dtype.into(),
    );
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
    softmax_backward_kernel::launch::<CudaRuntime>(
        &probs.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        probs.into_tensor_arg(),
        dprobs.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        t as u32,
        scale,
        THREADS,
        dtype.into(),
    );
    out
}
