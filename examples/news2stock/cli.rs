//! The command line: `news2stock train | eval | infer | merge | push`, each subcommand with its
//! own flags. Flags come in groups (model, data, LoRA, training, ...) that subcommands flatten
//! where they apply; a group's field names are the settings' names (transformers'
//! `TrainingArguments`, PEFT's `LoraConfig`), in `--config` files and in `job_settings.json`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// The tutorial's base model.
pub const DEFAULT_MODEL: &str = "NCSOFT/Llama-VARCO-8B-Instruct";
/// The tutorial's dataset.
pub const DEFAULT_DATASET: &str = "capybaraOh/naver-economy-news2stock";
/// `--model` value naming the demo's model: a tiny random Llama with the project's tokenizer.
pub const DEMO_MODEL: &str = "demo-tiny-llama";
/// `--dataset` value naming the bundled synthetic sample.
pub const DEMO_DATASET: &str = "demo-news2stock-sample";

/// Whether `s` is a Hub repo id: `name` or `owner/name`, optionally `@revision`.
pub fn is_hub_id(s: &str) -> bool {
    let id = s.split_once('@').map_or(s, |(id, _)| id);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Fine-tune Llama-VARCO-8B-Instruct on Korean economic news (news2stock) with LoRA, evaluate
/// it, run it, merge it, and push it to the Hugging Face Hub.
#[derive(Parser, Debug)]
#[command(
    name = "news2stock",
    version,
    after_help = "With no subcommand: `train` with its defaults (the tutorial's job; with --demo, the demo).\n\
                  Settings go after the subcommand: news2stock train --demo --num-train-epochs 5\n\
                  `news2stock <SUBCOMMAND> --help` lists a subcommand's flags."
)]
pub struct Cli {
    /// What to do (default: train).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of the command itself.
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Flags of the command itself: `--demo` (every subcommand takes it, before or after its
/// name) and `--config` (for `train` when no subcommand is given).
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// The embedded demo: a tiny random Llama, the project's tokenizer, the bundled synthetic
    /// sample, demo-sized training settings, `runs/demo`, on CPU. It only supplies defaults:
    /// --model, --dataset and every other flag given with it are used.
    #[arg(long, global = true)]
    pub demo: bool,
    /// Settings file.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `--config FILE`.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// A JSON file of settings (keys as the flag names with `_` for `-`, e.g.
    /// `{"learning_rate": 2e-4, "lora_r": 16}`); flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The subcommands.
#[derive(Subcommand, Debug, Clone)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum Command {
    /// Fine-tune the base model with LoRA (the default); checkpoints, metrics.jsonl, loss.png and
    /// the adapter go to --output-dir.
    Train(TrainArgs),
    /// Generate on the test split with the base model and with the adapter; score and compare.
    Eval(EvalArgs),
    /// Analyse one news text (from --input or stdin) with the adapter applied at run time.
    Infer(InferArgs),
    /// Merge the adapter into the base weights and write safetensors that transformers loads.
    Merge(MergeArgs),
    /// Upload an adapter folder to the Hugging Face Hub with a generated model card
    /// (HF_TOKEN and HF_ENDPOINT as huggingface_hub reads them).
    Push(PushArgs),
}

impl Command {
    /// The subcommand's `--config FILE`, if given.
    pub fn config(&self) -> Option<&std::path::Path> {
        match self {
            Command::Train(a) => a.config.config.as_deref(),
            Command::Eval(a) => a.config.config.as_deref(),
            Command::Infer(a) => a.config.config.as_deref(),
            Command::Merge(a) => a.config.config.as_deref(),
            Command::Push(_) => None,
        }
    }
}

/// `train`'s flags.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Settings file.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Base model.
    #[command(flatten, next_help_heading = "Model")]
    pub model: ModelArgs,
    /// Dataset and sequence length.
    #[command(flatten, next_help_heading = "Data")]
    pub data: DataArgs,
    /// Chat format.
    #[command(flatten, next_help_heading = "Data")]
    pub template: TemplateArgs,
    /// LoRA.
    #[command(flatten, next_help_heading = "LoRA (PEFT LoraConfig)")]
    pub lora: LoraArgs,
    /// Training.
    #[command(
        flatten,
        next_help_heading = "Training (transformers TrainingArguments)"
    )]
    pub training: TrainingArgs,
    /// The sample generation after training.
    #[command(flatten, next_help_heading = "Generation")]
    pub generation: GenerationArgs,
    /// The eval table after a --demo run.
    #[command(flatten, next_help_heading = "Generation")]
    pub score: ScoreArgs,
    /// Pushing the adapter at the end.
    #[command(flatten, next_help_heading = "Hub")]
    pub hub: HubArgs,
    /// Several GPUs or hosts (not saved with the run's settings).
    #[command(flatten, next_help_heading = "Several GPUs (torchrun's flags)")]
    pub launch: crate::launch::LaunchArgs,
}

