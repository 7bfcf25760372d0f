//! Finding a model's LoRA layers by the names Burn records: [`LoraModules`], the walk that
//! `#[derive(LoraModel)]` implements field by field, and what it finds ([`Found`],
//! [`FoundMut`]). A path is the dotted field names from the root, a `Vec` element adds its
//! index and an `Option` adds nothing, exactly as Burn names a module's record entries
//! (`encoder.fc1`, `model.layers.0.self_attn.q_proj`), so nothing is typed by hand.

use std::marker::PhantomData;

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use crate::layer::LoraLinear;
use crate::tokens::TrainableTokens;

/// The LoRA layers and token tables found under a module, with their paths.
pub struct Found<'a, B: Backend> {
    /// Adaptable linears (LoRA targets).
    pub linears: Vec<(String, &'a LoraLinear<B>)>,
    /// Linears under a `#[lora(head)]` field: never LoRA targets, `modules_to_save` only.
    pub heads: Vec<(String, &'a LoraLinear<B>)>,
    /// Token tables (`trainable_token_indices`, `modules_to_save`).
    pub tables: Vec<(String, &'a TrainableTokens<B>)>,
    head: bool,
}

/// The same, mutably.
pub struct FoundMut<'a, B: Backend> {
    /// Adaptable linears (LoRA targets).
    pub linears: Vec<(String, &'a mut LoraLinear<B>)>,
    /// Linears under a `#[lora(head)]` field.
    pub heads: Vec<(String, &'a mut LoraLinear<B>)>,
    /// Token tables.
    pub tables: Vec<(String, &'a mut TrainableTokens<B>)>,
    head: bool,
}

impl<'a, B: Backend> Found<'a, B> {
    /// Everything under `module`, paths from its root.
    pub fn of<M: LoraModules<B> + ?Sized>(module: &'a M) -> Self {
        let mut found = Found {
            linears: Vec::new(),
            heads: Vec::new(),
            tables: Vec::new(),
            head: false,
        };
        module.lora_walk("", &mut found);
        found
    }

    /// Marks what the walk finds from now on as heads (or not); returns the previous mark.
    #[doc(hidden)]
    pub fn enter_head(&mut self, head: bool) -> bool {
        let was = self.head;
        self.head = was || head;
        was
    }

    /// Restores the mark [`Self::enter_head`] returned.
    #[doc(hidden)]
    pub fn exit_head(&mut self, was: bool) {
        self.head = was;
    }
}

impl<'a, B: Backend> FoundMut<'a, B> {
    /// Everything under `module`, paths from its root.
    pub fn of<M: LoraModules<B> + ?Sized>(module: &'a mut M) -> Self {
        let mut found = FoundMut {
            linears: Vec::new(),
            heads: Vec::new(),
            tables: Vec::new(),
            head: false,
        };
        module.lora_walk_mut("", &mut found);
        found
    }

    /// Marks what the walk finds from now on as heads (or not); returns the previous mark.
    #[doc(hidden)]
    pub fn enter_head(&mut self, head: bool) -> bool {
        let was = self.head;
        self.head = was || head;
        was
    }

    /// Restores the mark [`Self::enter_head`] returned.
    #[doc(hidden)]
    pub fn exit_head(&mut self, was: bool) {
        self.head = was;
    }
}

/// A module that may hold LoRA layers: the walk that finds them. `#[derive(LoraModel)]`
/// implements it for a struct (field by field); here it is implemented for the layers
/// themselves and for `Vec`, `Option` and `Box` of anything that implements it.
pub trait LoraModules<B: Backend> {
    /// Adds every layer under `self` to `found`, `path` being `self`'s own path.
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>);
    /// The same, mutably.
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>);
}

impl<B: Backend> LoraModules<B> for LoraLinear<B> {
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>) {
        let list = if found.head {
            &mut found.heads
        } else {
            &mut found.linears
        };
        list.push((path.to_string(), self));
    }
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>) {
        let list = if found.head {
            &mut found.heads
        } else {
            &mut found.linears
        };
        list.push((path.to_string(), self));
    }
}

impl<B: Backend> LoraModules<B> for TrainableTokens<B> {
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>) {
        found.tables.push((path.to_string(), self));
    }
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>) {
        found.tables.push((path.to_string(), self));
    }
}

impl<B: Backend, T: LoraModules<B>> LoraModules<B> for Vec<T> {
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>) {
        for (i, m) in self.iter().enumerate() {
            m.lora_walk(&__derive::join(path, &i.to_string()), found);
        }
    }
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>) {
        for (i, m) in self.iter_mut().enumerate() {
            m.lora_walk_mut(&__derive::join(path, &i.to_string()), found);
        }
    }
}

/// Burn records an `Option`'s content under the field's own name.
impl<B: Backend, T: LoraModules<B>> LoraModules<B> for Option<T> {
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>) {
        if let Some(m) = self {
            m.lora_walk(path, found);
        }
    }
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>) {
        if let Some(m) = self {
            m.lora_walk_mut(path, found);
        }
    }
}

