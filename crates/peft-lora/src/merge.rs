//! Merging adapters into the frozen weights and taking them out again (PEFT's `merge`,
//! `unmerge`, `merge_and_unload`, `unload`), and what becomes of `modules_to_save` copies.

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::modules_to_save::keep_live_copies;
use crate::peft::{clear_adapters, PeftModel};

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Merges the active adapters into the frozen weights (`safe`: refuse non-finite results);
    /// trainable token rows are written into their tables. Refused on a model with replicated
    /// layers, whose copies share their frozen weights, and (before any weight changes) when an
    /// adapter's variant cannot merge (aLoRA).
    pub fn merge(&mut self, safe: bool) -> Result<()> {
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
    pub fn unmerge(&mut self) -> Result<()> {
        for (_, layer) in self.model.lora_linears_mut() {
            layer.unmerge()?;
        }
        for (_, table) in self.model.token_tables_mut() {
            table.unmerge();
        }
        Ok(())
    }

    /// Merges the active adapters and drops all adapters: a plain model with updated weights.
    ///
    /// A `modules_to_save` module keeps the trained copy that runs (the active adapter's) as
    /// its frozen weights, as PEFT's `merge_and_unload` keeps `modules_to_save[active]`.
    pub fn merge_and_unload(mut self, safe: bool) -> Result<M> {
        self.merge(safe)?;
        keep_live_copies(&mut self.model)?;
        clear_adapters(&mut self.model)?;
        Ok(self.model)
    }

    /// Drops all adapters without merging: the original model (`modules_to_save` modules get
    /// their frozen originals back).
    pub fn unload(mut self) -> Result<M> {
        self.unmerge()?;
        clear_adapters(&mut self.model)?;
        Ok(self.model)
    }
}
