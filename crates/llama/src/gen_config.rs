//! Generation settings, read by the generation loop (`generate`) and the token choice
//! (`choose`).

use crate::error::{Error, Result};

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

    pub(crate) fn validate(&self) -> Result<()> {
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
