//! Which modules get an adapter: PEFT's `check_target_module_exists`, rule for rule.

use regex::Regex;

pub use crate::config::ALL_LINEAR;
use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};

fn full_regex(pattern: &str, field: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::config(field, format!("invalid regex `{pattern}`: {e}")))
}

/// Exact name or `.`-suffix match against a list; regex fullmatch against a string.
fn matches(targets: &TargetModules, key: &str, field: &str) -> Result<bool> {
    Ok(match targets {
        TargetModules::Regex(s) if s == ALL_LINEAR => true,
        TargetModules::Regex(pattern) => full_regex(pattern, field)?.is_match(key),
        TargetModules::List(names) => names
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}"))),
    })
}

/// The layer index of `key` (the number after the layer list's name), as PEFT finds it.
fn layer_index(key: &str, patterns: Option<Vec<String>>) -> Option<usize> {
    let candidates: Vec<Regex> = match patterns {
        None => vec![Regex::new(r"^.*\.[^.]*\.(\d+)\.").expect("static regex")],
        Some(ps) => ps
            .iter()
            .filter_map(|p| Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).ok())
            .collect(),
    };
    candidates.iter().find_map(|re| {
        re.captures(key)
            .and_then(|c| c.get(1))
            .and_then(|m| m.as_str().parse().ok())
    })
}

/// Whether the module at dotted path `key` is one of `modules_to_save` (PEFT's
/// `key.endswith(name)` for any listed name: a plain string suffix, as PEFT checks it).
pub fn is_saved_module(cfg: &LoraConfig, key: &str) -> bool {
    cfg.modules_to_save
        .as_ref()
        .is_some_and(|names| names.iter().any(|n| key.ends_with(n.as_str())))
}

/// Whether the module at dotted path `key` gets this config's adapter. A module of
/// `modules_to_save` never does (PEFT wraps it whole instead of injecting LoRA).
pub fn is_target(cfg: &LoraConfig, key: &str) -> Result<bool> {
    if is_saved_module(cfg, key) {
        return Ok(false);
    }
    if let Some(ex) = &cfg.exclude_modules {
        if matches(ex, key, "exclude_modules")? {
            return Ok(false);
        }
    }
    let Some(targets) = &cfg.target_modules else {
        return Err(Error::config(
            "target_modules",
            "is null; give a list of module names, a regex, or \"all-linear\"",
        ));
    };
    let mut hit = matches(targets, key, "target_modules")?;
    // PEFT applies the layer filter only to list targets ("all-linear" expands to a list).
    let is_list = !matches!(targets, TargetModules::Regex(s) if s != ALL_LINEAR);
    if hit && is_list {
        if let Some(layers) = &cfg.layers_to_transform {
            let wanted = layers.to_vec();
            hit = match layer_index(key, cfg.layers_pattern.as_ref().map(|p| p.to_vec())) {
                Some(i) => wanted.contains(&i),
                None => false,
            };
        }
    }
    Ok(hit)
}

/// The key of `pattern` (rank_pattern / alpha_pattern) that applies to `key`, as PEFT's
/// `get_pattern_key`: an exact match first, else the first key matching `(.*\.)?(key)$`.
pub fn pattern_key<'a, V>(
    pattern: &'a std::collections::BTreeMap<String, V>,
    key: &str,
) -> Option<&'a V> {
    if let Some(v) = pattern.get(key) {
        return Some(v);
    }
    pattern.iter().find_map(|(k, v)| {
        Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
            .ok()
            .filter(|re| re.is_match(key))
            .map(|_| v)
    })
}

/// Rank and alpha of the module at `key` after rank_pattern / alpha_pattern.
pub fn rank_alpha(cfg: &LoraConfig, key: &str) -> (usize, f64) {
    let r = pattern_key(&cfg.rank_pattern, key)
        .copied()
        .unwrap_or(cfg.r);
    let alpha = pattern_key(&cfg.alpha_pattern, key)
        .copied()
        .unwrap_or(cfg.lora_alpha);
    (r, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OneOrMany;

    #[test]
    fn list_suffix_regex_and_layers() {
        let mut cfg = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
        assert!(is_target(&cfg, "model.layers.0.self_attn.q_proj").unwrap());
        assert!(!is_target(&cfg, "model.layers.0.self_attn.k_proj").unwrap());
        assert!(!is_target(&cfg, "model.layers.0.self_attn.xq_proj").unwrap());
        cfg.layers_to_transform = Some(OneOrMany::Many(vec![1]));
        cfg.layers_pattern = Some(OneOrMany::One("layers".into()));
        assert!(!is_target(&cfg, "model.layers.0.self_attn.q_proj").unwrap());
        assert!(is_target(&cfg, "model.layers.1.self_attn.q_proj").unwrap());
        cfg.target_modules = Some(TargetModules::Regex(
            r".*\.layers\.1\.mlp\.(gate|up)_proj".into(),
        ));
        assert!(is_target(&cfg, "model.layers.1.mlp.up_proj").unwrap());
        assert!(!is_target(&cfg, "model.layers.1.mlp.down_proj").unwrap());
        cfg.exclude_modules = Some(TargetModules::List(vec!["up_proj".into()]));
        assert!(!is_target(&cfg, "model.layers.1.mlp.up_proj").unwrap());
    }

    #[test]
    fn rank_pattern_suffix() {
        let mut cfg = LoraConfig::new(4, 8.0, &["q_proj"]);
        cfg.rank_pattern.insert("v_proj".into(), 2);
        cfg.rank_pattern
            .insert("model.layers.1.mlp.down_proj".into(), 6);
        assert_eq!(rank_alpha(&cfg, "model.layers.0.self_attn.v_proj").0, 2);
        assert_eq!(rank_alpha(&cfg, "model.layers.1.mlp.down_proj").0, 6);
        assert_eq!(rank_alpha(&cfg, "model.layers.0.mlp.down_proj").0, 4);
    }
}