/// `eval`'s flags.
#[derive(Args, Debug, Clone, Default)]
pub struct EvalArgs {
    /// Settings file.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Base model.
    #[command(flatten, next_help_heading = "Model")]
    pub model: ModelArgs,
    /// Dataset (its test split is scored).
    #[command(flatten, next_help_heading = "Data")]
    pub data: DataArgs,
    /// Chat format.
    #[command(flatten, next_help_heading = "Data")]
    pub template: TemplateArgs,
    /// Generation length.
    #[command(flatten, next_help_heading = "Generation")]
    pub generation: GenerationArgs,
    /// How many test samples.
    #[command(flatten, next_help_heading = "Generation")]
    pub score: ScoreArgs,
}

/// `infer`'s flags.
#[derive(Args, Debug, Clone, Default)]
pub struct InferArgs {
    /// Settings file.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// A file holding the news text; stdin when absent.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Base model.
    #[command(flatten, next_help_heading = "Model")]
    pub model: ModelArgs,
    /// Chat format.
    #[command(flatten, next_help_heading = "Data")]
    pub template: TemplateArgs,
    /// Generation length.
    #[command(flatten, next_help_heading = "Generation")]
    pub generation: GenerationArgs,
}

/// `merge`'s flags.
#[derive(Args, Debug, Clone, Default)]
pub struct MergeArgs {
    /// Settings file.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output folder (default: `merged` inside the adapter folder).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Stored dtype of the merged weights.
    #[arg(long, value_enum, default_value_t = SaveDtype::Bf16)]
    pub dtype: SaveDtype,
    /// The adapter.
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Base model.
    #[command(flatten, next_help_heading = "Model")]
    pub model: ModelArgs,
}

/// `push`'s flags.
#[derive(Args, Debug, Clone, Default)]
pub struct PushArgs {
    /// The adapter folder (`adapter_config.json` + `adapter_model.safetensors`; with --demo,
    /// default `runs/demo`).
    #[arg(value_name = "ADAPTER_DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// The model repository, `OWNER/NAME` (created when it does not exist).
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo_id: String,
    /// Create the repository private (an existing one keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// Branch to commit to (default `main`; it must exist).
    #[arg(long)]
    pub revision: Option<String>,
    /// Commit message.
    #[arg(long, default_value = "Upload LoRA adapter (news2stock)")]
    pub commit_message: String,
}

/// The base model.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelArgs {
    /// Base model: a Hub id (`org/name[@revision]`), a local folder in Hugging Face format
    /// (config.json, safetensors, tokenizer.json), or `demo-tiny-llama` (the demo's). For eval,
    /// infer and merge the default is the adapter's base model.
    #[arg(long, visible_alias = "model-name-or-path", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Keep the frozen base's decoder linears in NF4 (QLoRA, bitsandbytes' `load_in_4bit`):
    /// about 6 GB instead of 16 GB for the 8B model.
    #[arg(long)]
    pub load_in_4bit: bool,
    /// Random weights of the model's shape instead of its checkpoint (benchmarks).
    #[arg(long)]
    pub random_weights: bool,
}

/// The dataset and sequence length.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DataArgs {
    /// Dataset: a Hub dataset id, a local .jsonl / .parquet file, or `demo-news2stock-sample`
    /// (the bundled synthetic sample). The first 20% is the test split, as in the tutorial.
    #[arg(long, visible_alias = "dataset-name", default_value = DEFAULT_DATASET)]
    pub dataset: String,
    /// Longest training sample in tokens (longer ones are skipped and counted).
    #[arg(long, visible_alias = "max-length", default_value_t = 2048)]
    pub max_seq_length: usize,
}

/// How conversations become tokens.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateArgs {
    /// Chat format: llama3 (every answer labelled) or tutorial (the tutorial's exact format).
    #[arg(long, value_enum, default_value_t = ChatFormat::Llama3)]
    pub chat_format: ChatFormat,
}

/// The LoRA adapter (PEFT `LoraConfig`).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraArgs {
    /// LoRA rank (`r`).
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (scaling alpha / r, or alpha / sqrt(r) with --use-rslora).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Comma-separated module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj),
    /// or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub target_modules: String,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA).
    #[arg(long)]
    pub use_dora: bool,
    /// `init_lora_weights`: true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora, eva
    /// (eva runs on the training batches before the first step).
    #[arg(long, default_value = "true", value_parser = parse_init_lora_weights)]
    pub init_lora_weights: String,
}

