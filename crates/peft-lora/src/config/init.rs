//! `init_lora_weights`, typed: `true`, `false` or a named method, parsed with the file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// `init_lora_weights`: how A and B start, and (PiSSA, OLoRA, LoftQ) what the frozen base
/// becomes. Written as PEFT writes it: `true`, `false` or the method's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform (a = sqrt 5, nn.Linear's default), B = 0: identity at start.
    #[default]
    Default,
    /// `false`: A Kaiming-uniform and B random too (debugging: the adapter is not identity).
    Random,
    /// `"gaussian"`: A ~ N(0, (1/r)^2), B = 0.
    Gaussian,
    /// `"orthogonal"`: A and B from the odd and even rows of a random orthogonal `r x r`
    /// matrix (so `B A = 0`); r must be even.
    Orthogonal,
    /// `"pissa"` (`niter = None`, full SVD) or `"pissa_niter_N"` (randomized SVD, N iterations):
    /// the top-r singular part of W moves into the adapter.
    Pissa {
        /// Subspace iterations of the randomized SVD; `None` = full SVD.
        niter: Option<usize>,
    },
    /// `"olora"`: the first r columns of W's QR move into the adapter.
    Olora,
    /// `"eva"`: B = 0 and A as `true` until EVA ([`crate::PeftModel::eva_init`]) replaces A from
    /// activations.
    Eva,
    /// `"loftq"`: the base is quantized to NF4 and A, B start at a rank-r SVD of the
    /// quantization error ([`crate::LoraConfig::loftq_config`] gives the settings).
    LoftQ,
}

const FIELD: &str = "init_lora_weights";

impl InitLoraWeights {
    /// Parses the config value (`true`, `false` or a method name); unknown or unimplemented
    /// methods are a clear error.
    pub fn from_json(v: &Value) -> Result<Self> {
        match v {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(m) => Self::method(m),
            other => Err(Error::config(
                FIELD,
                format!("expected true, false or a method name, found {other}"),
            )),
        }
    }

    /// A method given by name (`"gaussian"`, `"pissa_niter_16"`, ...).
    fn method(m: &str) -> Result<Self> {
        match m {
            "gaussian" => Ok(InitLoraWeights::Gaussian),
            "orthogonal" => Ok(InitLoraWeights::Orthogonal),
            "pissa" => Ok(InitLoraWeights::Pissa { niter: None }),
            "olora" => Ok(InitLoraWeights::Olora),
            "eva" => Ok(InitLoraWeights::Eva),
            "loftq" => Ok(InitLoraWeights::LoftQ),
            _ if m.starts_with("pissa_niter_") => {
                let n = &m["pissa_niter_".len()..];
                n.parse::<usize>()
                    .map(|n| InitLoraWeights::Pissa { niter: Some(n) })
                    .map_err(|_| {
                        Error::config(
                            FIELD,
                            format!("\"{m}\": expected \"pissa_niter_<number of iterations>\", e.g. \"pissa_niter_16\""),
                        )
                    })
            }
            "corda" | "lora_ga" | "mica" => Err(Error::Unsupported {
                field: FIELD.into(),
                value: format!("\"{m}\""),
                reason: "this initialisation is not implemented yet".into(),
            }),
            _ => Err(Error::config(
                FIELD,
                format!(
                    "unknown method \"{m}\"; expected true, false, \"gaussian\", \"orthogonal\", \"pissa\", \"pissa_niter_N\", \"olora\", \"eva\" or \"loftq\""
                ),
            )),
        }
    }

    /// The value as PEFT writes it.
    pub fn to_json(self) -> Value {
        match self {
            InitLoraWeights::Default => Value::Bool(true),
            InitLoraWeights::Random => Value::Bool(false),
            other => Value::String(other.to_string()),
        }
    }

    /// Whether this init rewrites the frozen base weight (PiSSA, OLoRA, LoftQ).
    pub fn rewrites_base(self) -> bool {
        matches!(
            self,
            InitLoraWeights::Pissa { .. } | InitLoraWeights::Olora | InitLoraWeights::LoftQ
        )
    }

    /// Checks what can be checked before touching any layer (orthogonal needs an even rank).
    pub fn check_rank(self, r: usize, module: &str) -> Result<()> {
        if self == InitLoraWeights::Orthogonal && !r.is_multiple_of(2) {
            return Err(Error::config(
                FIELD,
                format!("\"orthogonal\" needs an even rank, but `{module}` has r = {r}"),
            ));
        }
        Ok(())
    }
}

/// `true`, `false` or the method's name, as in the JSON file (and on a command line).
impl fmt::Display for InitLoraWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitLoraWeights::Default => f.write_str("true"),
            InitLoraWeights::Random => f.write_str("false"),
            InitLoraWeights::Gaussian => f.write_str("gaussian"),
            InitLoraWeights::Orthogonal => f.write_str("orthogonal"),
            InitLoraWeights::Pissa { niter: None } => f.write_str("pissa"),
            InitLoraWeights::Pissa { niter: Some(n) } => write!(f, "pissa_niter_{n}"),
            InitLoraWeights::Olora => f.write_str("olora"),
            InitLoraWeights::Eva => f.write_str("eva"),
            InitLoraWeights::LoftQ => f.write_str("loftq"),
        }
    }
}

/// Parses `"true"`, `"false"` or a method name (a command-line flag's value).
impl FromStr for InitLoraWeights {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" => Ok(InitLoraWeights::Default),
            "false" => Ok(InitLoraWeights::Random),
            m => Self::method(m),
        }
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_json(&v).map_err(super::json::de_error::<D::Error>)
    }
}
