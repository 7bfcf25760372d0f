//! PEFT's `IncrementalPCA` (after scikit-learn's), as EVA uses it: `partial_fit` on batches of
//! layer inputs, a randomized SVD with `q = 2 n_components`, 4 subspace iterations and seed 42.

use faer::Mat;

use crate::error::Result;
use crate::linalg::{seeded_normal, svd_lowrank_sketch};

/// Running principal components of a stream of `[n, features]` batches.
#[derive(Debug, Clone)]
pub struct IncrementalPca {
    /// Components kept.
    pub n_components: usize,
    /// `[n_components, features]`, rows orthonormal, sign-normalised (`svd_flip`).
    pub components: Option<Mat<f32>>,
    /// Singular values of the components.
    pub singular_values: Vec<f32>,
    /// Share of the total variance each component explains.
    pub explained_variance_ratio: Vec<f32>,
    mean: Option<Vec<f64>>,
    var: Option<Vec<f64>>,
    n_seen: usize,
}

impl IncrementalPca {
    /// An empty fit keeping `n_components`.
    pub fn new(n_components: usize) -> Self {
        IncrementalPca {
            n_components,
            components: None,
            singular_values: Vec::new(),
            explained_variance_ratio: Vec::new(),
            mean: None,
            var: None,
            n_seen: 0,
        }
    }

    /// One incremental step on `x` `[n, features]` (`n >= n_components`).
    pub fn partial_fit(&mut self, x: &Mat<f32>, module: &str) -> Result<()> {
        let (n, f) = (x.nrows(), x.ncols());
        let (col_mean, col_var, n_total) = self.mean_and_var(x);
        let data = match &self.components {
            None => Mat::from_fn(n, f, |i, j| (x[(i, j)] as f64 - col_mean[j]) as f32),
            Some(c) => {
                let batch_mean: Vec<f32> = (0..f)
                    .map(|j| (0..n).map(|i| x[(i, j)]).sum::<f32>() / n as f32)
                    .collect();
                let last_mean = self.mean.as_ref().expect("mean set with components");
                let factor = ((self.n_seen as f64 / n_total as f64) * n as f64).sqrt();
                let k = c.nrows();
                Mat::from_fn(k + n + 1, f, |i, j| {
                    if i < k {
                        self.singular_values[i] * c[(i, j)]
                    } else if i < k + n {
                        x[(i - k, j)] - batch_mean[j]
                    } else {
                        (factor * (last_mean[j] - batch_mean[j] as f64)) as f32
                    }
                })
            }
        };
        let q = 2 * self.n_components;
        let q = q.min(data.nrows()).min(data.ncols());
        let sketch = seeded_normal(data.nrows().min(data.ncols()), q, 42);
        let svd = svd_lowrank_sketch(data.as_ref(), q, 4, sketch, module)?;
        // svd_flip(u_based_decision=False): the largest |entry| of each component is positive.
        let keep = self.n_components.min(svd.s.len());
        let mut comps = Mat::from_fn(keep, f, |i, j| svd.v[(j, i)]);
        for i in 0..keep {
            let (mut best, mut at) = (0f32, 0);
            for j in 0..f {
                if comps[(i, j)].abs() > best {
                    best = comps[(i, j)].abs();
                    at = j;
                }
            }
            if comps[(i, at)] < 0.0 {
                for j in 0..f {
                    comps[(i, j)] = -comps[(i, j)];
                }
            }
        }
        let total: f64 = col_var.iter().map(|v| v * n_total as f64).sum();
        self.explained_variance_ratio = svd.s[..keep]
            .iter()
            .map(|s| ((*s as f64).powi(2) / total) as f32)
            .collect();
        self.singular_values = svd.s[..keep].to_vec();
        self.components = Some(comps);
        self.mean = Some(col_mean);
        self.var = Some(col_var);
        self.n_seen = n_total;
        Ok(())
    }

    /// `_incremental_mean_and_var` in f64.
    fn mean_and_var(&self, x: &Mat<f32>) -> (Vec<f64>, Vec<f64>, usize) {
        let (n, f) = (x.nrows(), x.ncols());
        let last_n = self.n_seen as f64;
        let total = self.n_seen + n;
        let mut mean = vec![0.0; f];
        let mut var = vec![0.0; f];
        for j in 0..f {
            let new_sum: f64 = (0..n).map(|i| x[(i, j)] as f64).sum();
            let last_sum = self.mean.as_ref().map_or(0.0, |m| m[j] * last_n);
            mean[j] = (last_sum + new_sum) / total as f64;
            let t = new_sum / n as f64;
            let (mut s, mut s2) = (0.0, 0.0);
            for i in 0..n {
                let d = x[(i, j)] as f64 - t;
                s += d;
                s2 += d * d;
            }
            let new_unnorm = s2 - s * s / n as f64;
            var[j] = match &self.var {
                None => new_unnorm / total as f64,
                Some(v) => {
                    let last_over_new = last_n / n as f64;
                    let corr = last_sum / last_over_new - new_sum;
                    (v[j] * last_n + new_unnorm + last_over_new / total as f64 * corr * corr)
                        / total as f64
                }
            };
        }
        (mean, var, total)
    }
}

/// Row-wise cosine similarity of two `[k, f]` matrices.
pub fn row_cosine(a: &Mat<f32>, b: &Mat<f32>) -> Vec<f32> {
    (0..a.nrows().min(b.nrows()))
        .map(|i| {
            let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
            for j in 0..a.ncols() {
                let (x, y) = (a[(i, j)] as f64, b[(i, j)] as f64);
                d += x * y;
                na += x * x;
                nb += y * y;
            }
            (d / (na.sqrt() * nb.sqrt()).max(1e-8)) as f32
        })
        .collect()
}
