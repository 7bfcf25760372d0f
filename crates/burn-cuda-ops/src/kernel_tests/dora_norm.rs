//! DoRA's column-norm kernels ([`crate::dora_norm`]) against `||W + s A B||` formed on the host
//! in f64: chunks of rows that do not divide the weight's rows, one chunk and many, columns
//! at every vector width (odd widths scalar), more columns than a cube has units, ranks 1 to 16,
//! and a scale that makes the low-rank terms large against `||W||`.

use cubecl::prelude::*;

use super::{assert_close, client, f32_type, input, launch_in, output, read_output, values, Rt};
use super::{widths, MODES};
use crate::cube_util::{elem_grid, THREADS};
use crate::dora_norm::{col_sq_partial_kernel, dora_norm_kernel, CHUNK_ROWS};

/// `a [rows, cols] x b [cols, n]` in f32 (the GEMMs the caller runs before the kernels).
fn matmul(a: &[f32], b: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * n];
    for i in 0..rows {
        for k in 0..cols {
            let x = a[i * cols + k];
            for j in 0..n {
                out[i * n + j] += x * b[k * n + j];
            }
        }
    }
    out
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

fn run(d_in: usize, out: usize, r: usize, s: f32) {
    let client = client();
    let seed = (d_in * 31 + out * 7 + r) as u64;
    let w = values(d_in * out, seed, 0.05);
    let a = values(d_in * r, seed + 1, 0.1);
    let b = values(r * out, seed + 2, 0.5);
    let at = transpose(&a, d_in, r);
    let aw = matmul(&at, &w, r, d_in, out);
    let gram = matmul(&at, &a, r, d_in, r);
    // ||W + s A B|| per column, in f64.
    let want: Vec<f64> = (0..out)
        .map(|o| {
            (0..d_in)
                .map(|i| {
                    let ab: f64 = (0..r)
                        .map(|k| a[i * r + k] as f64 * b[k * out + o] as f64)
                        .sum();
                    let v = w[i * out + o] as f64 + s as f64 * ab;
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let chunks = d_in.div_ceil(CHUNK_ROWS);
    let (wb, awb, gb, bb) = (
        input(&client, &w),
        input(&client, &aw),
        input(&client, &gram),
        input(&client, &b),
    );
    for v in widths(out) {
        for mode in MODES {
            let cv = out / v;
            let partial = output(&client, chunks * out);
            launch_in!(
                mode,
                col_sq_partial_kernel::<Rt>(
                    &client,
                    CubeCount::Static(cv.div_ceil(THREADS as usize) as u32, chunks as u32, 1),
                    CubeDim::new_1d(THREADS),
                    v,
                    wb.arg(&[d_in, out]),
                    partial.arg(&[chunks, out]),
                    d_in as u32,
                    cv as u32,
                    CHUNK_ROWS as u32,
                    f32_type(),
                )
            );
            let norm = output(&client, out);
            launch_in!(
                mode,
                dora_norm_kernel::<Rt>(
                    &client,
                    elem_grid(out),
                    CubeDim::new_1d(THREADS),
                    partial.arg(&[chunks, out]),
                    awb.arg(&[r, out]),
                    bb.arg(&[r, out]),
                    gb.arg(&[r, r]),
                    norm.flat(),
                    out as u32,
                    chunks as u32,
                    r as u32,
                    s,
                    f32_type(),
                )
            );
            let what = format!("dora norm {d_in}x{out} r {r} s {s} width {v} {mode:?}");
            let _ = read_output(&client, &partial, &what);
            let got = read_output(&client, &norm, &what);
            assert_close(&got, &want, 1e-6, 1e-4, &what);
        }
    }
}

#[test]
fn dora_norms_equal_the_host_formula() {
    for (d_in, out, r, s) in [
        (130, 40, 3, 2.0),
        (64, 1_003, 8, 0.5),
        (17, 8, 1, 4.0),
        (300, 2_056, 16, 2.0),
    ] {
        run(d_in, out, r, s);
    }
}