impl<B: Backend, T: LoraModules<B>> LoraModules<B> for Box<T> {
    fn lora_walk<'a>(&'a self, path: &str, found: &mut Found<'a, B>) {
        (**self).lora_walk(path, found);
    }
    fn lora_walk_mut<'a>(&'a mut self, path: &str, found: &mut FoundMut<'a, B>) {
        (**self).lora_walk_mut(path, found);
    }
}

/// What a `#[derive(LoraModel)]` model with `#[lora_model(hooks)]` supplies beyond its
/// layers: the optional methods of [`crate::LoraModel`], with the same defaults.
pub trait LoraModelHooks<B: Backend> {
    /// See [`crate::LoraModel::replicate_layers`].
    fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> Result<()> {
        Err(refuse_replication(ranges))
    }
    /// See [`crate::LoraModel::vocab_size`].
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// See [`crate::LoraModel::supports_alora`].
    fn supports_alora(&self) -> bool {
        false
    }
}

/// The error of a model that cannot replicate its layers.
pub(crate) fn refuse_replication(ranges: &[[usize; 2]]) -> Error {
    Error::Unsupported {
        field: crate::config::REPLICATION_FIELD.into(),
        value: format!("{ranges:?}"),
        reason: "this model does not implement LoraModel::replicate_layers".into(),
    }
}

/// What the code `#[derive(LoraModel)]` generates calls: not an API.
#[doc(hidden)]
pub mod __derive {
    use super::*;

    /// `path.label`, or `label` at the root.
    pub fn join(path: &str, label: &str) -> String {
        if path.is_empty() {
            label.to_string()
        } else {
            format!("{path}.{label}")
        }
    }

    /// A field under inspection: walked when its type implements [`LoraModules`], skipped
    /// otherwise (method resolution prefers [`ViaModules`] on `&Probe` and falls back to
    /// [`ViaNothing`] on `Probe`).
    pub struct Probe<'a, B, T>(&'a T, PhantomData<B>);

    impl<'a, B, T> Probe<'a, B, T> {
        /// Wraps a field.
        pub fn new(t: &'a T) -> Self {
            Probe(t, PhantomData)
        }
    }

    impl<B, T> Clone for Probe<'_, B, T> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<B, T> Copy for Probe<'_, B, T> {}

    /// Walks a field that implements [`LoraModules`].
    pub trait ViaModules<'a> {
        /// The backend.
        type B: Backend;
        /// Walks it.
        fn lora_walk(self, path: &str, found: &mut Found<'a, Self::B>);
    }

    impl<'a, B: Backend, T: LoraModules<B>> ViaModules<'a> for &Probe<'a, B, T> {
        type B = B;
        fn lora_walk(self, path: &str, found: &mut Found<'a, B>) {
            self.0.lora_walk(path, found);
        }
    }

    /// Skips any other field.
    pub trait ViaNothing<'a> {
        /// The backend.
        type B: Backend;
        /// Does nothing.
        fn lora_walk(self, path: &str, found: &mut Found<'a, Self::B>);
    }

    impl<'a, B: Backend, T> ViaNothing<'a> for Probe<'a, B, T> {
        type B = B;
        fn lora_walk(self, _: &str, _: &mut Found<'a, B>) {}
    }

    /// A field under inspection, mutably (see [`Probe`]).
    pub struct ProbeMut<'a, B, T>(Option<&'a mut T>, PhantomData<B>);

    impl<'a, B, T> ProbeMut<'a, B, T> {
        /// Wraps a field.
        pub fn new(t: &'a mut T) -> Self {
            ProbeMut(Some(t), PhantomData)
        }
    }

    /// Walks a field that implements [`LoraModules`], mutably.
    pub trait ViaModulesMut<'a> {
        /// The backend.
        type B: Backend;
        /// Walks it.
        fn lora_walk_mut(self, path: &str, found: &mut FoundMut<'a, Self::B>);
    }

    impl<'a, B: Backend, T: LoraModules<B>> ViaModulesMut<'a> for &mut ProbeMut<'a, B, T> {
        type B = B;
        fn lora_walk_mut(self, path: &str, found: &mut FoundMut<'a, B>) {
            if let Some(t) = self.0.take() {
                t.lora_walk_mut(path, found);
            }
        }
    }

    /// Skips any other field, mutably.
    pub trait ViaNothingMut<'a> {
        /// The backend.
        type B: Backend;
        /// Does nothing.
        fn lora_walk_mut(self, path: &str, found: &mut FoundMut<'a, Self::B>);
    }

    impl<'a, B: Backend, T> ViaNothingMut<'a> for &ProbeMut<'a, B, T> {
        type B = B;
        fn lora_walk_mut(self, _: &str, _: &mut FoundMut<'a, B>) {}
    }
}
