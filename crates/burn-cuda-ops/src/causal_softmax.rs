//! The attention softmax of the causal row blocks ([`crate::attention::Layout::Causal`]), in
//! place, as two cubecl kernels:
//! - forward `P = softmax(f32(S) + mask)` over each row's computed keys, written over `S`;
//! - backward `dS = scale * P * (dP - sum_j P dP)` over the same keys, written over `dP`.
//!
//! The scores `[g, m, t]` hold, per group, `m = s * rep` query rows position-major (row
//! `i * rep + h` is position `i` of query head `h`), each `t = s` keys wide (the row pitch). The
//! rows are cut into blocks of `block * rep` rows (`block` positions); a row of block `b` has only
//! its first `(b + 1) * block` keys computed: every later key is after the row's position, so
//! the causal mask hides it and its probability is 0. The kernels read and write those keys
//! only; the rest of the row is never touched and never read. Within them, the vectors wholly
//! after the row's position are written 0 without being read (their `exp` underflows to 0
//! wherever a visible key is unmasked; a row with every visible key masked, a padding position,
//! is then uniform over the vectors up to its position instead).
//!
//! One plane (warp) per row, as [`crate::softmax`]'s kernels, whose single-pass forward (running
//! maximum and rescaled sum) and plane reductions these share.

use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{exp_sum, launch, row_index, vector_max, vector_size, vector_sum};
use super::kernels::Raw;
use super::softmax::rows_launch;

/// The keys (in vectors) row `rg` of a group computes: its block's end, at most the row.
#[cube]
fn row_len(rg: usize, block_rows: u32, block_v: u32, tv: usize) -> usize {
    let len = (rg / block_rows as usize + 1) * block_v as usize;
    let mut out = tv;
    if len < tv {
        out = len;
    }
    out
}

/// The vectors of row `rg` (of `len`) holding a key at or before its position `rg / rep`.
#[cube]
fn row_seen(rg: usize, rep: u32, n: usize, len: usize) -> usize {
    let seen = (rg / rep as usize) / n + 1;
    let mut out = len;
    if seen < len {
        out = seen;
    }
    out
}

