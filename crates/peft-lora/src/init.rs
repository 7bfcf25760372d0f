//! The initialisations of `init_lora_weights` ([`InitLoraWeights`]): how A and B start, and
//! (PiSSA, OLoRA) what the frozen base becomes. LoftQ and EVA have their own modules.

use burn::tensor::{backend::Backend, Distribution, Tensor};
use faer::Mat;

use crate::config::InitLoraWeights;
use crate::decompose::{olora, pissa};
use crate::error::Result;
use crate::layer::LoraLinear;
use crate::linalg::{from_mat, qr_thin, to_mat};

/// What an init produces for one layer (Burn layout).
pub struct LayerInit<B: Backend> {
    /// A, `[in, r]`.
    pub a: Tensor<B, 2>,
    /// B, `[r, out]`.
    pub b: Tensor<B, 2>,
    /// A new frozen base weight `[in, out]` (PiSSA, OLoRA), or `None` to keep it.
    pub residual: Option<Tensor<B, 2>>,
}

/// Initialises adapter factors for `layer` (rank `r`, `scaling`) as `method` says; PiSSA and
/// OLoRA read its (dequantized) frozen weight, the others only its shape. LoftQ needs the layer
/// itself ([`crate::PeftModel::add_adapter`] runs it instead); here it starts as `true` does.
pub fn init_factors<B: Backend>(
    layer: &LoraLinear<B>,
    method: InitLoraWeights,
    r: usize,
    scaling: f64,
    module: &str,
) -> Result<LayerInit<B>> {
    let weight = || layer.base_weight();
    method.check_rank(r, module)?;
    let (d_in, d_out) = (layer.d_in(), layer.d_out());
    let device = layer.weight.device();
    let plain = |(a, b)| LayerInit {
        a,
        b,
        residual: None,
    };
    Ok(match method {
        InitLoraWeights::Pissa { niter } => {
            let d = pissa(weight(), r, scaling, niter, module)?;
            LayerInit {
                a: d.a,
                b: d.b,
                residual: Some(d.residual),
            }
        }
        InitLoraWeights::Olora => {
            let d = olora(weight(), r, scaling, module)?;
            LayerInit {
                a: d.a,
                b: d.b,
                residual: Some(d.residual),
            }
        }
        InitLoraWeights::Orthogonal => plain(orthogonal::<B>(d_in, d_out, r, &device)),
        other => plain(plain_factors::<B>(other, d_in, d_out, r, &device)),
    })
}

/// A in Burn layout `[in, r]` and B in Burn layout `[r, out]` for the inits that do not
/// look at the base weight (`true`, `false`, `"gaussian"`, `"eva"` before EVA runs).
fn plain_factors<B: Backend>(
    method: InitLoraWeights,
    d_in: usize,
    d_out: usize,
    r: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    // kaiming_uniform_(a=sqrt(5)) on a [r, in] tensor: bound = 1 / sqrt(in).
    let bound = 1.0 / (d_in as f64).sqrt();
    let kaiming = || Tensor::random([d_in, r], Distribution::Uniform(-bound, bound), device);
    match method {
        InitLoraWeights::Gaussian => (
            Tensor::random([d_in, r], Distribution::Normal(0.0, 1.0 / r as f64), device),
            Tensor::zeros([r, d_out], device),
        ),
        InitLoraWeights::Random => {
            let bound_b = 1.0 / (r as f64).sqrt();
            (
                kaiming(),
                Tensor::random([r, d_out], Distribution::Uniform(-bound_b, bound_b), device),
            )
        }
        _ => (kaiming(), Tensor::zeros([r, d_out], device)),
    }
}

/// PEFT's orthogonal init: `Q` from the QR of a random `r x r`; A uses Q's even-indexed rows,
/// B its odd-indexed rows, both times Gaussian matrices and divided by 10, so `B A = 0`.
fn orthogonal<B: Backend>(
    d_in: usize,
    d_out: usize,
    r: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let normal = Distribution::Normal(0.0, 1.0);
    let (q, _) = qr_thin(to_mat(Tensor::<B, 2>::random([r, r], normal, device)).as_ref());
    let half = r / 2;
    let q_odd = Mat::from_fn(half, r, |i, j| q[(2 * i, j)]);
    let q_even = Mat::from_fn(half, r, |i, j| q[(2 * i + 1, j)]);
    // PEFT: lora_A [r, in] = (randn(in, r/2) @ q_odd)^T  -> Burn A [in, r] = randn(in, r/2) @ q_odd
    let a = Tensor::<B, 2>::random([d_in, half], normal, device)
        .matmul(from_mat(q_odd.as_ref(), device));
    // PEFT: lora_B [out, r] = randn(r/2, out)^T @ q_even -> Burn B [r, out] = q_even^T @ randn(r/2, out)
    let b = from_mat(q_even.transpose(), device).matmul(Tensor::<B, 2>::random(
        [half, d_out],
        normal,
        device,
    ));
    (a / 10.0, b / 10.0)
}
