//! `LoraConfig`: PEFT's `adapter_config.json`, field for field.
//!
//! Unknown fields are kept verbatim in [`LoraConfig::extra`] and written back on save, so a file
//! from a newer PEFT survives a round trip. Fields that would change the numerics but are not
//! implemented here are rejected by [`LoraConfig::validate`] instead of being silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

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

/// `init_lora_weights`: `true`, `false` or a named method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: Kaiming-uniform A, zero B. `false`: both random (debugging only).
    Bool(bool),
    /// `"gaussian"`, `"orthogonal"`, `"pissa"`, `"pissa_niter_N"`, `"olora"`, `"eva"`, `"loftq"`, ...
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
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
/// Writes integral floats as integers, as Python writes `lora_alpha=16`.
fn ser_num<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_num_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        let n = if v.fract() == 0.0 && v.abs() < 1e15 {
            serde_json::Value::from(*v as i64)
        } else {
            serde_json::Value::from(*v)
        };
        map.serialize_entry(k, &n)?;
    }
    map.end()
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
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
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
    #[serde(default, serialize_with = "ser_num_map")]
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
    /// Layer replication ranges `[start, end)`.
    #[serde(default)]
    pub layer_replication: Option<Vec<[usize; 2]>>,
    /// Token rows of the embedding that train.
    #[serde(default)]
    pub trainable_token_indices: Option<Value>,
    /// aLoRA: the token-id sequence that switches the adapter on. The adapter then acts only
    /// from the last occurrence of the sequence in each row on (the sequence included); rows
    /// without it run as the base model. `null` for every other adapter.
    #[serde(default, deserialize_with = "de_token_ids")]
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

/// Unknown-to-us fields that change the numerics when set to anything but their default.
const NUMERIC_FIELDS_UNSUPPORTED: &[&str] = &[
    "use_qalora",
    "corda_config",
    "target_parameters",
    "arrow_config",
    "megatron_config",
    "use_bdlora",
];