#[cube(launch, launch_unchecked)]
pub(crate) fn causal_softmax_forward_kernel<E: Float, N: Size>(
    scores: &mut Tensor<Vector<E, N>>,
    mask: &Tensor<Vector<f32, N>>,
    rows: u32,
    tv: u32,
    m: u32,
    rep: u32,
    rows_per_mask: u32,
    row0: u32,
    block_rows: u32,
    block_v: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index() * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if row >= rows as usize {
        terminate!();
    }
    let n = scores.vector_size();
    let base = row * tv as usize;
    // Global row `r` of the `[mb, kv heads, s * rep]` rows: mask batch `r / rows_per_mask`,
    // query position `(r % m) / rep`.
    let r = row0 as usize + row;
    let rg = r % m as usize;
    let len = row_len(rg, block_rows, block_v, tv as usize);
    let seen = row_seen(rg, rep, n, len);
    let mbase =
        ((r / rows_per_mask as usize) * mask.stride(0) + (rg / rep as usize) * mask.stride(2)) / n;

    let mut mx = f32::new(-3.0e38);
    let mut sum = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < seen {
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

    // Each unit rewrites only the vectors it read, after its last read of them.
    let mut j = UNIT_POS_X as usize;
    while j < seen {
        let v = Vector::<f32, N>::cast_from(scores[base + j]) + mask[mbase + j];
        scores[base + j] = Vector::cast_from((v - row_max).exp() * inv);
        j += CUBE_DIM_X as usize;
    }
    let zero = Vector::<E, N>::cast_from(Vector::<f32, N>::new(f32::new(0.0)));
    while j < len {
        scores[base + j] = zero;
        j += CUBE_DIM_X as usize;
    }
}

#[cube(launch, launch_unchecked)]
pub(crate) fn causal_softmax_backward_kernel<E: Float, N: Size>(
    probs: &Tensor<Vector<E, N>>,
    grad: &mut Tensor<Vector<E, N>>,
    rows: u32,
    tv: u32,
    m: u32,
    rep: u32,
    block_rows: u32,
    block_v: u32,
    scale: f32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index() * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    if row >= rows as usize {
        terminate!();
    }
    let n = probs.vector_size();
    let base = row * tv as usize;
    let rg = row % m as usize;
    let len = row_len(rg, block_rows, block_v, tv as usize);
    // Past `seen` the probabilities are 0 (the forward wrote them so), and so is `dS`.
    let seen = row_seen(rg, rep, n, len);

    let mut dot = f32::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < seen {
        let pd = Vector::<f32, N>::cast_from(probs[base + j])
            * Vector::<f32, N>::cast_from(grad[base + j]);
        dot += vector_sum::<N>(pd, n);
        j += CUBE_DIM_X as usize;
    }
    let row_dot = Vector::new(plane_sum(dot));
    let scale = Vector::new(scale);

    let mut j = UNIT_POS_X as usize;
    while j < seen {
        let p = Vector::<f32, N>::cast_from(probs[base + j]);
        let dp = Vector::<f32, N>::cast_from(grad[base + j]);
        grad[base + j] = Vector::cast_from(scale * p * (dp - row_dot));
        j += CUBE_DIM_X as usize;
    }
    let zero = Vector::<E, N>::cast_from(Vector::<f32, N>::new(f32::new(0.0)));
    while j < len {
        grad[base + j] = zero;
        j += CUBE_DIM_X as usize;
    }
}

/// The vector width of rows `t` wide cut at multiples of `block`.
fn width(t: usize, block: usize) -> usize {
    vector_size(t).min(vector_size(block))
}

/// `causal_softmax_forward_kernel` over `scores [g, m, t]` (dense), in place: rows
/// `row0..row0 + g * m` of the `total_rows` (`[mb, kv heads, s * rep]`, `row0` a multiple of
/// `m`) that `mask [mb, 1, s, t]` covers; `rep` rows per position; blocks of `block` positions.
/// Returns `scores`, now the probabilities on each row's computed keys.
pub fn forward_in_place(
    scores: Raw,
    mask: Raw,
    row0: usize,
    total_rows: usize,
    rep: usize,
    block: usize,
) -> Raw {
    let [g, m, t] = scores.meta.shape().dims::<3>();
    let n = width(t, block);
    let ms = mask.meta.strides();
    let mask = if ms[3] == 1 && ms[0].is_multiple_of(n) && ms[2].is_multiple_of(n) {
        mask
    } else {
        into_contiguous(mask)
    };
    let mb = mask.meta.shape()[0];
    let rows = g * m;
    debug_assert!(
        row0.is_multiple_of(m) && row0 + rows <= total_rows && total_rows.is_multiple_of(mb)
    );
    let dtype = scores.dtype;
    let (count, dim) = rows_launch(rows);
    launch!(causal_softmax_forward_kernel::<CudaRuntime>(
        &scores.client.clone(),
        count,
        dim,
        n,
        scores.clone().into_tensor_arg(),
        mask.into_tensor_arg(),
        rows as u32,
        (t / n) as u32,
        m as u32,
        rep as u32,
        (total_rows / mb) as u32,
        row0 as u32,
        (block * rep) as u32,
        (block / n) as u32,
        dtype.into(),
    ));
    scores
}

/// `causal_softmax_backward_kernel`: `grad` (`dP [g, m, t]`, dense, rows starting at a
/// group) becomes `dS = scale * P * (dP - rowsum(P dP))` on each row's computed keys, in place;
/// `probs` as the forward left them. Returns `grad`.
pub fn backward_in_place(probs: Raw, grad: Raw, scale: f32, rep: usize, block: usize) -> Raw {
    let [g, m, t] = probs.meta.shape().dims::<3>();
    let n = width(t, block);
    let rows = g * m;
    let dtype = probs.dtype;
    let (count, dim) = rows_launch(rows);
    launch!(causal_softmax_backward_kernel::<CudaRuntime>(
        &probs.client.clone(),
        count,
        dim,
        n,
        probs.into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        rows as u32,
        (t / n) as u32,
        m as u32,
        rep as u32,
        (block * rep) as u32,
        (block / n) as u32,
        scale,
        dtype.into(),
    ));
    grad
}
