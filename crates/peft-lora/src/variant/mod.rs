//! The variant interface: plain LoRA, DoRA and aLoRA implement it; others plug in beside them
//! without touching the plain path (PEFT's `LoraVariant`).
//!
//! A layer computes its output through its adapters' variants on one of two paths:
//! - composed (every backend): the frozen output is computed once and each live adapter adds
//!   its term ([`LoraVariant::forward`]);
//! - fused (burn-cuda-ops' cuBLASLt ops, feature `cuda`): when one adapter is live, its variant
//!   computes the whole output from the frozen base's linear ops ([`Base::linear`],
//!   [`Base::low_rank_linear`]) in [`LoraVariant::forward_fused`], or declines (`None`) and the
//!   composed path runs.

mod alora;
mod dora;
mod lora;

use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor};

use crate::adapter::{LoraAdapter, VariantKind};
use crate::fused;
use crate::routing::LoraCtx;

pub use alora::Alora;
pub use dora::Dora;
pub use lora::PlainLora;

/// The frozen base of a layer, as variants see it (Burn layout `[in, out]`), with the linear
/// ops the fused path builds an output from.
pub struct Base<'a, B: Backend> {
    /// Frozen weight `[in, out]` (possibly with merged adapters in it).
    pub weight: &'a Tensor<B, 2>,
    /// Bias `[out]`.
    pub bias: Option<&'a Tensor<B, 1>>,
}

impl<B: Backend> Base<'_, B> {
    /// `x W (+ bias)` as one fused op (burn-cuda-ops' cuBLASLt GEMM), or `None` where it does
    /// not run (no `cuda` feature, another backend, the op switched off, unsuited tensors).
    ///
    /// # Shapes
    /// - x: `[n, in]` -> `[n, out]`
    pub fn linear(&self, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        fused::frozen_linear(x, self.weight, self.bias)
    }

    /// `x W (+ bias) + s (xd A) B` (`xd = x` when `None`) as one fused op, or `None` where it
    /// does not run (see [`Base::linear`]).
    ///
    /// # Shapes
    /// - x, xd: `[n, in]`, a: `[in, r]`, b: `[r, out]` -> `[n, out]`
    pub fn low_rank_linear(
        &self,
        x: &Tensor<B, 2>,
        xd: Option<&Tensor<B, 2>>,
        a: &Tensor<B, 2>,
        b: &Tensor<B, 2>,
        s: f64,
    ) -> Option<Tensor<B, 2>> {
        fused::low_rank_linear(x, xd, self.weight, self.bias, a, b, s)
    }

    /// `x W (+ bias)` on every row and `+ s (x A) B` on the flat rows `rows` only, as one fused
    /// inference op (no mask, no low-rank work on the other rows), or `None` where it does not
    /// run (another backend, autodiff, the switch off; see [`Base::linear`]).
    pub fn low_rank_linear_rows(
        &self,
        x: &Tensor<B, 2>,
        a: &Tensor<B, 2>,
        b: &Tensor<B, 2>,
        s: f64,
        rows: Range<usize>,
    ) -> Option<Tensor<B, 2>> {
        fused::low_rank_linear_rows(x, self.weight, self.bias, a, b, s, rows)
    }
}

/// What a LoRA variant must provide.
pub trait LoraVariant<B: Backend>: Sync {
    /// Composed path: adds this adapter's contribution to `result` (the running layer output
    /// `[n, out]`); `x` is the (dropped-out) input `[n, in]`, `base_out` the frozen layer's
    /// output.
    fn forward(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: Tensor<B, 2>,
        base_out: &Tensor<B, 2>,
        result: Tensor<B, 2>,
    ) -> Tensor<B, 2>;

    /// Fused path: the layer's whole output for input `x` `[n, in]` when `adapter` is the only
    /// live adapter (no `lora_bias`), from `base`'s fused linear ops; `None` declines and the
    /// layer runs the composed path. `rows`, under per-row routing, is the `[n, 1]` 0/1 mask of
    /// the rows the adapter acts on (the others get the base output); a variant whose term is
    /// not linear in the adapter input declines it. Declines by default.
    fn forward_fused(
        &self,
        _adapter: &LoraAdapter<B>,
        _base: &Base<'_, B>,
        _x: &Tensor<B, 2>,
        _rows: Option<&Tensor<B, 2>>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// Fused path under per-row routing whose adapter rows are one block: the layer's whole
    /// output when the adapter acts on the flat rows `rows` of `x` only (the others get the base
    /// output), as [`LoraVariant::forward_fused`] with the mask of that block but without
    /// building or applying it; `None` (the default) sends the layer to the masked form.
    fn forward_fused_rows(
        &self,
        _adapter: &LoraAdapter<B>,
        _base: &Base<'_, B>,
        _x: &Tensor<B, 2>,
        _rows: Range<usize>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// The adapter's term as `s (x A) B` on the layer's own input (no dropout acting in this
    /// call): `(A [in, r], B [r, out], s)`, for the fused op that runs several layers reading one
    /// input together ([`crate::LoraLinear::forward_shared`]); `None` (the default) sends the
    /// layers to their own forwards.
    fn low_rank_term(
        &self,
        _adapter: &LoraAdapter<B>,
        _x: &Tensor<B, 2>,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>, f64)> {
        None
    }

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

/// The implementation of a variant kind.
pub fn variant_of<B: Backend>(kind: VariantKind) -> &'static dyn LoraVariant<B> {
    match kind {
        VariantKind::Lora => &PlainLora,
        VariantKind::Dora => &Dora,
        VariantKind::Alora => &Alora,
    }
}
