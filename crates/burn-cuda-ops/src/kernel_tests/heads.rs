//! The heads-merging copy ([`crate::heads`]) against the index formula, both directions.

use cubecl::prelude::*;

use super::{client, f32_type, input, launch_in, output, read_output, values, widths, Rt, MODES};
use crate::cube_util::{elem_grid, THREADS};
use crate::heads::swap_middle_kernel;

#[test]
fn swap_middle_moves_every_row_of_d_at_every_vector_width() {
    let client = client();
    // (b, p, q, d): heads x tokens with rows of 8, 12 (widths 4, 2, 1) and 6 (2, 1); a count of
    // vectors that leaves the last cube part-filled; one head; one token.
    for (b, p, q, d) in [
        (2usize, 3usize, 5usize, 8usize),
        (1, 4, 7, 12),
        (3, 2, 9, 6),
        (1, 1, 11, 16),
        (2, 5, 1, 8),
    ] {
        let n = b * p * q * d;
        let x = values(n, 11, 3.0);
        let want: Vec<f64> = (0..n)
            .map(|o| {
                let (e, row) = (o % d, o / d);
                let (i, rest) = (row % p, row / p);
                let (j, bb) = (rest % q, rest / q);
                x[((bb * p + i) * q + j) * d + e] as f64
            })
            .collect();
        let xb = input(&client, &x);
        for v in widths(d) {
            for mode in MODES {
                // `[b, p, q, d]` in `src` -> `[b, q, p, d]` in a new output.
                let swap = |src: &super::Buf, p: usize, q: usize| {
                    let out = output(&client, n);
                    launch_in!(
                        mode,
                        swap_middle_kernel::<Rt>(
                            &client,
                            elem_grid(n / v),
                            CubeDim::new_1d(THREADS),
                            v,
                            src.flat(),
                            out.flat(),
                            (n / v) as u32,
                            p as u32,
                            q as u32,
                            (d / v) as u32,
                            f32_type(),
                        )
                    );
                    out
                };
                let what = format!("swap_middle [{b}, {p}, {q}, {d}] width {v} {mode:?}");
                let out = swap(&xb, p, q);
                let got = read_output(&client, &out, &what);
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(*g as f64, *w, "{what}: element {k}");
                }
                // And back: the inverse swap restores the input.
                let back = swap(&out, q, p);
                assert_eq!(read_output(&client, &back, &what), x, "{what}: inverse");
            }
        }
    }
}
