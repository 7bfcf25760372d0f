//! Dense decompositions on the host, through [faer](https://docs.rs/faer): thin SVD (f32 or f64),
//! thin QR, pseudo-inverse and PyTorch's randomized `svd_lowrank`. This is the crate's only
//! linear-algebra library: every SVD, QR and inverse (PiSSA, OLoRA, EVA, LoftQ, the SVD-based
//! adapter combinations, LoRA-FA's projection) goes through here.
//!
//! faer was chosen (over nalgebra, used before) because its blocked, multi-threaded SVD is ~30x
//! faster on Llama-sized matrices (4096 x 4096 in seconds instead of minutes), which is what
//! PiSSA, OLoRA and EVA decompose.

use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use faer::traits::RealField;
use faer::{Mat, MatRef};

use crate::error::{Error, Result};
use crate::host::to_host;

/// A Burn matrix copied to the host as an f32 faer matrix.
pub fn to_mat<B: Backend>(t: Tensor<B, 2>) -> Mat<f32> {
    let h = to_host(t);
    let (rows, cols) = (h.shape[0], h.shape[1]);
    Mat::from_fn(rows, cols, |i, j| h.data[i * cols + j])
}

/// A host matrix as a Burn tensor on `device`.
pub fn from_mat<B: Backend>(m: MatRef<'_, f32>, device: &B::Device) -> Tensor<B, 2> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut data = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            data.push(m[(i, j)]);
        }
    }
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// The leading `k` singular triplets: `m ~ u diag(s) v^T`, singular values descending. `T` is
/// `f32` (PiSSA, OLoRA, EVA) or `f64` (LoftQ, adapter combinations).
#[derive(Debug, Clone)]
pub struct TruncatedSvd<T = f32> {
    /// Left singular vectors, `[rows, k]`.
    pub u: Mat<T>,
    /// Singular values, descending.
    pub s: Vec<T>,
    /// Right singular vectors, `[cols, k]` (`Vh^T`: row `j` of `Vh` is column `j` here).
    pub v: Mat<T>,
}

/// Full thin SVD of `m`, truncated to the top `k` (`torch.linalg.svd(..., full_matrices=False)`),
/// in `m`'s precision (`f32` or `f64`).
pub fn svd_top<T: RealField>(m: MatRef<'_, T>, k: usize, module: &str) -> Result<TruncatedSvd<T>> {
    let svd = m.thin_svd().map_err(|e| Error::LinAlg {
        module: module.into(),
        message: format!("SVD did not converge: {e:?}"),
    })?;
    let s = svd.S().column_vector();
    // faer returns singular values in non-increasing order; keep the order explicit anyway
    // (a stable sort, so ties keep faer's order).
    let mut order: Vec<usize> = (0..s.nrows()).collect();
    order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap_or(std::cmp::Ordering::Equal));
    order.truncate(k);
    Ok(TruncatedSvd {
        u: Mat::from_fn(m.nrows(), order.len(), |i, j| {
            svd.U()[(i, order[j])].clone()
        }),
        s: order.iter().map(|&i| s[i].clone()).collect(),
        v: Mat::from_fn(m.ncols(), order.len(), |i, j| {
            svd.V()[(i, order[j])].clone()
        }),
    })
}

/// Moore-Penrose pseudo-inverse `V diag(1/s) U^T` of `m` through its thin SVD, singular values
/// `<= eps` (absolute) counting as zero, as nalgebra's `pseudo_inverse(eps)`. An invertible,
/// well-separated-from-`eps` matrix gets its inverse. Errors only if the SVD does not converge.
pub fn pinv(m: MatRef<'_, f64>, eps: f64, module: &str) -> Result<Mat<f64>> {
    let svd = m.thin_svd().map_err(|e| Error::LinAlg {
        module: module.into(),
        message: format!("SVD did not converge: {e:?}"),
    })?;
    let s = svd.S().column_vector();
    let inv: Vec<f64> = (0..s.nrows())
        .map(|i| if s[i] > eps { 1.0 / s[i] } else { 0.0 })
        .collect();
    let v = svd.V();
    let v_scaled = Mat::<f64>::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)] * inv[j]);
    Ok(&v_scaled * svd.U().transpose())
}

/// Thin QR: `m = q r` with `q` `[rows, min]` orthonormal and `r` `[min, cols]` upper triangular.
pub fn qr_thin(m: MatRef<'_, f32>) -> (Mat<f32>, Mat<f32>) {
    let qr = m.qr();
    (qr.compute_thin_Q(), qr.thin_R().to_owned())
}

/// PyTorch's `torch.svd_lowrank(m, q=k, niter)` (Halko et al.): a Gaussian sketch refined by
/// `niter` subspace iterations, then an exact SVD of the small projected matrix. The sketch
/// comes from Burn's random generator on `device` (seed it with `B::seed`).
pub fn svd_lowrank<B: Backend>(
    m: MatRef<'_, f32>,
    k: usize,
    niter: usize,
    device: &B::Device,
    module: &str,
) -> Result<TruncatedSvd> {
    // The tall orientation has min(rows, cols) columns.
    let tall_cols = m.nrows().min(m.ncols());
    let sketch = to_mat(Tensor::<B, 2>::random(
        [tall_cols, k],
        Distribution::Normal(0.0, 1.0),
        device,
    ));
    svd_lowrank_sketch(m, k, niter, sketch, module)
}

/// [`svd_lowrank`] with a given Gaussian sketch `[min(rows, cols), k]`.
pub fn svd_lowrank_sketch(
    m: MatRef<'_, f32>,
    k: usize,
    niter: usize,
    sketch: Mat<f32>,
    module: &str,
) -> Result<TruncatedSvd> {
    // Work on the tall orientation, as torch does.
    let transposed = m.nrows() < m.ncols();
    let a: Mat<f32> = if transposed {
        m.transpose().to_owned()
    } else {
        m.to_owned()
    };
    let orth = |x: Mat<f32>| qr_thin(x.as_ref()).0;
    let mut q = orth(&a * &sketch);
    for _ in 0..niter {
        q = orth(a.transpose() * &q);
        q = orth(&a * &q);
    }
    let small = q.transpose() * &a;
    let svd = svd_top(small.as_ref(), k, module)?;
    let u = &q * &svd.u;
    Ok(if transposed {
        TruncatedSvd {
            u: svd.v,
            s: svd.s,
            v: u,
        }
    } else {
        TruncatedSvd {
            u,
            s: svd.s,
            v: svd.v,
        }
    })
}

/// A `[rows, cols]` matrix of standard normal samples from a seeded generator (Box-Muller), for
/// decompositions that must be reproducible run to run (EVA reseeds every step, as PEFT does).
pub fn seeded_normal(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next = move || {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    Mat::from_fn(rows, cols, |_, _| next())
}
