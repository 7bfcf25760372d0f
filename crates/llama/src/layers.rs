//! The pieces of a decoder layer: RMSNorm, attention (GQA, RoPE, KV cache), SwiGLU MLP.
//! Every projection is a [`LoraLinear`] so `peft-lora` can adapt it.

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};
use peft_lora::{LoraCtx, LoraLinear};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope;
use crate::weights::VarBuilder;

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// epsilon.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// From a checkpoint.
    pub fn load(vb: &VarBuilder<'_, B>, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.frozen("weight", [size])?,
            eps,
        })
    }

    /// Ones (a fresh norm).
    pub fn ones(size: usize, eps: f64, device: &B::Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([size], device)).set_require_grad(false),
            eps,
        }
    }

    /// # Shapes
    /// `[batch, seq, hidden]` -> same.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let var = x.clone().powf_scalar(2.0).mean_dim(2);
        let x = x * (var + self.eps).sqrt().recip();
        x * self.weight.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0)
    }
}

/// Cached keys and values of one layer, `[batch, kv_heads, past, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Keys (after RoPE).
    pub k: Tensor<B, 4>,
    /// Values.
    pub v: Tensor<B, 4>,
}

/// Self-attention with grouped KV heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub q_proj: LoraLinear<B>,
    /// Key projection.
    pub k_proj: LoraLinear<B>,
    /// Value projection.
    pub v_proj: LoraLinear<B>,
    /// Output projection.
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

/// A projection from the checkpoint (`name.weight` [out, in], optional `name.bias`).
pub fn load_linear<B: Backend>(vb: &VarBuilder<'_, B>, d_in: usize, d_out: usize, bias: bool) -> Result<LoraLinear<B>> {
    let w = vb.linear_weight(d_in, d_out)?;
    let b = if bias { Some(vb.get("bias", [d_out])?) } else { None };
    Ok(LoraLinear::from_weight(w, b))
}

fn random_linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> LoraLinear<B> {
    let w = Tensor::random([d_in, d_out], burn::tensor::Distribution::Normal(0.0, 0.02), device);
    LoraLinear::from_weight(w, bias.then(|| Tensor::zeros([d_out], device)))
}

impl<B: Backend> Attention<B> {
    /// From a checkpoint (`vb` at `model.layers.N.self_attn`).
    pub fn load(vb: &VarBuilder<'_, B>, c: &LlamaConfig) -> Result<Self> {
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
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

    /// Random weights (N(0, 0.02), as transformers initialises).
    pub fn random(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, q, kv) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
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

    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos/sin: `[batch, 1, seq, head_dim]`;
    /// - mask: additive `[batch, 1, seq, past + seq]`; returns `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        cache: Option<&mut KvCache<B>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = rope::apply(heads(self.q_proj.forward_ctx(x.clone(), ctx), nh), cos, sin);
        let mut k = rope::apply(heads(self.k_proj.forward_ctx(x.clone(), ctx), nkv), cos, sin);
        let mut v = heads(self.v_proj.forward_ctx(x, ctx), nkv);
        if let Some(c) = cache {
            if c.k.dims()[2] > 0 {
                k = Tensor::cat(vec![c.k.clone(), k], 2);
                v = Tensor::cat(vec![c.v.clone(), v], 2);
            }
            c.k = k.clone();
            c.v = v.clone();
        }
        let t = k.dims()[2];
        // GQA: each KV head serves num_heads / num_kv_heads query heads.
        let rep = nh / nkv;
        let expand = |t4: Tensor<B, 4>| -> Tensor<B, 4> {
            if rep == 1 {
                t4
            } else {
                t4.unsqueeze_dim::<5>(2).repeat_dim(2, rep).reshape([b, nh, t, hd])
            }
        };
        let (k, v) = (expand(k), expand(v));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt() + mask.clone(); // [b, nh, s, t]
        let probs = activation::softmax(scores, 3);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, s, nh * hd]);
        self.o_proj.forward_ctx(out, ctx)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection.
    pub gate_proj: LoraLinear<B>,
    /// Up projection.
    pub up_proj: LoraLinear<B>,
    /// Down projection.
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// From a checkpoint (`vb` at `model.layers.N.mlp`).
    pub fn load(vb: &VarBuilder<'_, B>, c: &LlamaConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate_proj: load_linear(&vb.pp("gate_proj"), h, i, c.mlp_bias)?,
            up_proj: load_linear(&vb.pp("up_proj"), h, i, c.mlp_bias)?,
            down_proj: load_linear(&vb.pp("down_proj"), i, h, c.mlp_bias)?,
        })
    }

    /// Random weights.
    pub fn random(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Mlp {
            gate_proj: random_linear(h, i, c.mlp_bias, device),
            up_proj: random_linear(h, i, c.mlp_bias, device),
            down_proj: random_linear(i, h, c.mlp_bias, device),
        }
    }

    /// `[batch, seq, hidden]` -> same.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LoraCtx) -> Tensor<B, 3> {
        let gate = activation::silu(self.gate_proj.forward_ctx(x.clone(), ctx));
        self.down_proj.forward_ctx(gate * self.up_proj.forward_ctx(x, ctx), ctx)
    }
}
