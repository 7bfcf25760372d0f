//! RMSNorm as transformers' `LlamaRMSNorm`: statistics in f32 whatever the model's float type.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, FloatDType, Tensor};

use crate::error::Result;
use crate::weights::VarBuilder;

/// `weight * (x / sqrt(mean(x^2) + eps))`, the normalisation computed in f32.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `[hidden]` (frozen).
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// From a checkpoint (`vb` at e.g. `model.layers.0.input_layernorm`).
    pub fn load(vb: &VarBuilder<'_, B>, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.frozen("weight", [size])?,
            eps,
        })
    }

    /// A fresh norm (weight = 1).
    pub fn ones(size: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([size], device)).set_require_grad(false),
            eps,
        }
    }

    /// The residual sum `x + delta` and its norm: [`Self::forward`] of the sum, the two as one
    /// kernel where the backend has it (CUDA inference).
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` twice -> the sum and its norm, the same shape.
    pub fn forward_residual(
        &self,
        x: Tensor<B, 3>,
        delta: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if let Some(pair) = crate::ops::add_rms_norm(&x, &delta, &self.weight.val(), self.eps) {
            return pair;
        }
        let sum = x + delta;
        (sum.clone(), self.forward(sum))
    }

    /// # Shapes
    /// `[batch, seq, hidden]` -> the same.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // On CUDA: one kernel each way (`crate::ops::rms_norm`).
        if let Some(y) = crate::ops::rms_norm(&x, &self.weight.val(), self.eps) {
            return y;
        }
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let var = x.clone().square().mean_dim(2);
        let normed = (x * (var + self.eps).sqrt().recip()).cast(dtype);
        normed
            * self
                .weight
                .val()
                .unsqueeze_dim::<2>(0)
                .unsqueeze_dim::<3>(0)
    }
}
