//! Layers that read one input (a decoder's q, k and v projections; an MLP's gate and up) run as
//! one fused op, and their frozen weights laid side by side in one buffer so that op computes
//! all their bases with one GEMM.

use std::ops::Range;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};

use super::forward::flat_block;
use super::LoraLinear;
use crate::dropout::in_mode;
use crate::error::{Error, Result};
use crate::fused;
use crate::routing::{LoraCtx, RowsOn};
use crate::variant::variant_of;

impl<B: Backend> LoraLinear<B> {
    /// The outputs of `layers` for the one input `x`, in order: each is
    /// `layer.forward_ctx(x, ctx)`.
    ///
    /// Where burn-cuda-ops' shared-input op runs (feature `cuda`, inference on the raw CUDA
    /// backend, `PEFT_LORA_SHARED_INPUT=1`) and every layer takes it, they run as one queued
    /// task with one packed output, of which the returned tensors are column views; a layer
    /// takes it with a dense base, no live `modules_to_save` copy or input capture, and at most
    /// one live adapter, acting on every row or (per-row routing) on one block of rows, whose
    /// variant gives its term as `s (x A) B` (plain LoRA and rsLoRA without training dropout).
    /// After [`Self::pack_shared_input`] the op computes all the bases with one GEMM. Otherwise
    /// every layer runs its own forward.
    ///
    /// # Shapes
    /// - x: `[..., in]` -> each `[..., out_i]`
    ///
    /// # Panics
    /// As [`Self::forward`], when the input's last dimension is not a layer's `in_features`.
    pub fn forward_shared<const D: usize>(
        layers: &[&Self],
        x: Tensor<B, D>,
        ctx: &LoraCtx,
    ) -> Vec<Tensor<B, D>> {
        // A layer of another input width makes the fused op decline; its own forward then
        // panics with the layer's message.
        let dims = x.dims();
        let n: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.clone().reshape([n, dims[D - 1]]);
        // Routing is per batch row, each `seq` flat rows.
        let batch = if D >= 2 { dims[0] } else { 1 };
        let seq = n / batch.max(1);
        let Some(y) = shared_fused(layers, &x2, seq, ctx) else {
            return layers
                .iter()
                .map(|layer| layer.forward_ctx(x.clone(), ctx))
                .collect();
        };
        let mut off = 0;
        layers
            .iter()
            .map(|layer| {
                let out = layer.d_out();
                let mut out_dims = dims;
                out_dims[D - 1] = out;
                let cols = y.clone().slice([0..n, off..off + out]);
                off += out;
                cols.reshape(out_dims)
            })
            .collect()
    }

    /// Lays the frozen weights of `layers` (layers that read one input) side by side in one
    /// buffer `[in, sum out]`: each layer's `weight` becomes the view of its columns, with the
    /// same values and parameter id, so [`Self::forward_shared`] computes all their bases with
    /// one GEMM. Memory is unchanged once the separate weights are dropped.
    ///
    /// A weight replaced later (a merge, an initialisation that rewrites the base) stops being a
    /// view; the shared op then runs one GEMM per layer again, with the right values.
    ///
    /// # Errors
    /// [`Error::Pack`] when the layers differ in input width or dtype, or one's base is NF4;
    /// nothing is changed then.
    pub fn pack_shared_input(layers: &mut [&mut Self]) -> Result<()> {
        let Some(first) = layers.first() else {
            return Ok(());
        };
        let (d_in, dtype) = (first.d_in(), first.weight.val().dtype());
        let refuse = |reason: String| {
            let modules: Vec<String> = layers
                .iter()
                .map(|l| l.state.module.clone().unwrap_or_else(|| "<unnamed>".into()))
                .collect();
            Err(Error::Pack {
                modules: modules.join(", "),
                reason,
            })
        };
        for layer in layers.iter() {
            if layer.nf4.is_some() {
                return refuse("a base stored in NF4 has no dense weight to pack".into());
            }
            let w = layer.weight.val();
            if layer.d_in() != d_in || w.dtype() != dtype {
                return refuse(format!(
                    "the layers must share in_features and dtype; found [{}, _] {:?} beside \
                     [{d_in}, _] {dtype:?}",
                    layer.d_in(),
                    w.dtype()
                ));
            }
        }
        let weights: Vec<Tensor<B, 2>> = layers.iter().map(|l| l.weight.val()).collect();
        let packed = Tensor::cat(weights, 1);
        let mut off = 0;
        for layer in layers.iter_mut() {
            let out = layer.d_out();
            let view = packed.clone().slice([0..d_in, off..off + out]);
            off += out;
            let weight = std::mem::replace(&mut layer.weight, Param::from_tensor(view.clone()));
            layer.weight = weight.map(|w| view.set_require_grad(w.is_require_grad()));
        }
        Ok(())
    }
}

