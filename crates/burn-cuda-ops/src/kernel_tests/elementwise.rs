//! The elementwise kernels: SwiGLU forward and backward, RoPE forward and backward (fused with
//! the head transpose), RoPE of a cached step with its cache writes, and the hashed dropout at
//! every vector width.
//!
//! Each runs at every vector width its host launch could pick for the sizes used (the widest of
//! 8, 4, 2, 1 dividing the element count; for RoPE dividing `d / 2`), and at the narrower ones
//! too, on sizes that are not multiples of the cube size. Expected values are the files'
//! documented formulas in f64 (in f32 every `dtype(..)` rounding of the kernels is a no-op).

use cubecl::prelude::*;

use super::{
    assert_close, client, f32_type, input, launch_in, output, read_in_place, read_output, values,
    widths, Rt, MODES,
};
use crate::cube_util::{elem_grid, THREADS};
use crate::dropout::{dropout_kernel, DropMask};
use crate::rope::{rope_backward_kernel, rope_forward_kernel};
use crate::rope_append::rope_append_kernel;
use crate::swiglu::{swiglu_backward_kernel, swiglu_forward_kernel};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn swiglu_forward_matches_the_formula_at_every_vector_width() {
    let client = client();
    // 1,000 = 8 x 125: widths 8, 4, 2, 1 all divide it; 1,003 only takes width 1.
    for (n, widths) in [(1000usize, &[8usize, 4, 2, 1][..]), (1003, &[1][..])] {
        let g = values(n, 1, 6.0);
        let u = values(n, 2, 2.0);
        let want: Vec<f64> = (0..n)
            .map(|i| g[i] as f64 * sigmoid(g[i] as f64) * u[i] as f64)
            .collect();
        let (gb, ub) = (input(&client, &g), input(&client, &u));
        for &v in widths {
            for mode in MODES {
                let out = output(&client, n);
                launch_in!(
                    mode,
                    swiglu_forward_kernel::<Rt>(
                        &client,
                        elem_grid(n / v),
                        CubeDim::new_1d(THREADS),
                        v,
                        gb.flat(),
                        ub.flat(),
                        out.flat(),
                        (n / v) as u32,
                        (n / v) as u32,
                        (n / v) as u32,
                        (n / v) as u32,
                        f32_type(),
                    )
                );
                let what = format!("swiglu forward n={n} width {v} {mode:?}");
                let got = read_output(&client, &out, &what);
                assert_close(&got, &want, 1e-6, 1e-5, &what);
            }
        }
    }
}

#[test]
fn swiglu_forward_reads_the_column_blocks_of_a_packed_gate_up_output() {
    // `[rows, 2 c]` rows of `[gate | up]`, as one packed gate/up projection writes them: `gate`
    // is the buffer from its start, `up` the same buffer from column `c` (a view's offset), both
    // `2 c` apart; the output is dense `[rows, c]`.
    let client = client();
    let (rows, c) = (5usize, 64usize);
    let packed = values(rows * 2 * c, 7, 4.0);
    let want: Vec<f64> = (0..rows * c)
        .map(|i| {
            let (r, j) = (i / c, i % c);
            let (g, u) = (
                packed[r * 2 * c + j] as f64,
                packed[r * 2 * c + c + j] as f64,
            );
            g * sigmoid(g) * u
        })
        .collect();
    let buf = input(&client, &packed);
    for v in widths(c) {
        for mode in MODES {
            let out = output(&client, rows * c);
            // SAFETY: the up view's last element, `(rows - 1) 2 c + 2 c - 1` from the buffer's
            // start, is inside it.
            let up = unsafe {
                TensorArg::from_raw_parts(
                    buf.handle.clone().offset_start((c * 4) as u64),
                    vec![2 * c, 1].into(),
                    vec![rows, c].into(),
                )
            };
            launch_in!(
                mode,
                swiglu_forward_kernel::<Rt>(
                    &client,
                    elem_grid(rows * c / v),
                    CubeDim::new_1d(THREADS),
                    v,
                    buf.arg_strided(&[rows, c], &[2 * c, 1]),
                    up,
                    out.flat(),
                    (rows * c / v) as u32,
                    (c / v) as u32,
                    (2 * c / v) as u32,
                    (2 * c / v) as u32,
                    f32_type(),
                )
            );
            let what = format!("swiglu packed forward width {v} {mode:?}");
            let got = read_output(&client, &out, &what);
            assert_close(&got, &want, 1e-6, 1e-5, &what);
        }
    }
}

