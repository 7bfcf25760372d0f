//! The settings of a run, resolved from (lowest priority first) the defaults, `--demo`'s
//! defaults, the saved run of the adapter being loaded, a `--config` file, and the flags given
//! on the command line; and the LoRA and trainer configs they describe.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use peft_lora::{LoraConfig, OptimizerKind, TargetModules};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sft_trainer::{ScheduleKind, TrainConfig};

use crate::cli::{
    AdapterArgs, DataArgs, GenerationArgs, HubArgs, LoraArgs, LrSchedulerType, ModelArgs, Optim,
    ScoreArgs, TemplateArgs, TrainingArgs, DEFAULT_DATASET, DEFAULT_MODEL, DEMO_DATASET,
    DEMO_MODEL,
};

/// The file a training run writes its settings to, beside the adapter.
pub const SETTINGS_FILE: &str = "job_settings.json";

/// Every setting of a run, one flat JSON object when saved (`job_settings.json`) or read
/// (`--config`): keys are the flag names with `_` for `-`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `--demo` was given (recorded in `job_settings.json`; never read from a file).
    pub demo: bool,
    /// Base model.
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Dataset and sequence length.
    #[serde(flatten)]
    pub data: DataArgs,
    /// Chat format.
    #[serde(flatten)]
    pub template: TemplateArgs,
    /// LoRA.
    #[serde(flatten)]
    pub lora: LoraArgs,
    /// Training.
    #[serde(flatten)]
    pub training: TrainingArgs,
    /// Generation.
    #[serde(flatten)]
    pub generation: GenerationArgs,
    /// The eval table.
    #[serde(flatten)]
    pub score: ScoreArgs,
    /// Pushing after training.
    #[serde(flatten)]
    pub hub: HubArgs,
    /// Adapter folder of eval / infer / merge.
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    /// The job runs on the CPU backend (decided from the command, not a setting).
    #[serde(skip)]
    pub on_cpu: bool,
}

/// The inputs of [`resolve`] other than the command line.
#[derive(Debug, Default)]
pub struct Sources<'a> {
    /// `--demo`: its defaults replace the tutorial's.
    pub demo: bool,
    /// `--config FILE`.
    pub config: Option<&'a Path>,
    /// What [`saved_run`] read from the adapter folder.
    pub saved_run: Option<Map<String, Value>>,
}

/// Resolved settings, and which of them were chosen rather than defaulted.
#[derive(Debug)]
pub struct Resolved {
    /// The settings.
    pub settings: Settings,
    /// Keys set on the command line, in the config file or by the saved run.
    pub explicit: BTreeSet<String>,
}

