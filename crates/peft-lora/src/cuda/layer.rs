//! `LoraLinear` on the fused CUDA ops: picks the op for the layer's state, or declines.

use burn::tensor::{backend::Backend, Tensor};

use crate::layer::{dropout, LoraAdapter, LoraCtx, LoraLinear};
use crate::variant::{Dora, VariantKind};
use burn::tensor::FloatDType;

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
        let train_dropout = adapter.meta.dropout > 0.0 && crate::layer::training::<B>(&x.device());
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
                let norm = match dora_norm(&weight, &a, &b, s) {
                    Some(n) => n,
                    None => Dora::weight_norm(weight + adapter.delta_weight_nograd()).detach(),
                };
                let out = y0 * (magnitude / norm).unsqueeze_dim::<2>(0);
                Some(match bias {
                    Some(b) => out + b.unsqueeze_dim::<2>(0),
                    None => out,
                })
            }
            // aLoRA acts on some positions only (per-row offsets): the composed path.
            VariantKind::Alora => None,
        }
    }
}

/// DoRA's column norms `||W + s A B||` (per output, detached) without forming `W + s A B`:
/// `||W_o||^2 + 2 s <W_o, (A B)_o> + s^2 ||(A B)_o||^2`, where `<W_o, (A B)_o> = sum_k (A^T W)[k, o]
/// B[k, o]` and `||(A B)_o||^2 = sum_k ((A^T A) B)[k, o] B[k, o]`: three cuBLASLt GEMMs reading
/// `W` twice, instead of an `[in, out]` GEMM and several passes over its result. The three terms
/// are combined in f32.
fn dora_norm<B: Backend>(
    w: &Tensor<B, 2>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    s: f64,
) -> Option<Tensor<B, 1>> {
    use crate::cuda::frozen_linear;
    let (w, a, b) = (w.clone().detach(), a.clone().detach(), b.clone().detach());
    let d_in = w.dims()[0];
    let ones = Tensor::<B, 2>::ones([1, d_in], (&w.device(), w.dtype()));
    let w_sq = frozen_linear(&ones, &(w.clone() * w.clone()), None)?; // [1, out]
    let at = a.clone().transpose();
    let aw = frozen_linear(&at, &w, None)?; // [r, out]
    let gram = frozen_linear(&at, &a, None)?; // [r, r]
    let gb = frozen_linear(&gram, &b, None)?; // [r, out]
    let f32 = |t: Tensor<B, 2>| t.cast(FloatDType::F32);
    let bf = f32(b);
    let cross = (f32(aw) * bf.clone()).sum_dim(0);
    let quad = (f32(gb) * bf).sum_dim(0);
    let norm_sq = f32(w_sq) + cross * (2.0 * s) + quad * (s * s);
    Some(
        norm_sq
            .clamp_min(0.0)
            .sqrt()
            .cast(w.dtype())
            .squeeze_dim::<1>(0),
    )
}
