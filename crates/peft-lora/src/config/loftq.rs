//! `loftq_config`: PEFT's `LoftQConfig`, parsed with the file.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// PEFT's `LoftQConfig` (`loftq_config` of [`crate::LoraConfig`]), read by LoftQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LoftQConfig {
    /// Bits of the quantized base; only 4 (NF4) is implemented.
    pub loftq_bits: u32,
    /// Alternating quantize / SVD iterations, at least 1.
    pub loftq_iter: usize,
}

impl Default for LoftQConfig {
    fn default() -> Self {
        LoftQConfig {
            loftq_bits: 4,
            loftq_iter: 1,
        }
    }
}

/// What a `loftq_config` looks like, for error messages.
pub(super) const EXAMPLE: &str = r#"e.g. {"loftq_bits": 4, "loftq_iter": 1}"#;

impl LoftQConfig {
    /// Parses `loftq_config`: `{}` or `null` is `None` (PEFT's "not given"); in an object a key
    /// left out takes `LoftQConfig`'s default (4 bits, 1 iteration). The values are checked by
    /// [`LoftQConfig::validate`].
    pub fn from_json(v: &Value) -> Result<Option<Self>> {
        let map = match v {
            Value::Null => return Ok(None),
            Value::Object(m) if m.is_empty() => return Ok(None),
            Value::Object(m) => m,
            other => {
                return Err(Error::config(
                    "loftq_config",
                    format!("expected an object ({EXAMPLE}), found {other}"),
                ))
            }
        };
        let mut out = LoftQConfig::default();
        for (key, v) in map {
            let n = v.as_u64().ok_or_else(|| {
                Error::config(
                    "loftq_config",
                    format!("`{key}` must be a non-negative integer, found {v}"),
                )
            })?;
            match key.as_str() {
                "loftq_bits" => out.loftq_bits = u32::try_from(n).unwrap_or(u32::MAX),
                "loftq_iter" => out.loftq_iter = usize::try_from(n).unwrap_or(usize::MAX),
                other => {
                    return Err(Error::config(
                        "loftq_config",
                        format!("unknown key `{other}`; expected loftq_bits and loftq_iter"),
                    ))
                }
            }
        }
        Ok(Some(out))
    }

    /// Checks the bit width and the iteration count.
    pub fn validate(&self) -> Result<()> {
        match self.loftq_bits {
            4 => {}
            8 => {
                return Err(Error::Unsupported {
                    field: "loftq_config.loftq_bits".into(),
                    value: "8".into(),
                    reason: "8-bit LoftQ (bitsandbytes int8) is not implemented; use 4 (NF4)"
                        .into(),
                })
            }
            b => {
                return Err(Error::config(
                    "loftq_config.loftq_bits",
                    format!(
                        "{b} bits: PEFT's LoftQ quantizes to 4 (NF4) or 8 bits; this crate to 4"
                    ),
                ))
            }
        }
        if self.loftq_iter == 0 {
            return Err(Error::config(
                "loftq_config.loftq_iter",
                "must be at least 1 (each iteration quantizes once and takes one SVD)",
            ));
        }
        Ok(())
    }
}

/// Serde for the `loftq_config` field: `None` is written as PEFT's `{}`.
pub(super) mod field {
    use super::*;

    pub(crate) fn serialize<S: serde::Serializer>(
        v: &Option<LoftQConfig>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(c) => c.serialize(s),
            None => serde_json::Map::new().serialize(s),
        }
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<LoftQConfig>, D::Error> {
        let v = Value::deserialize(d)?;
        LoftQConfig::from_json(&v).map_err(super::super::json::de_error::<D::Error>)
    }
}
