//! [`PeftModel`]: a model plus the configs of the adapters injected into it, and the
//! operations that need nothing but those (switch, delete, disable, count, EVA). Adding,
//! loading, saving, merging, combining, replicating and converting live in their own modules.

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};

use crate::adapter::LayerState;
use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::eva::{self, EvaLimits, EvaProgress, EvaReport};
use crate::model::LoraModel;
use crate::modules_to_save::{drop_copies, for_each_saveable_mut, saveable};

/// A model plus the configs of the adapters injected into it (PEFT's `PeftModel`). `B` is the
/// model's backend, so no call names it.
#[derive(Debug)]
pub struct PeftModel<B: Backend, M: LoraModel<B>> {
    /// The model (train it, run it; its adapters live inside its layers).
    pub model: M,
    /// Config of each adapter, by name.
    pub configs: BTreeMap<String, LoraConfig>,
    /// Adapters in use.
    pub active: Vec<String>,
    /// The `layer_replication` applied to the model, if any (merging is refused then).
    pub replicated: Option<Vec<[usize; 2]>>,
    backend: PhantomData<B>,
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
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Wraps a model that has no adapters yet.
    pub fn new(mut model: M) -> Self {
        name_layers(&mut model);
        PeftModel {
            model,
            configs: BTreeMap::new(),
            active: Vec::new(),
            replicated: None,
            backend: PhantomData,
        }
    }

