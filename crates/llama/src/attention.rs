//! Self-attention as transformers' eager `LlamaAttention`: GQA, RoPE, an additive mask
//! (causal AND key padding), softmax in f32, and a KV cache for generation.

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Bool, DType, FloatDType, Int, Tensor};
use peft_lora::{LoraCtx, LoraLinear, LoraModel};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope;
use crate::weights::VarBuilder;

/// Added to the scores of masked keys. Finite, so a query row whose keys are all masked (a
/// padding position) gets a uniform distribution instead of NaN.
pub const MASKED: f32 = -1e9;

/// Cached keys (after RoPE) and values of one layer, `[batch, kv_heads, past, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Keys.
    pub k: Tensor<B, 4>,
    /// Values.
    pub v: Tensor<B, 4>,
}

/// The additive attention mask, f32: 0 where query `i` may see key `j`, [`MASKED`] elsewhere.
///
/// Query `i` sits at absolute step `past + i`; it sees keys `j <= past + i` whose
/// `attention_mask` (`[batch, past + seq]`, 1 = token, 0 = padding) is 1.
///
/// # Shapes
/// Returns `[batch, 1, seq, past + seq]` (`[1, 1, seq, past + seq]` without `attention_mask`).
pub fn additive_mask<B: Backend>(
    attention_mask: Option<&Tensor<B, 2, Int>>,
    seq: usize,
    past: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = past + seq;
    let causal = Tensor::<B, 2, Bool>::tril_mask([seq, t], past as i64, device);
    let mask = Tensor::<B, 2>::zeros([seq, t], (device, DType::F32))
        .mask_fill(causal, MASKED)
        .reshape([1, 1, seq, t]);
    match attention_mask {
        None => mask,
        Some(am) => {
            let [b, mt] = am.dims();
            assert_eq!(
                mt, t,
                "attention_mask covers {mt} positions; past + seq = {t}"
            );
            let pad = am.clone().equal_elem(0);
            let pad = Tensor::<B, 2>::zeros([b, t], (device, DType::F32))
                .mask_fill(pad, MASKED)
                .reshape([b, 1, 1, t]);
            mask + pad
        }
    }
}

/// Self-attention with grouped KV heads (`model.layers.N.self_attn`).
#[derive(Module, Debug, LoraModel)]
pub struct Attention<B: Backend> {
    /// Query projection `[hidden, heads * head_dim]`.
    pub q_proj: LoraLinear<B>,
    /// Key projection `[hidden, kv_heads * head_dim]`.
    pub k_proj: LoraLinear<B>,
    /// Value projection `[hidden, kv_heads * head_dim]`.
    pub v_proj: LoraLinear<B>,
    /// Output projection `[heads * head_dim, hidden]`.
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

/// A projection from the checkpoint (`name.weight` `[out, in]`, optional `name.bias`), in NF4
/// when `vb` says so ([`VarBuilder::with_nf4`]).
pub fn load_linear<B: Backend>(
    vb: &VarBuilder<'_, B>,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<LoraLinear<B>> {
    let b = if bias {
        Some(vb.get("bias", [d_out])?)
    } else {
        None
    };
    if vb.nf4() {
        let q = vb.linear_weight_nf4(d_in, d_out)?;
        return Ok(LoraLinear::from_nf4(&q, b, vb.device()));
    }
    let w = vb.linear_weight(d_in, d_out)?;
    Ok(LoraLinear::from_weight(w, b))
}

/// A projection with N(0, 0.02) weights (transformers' `initializer_range`) and zero bias.
pub fn random_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> LoraLinear<B> {
    let w = Tensor::random(
        [d_in, d_out],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        device,
    );
    LoraLinear::from_weight(w, bias.then(|| Tensor::zeros([d_out], device)))
}

impl<B: Backend> Attention<B> {
    /// From a checkpoint (`vb` at `model.layers.N.self_attn`).
    pub fn load(vb: &VarBuilder<'_, B>, c: &LlamaConfig) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        Ok(Attention {
            q_proj: load_linear(&vb.pp("q_proj"), h, q, c.attention_bias)?,
            k_proj: load_linear(&vb.pp("k_proj"), h, kv, c.attention_bias)?,
            v_proj: load_linear(&vb.pp("v_proj"), h, kv, c.attention_bias)?,
            o_proj: load_linear(&vb.pp("o_proj"), q, h, c.attention_bias)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
    }

    /// Random weights.
    pub fn random(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        Attention {
            q_proj: random_linear(h, q, c.attention_bias, device),
            k_proj: random_linear(h, kv, c.attention_bias, device),
            v_proj: random_linear(h, kv, c.attention_bias, device),
            o_proj: random_linear(q, h, c.attention_bias, device),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// Attention over the new tokens `x` and the cached `past`, if any. Returns the output and
    /// the keys/values of past and new tokens (the next step's cache; tensor handles, no copy
    /// when unused).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos, sin: `[batch, 1, seq, head_dim]`
    /// - mask: additive f32 `[batch or 1, 1, seq, past + seq]` ([`additive_mask`])
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        past: Option<&KvCache<B>>,
        ctx: &LoraCtx,
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, s, n * hd] -> [b, n, s, hd]
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        // RoPE fused with the split into heads: one kernel each way on CUDA.
        let rotary = |t: Tensor<B, 3>, n: usize| {
            if let Some(r) = crate::ops::rope(&t, n, cos, sin) {
                return r;
            }
            rope::apply(heads(t, n), cos, sin)
        };
        let q = rotary(self.q_proj.forward_ctx(x.clone(), ctx), nh);
        let mut k = rotary(self.k_proj.forward_ctx(x.clone(), ctx), nkv);
        let mut v = heads(self.v_proj.forward_ctx(x, ctx), nkv);
        if let Some(c) = past {
            k = Tensor::cat(vec![c.k.clone(), k], 2);
            v = Tensor::cat(vec![c.v.clone(), v], 2);
        }
        let next = KvCache {
            k: k.clone(),
            v: v.clone(),
        };
        let t = k.dims()[2];
        // GQA without copying K/V: the `rep` query heads of KV head g are heads g*rep..(g+1)*rep
        // (transformers' repeat_kv), so fold them into the query-length axis.
        let rep = nh / nkv;
        let q = q.reshape([b, nkv, rep * s, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        // On CUDA: one op with cuBLASLt GEMMs and a recomputing backward (no [s, t] kept).
        let fused = crate::ops::attention(&q, &k, &v, mask, scale);
        let out = fused.unwrap_or_else(|| {
            let scores = q.matmul(k.swap_dims(2, 3)) * scale; // [b, nkv, rep*s, t]
            let scores = scores.reshape([b, nh, s, t]);
            let dtype = scores.dtype();
            let probs =
                activation::softmax(scores.cast(FloatDType::F32) + mask.clone(), 3).cast(dtype);
            probs.reshape([b, nkv, rep * s, t]).matmul(v) // [b, nkv, rep*s, hd]
        });
        let out = out
            .reshape([b, nh, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, nh * hd]);
        (self.o_proj.forward_ctx(out, ctx), next)
    }
}
