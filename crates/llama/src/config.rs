//! Two configs, as candle does: [`HfLlamaConfig`] reads `config.json` with HF's field names;
//! [`LlamaConfig`] is the resolved runtime config.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An int or a list of ints (`eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"` (or `"default"`); also read from the older key `type`.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor.
    #[serde(default)]
    pub factor: Option<f64>,
    /// llama3: low frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// llama3: high frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// llama3: original context length.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// transformers 5 puts rope_theta here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

/// `config.json` of a LlamaForCausalLM checkpoint, HF field names. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfLlamaConfig {
    /// Must contain `LlamaForCausalLM` when present.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head size; derived as hidden / heads when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RoPE base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (null or llama3).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5's name for the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether lm_head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// EOS id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Bias in q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias in the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Storage dtype (`torch_dtype`, or `dtype` in newer transformers).
    #[serde(default, alias = "dtype")]
    pub torch_dtype: Option<String>,
    /// Must be `silu`.
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// RoPE frequency scaling, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeKind {
    /// Plain RoPE.
    Default,
    /// Llama 3.1 scaling.
    Llama3 {
        /// factor.
        factor: f64,
        /// low_freq_factor.
        low_freq_factor: f64,
        /// high_freq_factor.
        high_freq_factor: f64,
        /// original_max_position_embeddings.
        original_max: usize,
    },
}

/// The resolved runtime config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope: RopeKind,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head tied to the embedding.
    pub tie_word_embeddings: bool,
    /// Context length.
    pub max_position_embeddings: usize,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids (generation stops on any).
    pub eos_token_ids: Vec<u32>,
    /// Bias in attention projections.
    pub attention_bias: bool,
    /// Bias in MLP projections.
    pub mlp_bias: bool,
}

impl HfLlamaConfig {
    /// Resolves defaults and checks what is supported; `path` names the file in errors.
    pub fn resolve(&self, path: &Path) -> Result<LlamaConfig> {
        let bad = |m: String| Error::Config {
            path: path.into(),
            message: m,
        };
        if let Some(a) = &self.architectures {
            if !a.iter().any(|x| x == "LlamaForCausalLM") {
                return Err(Error::Architecture {
                    path: path.into(),
                    found: a.clone(),
                });
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(format!("field `hidden_act` = {act:?}: only \"silu\" is supported")));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 {
            return Err(bad("fields `hidden_size` and `num_attention_heads` must be positive".into()));
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return Err(bad(format!(
                "field `num_key_value_heads` = {kv} must divide num_attention_heads = {}",
                self.num_attention_heads
            )));
        }
        let scaling = self.rope_scaling.clone().or_else(|| self.rope_parameters.clone());
        let theta = self
            .rope_theta
            .or_else(|| scaling.as_ref().and_then(|s| s.rope_theta))
            .unwrap_or(10000.0);
        let rope = match scaling {
            None => RopeKind::Default,
            Some(s) if s.rope_type == "default" => RopeKind::Default,
            Some(s) if s.rope_type == "llama3" => {
                let need = |v: Option<f64>, f: &str| v.ok_or_else(|| bad(format!("rope_scaling.{f} is required for rope_type llama3")));
                RopeKind::Llama3 {
                    factor: need(s.factor, "factor")?,
                    low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                    original_max: s
                        .original_max_position_embeddings
                        .ok_or_else(|| bad("rope_scaling.original_max_position_embeddings is required".into()))?,
                }
            }
            Some(s) => {
                return Err(bad(format!(
                    "rope_scaling.rope_type = {:?} is not implemented (supported: null, \"default\", \"llama3\")",
                    s.rope_type
                )))
            }
        };
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: kv,
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rope_theta: theta,
            rope,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id.as_ref().and_then(|b| b.to_vec().first().copied()),
            eos_token_ids: self.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default(),
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        })
    }
}

impl LlamaConfig {
    /// Reads and resolves an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.into(),
            source: e,
        })?;
        let hf: HfLlamaConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            message: e.to_string(),
        })?;
        hf.resolve(path)
    }

    /// The HF form of this config (to save a model the way transformers reads it).
    pub fn to_hf(&self) -> HfLlamaConfig {
        HfLlamaConfig {
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: Some(self.head_dim),
            rope_theta: Some(self.rope_theta),
            rope_scaling: match self.rope {
                RopeKind::Default => None,
                RopeKind::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max,
                } => Some(RopeScaling {
                    rope_type: "llama3".into(),
                    factor: Some(factor),
                    low_freq_factor: Some(low_freq_factor),
                    high_freq_factor: Some(high_freq_factor),
                    original_max_position_embeddings: Some(original_max),
                    rope_theta: None,
                }),
            },
            rope_parameters: None,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id.map(TokenIds::One),
            eos_token_id: Some(TokenIds::Many(self.eos_token_ids.clone())),
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            torch_dtype: Some("float32".into()),
            hidden_act: Some("silu".into()),
        }
    }

    /// A tiny Llama for demos and tests (vocabulary given).
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10000.0,
            rope: RopeKind::Default,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            max_position_embeddings: 1024,
            bos_token_id: None,
            eos_token_ids: vec![],
            attention_bias: false,
            mlp_bias: false,
        }
    }

    /// The Llama-3.1-8B shape (random-weight benchmarks).
    pub fn llama3_8b() -> Self {
        LlamaConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500000.0,
            rope: RopeKind::Default,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            max_position_embeddings: 8192,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001, 128009],
            attention_bias: false,
            mlp_bias: false,
        }
    }
}
