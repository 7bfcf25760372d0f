//! One adapter on one layer: its hyper-parameters ([`AdapterMeta`]), its tensors
//! ([`LoraAdapter`]), and which adapters of a layer run ([`LayerState`]).

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use crate::config::LoraConfig;
use crate::fused;
use crate::host::HostTensor;
use crate::target::rank_alpha;

/// Which variant an adapter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantKind {
    /// `y = base(x) + s * B A x`.
    Lora,
    /// DoRA: a learned magnitude per output row over the detached norm of `W + s B A`.
    Dora,
    /// aLoRA: plain LoRA applied only from the last invocation-token sequence of each row on
    /// (the positions [`crate::LoraCtx::alora_offsets`] selects); never merged.
    Alora,
}

impl VariantKind {
    /// The variant a (validated) config asks for.
    pub fn from_config(cfg: &LoraConfig) -> Self {
        if cfg.alora_invocation_tokens.is_some() {
            VariantKind::Alora
        } else if cfg.use_dora {
            VariantKind::Dora
        } else {
            VariantKind::Lora
        }
    }
}

/// Hyper-parameters of one adapter on one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMeta {
    /// Adapter name (`"default"` unless given).
    pub name: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scaling: f64,
    /// Input dropout probability (training only).
    pub dropout: f64,
    /// Which variant computes the forward and the merge.
    pub variant: VariantKind,
    /// aLoRA: the token ids that switch the adapter on (`Some` exactly for
    /// [`VariantKind::Alora`]).
    pub alora_invocation_tokens: Option<Vec<u32>>,
}

impl AdapterMeta {
    /// Rank, alpha, scaling, dropout and variant of adapter `name` at module `path`, as `cfg`
    /// gives them (after `rank_pattern` / `alpha_pattern`).
    pub fn from_config(cfg: &LoraConfig, name: &str, path: &str) -> Self {
        let (r, alpha) = rank_alpha(cfg, path);
        AdapterMeta {
            name: name.into(),
            r,
            alpha,
            scaling: cfg.scaling_for(r, alpha),
            dropout: cfg.lora_dropout,
            variant: VariantKind::from_config(cfg),
            alora_invocation_tokens: cfg.alora_invocation_tokens.clone(),
        }
    }
}

/// One adapter's trainable tensors on one layer, in Burn layout.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// A, `[in, r]` (PEFT's `lora_A.weight` is its transpose, `[r, in]`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// B, `[r, out]` (PEFT's `lora_B.weight` is `[out, r]`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// `lora_bias`: a bias on B, `[out]`.
    pub lora_b_bias: Option<Param<Tensor<B, 1>>>,
    /// DoRA magnitude, `[out]` (`lora_magnitude_vector`).
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// Name, rank, scaling, variant.
    #[module(skip)]
    pub meta: AdapterMeta,
    /// DoRA: the per-output scale applied at merge time, kept for an exact unmerge.
    pub merge_scale: Option<Tensor<B, 1>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// `s * (x A) B (+ s * lora_bias)`: the low-rank term for input `x` `[n, in]`.
    pub fn lora_term(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.lora_a.val()).matmul(self.lora_b.val());
        let y = match &self.lora_b_bias {
            Some(b) => y + b.val().unsqueeze_dim::<2>(0),
            None => y,
        };
        y * self.meta.scaling
    }

    /// `s * A B`, the weight delta in Burn layout `[in, out]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.meta.scaling
    }

    /// `s * A B` where no gradient is wanted (merges, DoRA's detached norm), untracked by
    /// autodiff: the fused cuBLASLt GEMM on CUDA backends, the same values as
    /// [`Self::delta_weight`] elsewhere.
    pub(crate) fn delta_weight_nograd(&self) -> Tensor<B, 2> {
        let (a, b) = (untracked(self.lora_a.val()), untracked(self.lora_b.val()));
        if let Some(d) = fused::frozen_linear(&a, &b, None) {
            return d * self.meta.scaling;
        }
        a.matmul(b) * self.meta.scaling
    }

    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
}

/// Which adapters run, and which are merged into the base weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerState {
    /// Adapters applied in the forward (in order).
    pub active: Vec<String>,
    /// When true the layer computes the base alone.
    pub disabled: bool,
    /// Adapters currently merged into `weight`.
    pub merged: Vec<String>,
    /// A forward hook (EVA): when set, every forward copies its input `[n, in]` here.
    pub capture: Option<InputCapture>,
    /// The layer's module path, when known ([`crate::PeftModel`] sets it), for error messages.
    pub module: Option<String>,
    /// Train / eval mode, which decides LoRA dropout: `Some(true)` applies it, `Some(false)`
    /// never does, `None` (the default) applies it on autodiff backends only.
    /// [`crate::PeftModel::set_training`] sets it on every layer.
    pub training: Option<bool>,
}

/// Collects the inputs a layer sees (PyTorch's forward hook, as EVA uses it).
#[derive(Clone, Default)]
pub struct InputCapture(Arc<Mutex<Vec<HostTensor>>>);

impl InputCapture {
    /// Takes every input recorded since the last call.
    pub fn take(&self) -> Vec<HostTensor> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records one input.
    pub(crate) fn push(&self, x: HostTensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(x);
    }
}

impl PartialEq for InputCapture {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for InputCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputCapture")
    }
}

/// `t` cut from the autodiff graph and not requiring a gradient. (Burn's `detach` keeps a
/// parameter's `require_grad`: the detached tensor is a new leaf that autodiff still tracks, and
/// the fused ops decline a weight that requires a gradient.)
pub(crate) fn untracked<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.detach().set_require_grad(false)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tensor};

    use super::AdapterMeta;
    use crate::{LoraConfig, LoraLinear};

    type B = Autodiff<NdArray>;

    #[test]
    fn the_no_gradient_delta_is_untracked_and_equals_the_delta() {
        // A detached parameter still requires a gradient in Burn: the delta (and DoRA's norm
        // built from it) would be a tracked leaf, and the fused GEMM would decline it.
        let device = Default::default();
        let mut cfg = LoraConfig::new(4, 8.0, &["proj"]);
        cfg.use_dora = true;
        let layer = LoraLinear::<B>::random(12, 10, false, &device);
        let meta = AdapterMeta::from_config(&cfg, "default", "proj");
        let a = Tensor::random([12, 4], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::random([4, 10], Distribution::Normal(0.0, 1.0), &device);
        let adapter = layer.new_adapter(meta, a, b, false);
        let a = adapter.lora_a.val();
        assert!(a.is_require_grad());
        assert!(
            a.clone().detach().is_require_grad(),
            "Burn's detach keeps require_grad (the reason for `untracked`)"
        );
        assert!(!super::untracked(a).is_require_grad());
        let nograd = adapter.delta_weight_nograd();
        let diff = (nograd - adapter.delta_weight()).abs().max().into_scalar();
        assert!(diff < 1e-6, "delta differs by {diff}");
        let magnitude = adapter.magnitude.as_ref().expect("DoRA magnitude").val();
        assert!(magnitude.is_require_grad(), "the magnitude trains");
    }
}
