//! `LlamaForCausalLM`: module paths equal Hugging Face tensor names
//! (`model.layers.0.self_attn.q_proj.weight`), so loading walks the checkpoint by path and
//! `peft-lora` sees HF module paths.

use burn::module::Module;
use burn::tensor::{backend::Backend, Distribution, Int, Tensor};
use peft_lora::{LoraCtx, LoraLinear, LoraModel, LoraModelHooks, TrainableTokens};

use crate::attention::{additive_mask, Attention, KvCache};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::hub::ModelFiles;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope;
use crate::weights::{Checkpoint, VarBuilder};

/// Token embedding table (`model.embed_tokens`): frozen `weight` `[vocab, hidden]`, plus the
/// rows that `trainable_token_indices` adapters train.
pub type Embedding<B> = TrainableTokens<B>;

/// The inputs every decoder layer reads (see [`LlamaForCausalLM::prologue`]).
pub(crate) struct Prologue<B: Backend> {
    /// Embedded tokens `[batch, seq, hidden]`.
    pub x: Tensor<B, 3>,
    /// RoPE cos, sin `[batch, 1, seq, head_dim]`.
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    /// Additive mask `[batch or 1, 1, seq, past + seq]`.
    pub mask: Tensor<B, 4>,
    /// Routing with the aLoRA offsets of this call.
    pub ctx: LoraCtx,
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Module, Debug, LoraModel)]
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

impl<B: Backend> DecoderLayer<B> {
    /// `x + attn(norm(x))`, then `+ mlp(norm(.))`; returns the output and this layer's KV cache
    /// with the new keys and values written in ([`Attention::forward`]).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        cache: Option<KvCache<B>>,
        ctx: &LoraCtx,
    ) -> (Tensor<B, 3>, Option<KvCache<B>>) {
        let (x, mlp, kv) = self.forward_parts(x, None, cos, sin, mask, cache, ctx);
        (x + mlp, kv)
    }

    /// [`Self::forward`] of the input `x + delta` (the previous layer's residual and its MLP
    /// output, not yet added: the add runs inside this layer's first norm), returning this
    /// layer's output in the same two parts, the residual and the MLP output.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_parts(
        &self,
        x: Tensor<B, 3>,
        delta: Option<Tensor<B, 3>>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        cache: Option<KvCache<B>>,
        ctx: &LoraCtx,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Option<KvCache<B>>) {
        let (x, normed, kv) = self.attention_parts(x, delta, cos, sin, mask, cache, ctx);
        (x, self.mlp.forward(normed, ctx), kv)
    }

    /// The attention half of [`Self::forward_parts`]: the residual after attention and its
    /// post-attention norm (the MLP's input), and the KV cache.
    #[allow(clippy::too_many_arguments)]
    fn attention_parts(
        &self,
        x: Tensor<B, 3>,
        delta: Option<Tensor<B, 3>>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        cache: Option<KvCache<B>>,
        ctx: &LoraCtx,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Option<KvCache<B>>) {
        let (x, normed) = match delta {
            Some(d) => self.input_layernorm.forward_residual(x, d),
            None => (x.clone(), self.input_layernorm.forward(x)),
        };
        let (attn, kv) = self.self_attn.forward(normed, cos, sin, mask, cache, ctx);
        let (x, normed) = self.post_attention_layernorm.forward_residual(x, attn);
        (x, normed, kv)
    }

    /// The forward of `x` (no cache) as the tensors a backward from the layer's output gradient
    /// `g` starts at, each with its gradient, flattened to `[batch * seq, width]`: `(output,
    /// g)`, or, when `down_proj` trains nothing in this call, `(residual after attention, g)`
    /// and `(down_proj's input, g W_down^T)`, or, when one plain LoRA adapter trains it (on
    /// CUDA with `PEFT_LORA_SEEDED_ADAPTERS=1`), its input, dropped-out input, `A` and `B` with
    /// their gradients ([`peft_lora::LoraLinear::backward_seeds`]). The last projection's output is then never
    /// computed: only the gradients it hands back are needed.
    pub(crate) fn backward_seeds(
        &self,
        x: Tensor<B, 3>,
        g: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        ctx: &LoraCtx,
    ) -> Vec<(Tensor<B, 2>, Tensor<B, 2>)> {
        let (residual, normed, _) = self.attention_parts(x, None, cos, sin, mask, None, ctx);
        let h = self.mlp.down_input(normed, ctx);
        let [batch, seq, _] = residual.dims();
        let flat = |t: Tensor<B, 3>| {
            let w = t.dims()[2];
            t.reshape([batch * seq, w])
        };
        let g2 = flat(g);
        let down = &self.mlp.down_proj;
        match down.backward_seeds(flat(h.clone()), g2.clone(), ctx) {
            Some(mut seeds) => {
                seeds.insert(0, (flat(residual), g2));
                seeds
            }
            None => vec![(flat(residual + down.forward_ctx(h, ctx)), g2)],
        }
    }
}

