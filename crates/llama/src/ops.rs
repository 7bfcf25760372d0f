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

/// Whether linears over one input run as one op (`PEFT_LORA_SHARED_INPUT=1`), so the model lays
/// their weights side by side when it builds them.
pub(crate) fn shared_input_enabled() -> bool {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::shared_input_enabled();
    #[cfg(not(feature = "cuda"))]
    false
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

/// [`rope`] with the heads in groups of `group`, position-major within each group: `[b, s,
/// heads * d]` -> `[b, heads / group, s * group, d]` (the queries of [`causal_attention`]).
pub(crate) fn rope_grouped<B: Backend>(
    x: &Tensor<B, 3>,
    heads: usize,
    group: usize,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::rope_grouped(x, heads, group, cos, sin);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, heads, group, cos, sin);
        None
    }
}

/// Whether causal attention in row blocks is on (burn-cuda-ops' `PEFT_LORA_CAUSAL_ATTENTION`;
/// never without the `cuda` feature).
pub(crate) fn causal_attention_enabled() -> bool {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::causal_attention_enabled();
    #[cfg(not(feature = "cuda"))]
    false
}

/// Causal attention in row blocks over position-major queries `[b, kv_heads, s * rep, d]`
/// (burn-cuda-ops' `causal_attention`): the output laid out as the queries.
pub(crate) fn causal_attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    scale: f64,
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::causal_attention(q, k, v, mask, scale);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, mask, scale);
        None
    }
}

/// RoPE of a cached step's `q` and `k` (`[b, s, n * d]`) and the writes of `k` and `v` into
/// the caches at `pos`, one kernel (inference): the rotated `q [b, heads, s, d]` and the
/// caches, or the caches back untouched.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn rope_append<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    k_cache: Tensor<B, 4>,
    v_cache: Tensor<B, 4>,
    pos: usize,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>), (Tensor<B, 4>, Tensor<B, 4>)> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::rope_append(q, k, v, cos, sin, k_cache, v_cache, pos);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, cos, sin, pos);
        Err((k_cache, v_cache))
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

/// Runs `f` with the attention ops it records keeping their probabilities for their backward
/// (burn-cuda-ops' `keeping_probs`): for a checkpointed layer's recomputation, whose backward
/// follows at once. Elsewhere, or with the switch off, `f` just runs.
pub(crate) fn keeping_attention_probs<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::attention::keeping_probs(f);
    #[cfg(not(feature = "cuda"))]
    f()
}

/// Whether checkpointed layers start their backward from seeded roots ([`seeded_root`]): on
/// CUDA, burn-cuda-ops' switch (`PEFT_LORA_SEEDED_BACKWARD`); without the `cuda` feature
/// always (the roots are then composed sums).
pub(crate) fn seeded_backward_enabled() -> bool {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::seeded_backward_enabled();
    #[cfg(not(feature = "cuda"))]
    true
}

/// The `[1]` root whose backward hands each tensor its paired gradient as it is (burn-cuda-ops'
/// `seeded_root`), or `None` where it does not run.
pub(crate) fn seeded_root<B: Backend>(
    pairs: Vec<(Tensor<B, 2>, Tensor<B, 2>)>,
) -> Option<Tensor<B, 1>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::seeded_root(pairs);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = pairs;
        None
    }
}

/// `[b, heads, s, d]` -> `[b, s, heads * d]`, one kernel each way.
pub(crate) fn merge_heads<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::merge_heads(x);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
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

/// `(x + delta, RMSNorm(x + delta))` as one kernel (inference only: no backward).
pub(crate) fn add_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    delta: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::add_rms_norm(x, delta, w, eps);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, delta, w, eps);
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

/// A layer input kept for the checkpointed backward: on the device, or (CUDA, with
/// `PEFT_LORA_OFFLOAD` on) parked in pinned host memory while the forward and the later layers'
/// backward run, as Unsloth's offloaded checkpointing does.
pub(crate) enum Kept<B: Backend> {
    /// Held on the device.
    Device(Tensor<B, 3>),
    /// Copied to host memory.
    #[cfg(feature = "cuda")]
    Host(Box<burn_cuda_ops::Offloaded<B, 3>>),
}

