//! DoRA (weight-decomposed LoRA), with PEFT's detached-norm forward:
//! `y = b + m / ||W + s A B|| * (x W + s (x A) B)`, the norm per output and detached.

use burn::tensor::{backend::Backend, FloatDType, Tensor};

use super::{Base, LoraVariant};
use crate::adapter::{untracked, LoraAdapter};
use crate::dropout::training;
use crate::fused;

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
        let x_w = if adapter.meta.dropout > 0.0 && training::<B>(&x.device()) {
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

    /// `m / ||W + s A B|| * (x W + s (x A) B) + b` on one fused op and [`dora_norm`]; declines
    /// with training dropout (PEFT recomputes `x W` on the dropped-out input: composed).
    fn forward_fused(
        &self,
        adapter: &LoraAdapter<B>,
        base: &Base<'_, B>,
        x: &Tensor<B, 2>,
        rows: Option<&Tensor<B, 2>>,
    ) -> Option<Tensor<B, 2>> {
        // The magnitude rescales the base output too: not a masked adapter input.
        if rows.is_some() || adapter.meta.dropout > 0.0 && training::<B>(&x.device()) {
            return None;
        }
        let (a, b) = (adapter.lora_a.val(), adapter.lora_b.val());
        let s = adapter.meta.scaling;
        let magnitude = adapter.magnitude.as_ref()?.val();
        let unbiased = Base {
            weight: base.weight,
            bias: None,
        };
        let y0 = unbiased.low_rank_linear(x, None, &a, &b, s)?;
        let norm = match dora_norm(base.weight, &a, &b, s) {
            Some(n) => n,
            None => Self::weight_norm(base.weight.clone() + adapter.delta_weight_nograd()).detach(),
        };
        // `y0 * m / ||.||`: the magnitude's gradient sums `dy * y0` over the rows; the fused op
        // does that with one GEMM instead of Burn's strided reduction.
        let g = (magnitude / norm).unsqueeze_dim::<2>(0);
        let out = fused::col_scale(&y0, &g).unwrap_or_else(|| y0 * g);
        Some(match base.bias {
            Some(b) => out + b.clone().unsqueeze_dim::<2>(0),
            None => out,
        })
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

/// DoRA's column norms `||W + s A B||` (per output, detached) without forming `W + s A B`:
/// `||W_o||^2 + 2 s <W_o, (A B)_o> + s^2 ||(A B)_o||^2`, where `<W_o, (A B)_o> = sum_k (A^T W)[k, o]
/// B[k, o]` and `||(A B)_o||^2 = sum_{k, j} B[k, o] (A^T A)[k, j] B[j, o]`, from two cuBLASLt
/// GEMMs (`A^T W`, `A^T A`). burn-cuda-ops' two norm kernels then sum `W`'s squares and combine
/// the terms in f32 (four launches in all); where they do not run (`PEFT_LORA_DORA_NORM=0`),
/// two more GEMMs and Burn's casts, products and row sums do it (~20 launches). `None` where
/// the fused GEMMs do not run.
fn dora_norm<B: Backend>(
    w: &Tensor<B, 2>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    s: f64,
) -> Option<Tensor<B, 1>> {
    use fused::frozen_linear;
    let (w, a, b) = (
        untracked(w.clone()),
        untracked(a.clone()),
        untracked(b.clone()),
    );
    let at = a.clone().transpose();
    let aw = frozen_linear(&at, &w, None)?; // [r, out]
    let gram = frozen_linear(&at, &a, None)?; // [r, r]
    if let Some(norm) = fused::dora_norm(&w, &aw, &gram, &b, s) {
        return Some(norm);
    }
    let d_in = w.dims()[0];
    let ones = Tensor::<B, 2>::ones([1, d_in], (&w.device(), w.dtype()));
    let w_sq = frozen_linear(&ones, &(w.clone() * w.clone()), None)?; // [1, out]
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
