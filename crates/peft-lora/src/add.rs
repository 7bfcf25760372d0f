//! Adding an adapter to a [`PeftModel`] as a [`LoraConfig`] describes: targets, ranks, init,
//! trainable token rows (also used when an adapter is loaded).

use std::collections::HashSet;

use burn::tensor::{backend::Backend, Tensor};

use crate::adapter::AdapterMeta;
use crate::config::{LoraConfig, TokenIndices};
use crate::error::{Error, Result};
use crate::init::{init_factors, LayerInit};
use crate::loftq::loftq_init_layer;
use crate::model::LoraModel;
use crate::modules_to_save;
use crate::peft::PeftModel;
use crate::target::is_target;

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Adds adapter `name` as `cfg` describes (targets, ranks, init, trainable token rows, and
    /// a trainable copy of each `modules_to_save` module). Returns the module paths that got a
    /// LoRA adapter.
    ///
    /// As PEFT's `add_adapter`, this does not change which adapters run: the first adapter of a
    /// model without adapters becomes active (as PEFT's constructor makes `"default"` active),
    /// any later one stays inactive on every layer until [`PeftModel::set_active`] names it.
    pub fn add_adapter(&mut self, name: &str, cfg: &LoraConfig) -> Result<Vec<String>> {
        cfg.validate()?;
        check_alora(cfg, &self.model, "<in memory>")?;
        if self.configs.contains_key(name) {
            return Err(Error::DuplicateAdapter(name.into()));
        }
        let method = cfg.init_lora_weights;
        let tokens = resolve_token_tables(&self.model, cfg)?;
        let saved_paths = modules_to_save::resolve(&self.model, cfg)?;
        self.prepare_replication(cfg)?;
        // Check every target first so a bad rank leaves the model untouched.
        for (path, _) in self.model.lora_linears() {
            if is_target(cfg, &path)? {
                method.check_rank(AdapterMeta::from_config(cfg, name, &path).r, &path)?;
            }
        }
        let loftq = cfg.loftq_settings()?;
        let mut adapted = Vec::new();
        let mut all_paths = Vec::new();
        for (path, layer) in self.model.lora_linears_mut() {
            all_paths.push(path.clone());
            if !is_target(cfg, &path)? {
                continue;
            }
            let meta = AdapterMeta::from_config(cfg, name, &path);
            let init = match &loftq {
                Some(lq) => {
                    let (a, b) = loftq_init_layer(layer, lq, meta.r, &path)?;
                    LayerInit {
                        a,
                        b,
                        residual: None,
                    }
                }
                None => init_factors(layer, method, meta.r, meta.scaling, &path)?,
            };
            if let Some(residual) = init.residual {
                // PiSSA / OLoRA: the principal part now lives in the adapter. On an NF4 base
                // the residual is quantized again (PEFT: dequantize, decompose, requantize).
                layer.set_base_weight(residual);
            }
            let adapter = layer.new_adapter(meta, init.a, init.b, cfg.lora_bias);
            layer.add_adapter(adapter)?;
            adapted.push(path);
        }
        if adapted.is_empty() {
            let sample: Vec<String> = all_paths.into_iter().take(4).collect();
            return Err(Error::NoTarget(
                serde_json::to_string(&cfg.target_modules).unwrap_or_default(),
                sample.join(", "),
            ));
        }
        add_token_adapters(&mut self.model, name, &tokens, |_, _| Ok(None))?;
        modules_to_save::add_copies(&mut self.model, name, &saved_paths, |_, _, _| Ok(None))?;
        self.configs.insert(name.into(), cfg.clone());
        self.keep_active_after_add(name)?;
        Ok(adapted)
    }
}

