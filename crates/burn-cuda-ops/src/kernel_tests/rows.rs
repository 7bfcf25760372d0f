//! The row kernels: log-sum-exp and the cross-entropy's gradient ([`crate::lse`]), the attention
//! softmax forward and backward ([`crate::softmax`]), RMSNorm forward and backward and the
//! residual add fused with the forward ([`crate::rms_norm`]).
//!
//! Each runs at every vector width that divides its row (the host's pick, `vector_size`, is the
//! widest; width 1 for odd rows), in both modes, against an f64 computation of its documented
//! formula. The shapes cover rows narrower than a cube's units (idle units in the reductions),
//! exactly one and just over one pass of the cube, rows of 5,000+ elements (many passes per
//! unit), odd widths, row counts below and above one cube's worth (softmax packs eight rows per
//! cube) and, for every kernel, more than 65,535 rows (the second dimension of the grid; lse and
//! RMSNorm there with cubes of 32 units, see [`MANY_ROWS_THREADS`]).
//! The row values are offset by up to ±120 (so an exponential that skips the maximum overflows
//! f32), with all-zero and tiny rows for RMSNorm (its `eps`) and masked entries, a batch
//! boundary inside a chunk and a fully masked row for the softmax.
//!
//! The softmax kernels reduce a row with plane (subgroup) operations, one plane per row: their
//! host code launches planes of 32 units (NVIDIA's warp), and lavapipe's subgroups are 8 wide, so
//! these tests launch with the device's plane width as `CUBE_DIM_X`, as the kernels' loops
//! (strided by `CUBE_DIM_X`) allow.

use cubecl::prelude::*;

use super::{
    assert_close, client, f32_type, input, input_u32, launch_in, output, read_in_place,
    read_output, u32_type, values, widths, Rt, MODES,
};
use crate::cube_util::{grid, THREADS};
use crate::lse::{ce_grad_kernel, lse_rows_kernel};
use crate::rms_norm::{add_rms_forward_kernel, rms_backward_kernel, rms_forward_kernel};
use crate::softmax::{softmax_backward_kernel, softmax_forward_kernel};

/// f32 tolerances: the kernels accumulate in f32, the references in f64.
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;

/// `[rows, width]` shapes of the one-cube-per-row kernels (lse, ce_grad, RMSNorm), whose cubes
/// have [`THREADS`] units: a row narrower than the cube (40 = 5 vectors of 8), an odd one (37,
/// width 1), more rows than a cube has units (300), a row of exactly 256 vectors of 8 (one pass)
/// and of 257 (one unit takes a second), and rows of 5,000+ elements, even and odd (3 to 20
/// passes per unit).
const SHAPES: [(usize, usize); 7] = [
    (1, 40),
    (3, 37),
    (300, 64),
    (2, 2048),
    (3, 2056),
    (4, 5008),
    (2, 5003),
];

/// More rows than one grid dimension holds (65,535): the grid gets a second row of cubes,
/// mostly past the last row. Rows of 2 elements keep it fast.
const MANY_ROWS: usize = 65_537;

/// Units per cube of the one-cube-per-row kernels when launched over [`MANY_ROWS`]: their
/// reductions take any power of two given as `threads` (and `CUBE_DIM_X`), and lavapipe runs a
/// cube of [`THREADS`] units through a reduction's barriers slowly (about 2 s a launch of lse over
/// 65,537 rows, 1 s of RMSNorm); 32 units still cover the second dimension of the grid.
const MANY_ROWS_THREADS: u32 = 32;

/// Row values in `[-8, 8)` offset by up to ±120 per row, so that `exp` of a value that skipped
/// the row's maximum overflows f32; row 0's largest element is its last one (the tail of the
/// last vector).
fn logits(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut x = values(rows * width, seed, 8.0);
    for r in 0..rows {
        let offset = ((r % 5) as f32 - 2.0) * 60.0;
        for v in &mut x[r * width..(r + 1) * width] {
            *v += offset;
        }
    }
    x[width - 1] = -120.0 + 20.0;
    x
}

