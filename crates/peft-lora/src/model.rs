//! Model-level operations: inject adapters by config, switch, merge, report.

use std::collections::{BTreeMap, HashSet};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};

use crate::config::{LoraConfig, TokenIndices};
use crate::error::{Error, Result};
use crate::init::InitMethod;
use crate::layer::{AdapterMeta, LoraLinear};
use crate::target::{is_target, rank_alpha};
use crate::tokens::TrainableTokens;
use crate::variant::VariantKind;

/// A model whose linear layers are [`LoraLinear`]s, listed by their Hugging Face module path
/// (`model.layers.0.self_attn.q_proj`). This is all a model implements to get the LoRA family.
///
/// The output head must not be listed (PEFT's `"all-linear"` never adapts it).
pub trait LoraModel<B: Backend> {
    /// Every adaptable linear with its dotted module path, in a stable order.
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)>;
    /// The same, mutably.
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)>;

    /// Embedding tables whose rows can train (`trainable_token_indices`), with their module
    /// paths; the input embedding first (a plain list of ids targets it). None by default.
    fn token_tables(&self) -> Vec<(String, &TrainableTokens<B>)> {
        Vec::new()
    }

    /// The same, mutably.
    fn token_tables_mut(&mut self) -> Vec<(String, &mut TrainableTokens<B>)> {
        Vec::new()
    }

    /// Rebuilds the decoder stack from `[start, end)` ranges of its layers
    /// (`layer_replication`; see [`crate::replicate`]), sharing the frozen weights of copies and
    /// renumbering the layer paths. Called before any adapter exists. The default refuses.
    fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> Result<()> {
        Err(Error::Unsupported {
            field: crate::replicate::FIELD.into(),
            value: format!("{ranges:?}"),
            reason: "this model does not implement LoraModel::replicate_layers".into(),
        })
    }

    /// Size of the token vocabulary, when the model has one: aLoRA invocation token ids are
    /// checked against it when an adapter is added or loaded.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// A model plus the configs of the adapters injected into it (PEFT's `PeftModel`).
#[derive(Debug)]
pub struct PeftModel<M> {
    /// The model (train it, run it; its adapters live inside its layers).
    pub model: M,
    /// Config of each adapter, by name.
    pub configs: BTreeMap<String, LoraConfig>,
    /// Adapters in use.
    pub active: Vec<String>,
    /// The `layer_replication` applied to the model, if any (merging is refused then).
    pub replicated: Option<Vec<[usize; 2]>>,
}

/// What [`PeftModel::print_trainable_parameters`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainableReport {
    /// Trainable (adapter) parameters.
    pub trainable: usize,
    /// All parameters, frozen ones included.
    pub total: usize,
}

