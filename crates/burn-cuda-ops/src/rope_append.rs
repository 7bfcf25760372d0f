//! The attention inputs of a cached step in one kernel (inference): RoPE of the queries into
//! `[b, heads, s, d]`, RoPE of the keys and the plain values written straight into the KV cache
//! at their positions. It replaces two RoPE launches and the two cache writes (`slice_assign`)
//! of each layer and decode step; the rotation and its rounding points are
//! [`super::rope::rope_forward_kernel`]'s.
//!
//! Shapes: `q [b, s, heads * d]`, `k`, `v [b, s, kv_heads * d]` (the projections' outputs as
//! they lie: each token's row may sit inside a wider one, as the column blocks of one packed
//! `[b, s, (heads + 2 kv_heads) d]` output do, so a packed q/k/v projection is read in place),
//! `cos`, `sin` `[b, s, d]`, caches `[b, kv_heads, capacity, d]` written at positions
//! `pos..pos + s`.

use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{elem_grid, elem_index, launch, THREADS};
use super::kernels::{empty_as, start_vector, Raw};
use super::rope::rotate_half_at;

/// One unit per vector of the `heads + 2 kv_heads` head rows of each token: query heads first
/// (rotated into `q_out`), then key heads (rotated into `k_cache`), then value heads (copied
/// into `v_cache`). `d` counts vectors of `N` elements (`N` divides `d / 2`); token `t`'s
/// query row starts at vector `t q_ld + q_off` of `q` (likewise for `k` and `v`).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_append_kernel<E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    cos: &Tensor<Vector<E, N>>,
    sin: &Tensor<Vector<E, N>>,
    q_out: &mut Tensor<Vector<E, N>>,
    k_cache: &mut Tensor<Vector<E, N>>,
    v_cache: &mut Tensor<Vector<E, N>>,
    total: u32,
    heads: u32,
    kv_heads: u32,
    seq: u32,
    d: u32,
    capacity: u32,
    pos: u32,
    lds: Sequence<u32>,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= total as usize {
        terminate!();
    }
    let (heads, kv_heads, seq, d) = (heads as usize, kv_heads as usize, seq as usize, d as usize);
    let rows = heads + 2 * kv_heads;
    let j = i % d;
    let t = i / d;
    let h = t % rows;
    let t = t / rows;
    let si = t % seq;
    let bi = t / seq;
    let tok = bi * seq + si;
    let cs = tok * d;
    if h < heads {
        let src = tok * lds[0] as usize + lds[1] as usize + h * d;
        let y = rotate_half_at::<E, N>(q, src, j, d, cos, sin, cs);
        q_out[((bi * heads + h) * seq + si) * d + j] = y;
    } else {
        // KV head g of this token: its row in the cache at position pos + si.
        let g = (h - heads) % kv_heads;
        let at = ((bi * kv_heads + g) * capacity as usize + pos as usize + si) * d + j;
        if h < heads + kv_heads {
            let src = tok * lds[2] as usize + lds[3] as usize + g * d;
            k_cache[at] = rotate_half_at::<E, N>(k, src, j, d, cos, sin, cs);
        } else {
            let src = tok * lds[4] as usize + lds[5] as usize + g * d;
            v_cache[at] = v[src + j];
        }
    }
}

/// Rotated queries `[b, heads, s, d]`; the rotated keys and the values written into `k_cache`,
/// `v_cache` (`[b, kv_heads, capacity, d]`, contiguous, not shared: the caller checks) at
/// positions `pos..pos + s`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: Raw,
    k: Raw,
    v: Raw,
    cos: Raw,
    sin: Raw,
    k_cache: &Raw,
    v_cache: &Raw,
    heads: usize,
    pos: usize,
) -> Raw {
    let [b, kv_heads, capacity, d] = k_cache.meta.shape().dims::<4>();
    let s = q.meta.shape()[1];
    // `d` is even (checked by the caller): the widest vector that divides `d / 2`.
    let n = super::cube_util::vector_size(d / 2);
    let (q, q_ld) = token_rows(q, n);
    let (k, k_ld) = token_rows(k, n);
    let (v, v_ld) = token_rows(v, n);
    let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
    let out = empty_as(&q, Shape::new([b, heads, s, d]), q.dtype);
    let total = b * s * (heads + 2 * kv_heads) * d / n;
    let (dtype, client) = (q.dtype, q.client.clone());
    // Each input is read from its own view's start: offsets 0.
    let mut lds = SequenceArg::new();
    for x in [q_ld / n, 0, k_ld / n, 0, v_ld / n, 0] {
        lds.push(x as u32);
    }
    launch!(rope_append_kernel::<CudaRuntime>(
        &client,
        elem_grid(total),
        CubeDim::new_1d(THREADS),
        n,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        k_cache.clone().into_tensor_arg(),
        v_cache.clone().into_tensor_arg(),
        total as u32,
        heads as u32,
        kv_heads as u32,
        s as u32,
        (d / n) as u32,
        capacity as u32,
        pos as u32,
        lds,
        dtype.into(),
    ));
    out
}

/// `t [b, s, w]` as rows of tokens: the tensor (made contiguous unless its tokens' rows lie at
/// one stride with unit-stride columns, starting on a vector of `n` elements) and that row
/// stride in elements.
fn token_rows(t: Raw, n: usize) -> (Raw, usize) {
    let [b, s, w] = t.meta.shape().dims::<3>();
    let st = t.meta.strides();
    let (s0, s1, s2) = (st[0], st[1], st[2]);
    let ld = match (b * s == 1, s == 1) {
        (true, _) => w,
        (false, true) => s0,
        (false, false) => s1,
    };
    let strided = (s2 == 1 || w == 1)
        && ld >= w
        && ld.is_multiple_of(n)
        && (b == 1 || s == 1 || s0 == s * s1)
        && start_vector(&t) >= n;
    if strided {
        (t, ld)
    } else {
        (into_contiguous(t), w)
    }
}