/// `log(sum_j exp(x[j]))` in f64.
fn lse64(row: &[f32]) -> f64 {
    let m = row
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// `lse_rows_kernel` over `x [rows, width]` at vector width `v` with cubes of `threads` units,
/// in `mode`: the `[rows]` output.
fn run_lse(
    client: &ComputeClient<Rt>,
    x: &[f32],
    rows: usize,
    width: usize,
    v: usize,
    threads: u32,
    mode: super::Mode,
) -> Vec<f32> {
    let xb = input(client, x);
    let out = output(client, rows);
    launch_in!(
        mode,
        lse_rows_kernel::<Rt>(
            client,
            grid(rows),
            CubeDim::new_1d(threads),
            v,
            xb.arg(&[rows, width]),
            out.flat(),
            rows as u32,
            (width / v) as u32,
            threads,
            f32_type(),
        )
    );
    read_output(
        client,
        &out,
        &format!("lse out {rows}x{width} width {v} {mode:?}"),
    )
}

#[test]
fn lse_rows_matches_the_formula() {
    let client = client();
    for (rows, width) in SHAPES {
        let x = logits(rows, width, 11);
        let want: Vec<f64> = x.chunks(width).map(lse64).collect();
        for v in widths(width) {
            for mode in MODES {
                let got = run_lse(&client, &x, rows, width, v, THREADS, mode);
                let what = format!("lse {rows}x{width} width {v} {mode:?}");
                assert_close(&got, &want, ATOL, RTOL, &what);
            }
        }
    }
}

#[test]
fn lse_rows_past_65535_rows() {
    let client = client();
    let (rows, width) = (MANY_ROWS, 2);
    let x = logits(rows, width, 12);
    let want: Vec<f64> = x.chunks(width).map(lse64).collect();
    for v in widths(width) {
        for mode in MODES {
            let got = run_lse(&client, &x, rows, width, v, MANY_ROWS_THREADS, mode);
            let what = format!("lse {rows}x{width} width {v} {mode:?}");
            assert_close(&got, &want, ATOL, RTOL, &what);
        }
    }
}

/// The targets of `rows` rows of `width`: the first and last element of the row, then spread
/// over the row (every lane of a vector).
fn targets(rows: usize, width: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| match r {
            0 => 0,
            1 => width - 1,
            _ => (r * 7_919 + 3) % width,
        } as u32)
        .collect()
}

/// `ce_grad_kernel` over `x [rows, width]` (in place) at vector width `v` in `mode`, checked
/// against `(exp(x - lse) - [j == t]) * d`.
fn check_ce_grad(
    client: &ComputeClient<Rt>,
    rows: usize,
    width: usize,
    v: usize,
    mode: super::Mode,
) {
    let x = logits(rows, width, 21);
    let lse: Vec<f32> = x.chunks(width).map(|r| lse64(r) as f32).collect();
    let t = targets(rows, width);
    let d = 0.37f32;
    let want: Vec<f64> = (0..rows * width)
        .map(|k| {
            let (i, j) = (k / width, k % width);
            let hit = if j == t[i] as usize { 1.0 } else { 0.0 };
            ((x[k] as f64 - lse[i] as f64).exp() - hit) * d as f64
        })
        .collect();
    let xb = input(client, &x);
    let (lb, tb, db) = (
        input(client, &lse),
        input_u32(client, &t),
        input(client, &[d]),
    );
    launch_in!(
        mode,
        ce_grad_kernel::<Rt>(
            client,
            grid(rows),
            CubeDim::new_1d(THREADS),
            v,
            xb.arg(&[rows, width]),
            lb.flat(),
            tb.flat(),
            db.flat(),
            rows as u32,
            (width / v) as u32,
            [f32_type(), u32_type()],
        )
    );
    let what = format!("ce_grad {rows}x{width} width {v} {mode:?}");
    let got = read_in_place(client, &xb, &what);
    assert_close(&got, &want, ATOL, RTOL, &what);
}

#[test]
fn ce_grad_matches_the_formula() {
    let client = client();
    for (rows, width) in SHAPES {
        for v in widths(width) {
            for mode in MODES {
                check_ce_grad(&client, rows, width, v, mode);
            }
        }
    }
}

#[test]
fn ce_grad_past_65535_rows() {
    let client = client();
    for v in widths(2) {
        for mode in MODES {
            check_ce_grad(&client, MANY_ROWS, 2, v, mode);
        }
    }
}

/// Rows per softmax cube, as `softmax::ROWS_PER_CUBE`.
const ROWS_PER_CUBE: usize = 8;