/// The demo's defaults: tiny, CPU, bundled data, a loss that visibly falls in minutes.
fn demo_defaults() -> Map<String, Value> {
    let v = json!({
        "model": DEMO_MODEL, "dataset": DEMO_DATASET, "output_dir": "runs/demo",
        "num_train_epochs": 20.0, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "cosine",
        "max_grad_norm": 1.0, "lora_r": 16, "lora_dropout": 0.0, "gradient_checkpointing": false,
        "target_modules": "all-linear", "max_seq_length": 512, "logging_steps": 10,
        "save_steps": 50, "eval_steps": 50, "eval_samples": 3, "max_new_tokens": 48,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// The settings of the run that trained an adapter which eval / infer / merge take over: they
/// describe the base model and its inputs.
const RUN_KEYS: &[&str] = &[
    "model",
    "load_in_4bit",
    "random_weights",
    "seed",
    "dataset",
    "max_seq_length",
    "chat_format",
    "max_new_tokens",
    "eval_samples",
];

/// Every settings group as one clap command: the names and aliases of all settings.
fn settings_command() -> clap::Command {
    let mut c = clap::Command::new("settings");
    c = ModelArgs::augment_args(c);
    c = DataArgs::augment_args(c);
    c = TemplateArgs::augment_args(c);
    c = LoraArgs::augment_args(c);
    c = TrainingArgs::augment_args(c);
    c = GenerationArgs::augment_args(c);
    c = ScoreArgs::augment_args(c);
    c = HubArgs::augment_args(c);
    AdapterArgs::augment_args(c)
}

/// The settings key a file key names: a key itself, a flag name (`-` or `_`), or one of its
/// aliases (`lr`, `epochs`, `batch_size`, ...).
pub fn canonical_key(key: &str) -> Option<String> {
    let key = key.replace('-', "_");
    settings_command().get_arguments().find_map(|arg| {
        let id = arg.get_id().as_str();
        let is_alias = arg
            .get_all_aliases()
            .unwrap_or_default()
            .iter()
            .any(|a| a.replace('-', "_") == key);
        (id == key || is_alias).then(|| id.to_string())
    })
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))? {
        Value::Object(m) => Ok(m),
        _ => bail!("{}: expected a JSON object of settings", path.display()),
    }
}

/// Reads `--config FILE`: every key must name a setting, every value must have its type.
fn read_config(path: &Path) -> Result<Map<String, Value>> {
    let file = read_json_object(path).with_context(|| format!("config file {}", path.display()))?;
    let defaults = serde_json::to_value(Settings::default())?;
    let mut out = Map::new();
    for (key, value) in file {
        let Some(k) = canonical_key(&key) else {
            bail!(
                "config file {}: unknown setting `{key}` (the names are the flags', with _ for -; see --help)",
                path.display()
            );
        };
        let mut probe = defaults.clone();
        probe[&k] = value.clone();
        serde_json::from_value::<Settings>(probe)
            .map_err(|e| anyhow!("config file {}: `{key}`: {e}", path.display()))?;
        out.insert(k, value);
    }
    Ok(out)
}

/// The saved run of the adapter in `dir` (its `job_settings.json`, limited to the settings that
/// describe the base model and its inputs), else the base model its `adapter_config.json` names.
/// `None` when the folder has neither.
pub fn saved_run(dir: &Path) -> Result<Option<Map<String, Value>>> {
    let settings_file = dir.join(SETTINGS_FILE);
    if settings_file.is_file() {
        let saved = read_json_object(&settings_file)?;
        let mut out = Map::new();
        for (key, value) in &saved {
            if let Some(k) = canonical_key(key).filter(|k| RUN_KEYS.contains(&k.as_str())) {
                out.insert(k, value.clone());
            }
        }
        // Demo runs saved before the demo's model and dataset had names recorded the
        // tutorial's defaults beside `"demo": true`.
        if saved.get("demo") == Some(&Value::Bool(true)) {
            for (k, tutorial, demo) in [
                ("model", DEFAULT_MODEL, DEMO_MODEL),
                ("dataset", DEFAULT_DATASET, DEMO_DATASET),
            ] {
                if out.get(k).and_then(Value::as_str) == Some(tutorial) {
                    out.insert(k.into(), demo.into());
                }
            }
        }
        return Ok(Some(out));
    }
    let config_file = dir.join("adapter_config.json");
    if config_file.is_file() {
        let config = read_json_object(&config_file)?;
        if let Some(base) = config
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .filter(|b| !b.is_empty())
        {
            return Ok(Some(Map::from_iter([("model".into(), base.into())])));
        }
    }
    Ok(None)
}

/// Resolves the settings: defaults < `--demo` < saved run < `--config` < command line.
/// `command_line` holds the flags of the subcommand's groups (defaults included), `given` the
/// ids of those the user typed.
pub fn resolve(
    command_line: &Map<String, Value>,
    given: &BTreeSet<String>,
    sources: &Sources<'_>,
) -> Result<Resolved> {
    let mut merged = match serde_json::to_value(Settings::default())? {
        Value::Object(m) => m,
        _ => unreachable!("settings serialise to an object"),
    };
    let mut explicit = BTreeSet::new();
    if sources.demo {
        merged.extend(demo_defaults());
    }
    if let Some(saved) = &sources.saved_run {
        for (k, v) in saved {
            merged.insert(k.clone(), v.clone());
            explicit.insert(k.clone());
        }
    }
    if let Some(path) = sources.config {
        for (k, v) in read_config(path)? {
            merged.insert(k.clone(), v);
            explicit.insert(k);
        }
    }
    for (k, v) in command_line {
        if given.contains(k) {
            merged.insert(k.clone(), v.clone());
            explicit.insert(k.clone());
        }
    }
    merged.insert("demo".into(), sources.demo.into());
    let settings: Settings = serde_json::from_value(Value::Object(merged))
        .context("the settings do not fit together")?;
    settings.validate()?;
    Ok(Resolved { settings, explicit })
}

/// `value` as a JSON object (a settings group).
pub fn to_map(value: &impl Serialize) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("settings groups serialise to objects"),
    }
}

