//! The attention forward for a few query rows per KV group (a decode step: one new token of
//! `rep` query heads per group) as two cubecl kernels split over the keys (flash-decoding),
//! instead of two cuBLASLt GEMMs and the softmax kernel: two launches per layer instead of
//! three, K and V read once each, and no `[rows, keys]` score or probability tensor in global
//! memory.
//!
//! **Split.** A group's keys are cut into runs of [`CHUNK`]; one cube takes one run of one group
//! (so a batch-1 step of the 8B shape, 8 groups over 856 keys, has 112 cubes where one cube per
//! group had 8, each walking ~100 keys one after another). Each cube writes, per query row, its
//! run's maximum score, its sum of exponentials and its unnormalised `sum_j exp(s_j - max) v_j`
//! (f32). The combine kernel rescales the runs to the row's maximum and divides by the total.
//!
//! **Arithmetic.** The score is `scale q.k` (f32 sum) rounded to the inputs' dtype, as cuBLASLt
//! writes `S` on the GEMM path, plus the mask in f32; the probabilities stay f32 (the GEMM path
//! rounds them to the dtype before `P V`), and the output is rounded once. So the two paths agree
//! to the dtype's rounding of the probabilities, not bit for bit.
//!
//! Inside a cube of `[WARPS planes x 32 units]` each unit owns one vector of `d / 32` elements of
//! a row. Pass 1: the planes take the run's keys in turn, each key's `m` dot products are plane
//! sums, the scores go to shared memory. Pass 2: one plane per query row finds its maximum and
//! sum. Pass 3: the planes take the keys in turn again and accumulate `exp(s_j - max) v_j` in
//! registers, then sum their partial rows through shared memory.
//!
//! **Opt-in (`PEFT_LORA_DECODE_ATTENTION=1`): slower than the GEMM path on an H100** (113.8 /
//! 2,846 against 115.6 / 4,274 tok/s at batch 1 / 64, session 19). The one-cube-per-group
//! kernel it replaced was slower still (45.8 / 382 / 1,925 against 68.8 / 533 / 2,670 tok/s at
//! batch 1 / 8 / 64). The GPU self-test checks it against the f64 reference.

use burn::tensor::{DType, Shape};
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
/// Keys per cube: each of the [`WARPS`] planes takes 8 of them.
pub const CHUNK: usize = 64;
/// Shared memory of one cube, bytes (the static limit of a CUDA block).
const SHARED_BYTES: usize = 48 * 1024;
/// The floor of a run's maximum score: finite, so a run of -inf scores (all keys masked by
/// `-inf`) gets exponentials of 0 instead of NaN.
const LOWEST: f32 = -3.0e38;

/// One run of [`CHUNK`] keys of one group: per query row its maximum score and sum of
/// exponentials (`stats [g, splits, 2, m]`) and `sum_j exp(s_j - max) v_j` (`part [g, splits,
/// m, d]`, f32).
// `div_ceil` of a runtime and a comptime value has no cube expansion: spelled out.
#[allow(clippy::manual_div_ceil)]
#[cube(launch, launch_unchecked)]
pub(crate) fn decode_split_kernel<E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mask: &Tensor<f32>,
    part: &mut Tensor<Vector<f32, N>>,
    stats: &mut Tensor<f32>,
    groups: u32,
    t: u32,
    s: u32,
    rows_per_mask: u32,
    scale: f32,
    #[comptime] m: usize,
    #[comptime] chunk: usize,
    #[define(E)] _dtype: StorageType,
) {
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let t = t as usize;
    let splits = (t + chunk - 1) / chunk;
    let gi = cube / splits;
    let c = cube % splits;
    if gi >= groups as usize {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let warps = CUBE_DIM_Y as usize;
    let plane = CUBE_DIM_X as usize;
    let n = q.vector_size();
    let s = s as usize;
    let rows_per_mask = rows_per_mask as usize;
    let j0 = c * chunk;
    let mut len = t - j0;
    if len > chunk {
        len = chunk;
    }
    let mut sc = SharedMemory::<f32>::new(m * chunk);
    let mut st = SharedMemory::<f32>::new(m);
    let mut acc_sh = SharedMemory::<Vector<f32, N>>::new(WARPS * m * PLANE);

    // Pass 1: scores + mask.
    let mut jj = warp;
    while jj < len {
        let j = j0 + jj;
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
                sc[r * chunk + jj] = f32::cast_from(E::cast_from(total * scale)) + mask[mrow + j];
            }
        }
        jj += warps;
    }
    sync_cube();

    // Pass 2: each row's maximum over the run (at least [`LOWEST`]) and its sum of
    // exponentials (0 when every score is -inf, so that the run weighs nothing in the combine).
    let mut r = warp;
    while r < m {
        let mut mx = f32::new(LOWEST);
        let mut jj = lane;
        while jj < len {
            let x = sc[r * chunk + jj];
            if x > mx {
                mx = x;
            }
            jj += plane;
        }
        let row_max = plane_max(mx);
        let mut sum = f32::new(0.0);
        let mut jj = lane;
        while jj < len {
            sum += (sc[r * chunk + jj] - row_max).exp();
            jj += plane;
        }
        let total = plane_sum(sum);
        if lane == 0 {
            st[r] = row_max;
            let at = (gi * splits + c) * 2 * m;
            stats[at + r] = row_max;
            stats[at + m + r] = total;
        }
        r += warps;
    }
    sync_cube();

    // Pass 3: this plane's keys' exp(s - max) v, then the planes' partial rows summed.
    let mut acc = Array::<Vector<f32, N>>::new(m);
    #[unroll]
    for r in 0..m {
        acc[r] = Vector::new(f32::new(0.0));
    }
    let mut jj = warp;
    while jj < len {
        let vv = Vector::<f32, N>::cast_from(v[(gi * t + j0 + jj) * plane + lane]);
        #[unroll]
        for r in 0..m {
            let p = (sc[r * chunk + jj] - st[r]).exp();
            acc[r] += Vector::new(p) * vv;
        }
        jj += warps;
    }
    #[unroll]
    for r in 0..m {
        acc_sh[(warp * m + r) * PLANE + lane] = acc[r];
    }
    sync_cube();
    let mut r = warp;
    while r < m {
        let mut o = acc_sh[r * PLANE + lane];
        let mut w = 1usize;
        while w < warps {
            o += acc_sh[(w * m + r) * PLANE + lane];
            w += 1;
        }
        part[((gi * splits + c) * m + r) * plane + lane] = o;
        r += warps;
    }
}

