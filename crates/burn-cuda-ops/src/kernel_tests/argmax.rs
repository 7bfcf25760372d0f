//! Greedy decoding's argmax kernel: the first index of each row's maximum (a NaN largest, a
//! row of `-inf` giving 0), at every vector width, with ties across lanes, units and passes,
//! for a vocabulary-wide row and for more rows than a grid row holds.

use cubecl::prelude::*;

use super::{client, f32_type, input, launch_in, output, read_output, values, widths, Rt, MODES};
use crate::argmax::argmax_rows_kernel;
use crate::cube_util::{grid, THREADS};

/// torch's `argmax`: the first NaN, else the first index of the maximum; 0 for an empty-of-
/// numbers row of `-inf`.
fn reference(row: &[f32]) -> i32 {
    if let Some(i) = row.iter().position(|v| v.is_nan()) {
        return i as i32;
    }
    let mut at = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[at] {
            at = i;
        }
    }
    at as i32
}

fn run(rows: usize, width: usize, x: &[f32], threads: u32) {
    let client = client();
    let xb = input(&client, x);
    let want: Vec<i32> = (0..rows)
        .map(|r| reference(&x[r * width..(r + 1) * width]))
        .collect();
    for v in widths(width) {
        for mode in MODES {
            let out = output(&client, rows);
            launch_in!(
                mode,
                argmax_rows_kernel::<Rt>(
                    &client,
                    grid(rows),
                    CubeDim::new_1d(threads),
                    v,
                    xb.arg(&[rows, width]),
                    out.flat(),
                    rows as u32,
                    (width / v) as u32,
                    threads,
                    [f32_type(), i32::as_type_native_unchecked().storage_type()],
                )
            );
            let what = format!("argmax {rows}x{width} width {v} {mode:?}");
            let got: Vec<i32> = read_output(&client, &out, &what)
                .iter()
                .map(|f| f.to_bits() as i32)
                .collect();
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{what}: row {r}");
            }
        }
    }
}

#[test]
fn argmax_takes_the_first_maximum_of_each_row() {
    // A vocabulary-wide row (128,256 = 8 x 16,032: many passes per unit) and odd widths.
    for (rows, width) in [
        (3usize, 128_256usize),
        (5, 1_003),
        (4, 40),
        (300, 64),
        (2, 5_000),
    ] {
        let mut x = values(rows * width, (rows * width) as u64, 10.0);
        for r in 0..rows {
            let row = &mut x[r * width..(r + 1) * width];
            match r % 5 {
                // Ties across lanes and units: the maximum at a late index and again earlier.
                0 => {
                    let (a, b) = (width - 1, width / 3);
                    row[a] = 50.0;
                    row[b] = 50.0;
                    row[width / 2] = 50.0;
                }
                // The maximum in the last element only.
                1 => row[width - 1] = 99.0,
                // Every value equal: index 0.
                2 => row.iter_mut().for_each(|v| *v = -3.5),
                // A NaN after a larger number, and a second NaN later.
                3 => {
                    row[1] = 1.0e30;
                    row[width / 2] = f32::NAN;
                    row[width - 1] = f32::NAN;
                }
                // Every value -inf: 0, as torch.
                _ => row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
            }
        }
        run(rows, width, &x, THREADS);
    }
}

#[test]
fn argmax_past_65535_rows() {
    // The grid's second dimension; 32-unit cubes keep lavapipe fast (any power of two works).
    let (rows, width) = (65_537usize, 8usize);
    let x = values(rows * width, 11, 5.0);
    run(rows, width, &x, 32);
}
