//! # llama
//!
//! Llama 3.x for Burn: Hugging Face `config.json` + safetensors checkpoints (single file or
//! sharded; bf16, f16 or f32) from a local folder or the Hub, a forward pass with padding masks,
//! GQA, RoPE (llama3 scaling) and RMSNorm as transformers computes them, HF's causal-LM loss,
//! and KV-cache generation.
//!
//! Every projection is a [`peft_lora::LoraLinear`], and [`LlamaForCausalLM`] implements
//! [`peft_lora::LoraModel`] with HF module paths, so the whole PEFT LoRA family applies to it.
//!
//! ```ignore
//! let files = llama::resolve(&llama::ModelSource::parse("NCSOFT/Llama-VARCO-8B-Instruct"))?;
//! let model = llama::LlamaForCausalLM::<B>::load(&files, &device)?;
//! let tokenizer = llama::load_tokenizer(&files)?;
//! let stop = llama::stop_ids(&files, &model.config, Some(&tokenizer))?;
//! let out = model.generate(&[prompt_ids], &GenerationConfig::greedy(256, stop), &LoraCtx::default(), &mut |_, _| {})?;
//! ```

pub mod attention;
pub mod checkpoint;
mod choose;
pub mod config;
pub mod error;
mod gen_config;
pub mod gen_state;
pub mod generate;
pub mod hub;
pub mod loss;
pub mod mlp;
pub mod model;
pub mod norm;
mod ops;
pub mod rope;
pub mod save;
pub mod tokenizer;
pub mod weights;

pub use attention::{Attention, KvCache};
pub use checkpoint::CheckpointedLoss;
pub use config::{HfLlamaConfig, LlamaConfig, RopeKind, RopeScaling, TokenIds};
pub use error::{Error, Result};
pub use gen_state::GenState;
pub use generate::GenerationConfig;
pub use hub::{resolve, resolve_with, HubOptions, HubRepo, ModelFiles, ModelSource};
pub use loss::{CausalLmOutput, LossOptions, IGNORE_INDEX};
pub use mlp::Mlp;
pub use model::{position_ids_from_mask, DecoderLayer, Embedding, LlamaForCausalLM, LlamaModel};
pub use norm::RmsNorm;
pub use save::SaveDtype;
pub use tokenizer::{load_tokenizer, stop_ids};
