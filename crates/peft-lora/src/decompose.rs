//! Inits that move the principal part of the frozen weight into the adapter: PiSSA (SVD) and
//! OLoRA (QR). Both return the residual base `W - s * B A`, so the model's output at step 0 is
//! the base model's.
//!
//! Everything is computed in PyTorch's `[out, in]` orientation, as PEFT does (QR is not
//! transpose-symmetric), and converted to Burn's `[in, out]` layout at the end.

use burn::tensor::{backend::Backend, Tensor};
use faer::Mat;

use crate::error::{Error, Result};
use crate::linalg::{from_mat, qr_thin, svd_lowrank, svd_top, to_mat};

/// A, B (Burn layout `[in, r]`, `[r, out]`) and the residual base weight (`[in, out]`).
pub struct Decomposed<B: Backend> {
    /// A, `[in, r]`.
    pub a: Tensor<B, 2>,
    /// B, `[r, out]`.
    pub b: Tensor<B, 2>,
    /// `W - scaling * A B`, the new frozen weight, `[in, out]`.
    pub residual: Tensor<B, 2>,
}

fn check_rank(weight_dims: [usize; 2], r: usize, module: &str, method: &str) -> Result<()> {
    let k = weight_dims[0].min(weight_dims[1]);
    if r > k {
        return Err(Error::LinAlg {
            module: module.into(),
            message: format!(
                "{method} needs r <= min(in, out) = {k}, but r = {r} (weight {}x{})",
                weight_dims[1], weight_dims[0]
            ),
        });
    }
    Ok(())
}

/// PiSSA: `W = U S V^T`; `S_r /= scaling`; `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T`.
/// `niter = None` uses the full SVD (`"pissa"`), `Some(n)` PyTorch's randomized `svd_lowrank`
/// with `n` subspace iterations (`"pissa_niter_n"`).
pub fn pissa<B: Backend>(
    weight: Tensor<B, 2>,
    r: usize,
    scaling: f64,
    niter: Option<usize>,
    module: &str,
) -> Result<Decomposed<B>> {
    check_rank(weight.dims(), r, module, "PiSSA")?;
    let device = weight.device();
    let w = to_mat(weight.transpose()); // [out, in]
    let svd = match niter {
        None => svd_top(w.as_ref(), r, module)?,
        Some(n) => svd_lowrank::<B>(w.as_ref(), r, n, &device, module)?,
    };
    let root: Vec<f32> = svd
        .s
        .iter()
        .map(|s| (*s as f64 / scaling).sqrt() as f32)
        .collect();
    // PEFT: lora_A [r, in] = diag(sqrt S) V_r^T  -> Burn A [in, r] = V_r diag(sqrt S)
    let a = Mat::from_fn(svd.v.nrows(), r, |i, j| svd.v[(i, j)] * root[j]);
    // PEFT: lora_B [out, r] = U_r diag(sqrt S)   -> Burn B [r, out] = diag(sqrt S) U_r^T
    let b = Mat::from_fn(r, svd.u.nrows(), |i, j| svd.u[(j, i)] * root[i]);
    finish(&w, a, b, scaling, &device)
}

/// OLoRA: thin QR `W = Q R` of the float32 weight; `B = Q[:, :r]`, `A = R[:r]`.
pub fn olora<B: Backend>(
    weight: Tensor<B, 2>,
    r: usize,
    scaling: f64,
    module: &str,
) -> Result<Decomposed<B>> {
    check_rank(weight.dims(), r, module, "OLoRA")?;
    let device = weight.device();
    let w = to_mat(weight.transpose()); // [out, in]
    let (q, rr) = qr_thin(w.as_ref());
    // PEFT: lora_A [r, in] = R[:r] -> Burn [in, r]; lora_B [out, r] = Q[:, :r] -> Burn [r, out]
    let a = Mat::from_fn(rr.ncols(), r, |i, j| rr[(j, i)]);
    let b = Mat::from_fn(r, q.nrows(), |i, j| q[(j, i)]);
    finish(&w, a, b, scaling, &device)
}

/// The residual `W - s * (A B)^T` in f32 on the host (as PEFT does before casting back), then
/// everything moved to the device in Burn layout.
fn finish<B: Backend>(
    w: &Mat<f32>,
    a: Mat<f32>,
    b: Mat<f32>,
    scaling: f64,
    device: &B::Device,
) -> Result<Decomposed<B>> {
    let delta_t = &a * &b; // [in, out]
    let s = scaling as f32;
    let residual = Mat::from_fn(w.ncols(), w.nrows(), |i, j| w[(j, i)] - s * delta_t[(i, j)]);
    Ok(Decomposed {
        a: from_mat(a.as_ref(), device),
        b: from_mat(b.as_ref(), device),
        residual: from_mat(residual.as_ref(), device),
    })
}