/// One query row per plane: its runs rescaled to the row's maximum, summed, and divided by the
/// total of their exponentials; `out [g, m, d]` in the dtype.
#[cube(launch, launch_unchecked)]
pub(crate) fn decode_combine_kernel<E: Float, N: Size>(
    part: &Tensor<Vector<f32, N>>,
    stats: &Tensor<f32>,
    out: &mut Tensor<Vector<E, N>>,
    rows: u32,
    splits: u32,
    #[comptime] m: usize,
    #[define(E)] _dtype: StorageType,
) {
    let row = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_Y + UNIT_POS_Y) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let lane = UNIT_POS_X as usize;
    let plane = CUBE_DIM_X as usize;
    let splits = splits as usize;
    let gi = row / m;
    let r = row % m;
    let mut mx = f32::new(LOWEST);
    let mut c = 0usize;
    while c < splits {
        let x = stats[(gi * splits + c) * 2 * m + r];
        if x > mx {
            mx = x;
        }
        c += 1;
    }
    // A run whose scores are all -inf has the maximum LOWEST and the sum 0: it adds nothing
    // (and a row of such runs only is 0 / 0, NaN, as the softmax of all -inf is).
    let mut total = f32::new(0.0);
    let mut o = Vector::<f32, N>::new(f32::new(0.0));
    let mut c = 0usize;
    while c < splits {
        let at = (gi * splits + c) * 2 * m;
        let w = (stats[at + r] - mx).exp();
        total += w * stats[at + m + r];
        o += Vector::new(w) * part[((gi * splits + c) * m + r) * plane + lane];
        c += 1;
    }
    out[row * plane + lane] = Vector::cast_from(o / Vector::new(total));
}

/// The vector width of a launch for `m` query rows per group of head size `d`, or `None` where
/// the kernels do not apply: more than [`MAX_ROWS`] rows, a head size other than 32 x 1, 2, 4
/// or 8, or partial rows beyond the shared memory.
fn plan(m: usize, d: usize) -> Option<usize> {
    let vector = d / PLANE;
    if !(1..=MAX_ROWS).contains(&m) || !d.is_multiple_of(PLANE) || !matches!(vector, 1 | 2 | 4 | 8)
    {
        return None;
    }
    let bytes = 4 * (m * CHUNK + 2 * m + WARPS * m * PLANE * vector);
    (bytes <= SHARED_BYTES).then_some(vector)
}

/// Whether [`forward`] takes `m` query rows per group of head size `d` (any number of keys).
pub fn applies(m: usize, d: usize) -> bool {
    plan(m, d).is_some()
}

/// Query rows per combine cube (one plane each).
const COMBINE_ROWS: usize = 4;

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
    let vector = plan(m, d).expect("the caller checked that the kernels apply");
    let splits = t.div_ceil(CHUNK);
    let part = empty_as(&q, Shape::new([g, splits, m, d]), DType::F32);
    let stats = empty_as(&q, Shape::new([g, splits, 2, m]), DType::F32);
    let out = empty_as(&q, Shape::new([g, m, d]), q.dtype);
    let dtype = q.dtype;
    let client = q.client.clone();
    launch!(decode_split_kernel::<CudaRuntime>(
        &client,
        grid(g * splits),
        CubeDim::new_2d(PLANE as u32, WARPS as u32),
        vector,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.into_tensor_arg(),
        part.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        g as u32,
        t as u32,
        s as u32,
        (g * m / mb) as u32,
        scale,
        m,
        CHUNK,
        dtype.into(),
    ));
    launch!(decode_combine_kernel::<CudaRuntime>(
        &client,
        grid((g * m).div_ceil(COMBINE_ROWS)),
        CubeDim::new_2d(PLANE as u32, COMBINE_ROWS as u32),
        vector,
        part.into_tensor_arg(),
        stats.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (g * m) as u32,
        splits as u32,
        m,
        dtype.into(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::applies;

    #[test]
    fn the_decode_kernels_take_a_few_rows_of_supported_head_sizes() {
        // Llama-3-8B decode: 4 query heads per KV head, head size 128, any cache length.
        assert!(applies(4, 128));
        // Prefill (rep x seq rows) and odd head sizes go to the GEMM path.
        assert!(!applies(4 * 600, 128));
        assert!(!applies(4, 48));
        assert!(applies(1, 32) && applies(8, 64));
        // Partial rows past 48 KiB of shared memory.
        assert!(!applies(8, 256));
        assert!(!applies(0, 128));
    }
}
