//! Sampling's kernel against transformers' processors on the host (f64,
//! `test_support::sampling`): temperature, top-k (ties with the `k`-th value kept), top-p over
//! the renormalised rest, then the draw in vocabulary order. Each row is drawn at many uniforms: every token must be one the
//! processors keep, and `u` must fall inside that token's span of the kept CDF.

use cubecl::prelude::*;
use test_support::sampling;

use super::{
    client, f32_type, input, launch_in, output, read_output, u32_type, values, widths, Rt, MODES,
};
use crate::cube_util::{grid, THREADS};
use crate::sample::{sample_rows_kernel, U_MAX};

/// The uniforms each row is drawn at: the ends and a spread between them.
fn uniforms() -> Vec<f32> {
    let mut u: Vec<f32> = (0..23).map(|i| (i as f32 + 0.37) / 23.0).collect();
    u.extend([0.0, 0.999_999, 1.0]);
    u
}

/// Draws every row of `x [rows, width]` at each of `us`, at each vector width of `vs`, and
/// checks each token.
#[allow(clippy::too_many_arguments)]
fn run(
    rows: usize,
    width: usize,
    x: &[f32],
    t: f32,
    top_k: usize,
    top_p: f32,
    us: &[f32],
    vs: &[usize],
) {
    let client = client();
    // Row r at uniform i is launch row r * us.len() + i.
    let n = rows * us.len();
    let mut big = Vec::with_capacity(n * width);
    let mut ub = Vec::with_capacity(n);
    for r in 0..rows {
        for u in us {
            big.extend_from_slice(&x[r * width..(r + 1) * width]);
            ub.push(*u);
        }
    }
    let xb = input(&client, &big);
    let uu = input(&client, &ub);
    for &v in vs {
        for mode in MODES {
            let e = output(&client, n * width);
            let out = output(&client, n);
            launch_in!(
                mode,
                sample_rows_kernel::<Rt>(
                    &client,
                    grid(n),
                    CubeDim::new_1d(THREADS),
                    v,
                    xb.arg(&[n, width]),
                    uu.flat(),
                    e.arg(&[n, width]),
                    out.flat(),
                    n as u32,
                    (width / v) as u32,
                    t,
                    top_k as u32,
                    top_p,
                    THREADS,
                    [f32_type(), u32_type()],
                )
            );
            let what = format!(
                "sample {rows}x{width} t {t} top_k {top_k} top_p {top_p} width {v} {mode:?}"
            );
            let got: Vec<usize> = read_output(&client, &out, &what)
                .iter()
                .map(|f| f.to_bits() as usize)
                .collect();
            let _ = read_output(&client, &e, &what);
            for r in 0..rows {
                let kept = sampling::kept(&x[r * width..(r + 1) * width], t, top_k, top_p as f64);
                for (i, u) in us.iter().enumerate() {
                    let id = got[r * us.len() + i];
                    let (before, through) = sampling::span(&kept, id).unwrap_or_else(|| {
                        panic!("{what}: row {r} u {u}: token {id} is not kept ({kept:?})")
                    });
                    let u = (*u).clamp(0.0, U_MAX) as f64;
                    assert!(
                        before - 1e-5 <= u && u <= through + 1e-5,
                        "{what}: row {r} u {u}: token {id} spans [{before}, {through}]"
                    );
                }
            }
        }
    }
}

/// Rows with ties at the `k`-th value, suppressed (`-inf`) tokens, a dominant token, coarse
/// values.
fn rows_with_cases(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut x = values(rows * width, seed, 4.0);
    for r in 0..rows {
        let row = &mut x[r * width..(r + 1) * width];
        match r % 4 {
            // Ties: the same high value at both ends and in the middle.
            0 => {
                for i in [0, width / 2, width - 1] {
                    row[i] = 3.9;
                }
            }
            // Suppressed tokens (stop ids before `min_new_tokens`).
            1 => {
                row[width / 3] = f32::NEG_INFINITY;
                row[width - 2] = f32::NEG_INFINITY;
            }
            // One token holds nearly all the mass.
            2 => row[width / 5] = 30.0,
            // Coarse values (as bf16 logits are): tie groups at the top-k and top-p cuts.
            _ => row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
        }
    }
    x
}

#[test]
fn draws_lie_in_the_kept_cdf() {
    for (rows, width) in [(4usize, 1_003usize), (4, 40), (2, 5_000)] {
        let x = rows_with_cases(rows, width, (rows * width) as u64);
        let all = widths(width);
        // The host's width and the scalar one (every width for the narrow row).
        let vs = if width <= 64 { all } else { vec![all[0], 1] };
        for (t, k, p) in [
            (1.0, 0, 1.0),
            (1.0, 20, 1.0),
            (0.7, 0, 0.9),
            (1.3, 50, 0.5),
            (0.5, 7, 0.95),
            (1.0, 1, 1.0),
            (2.0, 3, 0.3),
        ] {
            run(rows, width, &x, t, k, p, &uniforms(), &vs);
        }
    }
}

#[test]
fn draws_over_a_vocabulary_wide_row() {
    // 128,256 = 8 x 16,032: many passes per unit and chunks of 501 per unit in the draw.
    let width = 128_256;
    let x = rows_with_cases(2, width, 17);
    run(2, width, &x, 0.6, 50, 0.9, &[0.0, 0.31, 0.77, 1.0], &[8]);
    run(2, width, &x, 1.1, 0, 0.95, &[0.5, 0.999_999], &[8]);
}