/// The training loop (transformers `TrainingArguments`).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingArgs {
    /// Output folder: checkpoints, metrics.jsonl, loss.png, the adapter.
    #[arg(long, default_value = "runs/news2stock")]
    pub output_dir: PathBuf,
    /// Epochs.
    #[arg(long, visible_alias = "epochs", default_value_t = 3.0)]
    pub num_train_epochs: f64,
    /// Stop after this many optimizer steps (0: use the epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, visible_alias = "batch-size", default_value_t = 2)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, visible_alias = "grad-accum", default_value_t = 2)]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    #[arg(long, visible_alias = "lr", default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// Learning-rate schedule (after warmup).
    #[arg(long, visible_alias = "lr-scheduler", value_enum, default_value_t = LrSchedulerType::Constant)]
    pub lr_scheduler_type: LrSchedulerType,
    /// Warmup fraction of the steps (`constant` ignores it, as transformers does).
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Optimizer.
    #[arg(long, visible_alias = "optimizer", value_enum, default_value_t = Optim::Adamw)]
    pub optim: Optim,
    /// LoRA+ learning-rate ratio of B to A (with --optim loraplus).
    #[arg(long, visible_alias = "loraplus-ratio", default_value_t = 16.0)]
    pub loraplus_lr_ratio: f64,
    /// Log every N optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: u64,
    /// Checkpoint every N optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub save_steps: u64,
    /// Evaluation loss every N optimizer steps (0: at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    pub save_total_limit: usize,
    /// Seed (weights of random models, LoRA init, shuffling, dropout).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Recompute each decoder layer in the backward (saves memory).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Continue from the newest checkpoint in --output-dir.
    #[arg(long)]
    pub resume: bool,
}

/// Generation.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationArgs {
    /// New tokens at most per generation.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
}

/// The eval table.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreArgs {
    /// Test samples generated and scored (0: all).
    #[arg(long, default_value_t = 20)]
    pub eval_samples: usize,
    /// Test prompts per generation batch; each runs twice in the batch (base and adapter
    /// rows side by side), so a batch holds twice as many rows.
    #[arg(long, default_value_t = 16)]
    pub eval_batch_size: usize,
}

/// Pushing the trained adapter.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HubArgs {
    /// After training, upload the adapter with a model card to this Hub repository
    /// (`OWNER/NAME`, created when missing; HF_TOKEN must be set).
    #[arg(long, value_name = "OWNER/NAME")]
    pub push_to_hub: Option<String>,
    /// Create that repository private.
    #[arg(long)]
    pub hub_private_repo: bool,
}

/// Which adapter eval, infer and merge load.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterArgs {
    /// Adapter folder (default: runs/news2stock; runs/demo with --demo).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

/// Chat formats.
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChatFormat {
    /// Llama 3's chat template; every assistant answer is labelled.
    Llama3,
    /// The tutorial's exact format.
    Tutorial,
}

/// Learning-rate schedules (transformers' `lr_scheduler_type` names).
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Constant (no warmup, as transformers' `constant`).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0.
    Linear,
    /// Linear warmup, then half-cosine decay to 0.
    Cosine,
}

/// Optimizers.
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum Optim {
    /// AdamW (transformers' `adamw_torch`).
    #[value(alias = "adamw_torch")]
    #[serde(alias = "adamw_torch")]
    Adamw,
    /// LoRA+: B learns --loraplus-lr-ratio times faster than A.
    Loraplus,
    /// LoRA-FA: A frozen, B trained with a projected AdamW.
    Lorafa,
}

/// Stored dtype of merged weights.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    /// bfloat16.
    #[default]
    Bf16,
    /// float32.
    F32,
}

/// Checks `--init-lora-weights` when it is parsed, not after the model has loaded.
fn parse_init_lora_weights(v: &str) -> Result<String, String> {
    v.parse::<peft_lora::InitLoraWeights>()
        .map(|_| v.to_string())
        .map_err(|e| e.to_string())
}

/// A group with every flag at its default (what clap would fill in for an empty command line).
pub fn defaults<T: Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let matches = cmd
        .try_get_matches_from(["defaults"])
        .expect("every flag of a group has a default");
    T::from_arg_matches(&matches).expect("the defaults of a group parse")
}

macro_rules! default_from_clap {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                defaults()
            }
        }
    )*};
}
default_from_clap!(
    ModelArgs,
    DataArgs,
    TemplateArgs,
    LoraArgs,
    TrainingArgs,
    GenerationArgs,
    ScoreArgs,
    HubArgs,
    AdapterArgs
);

/// The ids of the flags given on the command line in `matches` (not defaults).
pub fn given_on_command_line(matches: &clap::ArgMatches) -> std::collections::BTreeSet<String> {
    matches
        .ids()
        .map(|id| id.as_str().to_string())
        .filter(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .collect()
}
