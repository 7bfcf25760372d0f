//! Plain LoRA (and rsLoRA, which differs only in scaling): `y = x W + b + s (x A) B`.

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor};

use super::{Base, LoraVariant};
use crate::adapter::LoraAdapter;
use crate::dropout::{dropout, training};

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

    /// One fused op; with training dropout the dropped-out input feeds A only (hashed masks).
    fn forward_fused(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: &Tensor<B, 2>,
        rows: Option<&Tensor<B, 2>>,
    ) -> Option<Tensor<B, 2>> {
        let (a, b) = (adapter.lora_a.val(), adapter.lora_b.val());
        let xd = dropout_on(adapter, x).then(|| dropout(x.clone(), adapter.meta.dropout));
        // `s (m x A) B` is `s (x A) B` on the rows of the mask `m` and 0 elsewhere: routing is a
        // masked adapter input, one op for the whole batch.
        let xd = match (xd, rows) {
            (xd, None) => xd,
            (xd, Some(m)) => Some(xd.unwrap_or_else(|| x.clone()) * m.clone()),
        };
        base.low_rank_linear(x, xd.as_ref(), &a, &b, adapter.meta.scaling)
    }

    /// The block's rows by offset (inference only: with training dropout the masked form runs).
    fn forward_fused_rows(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: &Tensor<B, 2>,
        rows: Range<usize>,
    ) -> Option<Tensor<B, 2>> {
        if dropout_on(adapter, x) {
            return None;
        }
        let (a, b) = (adapter.lora_a.val(), adapter.lora_b.val());
        base.low_rank_linear_rows(x, &a, &b, adapter.meta.scaling, rows)
    }

    /// Without training dropout only (with it, each layer's own fused op drops its input).
    fn low_rank_term(
        &self,
        adapter: &LoraAdapter<B>,
        x: &Tensor<B, 2>,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>, f64)> {
        if dropout_on(adapter, x) {
            return None;
        }
        Some((
            adapter.lora_a.val(),
            adapter.lora_b.val(),
            adapter.meta.scaling,
        ))
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

/// Whether `adapter`'s dropout acts on `x` in this call (a rate above 0, in training mode).
fn dropout_on<B: Backend>(adapter: &LoraAdapter<B>, x: &Tensor<B, 2>) -> bool {
    adapter.meta.dropout > 0.0 && training::<B>(&x.device())
}
