//! The input gradient of a layer that trains nothing in a call, from its output gradient: what
//! a caller needs to start a backward at the layer's input without running its forward (a
//! checkpointed block whose last projection is frozen never needs that projection's output).

use burn::tensor::{backend::Backend, Tensor};

use super::LoraLinear;
use crate::fused;
use crate::routing::LoraCtx;

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
        let trains = !self.live_adapters(ctx).is_empty()
            || self.saved.live().is_some()
            || self.bias.as_ref().is_some_and(|b| b.is_require_grad());
        if trains {
            return None;
        }
        let dims = g.dims();
        let d_out = self.d_out();
        assert_eq!(dims[D - 1], d_out, "frozen_input_grad: output width");
        let n: usize = dims[..D - 1].iter().product();
        let g2: Tensor<B, 2> = g.reshape([n, d_out]);
        let w = match &self.nf4 {
            Some(q) => q.dequantize().cast(g2.dtype()),
            None => self.weight.val(),
        };
        if w.is_require_grad() {
            return None;
        }
        let wt = w.transpose();
        let dx = fused::frozen_linear(&g2, &wt, None).unwrap_or_else(|| g2.matmul(wt));
        let mut in_dims = dims;
        in_dims[D - 1] = self.d_in();
        Some(dx.reshape(in_dims))
    }
}