impl std::fmt::Display for TrainableReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            group(self.trainable),
            group(self.total),
            100.0 * self.trainable as f64 / self.total.max(1) as f64
        )
    }
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl<M> PeftModel<M> {
    /// Wraps a model that has no adapters yet.
    pub fn new(model: M) -> Self {
        PeftModel {
            model,
            configs: BTreeMap::new(),
            active: Vec::new(),
            replicated: None,
        }
    }

    /// Adds adapter `name` as `cfg` describes (targets, ranks, init) and makes it the active one.
    /// Returns the module paths that got it.
    pub fn add_adapter<B: Backend>(&mut self, name: &str, cfg: &LoraConfig) -> Result<Vec<String>>
    where
        M: LoraModel<B>,
    {
        cfg.validate()?;
        check_invocation_ids(cfg, self.model.vocab_size(), "<in memory>")?;
        if self.configs.contains_key(name) {
            return Err(Error::DuplicateAdapter(name.into()));
        }
        let method = InitMethod::parse(&cfg.init_lora_weights)?;
        let tokens = resolve_token_tables(&self.model, cfg)?;
        self.prepare_replication(cfg)?;
        // Check every target first so a bad rank leaves the model untouched.
        for (path, _) in self.model.lora_linears() {
            if is_target(cfg, &path)? {
                method.check_rank(adapter_meta(cfg, name, &path).r, &path)?;
            }
        }
        let loftq = match method {
            InitMethod::LoftQ => Some(crate::loftq::LoftQConfig::from_lora_config(cfg)?),
            _ => None,
        };
        let mut adapted = Vec::new();
        let mut all_paths = Vec::new();
        for (path, layer) in self.model.lora_linears_mut() {
            all_paths.push(path.clone());
            if !is_target(cfg, &path)? {
                continue;
            }
            let meta = adapter_meta(cfg, name, &path);
            let init = match &loftq {
                Some(lq) => {
                    let (a, b) = crate::loftq::init_layer(layer, lq, meta.r, &path)?;
                    crate::init::LayerInit {
                        a,
                        b,
                        residual: None,
                    }
                }
                None => method.init_layer(layer, meta.r, meta.scaling, &path)?,
            };
            if let Some(residual) = init.residual {
                // PiSSA / OLoRA: the principal part now lives in the adapter. On an NF4 base
                // the residual is quantized again (PEFT: dequantize, decompose, requantize).
                layer.set_base_weight(residual);
            }
            let adapter = layer.new_adapter(meta, init.a, init.b, cfg.lora_bias);
            layer.add_adapter(adapter)?;
            layer.set_active(&[name.to_string()]);
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
        self.configs.insert(name.into(), cfg.clone());
        self.active = vec![name.into()];
        Ok(adapted)
    }

    /// Makes `names` the adapters that run (PEFT's `set_adapter`, several allowed).
    pub fn set_active<B: Backend>(&mut self, names: &[&str]) -> Result<()>
    where
        M: LoraModel<B>,
    {
        for n in names {
            if !self.configs.contains_key(*n) {
                return Err(self.unknown(n));
            }
        }
        let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        for (path, table) in self.model.token_tables_mut() {
            table.set_active(&owned, &path)?;
        }
        for (_, layer) in self.model.lora_linears_mut() {
            layer.set_active(&owned);
        }
        self.active = owned;
        Ok(())
    }

    /// Deletes adapter `name` everywhere.
    pub fn delete_adapter<B: Backend>(&mut self, name: &str) -> Result<()>
    where
        M: LoraModel<B>,
    {
        if self.configs.remove(name).is_none() {
            return Err(self.unknown(name));
        }
        for (_, layer) in self.model.lora_linears_mut() {
            if layer.adapter(name).is_some() {
                layer.delete_adapter(name)?;
            }
        }
        for (_, table) in self.model.token_tables_mut() {
            table.delete_adapter(name);
        }
        self.active.retain(|a| a != name);
        Ok(())
    }

    /// Disables every adapter (the model computes exactly the base) or enables them again.
    pub fn set_adapters_disabled<B: Backend>(&mut self, disabled: bool) -> Result<()>
    where
        M: LoraModel<B>,
    {
        for (_, layer) in self.model.lora_linears_mut() {
            layer.set_disabled(disabled)?;
        }
        for (_, table) in self.model.token_tables_mut() {
            table.set_disabled(disabled);
        }
        Ok(())
    }

    /// Merges the active adapters into the frozen weights (`safe`: refuse non-finite results);
    /// trainable token rows are written into their tables. Refused on a model with replicated
    /// layers, whose copies share their frozen weights, and (before any weight changes) when an
    /// adapter's variant cannot merge (aLoRA).
    pub fn merge<B: Backend>(&mut self, safe: bool) -> Result<()>
    where
        M: LoraModel<B>,
    {
        if let Some(ranges) = &self.replicated {
            return Err(Error::Merge {
                adapter: self.active.join(", "),
                module: "<model>".into(),
                reason: format!(
                    "the base layers are replicated (layer_replication {ranges:?}) and copies share \
                     their frozen weights, so one copy's adapter cannot be merged; PEFT refuses this \
                     too (\"Cannot merge LORA layers when base model layers are replicated\")"
                ),
            });
        }
        for (path, layer) in self.model.lora_linears() {
            let pending: Vec<String> = layer
                .state
                .active
                .iter()
                .filter(|n| !layer.state.merged.contains(n))
                .cloned()
                .collect();
            layer.check_mergeable(&pending, &path)?;
        }
        for (path, layer) in self.model.lora_linears_mut() {
            layer.merge(safe, &path)?;
        }
        for (path, table) in self.model.token_tables_mut() {
            table.merge(safe, &path)?;
        }
        Ok(())
    }

    /// Removes merged adapters from the weights again.
    pub fn unmerge<B: Backend>(&mut self) -> Result<()>
    where
        M: LoraModel<B>,
    {
        for (_, layer) in self.model.lora_linears_mut() {
            layer.unmerge()?;
        }
        for (_, table) in self.model.token_tables_mut() {
            table.unmerge();
        }
        Ok(())
    }

    /// Merges the active adapters and drops all adapters: a plain model with updated weights.
    pub fn merge_and_unload<B: Backend>(mut self, safe: bool) -> Result<M>
    where
        M: LoraModel<B>,
    {
        self.merge::<B>(safe)?;
        clear_adapters(&mut self.model);
        Ok(self.model)
    }

    /// Drops all adapters without merging: the original model.
    pub fn unload<B: Backend>(mut self) -> Result<M>
    where
        M: LoraModel<B>,
    {
        self.unmerge::<B>()?;
        clear_adapters(&mut self.model);
        Ok(self.model)
    }

    /// Trainable (adapter and token-row) and total parameter counts; a parameter shared by
    /// replicated layers counts once, as in PEFT.
    pub fn trainable_parameters<B: Backend>(&self) -> TrainableReport
    where
        M: LoraModel<B> + Module<B>,
    {
        let lora: usize = self
            .model
            .lora_linears()
            .iter()
            .map(|(_, l)| l.adapter_param_count())
            .sum();
        let tokens: usize = self
            .model
            .token_tables()
            .iter()
            .map(|(_, t)| t.adapter_param_count())
            .sum();
        let mut unique = UniqueParams::default();
        self.model.visit(&mut unique);
        TrainableReport {
            trainable: lora + tokens,
            total: unique.count,
        }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn print_trainable_parameters<B: Backend>(&self)
    where
        M: LoraModel<B> + Module<B>,
    {
        println!("{}", self.trainable_parameters::<B>());
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownAdapter(
            name.into(),
            self.configs.keys().cloned().collect::<Vec<_>>().join(", "),
        )
    }
}

/// Rank, alpha, scaling, dropout and variant of adapter `name` at module `path`.
pub fn adapter_meta(cfg: &LoraConfig, name: &str, path: &str) -> AdapterMeta {
    let (r, alpha) = rank_alpha(cfg, path);
    AdapterMeta {
        name: name.into(),
        r,
        alpha,
        scaling: cfg.scaling_for(r, alpha),
        dropout: cfg.lora_dropout,
        variant: variant_kind(cfg),
        alora_invocation_tokens: cfg.alora_invocation_tokens.clone(),
    }
}

/// Counts parameter elements once per parameter id (replicated layers share theirs).
#[derive(Default)]
struct UniqueParams {
    seen: HashSet<ParamId>,
    count: usize,
}

impl<B: Backend> ModuleVisitor<B> for UniqueParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.seen.insert(param.id) {
            self.count += param.lazy_shape().num_elements();
        }
    }
}

/// Drops every adapter of every layer and table.
fn clear_adapters<B: Backend, M: LoraModel<B>>(model: &mut M) {
    for (_, layer) in model.lora_linears_mut() {
        layer.adapters.clear();
        layer.state = Default::default();
    }
    for (_, table) in model.token_tables_mut() {
        table.adapters.clear();
        table.state = Default::default();
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
            table.set_active(&[name.to_string()], &path)?;
        }
    }
    Ok(())
}

/// The variant a (validated) config asks for.
pub fn variant_kind(cfg: &LoraConfig) -> VariantKind {
    if cfg.alora_invocation_tokens.is_some() {
        VariantKind::Alora
    } else if cfg.use_dora {
        VariantKind::Dora
    } else {
        VariantKind::Lora
    }
}

/// aLoRA invocation ids must be tokens of the model's vocabulary (when it has one).
pub(crate) fn check_invocation_ids(
    cfg: &LoraConfig,
    vocab: Option<usize>,
    origin: &str,
) -> Result<()> {
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
