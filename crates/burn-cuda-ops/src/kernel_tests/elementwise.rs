//! The elementwise kernels: SwiGLU forward and backward.

use cubecl::prelude::*;

use super::{
    assert_close, client, f32_type, input, launch_in, output, read_output, values, Rt, MODES,
};
use crate::cube_util::{elem_grid, THREADS};
use crate::swiglu::swiglu_forward_kernel;

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
