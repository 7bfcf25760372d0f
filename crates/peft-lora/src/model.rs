//! Model-level operations: inject adapters by config, switch, merge, report.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::init::InitMethod;
use crate::layer::{AdapterMeta, LoraLinear};
use crate::target::{is_target, rank_alpha};
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
        let mut adapted = Vec::new();
        let mut all_paths = Vec::new();
        for (path, layer) in self.model.lora_linears_mut() {
            all_paths.push(path.clone());
            if !is_target(cfg, &path)? {
                continue;
            }
            let meta = adapter_meta(cfg, name, &path);
            let device = layer.weight.device();
            let (a, b) = method.init::<B>(layer.d_in(), layer.d_out(), meta.r, &device);
            let adapter = layer.new_adapter(meta, a, b, cfg.lora_bias);
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
        Ok(())
    }

    /// Merges the active adapters into the frozen weights (`safe`: refuse non-finite results).
    /// An adapter whose variant cannot merge (aLoRA) is an error before any weight changes.
    pub fn merge<B: Backend>(&mut self, safe: bool) -> Result<()>
    where
        M: LoraModel<B>,
    {
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
        Ok(())
    }

    /// Merges the active adapters and drops all adapters: a plain model with updated weights.
    pub fn merge_and_unload<B: Backend>(mut self, safe: bool) -> Result<M>
    where
        M: LoraModel<B>,
    {
        self.merge::<B>(safe)?;
        for (_, layer) in self.model.lora_linears_mut() {
            layer.adapters.clear();
            layer.state = Default::default();
        }
        Ok(self.model)
    }

    /// Drops all adapters without merging: the original model.
    pub fn unload<B: Backend>(mut self) -> Result<M>
    where
        M: LoraModel<B>,
    {
        self.unmerge::<B>()?;
        for (_, layer) in self.model.lora_linears_mut() {
            layer.adapters.clear();
            layer.state = Default::default();
        }
        Ok(self.model)
    }

    /// Trainable (adapter) and total parameter counts.
    pub fn trainable_parameters<B: Backend>(&self) -> TrainableReport
    where
        M: LoraModel<B> + Module<B>,
    {
        let trainable = self
            .model
            .lora_linears()
            .iter()
            .map(|(_, l)| l.adapter_param_count())
            .sum();
        TrainableReport {
            trainable,
            total: self.model.num_params(),
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
