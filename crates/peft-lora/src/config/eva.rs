//! `eva_config`: PEFT's `EvaConfig`, parsed and checked with the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// PEFT's `EvaConfig` (`eva_config` of [`crate::LoraConfig`]), read by EVA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaConfig {
    /// Maximum rank of a layer is `round(r * rho)` (>= 1).
    pub rho: f64,
    /// A component has converged when its cosine similarity between steps reaches `tau`.
    pub tau: f64,
    /// Drop tokens whose label equals `label_mask_value`.
    pub use_label_mask: bool,
    /// The ignored-label value (-100).
    pub label_mask_value: i64,
    /// Divide the components by the square root of their singular values.
    pub whiten: bool,
    /// Scale alpha by `new_r / r` when a layer's rank changes.
    pub adjust_scaling_factors: bool,
    /// Keys of `eva_config` this crate does not know, kept verbatim and written back.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for EvaConfig {
    fn default() -> Self {
        EvaConfig {
            rho: 2.0,
            tau: 0.99,
            use_label_mask: true,
            label_mask_value: -100,
            whiten: false,
            adjust_scaling_factors: true,
            extra: BTreeMap::new(),
        }
    }
}

impl EvaConfig {
    /// Parses and checks `eva_config` (`null` is `None`: EVA's defaults).
    pub fn from_json(v: &Value) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        let c: EvaConfig = serde_json::from_value(v.clone())
            .map_err(|e| Error::config("eva_config", e.to_string()))?;
        c.validate()?;
        Ok(Some(c))
    }

    /// Checks `rho` and `tau`.
    pub fn validate(&self) -> Result<()> {
        if self.rho < 1.0 || !self.rho.is_finite() {
            return Err(Error::config(
                "eva_config.rho",
                format!("must be >= 1.0, got {}", self.rho),
            ));
        }
        if !(0.0..=1.0).contains(&self.tau) {
            return Err(Error::config(
                "eva_config.tau",
                format!("must be between 0.0 and 1.0, got {}", self.tau),
            ));
        }
        Ok(())
    }

    /// Which flattened tokens (`batch * seq`, row-major) feed the SVD: attended, and with a
    /// label other than `label_mask_value` when `use_label_mask` and labels are given.
    pub fn token_mask(&self, attention_mask: &[i64], labels: Option<&[i64]>) -> Vec<bool> {
        attention_mask
            .iter()
            .enumerate()
            .map(|(i, m)| {
                *m != 0
                    && !(self.use_label_mask
                        && labels.is_some_and(|l| l.get(i) == Some(&self.label_mask_value)))
            })
            .collect()
    }
}

/// Serde for the `eva_config` field: parsed and checked as [`EvaConfig::from_json`] does.
pub(super) fn de_field<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<EvaConfig>, D::Error> {
    let v = Value::deserialize(d)?;
    EvaConfig::from_json(&v).map_err(super::json::de_error::<D::Error>)
}
