//! The attention forward for a few query rows per KV group (a decode step: one new token of
//! `rep` query heads per group) as one cubecl kernel, instead of two cuBLASLt GEMMs and the
//! softmax kernel: one launch per layer instead of three, and K and V read once each.
//!
//! Same arithmetic and roundings as [`super::attention`]'s forward, so a decode step gives what
//! the GEMM path gives up to the order of the sums: the score `scale q.k` (f32 sum) rounded to
//! the inputs' dtype, as cuBLASLt writes `S`; `P = softmax(f32(S) + mask)` in f32 rounded to the
//! dtype, as the softmax kernel writes it; `out = sum_j f32(P_j) f32(v_j)` rounded once.
//!
//! One cube per group of `[WARPS planes x 32 units]`; each unit owns one vector of `d / 32`
//! elements of a row. Pass 1: the planes take keys in turn, each key's `m` dot products are
//! plane sums, the scores go to shared memory. Pass 2: one plane per query row finds its
//! maximum and sum. Pass 3: the planes take keys in turn again and accumulate `P_j v_j` in
//! registers, then sum their partial rows through shared memory.
//!
//! **Opt-in (`PEFT_LORA_DECODE_ATTENTION=1`), because it is slower.** On an H100 (8B shape,
//! prompt 600 + 256 new tokens) greedy decoding ran 45.8 / 382 / 1,925 tok/s at batch 1 / 8 /
//! 64 with it against 68.8 / 533 / 2,670 through the GEMM path in the same lease: with one cube
//! per KV group (8 cubes at batch 1) each plane walks ~100 keys one after another, a dependent
//! chain of loads and plane sums, so the kernel is bound by latency, not by the bytes it reads.
//! Splitting the keys over many cubes (flash-decoding's split-K, with a combine step) is what
//! it would take; the GPU self-test keeps checking it against the f64 reference.

use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{grid, launch};
use super::kernels::{empty_as, Raw};

/// Planes (warps) per cube.
const WARPS: usize = 8;
/// Units per plane on NVIDIA GPUs; each holds one vector of a row, so `d = 32 x vector`.
const PLANE: usize = 32;
/// The most query rows per group this kernel takes (Llama-3's 4 query heads per KV head at
/// one new token; Llama-2-70B's 8).
pub const MAX_ROWS: usize = 8;
/// Keys are counted in steps of this many for the kernel's shared memory (one compiled kernel
/// per step a generation's cache capacity falls in; up to 1,792 keys at Llama-3's 4 rows of
/// 128).
const KEY_STEP: usize = 256;
/// Shared memory of one cube, bytes: the scores (f32) and the planes' partial rows (f32
/// vectors); the static limit of a CUDA block.
const SHARED_BYTES: usize = 48 * 1024;

