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
    /// `"llama3"` (or `"default"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older key for the same (some configs carry both).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
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
    /// Storage dtype as older transformers write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Storage dtype as transformers >= 4.56 write it (some files carry both keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Must be `silu`.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// `llama` when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Padding id, if the checkpoint names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
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
    /// Llama 3.1 scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max: usize,
    },
}

/// The resolved runtime config: every option decided, nothing optional left to interpret.
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
    /// KV heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope: RopeKind,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// lm_head tied to the embedding (no `lm_head.weight` in the checkpoint).
    pub tie_word_embeddings: bool,
    /// Context length.
    pub max_position_embeddings: usize,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids (generation stops on any).
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if the checkpoint names one.
    pub pad_token_id: Option<u32>,
    /// Bias in attention projections.
    pub attention_bias: bool,
    /// Bias in MLP projections.
    pub mlp_bias: bool,
    /// Storage dtype the checkpoint declares (`"bfloat16"`, ...); informational: weights load into
    /// the backend's float type whatever this says.
    pub torch_dtype: Option<String>,
    /// Recompute activations in the backward pass instead of storing them (HF's config field).
    ///
    /// Read from `config.json` for the record; the trainer's `gradient_checkpointing` setting
    /// decides, and runs [`crate::LlamaForCausalLM::backward_checkpointed`] (per decoder layer,
    /// as HF's `gradient_checkpointing_enable()`).
    pub gradient_checkpointing: bool,
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
        } else if let Some(t) = self.model_type.as_deref().filter(|t| *t != "llama") {
            return Err(Error::Architecture {
                path: path.into(),
                found: vec![format!("model_type {t}")],
            });
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "field `hidden_act` = {act:?}: only \"silu\" is supported"
                )));
            }
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err(bad(format!("field `{field}` must be positive")));
            }
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "field `num_key_value_heads` = {kv} must divide num_attention_heads = {}",
                self.num_attention_heads
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return Err(bad(format!(
                    "field `head_dim` is absent and hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "field `head_dim` = {head_dim} must be even and positive (RoPE)"
            )));
        }
        let scaling = self
            .rope_scaling
            .clone()
            .or_else(|| self.rope_parameters.clone());
        let theta = self
            .rope_theta
            .or_else(|| scaling.as_ref().and_then(|s| s.rope_theta))
            .unwrap_or(10000.0);
        let rope = match scaling {
            None => RopeKind::Default,
            Some(s) => {
                let kind = s.rope_type.clone().or_else(|| s.legacy_type.clone());
                match kind.as_deref() {
                    None | Some("default") => RopeKind::Default,
                    Some("llama3") => {
                        let need = |v: Option<f64>, f: &str| {
                            v.ok_or_else(|| bad(format!("field `rope_scaling.{f}` is required for rope_type \"llama3\"")))
                        };
                        RopeKind::Llama3 {
                            factor: need(s.factor, "factor")?,
                            low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                            high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                            original_max: s.original_max_position_embeddings.ok_or_else(|| {
                                bad("field `rope_scaling.original_max_position_embeddings` is required for rope_type \"llama3\"".into())
                            })?,
                        }
                    }
                    Some(other) => {
                        return Err(bad(format!(
                            "field `rope_scaling.rope_type` = {other:?} is not implemented (supported: null, \"default\", \"llama3\")"
                        )))
                    }
                }
            }
        };
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: kv,
            head_dim,
            rope_theta: theta,
            rope,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self
                .bos_token_id
                .as_ref()
                .and_then(|b| b.to_vec().first().copied()),
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(|e| e.to_vec())
                .unwrap_or_default(),
            pad_token_id: self
                .pad_token_id
                .as_ref()
                .and_then(|p| p.to_vec().first().copied()),
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            torch_dtype: self.dtype.clone().or_else(|| self.torch_dtype.clone()),
            gradient_checkpointing: false,
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
        Self::from_hf_str(&text, path)
    }

    /// Parses and resolves the text of a `config.json`; `path` names it in errors.
    pub fn from_hf_str(text: &str, path: &Path) -> Result<Self> {
        let hf: HfLlamaConfig = serde_json::from_str(text).map_err(|e| Error::Config {
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
                    rope_type: Some("llama3".into()),
                    legacy_type: None,
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
            eos_token_id: match self.eos_token_ids.as_slice() {
                [] => None,
                [one] => Some(TokenIds::One(*one)),
                many => Some(TokenIds::Many(many.to_vec())),
            },
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            torch_dtype: self.torch_dtype.clone(),
            dtype: None,
            hidden_act: Some("silu".into()),
            model_type: Some("llama".into()),
            pad_token_id: self.pad_token_id.map(TokenIds::One),
        }
    }

    /// A tiny Llama for demos and tests (vocabulary given): hidden 64, 2 layers, 4 heads, 2 KV
    /// heads, tied embeddings.
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
            pad_token_id: None,
            attention_bias: false,
            mlp_bias: false,
            torch_dtype: None,
            gradient_checkpointing: false,
        }
    }

    /// The Llama-3.1-8B shape (random-weight benchmarks), as NCSOFT/Llama-VARCO-8B-Instruct:
    /// plain RoPE, untied head.
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
            pad_token_id: None,
            attention_bias: false,
            mlp_bias: false,
            torch_dtype: Some("bfloat16".into()),
            gradient_checkpointing: false,
        }
    }

    /// `(d_in, d_out)` of one decoder layer's linears: q, k, v, o, gate, up, down.
    pub fn decoder_linear_shapes(&self) -> [(usize, usize); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    }

    /// Bytes of the weights with every decoder linear in NF4 (4-bit codes plus one f32 absmax
    /// per 64 values: bitsandbytes' `load_in_4bit` without double quantization) and everything
    /// else (embeddings, head, norms, biases) at `float_bytes` per value (2 for bf16, as
    /// transformers keeps them).
    pub fn nf4_weight_bytes(&self, float_bytes: usize) -> usize {
        let per_layer: usize = self
            .decoder_linear_shapes()
            .iter()
            .map(|(i, o)| peft_lora::Nf4Tensor::storage_bytes_for(i * o, peft_lora::NF4_BLOCKSIZE))
            .sum();
        let linear_params: usize = self
            .decoder_linear_shapes()
            .iter()
            .map(|(i, o)| i * o)
            .sum();
        let other = self.num_params() - self.num_layers * linear_params;
        self.num_layers * per_layer + other * float_bytes
    }

    /// Parameter count of this shape (embeddings and head included).
    pub fn num_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let attn = h * q * 2
            + h * kv * 2
            + if self.attention_bias {
                q + 2 * kv + h
            } else {
                0
            };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            h * self.vocab_size
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_str(json, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;

    #[test]
    fn defaults_and_derived_fields() {
        let c = parse(&format!("{{{BASE}, \"unknown_field\": [1, 2]}}")).unwrap();
        assert_eq!((c.num_kv_heads, c.head_dim, c.rope_theta), (2, 4, 10000.0));
        assert_eq!((c.rms_norm_eps, c.tie_word_embeddings), (1e-6, false));
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn eos_int_or_list_both_dtype_keys_and_legacy_rope_type() {
        let c = parse(&format!(
            r#"{{{BASE}, "eos_token_id": [128001, 128009], "bos_token_id": 128000,
            "torch_dtype": "float32", "dtype": "bfloat16",
            "rope_scaling": {{"type": "llama3", "rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128009]);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(matches!(
            c.rope,
            RopeKind::Llama3 {
                original_max: 8192,
                ..
            }
        ));
        let c = parse(&format!(
            "{{{BASE}, \"eos_token_id\": 2, \"rope_scaling\": null}}"
        ))
        .unwrap();
        assert_eq!((c.eos_token_ids, c.rope), (vec![2], RopeKind::Default));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"vocab_size": 10}"#).unwrap_err().to_string();
        assert!(
            e.contains("hidden_size") && e.contains("config.json"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{{BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("yarn") && e.contains("rope_scaling.rope_type"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{{BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("low_freq_factor"), "{e}");
        let e = parse(&format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = parse(&format!(r#"{{{BASE}, "model_type": "mistral"}}"#)).unwrap_err();
        assert!(matches!(e, Error::Architecture { .. }), "{e}");
    }

    #[test]
    fn hf_round_trip() {
        let mut c = LlamaConfig::llama3_8b();
        c.rope = RopeKind::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max: 8192,
        };
        let json = serde_json::to_string(&c.to_hf()).unwrap();
        assert_eq!(parse(&json).unwrap(), c);
        assert_eq!(LlamaConfig::llama3_8b().num_params(), 8_030_261_248);
    }

    #[test]
    fn nf4_bytes_of_the_8b_shape() {
        let c = LlamaConfig::llama3_8b();
        let linear: usize = c.decoder_linear_shapes().iter().map(|(i, o)| i * o).sum();
        let other = c.num_params() - c.num_layers * linear;
        // bitsandbytes 0.50.2 `Params4bit(nf4, compress_statistics=False)` on the seven 8B
        // shapes: packed bytes + f32 absmax = 122_683_392 per decoder layer.
        assert_eq!(c.nf4_weight_bytes(2), 32 * 122_683_392 + 2 * other);
    }
}
