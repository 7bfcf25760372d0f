//! The causal row-block softmax kernels ([`crate::causal_softmax`]) against an f64 softmax over
//! each row's keys up to its position (0 after it to the block's end), in place: position-major rows of several query heads per position,
//! blocks that cut the rows at 1, 2, 3 and 4 points, a mask over two batches with padding and a
//! fully masked row; the keys past a row's block must come back untouched.

use cubecl::prelude::*;

use super::{assert_close, client, f32_type, input, launch_in, read_in_place, values, Rt, MODES};
use crate::causal_softmax::{causal_softmax_backward_kernel, causal_softmax_forward_kernel};
use crate::cube_util::grid;

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;
/// Rows per softmax cube, as `softmax::ROWS_PER_CUBE`.
const ROWS_PER_CUBE: usize = 8;
const MASKED: f32 = -1e9;

/// A case: `groups` groups (`kv` KV heads of each of `mb` batches) of `s * rep` rows, keys `t =
/// s`, blocks of `block` positions, the launch over groups `g0..g0 + n`.
#[derive(Clone, Copy, Debug)]
struct Case {
    mb: usize,
    kv: usize,
    s: usize,
    rep: usize,
    block: usize,
    g0: usize,
    n: usize,
}

/// `mask [mb, 1, s, s]`: causal, a small bias on visible keys; batch `b` hides its first `b`
/// keys and the last batch's position 0 sees nothing.
fn mask(mb: usize, s: usize) -> Vec<f32> {
    let mut m = values(mb * s * s, 61, 1.0);
    for b in 0..mb {
        for i in 0..s {
            for j in 0..s {
                if j > i || j < b || (b == mb - 1 && i == 0) {
                    m[(b * s + i) * s + j] = MASKED;
                }
            }
        }
    }
    m
}

/// The keys row `rg` (of a group) computes.
fn row_len(c: &Case, rg: usize) -> usize {
    ((rg / (c.block * c.rep) + 1) * c.block).min(c.s)
}

fn launch_dims(client: &ComputeClient<Rt>, rows: usize) -> (CubeCount, CubeDim) {
    let plane = client.properties().hardware.plane_size_max;
    (
        grid(rows.div_ceil(ROWS_PER_CUBE)),
        CubeDim::new_2d(plane, ROWS_PER_CUBE as u32),
    )
}

fn check(client: &ComputeClient<Rt>, c: Case) {
    let (t, m) = (c.s, c.s * c.rep);
    let total = c.mb * c.kv * m;
    let rows = c.n * m;
    let row0 = c.g0 * m;
    let scores = values(rows * t, 71, 8.0);
    let dp = values(rows * t, 72, 2.0);
    let mk = mask(c.mb, c.s);
    let rows_per_mask = total / c.mb;
    let scale = 0.125f32;
    // References at vector width `v`: the probabilities and the score gradient on each row's
    // keys up to the vector holding its position (0 after it, to the block's end), the input
    // kept past the block's end.
    let reference = |v: usize| {
        let (mut want_p, mut want_ds) = (Vec::new(), Vec::new());
        for row in 0..rows {
            let r = row0 + row;
            let rg = r % m;
            let len = row_len(&c, rg);
            let seen = ((rg / c.rep / v + 1) * v).min(len);
            let mrow = (r / rows_per_mask) * c.s + rg / c.rep;
            let x: Vec<f64> = (0..seen)
                .map(|j| (scores[row * t + j] + mk[mrow * t + j]) as f64)
                .collect();
            let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = x.iter().map(|x| (x - mx).exp()).sum();
            let p: Vec<f64> = x.iter().map(|x| (x - mx).exp() / sum).collect();
            let d = &dp[row * t..row * t + seen];
            let dot: f64 = p.iter().zip(d).map(|(a, b)| a * *b as f64).sum();
            for j in 0..t {
                if j < seen {
                    want_p.push(p[j]);
                    want_ds.push(scale as f64 * p[j] * (d[j] as f64 - dot));
                } else if j < len {
                    want_p.push(0.0);
                    want_ds.push(0.0);
                } else {
                    want_p.push(scores[row * t + j] as f64);
                    want_ds.push(dp[row * t + j] as f64);
                }
            }
        }
        (want_p, want_ds)
    };
    let mbuf = input(client, &mk);
    for v in [8, 4, 2, 1]
        .into_iter()
        .filter(|v| t.is_multiple_of(*v) && c.block.is_multiple_of(*v))
    {
        let (want_p, want_ds) = reference(v);
        let p32: Vec<f32> = want_p.iter().map(|&x| x as f32).collect();
        for mode in MODES {
            let what = format!("causal softmax {c:?} width {v} {mode:?}");
            let sb = input(client, &scores);
            let (count, dim) = launch_dims(client, rows);
            launch_in!(
                mode,
                causal_softmax_forward_kernel::<Rt>(
                    client,
                    count,
                    dim,
                    v,
                    sb.arg(&[rows, t]),
                    mbuf.arg(&[c.mb, 1, c.s, t]),
                    rows as u32,
                    (t / v) as u32,
                    m as u32,
                    c.rep as u32,
                    rows_per_mask as u32,
                    row0 as u32,
                    (c.block * c.rep) as u32,
                    (c.block / v) as u32,
                    f32_type(),
                )
            );
            let got = read_in_place(client, &sb, &format!("{what} forward"));
            assert_close(&got, &want_p, ATOL, RTOL, &format!("{what} forward"));

            let pb = input(client, &p32);
            let gb = input(client, &dp);
            let (count, dim) = launch_dims(client, rows);
            launch_in!(
                mode,
                causal_softmax_backward_kernel::<Rt>(
                    client,
                    count,
                    dim,
                    v,
                    pb.arg(&[rows, t]),
                    gb.arg(&[rows, t]),
                    rows as u32,
                    (t / v) as u32,
                    m as u32,
                    c.rep as u32,
                    (c.block * c.rep) as u32,
                    (c.block / v) as u32,
                    scale,
                    f32_type(),
                )
            );
            let got = read_in_place(client, &gb, &format!("{what} backward"));
            assert_close(&got, &want_ds, ATOL, RTOL, &format!("{what} backward"));
        }
    }
}

#[test]
fn causal_softmax_matches_the_formula_on_each_rows_keys() {
    let client = client();
    let cases = [
        // Two blocks of 8 positions, 4 query heads per KV head, all groups.
        (2, 2, 16, 4, 8, 0, 4),
        // One block (the whole row), a chunk of groups past the mask batches' boundary.
        (2, 3, 8, 2, 8, 2, 3),
        // Four blocks of 4 (width 4), no GQA.
        (1, 2, 16, 1, 4, 0, 2),
        // Blocks of 2 (width 2) and a last partial block: 7 positions cut 2, 2, 2, 1.
        (2, 1, 7, 3, 2, 1, 1),
        // Long rows: 264 keys in blocks of 88 (33 vectors of 8: a unit takes an extra pass).
        (1, 1, 264, 2, 88, 0, 1),
    ];
    for (mb, kv, s, rep, block, g0, n) in cases {
        check(
            &client,
            Case {
                mb,
                kv,
                s,
                rep,
                block,
                g0,
                n,
            },
        );
    }
}
