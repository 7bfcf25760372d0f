//! Generation with a KV cache: greedy or sampling (temperature, top-k, top-p, seed), several
//! stop ids, `min_new_tokens`, batched prompts (left-padded here, positions from the mask as
//! transformers' `generate` derives them), and a per-token callback for streaming.

use burn::tensor::backend::Backend;
use peft_lora::LoraCtx;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::gen_state::{check_offsets, GenState};
use crate::model::LlamaForCausalLM;

/// Generation settings (transformers' `GenerationConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Stop ids are suppressed until a row has this many new tokens.
    pub min_new_tokens: usize,
    /// Sample; `false` is greedy (argmax, first index on ties).
    pub do_sample: bool,
    /// Softmax temperature (sampling; > 0).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches this (1.0 = all).
    pub top_p: f64,
    /// Sampling seed: the same seed, prompts and model give the same tokens.
    pub seed: u64,
    /// A row ends after any of these ids, which is kept in its output (Llama 3 instruct:
    /// `<|eot_id|>` 128009; see [`crate::tokenizer::stop_ids`]).
    pub stop_ids: Vec<u32>,
    /// Id used for left padding and for rows that have finished (never attended to).
    pub pad_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
            pad_id: 0,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`, stopping on `stop_ids`.
    pub fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> Self {
        GenerationConfig {
            max_new_tokens,
            stop_ids,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::Generation(format!(
                "temperature = {} must be a positive number when sampling (use do_sample = false for greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Generation(format!(
                "top_p = {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// transformers' sampling order: temperature, then top-k, then top-p, then a draw.
fn sample(logits: &[f32], cfg: &GenerationConfig, rng: &mut rand::rngs::StdRng) -> u32 {
    let t = cfg.temperature as f32;
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.select_nth_unstable_by(cfg.top_k - 1, desc);
        idx.truncate(cfg.top_k);
    }
    idx.sort_unstable_by(desc);
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        // Keep a token while the mass of the tokens above it is below top_p.
        let mut above = 0.0f64;
        let keep = probs
            .iter()
            .take_while(|p| {
                let k = above < cfg.top_p;
                above += **p as f64;
                k
            })
            .count()
            .max(1);
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut u: f32 = rng.random();
    for (k, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[k] as u32;
        }
        u -= p;
    }
    idx[probs.len() - 1] as u32
}

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
        let mut state = self.prefill(prompts, cfg.pad_id, ctx)?;
        self.decode(&mut state, cfg, ctx, on_token)
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
        if let Some(p) = state.pending.take() {
            let chunk: Vec<Vec<u32>> = p.into_iter().map(|t| vec![t]).collect();
            self.feed(state, &chunk, &step_ctx);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..cfg.max_new_tokens {
            let logits = self.lm_head(state.last_hidden.clone());
            // Greedy without stop-id suppression picks on the device: only the ids come back,
            // not the `[batch, vocab]` logits. Sampling and suppression read the logits.
            let suppress = !cfg.stop_ids.is_empty()
                && out
                    .iter()
                    .zip(&done)
                    .any(|(o, d)| !d && o.len() < cfg.min_new_tokens);
            let picks: Vec<u32> = if cfg.do_sample || suppress {
                let mut logits: Vec<f32> = logits
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .map_err(|e| Error::Data(format!("logits: {e:?}")))?;
                let mut picks = Vec::with_capacity(b);
                for (r, row) in logits.chunks_exact_mut(vocab).enumerate() {
                    if done[r] {
                        picks.push(cfg.pad_id);
                        continue;
                    }
                    if out[r].len() < cfg.min_new_tokens {
                        for &id in &cfg.stop_ids {
                            if let Some(l) = row.get_mut(id as usize) {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                    picks.push(if cfg.do_sample {
                        sample(row, cfg, &mut rng)
                    } else {
                        argmax(row) as u32
                    });
                }
                picks
            } else {
                logits
                    .argmax(1)
                    .into_data()
                    .convert::<i64>()
                    .into_vec::<i64>()
                    .map_err(|e| Error::Data(format!("token ids: {e:?}")))?
                    .into_iter()
                    .map(|t| t as u32)
                    .collect()
            };
            let mut step = Vec::with_capacity(b);
            for (r, &tok) in picks.iter().enumerate() {
                if done[r] {
                    step.push(cfg.pad_id);
                    continue;
                }
                out[r].push(tok);
                on_token(r, tok);
                done[r] = cfg.stop_ids.contains(&tok);
                step.push(tok);
            }
            if done.iter().all(|d| *d) {
                state.pending = Some(step);
                break;
            }
            let chunk: Vec<Vec<u32>> = step.into_iter().map(|t| vec![t]).collect();
            self.feed(state, &chunk, &step_ctx);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_restrict_the_draw() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let k2 = GenerationConfig {
            do_sample: true,
            top_k: 2,
            ..Default::default()
        };
        let p = GenerationConfig {
            do_sample: true,
            top_p: 0.3,
            ..Default::default()
        };
        for _ in 0..200 {
            assert!([1, 2].contains(&sample(&logits, &k2, &mut rng)));
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
