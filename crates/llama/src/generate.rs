//! Generation with a KV cache: greedy or sampling (temperature, top-k, top-p, seed), several
//! stop ids, `min_new_tokens`, batched prompts (left-padded here, positions from the mask as
//! transformers' `generate` derives them), and a per-token callback for streaming.
//!
//! The cache is allocated once for the prompt and `max_new_tokens`, the token is chosen on the
//! device (the `choose` module) and only the ids come back to the host, one small read per step.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use peft_lora::LoraCtx;
use rand::{Rng, SeedableRng};

use crate::choose::choose;
use crate::error::{Error, Result};
pub use crate::gen_config::GenerationConfig;
use crate::gen_state::{check_offsets, GenState};
use crate::model::LlamaForCausalLM;
use crate::ops::IdsRead;

impl<B: Backend> LlamaForCausalLM<B> {
    /// Generates continuations of `prompts` (token ids, unpadded; they are left-padded here).
    ///
    /// Returns the new tokens of each row, its stop id included. `on_token(row, id)` sees each
    /// token as it is chosen (streaming). `ctx` routes rows to adapters. An aLoRA adapter acts
    /// from the last invocation sequence of each prompt on, and on every generated token of a
    /// row whose prompt has it (PEFT's `generate`); rows without it run as the base.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        ctx: &LoraCtx,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        cfg.validate()?;
        let mut state = self.prefill_reserving(prompts, cfg.pad_id, cfg.max_new_tokens, ctx)?;
        // The state is not returned: rows that finish leave the batch.
        self.decode_rows(&mut state, cfg, ctx, on_token, true)
    }

    /// Generates from a cached state ([`Self::prefill`], [`Self::extend`]) and leaves the
    /// state after the new tokens. Each step's aLoRA offsets follow the state (a row adapted
    /// so far stays adapted) unless `ctx.alora_offsets` gives them.
    pub fn decode(
        &self,
        state: &mut GenState<B>,
        cfg: &GenerationConfig,
        ctx: &LoraCtx,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        self.decode_rows(state, cfg, ctx, on_token, false)
    }

    /// [`Self::decode`]; with `compact`, once half the rows still in the batch have finished,
    /// they leave it ([`GenState::retain_rows`]), so the state ends with the unfinished rows
    /// only.
    fn decode_rows(
        &self,
        state: &mut GenState<B>,
        cfg: &GenerationConfig,
        ctx: &LoraCtx,
        on_token: &mut dyn FnMut(usize, u32),
        compact: bool,
    ) -> Result<Vec<Vec<u32>>> {
        cfg.validate()?;
        let vocab = self.config.vocab_size;
        if cfg.pad_id as usize >= vocab {
            return Err(Error::Generation(format!(
                "token id {} is outside the vocabulary (size {vocab})",
                cfg.pad_id
            )));
        }
        let b = state.batch();
        check_offsets(ctx, b)?;
        // PEFT reuses the prompt's offsets for every cached step: with one new token per step,
        // a row is adapted iff its adapter was invoked.
        let step_ctx = LoraCtx {
            alora_offsets: Some(match &ctx.alora_offsets {
                Some(o) => o.clone(),
                None => state.alora_start.iter().map(|s| s.map(|_| 1)).collect(),
            }),
            ..ctx.clone()
        };
        state.reserve(cfg.max_new_tokens + usize::from(state.pending.is_some()));
        if let Some(p) = state.pending.take() {
            let chunk: Vec<Vec<u32>> = p.into_iter().map(|t| vec![t]).collect();
            self.feed(state, &chunk, &step_ctx);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        // The caller's row of each row of the state.
        let mut live: Vec<usize> = (0..b).collect();
        let mut step_ctx = step_ctx;
        for step in 0..cfg.max_new_tokens {
            let last = step + 1 == cfg.max_new_tokens;
            let logits = self.lm_head(state.last_hidden.clone());
            let suppress: Vec<bool> = live
                .iter()
                .map(|&r| !done[r] && out[r].len() < cfg.min_new_tokens)
                .collect();
            let uniform: Vec<f32> = match cfg.do_sample {
                true => (0..live.len()).map(|_| rng.random()).collect(),
                false => vec![],
            };
            // Rows that finished earlier are fed the pad id.
            let mut ids = choose(logits, cfg, &suppress, &uniform);
            if live.iter().any(|&r| done[r]) {
                let finished: Vec<bool> = live.iter().map(|&r| done[r]).collect();
                let finished = Tensor::<B, 1, Bool>::from_data(
                    TensorData::new(finished, [live.len()]),
                    &ids.device(),
                );
                ids = ids.mask_fill(finished, cfg.pad_id as i64);
            }
            let read = IdsRead::start(ids.clone());
            // When the state is not handed back (`compact`), the next step is queued before the
            // host waits for this step's ids: where the ids' copy is under way already
            // (`IdsRead::start` on CUDA), the device runs that step while the host reads them;
            // elsewhere the read waits for it too, which costs what waiting first would (one
            // host pass and one wait per step). One step's work is wasted once every row has
            // stopped. A state handed back keeps its last tokens pending instead, so there the
            // host waits first.
            let ahead = compact && !last;
            if ahead {
                // (Clamped: an id outside the vocabulary is reported below, once read, and must
                // not reach the embedding first.)
                let fed = ids.clamp(0, vocab as i64 - 1).unsqueeze_dim(1);
                self.feed_ids(state, fed, &step_ctx);
            }
            let picks = read
                .wait()
                .map_err(|e| Error::Data(format!("token ids: {e}")))?;
            if let Some(bad) = picks.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(Error::Generation(format!(
                    "step {step} chose token id {bad}, outside the vocabulary (size {vocab}): \
                     the logits are not finite or the sampler failed"
                )));
            }
            let mut chosen = Vec::with_capacity(live.len());
            for (&r, &tok) in live.iter().zip(&picks) {
                let tok = tok as u32;
                if !done[r] {
                    out[r].push(tok);
                    on_token(r, tok);
                    done[r] = cfg.stop_ids.contains(&tok);
                }
                chosen.push(tok);
            }
            if ahead {
                for (t, &tok) in state.tokens.iter_mut().zip(&chosen) {
                    t.push(tok);
                }
            }
            // The last tokens wait in the state (a later extend or decode feeds them) rather
            // than cost a forward nobody reads.
            if live.iter().all(|&r| done[r]) || last {
                if !ahead {
                    state.pending = Some(chosen);
                }
                break;
            }
            let finished = live.iter().filter(|&&r| done[r]).count();
            if compact && 2 * finished >= live.len() {
                let keep: Vec<usize> = (0..live.len()).filter(|&i| !done[live[i]]).collect();
                state.retain_rows(&keep);
                step_ctx = LoraCtx {
                    row_adapters: step_ctx
                        .row_adapters
                        .map(|v| keep.iter().map(|&i| v[i].clone()).collect()),
                    alora_offsets: step_ctx
                        .alora_offsets
                        .map(|v| keep.iter().map(|&i| v[i]).collect()),
                };
                chosen = keep.iter().map(|&i| chosen[i]).collect();
                live = keep.iter().map(|&i| live[i]).collect();
            }
            if !ahead {
                let chunk: Vec<Vec<u32>> = chosen.into_iter().map(|t| vec![t]).collect();
                self.feed(state, &chunk, &step_ctx);
            }
        }
        Ok(out)
    }
}
