//! `TrainConfig`: every knob of a run, saved as `train_config.json` beside its outputs.

use std::path::PathBuf;

use peft_lora::{AdamWConfig, OptimizerKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedule::ScheduleKind;

/// Settings of one supervised fine-tuning run (names follow TRL's `SFTConfig` where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Folder for checkpoints, metrics, plots and the final adapter.
    pub output_dir: PathBuf,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW betas, eps, weight decay.
    pub adamw: AdamWConfig,
    /// AdamW, LoRA+ or LoRA-FA.
    pub optimizer: OptimizerKind,
    /// Schedule type.
    pub lr_scheduler_type: ScheduleKind,
    /// Warmup as a fraction of the optimizer steps (ignored by `constant`, as in HF).
    pub warmup_ratio: f64,
    /// Warmup steps (wins over the ratio when > 0).
    pub warmup_steps: u64,
    /// Sequences per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Epochs over the training set.
    pub num_train_epochs: f64,
    /// Stop after this many optimizer steps (overrides epochs when > 0).
    pub max_steps: u64,
    /// Seed of data order and dropout.
    pub seed: u64,
    /// Log every N optimizer steps.
    pub logging_steps: u64,
    /// Evaluate every N optimizer steps (0 = only at the end).
    pub eval_steps: u64,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    pub save_steps: u64,
    /// Keep the last K checkpoints (0 = all).
    pub save_total_limit: usize,
    /// Sequences per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Pad token id used to build batches.
    pub pad_token_id: u32,
    /// Recompute activations per decoder layer in the backward (transformers'
    /// `gradient_checkpointing`): the model's [`crate::CausalLm::causal_lm_backward_checkpointed`]
    /// when it has one, else a plain backward.
    pub gradient_checkpointing: bool,
    /// Train in bf16 (CUDA); recorded here, chosen by the backend type.
    pub bf16: bool,
    /// Show a progress bar.
    pub progress_bar: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            output_dir: PathBuf::from("runs/sft"),
            learning_rate: 1e-4,
            adamw: AdamWConfig::default(),
            optimizer: OptimizerKind::AdamW,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: 0,
            seed: 42,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 100,
            save_total_limit: 3,
            per_device_eval_batch_size: 2,
            pad_token_id: 0,
            gradient_checkpointing: false,
            bf16: false,
            progress_bar: true,
        }
    }
}

fn bad(field: &str, value: impl ToString, expected: &str) -> Error {
    Error::Config {
        field: field.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

impl TrainConfig {
    /// Checks every setting before any long work starts, including that the output folder can
    /// be written.
    pub fn validate(&self) -> Result<()> {
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(bad(
                "learning_rate",
                self.learning_rate,
                "a positive number",
            ));
        }
        if self.per_device_train_batch_size == 0 {
            return Err(bad("per_device_train_batch_size", 0, "at least 1"));
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(bad("gradient_accumulation_steps", 0, "at least 1"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(bad("warmup_ratio", self.warmup_ratio, "in [0, 1)"));
        }
        if self.max_grad_norm < 0.0 {
            return Err(bad(
                "max_grad_norm",
                self.max_grad_norm,
                ">= 0 (0 disables clipping)",
            ));
        }
        if self.max_steps == 0 && self.num_train_epochs <= 0.0 {
            return Err(bad(
                "num_train_epochs",
                self.num_train_epochs,
                "> 0 when max_steps is 0",
            ));
        }
        if !(0.0..1.0).contains(&self.adamw.beta1) || !(0.0..1.0).contains(&self.adamw.beta2) {
            return Err(bad(
                "adamw.betas",
                format!("({}, {})", self.adamw.beta1, self.adamw.beta2),
                "each in [0, 1)",
            ));
        }
        if let OptimizerKind::LoraPlus { lr_ratio, .. } = self.optimizer {
            if lr_ratio <= 0.0 {
                return Err(bad("optimizer.lr_ratio", lr_ratio, "> 0"));
            }
        }
        std::fs::create_dir_all(&self.output_dir).map_err(|e| Error::io(&self.output_dir, e))?;
        let probe = self.output_dir.join(".write-test");
        std::fs::write(&probe, b"ok").map_err(|e| Error::io(&self.output_dir, e))?;
        let _ = std::fs::remove_file(probe);
        Ok(())
    }

    /// Reads a config from a JSON file (missing fields take their defaults).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| bad(&path.display().to_string(), "<file>", &e.to_string()))
    }
}