#[test]
fn swiglu_backward_matches_the_formula_at_every_vector_width() {
    let client = client();
    // Widths 8 / 4 / 2 / 1 are the host's picks for these sizes; none is a multiple of 256.
    for n in [1000usize, 1004, 1002, 1003] {
        let dy = values(n, 3, 1.5);
        let g = values(n, 4, 6.0);
        let u = values(n, 5, 2.0);
        let (mut want_dg, mut want_du) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (d, g, u) = (dy[i] as f64, g[i] as f64, u[i] as f64);
            let s = sigmoid(g);
            want_du.push(d * g * s);
            want_dg.push(d * u * s * (1.0 + g * (1.0 - s)));
        }
        let (dyb, gb, ub) = (input(&client, &dy), input(&client, &g), input(&client, &u));
        for v in widths(n) {
            for mode in MODES {
                // Separate output buffers (the host may alias dgate with gate and dup with dy).
                let (dg, du) = (output(&client, n), output(&client, n));
                launch_in!(
                    mode,
                    swiglu_backward_kernel::<Rt>(
                        &client,
                        elem_grid(n / v),
                        CubeDim::new_1d(THREADS),
                        v,
                        dyb.flat(),
                        gb.flat(),
                        ub.flat(),
                        dg.flat(),
                        du.flat(),
                        (n / v) as u32,
                        f32_type(),
                    )
                );
                let what = format!("swiglu backward n={n} width {v} {mode:?}");
                let got_dg = read_output(&client, &dg, &format!("{what} dgate"));
                let got_du = read_output(&client, &du, &format!("{what} dup"));
                assert_close(&got_dg, &want_dg, 1e-5, 1e-4, &format!("{what} dgate"));
                assert_close(&got_du, &want_du, 1e-5, 1e-4, &format!("{what} dup"));
            }
        }
    }
}

/// `rotate_half(x)[j]`: `-x[j + d/2]` in the first half, `x[j - d/2]` in the second.
fn rotate_half(x: &[f64]) -> Vec<f64> {
    let h = x.len() / 2;
    (0..x.len())
        .map(|j| if j < h { -x[j + h] } else { x[j - h] })
        .collect()
}

/// Where head `ni` of position `si` of sequence `bi` starts in RoPE's output layout
/// `[b, n / g, s, g, d]` (`[b, n, s, d]` for `g = 1`).
fn rope_out_at([b, s, n, d]: [usize; 4], g: usize, bi: usize, si: usize, ni: usize) -> usize {
    let _ = b;
    (((bi * (n / g) + ni / g) * s + si) * g + ni % g) * d
}

/// RoPE forward in f64: `y [b, n / g, s, g, d]` from `x [b, s, n, d]` and `cos`, `sin`
/// `[b, s, d]`.
fn rope_forward_ref(x: &[f32], cos: &[f32], sin: &[f32], shape: [usize; 4], g: usize) -> Vec<f64> {
    let [b, s, n, d] = shape;
    let mut y = vec![0.0; b * n * s * d];
    for bi in 0..b {
        for si in 0..s {
            for ni in 0..n {
                let src = ((bi * s + si) * n + ni) * d;
                let xr: Vec<f64> = x[src..src + d].iter().map(|&v| v as f64).collect();
                let rot = rotate_half(&xr);
                let cs = (bi * s + si) * d;
                let dst = rope_out_at(shape, g, bi, si, ni);
                for j in 0..d {
                    y[dst + j] = xr[j] * cos[cs + j] as f64 + rot[j] * sin[cs + j] as f64;
                }
            }
        }
    }
    y
}