impl Settings {
    /// The adapter folder eval / infer / merge load: `--adapter`, else the output folder.
    pub fn adapter_dir(&self) -> PathBuf {
        self.adapter
            .adapter
            .clone()
            .unwrap_or_else(|| self.training.output_dir.clone())
    }

    /// Checks values that clap cannot (those from a config file), before any long work.
    pub fn validate(&self) -> Result<()> {
        self.lora
            .init_lora_weights
            .parse::<peft_lora::InitLoraWeights>()
            .map_err(|e| anyhow!("--init-lora-weights: {e}"))?;
        if self.lora.lora_r == 0 {
            bail!("--lora-r 0: the rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora.lora_dropout) {
            bail!(
                "--lora-dropout {}: expected a probability in [0, 1)",
                self.lora.lora_dropout
            );
        }
        if self.score.eval_batch_size == 0 {
            bail!("--eval-batch-size 0: expected at least 1 prompt per generation batch");
        }
        if self.data.max_seq_length < 16 {
            bail!(
                "--max-seq-length {}: expected at least 16 tokens",
                self.data.max_seq_length
            );
        }
        if self.training.per_device_train_batch_size == 0
            || self.training.gradient_accumulation_steps == 0
        {
            bail!("--per-device-train-batch-size and --gradient-accumulation-steps must be at least 1");
        }
        Ok(())
    }

    /// The LoRA config the settings describe.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let l = &self.lora;
        let targets = if l.target_modules == "all-linear" {
            TargetModules::Regex("all-linear".into())
        } else {
            TargetModules::List(
                l.target_modules
                    .split(',')
                    .map(|t| t.trim().to_string())
                    .collect(),
            )
        };
        Ok(LoraConfig {
            r: l.lora_r,
            lora_alpha: l.lora_alpha,
            lora_dropout: l.lora_dropout,
            target_modules: Some(targets),
            use_rslora: l.use_rslora,
            use_dora: l.use_dora,
            init_lora_weights: l.init_lora_weights.parse()?,
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(self.model.model.clone()),
            ..Default::default()
        })
    }

    /// The trainer config the settings describe (`pad_id` from the tokenizer).
    pub fn train_config(&self, pad_id: u32) -> TrainConfig {
        let t = &self.training;
        TrainConfig {
            output_dir: t.output_dir.clone(),
            learning_rate: t.learning_rate,
            adamw: peft_lora::AdamWConfig {
                weight_decay: t.weight_decay,
                eps: if t.optim == Optim::Lorafa { 1e-6 } else { 1e-8 },
                ..Default::default()
            },
            optimizer: match t.optim {
                Optim::Loraplus => OptimizerKind::LoraPlus {
                    lr_ratio: t.loraplus_lr_ratio,
                    weight_decay: t.weight_decay,
                },
                Optim::Lorafa => OptimizerKind::LoraFa,
                Optim::Adamw => OptimizerKind::AdamW,
            },
            lr_scheduler_type: match t.lr_scheduler_type {
                LrSchedulerType::Constant => ScheduleKind::Constant,
                LrSchedulerType::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
                LrSchedulerType::Linear => ScheduleKind::Linear,
                LrSchedulerType::Cosine => ScheduleKind::Cosine,
            },
            warmup_ratio: t.warmup_ratio,
            warmup_steps: 0,
            per_device_train_batch_size: t.per_device_train_batch_size,
            gradient_accumulation_steps: t.gradient_accumulation_steps,
            max_grad_norm: t.max_grad_norm,
            num_train_epochs: t.num_train_epochs,
            max_steps: t.max_steps,
            seed: t.seed,
            logging_steps: t.logging_steps,
            eval_steps: t.eval_steps,
            save_steps: t.save_steps,
            save_total_limit: t.save_total_limit,
            per_device_eval_batch_size: t.per_device_train_batch_size,
            pad_token_id: pad_id,
            gradient_checkpointing: t.gradient_checkpointing,
            bf16: !self.on_cpu && cfg!(feature = "cuda"),
            progress_bar: true,
        }
    }
}
