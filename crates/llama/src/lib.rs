//! # llama
//!
//! Llama 3.x for Burn: Hugging Face `config.json` + safetensors checkpoints (single file or
//! sharded; bf16, f16 or f32) from a local folder or the Hub, a forward pass with padding masks,
//! GQA, RoPE (llama3 scaling) and RMSNorm, HF's causal-LM loss, and KV-cache generation.
//!
//! Every projection is a [`peft_lora::LoraLinear`], and [`LlamaForCausalLM`] implements
//! [`peft_lora::LoraModel`], so the whole PEFT LoRA family applies to it.

pub mod config;
pub mod error;
pub mod generate;
pub mod hub;
pub mod layers;
pub mod model;
pub mod rope;
pub mod save;
pub mod weights;

pub use config::{HfLlamaConfig, LlamaConfig, RopeKind};
pub use error::{Error, Result};
pub use generate::GenerationConfig;
pub use hub::{load_tokenizer, resolve, HubRepo, ModelFiles, ModelSource};
pub use model::{LlamaForCausalLM, LossOptions};
pub use save::SaveDtype;