/// The device's plane width: the units per row of a softmax launch. (cubecl's wgpu runtime
/// leaves `Plane::Ops` out of a CPU device's features, but its SPIR-V compiler emits the
/// subgroup reductions all the same, and lavapipe has them.)
fn plane_width(client: &ComputeClient<Rt>) -> u32 {
    let hw = &client.properties().hardware;
    assert_eq!(
        hw.plane_size_min, hw.plane_size_max,
        "the softmax kernels need a fixed plane width"
    );
    hw.plane_size_max
}

/// The grid and cube of a softmax launch over `rows` rows, as `softmax::rows_launch` with the
/// device's plane width.
fn softmax_launch(client: &ComputeClient<Rt>, rows: usize) -> (CubeCount, CubeDim) {
    (
        grid(rows.div_ceil(ROWS_PER_CUBE)),
        CubeDim::new_2d(plane_width(client), ROWS_PER_CUBE as u32),
    )
}

/// The additive mask's value for masked positions (as the llama crate's `MASKED`).
const MASKED: f32 = -1e9;

/// A softmax forward case: rows `row0..row0 + rows` of `[mb, heads, s]`, each `t` wide.
struct Attn {
    mb: usize,
    heads: usize,
    s: usize,
    t: usize,
    row0: usize,
    rows: usize,
}

/// `mask [mb, 1, s, t]`: causal (query `i` sees keys `..=i + t - s`) with a small bias on the
/// visible keys that differs by batch and query; batch `b` also hides its first `b` keys, and
/// the last batch's query 0 sees nothing (a padding row: uniform).
fn mask(mb: usize, s: usize, t: usize) -> Vec<f32> {
    let mut m = values(mb * s * t, 31, 1.0);
    for b in 0..mb {
        for i in 0..s {
            for j in 0..t {
                if j > i + (t - s) || j < b || (b == mb - 1 && i == 0) {
                    m[(b * s + i) * t + j] = MASKED;
                }
            }
        }
    }
    m
}

fn check_softmax_forward(client: &ComputeClient<Rt>, c: &Attn) {
    let Attn {
        mb,
        heads,
        s,
        t,
        row0,
        rows,
    } = *c;
    let total = mb * heads * s;
    assert!(row0.is_multiple_of(s) && row0 + rows <= total);
    let scores = logits(rows, t, 41);
    let m = mask(mb, s, t);
    let rows_per_mask = total / mb;
    // `f32(S) + mask` rounded to f32, as the kernel adds them; the rest in f64.
    let mut want = Vec::with_capacity(rows * t);
    for row in 0..rows {
        let r = row0 + row;
        let mrow = (r / rows_per_mask) * s + r % s;
        let v: Vec<f64> = (0..t)
            .map(|j| (scores[row * t + j] + m[mrow * t + j]) as f64)
            .collect();
        let mx = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = v.iter().map(|x| (x - mx).exp()).sum();
        want.extend(v.iter().map(|x| (x - mx).exp() / sum));
    }
    // The mask dense, and pitched as Burn lays out rows of odd widths: rows `tp` apart (a
    // multiple of every vector width), NaN between them.
    let tp = (t + 1).next_multiple_of(8);
    let mut pitched = vec![f32::NAN; mb * s * tp];
    for (row, dense) in m.chunks(t).enumerate() {
        pitched[row * tp..][..t].copy_from_slice(dense);
    }
    let sb = input(client, &scores);
    let layouts = [
        (input(client, &m), t, "dense"),
        (input(client, &pitched), tp, "pitched"),
    ];
    for v in widths(t) {
        for ((mbuf, tp, layout), mode) in layouts.iter().flat_map(|l| MODES.map(|m| (l, m))) {
            let out = output(client, rows * t);
            let (count, dim) = softmax_launch(client, rows);
            launch_in!(
                mode,
                softmax_forward_kernel::<Rt>(
                    client,
                    count,
                    dim,
                    v,
                    sb.arg(&[rows, t]),
                    mbuf.arg_strided(&[mb, 1, s, t], &[s * tp, s * tp, *tp, 1]),
                    out.arg(&[rows, t]),
                    rows as u32,
                    (t / v) as u32,
                    s as u32,
                    rows_per_mask as u32,
                    row0 as u32,
                    f32_type(),
                )
            );
            let what = format!(
                "softmax forward [{mb}, {heads}, {s}] rows {row0}.. +{rows} x {t} width {v} \
                 mask {layout} {mode:?}"
            );
            let got = read_output(client, &out, &what);
            assert_close(&got, &want, ATOL, RTOL, &what);
        }
    }
}

