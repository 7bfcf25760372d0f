//! A generation in progress, kept between calls: the KV cache, its mask and the tokens it
//! covers. It lets one model continue where another call stopped, which is what aLoRA is for:
//! a prefix cached by the **base** model is reused as is by an aLoRA adapter that is invoked
//! after it (everything before the invocation is computed by the base weights anyway).
//!
//! ```ignore
//! let base = LoraCtx { row_adapters: Some(vec![None]), ..Default::default() };
//! let mut st = model.prefill(&[context_ids], pad, &base)?;      // the base reads the context
//! model.extend(&mut st, &[invocation_ids], &LoraCtx::default())?; // aLoRA from here on
//! let answer = model.decode(&mut st, &greedy, &LoraCtx::default(), &mut |_, _| {})?;
//! ```

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use peft_lora::alora_offsets;
use peft_lora::LoraCtx;

use crate::attention::{grown_capacity, KvCache};
use crate::error::{Error, Result};
use crate::model::{position_ids_from_mask, LlamaForCausalLM};

/// The state of a batch of generations: what the KV cache holds and how to continue it.
#[derive(Debug, Clone)]
pub struct GenState<B: Backend> {
    /// One cache per layer, `[batch, kv_heads, capacity, head_dim]` with `cached` positions
    /// filled (left padding included).
    pub cache: Vec<KvCache<B>>,
    /// 1 for a real token, 0 for left padding and for room not filled yet, `[batch, capacity]`.
    pub mask: Tensor<B, 2, Int>,
    /// The tokens of each row in the cache, without padding.
    pub tokens: Vec<Vec<u32>>,
    /// Per row, the index in `tokens` from which the cache was computed with an aLoRA adapter
    /// (`None`: no aLoRA adapter acted on this row).
    pub alora_start: Vec<Option<usize>>,
    /// Hidden state of the last cached position of each row `[batch, hidden]`.
    pub(crate) last_hidden: Tensor<B, 2>,
    /// Tokens chosen by the last step of [`LlamaForCausalLM::decode`] (every row stopped, or
    /// `max_new_tokens` reached), not fed yet.
    pub(crate) pending: Option<Vec<u32>>,
}

impl<B: Backend> GenState<B> {
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens chosen by the last decode but not yet in the cache (they are fed first by the
    /// next [`LlamaForCausalLM::extend`] or [`LlamaForCausalLM::decode`]).
    pub fn pending(&self) -> Option<&[u32]> {
        self.pending.as_deref()
    }

    /// Positions in the cache (left padding included).
    pub fn cached(&self) -> usize {
        self.cache.first().map_or(0, |c| c.len)
    }

    /// Positions the cache can hold without growing.
    pub fn capacity(&self) -> usize {
        self.mask.dims()[1]
    }

    /// Makes room for `extra` more positions in one allocation, so that feeding them changes no
    /// tensor's shape and copies nothing ([`LlamaForCausalLM::decode`] reserves its
    /// `max_new_tokens`; reserve more before a series of [`LlamaForCausalLM::extend`] calls).
    pub fn reserve(&mut self, extra: usize) {
        self.grow_to(self.cached() + extra);
    }

    /// Room for `extra` more positions, growing as the cache's own reservation does
    /// ([`KvCache::reserve`]).
    fn make_room(&mut self, extra: usize) {
        let need = self.cached() + extra;
        if need > self.capacity() {
            self.grow_to(grown_capacity(self.capacity(), need));
        }
    }

    /// Keeps only rows `keep` (indices into the batch, in the order given) and drops the others'
    /// cache: the rest of a generation whose other rows have finished costs only its own rows.
    pub fn retain_rows(&mut self, keep: &[usize]) {
        let device = self.mask.device();
        let ids: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [keep.len()]), &device);
        for c in &mut self.cache {
            c.k = c.k.clone().select(0, idx.clone());
            c.v = c.v.clone().select(0, idx.clone());
        }
        self.mask = self.mask.clone().select(0, idx.clone());
        self.last_hidden = self.last_hidden.clone().select(0, idx);
        self.tokens = keep.iter().map(|&r| self.tokens[r].clone()).collect();
        self.alora_start = keep.iter().map(|&r| self.alora_start[r]).collect();
        if let Some(p) = &self.pending {
            self.pending = Some(keep.iter().map(|&r| p[r]).collect());
        }
    }

    /// Capacity `cap` exactly, when larger than today's.
    fn grow_to(&mut self, cap: usize) {
        let old = self.capacity();
        if cap <= old {
            return;
        }
        let cached = self.cached();
        self.cache
            .iter_mut()
            .for_each(|c| c.reserve_exact(cap - cached));
        let [b, _] = self.mask.dims();
        let room = Tensor::zeros([b, cap - old], &self.mask.device());
        self.mask = Tensor::cat(vec![self.mask.clone(), room], 1);
    }
}

