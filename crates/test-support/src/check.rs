//! The GPU checks' comparison record and host references (the burn-cuda-ops self-test and
//! peft-lora's fused-layer check share them).

use burn::tensor::{backend::Backend, Tensor};

/// One comparison: the largest absolute difference over the largest absolute reference value.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was compared.
    pub name: String,
    /// Error of the fused op.
    pub err_fused: f64,
    /// Error of the composed op against the same reference (context; `NaN` when not computed).
    pub err_composed: f64,
    /// Largest accepted `err_fused`.
    pub tol: f64,
}

impl Check {
    /// A check of the fused op alone against a reference (no composed op compared).
    pub fn fused(name: String, err_fused: f64, tol: f64) -> Check {
        Check {
            name,
            err_fused,
            err_composed: f64::NAN,
            tol,
        }
    }

    /// Whether the fused op is within tolerance.
    pub fn pass(&self) -> bool {
        self.err_fused <= self.tol
    }
}

/// A tensor read back to the host as f32.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// The largest absolute difference over the largest absolute reference value (`inf` when
/// `got` has a non-finite value).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared tensors differ in size");
    let (mut d, mut s) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        d = d.max((*g as f64 - *w as f64).abs());
        s = s.max((*w as f64).abs());
    }
    if !d.is_finite() {
        return f64::INFINITY;
    }
    d / s.max(1e-30)
}

/// Row-major `[m, k] x [k, n]` (with optional transposes of the stored operands) in f64.
pub fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] = acc as f32;
        }
    }
    c
}