/// The packed output `[n, sum out]` of the shared-input op, or `None` where it does not run or
/// a layer does not take it (see [`LoraLinear::forward_shared`]). `seq` flat rows make one
/// batch row.
fn shared_fused<B: Backend>(
    layers: &[&LoraLinear<B>],
    x: &Tensor<B, 2>,
    seq: usize,
    ctx: &LoraCtx,
) -> Option<Tensor<B, 2>> {
    let first = layers.first()?;
    if !fused::shared_input_enabled() {
        return None;
    }
    let training = first.state.training;
    if layers.iter().any(|l| l.state.training != training) {
        return None;
    }
    in_mode(training, || {
        let mut bases = Vec::with_capacity(layers.len());
        let mut terms = Vec::with_capacity(layers.len());
        for layer in layers {
            if layer.nf4.is_some() || layer.saved.live().is_some() || layer.state.capture.is_some()
            {
                return None;
            }
            let term = match layer.live_adapters(ctx).as_slice() {
                [] => None,
                [(adapter, on)] if adapter.lora_b_bias.is_none() => {
                    let rows = flat_rows(on, seq)?;
                    let variant = variant_of::<B>(adapter.meta.variant);
                    Some((variant.low_rank_term(adapter, x)?, rows))
                }
                _ => return None,
            };
            bases.push((layer.weight.val(), layer.bias.as_ref().map(|b| b.val())));
            terms.push(term);
        }
        let parts: Vec<fused::SharedLinear<'_, B>> = bases
            .iter()
            .zip(&terms)
            .map(|((w, bias), term)| fused::SharedLinear {
                w,
                bias: bias.as_ref(),
                low_rank: term.as_ref().map(|((a, b, s), _)| (a, b, *s)),
                rows: term.as_ref().and_then(|(_, rows)| rows.clone()),
            })
            .collect();
        fused::shared_input_linear(x, &parts)
    })
}

/// Where an adapter acts, as flat rows: `Some(None)` on every row, `Some(Some(rows))` on one
/// block of batch rows (`seq` flat rows each), `None` when the shared op cannot express it.
fn flat_rows(on: &RowsOn, seq: usize) -> Option<Option<Range<usize>>> {
    match on {
        RowsOn::All => Some(None),
        RowsOn::Rows(rows) if rows.iter().all(|r| *r) => Some(None),
        RowsOn::Rows(rows) => Some(Some(flat_block(rows, seq)?)),
        RowsOn::Skip => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{flat_rows, RowsOn};

    #[test]
    fn routed_rows_become_one_block_of_flat_rows_or_decline() {
        let (t, f) = (true, false);
        assert_eq!(flat_rows(&RowsOn::All, 5), Some(None));
        assert_eq!(flat_rows(&RowsOn::Rows(vec![t, t]), 5), Some(None));
        // The side-by-side layout: base rows, then adapter rows.
        assert_eq!(
            flat_rows(&RowsOn::Rows(vec![f, f, t, t]), 3),
            Some(Some(6..12))
        );
        assert_eq!(flat_rows(&RowsOn::Rows(vec![t, f, t]), 3), None);
        assert_eq!(flat_rows(&RowsOn::Skip, 3), None);
    }
}