impl LoraConfig {
    /// A config with the given rank, alpha and target module names, everything else default.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            task_type: Some("CAUSAL_LM".into()),
            ..Default::default()
        }
    }

    /// Parses a config from JSON text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let cfg: LoraConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: origin.into(),
            field: field_of_serde_error(&e),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|e| match e {
            Error::Config { field, message, .. } => Error::Config {
                path: origin.into(),
                field,
                message,
            },
            other => other,
        })?;
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
        let sorted = sort_keys(value);
        serde_json::to_string_pretty(&sorted).expect("json serialises")
    }

    /// Writes `adapter_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = dir.join("adapter_config.json");
        crate::io::write_atomic(&file, self.to_json_string().as_bytes())
    }

    /// Checks ranges and rejects fields that would change numerics but are not implemented.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r", "must be a positive integer"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config("lora_dropout", "must be in [0, 1)"));
        }
        if let Some(pt) = &self.peft_type {
            if pt != "LORA" {
                return Err(Error::config(
                    "peft_type",
                    format!("this crate loads LORA adapters, found `{pt}`"),
                ));
            }
        }
        if self.fan_in_fan_out {
            return Err(Error::Unsupported {
                field: "fan_in_fan_out".into(),
                value: "true".into(),
                reason: "Conv1D (GPT-2 style) weights are not used by supported models".into(),
            });
        }
        if self.bias != BiasMode::None {
            return Err(Error::Unsupported {
                field: "bias".into(),
                value: serde_json::to_string(&self.bias).unwrap_or_default(),
                reason: "training base biases is not implemented yet; use \"none\"".into(),
            });
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(Error::Unsupported {
                field: "modules_to_save".into(),
                value: format!("{:?}", self.modules_to_save),
                reason: "fully trained extra modules are not implemented yet".into(),
            });
        }
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(Error::config(
                    "rank_pattern",
                    format!("rank for `{k}` must be positive"),
                ));
            }
        }
        if crate::init::InitMethod::parse(&self.init_lora_weights)?
            == crate::init::InitMethod::LoftQ
        {
            crate::loftq::LoftQConfig::from_lora_config(self)?;
        }
        crate::eva::EvaConfig::from_lora(self)?;
        if let Some(ranges) = &self.layer_replication {
            crate::replicate::check_ranges(ranges)?;
            if let InitLoraWeights::Method(m) = &self.init_lora_weights {
                let rewrites_base = ["pissa", "olora", "loftq", "corda"]
                    .iter()
                    .any(|p| m.starts_with(p));
                if rewrites_base {
                    return Err(Error::config(
                        "layer_replication",
                        format!(
                            "cannot be combined with init_lora_weights \"{m}\": that init rewrites \
                             the frozen base weight, which replicated layers share"
                        ),
                    ));
                }
            }
        }
        self.token_indices()?;
        if let Some(tokens) = &self.alora_invocation_tokens {
            if tokens.is_empty() {
                return Err(Error::config(
                    "alora_invocation_tokens",
                    "must list at least one token id (use null for an adapter that is not aLoRA)",
                ));
            }
            if self.use_dora {
                return Err(Error::config(
                    "alora_invocation_tokens",
                    "aLoRA cannot be combined with use_dora = true (PEFT has no DoRA + aLoRA variant)",
                ));
            }
        }
        for field in NUMERIC_FIELDS_UNSUPPORTED {
            if let Some(v) = self.extra.get(*field) {
                if !is_default_like(v) {
                    return Err(Error::Unsupported {
                        field: field.to_string(),
                        value: v.to_string(),
                        reason: "this LoRA feature is not implemented yet; loading it would give wrong outputs".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `trainable_token_indices`, parsed: `None` when absent (or null).
    pub fn token_indices(&self) -> Result<Option<TokenIndices>> {
        const FIELD: &str = "trainable_token_indices";
        let ids = |v: &Value, what: &str| -> Result<Vec<usize>> {
            let arr = v.as_array().ok_or_else(|| {
                Error::config(
                    FIELD,
                    format!("{what}: expected a list of token ids, got {v}"),
                )
            })?;
            if arr.is_empty() {
                return Err(Error::config(FIELD, format!("{what}: lists no token id")));
            }
            arr.iter()
                .map(|x| {
                    x.as_u64().map(|u| u as usize).ok_or_else(|| {
                        Error::config(
                            FIELD,
                            format!("{what}: token ids are non-negative integers, got {x}"),
                        )
                    })
                })
                .collect()
        };
        match &self.trainable_token_indices {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Array(_)) => Ok(Some(TokenIndices::List(ids(v, "the list")?))),
            Some(Value::Object(map)) => {
                if map.is_empty() {
                    return Err(Error::config(FIELD, "the object names no embedding"));
                }
                let mut out = BTreeMap::new();
                for (name, v) in map {
                    out.insert(name.clone(), ids(v, &format!("`{name}`"))?);
                }
                Ok(Some(TokenIndices::Map(out)))
            }
            Some(other) => Err(Error::config(
                FIELD,
                format!(
                    "expected a list of token ids or an object {{embedding name: [ids]}}, got {other}"
                ),
            )),
        }
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

/// `alora_invocation_tokens`: null or a list of non-negative integer token ids, with an error
/// that names the field (serde's own would name the offending value).
fn de_token_ids<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<u32>>, D::Error> {
    use serde::de::Error as _;
    let v = Option::<Value>::deserialize(d)?;
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |what: String| {
        D::Error::custom(format!(
            "field `alora_invocation_tokens`: expected a list of token ids (integers in 0..{}), found {what}",
            u32::MAX
        ))
    };
    let Value::Array(items) = v else {
        return Err(bad(v.to_string()));
    };
    items
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| bad(t.to_string()))
        })
        .collect::<std::result::Result<Vec<u32>, _>>()
        .map(Some)
}

fn is_default_like(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn field_of_serde_error(e: &serde_json::Error) -> String {
    // serde's messages quote the field: "invalid type: ... for key `r`" is not standard, so fall
    // back to the whole message's first backticked token.
    let msg = e.to_string();
    msg.split('`').nth(1).unwrap_or("<json>").to_string()
}