#[test]
fn softmax_forward_matches_the_formula() {
    let client = client();
    let cases = [
        // Fewer rows than a cube holds, a row narrower than a plane's vectors.
        (1, 1, 3, 40, 0, 3),
        // Odd rows (width 1) and 42 rows: five full cubes and a partial one.
        (2, 3, 7, 37, 0, 42),
        // A chunk (rows 8..20 of 24) across the boundary of the two mask batches.
        (2, 3, 4, 24, 8, 12),
        // Long rows (626 vectors of 8 to 5,008 elements per plane).
        (2, 2, 5, 5008, 0, 20),
        // Long odd rows, a chunk of the second head.
        (1, 2, 3, 5003, 3, 3),
    ];
    for (mb, heads, s, t, row0, rows) in cases {
        check_softmax_forward(
            &client,
            &Attn {
                mb,
                heads,
                s,
                t,
                row0,
                rows,
            },
        );
    }
}

#[test]
fn softmax_forward_past_65535_cubes() {
    let client = client();
    // 65,535 cubes of 8 rows and two more rows, in two mask batches.
    let rows = 65_535 * ROWS_PER_CUBE + 2;
    check_softmax_forward(
        &client,
        &Attn {
            mb: 2,
            heads: rows / 2,
            s: 1,
            t: 2,
            row0: 0,
            rows,
        },
    );
}

/// Softmax rows (f32) of `rows x t` and an upstream gradient in `[-2, 2)`.
fn probs_and_grad(rows: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
    let x = logits(rows, t, 51);
    let mut p = Vec::with_capacity(rows * t);
    for row in x.chunks(t) {
        let l = lse64(row);
        p.extend(row.iter().map(|&v| (v as f64 - l).exp() as f32));
    }
    (p, values(rows * t, 52, 2.0))
}

fn check_softmax_backward(client: &ComputeClient<Rt>, rows: usize, t: usize) {
    let (p, dp) = probs_and_grad(rows, t);
    let scale = 0.125f32;
    let mut want = Vec::with_capacity(rows * t);
    for i in 0..rows {
        let (pr, dr) = (&p[i * t..(i + 1) * t], &dp[i * t..(i + 1) * t]);
        let dot: f64 = pr.iter().zip(dr).map(|(&a, &b)| a as f64 * b as f64).sum();
        want.extend(
            pr.iter()
                .zip(dr)
                .map(|(&a, &b)| scale as f64 * a as f64 * (b as f64 - dot)),
        );
    }
    let (pb, db) = (input(client, &p), input(client, &dp));
    for v in widths(t) {
        for mode in MODES {
            let out = output(client, rows * t);
            let (count, dim) = softmax_launch(client, rows);
            launch_in!(
                mode,
                softmax_backward_kernel::<Rt>(
                    client,
                    count,
                    dim,
                    v,
                    pb.arg(&[rows, t]),
                    db.arg(&[rows, t]),
                    out.arg(&[rows, t]),
                    rows as u32,
                    (t / v) as u32,
                    scale,
                    f32_type(),
                )
            );
            let what = format!("softmax backward {rows}x{t} width {v} {mode:?}");
            let got = read_output(client, &out, &what);
            assert_close(&got, &want, ATOL, RTOL, &what);
        }
    }
}

#[test]
fn softmax_backward_matches_the_formula() {
    let client = client();
    // Fewer rows than a cube holds; odd rows over five cubes and a part; long rows, even and
    // odd; a row of 33 vectors of 8 (one unit of a plane of 8 or 32 takes an extra pass).
    for (rows, t) in [(3, 40), (42, 37), (20, 5008), (3, 5003), (9, 264)] {
        check_softmax_backward(&client, rows, t);
    }
}

#[test]
fn softmax_backward_past_65535_cubes() {
    let client = client();
    check_softmax_backward(&client, 65_535 * ROWS_PER_CUBE + 2, 2);
}

/// RMSNorm's `eps` in the tests.
const EPS: f32 = 1e-5;

/// RMSNorm inputs: rows of scale 1, 1e-3 (where `eps` matters), 0 and 10 in turn.
fn rms_input(rows: usize, h: usize) -> Vec<f32> {
    let mut x = values(rows * h, 61, 1.0);
    for r in 0..rows {
        let scale = [1.0, 1e-3, 0.0, 10.0][r % 4];
        for v in &mut x[r * h..(r + 1) * h] {
            *v *= scale;
        }
    }
    x
}

