//! The job, generic over the backend: train, evaluate, infer, merge.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use chat_collate::news2stock;
use chat_collate::Message;
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM};
use peft_lora::{LoraCtx, PeftModel};
use sft_trainer::{Communicator, Sample};

use crate::cli::{SaveDtype, DEMO_MODEL};
use crate::evaluate::evaluate_model;
use crate::load::{collator, encode, load_model, load_rows, model_source, Loaded};
use crate::settings::{Settings, SETTINGS_FILE};

/// The system prompt used for inference on new text (the tutorial's instruction, in Korean).
pub const SYSTEM_PROMPT: &str = "당신은 경제 뉴스 분석가입니다. 주어진 뉴스를 요약(summary)하고, 뉴스가 상장 종목과 관련이 있으면 stock_related를 true로 하여 긍정적 영향을 받는 종목(positive_stocks), 키워드(positive_keywords), 이유(positive_reasons)와 부정적 영향을 받는 종목(negative_stocks), 키워드(negative_keywords), 이유(negative_reasons)를 JSON으로 작성하세요. 해당 사항이 없으면 문자열은 '', 목록은 []로 두세요.";

/// Trains, then shows one generation with the adapter (and, in the demo, the eval table). As one
/// process of several (`comm`), it trains its shard; rank 0 alone writes and generates.
pub fn train<AB: AutodiffBackend>(
    s: &Settings,
    device: &AB::Device,
    comm: &dyn Communicator,
) -> Result<()> {
    let main = comm.rank() == 0;
    let tc_check = s.train_config(0);
    tc_check.validate()?; // output folder writable, values in range: before any long work
    let (train_rows, test_rows) = load_rows(s)?;
    let loaded = load_model::<AB>(s, device)?;
    let c = collator(s, &loaded.tokenizer)?;
    let train_set = encode(&c, &train_rows, "train")?;
    let eval_set = encode(&c, &test_rows, "test")?;
    if train_set.is_empty() {
        bail!(
            "no training sample fits --max-seq-length {}",
            s.data.max_seq_length
        );
    }
    println!(
        "train samples {}, test samples {}",
        train_set.len(),
        eval_set.len()
    );
    let mut peft = PeftModel::new(loaded.model);
    peft.add_adapter("default", &s.lora_config()?)?;
    if s.lora.init_lora_weights == "eva" {
        run_eva::<AB>(&mut peft, &train_set, s, loaded.pad_id, device)?;
    }
    peft.print_trainable_parameters();
    let tc = s.train_config(loaded.pad_id);
    let out = &s.training.output_dir;
    if main {
        std::fs::write(out.join(SETTINGS_FILE), serde_json::to_string_pretty(s)?)?;
    }
    let summary = sft_trainer::train_data_parallel::<AB, _>(
        &mut peft,
        "default",
        &train_set,
        &eval_set,
        &tc,
        s.training.resume,
        device,
        comm,
    )?;
    if !main {
        return Ok(());
    }
    println!(
        "done: {} steps, loss {:.4} -> {:.4}, eval loss {:?}, {:.0} tokens/s; adapter in {}",
        summary.global_step,
        summary.first_loss.unwrap_or(f64::NAN),
        summary.last_loss.unwrap_or(f64::NAN),
        summary.eval_loss,
        summary.tokens_per_s,
        summary.adapter_dir.display()
    );
    let model = peft.model.valid();
    if let Some(row) = test_rows.first() {
        let prompt = c.prompt_ids(&news2stock::prompt_messages(row))?;
        let gen = GenerationConfig {
            max_new_tokens: s.generation.max_new_tokens,
            stop_ids: loaded.stop_ids.clone(),
            pad_id: loaded.pad_id,
            ..Default::default()
        };
        let out_ids = model.generate(&[prompt], &gen, &LoraCtx::default(), &mut |_, _| {})?;
        let text = loaded
            .tokenizer
            .decode(&out_ids[0], true)
            .unwrap_or_default();
        println!("sample generation (adapter):\n{text}");
        std::fs::write(out.join("sample_generation.txt"), &text)?;
    }
    if s.demo {
        let mut peft = PeftModel::new(model);
        peft.configs.insert("default".into(), s.lora_config()?);
        evaluate_model::<AB::InnerBackend>(
            s,
            &mut peft,
            &loaded.tokenizer,
            &loaded.stop_ids,
            loaded.pad_id,
            &c,
            &test_rows,
            out,
        )?;
    }
    Ok(())
}

/// The Llama with its adapters.
type PeftLlama<B> = PeftModel<B, LlamaForCausalLM<B>>;

/// The base model with the adapter of `--adapter` loaded as `default`.
fn load_with_adapter<B: Backend>(
    s: &Settings,
    device: &B::Device,
) -> Result<(PeftLlama<B>, Loaded<B>)> {
    let dir = s.adapter_dir();
    if !dir.join("adapter_config.json").is_file() {
        bail!(
            "no adapter in {} (adapter_config.json missing); train first (news2stock train) or pass --adapter DIR",
            dir.display()
        );
    }
    let mut loaded = load_model::<B>(s, device)?;
    let model = std::mem::replace(
        &mut loaded.model,
        LlamaForCausalLM::random(&LlamaConfig::tiny(8), device),
    );
    let mut peft = PeftModel::new(model);
    peft.load_adapter(&dir, "default").with_context(|| {
        format!(
            "loading the adapter in {} onto {}",
            dir.display(),
            s.model.model
        )
    })?;
    Ok((peft, loaded))
}

