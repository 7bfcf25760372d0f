//! The checks of a [`LoraConfig`] that need no model: ranges, combinations, sub-configs, and
//! fields that would change the numerics but are not implemented.

use std::collections::BTreeMap;

use serde_json::Value;

use super::json::is_default_like;
use super::{BiasMode, LoraConfig, TokenIndices};
use crate::error::{Error, Result};

/// Unknown-to-us fields that change the numerics when set to anything but their default.
const NUMERIC_FIELDS_UNSUPPORTED: &[&str] = &[
    "use_qalora",
    "corda_config",
    "target_parameters",
    "arrow_config",
    "megatron_config",
    "use_bdlora",
];

/// The field name of layer replication, in every error about it.
pub(crate) const REPLICATION_FIELD: &str = "layer_replication";

/// Checks `layer_replication` without knowing the model: a non-empty list of `[start, end)`
/// with `start < end`.
pub(crate) fn check_replication_ranges(ranges: &[[usize; 2]]) -> Result<()> {
    if ranges.is_empty() {
        return Err(Error::config(
            REPLICATION_FIELD,
            "is an empty list; give [start, end) layer ranges, or null for no replication",
        ));
    }
    for [start, end] in ranges {
        if start >= end {
            return Err(Error::config(
                REPLICATION_FIELD,
                format!(
                    "range [{start}, {end}] is empty: start must be below end (end is exclusive)"
                ),
            ));
        }
    }
    Ok(())
}

impl LoraConfig {
    /// Checks ranges and combinations, and rejects fields that would change numerics but are
    /// not implemented.
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
        if let Some(names) = &self.modules_to_save {
            if names.iter().any(|n| n.is_empty()) {
                return Err(Error::config(
                    "modules_to_save",
                    "lists an empty module name (it would match every module)",
                ));
            }
        }
        for (k, r) in &self.rank_pattern {
            if *r == 0 {
                return Err(Error::config(
                    "rank_pattern",
                    format!("rank for `{k}` must be positive"),
                ));
            }
        }
        self.loftq_settings()?;
        if let Some(eva) = &self.eva_config {
            eva.validate()?;
        }
        if let Some(ranges) = &self.layer_replication {
            check_replication_ranges(ranges)?;
            if self.init_lora_weights.rewrites_base() {
                return Err(Error::config(
                    REPLICATION_FIELD,
                    format!(
                        "cannot be combined with init_lora_weights \"{}\": that init rewrites \
                         the frozen base weight, which replicated layers share",
                        self.init_lora_weights
                    ),
                ));
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
}
