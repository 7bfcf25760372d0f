//! `LlamaForCausalLM`: module paths equal Hugging Face tensor names.

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};
use peft_lora::{LoraCtx, LoraLinear, LoraModel};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::hub::ModelFiles;
use crate::layers::{Attention, KvCache, Mlp, RmsNorm};
use crate::rope;
use crate::weights::{Checkpoint, VarBuilder};

/// Token embedding table `[vocab, hidden]` (`model.embed_tokens.weight`).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// One decoder layer (pre-norm attention and MLP with residuals).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: Attention<B>,
    /// MLP.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

/// The decoder stack (`model.*`).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// Llama with its language-model head.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// Output head in Burn layout `[hidden, vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// Resolved config.
    #[module(skip)]
    pub config: LlamaConfig,
    /// RoPE inverse frequencies.
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

/// Loss options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossOptions {
    /// Run the LM head only at positions with a label (the 128k-vocab logits are the largest
    /// activation of training; this skips prompt positions).
    pub head_only_on_labels: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            head_only_on_labels: true,
        }
    }
}

/// Large negative added to masked attention scores.
const MASKED: f32 = -1e9;

/// Host copy of an int tensor.
pub(crate) fn ints<B: Backend, const D: usize>(t: &Tensor<B, D, Int>) -> Vec<i64> {
    t.to_data().convert::<i64>().to_vec::<i64>().expect("int data")
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Loads a checkpoint (config + safetensors, bf16/f16/f32) into the backend's float type.
    pub fn load(files: &ModelFiles, device: &B::Device) -> Result<Self> {
        let cfg = LlamaConfig::from_hf_file(&files.config)?;
        let ckpt = Checkpoint::open(&files.weights)?;
        let vb = VarBuilder::<B>::new(&ckpt, device);
        let m = vb.pp("model");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp(format!("layers.{i}"));
            layers.push(DecoderLayer {
                self_attn: Attention::load(&l.pp("self_attn"), &cfg)?,
                mlp: Mlp::load(&l.pp("mlp"), &cfg)?,
                input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), h, eps)?,
                post_attention_layernorm: RmsNorm::load(&l.pp("post_attention_layernorm"), h, eps)?,
            });
        }
        let embed = m.pp("embed_tokens").frozen("weight", [cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = vb.pp("lm_head").linear_weight(h, cfg.vocab_size)?;
            Some(Param::from_tensor(w).set_require_grad(false))
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: Embedding { weight: embed },
                layers,
                norm: RmsNorm::load(&m.pp("norm"), h, eps)?,
            },
            lm_head,
            inv_freq: rope::inv_freq(&cfg),
            config: cfg,
        })
    }

    /// Random weights (N(0, 0.02) linears and embeddings, unit norms), for tests and benchmarks.
    pub fn random(cfg: &LlamaConfig, device: &B::Device) -> Self {
        let h = cfg.hidden_size;
        let frozen = |t: Tensor<B, 2>| Param::from_tensor(t).set_require_grad(false);
        let normal = |shape: [usize; 2]| Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 0.02), device);
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: Embedding {
                    weight: frozen(normal([cfg.vocab_size, h])),
                },
                layers: (0..cfg.num_layers)
                    .map(|_| DecoderLayer {
                        self_attn: Attention::random(cfg, device),
                        mlp: Mlp::random(cfg, device),
                        input_layernorm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
                        post_attention_layernorm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
                    })
                    .collect(),
                norm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
            },
            lm_head: (!cfg.tie_word_embeddings).then(|| frozen(normal([h, cfg.vocab_size]))),
            inv_freq: rope::inv_freq(cfg),
            config: cfg.clone(),
        }
    }

    /// The head weight in Burn layout `[hidden, vocab]`.
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.val(),
            None => self.model.embed_tokens.weight.val().transpose(),
        }
    }

    /// The additive attention mask `[batch, 1, seq, past + seq]`: causal and key padding.
    fn mask(&self, key_mask: Option<&[i64]>, b: usize, s: usize, past: usize, device: &B::Device) -> Tensor<B, 4> {
        let t = past + s;
        let mut m = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                for j in 0..t {
                    let causal = j <= past + i;
                    let key_ok = key_mask.is_none_or(|km| km[r * t + j] != 0);
                    if !(causal && key_ok) {
                        m[(r * s + i) * t + j] = MASKED;
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [b, 1, s, t]), device)
    }

    /// Final hidden states `[batch, seq, hidden]`.
    ///
    /// `attention_mask` covers past and new tokens `[batch, past + seq]` (1 = token, 0 = pad);
    /// `position_ids` defaults to `past..past + seq` for every row (HF's plain forward).
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut Vec<KvCache<B>>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let h = self.config.hidden_size;
        let past = cache.as_ref().and_then(|c| c.first()).map_or(0, |c| c.k.dims()[2]);
        let positions = position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(past as i64..(past + s) as i64, &device)
                .unsqueeze_dim::<2>(0)
                .repeat_dim(0, b)
        });
        let (cos, sin) = rope::cos_sin(&self.inv_freq, positions);
        let key_mask = attention_mask.as_ref().map(ints);
        let mask = self.mask(key_mask.as_deref(), b, s, past, &device);
        let ids = input_ids.reshape([b * s]);
        let mut x = self.model.embed_tokens.weight.val().select(0, ids).reshape([b, s, h]);
        if let Some(c) = cache.as_mut() {
            if c.is_empty() {
                let empty = || Tensor::zeros([b, self.config.num_kv_heads, 0, self.config.head_dim], &device);
                c.extend((0..self.config.num_layers).map(|_| KvCache { k: empty(), v: empty() }));
            }
        }
        for (i, layer) in self.model.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c[i]);
            let attn = layer.self_attn.forward(layer.input_layernorm.forward(x.clone()), &cos, &sin, &mask, kv, ctx);
            x = x + attn;
            x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x), ctx);
        }
        self.model.norm.forward(x)
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, attention_mask: Option<Tensor<B, 2, Int>>, ctx: &LoraCtx) -> Tensor<B, 3> {
        self.forward_with_positions(input_ids, attention_mask, None, ctx)
    }

    /// Logits with explicit position ids `[batch, seq]`.
    pub fn forward_with_positions(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids, None, ctx);
        let [b, s, h] = hidden.dims();
        hidden.reshape([b * s, h]).matmul(self.head_weight()).reshape([b, s, self.config.vocab_size])
    }

    /// HF's causal-LM loss: logits at position t predict labels at t + 1; -100 is ignored; mean
    /// over labelled tokens. Shape `[1]`.
    pub fn loss(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        labels: Tensor<B, 2, Int>,
        opts: LossOptions,
        ctx: &LoraCtx,
    ) -> Tensor<B, 1> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let hidden = self.hidden_states(input_ids, attention_mask, None, None, ctx);
        let h = self.config.hidden_size;
        let hidden = hidden.slice([0..b, 0..s - 1, 0..h]).reshape([b * (s - 1), h]);
        let shifted: Vec<i64> = ints(&labels.slice([0..b, 1..s]).reshape([b * (s - 1)]));
        let keep: Vec<i64> = (0..shifted.len()).filter(|&i| shifted[i] != -100).map(|i| i as i64).collect();
        let n = keep.len().max(1);
        let targets: Vec<i64> = keep.iter().map(|&i| shifted[i as usize]).collect();
        let (rows, targets) = if opts.head_only_on_labels {
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.clone(), [keep.len()]), &device);
            (hidden.select(0, idx), targets)
        } else {
            let all: Vec<i64> = shifted.iter().map(|&t| if t == -100 { 0 } else { t }).collect();
            (hidden, all)
        };
        let logits = rows.matmul(self.head_weight());
        let logp = activation::log_softmax(logits, 1);
        let [m, _] = logp.dims();
        let t = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [m]), &device);
        let picked: Tensor<B, 1> = logp.gather(1, t.unsqueeze_dim::<2>(1)).reshape([m]);
        let picked = if opts.head_only_on_labels {
            picked
        } else {
            let w: Vec<f32> = shifted.iter().map(|&t| if t == -100 { 0.0 } else { 1.0 }).collect();
            picked * Tensor::<B, 1>::from_data(TensorData::new(w, [m]), &device)
        };
        -picked.sum() / n as f64
    }
}

impl<B: Backend> LoraModel<B> for LlamaForCausalLM<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.model.layers.len() * 7);
        for (i, l) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (n, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                out.push((format!("{p}.self_attn.{n}"), lin));
            }
            for (n, lin) in [("gate_proj", &l.mlp.gate_proj), ("up_proj", &l.mlp.up_proj), ("down_proj", &l.mlp.down_proj)] {
                out.push((format!("{p}.mlp.{n}"), lin));
            }
        }
        out
    }

    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.model.layers.len() * 7);
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }
}
