//! The variant interface: plain LoRA, DoRA and aLoRA implement it; others plug in beside them
//! without touching the plain path (PEFT's `LoraVariant`).

use burn::tensor::{backend::Backend, Tensor};

use crate::alora;
use crate::layer::{LoraAdapter, LoraCtx};

/// Which variant an adapter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantKind {
    /// `y = base(x) + s * B A x`.
    Lora,
    /// DoRA: a learned magnitude per output row over the detached norm of `W + s B A`.
    Dora,
    /// aLoRA: plain LoRA applied only from the last invocation-token sequence of each row on
    /// (the positions [`LoraCtx::alora_offsets`] selects); never merged.
    Alora,
}

/// The frozen base of a layer, as variants see it (Burn layout `[in, out]`).
pub struct Base<'a, B: Backend> {
    /// Frozen weight `[in, out]` (possibly with merged adapters in it).
    pub weight: &'a Tensor<B, 2>,
    /// Bias `[out]`.
    pub bias: Option<&'a Tensor<B, 1>>,
}

/// What a LoRA variant must provide.
pub trait LoraVariant<B: Backend>: Sync {
    /// Adds this adapter's contribution to `result` (the running layer output `[n, out]`);
    /// `x` is the (dropped-out) input `[n, in]`, `base_out` the frozen layer's output.
    fn forward(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: Tensor<B, 2>,
        base_out: &Tensor<B, 2>,
        result: Tensor<B, 2>,
    ) -> Tensor<B, 2>;

    /// The merged weight `[in, out]`, and the per-output scale to keep for an exact unmerge.
    fn merge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 1>>);

    /// Undoes [`LoraVariant::merge`].
    fn unmerge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
        kept: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2>;

    /// The flat positions (`row * seq + t` of the `[batch * seq, in]` input) this variant acts
    /// on in this call, ascending, or `None` for every position. Only aLoRA restricts them; at
    /// the other positions the layer outputs exactly the base.
    fn positions(&self, _ctx: &LoraCtx, _batch: usize, _seq: usize) -> Option<Vec<usize>> {
        None
    }

    /// Why this variant cannot be merged into the base weight, if it cannot (checked before
    /// [`LoraVariant::merge`] is called).
    fn merge_refusal(&self) -> Option<&'static str> {
        None
    }
}

/// Plain LoRA (and rsLoRA, which differs only in scaling).
pub struct PlainLora;

impl<B: Backend> LoraVariant<B> for PlainLora {
    fn forward(
        &self,
        adapter: &LoraAdapter<B>,
        _base: &Base<'_, B>,
        x: Tensor<B, 2>,
        _base_out: &Tensor<B, 2>,
        result: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        result + adapter.lora_term(x)
    }

    fn merge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        (weight + adapter.delta_weight_nograd(), None)
    }

    fn unmerge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
        _kept: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        weight - adapter.delta_weight_nograd()
    }
}

/// DoRA (weight-decomposed LoRA), with PEFT's detached-norm forward.
pub struct Dora;

impl Dora {
    /// Column norms (one per output) of a Burn-layout `[in, out]` weight: `[out]`.
    pub fn weight_norm<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
        w.powf_scalar(2.0).sum_dim(0).sqrt().squeeze_dim(0)
    }
}

impl<B: Backend> LoraVariant<B> for Dora {
    fn forward(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: Tensor<B, 2>,
        base_out: &Tensor<B, 2>,
        result: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let magnitude = adapter
            .magnitude
            .as_ref()
            .expect("DoRA adapter has a magnitude")
            .val();
        // The norm is detached (DoRA paper 4.3): no gradient flows through it.
        let norm = Self::weight_norm(base.weight.clone() + adapter.delta_weight_nograd()).detach();
        let scale = (magnitude / norm).unsqueeze_dim::<2>(0); // [1, out]
                                                              // Without dropout the base output (minus bias) is x W; with dropout it is recomputed on
                                                              // the dropped-out input, as PEFT does.
        let x_w = if adapter.meta.dropout > 0.0 && crate::layer::training::<B>(&x.device()) {
            x.clone().matmul(base.weight.clone())
        } else {
            match base.bias {
                Some(b) => base_out.clone() - b.clone().unsqueeze_dim::<2>(0),
                None => base_out.clone(),
            }
        };
        let lora = adapter.lora_term(x);
        result + (scale.clone() - 1.0) * x_w + scale * lora
    }

    fn merge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let magnitude = adapter.magnitude.as_ref().expect("DoRA magnitude").val();
        let merged = weight + adapter.delta_weight_nograd();
        let scale = magnitude / Dora::weight_norm(merged.clone());
        (merged * scale.clone().unsqueeze_dim::<2>(0), Some(scale))
    }

    fn unmerge(
        &self,
        adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
        kept: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        let scale = kept.expect("DoRA unmerge needs the scale kept at merge time");
        weight / scale.unsqueeze_dim::<2>(0) - adapter.delta_weight_nograd()
    }
}

/// aLoRA (activated LoRA): plain LoRA on the positions from the invocation sequence on
/// (PEFT's `ALoraLinearVariant`), so everything before it is computed by the base weights.
pub struct Alora;

impl<B: Backend> LoraVariant<B> for Alora {
    fn forward(
        &self,
        adapter: &LoraAdapter<B>,
        _base: &Base<'_, B>,
        x: Tensor<B, 2>,
        _base_out: &Tensor<B, 2>,
        result: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        result + adapter.lora_term(x)
    }

    fn merge(
        &self,
        _adapter: &LoraAdapter<B>,
        _weight: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        unreachable!("LoraLinear::merge checks merge_refusal first")
    }

    fn unmerge(
        &self,
        _adapter: &LoraAdapter<B>,
        weight: Tensor<B, 2>,
        _kept: Option<Tensor<B, 1>>,
    ) -> Tensor<B, 2> {
        // Never merged (merge is refused), so there is nothing to take out.
        weight
    }

    fn positions(&self, ctx: &LoraCtx, batch: usize, seq: usize) -> Option<Vec<usize>> {
        Some(alora::positions(ctx.alora_offsets.as_deref(), batch, seq))
    }

    fn merge_refusal(&self) -> Option<&'static str> {
        Some(
            "aLoRA adapters cannot be merged: they act only from the invocation tokens on, \
             which a merged weight cannot express (PEFT refuses too)",
        )
    }
}

/// The implementation of a variant kind.
pub fn variant_of<B: Backend>(kind: VariantKind) -> &'static dyn LoraVariant<B> {
    match kind {
        VariantKind::Lora => &PlainLora,
        VariantKind::Dora => &Dora,
        VariantKind::Alora => &Alora,
    }
}
