//! Dense decompositions on the host, through [faer](https://docs.rs/faer): thin SVD, thin QR and
//! PyTorch's randomized `svd_lowrank`.
//!
//! faer was chosen over nalgebra for these because its blocked, multi-threaded SVD is ~30x
//! faster on Llama-sized matrices (4096 x 4096 in seconds instead of minutes), which is what
//! PiSSA, OLoRA and EVA decompose.

use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use faer::{Mat, MatRef};

use crate::error::{Error, Result};
use crate::st::to_host;

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

/// The leading `k` singular triplets: `m ~ u diag(s) v^T`, singular values descending.
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// Left singular vectors, `[rows, k]`.
    pub u: Mat<f32>,
    /// Singular values, descending.
    pub s: Vec<f32>,
    /// Right singular vectors, `[cols, k]`.
    pub v: Mat<f32>,
}

/// Full thin SVD of `m`, truncated to the top `k` (`torch.linalg.svd(..., full_matrices=False)`).
pub fn svd_top(m: MatRef<'_, f32>, k: usize, module: &str) -> Result<TruncatedSvd> {
    let svd = m.thin_svd().map_err(|e| Error::LinAlg {
        module: module.into(),
        message: format!("SVD did not converge: {e:?}"),
    })?;
    let s = svd.S().column_vector();
    // faer returns singular values in non-increasing order; keep the order explicit anyway.
    let mut order: Vec<usize> = (0..s.nrows()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    order.truncate(k);
    Ok(TruncatedSvd {
        u: Mat::from_fn(m.nrows(), order.len(), |i, j| svd.U()[(i, order[j])]),
        s: order.iter().map(|&i| s[i]).collect(),
        v: Mat::from_fn(m.ncols(), order.len(), |i, j| svd.V()[(i, order[j])]),
    })
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