impl<B: Backend> Kept<B> {
    /// Keeps `t` on the device.
    pub(crate) fn device(t: Tensor<B, 3>) -> Self {
        Kept::Device(t)
    }

    /// Starts copying `t` to host memory where the backend can; keeps it on the device
    /// otherwise. Call [`Self::release_device`] once the work that reads `t` is queued.
    pub(crate) fn offload(t: Tensor<B, 3>) -> Self {
        #[cfg(feature = "cuda")]
        return match burn_cuda_ops::offload(t) {
            Ok(h) => Kept::Host(Box::new(h)),
            Err(t) => Kept::Device(t),
        };
        #[cfg(not(feature = "cuda"))]
        Kept::Device(t)
    }

    /// Lets the device memory go once the copy is done (the host does not wait).
    pub(crate) fn release_device(&mut self) {
        #[cfg(feature = "cuda")]
        if let Kept::Host(h) = self {
            h.release_device();
        }
    }

    /// Starts the copy back to the device.
    pub(crate) fn prefetch(&mut self) {
        #[cfg(feature = "cuda")]
        if let Kept::Host(h) = self {
            h.prefetch();
        }
    }

    /// The tensor on the device.
    pub(crate) fn into_tensor(self) -> Tensor<B, 3> {
        match self {
            Kept::Device(t) => t,
            #[cfg(feature = "cuda")]
            Kept::Host(h) => h.restore(),
        }
    }
}

/// The index of each row's maximum (torch's `argmax(dim=1)`), one kernel: greedy decoding's
/// token choice.
pub(crate) fn argmax_rows<B: Backend>(x: &Tensor<B, 2>) -> Option<Tensor<B, 1, Int>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::argmax_rows(x);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        None
    }
}

/// The token each row of `logits` draws at `u` (f32 `[rows]`) after `cfg`'s temperature, top-k
/// and top-p, one kernel: sampling's token choice.
pub(crate) fn sample_rows<B: Backend>(
    logits: &Tensor<B, 2>,
    u: &Tensor<B, 1>,
    cfg: &crate::gen_config::GenerationConfig,
) -> Option<Tensor<B, 1, Int>> {
    #[cfg(feature = "cuda")]
    return burn_cuda_ops::sample_rows(
        logits,
        u,
        burn_cuda_ops::sample::SampleParams {
            temperature: cfg.temperature as f32,
            top_k: cfg.top_k,
            top_p: cfg.top_p as f32,
        },
    );
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (logits, u, cfg);
        None
    }
}

/// Token ids on their way to the host: with CUDA the copy is queued when the read starts, so
/// the host can queue more work (the next decode step) before it waits, and waits only for the
/// work before the copy; elsewhere the ids are read when waited for.
pub(crate) enum IdsRead<B: Backend> {
    /// Read on [`Self::wait`].
    Later(Tensor<B, 1, Int>),
    /// Copy queued on the device's stream.
    #[cfg(feature = "cuda")]
    Queued(burn_cuda_ops::read::PendingRead),
}

impl<B: Backend> IdsRead<B> {
    /// Starts reading `ids` `[n]`.
    pub(crate) fn start(ids: Tensor<B, 1, Int>) -> Self {
        #[cfg(feature = "cuda")]
        return match burn_cuda_ops::start_read(ids) {
            Ok(read) => IdsRead::Queued(read),
            Err(ids) => IdsRead::Later(ids),
        };
        #[cfg(not(feature = "cuda"))]
        IdsRead::Later(ids)
    }

    /// The ids, once the device has them.
    pub(crate) fn wait(self) -> Result<Vec<i64>, String> {
        let data = match self {
            IdsRead::Later(ids) => ids.into_data(),
            #[cfg(feature = "cuda")]
            IdsRead::Queued(read) => read.wait()?,
        };
        data.convert::<i64>()
            .into_vec::<i64>()
            .map_err(|e| format!("{e:?}"))
    }
}
