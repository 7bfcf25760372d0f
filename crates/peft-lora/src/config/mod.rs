//! `LoraConfig`: PEFT's `adapter_config.json`, field for field.
//!
//! The file is parsed and checked once, where it is read ([`LoraConfig::from_json_str`]): the
//! init method ([`InitLoraWeights`]), `loftq_config` ([`LoftQConfig`]) and `eva_config`
//! ([`EvaConfig`]) become typed values, and [`LoraConfig::validate`] checks the ranges and the
//! combinations. The algorithms read the typed config; nothing here calls them.
//!
//! Unknown fields are kept verbatim in [`LoraConfig::extra`] and written back on save, so a file
//! from a newer PEFT survives a round trip. Fields that would change the numerics but are not
//! implemented here are rejected by [`LoraConfig::validate`] instead of being silently ignored.

mod eva;
mod init;
mod json;
mod loftq;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::files::write_atomic;

pub use eva::EvaConfig;
pub use init::InitLoraWeights;
pub use loftq::LoftQConfig;
pub(crate) use validate::{check_replication_ranges, REPLICATION_FIELD};

/// `"all-linear"`: every adaptable linear layer (the model never exposes its output head as
/// one).
pub const ALL_LINEAR: &str = "all-linear";

/// `target_modules` / `exclude_modules`: a list of names (exact or `.`-suffix) or one regex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Exact module path or a `.`-separated suffix of it; `"all-linear"` as a plain string is
    /// represented as `Regex("all-linear")` and handled specially.
    List(Vec<String>),
    /// A regex that must match the whole module path (Python `re.fullmatch`), or `"all-linear"`.
    Regex(String),
}

/// An int or a list of ints (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// Several values.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// All values as a vector.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `trainable_token_indices`: the token rows that train.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIndices {
    /// Ids of the input embedding's rows.
    List(Vec<usize>),
    /// Embedding module name (matched as a suffix of its path) -> ids.
    Map(BTreeMap<String, Vec<usize>>),
}

/// Which biases train (and are saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// Only the biases of adapted layers train.
    LoraOnly,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_peft_type() -> Option<String> {
    Some("LORA".into())
}

/// PEFT's `LoraConfig`, as stored in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).
    #[serde(default = "default_alpha", serialize_with = "json::ser_num")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter's input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted (checked before `target_modules`).
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Which biases train.
    #[serde(default)]
    pub bias: BiasMode,
    /// rsLoRA: scaling = alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// Whole modules trained and saved beside the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Initialisation method.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// LoftQ's settings (`loftq_config`), required when `init_lora_weights` is `"loftq"`.
    /// `None` is PEFT's empty `{}`, which is what is written for it.
    #[serde(default, with = "loftq::field")]
    pub loftq_config: Option<LoftQConfig>,
    /// EVA's settings (`eva_config`); `None` (PEFT's `null`, written as such) means the
    /// defaults ([`LoraConfig::eva_settings`]).
    #[serde(default, deserialize_with = "eva::de_field")]
    pub eva_config: Option<EvaConfig>,
    /// Only these layer indices are adapted.
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// Name(s) of the layer list in the module path (e.g. `"layers"`).
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Per-module rank: regex-or-suffix of the module path -> r.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha: regex-or-suffix of the module path -> alpha.
    #[serde(default, serialize_with = "json::ser_num_map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// DoRA: weight-decomposed LoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// B carries a bias.
    #[serde(default)]
    pub lora_bias: bool,
    /// PyTorch Conv1D-style (transposed) weights; not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Layer replication: the decoder stack rebuilt from these `[start, end)` ranges of its
    /// layers, in order (non-empty, each `start < end`; checked by [`LoraConfig::validate`]).
    #[serde(default)]
    pub layer_replication: Option<Vec<[usize; 2]>>,
    /// Token rows of the embedding that train (parsed by [`LoraConfig::token_indices`]).
    #[serde(default)]
    pub trainable_token_indices: Option<Value>,
    /// aLoRA: the token-id sequence that switches the adapter on. The adapter then acts only
    /// from the last occurrence of the sequence in each row on (the sequence included); rows
    /// without it run as the base model. `null` for every other adapter.
    #[serde(default, deserialize_with = "json::de_token_ids")]
    pub alora_invocation_tokens: Option<Vec<u32>>,
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: Option<String>,
    /// E.g. `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model.
    #[serde(default)]
    pub revision: Option<String>,
    /// Saved as `true`.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every field this crate does not know, kept verbatim and written back on save.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty config deserialises")
    }
}

impl LoraConfig {
    /// A config with the given rank, alpha and target module names, everything else PEFT's
    /// default (`task_type` is unset: set it for the model, e.g. `"CAUSAL_LM"`). A single
    /// `"all-linear"` means PEFT's string `target_modules = "all-linear"` (every linear but the
    /// output head), not a module of that name.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        let target_modules = match targets {
            [one] if *one == ALL_LINEAR => TargetModules::Regex(one.to_string()),
            _ => TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
        };
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(target_modules),
            ..Default::default()
        }
    }

    /// Parses and validates a config from JSON text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let at_origin = |e: Error| match e {
            Error::Config { field, message, .. } => Error::Config {
                path: origin.into(),
                field,
                message,
            },
            other => other,
        };
        let cfg: LoraConfig = serde_json::from_str(text).map_err(|e| {
            // A typed field's own error (with its kind, e.g. `Unsupported`) rather than the
            // text serde made of it.
            json::typed_field_error(text)
                .map(at_origin)
                .unwrap_or_else(|| Error::Config {
                    path: origin.into(),
                    field: json::field_of_serde_error(text, &e),
                    message: e.to_string(),
                })
        })?;
        cfg.validate().map_err(at_origin)?;
        Ok(cfg)
    }

    /// Reads `adapter_config.json` (the file itself or its folder).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("adapter_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text, &file.display().to_string())
    }

    /// JSON as PEFT writes it: keys sorted, indent 2, `inference_mode: true`.
    pub fn to_json_string(&self) -> String {
        let mut cfg = self.clone();
        cfg.inference_mode = true;
        let value = serde_json::to_value(&cfg).expect("config serialises");
        let sorted = json::sort_keys(value);
        serde_json::to_string_pretty(&sorted).expect("json serialises")
    }

    /// Writes `adapter_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = dir.join("adapter_config.json");
        write_atomic(&file, self.to_json_string().as_bytes())
    }

    /// The LoftQ settings when `init_lora_weights` is `"loftq"` (`None` for every other init);
    /// an error when they are missing or invalid.
    pub fn loftq_settings(&self) -> Result<Option<LoftQConfig>> {
        if self.init_lora_weights != InitLoraWeights::LoftQ {
            return Ok(None);
        }
        let cfg = self.loftq_config.ok_or_else(|| {
            Error::config(
                "loftq_config",
                format!(
                    "must be given when init_lora_weights is \"loftq\" ({})",
                    loftq::EXAMPLE
                ),
            )
        })?;
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// The EVA settings: `eva_config`, or EVA's defaults when it is `null`.
    pub fn eva_settings(&self) -> EvaConfig {
        self.eva_config.clone().unwrap_or_default()
    }

    /// The scaling of a module with rank `r` and alpha `alpha`.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}
