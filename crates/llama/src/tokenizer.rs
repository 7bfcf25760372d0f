//! The tokenizer of a checkpoint (`tokenizer.json`, loaded like the weights) and the ids
//! generation should stop on.

use std::path::Path;

use crate::config::{LlamaConfig, TokenIds};
use crate::error::{Error, Result};
use crate::hub::ModelFiles;

/// Loads `tokenizer.json` of `files`.
pub fn load_tokenizer(files: &ModelFiles) -> Result<tokenizers::Tokenizer> {
    let path = files.tokenizer.clone().ok_or_else(|| Error::Tokenizer {
        path: files.config.with_file_name("tokenizer.json"),
        message: "tokenizer.json not found beside the model".into(),
    })?;
    tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
        path,
        message: e.to_string(),
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        message: e.to_string(),
    })
}

/// The ids generation stops on: `eos_token_id` of `config.json` and of
/// `generation_config.json` (int or list), the tokenizer's `eos_token`
/// (`tokenizer_config.json`), and `<|eot_id|>` / `<|end_of_text|>` when the vocabulary has them
/// (Llama 3 instruct models end a turn with `<|eot_id|>` although their config names
/// `<|end_of_text|>`).
pub fn stop_ids(
    files: &ModelFiles,
    cfg: &LlamaConfig,
    tokenizer: Option<&tokenizers::Tokenizer>,
) -> Result<Vec<u32>> {
    let mut ids = cfg.eos_token_ids.clone();
    if let Some(p) = &files.generation_config {
        if let Some(eos) = read_json(p)?.get("eos_token_id") {
            if let Ok(t) = serde_json::from_value::<TokenIds>(eos.clone()) {
                ids.extend(t.to_vec());
            }
        }
    }
    if let Some(tok) = tokenizer {
        let mut names = vec!["<|eot_id|>".to_string(), "<|end_of_text|>".to_string()];
        if let Some(p) = &files.tokenizer_config {
            let eos = read_json(p)?.get("eos_token").cloned();
            match eos {
                Some(serde_json::Value::String(s)) => names.push(s),
                Some(serde_json::Value::Object(o)) => {
                    if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                        names.push(s.to_string());
                    }
                }
                _ => {}
            }
        }
        ids.extend(names.iter().filter_map(|n| tok.token_to_id(n)));
    }
    let mut seen = std::collections::BTreeSet::new();
    ids.retain(|i| seen.insert(*i));
    Ok(ids)
}