    /// Makes `names` the adapters that run (PEFT's `set_adapter`, several allowed), on every
    /// layer and token table: a layer that has none of them runs its frozen base. As in PEFT,
    /// adapters merged into the weights are unmerged first, so the model then computes exactly
    /// `names`. An empty list runs the base everywhere. Unknown names are refused before
    /// anything changes.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if !self.configs.contains_key(*n) {
                return Err(self.unknown(n));
            }
        }
        let owned: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.activate(owned, true)
    }

    /// Applies the model-level active list `names` to every layer and token table (checks
    /// first, so a refused list changes nothing), unmerging merged adapters first when
    /// `unmerge` is set (PEFT's `set_adapter`).
    pub(crate) fn activate(&mut self, names: Vec<String>, unmerge: bool) -> Result<()> {
        for (path, table) in self.model.token_tables() {
            table.check_active(&names, &path)?;
        }
        for (path, module) in saveable(&self.model) {
            module.saved().check_active(&names, &path)?;
        }
        if unmerge {
            self.unmerge()?;
        }
        for (path, table) in self.model.token_tables_mut() {
            table.set_active(&names, &path)?;
        }
        for (path, layer) in self.model.lora_linears_mut() {
            layer.set_active(&names);
            layer.state.module = Some(path);
        }
        for_each_saveable_mut(&mut self.model, |path, module| {
            module.saved_mut().set_active(&names, path)
        })?;
        self.active = names;
        Ok(())
    }

    /// After adding or loading adapter `name`: the active set stays what it was (PEFT's
    /// `add_adapter` / `load_adapter` never change it), except that the first adapter of a
    /// model without adapters becomes active, as PEFT's constructor makes `"default"` active.
    pub(crate) fn keep_active_after_add(&mut self, name: &str) -> Result<()> {
        let names = if self.configs.len() == 1 {
            vec![name.to_string()]
        } else {
            self.active.clone()
        };
        self.activate(names, true)
    }

    /// Train (`true`) or evaluation (`false`) mode on every layer, PyTorch's `model.train()` /
    /// `model.eval()`: it decides whether LoRA dropout applies, on any backend (autodiff or
    /// not). Until it is called, dropout applies on autodiff backends only.
    pub fn set_training(&mut self, training: bool) {
        for (_, layer) in self.model.lora_linears_mut() {
            layer.state.training = Some(training);
        }
        for (_, layer) in self.model.head_linears_mut() {
            layer.state.training = Some(training);
        }
    }

    /// Training mode on every layer (LoRA dropout applies): `set_training(true)`.
    pub fn train(&mut self) {
        self.set_training(true);
    }

    /// Evaluation mode on every layer (no LoRA dropout, also on an autodiff backend):
    /// `set_training(false)`.
    pub fn eval(&mut self) {
        self.set_training(false);
    }

    /// Deletes adapter `name` everywhere. When it was active, the other active adapters stay
    /// active; when it was the only active one, the first remaining adapter by name becomes
    /// active (PEFT's `delete_adapter`, which picks `sorted(remaining)[0]`), or none when no
    /// adapter remains. Every layer follows the model-level choice.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
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
        for_each_saveable_mut(&mut self.model, |_, module| {
            module.saved_mut().delete(name);
            Ok(())
        })?;
        let mut active = self.active.clone();
        if active.iter().any(|a| a == name) {
            active.retain(|a| a != name);
            if active.is_empty() {
                // `configs` is a BTreeMap: its first key is PEFT's `sorted(remaining)[0]`.
                active.extend(self.configs.keys().next().cloned());
            }
        }
        self.activate(active, false)
    }

    /// Disables every adapter (the model computes exactly the base) or enables them again.
    /// Merged adapters are unmerged on disabling. See [`Self::with_adapters_disabled`] for
    /// PEFT's `with model.disable_adapter():`.
    pub fn set_adapters_disabled(&mut self, disabled: bool) -> Result<()> {
        for (_, layer) in self.model.lora_linears_mut() {
            layer.set_disabled(disabled)?;
        }
        for (_, table) in self.model.token_tables_mut() {
            table.set_disabled(disabled);
        }
        for_each_saveable_mut(&mut self.model, |_, module| {
            module.saved_mut().disabled = disabled;
            Ok(())
        })
    }

    /// Runs `f` on the model with every adapter disabled, then enables them again (PEFT's
    /// `with model.disable_adapter():`): inside, the model computes exactly its base. The
    /// active set is unchanged; merged adapters are unmerged (as on disabling); afterwards the
    /// adapters are enabled again (or stay disabled if they were before).
    ///
    /// ```ignore
    /// let base_logits = peft.with_adapters_disabled(|m| m.forward(x.clone()))?;
    /// ```
    pub fn with_adapters_disabled<R>(&mut self, f: impl FnOnce(&M) -> R) -> Result<R> {
        let was_disabled = self
            .model
            .lora_linears()
            .iter()
            .any(|(_, l)| l.state.disabled);
        self.set_adapters_disabled(true)?;
        let out = f(&self.model);
        self.set_adapters_disabled(was_disabled)?;
        Ok(out)
    }

    /// Trainable (adapter, token-row and `modules_to_save` copy) and total parameter counts
    /// (the copies count in both, as in PEFT); a parameter shared by
    /// replicated layers counts once, as in PEFT.
    pub fn trainable_parameters(&self) -> TrainableReport
    where
        M: Module<B>,
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
        let saved: usize = saveable(&self.model)
            .iter()
            .map(|(_, m)| m.saved().param_count())
            .sum();
        let mut unique = UniqueParams::default();
        self.model.visit(&mut unique);
        TrainableReport {
            trainable: lora + tokens + saved,
            total: unique.count,
        }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn print_trainable_parameters(&self)
    where
        M: Module<B>,
    {
        println!("{}", self.trainable_parameters());
    }

    /// Runs EVA for adapter `name` (added with `init_lora_weights = "eva"`), with the settings
    /// of its config's `eva_config`.
    ///
    /// `batches` is cycled until every layer's components converge; `forward` runs the model
    /// on one batch (adapters are disabled meanwhile); `mask` gives the flattened tokens of a
    /// batch that feed the SVD (see [`crate::EvaConfig::token_mask`]); `progress` is called
    /// after every batch. The new ranks, alphas and targets are written into the config.
    pub fn eva_init<T, I>(
        &mut self,
        name: &str,
        batches: I,
        forward: impl FnMut(&M, &T),
        mask: impl FnMut(&T) -> Vec<bool>,
        progress: impl FnMut(EvaProgress),
        limits: EvaLimits,
    ) -> Result<EvaReport>
    where
        I: Iterator<Item = T> + Clone,
    {
        let cfg = self
            .configs
            .get(name)
            .cloned()
            .ok_or_else(|| self.unknown(name))?;
        let out = eva::run(
            &mut self.model,
            name,
            &cfg,
            &self.active,
            batches,
            forward,
            mask,
            progress,
            limits,
        )?;
        let c = self.configs.get_mut(name).expect("checked above");
        c.rank_pattern = out.rank_pattern;
        c.alpha_pattern = out.alpha_pattern;
        c.target_modules = Some(TargetModules::List(out.targets));
        c.layers_to_transform = None;
        c.layers_pattern = None;
        c.exclude_modules = None;
        Ok(out.report)
    }

    /// The error for an adapter name this model does not have.
    pub(crate) fn unknown(&self, name: &str) -> Error {
        Error::UnknownAdapter(
            name.into(),
            self.configs.keys().cloned().collect::<Vec<_>>().join(", "),
        )
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

/// Records each layer's module path in its state (for error messages).
fn name_layers<B: Backend, M: LoraModel<B>>(model: &mut M) {
    for (path, layer) in model.lora_linears_mut() {
        layer.state.module = Some(path);
    }
}

/// Drops every adapter of every layer and table, and every `modules_to_save` copy (call
/// [`crate::modules_to_save::keep_live_copies`] first to keep the running ones).
pub(crate) fn clear_adapters<B: Backend, M: LoraModel<B>>(model: &mut M) -> Result<()> {
    for (_, layer) in model.lora_linears_mut() {
        layer.adapters.clear();
        layer.state = LayerState {
            module: layer.state.module.take(),
            training: layer.state.training,
            ..Default::default()
        };
    }
    for (_, table) in model.token_tables_mut() {
        table.adapters.clear();
        table.state = Default::default();
    }
    drop_copies(model)
}
