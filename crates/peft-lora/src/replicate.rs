//! Layer replication (`layer_replication`), PEFT's `replicate_layers`: the decoder stack is
//! rebuilt from `[start, end)` ranges of the original layers, in order. `[[0, 4], [2, 5]]` over
//! five layers gives `0, 1, 2, 3, 2, 3, 4`; layers no range covers are dropped.
//!
//! Copies share the frozen base weights (cloning a Burn `Param` clones a reference-counted handle,
//! not the data, and keeps the parameter id) and each copy gets its own adapters, because the
//! adapters are added after the copy. Merging is refused: an adapter merged into a shared weight
//! would change every copy.

use burn::tensor::backend::Backend;

use crate::config::{check_replication_ranges, LoraConfig, REPLICATION_FIELD as FIELD};
use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::peft::PeftModel;

/// The original index of every layer after replication, for a stack of `n_layers`.
///
/// ```
/// # use peft_lora::layer_map;
/// assert_eq!(layer_map(&[[0, 4], [2, 5]], 5).unwrap(), vec![0, 1, 2, 3, 2, 3, 4]);
/// ```
pub fn layer_map(ranges: &[[usize; 2]], n_layers: usize) -> Result<Vec<usize>> {
    check_replication_ranges(ranges)?;
    let mut out = Vec::new();
    for [start, end] in ranges {
        if *end > n_layers {
            return Err(Error::config(
                FIELD,
                format!(
                    "range [{start}, {end}] reaches past the model's {n_layers} layers \
                     (valid layers are 0..{n_layers}, end is exclusive)"
                ),
            ));
        }
        out.extend(*start..*end);
    }
    Ok(out)
}

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Applies `cfg.layer_replication` before an adapter is added or loaded.
    ///
    /// A model is replicated once: a later adapter with the same ranges reuses the replicated
    /// stack (PEFT would replicate the already replicated stack again and copy the earlier
    /// adapter's weights into the new layers); different ranges, or replication after other
    /// adapters exist, are refused.
    pub(crate) fn prepare_replication(&mut self, cfg: &LoraConfig) -> Result<()> {
        let Some(ranges) = &cfg.layer_replication else {
            return Ok(());
        };
        check_replication_ranges(ranges)?;
        match &self.replicated {
            Some(done) if done == ranges => Ok(()),
            Some(done) => Err(Error::config(
                FIELD,
                format!(
                    "{ranges:?} differs from the replication {done:?} this model already has; \
                     load the adapter onto a fresh base model"
                ),
            )),
            None if !self.configs.is_empty() => Err(Error::config(
                FIELD,
                format!(
                    "{ranges:?} must be applied before any adapter is added (this model has {}); \
                     start from a fresh base model",
                    self.configs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
            None => {
                self.model.replicate_layers(ranges)?;
                self.replicated = Some(ranges.clone());
                Ok(())
            }
        }
    }
}