/// The frozen weight, in `[0.5, 1.5)`.
fn rms_weight(h: usize) -> Vec<f32> {
    values(h, 62, 0.5).into_iter().map(|v| 1.0 + v).collect()
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, in f64.
fn rstd64(row: &[f32]) -> f64 {
    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
    1.0 / (ms + EPS as f64).sqrt()
}

/// RMSNorm of `x [rows, h]` with weight `w [h]` in f64: each row's `r` and `y = w x r`.
fn rms64(x: &[f32], w: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let h = w.len();
    let r: Vec<f64> = x.chunks(h).map(rstd64).collect();
    let y = (0..x.len())
        .map(|k| w[k % h] as f64 * (x[k] as f64 * r[k / h]))
        .collect();
    (r, y)
}

/// `rms_forward_kernel` over `x [rows, h]` with cubes of `threads` units, at every width and in
/// both modes.
fn check_rms_forward(client: &ComputeClient<Rt>, rows: usize, h: usize, threads: u32) {
    let (x, w) = (rms_input(rows, h), rms_weight(h));
    let (want_r, want_y) = rms64(&x, &w);
    let (xb, wb) = (input(client, &x), input(client, &w));
    for v in widths(h) {
        for mode in MODES {
            let (y, r) = (output(client, rows * h), output(client, rows));
            launch_in!(
                mode,
                rms_forward_kernel::<Rt>(
                    client,
                    grid(rows),
                    CubeDim::new_1d(threads),
                    v,
                    xb.arg(&[rows, h]),
                    wb.arg(&[h]),
                    y.arg(&[rows, h]),
                    r.flat(),
                    rows as u32,
                    (h / v) as u32,
                    h as u32,
                    EPS,
                    threads,
                    f32_type(),
                )
            );
            let what = format!("rms forward {rows}x{h} width {v} {mode:?}");
            let got_y = read_output(client, &y, &format!("{what} y"));
            let got_r = read_output(client, &r, &format!("{what} rstd"));
            assert_close(&got_r, &want_r, ATOL, RTOL, &format!("{what} rstd"));
            assert_close(&got_y, &want_y, ATOL, RTOL, &format!("{what} y"));
        }
    }
}

#[test]
fn rms_forward_matches_the_formula() {
    let client = client();
    for (rows, h) in SHAPES {
        check_rms_forward(&client, rows, h, THREADS);
    }
}

#[test]
fn rms_forward_past_65535_rows() {
    let client = client();
    check_rms_forward(&client, MANY_ROWS, 2, MANY_ROWS_THREADS);
}

/// `add_rms_forward_kernel` over `x + d` (`[rows, h]`) with cubes of `threads` units, at every
/// width and in both modes: the sum (f32 here, so exact) and the norm of the sum.
fn check_add_rms_forward(client: &ComputeClient<Rt>, rows: usize, h: usize, threads: u32) {
    let (x, w) = (rms_input(rows, h), rms_weight(h));
    // A residual update of the row's own scale, and one that cancels the row exactly (row 2 of
    // every 4 is zero already; row 5's update is -x: a zero sum from non-zero inputs).
    let mut d: Vec<f32> = values(rows * h, 64, 0.5)
        .iter()
        .zip(&x)
        .map(|(v, xi)| v * xi.abs().max(1e-3))
        .collect();
    if rows > 5 {
        for k in 5 * h..6 * h {
            d[k] = -x[k];
        }
    }
    let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
    let want_s: Vec<f64> = sum.iter().map(|&v| v as f64).collect();
    let (_, want_y) = rms64(&sum, &w);
    let (xb, db, wb) = (input(client, &x), input(client, &d), input(client, &w));
    for v in widths(h) {
        for mode in MODES {
            let (s, y) = (output(client, rows * h), output(client, rows * h));
            launch_in!(
                mode,
                add_rms_forward_kernel::<Rt>(
                    client,
                    grid(rows),
                    CubeDim::new_1d(threads),
                    v,
                    xb.arg(&[rows, h]),
                    db.arg(&[rows, h]),
                    wb.arg(&[h]),
                    s.arg(&[rows, h]),
                    y.arg(&[rows, h]),
                    rows as u32,
                    (h / v) as u32,
                    h as u32,
                    EPS,
                    threads,
                    f32_type(),
                )
            );
            let what = format!("add + rms forward {rows}x{h} width {v} {mode:?}");
            let got_s = read_output(client, &s, &format!("{what} sum"));
            let got_y = read_output(client, &y, &format!("{what} y"));
            assert_close(&got_s, &want_s, 0.0, 0.0, &format!("{what} sum"));
            assert_close(&got_y, &want_y, ATOL, RTOL, &format!("{what} y"));
        }
    }
}

#[test]
fn add_rms_forward_matches_the_formula() {
    let client = client();
    for (rows, h) in SHAPES.into_iter().chain([(8, 48)]) {
        check_add_rms_forward(&client, rows, h, THREADS);
    }
    check_add_rms_forward(&client, MANY_ROWS, 2, MANY_ROWS_THREADS);
}

/// The documented backward of one row, in f64: `g = dy w`, `dx = r g - r^3 x mean(g x)`.
fn rms_dx64(dy: &[f32], x: &[f32], w: &[f32], r: f64) -> Vec<f64> {
    let g: Vec<f64> = dy
        .iter()
        .zip(w)
        .map(|(&a, &b)| a as f64 * b as f64)
        .collect();
    let mean_gx = g.iter().zip(x).map(|(a, &b)| a * b as f64).sum::<f64>() / x.len() as f64;
    g.iter()
        .zip(x)
        .map(|(gi, &xi)| r * gi - r * r * r * xi as f64 * mean_gx)
        .collect()
}

#[test]
fn rms_backward_formula_is_the_forward_gradient() {
    // The reference itself, on the CPU: the documented `dx` is the gradient of
    // `sum(dy * w * x r(x))` (central differences in f64).
    let h = 13;
    let x: Vec<f32> = values(h, 71, 1.0);
    let (w, dy) = (rms_weight(h), values(h, 72, 1.0));
    let loss = |x: &[f64]| {
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / h as f64 + EPS as f64).sqrt();
        (0..h)
            .map(|j| dy[j] as f64 * w[j] as f64 * x[j] * r)
            .sum::<f64>()
    };
    let dx = rms_dx64(&dy, &x, &w, rstd64(&x));
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let step = 1e-6;
    for j in 0..h {
        let (mut up, mut down) = (x64.clone(), x64.clone());
        up[j] += step;
        down[j] -= step;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * step);
        assert!(
            (numeric - dx[j]).abs() < 1e-6,
            "element {j}: {numeric} by differences, {} by the formula",
            dx[j]
        );
    }
}

