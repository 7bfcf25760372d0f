//! Every setting of the job, as command-line flags or a JSON config file (`--config`); flags
//! given on the command line win over the file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

/// Fine-tune Llama-VARCO-8B-Instruct on Korean economic news (news2stock) with LoRA, evaluate
/// it, and run inference.
#[derive(Parser, Debug)]
#[command(name = "news2stock", version, about)]
pub struct Cli {
    /// What to do (default: train).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings.
    #[command(flatten)]
    pub settings: Settings,
}

/// Subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Fine-tune (the default).
    Train,
    /// Generate on the test split with the base model and with the adapter; print a table.
    Eval,
    /// Analyse one news text (from --input or stdin) with the adapter applied at run time.
    Infer {
        /// A file holding the news text; stdin when absent.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Training throughput on the Llama-3.1-8B shape with random weights and random tokens
    /// (the same setup as `peft_baseline.py`): warm-up steps, then timed steps.
    BenchTrain {
        /// Tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 8)]
        steps: u64,
        /// Untimed warm-up steps (autotuning, compilation).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Use a tiny model instead of the 8B shape (to check the command on CPU).
        #[arg(long)]
        tiny: bool,
    },
    /// Model checks and timings: CPU-f32 fixture parity of this backend, then (unless
    /// `--skip-8b`) random-init time, forward time (batch 1 x 1024) and greedy decode tokens/s
    /// on the Llama-3.1-8B shape.
    BenchModel {
        /// A fixture folder (`fixtures/llama/<case>`) to compare logits with.
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// Skip the 8B timings.
        #[arg(long)]
        skip_8b: bool,
    },
    /// Time a weight-decomposing init (pissa, pissa_niter_N, olora) on the 8B shape's q_proj and
    /// v_proj of every layer (random weights; the decomposition runs on the CPU).
    BenchInit {
        /// pissa, pissa_niter_N or olora.
        #[arg(long, default_value = "pissa")]
        method: String,
        /// Decoder layers (32 in Llama-3.1-8B).
        #[arg(long, default_value_t = 32)]
        layers: usize,
    },
    /// Adapter kernel throughput on the Llama-8B shapes (LoRA and DoRA forward, forward +
    /// backward, merged vs unmerged inference, ratio to the frozen GEMM alone); JSON lines.
    BenchLinear {
        /// Only the headline shapes (4096 tokens, 4096->4096 and 4096->1024, r 16), LoRA and DoRA.
        #[arg(long)]
        quick: bool,
        /// Also time the composed (unfused) path on the headline shape.
        #[arg(long)]
        composed: bool,
        /// Timed iterations per figure.
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// Merge the adapter into the base weights and write safetensors that transformers loads.
    Merge {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Store bf16 (default) or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
}

/// Job settings (names mirror the tutorial's TrainingArguments / LoraConfig).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// A JSON file with any of these settings (flags given on the command line win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The embedded default: a tiny Llama, the project's tokenizer, the bundled synthetic
    /// sample, on CPU, in about two minutes.
    #[arg(long)]
    pub demo: bool,
    /// Base model: a Hub id (`org/name[@revision]`) or a local folder.
    #[arg(long, default_value = "NCSOFT/Llama-VARCO-8B-Instruct")]
    pub model: String,
    /// Dataset: a Hub dataset id, or a local .parquet / .jsonl file.
    #[arg(long, default_value = "capybaraOh/naver-economy-news2stock")]
    pub dataset: String,
    /// Use random weights of the model's shape instead of downloading them (benchmarks).
    #[arg(long)]
    pub random_weights: bool,
    /// Keep the frozen base's decoder linears in NF4 (QLoRA, bitsandbytes' `load_in_4bit`):
    /// about 6 GB instead of 16 GB for the 8B model.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// Output folder (checkpoints, metrics, plot, adapter).
    #[arg(long, default_value = "runs/news2stock")]
    pub output_dir: PathBuf,
    /// Adapter folder for eval / infer / merge (default: the output folder).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Epochs.
    #[arg(long, default_value_t = 3.0)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (0 = use epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 2)]
    pub grad_accum: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Schedule: constant, constant_with_warmup, linear, cosine.
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warmup fraction (HF's `constant` ignores it, as here).
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Global gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Optimizer: adamw, loraplus, lorafa.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// LoRA+ learning-rate ratio of B to A.
    #[arg(long, default_value_t = 16.0)]
    pub loraplus_ratio: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Comma-separated target modules, or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub target_modules: String,
    /// rsLoRA scaling.
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA.
    #[arg(long)]
    pub use_dora: bool,
    /// `init_lora_weights`: true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora, eva
    /// (eva runs on the training batches before the first step).
    #[arg(long, default_value = "true")]
    pub init_lora_weights: String,
    /// Longest training sample in tokens (longer ones are skipped and counted).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Chat format: llama3 (every answer labelled) or tutorial (the tutorial's exact format).
    #[arg(long, default_value = "llama3")]
    pub chat_format: String,
    /// Log every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: u64,
    /// Checkpoint every N optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub save_steps: u64,
    /// Evaluation loss every N optimizer steps (0 = at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    pub save_total_limit: usize,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Recompute each decoder layer in the backward (saves memory; off in `--demo`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Test samples generated by `eval` (0 = all).
    #[arg(long, default_value_t = 20)]
    pub eval_samples: usize,
    /// New tokens at most per generation.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Cli::parse_from(["news2stock"]).settings
    }
}

impl Settings {
    /// Applies a JSON config file: its values replace the defaults, but not flags the user gave.
    pub fn merge_file(self, matches: &clap::ArgMatches) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        let file: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        let mut current = serde_json::to_value(&self)?;
        let obj = current
            .as_object_mut()
            .expect("settings serialise to an object");
        for (k, v) in file {
            if !obj.contains_key(&k) {
                anyhow::bail!("config file {}: unknown setting `{k}` (see --help for the names, with _ for -)", path.display());
            }
            let from_cli = matches.value_source(&k) == Some(clap::parser::ValueSource::CommandLine);
            if !from_cli {
                obj.insert(k, v);
            }
        }
        let mut merged: Settings = serde_json::from_value(current)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        merged.config = Some(path);
        Ok(merged)
    }

    /// The demo's settings: tiny, CPU, bundled data, a loss that visibly falls in minutes.
    pub fn demo_defaults(mut self, matches: &clap::ArgMatches) -> Self {
        let given =
            |k: &str| matches.value_source(k) == Some(clap::parser::ValueSource::CommandLine);
        let mut set = |k: &str, f: &mut dyn FnMut(&mut Settings)| {
            if !given(k) {
                f(&mut self)
            }
        };
        set("output_dir", &mut |s| s.output_dir = "runs/demo".into());
        set("epochs", &mut |s| s.epochs = 20.0);
        set("batch_size", &mut |s| s.batch_size = 4);
        set("grad_accum", &mut |s| s.grad_accum = 1);
        set("lr", &mut |s| s.lr = 5e-3);
        set("lr_scheduler", &mut |s| s.lr_scheduler = "cosine".into());
        set("max_grad_norm", &mut |s| s.max_grad_norm = 1.0);
        set("lora_r", &mut |s| s.lora_r = 16);
        set("lora_dropout", &mut |s| s.lora_dropout = 0.0);
        set("gradient_checkpointing", &mut |s| {
            s.gradient_checkpointing = false
        });
        set("target_modules", &mut |s| {
            s.target_modules = "all-linear".into()
        });
        set("max_length", &mut |s| s.max_length = 512);
        set("logging_steps", &mut |s| s.logging_steps = 10);
        set("save_steps", &mut |s| s.save_steps = 50);
        set("eval_steps", &mut |s| s.eval_steps = 50);
        set("eval_samples", &mut |s| s.eval_samples = 3);
        set("max_new_tokens", &mut |s| s.max_new_tokens = 48);
        self
    }

    /// `--init-lora-weights` as the config value (`true` / `false` are booleans).
    pub fn init_lora_weights(&self) -> peft_lora::InitLoraWeights {
        match self.init_lora_weights.as_str() {
            "true" => peft_lora::InitLoraWeights::Bool(true),
            "false" => peft_lora::InitLoraWeights::Bool(false),
            m => peft_lora::InitLoraWeights::Method(m.into()),
        }
    }

    /// Checks values that clap cannot (before any long work).
    pub fn validate(&self) -> anyhow::Result<()> {
        let one_of = |name: &str, v: &str, allowed: &[&str]| -> anyhow::Result<()> {
            if allowed.contains(&v) {
                Ok(())
            } else {
                anyhow::bail!(
                    "--{} {v:?}: expected one of {}",
                    name.replace('_', "-"),
                    allowed.join(", ")
                )
            }
        };
        one_of(
            "optimizer",
            &self.optimizer,
            &["adamw", "loraplus", "lorafa"],
        )?;
        one_of("chat_format", &self.chat_format, &["llama3", "tutorial"])?;
        one_of(
            "lr_scheduler",
            &self.lr_scheduler,
            &["constant", "constant_with_warmup", "linear", "cosine"],
        )?;
        peft_lora::init::InitMethod::parse(&self.init_lora_weights())
            .map_err(|e| anyhow::anyhow!("--init-lora-weights: {e}"))?;
        if self.lora_r == 0 {
            anyhow::bail!("--lora-r 0: the rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            anyhow::bail!(
                "--lora-dropout {}: expected a probability in [0, 1)",
                self.lora_dropout
            );
        }
        if self.max_length < 16 {
            anyhow::bail!(
                "--max-length {}: expected at least 16 tokens",
                self.max_length
            );
        }
        Ok(())
    }
}