#[cube(launch, launch_unchecked)]
pub(crate) fn decode_attention_kernel<E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mask: &Tensor<f32>,
    out: &mut Tensor<Vector<E, N>>,
    groups: u32,
    t: u32,
    s: u32,
    rows_per_mask: u32,
    scale: f32,
    #[comptime] m: usize,
    #[comptime] score_elems: usize,
    #[define(E)] _dtype: StorageType,
) {
    let gi = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if gi >= groups as usize {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let warps = CUBE_DIM_Y as usize;
    let plane = CUBE_DIM_X as usize;
    let n = q.vector_size();
    let t = t as usize;
    let s = s as usize;
    let rows_per_mask = rows_per_mask as usize;
    let mut sc = SharedMemory::<f32>::new(score_elems);
    let mut stats = SharedMemory::<f32>::new(2 * m);
    let mut part = SharedMemory::<Vector<f32, N>>::new(WARPS * m * PLANE);

    // Pass 1: scores + mask.
    let mut j = warp;
    while j < t {
        let kv = Vector::<f32, N>::cast_from(k[(gi * t + j) * plane + lane]);
        #[unroll]
        for r in 0..m {
            let qv = Vector::<f32, N>::cast_from(q[(gi * m + r) * plane + lane]);
            let prod = qv * kv;
            let mut dot = f32::new(0.0);
            #[unroll]
            for e in 0..n {
                dot += prod[e];
            }
            let total = plane_sum(dot);
            if lane == 0 {
                // The mask's rows may be pitched (Burn pads rows of odd widths): its strides.
                let row = gi * m + r;
                let mrow = (row / rows_per_mask) * mask.stride(0) + (row % s) * mask.stride(2);
                sc[r * t + j] = f32::cast_from(E::cast_from(total * scale)) + mask[mrow + j];
            }
        }
        j += warps;
    }
    sync_cube();

    // Pass 2: each row's maximum and the inverse of its sum of exponentials.
    let mut r = warp;
    while r < m {
        let mut mx = f32::new(-3.0e38);
        let mut jj = lane;
        while jj < t {
            let x = sc[r * t + jj];
            if x > mx {
                mx = x;
            }
            jj += plane;
        }
        let row_max = plane_max(mx);
        let mut sum = f32::new(0.0);
        let mut jj = lane;
        while jj < t {
            sum += (sc[r * t + jj] - row_max).exp();
            jj += plane;
        }
        let total = plane_sum(sum);
        if lane == 0 {
            stats[r] = row_max;
            stats[m + r] = f32::new(1.0) / total;
        }
        r += warps;
    }
    sync_cube();

    // Pass 3: this plane's keys' P v, then the planes' partial rows summed.
    let mut acc = Array::<Vector<f32, N>>::new(m);
    #[unroll]
    for r in 0..m {
        acc[r] = Vector::new(f32::new(0.0));
    }
    let mut j = warp;
    while j < t {
        let vv = Vector::<f32, N>::cast_from(v[(gi * t + j) * plane + lane]);
        #[unroll]
        for r in 0..m {
            let p = f32::cast_from(E::cast_from(
                (sc[r * t + j] - stats[r]).exp() * stats[m + r],
            ));
            acc[r] += Vector::new(p) * vv;
        }
        j += warps;
    }
    #[unroll]
    for r in 0..m {
        part[(warp * m + r) * PLANE + lane] = acc[r];
    }
    sync_cube();
    let mut r = warp;
    while r < m {
        let mut o = part[r * PLANE + lane];
        let mut w = 1usize;
        while w < warps {
            o += part[(w * m + r) * PLANE + lane];
            w += 1;
        }
        out[(gi * m + r) * plane + lane] = Vector::cast_from(o);
        r += warps;
    }
}

/// `(vector width, score elements)` of a launch for `m` query rows per group over `t` keys of
/// head size `d`, or `None` where the kernel does not apply: more than [`MAX_ROWS`] rows, a head
/// size other than 32 x 1, 2, 4 or 8, or scores and partial rows beyond the shared memory.
fn plan(m: usize, t: usize, d: usize) -> Option<(usize, usize)> {
    let vector = d / PLANE;
    if !(1..=MAX_ROWS).contains(&m) || !d.is_multiple_of(PLANE) || !matches!(vector, 1 | 2 | 4 | 8)
    {
        return None;
    }
    let elems = m * t.div_ceil(KEY_STEP) * KEY_STEP;
    let bytes = 4 * (elems + 2 * m + WARPS * m * PLANE * vector);
    (bytes <= SHARED_BYTES).then_some((vector, elems))
}

/// Whether [`forward`] takes `m` query rows per group over `t` keys of head size `d`.
pub fn applies(m: usize, t: usize, d: usize) -> bool {
    plan(m, t, d).is_some()
}

/// `softmax(f32(scale q k^T) + mask) v` for dense `q [g, m, d]`, `k`, `v [g, t, d]`, `mask [mb,
/// 1, s, t]` f32 (rows `[mb, heads, s]` as in [`super::attention`]; its keys adjacent, its rows
/// at any stride, so Burn's pitched layout of odd widths is read as it is); the caller checks
/// [`applies`].
pub fn forward(q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32) -> Raw {
    let mask = if mask.meta.strides()[3] == 1 {
        mask
    } else {
        into_contiguous(mask)
    };
    let [g, m, d] = q.meta.shape().dims::<3>();
    let t = k.meta.shape()[1];
    let ms = mask.meta.shape();
    let (mb, s) = (ms[0], ms[2]);
    let (vector, elems) = plan(m, t, d).expect("the caller checked that the kernel applies");
    let out = empty_as(&q, Shape::new([g, m, d]), q.dtype);
    let dtype = q.dtype;
    launch!(decode_attention_kernel::<CudaRuntime>(
        &q.client.clone(),
        grid(g),
        CubeDim::new_2d(PLANE as u32, WARPS as u32),
        vector,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        g as u32,
        t as u32,
        s as u32,
        (g * m / mb) as u32,
        scale,
        m,
        elems,
        dtype.into(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::applies;

    #[test]
    fn the_decode_kernel_takes_a_few_rows_over_a_bounded_cache() {
        // Llama-3-8B decode: 4 query heads per KV head, head size 128, caches up to 1792 keys.
        assert!(applies(4, 856, 128));
        assert!(applies(4, 1792, 128));
        assert!(!applies(4, 1793, 128));
        // Prefill (rep x seq rows) and odd head sizes go to the GEMM path.
        assert!(!applies(4 * 600, 600, 128));
        assert!(!applies(4, 100, 48));
        assert!(applies(1, 1, 32) && applies(8, 512, 64));
        // Scores and partial rows past 48 KiB of shared memory.
        assert!(!applies(8, 1000, 256));
        assert!(!applies(0, 10, 128));
    }
}
