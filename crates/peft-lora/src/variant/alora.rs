//! aLoRA (activated LoRA): plain LoRA on the positions from the invocation sequence on (PEFT's
//! `ALoraLinearVariant`); never merged, never fused.

use burn::tensor::{backend::Backend, Tensor};

use super::{Base, LoraVariant};
use crate::adapter::LoraAdapter;
use crate::routing::{alora_positions, LoraCtx};

/// aLoRA (activated LoRA): plain LoRA on the positions from the invocation sequence on
/// (PEFT's `ALoraLinearVariant`), so everything before it is computed by the base weights.
/// It declines the fused path: it acts on some positions only (per-row offsets).
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
        Some(alora_positions(ctx.alora_offsets.as_deref(), batch, seq))
    }

    fn merge_refusal(&self) -> Option<&'static str> {
        Some(
            "aLoRA adapters cannot be merged: they act only from the invocation tokens on, \
             which a merged weight cannot express (PEFT refuses too)",
        )
    }
}
