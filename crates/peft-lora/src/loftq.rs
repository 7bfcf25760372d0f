//! LoftQ (`init_lora_weights = "loftq"`): quantize the frozen base to NF4 and start the adapter
//! at a rank-r approximation of the quantization error, alternating the two `loftq_iter` times
//! (PEFT's `peft.utils.loftq_utils.loftq_init`).
//!
//! ```text
//! res = W
//! repeat loftq_iter times:
//!     Q = nf4(res);  L, R = rank-r SVD of (W - dequant(Q));  res = W - L R   (not after the last)
//! base <- Q (kept in NF4),  lora_B <- L = U_r sqrt(S_r),  lora_A <- R = sqrt(S_r) Vh_r
//! ```
//!
//! As in PEFT, `L R` approximates `W - dequant(Q)` with no regard to the adapter's scaling: the
//! initial model reproduces `W` best when `scaling = 1` (`lora_alpha = r`); with another scaling
//! the adapter starts at `scaling * L R`.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use faer::Mat;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::LoftQConfig;
use crate::error::{Error, Result};
use crate::layer::LoraLinear;
use crate::linalg::{qr_thin, svd_top, TruncatedSvd};
use crate::nf4::Nf4Tensor;

/// What LoftQ produces for one matrix, in PyTorch layout.
#[derive(Debug, Clone)]
pub struct LoftQFactors {
    /// The quantized base.
    pub q: Nf4Tensor,
    /// `lora_A` `[r, in]` (= `R`).
    pub lora_a: Vec<f32>,
    /// `lora_B` `[out, r]` (= `L`).
    pub lora_b: Vec<f32>,
    /// The rank r.
    pub rank: usize,
}

/// Matrices with `min(out, in)` up to this get an exact SVD (as PEFT); larger ones a randomized
/// range finder with power iterations (a full SVD of a 4096 x 14336 matrix takes minutes here).
pub(crate) const EXACT_SVD_MAX_DIM: usize = 1024;

/// LoftQ of one weight `w` (row-major, PyTorch layout `shape = [out, in]`) at rank `r`.
/// `module` names the layer in errors.
pub fn loftq_factors(
    w: &[f32],
    shape: [usize; 2],
    r: usize,
    cfg: &LoftQConfig,
    module: &str,
) -> Result<LoftQFactors> {
    cfg.validate()?;
    let [m, n] = shape;
    if r > m.min(n) {
        return Err(Error::config(
            "r",
            format!(
                "LoftQ at `{module}`: rank {r} exceeds min(out, in) = {}",
                m.min(n)
            ),
        ));
    }
    let mut res = w.to_vec();
    let mut i = 0;
    loop {
        let q = Nf4Tensor::quantize(&res, shape);
        let dq = q.dequantize();
        let resid: Vec<f32> = w.iter().zip(&dq).map(|(a, b)| a - b).collect();
        let (l, rr) = low_rank(&resid, m, n, r, module)?;
        i += 1;
        if i == cfg.loftq_iter {
            return Ok(LoftQFactors {
                q,
                lora_a: rr,
                lora_b: l,
                rank: r,
            });
        }
        // res = W - L R
        let lr = matmul(&l, &rr, m, r, n);
        res = w.iter().zip(&lr).map(|(a, b)| a - b).collect();
    }
}

/// Runs LoftQ on one layer: its base becomes the NF4 `Q` and the returned `(A [in, r],
/// B [r, out])` (Burn layout) start the adapter.
pub fn loftq_init_layer<B: Backend>(
    layer: &mut LoraLinear<B>,
    cfg: &LoftQConfig,
    r: usize,
    module: &str,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    if layer.is_nf4() {
        return Err(Error::Unsupported {
            field: "init_lora_weights".into(),
            value: "\"loftq\"".into(),
            reason: format!(
                "`{module}` is already stored in NF4; LoftQ quantizes the full-precision base itself, so load the model without 4-bit quantization"
            ),
        });
    }
    if let Some(name) = layer.state.merged.first() {
        return Err(Error::Merge {
            adapter: name.clone(),
            module: module.into(),
            reason: "unmerge before adding a LoftQ adapter (LoftQ requantizes the base)".into(),
        });
    }
    let (d_in, d_out) = (layer.d_in(), layer.d_out());
    let device = layer.weight.device();
    let w = layer
        .weight
        .val()
        .transpose()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor data");
    let f = loftq_factors(&w, [d_out, d_in], r, cfg, module)?;
    drop(w);
    layer.set_nf4_base(&f.q);
    // Burn layout: A = R^T [in, r], B = L^T [r, out].
    let a = Tensor::<B, 2>::from_data(TensorData::new(f.lora_a, [r, d_in]), &device).transpose();
    let b = Tensor::<B, 2>::from_data(TensorData::new(f.lora_b, [d_out, r]), &device).transpose();
    Ok((a, b))
}

