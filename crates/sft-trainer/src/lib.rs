//! # sft-trainer
//!
//! Supervised fine-tuning of LoRA adapters, the loop TRL's `SFTTrainer` runs: AdamW (or LoRA+ /
//! LoRA-FA), gradient accumulation, global-norm clipping, HF learning-rate schedules with
//! warmup, periodic evaluation, `metrics.jsonl` + a loss-curve PNG, atomic checkpoints in PEFT's
//! format and exact resume.
//!
//! The trainer knows models only through [`CausalLm`]: a [`peft_lora::LoraModel`] that computes
//! a causal-LM loss on a [`Batch`].

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod error;
pub mod metrics;
pub mod phases;
pub mod schedule;
mod switch;
pub mod trainer;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use peft_lora::LoraModel;

pub use config::TrainConfig;
pub use data::{make_batch, Batch, Sample};
pub use data_parallel::{Communicator, Solo};
pub use error::{Error, Result};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{evaluate, train, train_data_parallel, TrainSummary};

/// A model the trainer can fine-tune: adapters through [`LoraModel`], and a loss.
pub trait CausalLm<B: Backend>: LoraModel<B> + Module<B> {
    /// Mean cross-entropy of next-token prediction over the labelled tokens (HF semantics:
    /// labels shifted by one, -100 ignored). Shape `[1]`.
    fn causal_lm_loss(&self, batch: &Batch<B>) -> Tensor<B, 1>;

    /// Gradient checkpointing per decoder layer: computes the loss and the gradients of
    /// `scale * loss`, handing each gradient container of its backward calls to `on_grads`, and
    /// returns the (unscaled) loss, `[1]`, not read back (the trainer reads it once the step's
    /// work is queued). `None` (the default) when the model has no such backward: the trainer
    /// then runs `causal_lm_loss(..).backward()`.
    fn causal_lm_backward_checkpointed(
        &self,
        batch: &Batch<B>,
        scale: f64,
        on_grads: &mut dyn FnMut(&B::Gradients),
    ) -> Option<Tensor<B::InnerBackend, 1>>
    where
        B: AutodiffBackend,
    {
        let _ = (batch, scale, on_grads);
        None
    }
}

impl<B: Backend> CausalLm<B> for llama::LlamaForCausalLM<B> {
    fn causal_lm_loss(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        self.loss(
            batch.input_ids.clone(),
            Some(batch.attention_mask.clone()),
            batch.labels.clone(),
            llama::LossOptions::default(),
            &peft_lora::LoraCtx::default(),
        )
    }

    fn causal_lm_backward_checkpointed(
        &self,
        batch: &Batch<B>,
        scale: f64,
        on_grads: &mut dyn FnMut(&B::Gradients),
    ) -> Option<Tensor<B::InnerBackend, 1>>
    where
        B: AutodiffBackend,
    {
        let out = self.backward_checkpointed(
            batch.input_ids.clone(),
            Some(batch.attention_mask.clone()),
            batch.labels.clone(),
            llama::LossOptions::default(),
            &peft_lora::LoraCtx::default(),
            scale,
            on_grads,
        );
        Some(out.loss)
    }
}
