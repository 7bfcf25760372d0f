//! The fused GPU ops the model uses, in one place: with the `cuda` feature each function is
//! burn-cuda-ops' op (which itself returns `None` on other backends or inputs it does not
//! cover); without it each returns `None`. Callers run the composed tensor ops on `None`.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// `x W` for a frozen `W` `[in, out]` (the untied LM head).
pub(crate) fn frozen_linear<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::frozen_linear(x, w, None);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w);
        None
    }
}

/// RoPE fused with the split into heads: `[b, s, heads * d]` -> `[b, heads, s, d]`.
pub(crate) fn rope<B: Backend>(
    x: &Tensor<B, 3>,
    heads: usize,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::rope(x, heads, cos, sin);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, heads, cos, sin);
        None
    }
}

/// `softmax(scale q k^T + mask) v` with GQA folded into the query axis, as one op with a
/// recomputing backward (no `[s, t]` kept).
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::attention(q, k, v, mask, scale);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, mask, scale);
        None
    }
}

/// `silu(gate) * up`, one kernel each way.
pub(crate) fn swiglu<B: Backend>(gate: &Tensor<B, 3>, up: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::swiglu(gate, up);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gate, up);
        None
    }
}

/// RMSNorm with a frozen weight, one kernel each way.
pub(crate) fn rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::rms_norm(x, w, eps);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, eps);
        None
    }
}

/// Whether the head + cross-entropy op can run on `B` at all (so the caller builds its target
/// tensor only then).
#[cfg_attr(not(feature = "cuda"), allow(clippy::extra_unused_type_parameters))]
pub(crate) fn cross_entropy_supported<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::supported::<B>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// `sum_i -log softmax(h_i W)[targets_i]` (f32, `[1]`) for a frozen head, never holding the
/// `[n, vocab]` logits beyond a chunk of rows.
pub(crate) fn linear_cross_entropy<B: Backend>(
    h: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
) -> Option<Tensor<B, 1>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::linear_cross_entropy(h, w, targets);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (h, w, targets);
        None
    }
}