/// The tables `cfg.trainable_token_indices` names, with their ids, checked against the model
/// (a plain list targets the first table, the input embedding; an object's keys match table
/// paths by suffix, as PEFT matches module names).
pub(crate) fn resolve_token_tables<B: Backend, M: LoraModel<B>>(
    model: &M,
    cfg: &LoraConfig,
) -> Result<Vec<(String, Vec<usize>)>> {
    const FIELD: &str = "trainable_token_indices";
    let Some(spec) = cfg.token_indices()? else {
        return Ok(Vec::new());
    };
    let tables = model.token_tables();
    let known = || {
        let names: Vec<&str> = tables.iter().map(|(p, _)| p.as_str()).collect();
        if names.is_empty() {
            "it exposes none through LoraModel::token_tables".to_string()
        } else {
            format!("it has {}", names.join(", "))
        }
    };
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    match spec {
        TokenIndices::List(ids) => {
            let (path, _) = tables.first().ok_or_else(|| {
                Error::config(
                    FIELD,
                    format!("this model has no input embedding to train ({})", known()),
                )
            })?;
            out.push((path.clone(), ids));
        }
        TokenIndices::Map(map) => {
            for (name, ids) in map {
                let hits: Vec<&String> = tables
                    .iter()
                    .map(|(p, _)| p)
                    .filter(|p| p.ends_with(&name))
                    .collect();
                if hits.is_empty() {
                    return Err(Error::config(
                        FIELD,
                        format!(
                            "`{name}` names no trainable embedding of this model ({})",
                            known()
                        ),
                    ));
                }
                for p in hits {
                    if out.iter().any(|(q, _)| q == p) {
                        return Err(Error::config(FIELD, format!("`{p}` is named by two keys")));
                    }
                    out.push((p.clone(), ids.clone()));
                }
            }
        }
    }
    for (path, ids) in &out {
        let (_, table) = tables
            .iter()
            .find(|(p, _)| p == path)
            .expect("resolved above");
        let vocab = table.vocab();
        let mut seen = HashSet::new();
        if let Some(dup) = ids.iter().find(|&&id| !seen.insert(id)) {
            return Err(Error::config(
                FIELD,
                format!("token id {dup} is listed twice for `{path}`"),
            ));
        }
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(Error::config(
                FIELD,
                format!(
                    "token id {bad} for `{path}` is out of range (its vocabulary has {vocab} rows)"
                ),
            ));
        }
    }
    Ok(out)
}

/// Adds adapter `name` to each resolved table; `rows(path)` gives loaded rows or `None` to
/// start from the table's own rows.
pub(crate) fn add_token_adapters<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    name: &str,
    targets: &[(String, Vec<usize>)],
    mut rows: impl FnMut(&str, &B::Device) -> Result<Option<Tensor<B, 2>>>,
) -> Result<()> {
    for (path, table) in model.token_tables_mut() {
        if let Some((_, ids)) = targets.iter().find(|(p, _)| *p == path) {
            let r = rows(&path, &table.weight.device())?;
            table.add_adapter(name, ids, r, &path)?;
        }
    }
    Ok(())
}

/// An aLoRA adapter needs a model that supplies aLoRA offsets ([`LoraModel::supports_alora`]),
/// and its invocation ids must be tokens of the model's vocabulary (when it has one).
pub(crate) fn check_alora<B: Backend, M: LoraModel<B>>(
    cfg: &LoraConfig,
    model: &M,
    origin: &str,
) -> Result<()> {
    if let Some(tokens) = &cfg.alora_invocation_tokens {
        if !model.supports_alora() {
            return Err(Error::Unsupported {
                field: "alora_invocation_tokens".into(),
                value: format!("{tokens:?}"),
                reason: format!(
                    "{origin}: this model does not compute aLoRA offsets, so the adapter would \
                     never run; a model that passes LoraCtx::alora_offsets to its layers' \
                     forward_ctx says so with LoraModel::supports_alora"
                ),
            });
        }
    }
    check_invocation_ids(cfg, model.vocab_size(), origin)
}

/// aLoRA invocation ids must be tokens of the model's vocabulary (when it has one).
fn check_invocation_ids(cfg: &LoraConfig, vocab: Option<usize>, origin: &str) -> Result<()> {
    if let (Some(tokens), Some(vocab)) = (&cfg.alora_invocation_tokens, vocab) {
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Config {
                path: origin.into(),
                field: "alora_invocation_tokens".into(),
                message: format!(
                    "token id {bad} is outside the model's vocabulary (ids 0..{vocab})"
                ),
            });
        }
    }
    Ok(())
}