/// `eval`: load base + adapter and score both on the test split; the results go beside the
/// adapter.
pub fn eval<B: Backend>(s: &Settings, device: &B::Device) -> Result<()> {
    let (_, test) = load_rows(s)?;
    let (mut peft, loaded) = load_with_adapter::<B>(s, device)?;
    let c = collator(s, &loaded.tokenizer)?;
    evaluate_model(
        s,
        &mut peft,
        &loaded.tokenizer,
        &loaded.stop_ids,
        loaded.pad_id,
        &c,
        &test,
        &s.adapter_dir(),
    )
}

/// `infer`: one news text with the tutorial's system prompt, adapter applied at run time.
pub fn infer<B: Backend>(s: &Settings, input: Option<&Path>, device: &B::Device) -> Result<()> {
    let text = match input {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("--input {}: cannot read the news text", p.display()))?,
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .context("reading news text from stdin")?;
            t
        }
    };
    if text.trim().is_empty() {
        bail!("the news text is empty (give --input FILE or pipe text into stdin)");
    }
    let (peft, loaded) = load_with_adapter::<B>(s, device)?;
    let c = collator(s, &loaded.tokenizer)?;
    let prompt = c.prompt_ids(&[Message::system(SYSTEM_PROMPT), Message::user(text.trim())])?;
    let gen = GenerationConfig {
        max_new_tokens: s.generation.max_new_tokens,
        stop_ids: loaded.stop_ids.clone(),
        pad_id: loaded.pad_id,
        ..Default::default()
    };
    let tok = loaded.tokenizer.clone();
    peft.model
        .generate(&[prompt], &gen, &LoraCtx::default(), &mut |_, t| {
            if let Ok(piece) = tok.decode(&[t], true) {
                print!("{piece}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        })?;
    println!();
    Ok(())
}

/// `merge`: merged safetensors + config.json (+ tokenizer) that transformers loads, in `out`
/// (default: `merged` inside the adapter folder).
pub fn merge<B: Backend>(
    s: &Settings,
    out: Option<&Path>,
    dtype: SaveDtype,
    device: &B::Device,
) -> Result<()> {
    let out = out.map_or_else(|| s.adapter_dir().join("merged"), Path::to_path_buf);
    let dtype = match dtype {
        SaveDtype::Bf16 => llama::SaveDtype::Bf16,
        SaveDtype::F32 => llama::SaveDtype::F32,
    };
    let (peft, loaded) = load_with_adapter::<B>(s, device)?;
    let merged = peft.merge_and_unload(true)?;
    merged.save_pretrained(&out, dtype)?;
    if s.model.model == DEMO_MODEL {
        loaded
            .tokenizer
            .save(out.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    } else {
        let files = llama::resolve(&model_source(&s.model.model)?)?;
        for f in [files.tokenizer, files.tokenizer_config]
            .into_iter()
            .flatten()
        {
            if let Some(name) = f.file_name() {
                std::fs::copy(&f, out.join(name))?;
            }
        }
    }
    println!("merged model written to {}", out.display());
    Ok(())
}

/// EVA: principal components of each target layer's inputs over the training batches (prompt
/// tokens masked by their -100 labels), then PEFT's rank redistribution. Adapters are disabled
/// while it runs, so nothing is recorded for autodiff.
fn run_eva<AB: AutodiffBackend>(
    peft: &mut PeftLlama<AB>,
    train_set: &[Sample],
    s: &Settings,
    pad_id: u32,
    device: &AB::Device,
) -> Result<()> {
    let cfg = peft.configs["default"].eva_settings();
    let host = |t: &burn::tensor::Tensor<AB, 2, burn::tensor::Int>| -> Vec<i64> {
        t.to_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default()
    };
    let batches: Vec<_> = train_set
        .chunks(s.training.per_device_train_batch_size.max(1))
        .map(|c| {
            let refs: Vec<&Sample> = c.iter().collect();
            let b = sft_trainer::make_batch::<AB>(&refs, pad_id, device);
            let (mask, labels) = (host(&b.attention_mask), host(&b.labels));
            (b, mask, labels)
        })
        .collect();
    let report = peft.eva_init(
        "default",
        batches.iter(),
        |m, (b, _, _)| {
            m.forward(
                b.input_ids.clone(),
                Some(b.attention_mask.clone()),
                &LoraCtx::default(),
            );
        },
        |(_, mask, labels)| cfg.token_mask(mask, Some(labels)),
        |p| {
            eprint!(
                "\reva: batch {} - {}/{} layers converged",
                p.batches, p.converged, p.layers
            )
        },
        peft_lora::EvaLimits::default(),
    )?;
    eprintln!();
    println!(
        "eva: ranks {:?} after {} batches",
        report.ranks.values().collect::<Vec<_>>(),
        report.batches
    );
    Ok(())
}
