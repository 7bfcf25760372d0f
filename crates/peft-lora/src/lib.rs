//! # peft-lora
//!
//! Hugging Face PEFT's LoRA family for [Burn](https://burn.dev): LoRA, rsLoRA, DoRA and aLoRA layers,
//! PEFT-exact module targeting, merge / unmerge, several named adapters, and PEFT's own
//! `adapter_config.json` + `adapter_model.safetensors` format in both directions.
//!
//! ## Quick start
//! Each linear you may adapt becomes a [`LoraLinear`] (from the same Burn `nn::Linear`, or a
//! [`LoraLinearConfig`] with `LinearConfig`'s fields), and the model derives [`LoraModel`]:
//! its layers are found by the names Burn records, which are the module paths of PEFT's files.
//! Then add (or load) adapters, train them in your own loop, save, switch and merge:
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
//! use peft_lora::{AdamWConfig, LoraConfig, LoraLinear, LoraModel};
//! use peft_lora::{LoraOptimizer, OptimizerKind, PeftModel};
//!
//! #[derive(Module, Debug, LoraModel)]
//! struct Mlp<B: Backend> {
//!     fc1: LoraLinear<B>,
//!     fc2: LoraLinear<B>,
//! }
//!
//! impl<B: Backend> Mlp<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.fc2.forward(self.fc1.forward(x).tanh())
//!     }
//! }
//!
//! # fn main() -> peft_lora::Result<()> {
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let linear = |i, o| LinearConfig::new(i, o).init::<B>(&device).into();
//! let base = Mlp { fc1: linear(4, 8), fc2: linear(8, 1) };
//! let x = Tensor::<B, 2>::random([16, 4], Distribution::Normal(0.0, 1.0), &device);
//! let y = x.clone().sum_dim(1);
//!
//! // Add: LoRA on both layers (the first adapter of a model becomes active).
//! let mut peft = PeftModel::new(base.clone());
//! peft.add_adapter("sum", &LoraConfig::new(2, 4.0, &["fc1", "fc2"]))?;
//!
//! // Train: your loop, the adapter optimizer (the frozen base never changes).
//! let mut opt = LoraOptimizer::new(OptimizerKind::AdamW, AdamWConfig::default());
//! let loss = |m: &Mlp<B>| (m.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
//! let first: f32 = loss(&peft.model).into_scalar().elem();
//! peft.train();
//! for _ in 0..30 {
//!     let grads = loss(&peft.model).backward();
//!     opt.step_grads(&mut peft.model, &grads, 2e-2);
//! }
//! peft.eval();
//! assert!(loss(&peft.model).into_scalar().elem::<f32>() < first);
//!
//! // Save (PEFT's format, in dir/sum/) and load onto the base again.
//! let saved = peft.save_adapter(&std::env::temp_dir().join("peft-lora-quickstart"), "sum")?;
//! let mut loaded = PeftModel::new(base.clone());
//! loaded.load_adapter(&saved, "sum")?;
//! let out = loaded.model.forward(x.clone());
//!
//! // Switch to a second adapter and back.
//! loaded.add_adapter("other", &LoraConfig::new(2, 4.0, &["fc2"]))?;
//! loaded.set_active(&["other"])?;
//! loaded.set_active(&["sum"])?;
//!
//! // Merge: a plain Mlp with the adapter in its weights.
//! let merged = loaded.merge_and_unload(true)?;
//! let diff: f32 = (merged.forward(x) - out).abs().max().into_scalar().elem();
//! assert!(diff < 1e-4);
//! # Ok(())
//! # }
//! ```
//!
//! Without the derive, implement [`LoraModel`] by hand, listing the layers with their paths.
//! A model may also expose its input embedding as a [`TrainableTokens`]
//! (`trainable_token_indices`, and `modules_to_save` of the whole table), a `#[lora(head)]`
//! output head (never a LoRA target; `modules_to_save` trains a copy of it), and
//! [`LoraModel::replicate_layers`] (`layer_replication`, through `#[lora_model(hooks)]` and
//! [`LoraModelHooks`] with the derive).
//!
//! Which adapters run follows PEFT: the first adapter added to (or loaded into) a model becomes
//! active; later ones do not until [`PeftModel::set_active`] names them, which applies to every
//! layer (a layer without the adapter runs its base); deleting the active adapter activates the
//! first remaining one by name; [`PeftModel::with_adapters_disabled`] runs the base.
//! [`PeftModel::train`] / [`PeftModel::eval`] switch LoRA dropout on and off on any backend.
//!
//! ## 4-bit base (QLoRA) and LoftQ
//! [`LoraLinear::quantize_nf4`] (or [`LoraLinear::from_nf4`]) keeps a layer's frozen base in
//! bitsandbytes' NF4 ([`Nf4Tensor`]): 4-bit codes plus one f32 scale per 64 values, dequantized
//! on the fly in the forward; merging dequantizes, adds and quantizes again, as PEFT does on a
//! 4-bit layer. `init_lora_weights = "loftq"` ([`InitLoraWeights::LoftQ`], settings in
//! [`LoftQConfig`]) quantizes the base itself and starts the adapter at a rank-r SVD of the
//! quantization error ([`loftq_factors`]).
//!
//! ## Layout
//! Modules depend only downwards, in this order: errors, files, host tensors and key names,
//! safetensors, linear algebra, NF4, op selection and dropout; the config ([`LoraConfig`] with
//! its typed sub-configs) and targeting; one adapter ([`LoraAdapter`]), one module's
//! `modules_to_save` copies ([`SavedCopies`]) and per-call routing ([`LoraCtx`]); the
//! variants ([`LoraVariant`]); the layer ([`LoraLinear`]) and token tables; the discovery of a
//! model's layers ([`LoraModules`], what `#[derive(LoraModel)]` implements) and the model
//! trait ([`LoraModel`]); the initialisations (PiSSA / OLoRA, LoftQ, EVA); the
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

/// The workspace README's code blocks, run as doc-tests ("Using `peft-lora` in your own
/// model").
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
