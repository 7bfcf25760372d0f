//! # peft-lora
//!
//! Hugging Face PEFT's LoRA family for [Burn](https://burn.dev): LoRA, rsLoRA, DoRA and aLoRA layers,
//! PEFT-exact module targeting, merge / unmerge, several named adapters, and PEFT's own
//! `adapter_config.json` + `adapter_model.safetensors` format in both directions.
//!
//! ## Adapting your own model
//! 1. Build each linear layer you may want to adapt as a [`LoraLinear`] (from its frozen weight).
//! 2. Implement [`LoraModel`] by listing those layers with their Hugging Face module paths.
//! 3. Wrap the model in a [`PeftModel`] and call [`PeftModel::add_adapter`] with a
//!    [`LoraConfig`], or [`PeftModel::load_adapter`] with a folder saved by Python PEFT.
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

pub mod alora;
pub mod config;
pub mod error;
pub mod init;
pub mod io;
pub mod layer;
pub mod model;
pub mod optim;
pub mod st;
pub mod target;
pub mod variant;
pub mod weighted;

pub use config::{BiasMode, InitLoraWeights, LoraConfig, TargetModules};
pub use error::{Error, Result};
pub use layer::{AdapterMeta, LayerState, LoraAdapter, LoraCtx, LoraLinear};
pub use model::{LoraModel, PeftModel, TrainableReport};
pub use optim::{AdamWConfig, GradAccumulator, LoraOptimizer, OptimizerKind};
pub use variant::{LoraVariant, VariantKind};
pub use weighted::Combination;
