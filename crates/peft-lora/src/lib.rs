//! # peft-lora
//!
//! Hugging Face PEFT's LoRA family for [Burn](https://burn.dev): LoRA, rsLoRA, DoRA and aLoRA layers,
//! PEFT-exact module targeting, merge / unmerge, several named adapters, and PEFT's own
//! `adapter_config.json` + `adapter_model.safetensors` format in both directions.
//!
//! ## Adapting your own model
//! 1. Build each linear layer you may want to adapt as a [`LoraLinear`]: from a Burn
//!    `nn::Linear` (`LoraLinear::from(linear)`, same weight and bias), from a
//!    [`LoraLinearConfig`] (Burn's `LinearConfig` with the same fields and init), or from its
//!    frozen weight ([`LoraLinear::from_weight`]).
//! 2. Implement [`LoraModel`] by listing those layers with their Hugging Face module paths.
//! 3. Optionally expose the input embedding as a [`TrainableTokens`] through
//!    [`LoraModel::token_tables`] (`trainable_token_indices`) and implement
//!    [`LoraModel::replicate_layers`] (`layer_replication`).
//! 4. Optionally list an output head in [`LoraModel::head_linears`]: `modules_to_save` can
//!    then train a copy of it (as it can any listed linear or token table), saved with the
//!    adapter under PEFT's keys.
//! 5. Wrap the model in a [`PeftModel`] and call [`PeftModel::add_adapter`] with a
//!    [`LoraConfig`], or [`PeftModel::load_adapter`] with a folder saved by Python PEFT.
//!
//! Which adapters run follows PEFT: the first adapter added to (or loaded into) a model becomes
//! active; later ones do not until [`PeftModel::set_active`] names them, which applies to every
//! layer (a layer without the adapter runs its base); deleting the active adapter activates the
//! first remaining one by name; [`PeftModel::with_adapters_disabled`] runs the base.
//!
//! ## 4-bit base (QLoRA) and LoftQ
//! [`LoraLinear::quantize_nf4`] (or [`LoraLinear::from_nf4`]) keeps a layer's frozen base in
//! bitsandbytes' NF4 ([`Nf4Tensor`]): 4-bit codes plus one f32 scale per 64 values, dequantized
//! on the fly in the forward; merging dequantizes, adds and quantizes again, as PEFT does on a
//! 4-bit layer. `init_lora_weights = "loftq"` ([`InitLoraWeights::LoftQ`], settings in
//! [`LoftQConfig`]) quantizes the base itself and starts the adapter at a rank-r SVD of the
//! quantization error ([`loftq_factors`]).
//!
//! ```ignore
//! impl<B: Backend> LoraModel<B> for MyMlp<B> {
//!     fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
//!         vec![("fc1".into(), &self.fc1), ("fc2".into(), &self.fc2)]
//!     }
//!     fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
//!         vec![("fc1".into(), &mut self.fc1), ("fc2".into(), &mut self.fc2)]
//!     }
//! }
//! let mut peft = PeftModel::new(my_mlp);
//! peft.add_adapter("default", &LoraConfig::new(8, 16.0, &["fc1"]))?;
//! ```
//!
//! ## Layout
//! Modules depend only downwards, in this order: errors, files, host tensors and key names,
//! safetensors, linear algebra, NF4, op selection and dropout; the config ([`LoraConfig`] with
//! its typed sub-configs) and targeting; one adapter ([`LoraAdapter`]), one module's
//! `modules_to_save` copies ([`SavedCopies`]) and per-call routing ([`LoraCtx`]); the variants ([`LoraVariant`]); the layer ([`LoraLinear`]) and token tables;
//! the model trait ([`LoraModel`]); the initialisations (PiSSA / OLoRA, LoftQ, EVA); the
//! model-level operations on [`PeftModel`] (`modules_to_save`, add, load / save, merge,
//! weighted combinations, replication, conversion); the optimizers ([`LoraOptimizer`]).

#![warn(missing_docs)]

mod adapter;
mod add;
mod config;
mod convert;
mod decompose;
mod discover;
mod dropout;
mod error;
mod eva;
mod files;
mod fused;
mod host;
mod init;
mod io;
mod keys;
mod layer;
pub mod linalg;
mod loftq;
mod merge;
mod model;
mod modules_to_save;
mod nf4;
mod nf4_weight;
mod optim;
mod peft;
mod replicate;
mod routing;
mod saved;
mod st;
mod target;
mod tokens;
mod variant;
mod weighted;

pub use adapter::{AdapterMeta, InputCapture, LayerState, LoraAdapter, VariantKind};
pub use config::{
    BiasMode, EvaConfig, InitLoraWeights, LoftQConfig, LoraConfig, OneOrMany, TargetModules,
    TokenIndices,
};
pub use discover::{__derive, Found, FoundMut, LoraModelHooks, LoraModules};
pub use dropout::{seed_dropout, with_training};
pub use error::{Error, Result};
pub use eva::{EvaLimits, EvaProgress, EvaReport};
pub use host::{to_host, HostTensor};
pub use init::{init_factors, LayerInit};
pub use io::{adapter_dir, adapter_state_dict, WEIGHTS_FILE};
pub use keys::{saved_module_keys, token_delta_key, KEY_PREFIX, TOKEN_DELTA_SUFFIX};
pub use layer::{LoraLinear, LoraLinearConfig};
pub use loftq::{loftq_factors, LoftQFactors};
pub use model::{alora_offsets, alora_row_invocations, LoraModel};
pub use nf4::{Nf4Tensor, NF4_BLOCKSIZE, NF4_CODE};
pub use nf4_weight::Nf4Weight;
pub use optim::{AdamWConfig, GradAccumulator, LoraOptimizer, OptimizerKind};
pub use peft::{PeftModel, TrainableReport};
/// `#[derive(LoraModel)]`: see the trait [`LoraModel`].
pub use peft_lora_derive::LoraModel;
pub use replicate::layer_map;
pub use routing::{alora_positions, invocation_offset, LoraCtx};
pub use saved::{SaveableModule, SavedCopies, SavedCopy};
pub use st::{write_f32, SafetensorsFile};
pub use target::{is_saved_module, is_target, ALL_LINEAR};
pub use tokens::{TokenAdapter, TrainableTokens};
pub use variant::{Base, LoraVariant};
pub use weighted::Combination;
