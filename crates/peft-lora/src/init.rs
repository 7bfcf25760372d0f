//! `init_lora_weights`: how A and B start.

use burn::tensor::{backend::Backend, Distribution, Tensor};

use crate::config::InitLoraWeights;
use crate::error::{Error, Result};

/// A parsed `init_lora_weights` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMethod {
    /// `true`: A Kaiming-uniform (a = sqrt 5, nn.Linear's default), B = 0: identity at start.
    Default,
    /// `false`: A Kaiming-uniform and B random too (debugging: the adapter is not identity).
    Random,
    /// `"gaussian"`: A ~ N(0, (1/r)^2), B = 0.
    Gaussian,
    /// `"loftq"`: the base is quantized to NF4 and A, B start at a rank-r SVD of the
    /// quantization error; needs the layer, so [`crate::PeftModel::add_adapter`] runs
    /// [`crate::loftq::init_layer`] instead of [`InitMethod::init`].
    LoftQ,
}

impl InitMethod {
    /// Parses the config value; methods not implemented are a clear error.
    pub fn parse(v: &InitLoraWeights) -> Result<Self> {
        match v {
            InitLoraWeights::Bool(true) => Ok(InitMethod::Default),
            InitLoraWeights::Bool(false) => Ok(InitMethod::Random),
            InitLoraWeights::Method(m) if m == "gaussian" => Ok(InitMethod::Gaussian),
            InitLoraWeights::Method(m) if m == "loftq" => Ok(InitMethod::LoftQ),
            InitLoraWeights::Method(m) => {
                let known = m == "pissa"
                    || m.starts_with("pissa_niter_")
                    || ["olora", "eva", "orthogonal", "corda"].contains(&m.as_str());
                if known {
                    Err(Error::Unsupported {
                        field: "init_lora_weights".into(),
                        value: format!("\"{m}\""),
                        reason: "this initialisation is not implemented yet".into(),
                    })
                } else {
                    Err(Error::config(
                        "init_lora_weights",
                        format!(
                            "unknown method \"{m}\"; expected true, false, \"gaussian\", \"orthogonal\", \"pissa\", \"pissa_niter_N\", \"olora\", \"eva\" or \"loftq\""
                        ),
                    ))
                }
            }
        }
    }

    /// A in Burn layout `[in, r]` and B in Burn layout `[r, out]`.
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
            // LoftQ's factors depend on the weight (`loftq::init_layer`); without it, the default.
            InitMethod::Default | InitMethod::LoftQ => {
                (kaiming(), Tensor::zeros([r, d_out], device))
            }
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
        }
    }
}