/// `L = U_r sqrt(S_r)` `[m, r]` and `R = sqrt(S_r) Vh_r` `[r, n]` of a row-major `[m, n]` matrix
/// (PEFT's `_low_rank_decomposition`), both row-major f32.
fn low_rank(a: &[f32], m: usize, n: usize, r: usize, module: &str) -> Result<(Vec<f32>, Vec<f32>)> {
    low_rank_with(a, m, n, r, m.min(n) <= EXACT_SVD_MAX_DIM, module)
}

fn low_rank_with(
    a: &[f32],
    m: usize,
    n: usize,
    r: usize,
    exact: bool,
    module: &str,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let TruncatedSvd { u, s, v } = if exact {
        let mat = Mat::<f64>::from_fn(m, n, |i, j| a[i * n + j] as f64);
        svd_top(mat.as_ref(), r, module)?
    } else {
        randomized_svd(a, m, n, r, module)?
    };
    let mut l = vec![0f32; m * r];
    let mut rr = vec![0f32; r * n];
    for k in 0..r {
        let sq = s[k].max(0.0).sqrt();
        for i in 0..m {
            l[i * r + k] = (u[(i, k)] * sq) as f32;
        }
        for j in 0..n {
            rr[k * n + j] = (sq * v[(j, k)]) as f32;
        }
    }
    Ok((l, rr))
}

/// Power iterations of the randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4).
const POWER_ITERS: usize = 4;

/// Top-`r` SVD from a randomized range finder with oversampling and power iterations.
fn randomized_svd(
    a: &[f32],
    m: usize,
    n: usize,
    r: usize,
    module: &str,
) -> Result<TruncatedSvd<f64>> {
    let k = (2 * r).max(r + 8).min(m.min(n));
    let mat = Mat::<f32>::from_fn(m, n, |i, j| a[i * n + j]);
    let mut rng = StdRng::seed_from_u64(0x0001_0f70);
    // The sketch is drawn column by column (the order the generator has always been used in).
    let draws: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let omega = Mat::<f32>::from_fn(n, k, |i, j| draws[j * n + i]);
    let mut q = qr_thin((&mat * &omega).as_ref()).0;
    for _ in 0..POWER_ITERS {
        let z = qr_thin((mat.transpose() * &q).as_ref()).0;
        q = qr_thin((&mat * &z).as_ref()).0;
    }
    let small = q.transpose() * &mat; // [k, n]
    let small = Mat::<f64>::from_fn(small.nrows(), n, |i, j| small[(i, j)] as f64);
    let svd = svd_top(small.as_ref(), r, module)?;
    let q = Mat::<f64>::from_fn(m, q.ncols(), |i, j| q[(i, j)] as f64);
    Ok(TruncatedSvd {
        u: &q * &svd.u,
        s: svd.s,
        v: svd.v,
    })
}

/// Row-major `[m, k] x [k, n]`, in f64.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let am = Mat::<f64>::from_fn(m, k, |i, j| a[i * k + j] as f64);
    let bm = Mat::<f64>::from_fn(k, n, |i, j| b[i * n + j] as f64);
    let c = &am * &bm;
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            out.push(c[(i, j)] as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randomized_svd_finds_the_exact_top_r_product() {
        // A decaying spectrum plus noise, 300 x 200, rank 6.
        let (m, n, r) = (300, 200, 6);
        let mut rng = StdRng::seed_from_u64(3);
        let mut a = vec![0f32; m * n];
        for k in 0..12 {
            let sigma = 2f32.powi(-k);
            let u: Vec<f32> = (0..m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            for i in 0..m {
                for j in 0..n {
                    a[i * n + j] += sigma * u[i] * v[j];
                }
            }
        }
        let prod = |(l, rr): (Vec<f32>, Vec<f32>)| matmul(&l, &rr, m, r, n);
        let exact = prod(low_rank_with(&a, m, n, r, true, "t").unwrap());
        let approx = prod(low_rank_with(&a, m, n, r, false, "t").unwrap());
        let scale = exact.iter().fold(0f32, |x, v| x.max(v.abs()));
        let err = exact
            .iter()
            .zip(&approx)
            .fold(0f32, |x, (p, q)| x.max((p - q).abs()));
        assert!(
            err / scale < 1e-4,
            "randomized vs exact top-{r}: rel err {}",
            err / scale
        );
    }
}
