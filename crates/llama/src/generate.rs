//! Generation with a KV cache: greedy or sampling (temperature, top-k, top-p, seed), several
//! stop ids, batched left-padded prompts, and a per-token callback for streaming.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use peft_lora::LoraCtx;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::layers::KvCache;
use crate::model::LlamaForCausalLM;

/// Generation settings (transformers' `GenerationConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// Sample instead of greedy.
    pub do_sample: bool,
    /// Softmax temperature (sampling).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set with this cumulative probability (1.0 = all).
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Generation of a row stops after any of these ids (Llama 3: `<|eot_id|>` 128009).
    pub stop_ids: Vec<u32>,
    /// Left-padding id of the prompts.
    pub pad_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
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

fn pick(logits: &[f32], cfg: &GenerationConfig, rng: &mut rand::rngs::StdRng) -> u32 {
    if !cfg.do_sample {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let t = cfg.temperature.max(1e-6) as f32;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if acc as f64 >= cfg.top_p {
                keep = k + 1;
                break;
            }
        }
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
    /// Returns the new tokens of each row (stop id included); `on_token(row, id)` sees each
    /// token as it is chosen.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        ctx: &LoraCtx,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::Generation("every prompt needs at least one token".into()));
        }
        if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::Generation(format!("token id {bad} is outside the vocabulary ({})", self.config.vocab_size)));
        }
        let device = self.model.embed_tokens.weight.device();
        let b = prompts.len();
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * len);
        let mut mask: Vec<i64> = Vec::with_capacity(b * len);
        let mut pos = Vec::with_capacity(b * len);
        let mut next_pos = vec![0i64; b];
        for (r, p) in prompts.iter().enumerate() {
            let pad = len - p.len();
            for i in 0..len {
                if i < pad {
                    ids.push(cfg.pad_id as i64);
                    mask.push(0);
                    pos.push(0);
                } else {
                    ids.push(p[i - pad] as i64);
                    mask.push(1);
                    pos.push((i - pad) as i64);
                }
            }
            next_pos[r] = p.len() as i64;
        }
        let int2 = |v: Vec<i64>, s: usize| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [b, s]), &device);
        let mut cache: Vec<KvCache<B>> = Vec::new();
        let mut full_mask = mask.clone();
        let mut mask_len = len;
        let mut hidden = self.hidden_states(int2(ids, len), Some(int2(mask, len)), Some(int2(pos, len)), Some(&mut cache), ctx);
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..cfg.max_new_tokens {
            let [_, s, h] = hidden.dims();
            let last = hidden.slice([0..b, s - 1..s, 0..h]).reshape([b, h]);
            let logits: Vec<f32> = last.matmul(self.head_weight()).into_data().convert::<f32>().to_vec().expect("f32");
            let v = self.config.vocab_size;
            let mut step_ids = Vec::with_capacity(b);
            for r in 0..b {
                let tok = if done[r] { cfg.pad_id } else { pick(&logits[r * v..(r + 1) * v], cfg, &mut rng) };
                if !done[r] {
                    out[r].push(tok);
                    on_token(r, tok);
                    if cfg.stop_ids.contains(&tok) {
                        done[r] = true;
                    }
                }
                step_ids.push(tok as i64);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            // Extend the mask by one column of ones.
            let mut m = Vec::with_capacity(b * (mask_len + 1));
            for r in 0..b {
                m.extend_from_slice(&full_mask[r * mask_len..(r + 1) * mask_len]);
                m.push(1);
            }
            full_mask = m;
            mask_len += 1;
            let positions: Vec<i64> = next_pos.clone();
            next_pos.iter_mut().for_each(|p| *p += 1);
            hidden = self.hidden_states(
                int2(step_ids, 1),
                Some(int2(full_mask.clone(), mask_len)),
                Some(int2(positions, 1)),
                Some(&mut cache),
                ctx,
            );
        }
        Ok(out)
    }
}
