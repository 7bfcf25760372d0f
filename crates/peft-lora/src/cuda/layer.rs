//! `LoraLinear` on the fused CUDA ops: picks the op for the layer's state, or declines.

use burn::tensor::{backend::Backend, Tensor};

use crate::layer::{dropout, LoraAdapter, LoraCtx, LoraLinear};
use crate::variant::{Dora, VariantKind};

impl<B: Backend> LoraLinear<B> {
    /// The fused CUDA path ([`crate::cuda`]): `None` when the backend or the layer's state is not
    /// one it covers (the composed forward then runs).
    pub(crate) fn forward_fused(&self, x: &Tensor<B, 2>, ctx: &LoraCtx) -> Option<Tensor<B, 2>> {
        if !crate::cuda::supported::<B>() {
            return None;
        }
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        let adapters: Vec<&LoraAdapter<B>> = if self.state.disabled {
            Vec::new()
        } else {
            let unmerged: Vec<&LoraAdapter<B>> = self
                .adapters
                .iter()
                .filter(|a| !self.state.merged.contains(&a.meta.name))
                .collect();
            if ctx.row_adapters.is_some() && !unmerged.is_empty() {
                return None;
            }
            unmerged
                .into_iter()
                .filter(|a| self.state.active.contains(&a.meta.name))
                .collect()
        };
        let adapter = match adapters.as_slice() {
            [] => return crate::cuda::frozen_linear(x, &weight, bias.as_ref()),
            [one] => *one,
            _ => return None,
        };
        if adapter.lora_b_bias.is_some() {
            return None;
        }
        let train_dropout = adapter.meta.dropout > 0.0 && B::ad_enabled(&x.device());
        let (a, b) = (adapter.lora_a.val(), adapter.lora_b.val());
        let s = adapter.meta.scaling;
        match adapter.meta.variant {
            VariantKind::Lora => {
                let xd = train_dropout.then(|| dropout(x.clone(), adapter.meta.dropout));
                crate::cuda::lora_linear(x, xd.as_ref(), &weight, bias.as_ref(), &a, &b, s)
            }
            VariantKind::Dora => {
                // PEFT recomputes x W on the dropped-out input for DoRA with dropout: composed.
                if train_dropout {
                    return None;
                }
                // out = bias + m / ||W + s A B|| * (x W + s x A B), the norm detached.
                let magnitude = adapter.magnitude.as_ref()?.val();
                let y0 = crate::cuda::lora_linear(x, None, &weight, None, &a, &b, s)?;
                let norm = Dora::weight_norm(weight + adapter.delta_weight_nograd()).detach();
                let out = y0 * (magnitude / norm).unsqueeze_dim::<2>(0);
                Some(match bias {
                    Some(b) => out + b.unsqueeze_dim::<2>(0),
                    None => out,
                })
            }
        }
    }
}