/// Explicit `ctx.alora_offsets` must have one entry per row.
pub(crate) fn check_offsets(ctx: &LoraCtx, batch: usize) -> Result<()> {
    match &ctx.alora_offsets {
        Some(o) if o.len() != batch => Err(Error::Generation(format!(
            "LoraCtx::alora_offsets has {} entries for a batch of {batch} rows",
            o.len()
        ))),
        _ => Ok(()),
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    fn check_ids<'a>(&self, ids: impl IntoIterator<Item = &'a u32>) -> Result<()> {
        let vocab = self.config.vocab_size;
        match ids.into_iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(Error::Generation(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Runs `prompts` (token ids, unpadded; left-padded here with `pad_id`) and keeps the cache.
    /// aLoRA offsets come from the prompts as PEFT's `generate` computes them, unless
    /// `ctx.alora_offsets` gives them.
    pub fn prefill(&self, prompts: &[Vec<u32>], pad_id: u32, ctx: &LoraCtx) -> Result<GenState<B>> {
        self.prefill_reserving(prompts, pad_id, 0, ctx)
    }

    /// [`Self::prefill`] with room for `reserve` more positions in the cache.
    pub(crate) fn prefill_reserving(
        &self,
        prompts: &[Vec<u32>],
        pad_id: u32,
        reserve: usize,
        ctx: &LoraCtx,
    ) -> Result<GenState<B>> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::Generation(
                "every prompt needs at least one token".into(),
            ));
        }
        self.check_ids(prompts.iter().flatten().chain([&pad_id]))?;
        check_offsets(ctx, prompts.len())?;
        let device = self.device();
        let b = prompts.len();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let padded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut row = vec![pad_id; len - p.len()];
                row.extend(p);
                row
            })
            .collect();
        let ids: Vec<i64> = padded.iter().flatten().map(|&t| t as i64).collect();
        let mask: Vec<i64> = prompts
            .iter()
            .flat_map(|p| {
                std::iter::repeat_n(0i64, len - p.len()).chain(std::iter::repeat_n(1, p.len()))
            })
            .collect();
        let mask = Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [b, len]), &device);
        let offsets = match &ctx.alora_offsets {
            Some(o) => o.clone(),
            None => {
                let rows: Vec<&[u32]> = padded.iter().map(Vec::as_slice).collect();
                alora_offsets(self, ctx, &rows).unwrap_or_else(|| vec![None; b])
            }
        };
        let alora_start = prompts
            .iter()
            .zip(&offsets)
            .map(|(p, o)| o.map(|o| p.len().saturating_sub(o)))
            .collect();
        let call = LoraCtx {
            alora_offsets: Some(offsets),
            ..ctx.clone()
        };
        let mut cache = Vec::new();
        let hidden = self.hidden_states_reserving(
            Tensor::from_data(TensorData::new(ids, [b, len]), &device),
            Some(mask.clone()),
            Some(position_ids_from_mask(mask.clone())),
            Some(&mut cache),
            reserve,
            &call,
        );
        let mask = match reserve {
            0 => mask,
            n => Tensor::cat(vec![mask, Tensor::zeros([b, n], &device)], 1),
        };
        Ok(GenState {
            cache,
            mask,
            tokens: prompts.to_vec(),
            alora_start,
            last_hidden: last_position(hidden),
            pending: None,
        })
    }

    /// Appends `chunk` (the same number of tokens for every row, e.g. an aLoRA invocation) to a
    /// cached state, computing only the new tokens.
    ///
    /// aLoRA offsets are those PEFT would compute over each whole row (cache + chunk). When
    /// they disagree with how the cache was computed (the invocation starts inside the cached
    /// part but the cache holds base keys/values there, or the cache holds adapter keys/values
    /// that a full run would not), this is an error rather than a silent mismatch. Explicit
    /// `ctx.alora_offsets` count from the end of the chunk (PEFT's meaning for one call) and
    /// are taken as given.
    pub fn extend(&self, state: &mut GenState<B>, chunk: &[Vec<u32>], ctx: &LoraCtx) -> Result<()> {
        let b = state.batch();
        if chunk.len() != b {
            return Err(Error::Generation(format!(
                "extend: {} chunks for a batch of {b} rows",
                chunk.len()
            )));
        }
        let mut chunk = chunk.to_vec();
        if let Some(p) = state.pending.take() {
            for (c, t) in chunk.iter_mut().zip(p) {
                c.insert(0, t);
            }
        }
        let k = chunk[0].len();
        if k == 0 || chunk.iter().any(|c| c.len() != k) {
            return Err(Error::Generation(
                "extend: every row's chunk needs the same number (at least one) of tokens".into(),
            ));
        }
        self.check_ids(chunk.iter().flatten())?;
        check_offsets(ctx, b)?;
        let offsets = match &ctx.alora_offsets {
            Some(o) => {
                for (r, o) in o.iter().enumerate() {
                    if let (Some(o), None) = (o, state.alora_start.get(r).copied().flatten()) {
                        state.alora_start[r] = Some(state.tokens[r].len() + k - (*o).min(k));
                    }
                }
                o.clone()
            }
            None => self.chunk_offsets(state, &chunk, ctx)?,
        };
        let call = LoraCtx {
            alora_offsets: Some(offsets),
            ..ctx.clone()
        };
        self.feed(state, &chunk, &call);
        Ok(())
    }

    /// Offsets of `chunk` from PEFT's offsets over the whole rows, checked against the cache.
    fn chunk_offsets(
        &self,
        state: &mut GenState<B>,
        chunk: &[Vec<u32>],
        ctx: &LoraCtx,
    ) -> Result<Vec<Option<usize>>> {
        let k = chunk[0].len();
        let full: Vec<Vec<u32>> = state
            .tokens
            .iter()
            .zip(chunk)
            .map(|(t, c)| t.iter().chain(c).copied().collect())
            .collect();
        let rows: Vec<&[u32]> = full.iter().map(Vec::as_slice).collect();
        let whole = alora_offsets(self, ctx, &rows).unwrap_or_else(|| vec![None; rows.len()]);
        let mut out = Vec::with_capacity(rows.len());
        for (r, o) in whole.into_iter().enumerate() {
            let cached = state.tokens[r].len();
            let start = o.map(|o| full[r].len() - o);
            let cache_start = state.alora_start[r];
            let consistent = match start {
                Some(s) if s < cached => cache_start == Some(s),
                _ => cache_start.is_none(),
            };
            if !consistent {
                return Err(Error::Generation(format!(
                    "row {r}: a full run would apply the aLoRA adapter from token {} but the \
                     cache was computed with it from token {} ({} tokens cached); the cached \
                     keys/values cannot be reused, prefill the row again",
                    start.map_or("- (nowhere)".into(), |s| s.to_string()),
                    cache_start.map_or("- (nowhere)".into(), |s| s.to_string()),
                    cached
                )));
            }
            if start.is_some() && cache_start.is_none() {
                state.alora_start[r] = start;
            }
            out.push(o.map(|o| o.min(k)));
        }
        Ok(out)
    }

    /// Runs `chunk` (`k` tokens per row) on top of the cache with `ctx` as given.
    pub(crate) fn feed(&self, state: &mut GenState<B>, chunk: &[Vec<u32>], ctx: &LoraCtx) {
        let (b, k) = (chunk.len(), chunk[0].len());
        let ids: Vec<i64> = chunk.iter().flatten().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, k]), &self.device());
        self.feed_ids(state, ids, ctx);
        for (t, c) in state.tokens.iter_mut().zip(chunk) {
            t.extend(c);
        }
    }

    /// Runs the device's token ids `[b, k]` on top of the cache with `ctx` as given (it must
    /// carry the aLoRA offsets, if any: the ids are not read). The caller appends the tokens to
    /// `state.tokens` (which positions the next chunk) once it knows them.
    pub(crate) fn feed_ids(&self, state: &mut GenState<B>, ids: Tensor<B, 2, Int>, ctx: &LoraCtx) {
        let device = self.device();
        let [b, k] = ids.dims();
        let pos: Vec<i64> = state
            .tokens
            .iter()
            .flat_map(|t| (t.len()..t.len() + k).map(|p| p as i64))
            .collect();
        let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(pos, [b, k]), &device);
        state.make_room(k);
        let at = state.cached();
        let ones = Tensor::ones([b, k], &device);
        state.mask = state.mask.clone().slice_assign([0..b, at..at + k], ones);
        let hidden = self.hidden_states(
            ids,
            Some(state.mask.clone()),
            Some(pos),
            Some(&mut state.cache),
            ctx,
        );
        state.last_hidden = last_position(hidden);
    }

    /// Logits of the next token of each row `[batch, vocab]`, from the cached state.
    pub fn next_logits(&self, state: &GenState<B>) -> Result<Tensor<B, 2>> {
        if state.pending.is_some() {
            return Err(Error::Generation(
                "the state has chosen tokens not fed yet; extend it first".into(),
            ));
        }
        Ok(self.lm_head(state.last_hidden.clone()))
    }
}

/// `[b, s, h]` -> the last position `[b, h]`.
fn last_position<B: Backend>(hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, s, h] = hidden.dims();
    hidden.slice([0..b, s - 1..s, 0..h]).reshape([b, h])
}
