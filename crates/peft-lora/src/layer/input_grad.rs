//! The input gradient of a layer that trains nothing in a call, from its output gradient: what
//! a caller needs to start a backward at the layer's input without running its forward (a
//! checkpointed block whose last projection is frozen never needs that projection's output).

use burn::tensor::{backend::Backend, Tensor};

use super::LoraLinear;
use crate::adapter::VariantKind;
use crate::dropout::{dropout, in_mode};
use crate::fused;
use crate::routing::{LoraCtx, RowsOn};

impl<B: Backend> LoraLinear<B> {
    /// `g W^T`, the gradient `forward_ctx(x, ctx)` hands its input for the output gradient `g`,
    /// when nothing in the layer needs a gradient in this call (no live adapter under `ctx`, no
    /// live `modules_to_save` copy, a frozen bias): the layer is then linear in `x` with no
    /// parameter to train, so `x`'s gradient is all a backward needs from it. `None` otherwise.
    /// An NF4 base is dequantized for the product, as its forward does.
    ///
    /// # Shapes
    /// - g: `[..., out]` -> `[..., in]`
    ///
    /// # Panics
    /// When `g`'s last dimension is not `out_features` (a programmer error).
    pub fn frozen_input_grad<const D: usize>(
        &self,
        g: Tensor<B, D>,
        ctx: &LoraCtx,
    ) -> Option<Tensor<B, D>> {
        if !self.live_adapters(ctx).is_empty() || self.base_trains() {
            return None;
        }
        let dims = g.dims();
        let d_out = self.d_out();
        assert_eq!(dims[D - 1], d_out, "frozen_input_grad: output width");
        let n: usize = dims[..D - 1].iter().product();
        let dx = self.base_input_grad(&g.reshape([n, d_out]));
        let mut in_dims = dims;
        in_dims[D - 1] = self.d_in();
        Some(dx.reshape(in_dims))
    }

    /// Whether anything of the base trains: a live `modules_to_save` copy, a trainable bias or
    /// weight.
    fn base_trains(&self) -> bool {
        self.saved.live().is_some()
            || self.bias.as_ref().is_some_and(|b| b.is_require_grad())
            || (self.nf4.is_none() && self.weight.is_require_grad())
    }

    /// `g W^T` for the frozen base (an NF4 base dequantized into `g`'s dtype, as its forward
    /// does).
    fn base_input_grad(&self, g: &Tensor<B, 2>) -> Tensor<B, 2> {
        let w = match &self.nf4 {
            Some(_) => self.base_weight().cast(g.dtype()),
            None => self.weight.val(),
        };
        product(g, &w.transpose())
    }
}

impl<B: Backend> LoraLinear<B> {
    /// The tensors a backward from this layer's output gradient `g` starts at, each with its
    /// gradient, for an input `x` whose forward (`forward_ctx(x, ctx)`) is never run: `None`
    /// unless the layer trains nothing ([`Self::frozen_input_grad`]: `[(x, g W^T)]`) or one plain
    /// LoRA adapter acts on every row (no bias on `B`, nothing of the base training; on CUDA
    /// only with `PEFT_LORA_SEEDED_ADAPTERS=1`, opt-in until measured): then `x` gets `g W^T`, the adapter's dropped-out input `xd` (drawn as the forward
    /// draws it) gets `s (g B^T) A^T`, and `A`, `B` get `s xd^T (g B^T)` and `s (xd A)^T g`,
    /// the gradients of `<forward_ctx(x), g>`.
    ///
    /// # Shapes
    /// - x: `[n, in]`, g: `[n, out]`
    #[allow(clippy::type_complexity)]
    pub fn backward_seeds(
        &self,
        x: Tensor<B, 2>,
        g: Tensor<B, 2>,
        ctx: &LoraCtx,
    ) -> Option<Vec<(Tensor<B, 2>, Tensor<B, 2>)>> {
        if let Some(dx) = self.frozen_input_grad(g.clone(), ctx) {
            return Some(vec![(x, dx)]);
        }
        let live = self.live_adapters(ctx);
        let [(adapter, RowsOn::All)] = live.as_slice() else {
            return None;
        };
        if !fused::seeded_adapters_enabled()
            || adapter.meta.variant != VariantKind::Lora
            || adapter.lora_b_bias.is_some()
            || self.base_trains()
        {
            return None;
        }
        let (a, b, s) = (
            adapter.lora_a.val(),
            adapter.lora_b.val(),
            adapter.meta.scaling,
        );
        let xd = in_mode(self.state.training, || {
            dropout(x.clone(), adapter.meta.dropout)
        });
        // Untracked values for the products (no graph: each result is handed as it is).
        let (xd_v, a_v, b_v) = (xd.clone().detach(), a.clone().detach(), b.clone().detach());
        let gb = product(&g, &b_v.transpose()) * s;
        let xa = product(&xd_v, &a_v) * s;
        Some(vec![
            (x, self.base_input_grad(&g)),
            (xd, product(&gb, &a_v.transpose())),
            (a, product(&xd_v.transpose(), &gb)),
            (b, product(&xa.transpose(), &g)),
        ])
    }
}

/// `x y`: burn-cuda-ops' cuBLASLt GEMM where it runs (any operand may be a transposed view),
/// else Burn's matmul.
fn product<B: Backend>(x: &Tensor<B, 2>, y: &Tensor<B, 2>) -> Tensor<B, 2> {
    fused::frozen_linear(x, y, None).unwrap_or_else(|| x.clone().matmul(y.clone()))
}
