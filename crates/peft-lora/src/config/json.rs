//! JSON details of `adapter_config.json`: numbers written as Python writes them, sorted keys,
//! and errors that name the field.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{EvaConfig, InitLoraWeights, LoftQConfig, LoraConfig};
use crate::error::Error;

/// Writes integral floats as integers, as Python writes `lora_alpha=16`.
pub(super) fn ser_num<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

/// [`ser_num`] for every value of a map (`alpha_pattern`).
pub(super) fn ser_num_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        let n = if v.fract() == 0.0 && v.abs() < 1e15 {
            Value::from(*v as i64)
        } else {
            Value::from(*v)
        };
        map.serialize_entry(k, &n)?;
    }
    map.end()
}

/// `alora_invocation_tokens`: null or a list of non-negative integer token ids, with an error
/// that names the field (serde's own would name the offending value).
pub(super) fn de_token_ids<'de, D: serde::Deserializer<'de>>(
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

/// A typed field's error as a serde error (`field `x`: message`, so the field is found again).
pub(super) fn de_error<E: serde::de::Error>(e: Error) -> E {
    match e {
        Error::Config { field, message, .. } => E::custom(format!("field `{field}`: {message}")),
        other => E::custom(other),
    }
}

/// The first error of a typed field (`init_lora_weights`, `loftq_config`, `eva_config`) of the
/// JSON `text`, as the crate's error (with its kind), if any.
pub(super) fn typed_field_error(text: &str) -> Option<Error> {
    let v: Value = serde_json::from_str(text).ok()?;
    let obj = v.as_object()?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(Err(e)) = field("init_lora_weights").map(InitLoraWeights::from_json) {
        return Some(e);
    }
    if let Some(Err(e)) = field("loftq_config").map(LoftQConfig::from_json) {
        return Some(e);
    }
    if let Some(Err(e)) = field("eva_config").map(EvaConfig::from_json) {
        return Some(e);
    }
    None
}

/// Whether an unknown field's value is its "off" default (`null`, `false`, `[]`, `{}`).
pub(super) fn is_default_like(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `v` with every object's keys sorted (PEFT's `json.dumps(sort_keys=True)`).
pub(super) fn sort_keys(v: Value) -> Value {
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

/// The field a serde error of the JSON `text` is about. serde does not say (the config's
/// catch-all `#[serde(flatten)]` drops the key from its messages, e.g. `"r": "8"` gives
/// "invalid type: string \"8\", expected usize"), so each top-level key is deserialised alone
/// and the first that fails is the field; otherwise the message's first backticked token (our
/// own field errors quote it), else `<json>` (a syntax error, a non-object).
pub(super) fn field_of_serde_error(text: &str, e: &serde_json::Error) -> String {
    if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) {
        for (k, v) in &obj {
            let alone = Value::Object([(k.clone(), v.clone())].into_iter().collect());
            if serde_json::from_value::<LoraConfig>(alone).is_err() {
                return k.clone();
            }
        }
    }
    let msg = e.to_string();
    msg.split('`').nth(1).unwrap_or("<json>").to_string()
}