/// The decoder stack (`model.*`).
#[derive(Module, Debug, LoraModel)]
pub struct LlamaModel<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
}

/// Llama with its language-model head. Its LoRA layers are found by their field names
/// (`#[derive(LoraModel)]`), which are Hugging Face's module paths.
#[derive(Module, Debug, LoraModel)]
#[lora_model(hooks)]
pub struct LlamaForCausalLM<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// Output head, weight in Burn layout `[hidden, vocab]`, no bias (frozen; never a LoRA
    /// target, but `modules_to_save = ["lm_head"]` trains a copy of it); `None` when tied to
    /// the embedding.
    #[lora(head)]
    pub lm_head: Option<LoraLinear<B>>,
    /// Resolved config.
    #[module(skip)]
    pub config: LlamaConfig,
    /// RoPE inverse frequencies `[head_dim / 2]`.
    #[module(skip)]
    pub inv_freq: Vec<f32>,
}

/// `position_ids = cumsum(attention_mask) - 1`, clamped at 0, as transformers' `generate`
/// derives them for left-padded prompts.
///
/// # Shapes
/// `[batch, seq]` -> `[batch, seq]`
pub fn position_ids_from_mask<B: Backend>(attention_mask: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    (attention_mask.cumsum(1) - 1).clamp_min(0)
}

