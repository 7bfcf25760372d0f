//! Loading what a job needs: the base model and tokenizer, the dataset and its split, the
//! collator; every input the user names is checked with an error that says which and why.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use chat_collate::news2stock::{self, NewsRow};
use chat_collate::{ChatCollator, CollatorConfig};
use llama::{LlamaConfig, LlamaForCausalLM, ModelSource};
use sft_trainer::Sample;

use crate::cli::{is_hub_id, ChatFormat, DEMO_DATASET, DEMO_MODEL};
use crate::settings::Settings;

/// Above this many parameters, a model on the CPU backend gets a warning about speed.
const CPU_WARN_PARAMS: usize = 500_000_000;

/// Model, tokenizer and the ids that stop generation.
pub struct Loaded<B: Backend> {
    /// The model (no adapter yet).
    pub model: LlamaForCausalLM<B>,
    /// Its tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// `<|eot_id|>` and the config's eos ids.
    pub stop_ids: Vec<u32>,
    /// Padding id.
    pub pad_id: u32,
}

/// Where `--model` points. A value that looks like a path but is no folder is an error here,
/// rather than a confusing Hub lookup.
pub fn model_source(model: &str) -> Result<ModelSource> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    if path.exists() {
        bail!("--model {model}: a file; expected a model folder (config.json, *.safetensors, tokenizer.json) or a Hub id");
    }
    if !is_hub_id(model) {
        bail!("--model {model}: no such folder (and not a Hub id of the form org/name[@revision])");
    }
    Ok(ModelSource::parse(model))
}

/// The demo's model: a tiny random Llama over the project's tokenizer, seeded by `--seed`.
fn demo_model<B: Backend>(s: &Settings, device: &B::Device) -> Result<Loaded<B>> {
    let tokenizer = chat_collate::demo_tokenizer();
    let ids = chat_collate::demo_special_ids();
    let mut cfg = LlamaConfig::tiny(tokenizer.get_vocab_size(true));
    cfg.num_layers = 2;
    cfg.hidden_size = 128;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 32;
    cfg.intermediate_size = 256;
    B::seed(device, s.training.seed);
    let mut model = LlamaForCausalLM::random(&cfg, device);
    if s.model.load_in_4bit {
        model.quantize_nf4()?;
    }
    Ok(Loaded {
        model,
        tokenizer,
        stop_ids: vec![ids.eot],
        pad_id: ids.pad(),
    })
}

/// Loads the base model and tokenizer `--model` names.
pub fn load_model<B: Backend>(s: &Settings, device: &B::Device) -> Result<Loaded<B>> {
    let name = &s.model.model;
    if name == DEMO_MODEL {
        return demo_model(s, device);
    }
    let source = model_source(name)?;
    let files = match &source {
        ModelSource::Local(dir) => llama::resolve(&source).with_context(|| {
            format!("--model {}: not a Hugging Face model folder (expected config.json, *.safetensors and tokenizer.json)", dir.display())
        })?,
        ModelSource::Hub { .. } => llama::resolve(&source).with_context(|| {
            format!("could not get the model `{name}`: no such local folder, and the Hub is unreachable or has no such model. To try the pipeline offline: cargo run --release --example news2stock -- --demo")
        })?,
    };
    let cfg =
        LlamaConfig::from_hf_file(&files.config).with_context(|| format!("--model {name}"))?;
    if s.on_cpu && cfg.num_params() > CPU_WARN_PARAMS {
        eprintln!(
            "warning: {name} has {:.1}B parameters; on the CPU backend this is very slow (the GPU build: --features cuda)",
            cfg.num_params() as f64 / 1e9
        );
    }
    let tokenizer = llama::load_tokenizer(&files).with_context(|| format!("--model {name}"))?;
    let ids = chat_collate::SpecialIds::from_tokenizer(&tokenizer)
        .with_context(|| format!("--model {name}: the tokenizer"))?;
    let t = std::time::Instant::now();
    let model = if s.model.random_weights {
        B::seed(device, s.training.seed);
        let mut model = LlamaForCausalLM::random(&cfg, device);
        if s.model.load_in_4bit {
            model.quantize_nf4()?;
        }
        model
    } else if s.model.load_in_4bit {
        LlamaForCausalLM::load_in_4bit(&files, device)?
    } else {
        LlamaForCausalLM::load(&files, device).with_context(|| format!("--model {name}"))?
    };
    println!("model loaded in {:.1} s", t.elapsed().as_secs_f64());
    let mut stop_ids = vec![ids.eot];
    stop_ids.extend(model.config.eos_token_ids.iter().copied());
    Ok(Loaded {
        model,
        tokenizer,
        stop_ids,
        pad_id: ids.pad(),
    })
}

/// The rows `--dataset` names: the bundled sample, a local file (a malformed row stops the job
/// with the file, line and field), or a Hub dataset.
pub fn load_dataset(dataset: &str) -> Result<Vec<NewsRow>> {
    if dataset == DEMO_DATASET {
        return Ok(news2stock::load_sample()?);
    }
    let path = Path::new(dataset);
    if path.is_file() {
        let (rows, report) = news2stock::load_file(path, chat_collate::BadRowPolicy::Error)
            .with_context(|| format!("--dataset {dataset}"))?;
        println!("dataset {report}");
        return Ok(rows);
    }
    let file_like = [".jsonl", ".json", ".parquet"]
        .iter()
        .any(|e| dataset.to_ascii_lowercase().ends_with(e));
    if path.exists() || file_like || !is_hub_id(dataset) {
        bail!("--dataset {dataset}: no such file; expected a .jsonl or .parquet file, a Hub dataset id, or {DEMO_DATASET}");
    }
    let (rows, report) = news2stock::load_hub(dataset, None).with_context(|| {
        format!("could not get the dataset `{dataset}` from the Hub. Pass a local .parquet/.jsonl file, or try: cargo run --release --example news2stock -- --demo")
    })?;
    println!("dataset {report}");
    Ok(rows)
}

/// The dataset's rows split like the tutorial (the first 20% is the test split):
/// `(train, test)`.
pub fn load_rows(s: &Settings) -> Result<(Vec<NewsRow>, Vec<NewsRow>)> {
    let rows = load_dataset(&s.data.dataset)?;
    if rows.len() < 2 {
        bail!(
            "--dataset {}: {} rows; need at least 2 (train and test)",
            s.data.dataset,
            rows.len()
        );
    }
    Ok(news2stock::tutorial_split(&rows))
}

/// The collator of `--chat-format` and `--max-seq-length`.
pub fn collator(s: &Settings, tokenizer: &tokenizers::Tokenizer) -> Result<ChatCollator> {
    let cfg = match s.template.chat_format {
        ChatFormat::Tutorial => CollatorConfig::tutorial(s.data.max_seq_length),
        ChatFormat::Llama3 => CollatorConfig::llama3(s.data.max_seq_length),
    };
    Ok(ChatCollator::new(tokenizer.clone(), cfg)?)
}

/// Token ids and labels of `rows` (over-long ones are skipped and counted).
pub fn encode(c: &ChatCollator, rows: &[NewsRow], what: &str) -> Result<Vec<Sample>> {
    let convs: Vec<_> = rows.iter().map(news2stock::to_conversation).collect();
    let (enc, report) = c.encode_all(&convs)?;
    if report.skipped() > 0 {
        println!("{what}: {report:?}");
    }
    Ok(enc
        .into_iter()
        .map(|e| Sample {
            input_ids: e.input_ids,
            labels: e.labels,
        })
        .collect())
}
