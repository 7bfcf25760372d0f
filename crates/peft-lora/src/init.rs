//! `init_lora_weights`: how A and B start, and (PiSSA, OLoRA) what the frozen base becomes.

use burn::tensor::{backend::Backend, Distribution, Tensor};
use faer::Mat;

use crate::config::InitLoraWeights;
use crate::decompose::{olora, pissa};
use crate::error::{Error, Result};
use crate::linalg::{from_mat, qr_thin, to_mat};

/// A parsed `init_lora_weights` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMethod {
    /// `true`: A Kaiming-uniform (a = sqrt 5, nn.Linear's default), B = 0: identity at start.
    Default,
    /// `false`: A Kaiming-uniform and B random too (debugging: the adapter is not identity).
    Random,
    /// `"gaussian"`: A ~ N(0, (1/r)^2), B = 0.
    Gaussian,
    /// `"orthogonal"`: A and B from the odd and even rows of a random orthogonal `r x r`
    /// matrix (so `B A = 0`); r must be even.
    Orthogonal,
    /// `"pissa"` (`niter = None`, full SVD) or `"pissa_niter_N"` (randomized SVD, N iterations):
    /// the top-r singular part of W moves into the adapter.
    Pissa {
        /// Subspace iterations of the randomized SVD; `None` = full SVD.
        niter: Option<usize>,
    },
    /// `"olora"`: the first r columns of W's QR move into the adapter.
    Olora,
    /// `"eva"`: B = 0 and A as `true` until [`crate::eva`] replaces A from activations.
    Eva,
    /// `"loftq"`: the base is quantized to NF4 and A, B start at a rank-r SVD of the
    /// quantization error; needs the layer, so [`crate::PeftModel::add_adapter`] runs
    /// [`crate::loftq::init_layer`] instead of [`InitMethod::init`].
    LoftQ,
}

/// What an init produces for one layer (Burn layout).
pub struct LayerInit<B: Backend> {
    /// A, `[in, r]`.
    pub a: Tensor<B, 2>,
    /// B, `[r, out]`.
    pub b: Tensor<B, 2>,
    /// A new frozen base weight `[in, out]` (PiSSA, OLoRA), or `None` to keep it.
    pub residual: Option<Tensor<B, 2>>,
}

impl InitMethod {
    /// Parses the config value; unknown or unimplemented methods are a clear error.
    pub fn parse(v: &InitLoraWeights) -> Result<Self> {
        let m = match v {
            InitLoraWeights::Bool(true) => return Ok(InitMethod::Default),
            InitLoraWeights::Bool(false) => return Ok(InitMethod::Random),
            InitLoraWeights::Method(m) => m.as_str(),
        };
        match m {
            "gaussian" => Ok(InitMethod::Gaussian),
            "orthogonal" => Ok(InitMethod::Orthogonal),
            "pissa" => Ok(InitMethod::Pissa { niter: None }),
            "olora" => Ok(InitMethod::Olora),
            "eva" => Ok(InitMethod::Eva),
            "loftq" => Ok(InitMethod::LoftQ),
            _ if m.starts_with("pissa_niter_") => {
                let n = &m["pissa_niter_".len()..];
                n.parse::<usize>()
                    .map(|n| InitMethod::Pissa { niter: Some(n) })
                    .map_err(|_| {
                        Error::config(
                            "init_lora_weights",
                            format!("\"{m}\": expected \"pissa_niter_<number of iterations>\", e.g. \"pissa_niter_16\""),
                        )
                    })
            }
            "corda" | "lora_ga" | "mica" => Err(Error::Unsupported {
                field: "init_lora_weights".into(),
                value: format!("\"{m}\""),
                reason: "this initialisation is not implemented yet".into(),
            }),
            _ => Err(Error::config(
                "init_lora_weights",
                format!(
                    "unknown method \"{m}\"; expected true, false, \"gaussian\", \"orthogonal\", \"pissa\", \"pissa_niter_N\", \"olora\", \"eva\" or \"loftq\""
                ),
            )),
        }
    }

    /// Checks what can be checked before touching any layer (orthogonal needs an even rank).
    pub fn check_rank(self, r: usize, module: &str) -> Result<()> {
        if self == InitMethod::Orthogonal && r % 2 != 0 {
            return Err(Error::config(
                "init_lora_weights",
                format!("\"orthogonal\" needs an even rank, but `{module}` has r = {r}"),
            ));
        }
        Ok(())
    }

    /// Initialises adapter factors for `layer` (rank `r`, `scaling`); PiSSA and OLoRA read its
    /// (dequantized) frozen weight, the others only its shape.
    pub fn init_layer<B: Backend>(
        self,
        layer: &crate::layer::LoraLinear<B>,
        r: usize,
        scaling: f64,
        module: &str,
    ) -> Result<LayerInit<B>> {
        let weight = || layer.base_weight();
        self.check_rank(r, module)?;
        let (d_in, d_out) = (layer.d_in(), layer.d_out());
        let device = layer.weight.device();
        let plain = |(a, b)| LayerInit {
            a,
            b,
            residual: None,
        };
        Ok(match self {
            InitMethod::Pissa { niter } => {
                let d = pissa(weight(), r, scaling, niter, module)?;
                LayerInit {
                    a: d.a,
                    b: d.b,
                    residual: Some(d.residual),
                }
            }
            InitMethod::Olora => {
                let d = olora(weight(), r, scaling, module)?;
                LayerInit {
                    a: d.a,
                    b: d.b,
                    residual: Some(d.residual),
                }
            }
            InitMethod::Orthogonal => plain(orthogonal::<B>(d_in, d_out, r, &device)),
            other => plain(other.init::<B>(d_in, d_out, r, &device)),
        })
    }

    /// A in Burn layout `[in, r]` and B in Burn layout `[r, out]` for the inits that do not
    /// look at the base weight (`true`, `false`, `"gaussian"`, `"eva"` before EVA runs).
    pub fn init<B: Backend>(
        self,
        d_in: usize,
        d_out: usize,
        r: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        // kaiming_uniform_(a=sqrt(5)) on a [r, in] tensor: bound = 1 / sqrt(in).
        let bound = 1.0 / (d_in as f64).sqrt();
        let kaiming = || Tensor::random([d_in, r], Distribution::Uniform(-bound, bound), device);
        match self {
            InitMethod::Gaussian => (
                Tensor::random([d_in, r], Distribution::Normal(0.0, 1.0 / r as f64), device),
                Tensor::zeros([r, d_out], device),
            ),
            InitMethod::Random => {
                let bound_b = 1.0 / (r as f64).sqrt();
                (
                    kaiming(),
                    Tensor::random([r, d_out], Distribution::Uniform(-bound_b, bound_b), device),
                )
            }
            _ => (kaiming(), Tensor::zeros([r, d_out], device)),
        }
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