/// Runs `f` with the backend's allocations in persistent mode: each weight gets a buffer of its
/// own size. cubecl's default pool would slice weights out of large pages sized by the device's
/// memory (a 1 GB embedding lands in a page of a sixteenth of it, ~9 GB on an H200) and keep
/// the unused rest of those pages reserved for the whole run. Other backends just run `f`.
fn persistent<B: Backend, T: Send>(device: &B::Device, f: impl Fn() -> T + Send) -> T {
    B::memory_persistent_allocations(device, (), move |()| f())
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Loads a checkpoint (config + safetensors, bf16/f16/f32, single file or shards) into the
    /// backend's float type on `device`, one tensor at a time.
    pub fn load(files: &ModelFiles, device: &B::Device) -> Result<Self> {
        let cfg = LlamaConfig::from_hf_file(&files.config)?;
        Self::load_with_config(cfg, files, device)
    }

    /// Loads the weights of `files` for an already resolved config.
    pub fn load_with_config(
        cfg: LlamaConfig,
        files: &ModelFiles,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_inner(cfg, files, device, false)
    }

    /// Loads a checkpoint with every decoder linear (attention and MLP projections) stored in
    /// NF4, as transformers' `load_in_4bit` with bitsandbytes (`bnb_4bit_quant_type="nf4"`, no
    /// double quantization): each matrix is quantized on the host as it is read, so the dense
    /// weights never reach the device. Embeddings, norms and `lm_head` keep the float type.
    pub fn load_in_4bit(files: &ModelFiles, device: &B::Device) -> Result<Self> {
        let cfg = LlamaConfig::from_hf_file(&files.config)?;
        Self::load_inner(cfg, files, device, true)
    }

    /// Stores every decoder linear's frozen base in NF4 (see [`Self::load_in_4bit`]), e.g. after
    /// [`Self::random`]. Fails only if an adapter is merged into a layer.
    pub fn quantize_nf4(&mut self) -> Result<()> {
        for (path, lin) in self.lora_linears_mut() {
            lin.quantize_nf4(&path)?;
        }
        Ok(())
    }

    fn load_inner(
        cfg: LlamaConfig,
        files: &ModelFiles,
        device: &B::Device,
        nf4: bool,
    ) -> Result<Self> {
        persistent::<B, _>(device, move || Self::read(cfg.clone(), files, device, nf4))
    }

    fn read(cfg: LlamaConfig, files: &ModelFiles, device: &B::Device, nf4: bool) -> Result<Self> {
        let ckpt = Checkpoint::open(&files.weights)?;
        let vb = VarBuilder::<B>::new(&ckpt, device).with_nf4(nf4);
        let m = vb.pp("model");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let embed_tokens =
            Embedding::from_weight(m.pp("embed_tokens").get("weight", [cfg.vocab_size, h])?);
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
        let norm = RmsNorm::load(&m.pp("norm"), h, eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = vb.pp("lm_head").linear_weight(h, cfg.vocab_size)?;
            Some(LoraLinear::from_weight(w, None))
        };
        Ok(LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            inv_freq: rope::inv_freq(&cfg),
            config: cfg,
        })
    }

    /// Random weights (N(0, 0.02) linears and embeddings, unit norms), made on the device: tests,
    /// and benchmarks of the 8B shape without a checkpoint.
    pub fn random(cfg: &LlamaConfig, device: &B::Device) -> Self {
        Self::random_inner(cfg, device)
    }

    /// [`Self::random`] after seeding the backend's generator with `seed` (reproducible weights;
    /// the generator is global to the backend, so concurrent random ops interleave).
    pub fn random_seeded(cfg: &LlamaConfig, device: &B::Device, seed: u64) -> Self {
        B::seed(device, seed);
        Self::random_inner(cfg, device)
    }

    fn random_inner(cfg: &LlamaConfig, device: &B::Device) -> Self {
        persistent::<B, _>(device, move || Self::build_random(cfg, device))
    }

    fn build_random(cfg: &LlamaConfig, device: &B::Device) -> Self {
        let h = cfg.hidden_size;
        let normal =
            |shape: [usize; 2]| Tensor::random(shape, Distribution::Normal(0.0, 0.02), device);
        let embed_tokens = Embedding::from_weight(normal([cfg.vocab_size, h]));
        let layers = (0..cfg.num_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention::random(cfg, device),
                mlp: Mlp::random(cfg, device),
                input_layernorm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
            })
            .collect();
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm: RmsNorm::ones(h, cfg.rms_norm_eps, device),
            },
            lm_head: (!cfg.tie_word_embeddings)
                .then(|| LoraLinear::from_weight(normal([h, cfg.vocab_size]), None)),
            inv_freq: rope::inv_freq(cfg),
            config: cfg.clone(),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.device()
    }

    /// The head weight in Burn layout `[hidden, vocab]`: the trained `modules_to_save` copy
    /// when one runs, else the frozen head (the embedding's transpose when tied, with any
    /// trainable token rows written in; that copies the table).
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.live_weight(),
            None => self.model.embed_tokens.weight_view().transpose(),
        }
    }

    /// Whether the head's weight itself trains (a live `modules_to_save` copy of `lm_head`, or
    /// of a tied embedding): the fused frozen-head ops do not apply then.
    pub fn head_trains(&self) -> bool {
        match &self.lm_head {
            Some(head) => head.saved.live().is_some(),
            None => self.model.embed_tokens.saved.live().is_some(),
        }
    }

    /// Logits for hidden states: `[n, hidden]` -> `[n, vocab]`. A tied head follows the
    /// embedding's trainable token rows.
    pub fn lm_head(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) if head.saved.live().is_some() => hidden.matmul(head.live_weight()),
            Some(head) => {
                let w = head.weight.val();
                if let Some(logits) = crate::ops::frozen_linear(&hidden, &w) {
                    return logits;
                }
                hidden.matmul(w)
            }
            None => self.model.embed_tokens.project(hidden),
        }
    }

    /// Final hidden states (after `model.norm`).
    ///
    /// - `attention_mask` `[batch, past + seq]` (1 = token, 0 = padding) covers the cached past
    ///   and the new tokens; `None` means no padding.
    /// - `position_ids` `[batch, seq]` defaults to `past..past + seq` for every row, as HF's
    ///   plain forward does even for left-padded rows.
    /// - `cache`: one [`KvCache`] per layer, written in place (start with an empty `Vec`: the
    ///   buffers are made for this call's tokens; a cache without room for them grows, see
    ///   [`KvCache::reserve`]).
    /// - `ctx`: adapter routing. When an aLoRA adapter runs and `ctx.alora_offsets` is `None`,
    ///   the offsets are computed from `input_ids` as PEFT's forward does (the last occurrence
    ///   of the invocation sequence in each row of *this call*); with a cache, pass them
    ///   explicitly instead (generation does, see [`crate::GenState`]).
    ///
    /// With a non-empty cache, `attention_mask` may also cover the cache's whole capacity.
    ///
    /// # Shapes
    /// input_ids `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut Vec<KvCache<B>>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        self.hidden_states_reserving(input_ids, attention_mask, position_ids, cache, 0, ctx)
    }

    /// [`Self::hidden_states`], leaving room in a new cache for `reserve` more positions.
    pub(crate) fn hidden_states_reserving(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut Vec<KvCache<B>>>,
        reserve: usize,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let past = cache.as_ref().and_then(|c| c.first()).map_or(0, |c| c.len);
        // An empty cache attends over the new tokens only; a filled one over its whole buffer.
        let mut keys = past + s;
        if let Some(c) = cache.as_mut().filter(|c| !c.is_empty()) {
            c.iter_mut().for_each(|kv| kv.reserve(s));
            if past > 0 {
                keys = c[0].capacity();
            }
        }
        let p = self.prologue(input_ids, attention_mask, position_ids, past, keys, ctx);
        let mut x = p.x;
        if let Some(c) = cache.as_mut().filter(|c| c.is_empty()) {
            let c0 = &self.config;
            let shape = [b, c0.num_kv_heads, s + reserve, c0.head_dim];
            let (dtype, device) = (x.dtype(), x.device());
            c.extend(
                self.model
                    .layers
                    .iter()
                    .map(|_| KvCache::zeros(shape, dtype, &device)),
            );
        }
        let mut taken = cache.as_mut().map(|c| std::mem::take(*c).into_iter());
        let mut kept = Vec::new();
        // Each layer's output stays in two parts (residual, MLP output) that the next norm adds.
        let mut delta = None;
        for layer in self.model.layers.iter() {
            let kv = taken.as_mut().and_then(|t| t.next());
            let (res, mlp, kv) = layer.forward_parts(x, delta, &p.cos, &p.sin, &p.mask, kv, &p.ctx);
            kept.extend(kv);
            (x, delta) = (res, Some(mlp));
        }
        if let Some(c) = cache {
            *c = kept;
        }
        match delta {
            Some(d) => self.model.norm.forward_residual(x, d).1,
            None => self.model.norm.forward(x),
        }
    }

    /// What every decoder layer reads, for `past` cached positions: the embedded tokens, RoPE's
    /// cos/sin, the additive mask, and `ctx` with the aLoRA offsets filled in.
    pub(crate) fn prologue(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        past: usize,
        keys: usize,
        ctx: &LoraCtx,
    ) -> Prologue<B> {
        let [b, s] = input_ids.dims();
        let ctx = match ctx.alora_offsets {
            None => match self.alora_offsets(&input_ids, ctx) {
                Some(offsets) => LoraCtx {
                    alora_offsets: Some(offsets),
                    ..ctx.clone()
                },
                None => ctx.clone(),
            },
            Some(_) => ctx.clone(),
        };
        let device = input_ids.device();
        let positions = position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(past as i64..(past + s) as i64, &device)
                .unsqueeze_dim::<2>(0)
                .repeat_dim(0, b)
        });
        let x = self.model.embed_tokens.forward(input_ids);
        let (cos, sin) = rope::cos_sin(&self.inv_freq, positions, x.dtype());
        let mask = additive_mask(attention_mask.as_ref(), s, past, keys, &device);
        Prologue {
            x,
            cos,
            sin,
            mask,
            ctx,
        }
    }

    /// PEFT's aLoRA offsets of `input_ids` `[batch, seq]` for this call (`None` when no row runs
    /// an aLoRA adapter; the ids are read back from the device only then).
    pub fn alora_offsets(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        ctx: &LoraCtx,
    ) -> Option<Vec<Option<usize>>> {
        let [b, s] = input_ids.dims();
        let inv = peft_lora::alora_row_invocations(self, ctx, b)?;
        if s == 0 {
            return Some(vec![None; b]);
        }
        let ids: Vec<i64> = input_ids
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int tensor data converts to i64");
        Some(
            ids.chunks(s)
                .zip(inv)
                .map(|(row, inv)| inv.and_then(|i| peft_lora::invocation_offset(row, &i)))
                .collect(),
        )
    }

    /// Logits `[batch, seq, vocab]` with the active adapters on every row: the common case,
    /// [`Self::forward`] without routing (aLoRA offsets are computed from `input_ids`).
    ///
    /// # Shapes
    /// input_ids `[batch, seq]`, attention_mask `[batch, seq]` -> `[batch, seq, vocab]`
    pub fn logits(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.forward(input_ids, attention_mask, &LoraCtx::default())
    }

    /// Logits `[batch, seq, vocab]` (positions `0..seq` for every row, as HF's plain forward),
    /// with explicit routing.
    ///
    /// `ctx` routes batch rows to adapters (mixed-adapter batches) and may carry aLoRA offsets;
    /// `LoraCtx::default()` uses the active adapters everywhere (that is [`Self::logits`]).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        self.forward_with_positions(input_ids, attention_mask, None, ctx)
    }

    /// Logits with explicit `position_ids` `[batch, seq]` (e.g. [`position_ids_from_mask`]
    /// for left-padded rows).
    pub fn forward_with_positions(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        ctx: &LoraCtx,
    ) -> Tensor<B, 3> {
        let hidden = self.hidden_states(input_ids, attention_mask, position_ids, None, ctx);
        let [b, s, h] = hidden.dims();
        self.lm_head(hidden.reshape([b * s, h]))
            .reshape([b, s, self.config.vocab_size])
    }
}

impl<B: Backend> LoraModelHooks<B> for LlamaForCausalLM<B> {
    /// PEFT's `replicate_layers`: `model.layers` becomes the listed ranges of the current layers,
    /// numbered `0..` in the new order, and `config.num_layers` follows. The copies share the
    /// frozen weights (a `Param` clone is a reference-counted handle with the same id); the KV
    /// cache is indexed by the new position, as transformers' renumbered `layer_idx`.
    fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> peft_lora::Result<()> {
        let map = peft_lora::layer_map(ranges, self.model.layers.len())?;
        let layers = &self.model.layers;
        let new_layers: Vec<DecoderLayer<B>> = map.iter().map(|&i| layers[i].clone()).collect();
        self.model.layers = new_layers;
        self.config.num_layers = self.model.layers.len();
        Ok(())
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.config.vocab_size)
    }

    /// The forward computes the offsets from `input_ids` (generation from the prompt).
    fn supports_alora(&self) -> bool {
        true
    }
}