/// `rms_backward_kernel` over `dy, x [rows, h]` with cubes of `threads` units, at every width and
/// in both modes.
fn check_rms_backward(client: &ComputeClient<Rt>, rows: usize, h: usize, threads: u32) {
    let (x, w) = (rms_input(rows, h), rms_weight(h));
    let dy = values(rows * h, 63, 1.0);
    // The kept `r` as the forward writes it (f32).
    let r: Vec<f32> = x.chunks(h).map(|row| rstd64(row) as f32).collect();
    let mut want = Vec::with_capacity(rows * h);
    for ((dyr, xr), &ri) in dy.chunks(h).zip(x.chunks(h)).zip(&r) {
        want.extend(rms_dx64(dyr, xr, &w, ri as f64));
    }
    let (dyb, xb, wb, rb) = (
        input(client, &dy),
        input(client, &x),
        input(client, &w),
        input(client, &r),
    );
    for v in widths(h) {
        for mode in MODES {
            let dx = output(client, rows * h);
            launch_in!(
                mode,
                rms_backward_kernel::<Rt>(
                    client,
                    grid(rows),
                    CubeDim::new_1d(threads),
                    v,
                    dyb.arg(&[rows, h]),
                    xb.arg(&[rows, h]),
                    wb.arg(&[h]),
                    rb.flat(),
                    dx.arg(&[rows, h]),
                    rows as u32,
                    (h / v) as u32,
                    h as u32,
                    threads,
                    f32_type(),
                )
            );
            let what = format!("rms backward {rows}x{h} width {v} {mode:?}");
            let got = read_output(client, &dx, &what);
            assert_close(&got, &want, ATOL, RTOL, &what);
        }
    }
}

#[test]
fn rms_backward_matches_the_formula() {
    let client = client();
    for (rows, h) in SHAPES {
        check_rms_backward(&client, rows, h, THREADS);
    }
}

#[test]
fn rms_backward_past_65535_rows() {
    let client = client();
    check_rms_backward(&client, MANY_ROWS, 2, MANY_ROWS_THREADS);
}