/// RoPE backward in f64: the adjoint of the forward's linear map (the inverse rotation when
/// `cos`, `sin` are a rotation's), `dx [b, s, n, d]` from `dy [b, n, s, d]`:
/// `dx = dy cos + rotate_half^T(dy sin)`, `rotate_half^T(z)[k] = z[k + d/2]` in the first half
/// and `-z[k - d/2]` in the second. `dy` laid out as the forward's output for group `g`.
fn rope_backward_ref(
    dy: &[f32],
    cos: &[f32],
    sin: &[f32],
    shape: [usize; 4],
    g: usize,
) -> Vec<f64> {
    let [b, s, n, d] = shape;
    let h = d / 2;
    let mut dx = vec![0.0; b * s * n * d];
    for bi in 0..b {
        for si in 0..s {
            for ni in 0..n {
                let src = rope_out_at(shape, g, bi, si, ni);
                let cs = (bi * s + si) * d;
                let z: Vec<f64> = (0..d)
                    .map(|j| dy[src + j] as f64 * sin[cs + j] as f64)
                    .collect();
                let dst = ((bi * s + si) * n + ni) * d;
                for k in 0..d {
                    let rt = if k < h { z[k + h] } else { -z[k - h] };
                    dx[dst + k] = dy[src + k] as f64 * cos[cs + k] as f64 + rt;
                }
            }
        }
    }
    dx
}

