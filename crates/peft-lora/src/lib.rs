//! # peft-lora
//!
//! Hugging Face PEFT's LoRA family for [Burn](https://burn.dev): LoRA, rsLoRA, DoRA and aLoRA layers,
//! PEFT-exact module targeting, merge / unmerge, several named adapters, and PEFT's own
//! `adapter_config.json` + `adapter_model.safetensors` format in both directions.
//!
//! ## Adapting your own model
//! 1. Build each linear layer you may want to adapt as a [`LoraLinear`] (from its frozen weight).
//! 2. Implement [`LoraModel`] by listing those layers with their Hugging Face module paths.
//! 3. Optionally expose the input embedding as a [`TrainableTokens`] through
//!    [`LoraModel::token_tables`] (`trainable_token_indices`) and implement
//!    [`LoraModel::replicate_layers`] (`layer_replication`).
//! 4. Wrap the model in a [`PeftModel`] and call [`PeftModel::add_adapter`] with a
//!    [`LoraConfig`], or [`PeftModel::load_adapter`] with a folder saved by Python PEFT.
//!
//! ## 4-bit base (QLoRA) and LoftQ
//! [`LoraLinear::quantize_nf4`] (or [`LoraLinear::from_nf4`]) keeps a layer's frozen base in
//! bitsandbytes' NF4 ([`nf4`]): 4-bit codes plus one f32 scale per 64 values, dequantized on the
//! fly in the forward; merging dequantizes, adds and quantizes again, as PEFT does on a 4-bit
//! layer. `init_lora_weights = "loftq"` ([`loftq`]) quantizes the base itself and starts the
//! adapter at a rank-r SVD of the quantization error.
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
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decompose;
pub mod error;
pub mod eva;
pub mod init;
pub mod io;
pub mod layer;
pub mod linalg;
pub mod loftq;
pub mod model;
pub mod nf4;
pub mod nf4_weight;
pub mod optim;
pub mod replicate;
pub mod st;
pub mod target;
pub mod tokens;
pub mod variant;
pub mod weighted;

pub use config::{BiasMode, InitLoraWeights, LoraConfig, TargetModules, TokenIndices};
pub use error::{Error, Result};
pub use layer::{
    seed_dropout, with_training, AdapterMeta, InputCapture, LayerState, LoraAdapter, LoraCtx,
    LoraLinear,
};
pub use loftq::LoftQConfig;
pub use model::{LoraModel, PeftModel, TrainableReport};
pub use nf4::{Nf4Tensor, NF4_BLOCKSIZE, NF4_CODE};
pub use nf4_weight::Nf4Weight;
pub use optim::{AdamWConfig, GradAccumulator, LoraOptimizer, OptimizerKind};
pub use tokens::{TokenAdapter, TrainableTokens};
pub use variant::{LoraVariant, VariantKind};
pub use weighted::Combination;
