//! `modules_to_save` inside one module: per-adapter trainable copies of its weight and bias
//! (PEFT's `ModulesToSaveWrapper`), and what a module offers so that it can be saved whole
//! ([`SaveableModule`]: [`crate::LoraLinear`] and [`crate::TrainableTokens`] implement it).
//!
//! PEFT's semantics: a copy of the frozen original is made when an adapter that lists the
//! module is added (or loaded); the original stays frozen; the copy of the active adapter runs
//! instead of the original (the original runs when adapters are disabled or when no active
//! adapter has a copy here); one adapter at a time (PEFT refuses several active adapters with
//! copies in one module); `merge_and_unload` keeps the active copy as the module's weights.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use crate::error::{Error, Result};

/// The config field every error about these copies names.
pub(crate) const MODULES_TO_SAVE: &str = "modules_to_save";

/// One adapter's trainable copy of a module's weight and bias (PEFT's
/// `modules_to_save[adapter]`).
#[derive(Module, Debug)]
pub struct SavedCopy<B: Backend> {
    /// The weight, in the module's own layout (a [`crate::LoraLinear`]'s `[in, out]`, an
    /// embedding's `[vocab, dim]`).
    pub weight: Param<Tensor<B, 2>>,
    /// The bias, when the module has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter it belongs to.
    #[module(skip)]
    pub name: String,
}

/// The trainable copies of one module, one per adapter that lists it in `modules_to_save`.
#[derive(Module, Debug)]
pub struct SavedCopies<B: Backend> {
    /// The copies, in insertion order.
    pub copies: Vec<SavedCopy<B>>,
    /// The adapter whose copy runs (`None`: the frozen original runs).
    #[module(skip)]
    pub active: Option<String>,
    /// When true the frozen original runs (adapters disabled).
    #[module(skip)]
    pub disabled: bool,
}

impl<B: Backend> Default for SavedCopies<B> {
    fn default() -> Self {
        SavedCopies {
            copies: Vec::new(),
            active: None,
            disabled: false,
        }
    }
}

impl<B: Backend> SavedCopies<B> {
    /// The copy of adapter `name`.
    pub fn get(&self, name: &str) -> Option<&SavedCopy<B>> {
        self.copies.iter().find(|c| c.name == name)
    }

    /// The copy that runs instead of the original: the active adapter's, unless disabled.
    pub fn live(&self) -> Option<&SavedCopy<B>> {
        if self.disabled {
            return None;
        }
        self.active.as_deref().and_then(|n| self.get(n))
    }

    /// Adds adapter `name`'s trainable copy of `weight` and `bias` (detached copies of the
    /// values). `path` names the module in errors.
    pub fn add(
        &mut self,
        name: &str,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        path: &str,
    ) -> Result<()> {
        if self.get(name).is_some() {
            return Err(Error::config(
                MODULES_TO_SAVE,
                format!("`{path}` already has a copy for adapter `{name}`"),
            ));
        }
        self.copies.push(SavedCopy {
            weight: Param::from_tensor(weight.detach()),
            bias: bias.map(|b| Param::from_tensor(b.detach())),
            name: name.into(),
        });
        Ok(())
    }

    /// The one adapter of `names` that has a copy here (`None` when none has); an error when
    /// several have (PEFT refuses to activate several adapters of one `modules_to_save`
    /// module).
    pub(crate) fn check_active(&self, names: &[String], path: &str) -> Result<Option<String>> {
        let here: Vec<&String> = names.iter().filter(|n| self.get(n).is_some()).collect();
        match here.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => Err(Error::config(
                MODULES_TO_SAVE,
                format!(
                    "adapters {} all have a trained copy of `{path}`; only one of them can be \
                     active at a time",
                    many.iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Makes the copy of the one adapter of `names` that has one run (see
    /// [`Self::check_active`]).
    pub(crate) fn set_active(&mut self, names: &[String], path: &str) -> Result<()> {
        self.active = self.check_active(names, path)?;
        Ok(())
    }

    /// Removes adapter `name`'s copy (missing names are ignored).
    pub fn delete(&mut self, name: &str) {
        self.copies.retain(|c| c.name != name);
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
    }

    /// Trainable parameters of every copy.
    pub fn param_count(&self) -> usize {
        self.copies
            .iter()
            .map(|c| {
                c.weight.shape().num_elements()
                    + c.bias.as_ref().map_or(0, |b| b.shape().num_elements())
            })
            .sum()
    }

    /// Drops every copy, returning the live one's weight and bias (detached), if any.
    pub(crate) fn take_live(&mut self) -> Option<(Tensor<B, 2>, Option<Tensor<B, 1>>)> {
        let live = self.live().map(|c| {
            (
                c.weight.val().detach(),
                c.bias.as_ref().map(|b| b.val().detach()),
            )
        });
        *self = SavedCopies::default();
        live
    }
}

/// A module that `modules_to_save` can name: a weight (and optional bias) that an adapter
/// trains as a whole copy, saved under PEFT's keys `base_model.model.<path>.weight` / `.bias`.
pub trait SaveableModule<B: Backend> {
    /// The module's copies.
    fn saved(&self) -> &SavedCopies<B>;
    /// The module's copies, mutably.
    fn saved_mut(&mut self) -> &mut SavedCopies<B>;
    /// The frozen original weight (the module's own layout) and bias.
    fn original(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>);
    /// Whether PyTorch stores the weight transposed relative to the module's layout (a linear:
    /// Burn's `[in, out]` is PyTorch's `[out, in]` transposed).
    fn transposed_in_file(&self) -> bool;
    /// Makes `weight` and `bias` the frozen original (`merge_and_unload` keeping a copy).
    fn replace_original(&mut self, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>);
}