/// Launches the RoPE kernel (`forward` or backward) as the host does, at vector width `v`.
fn rope_launch(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    forward: bool,
    v: usize,
    [inp, cos, sin, out]: [&super::Buf; 4],
    [b, s, n, d]: [usize; 4],
    group: usize,
) {
    let total = b * s * n * d / v;
    let (grid, dim) = (elem_grid(total), CubeDim::new_1d(THREADS));
    let args = (
        total as u32,
        n as u32,
        s as u32,
        (d / v) as u32,
        group as u32,
    );
    if forward {
        launch_in!(
            mode,
            rope_forward_kernel::<Rt>(
                client,
                grid,
                dim,
                v,
                inp.flat(),
                cos.flat(),
                sin.flat(),
                out.flat(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                f32_type(),
            )
        );
    } else {
        launch_in!(
            mode,
            rope_backward_kernel::<Rt>(
                client,
                grid,
                dim,
                v,
                inp.flat(),
                cos.flat(),
                sin.flat(),
                out.flat(),
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                f32_type(),
            )
        );
    }
}

/// `[b, s, n, d]` shapes for RoPE: `d / 2` takes widths 8 (the first two), 4, 2 and 1 (odd).
const ROPE_SHAPES: [[usize; 4]; 5] = [
    [2, 33, 4, 128],
    [2, 5, 3, 64],
    [2, 3, 3, 8],
    [1, 7, 2, 12],
    [3, 3, 5, 6],
];

#[test]
fn rope_forward_and_backward_match_the_formula_at_every_vector_width() {
    let client = client();
    for (k, shape) in ROPE_SHAPES.into_iter().enumerate() {
        let [b, s, n, d] = shape;
        let seed = 10 * k as u64;
        // Independent cos and sin everywhere (not a rotation's), so that mixing up `j` and
        // `j +- d/2` in their indices shows.
        let x = values(b * s * n * d, seed + 1, 2.0);
        let dy = values(b * n * s * d, seed + 2, 2.0);
        let cos = values(b * s * d, seed + 3, 1.0);
        let sin = values(b * s * d, seed + 4, 1.0);
        let (xb, dyb) = (input(&client, &x), input(&client, &dy));
        let (cb, sb) = (input(&client, &cos), input(&client, &sin));
        // Every group of heads that divides `n`: 1 (head-major) and the position-major ones.
        for g in (1..=n).filter(|g| n % g == 0) {
            let want_y = rope_forward_ref(&x, &cos, &sin, shape, g);
            let want_dx = rope_backward_ref(&dy, &cos, &sin, shape, g);
            for v in widths(d / 2) {
                for mode in MODES {
                    let what = format!("rope {shape:?} group {g} width {v} {mode:?}");
                    let y = output(&client, b * n * s * d);
                    rope_launch(&client, mode, true, v, [&xb, &cb, &sb, &y], shape, g);
                    let got = read_output(&client, &y, &format!("{what} forward"));
                    assert_close(&got, &want_y, 1e-5, 1e-4, &format!("{what} forward"));
                    let dx = output(&client, b * s * n * d);
                    rope_launch(&client, mode, false, v, [&dyb, &cb, &sb, &dx], shape, g);
                    let got = read_output(&client, &dx, &format!("{what} backward"));
                    assert_close(&got, &want_dx, 1e-5, 1e-4, &format!("{what} backward"));
                }
            }
        }
    }
}

#[test]
fn rope_backward_undoes_the_forward_rotation() {
    // transformers' tables: `emb = cat(freqs, freqs)`, `freqs = pos * base^(-2i/d)`, each
    // sequence at its own offset. Then the backward (the adjoint) is the inverse rotation.
    let client = client();
    for shape in ROPE_SHAPES {
        let [b, s, n, d] = shape;
        let h = d / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for bi in 0..b {
            for si in 0..s {
                let pos = (si + 7 * bi) as f64;
                for j in 0..d {
                    let a = pos * 10_000f64.powf(-2.0 * (j % h) as f64 / d as f64);
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let x = values(b * s * n * d, 99, 2.0);
        let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (xb, cb, sb) = (
            input(&client, &x),
            input(&client, &cos),
            input(&client, &sin),
        );
        for v in widths(d / 2) {
            for mode in MODES {
                let what = format!("rope round trip {shape:?} width {v} {mode:?}");
                let y = output(&client, b * n * s * d);
                rope_launch(&client, mode, true, v, [&xb, &cb, &sb, &y], shape, 1);
                let yb = input(&client, &read_output(&client, &y, &what));
                let back = output(&client, b * s * n * d);
                rope_launch(&client, mode, false, v, [&yb, &cb, &sb, &back], shape, 1);
                let got = read_output(&client, &back, &what);
                // Two f32 rotations of values up to 2: a few ulps of 2.
                assert_close(&got, &want, 2e-6, 1e-5, &what);
            }
        }
    }
}

#[test]
fn rope_append_rotates_q_and_k_and_writes_the_cache_in_place() {
    // `[b, s, heads, kv_heads, d, capacity, pos]`: one decode token with GQA (d / 2 takes width
    // 8), two tokens mid-cache (width 2), up to the last position (width 1, odd d / 2), and
    // no GQA at position 0. Each case reads q, k, v from three tensors and from the column
    // blocks of one packed `[b, s, (heads + 2 kv) d]` projection output.
    let client = client();
    let cases: [[usize; 7]; 4] = [
        [2, 1, 8, 2, 64, 37, 20],
        [3, 2, 4, 2, 12, 9, 3],
        [1, 3, 3, 1, 6, 10, 7],
        [2, 1, 2, 2, 8, 4, 0],
    ];
    for (c, [b, s, heads, kv, d, cap, pos]) in cases.into_iter().enumerate() {
        let seed = 100 + 10 * c as u64;
        let q = values(b * s * heads * d, seed, 2.0);
        let k = values(b * s * kv * d, seed + 1, 2.0);
        let v = values(b * s * kv * d, seed + 2, 2.0);
        let cos = values(b * s * d, seed + 3, 1.0);
        let sin = values(b * s * d, seed + 4, 1.0);
        // What the caches held before: every position but pos..pos + s keeps it.
        let cache0 = values(b * kv * cap * d, seed + 5, 3.0);
        let want_q = rope_forward_ref(&q, &cos, &sin, [b, s, heads, d], 1);
        let k_rot = rope_forward_ref(&k, &cos, &sin, [b, s, kv, d], 1);
        let (mut want_k, mut want_v): (Vec<f64>, Vec<f64>) = (
            cache0.iter().map(|&x| x as f64).collect(),
            cache0.iter().map(|&x| x as f64).collect(),
        );
        for bi in 0..b {
            for g in 0..kv {
                for si in 0..s {
                    for j in 0..d {
                        let at = ((bi * kv + g) * cap + pos + si) * d + j;
                        want_k[at] = k_rot[((bi * kv + g) * s + si) * d + j];
                        want_v[at] = v[((bi * s + si) * kv + g) * d + j] as f64;
                    }
                }
            }
        }
        // The packed layout: each token's row is [q | k | v].
        let (qw, kw) = (heads * d, kv * d);
        let width = qw + 2 * kw;
        let packed: Vec<f32> = (0..b * s)
            .flat_map(|t| {
                let q = &q[t * qw..(t + 1) * qw];
                let k = &k[t * kw..(t + 1) * kw];
                let v = &v[t * kw..(t + 1) * kw];
                q.iter().chain(k).chain(v).copied().collect::<Vec<_>>()
            })
            .collect();
        let ins = [&q, &k, &v, &cos, &sin].map(|x| input(&client, x));
        let packed = input(&client, &packed);
        for n in widths(d / 2) {
            for (layout, packed_in) in [("three tensors", false), ("packed", true)] {
                // Per input: (row stride, offset) in vectors.
                let lds = if packed_in {
                    [width, 0, width, qw, width, qw + kw]
                } else {
                    [qw, 0, kw, 0, kw, 0]
                };
                let [qb, kb, vb] = if packed_in {
                    [&packed; 3]
                } else {
                    [&ins[0], &ins[1], &ins[2]]
                };
                for mode in MODES {
                    let what = format!("rope_append case {c} {layout} width {n} {mode:?}");
                    let q_out = output(&client, b * heads * s * d);
                    let (kc, vc) = (input(&client, &cache0), input(&client, &cache0));
                    let total = b * s * (heads + 2 * kv) * d / n;
                    let mut seq = SequenceArg::new();
                    for x in lds {
                        seq.push((x / n) as u32);
                    }
                    launch_in!(
                        mode,
                        rope_append_kernel::<Rt>(
                            &client,
                            elem_grid(total),
                            CubeDim::new_1d(THREADS),
                            n,
                            qb.flat(),
                            kb.flat(),
                            vb.flat(),
                            ins[3].flat(),
                            ins[4].flat(),
                            q_out.flat(),
                            kc.flat(),
                            vc.flat(),
                            total as u32,
                            heads as u32,
                            kv as u32,
                            s as u32,
                            (d / n) as u32,
                            cap as u32,
                            pos as u32,
                            seq,
                            f32_type(),
                        )
                    );
                    let got = read_output(&client, &q_out, &format!("{what} q"));
                    assert_close(&got, &want_q, 1e-5, 1e-4, &format!("{what} q"));
                    let got = read_in_place(&client, &kc, &format!("{what} k cache"));
                    assert_close(&got, &want_k, 1e-5, 1e-4, &format!("{what} k cache"));
                    let got = read_in_place(&client, &vc, &format!("{what} v cache"));
                    assert_close(&got, &want_v, 0.0, 0.0, &format!("{what} v cache"));
                }
            }
        }
    }
}

/// murmur3's 32-bit finaliser, wrapping.
fn fmix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// Whether element `i` survives: `fmix(fmix(i ^ seed0) + seed1) >= threshold`.
fn keeps(i: u32, seed0: u32, seed1: u32, threshold: u32) -> bool {
    fmix(fmix(i ^ seed0).wrapping_add(seed1)) >= threshold
}

#[test]
fn the_test_hash_is_murmur3_and_agrees_with_the_host_mask() {
    // murmur3_32's finaliser on known inputs (the constants and shifts of the reference).
    assert_eq!(fmix(0), 0);
    assert_eq!(fmix(1), 0x514e_28b7);
    assert_eq!(fmix(0xffff_ffff), 0x81f1_6f39);
    for (p, seed) in [
        (0.1, 0xdead_beef_f00d_cafe_u64),
        (0.5, 42),
        (0.0, 7),
        (0.9, u64::MAX),
    ] {
        let m = DropMask::new(p, seed);
        for i in (0..200_000u32).chain(u32::MAX - 1000..=u32::MAX) {
            assert_eq!(
                keeps(i, m.seeds.0, m.seeds.1, m.threshold),
                m.keeps(i),
                "p {p} seed {seed:#x} element {i}"
            );
        }
    }
}

/// Dropout inputs: nonzero (kept elements are never 0), of both signs.
fn dropout_input(n: usize, seed: u64) -> Vec<f32> {
    values(n, seed, 1.0)
        .into_iter()
        .map(|v| if v < 0.0 { v - 0.5 } else { v + 0.5 })
        .collect()
}

#[test]
fn dropout_kernels_keep_the_hashed_elements_scaled_and_zero_the_rest() {
    let client = client();
    // Seed words past 2^31 (`+ seed1` wraps), p = 0 (threshold 0 keeps everything), and p = 0.9.
    let masks = [
        (0.1, 0xdead_beef_f00d_cafe_u64),
        (0.5, 42),
        (0.0, 7),
        (0.9, u64::MAX),
    ];
    // 100,000 takes every width (the host's pick 8); 1,004 widths 4, 2, 1; 1,003 only 1.
    for n in [100_000usize, 1_004, 1_003] {
        let x = dropout_input(n, n as u64);
        let xb = input(&client, &x);
        for (p, seed) in masks {
            let mask = DropMask::new(p, seed);
            let (s0, s1, th) = (mask.seeds.0, mask.seeds.1, mask.threshold);
            let scale = 1.0 / (1.0 - p);
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let keep = keeps(i as u32, s0, s1, th);
                    if keep {
                        x[i] as f64 * scale
                    } else {
                        0.0
                    }
                })
                .collect();
            for mode in MODES {
                // Every width gives the same output, bit for bit (the mask is per element).
                let mut first_width: Option<Vec<f32>> = None;
                for v in widths(n) {
                    let what = format!("dropout n={n} {mask:?} {mode:?} width {v}");
                    let out = output(&client, n);
                    launch_in!(
                        mode,
                        dropout_kernel::<Rt>(
                            &client,
                            elem_grid(n / v),
                            CubeDim::new_1d(THREADS),
                            v,
                            xb.flat(),
                            out.flat(),
                            (n / v) as u32,
                            s0,
                            s1,
                            th,
                            mask.scale,
                            f32_type(),
                        )
                    );
                    let got = read_output(&client, &out, &what);
                    // atol 0: a dropped element must be exactly 0 and a kept one nonzero; rtol
                    // covers the f32 product and `scale` rounded to f32.
                    assert_close(&got, &want, 0.0, 1e-6, &what);
                    match &first_width {
                        None => first_width = Some(got),
                        Some(first) => {
                            let differs = got
                                .iter()
                                .zip(first)
                                .position(|(a, b)| a.to_bits() != b.to_bits());
                            assert_eq!(differs, None, "{what}: differs from the widest width");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_dropout_mask_keeps_about_one_minus_p() {
    let client = client();
    let n = 1_000_003usize;
    let x = dropout_input(n, 5);
    let xb = input(&client, &x);
    for (p, seed) in [(0.1, 0x0123_4567_89ab_cdef_u64), (0.05, 1), (0.5, 2)] {
        let mask = DropMask::new(p, seed);
        let cpu = (0..n as u32).filter(|&i| mask.keeps(i)).count();
        // Within 5 standard deviations of a Bernoulli(1 - p) count.
        let frac = cpu as f64 / n as f64;
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (frac - (1.0 - p)).abs() < 5.0 * sigma,
            "p {p}: kept fraction {frac}, expected {} +- {}",
            1.0 - p,
            5.0 * sigma
        );
        for mode in MODES {
            let out = output(&client, n);
            // 1,000,003 is odd: width 1, as the host picks.
            launch_in!(
                mode,
                dropout_kernel::<Rt>(
                    &client,
                    elem_grid(n),
                    CubeDim::new_1d(THREADS),
                    1,
                    xb.flat(),
                    out.flat(),
                    n as u32,
                    mask.seeds.0,
                    mask.seeds.1,
                    mask.threshold,
                    mask.scale,
                    f32_type(),
                )
            );
            let got = read_output(&client, &out, "dropout kept fraction");
            let kept = got.iter().filter(|v| **v != 0.0).count();
            assert_eq!(
                kept, cpu,
                "p {p} {mode:?}: kept on the device vs the host hash"
            );
        }
    }
}
