//! The job itself, generic over the backend: load model + tokenizer + data, train, evaluate,
//! infer, merge.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use chat_collate::news2stock::{self, NewsRow};
use chat_collate::{ChatCollator, CollatorConfig, Message};
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM, ModelSource};
use peft_lora::{LoraConfig, LoraCtx, OptimizerKind, PeftModel, TargetModules};
use sft_trainer::{Sample, ScheduleKind, TrainConfig};

use crate::metrics::{parse_answer, Scores};
use crate::settings::Settings;

/// The system prompt used for inference on new text (the tutorial's instruction, in Korean).
pub const SYSTEM_PROMPT: &str = "당신은 경제 뉴스 분석가입니다. 주어진 뉴스를 요약(summary)하고, 뉴스가 상장 종목과 관련이 있으면 stock_related를 true로 하여 긍정적 영향을 받는 종목(positive_stocks), 키워드(positive_keywords), 이유(positive_reasons)와 부정적 영향을 받는 종목(negative_stocks), 키워드(negative_keywords), 이유(negative_reasons)를 JSON으로 작성하세요. 해당 사항이 없으면 문자열은 '', 목록은 []로 두세요.";

/// Model, tokenizer and the id that stops generation.
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

/// Loads the base model and tokenizer the settings name (or the demo's).
pub fn load_model<B: Backend>(s: &Settings, device: &B::Device) -> Result<Loaded<B>> {
    if s.demo {
        let tokenizer = chat_collate::demo_tokenizer();
        let ids = chat_collate::demo_special_ids();
        let mut cfg = LlamaConfig::tiny(tokenizer.get_vocab_size(true));
        cfg.num_layers = 2;
        cfg.hidden_size = 128;
        cfg.num_heads = 4;
        cfg.num_kv_heads = 2;
        cfg.head_dim = 32;
        cfg.intermediate_size = 256;
        B::seed(device, s.seed);
        let mut model = LlamaForCausalLM::random(&cfg, device);
        if s.load_in_4bit {
            model.quantize_nf4()?;
        }
        return Ok(Loaded {
            model,
            tokenizer,
            stop_ids: vec![ids.eot],
            pad_id: ids.pad(),
        });
    }
    let files = llama::resolve(&ModelSource::parse(&s.model)).with_context(|| {
        format!("could not get the model `{}` (the Hub is unreachable or the folder is incomplete). To try the pipeline offline: cargo run --release --example news2stock -- --demo", s.model)
    })?;
    let tokenizer = llama::load_tokenizer(&files)?;
    let ids = chat_collate::SpecialIds::from_tokenizer(&tokenizer)?;
    let t = std::time::Instant::now();
    let model = if s.random_weights {
        let cfg = LlamaConfig::from_hf_file(&files.config)?;
        B::seed(device, s.seed);
        let mut model = LlamaForCausalLM::random(&cfg, device);
        if s.load_in_4bit {
            model.quantize_nf4()?;
        }
        model
    } else if s.load_in_4bit {
        LlamaForCausalLM::load_in_4bit(&files, device)?
    } else {
        LlamaForCausalLM::load(&files, device)?
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

/// The dataset rows the settings name, split like the tutorial (first 20% test).
pub fn load_rows(s: &Settings) -> Result<(Vec<NewsRow>, Vec<NewsRow>)> {
    let rows = if s.demo {
        news2stock::load_sample()?
    } else if Path::new(&s.dataset).exists() {
        let (rows, report) = news2stock::load_file(&s.dataset, chat_collate::BadRowPolicy::Error)?;
        println!("dataset {}: {report:?}", s.dataset);
        rows
    } else {
        let (rows, report) = news2stock::load_hub(&s.dataset, None).with_context(|| {
            format!("could not get the dataset `{}` from the Hub. Pass a local .parquet/.jsonl file, or try: cargo run --release --example news2stock -- --demo", s.dataset)
        })?;
        println!("dataset {}: {report:?}", s.dataset);
        rows
    };
    if rows.len() < 2 {
        bail!(
            "dataset {}: {} rows; need at least 2 (train and test)",
            s.dataset,
            rows.len()
        );
    }
    let (train, test) = news2stock::tutorial_split(&rows);
    Ok((train, test))
}

fn collator(s: &Settings, tokenizer: &tokenizers::Tokenizer) -> Result<ChatCollator> {
    let cfg = match s.chat_format.as_str() {
        "tutorial" => CollatorConfig::tutorial(s.max_length),
        _ => CollatorConfig::llama3(s.max_length),
    };
    Ok(ChatCollator::new(tokenizer.clone(), cfg)?)
}

fn encode(c: &ChatCollator, rows: &[NewsRow], what: &str) -> Result<Vec<Sample>> {
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

/// The LoRA config the settings describe.
pub fn lora_config(s: &Settings) -> LoraConfig {
    let targets = if s.target_modules == "all-linear" {
        TargetModules::Regex("all-linear".into())
    } else {
        TargetModules::List(
            s.target_modules
                .split(',')
                .map(|t| t.trim().to_string())
                .collect(),
        )
    };
    LoraConfig {
        r: s.lora_r,
        lora_alpha: s.lora_alpha,
        lora_dropout: s.lora_dropout,
        target_modules: Some(targets),
        use_rslora: s.use_rslora,
        use_dora: s.use_dora,
        init_lora_weights: s.init_lora_weights(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(if s.demo {
            "demo-tiny-llama".into()
        } else {
            s.model.clone()
        }),
        ..Default::default()
    }
}

fn train_config(s: &Settings, pad_id: u32) -> TrainConfig {
    TrainConfig {
        output_dir: s.output_dir.clone(),
        learning_rate: s.lr,
        adamw: peft_lora::AdamWConfig {
            weight_decay: s.weight_decay,
            eps: if s.optimizer == "lorafa" { 1e-6 } else { 1e-8 },
            ..Default::default()
        },
        optimizer: match s.optimizer.as_str() {
            "loraplus" => OptimizerKind::LoraPlus {
                lr_ratio: s.loraplus_ratio,
                weight_decay: s.weight_decay,
            },
            "lorafa" => OptimizerKind::LoraFa,
            _ => OptimizerKind::AdamW,
        },
        lr_scheduler_type: s
            .lr_scheduler
            .parse::<ScheduleKind>()
            .unwrap_or(ScheduleKind::Constant),
        warmup_ratio: s.warmup_ratio,
        warmup_steps: 0,
        per_device_train_batch_size: s.batch_size,
        gradient_accumulation_steps: s.grad_accum,
        max_grad_norm: s.max_grad_norm,
        num_train_epochs: s.epochs,
        max_steps: s.max_steps,
        seed: s.seed,
        logging_steps: s.logging_steps,
        eval_steps: s.eval_steps,
        save_steps: s.save_steps,
        save_total_limit: s.save_total_limit,
        per_device_eval_batch_size: s.batch_size,
        pad_token_id: pad_id,
        gradient_checkpointing: s.gradient_checkpointing,
        bf16: cfg!(feature = "cuda") && !s.demo,
        progress_bar: true,
    }
}

/// Trains, then shows one generation with the adapter (and, in the demo, the eval table).
pub fn train<AB: AutodiffBackend>(s: &Settings, device: &AB::Device) -> Result<()> {
    let tc_check = train_config(s, 0);
    tc_check.validate()?; // output folder writable, values in range: before any long work
    let (train_rows, test_rows) = load_rows(s)?;
    let loaded = load_model::<AB>(s, device)?;
    let c = collator(s, &loaded.tokenizer)?;
    let train_set = encode(&c, &train_rows, "train")?;
    let eval_set = encode(&c, &test_rows, "test")?;
    if train_set.is_empty() {
        bail!("no training sample fits --max-length {}", s.max_length);
    }
    println!(
        "train samples {}, test samples {}",
        train_set.len(),
        eval_set.len()
    );
    let mut peft = PeftModel::new(loaded.model);
    peft.add_adapter::<AB>("default", &lora_config(s))?;
    if s.init_lora_weights == "eva" {
        run_eva::<AB>(&mut peft, &train_set, s, loaded.pad_id, device)?;
    }
    peft.print_trainable_parameters::<AB>();
    let tc = train_config(s, loaded.pad_id);
    std::fs::write(
        s.output_dir.join("job_settings.json"),
        serde_json::to_string_pretty(s)?,
    )?;
    let summary = sft_trainer::train::<AB, _>(
        &mut peft, "default", &train_set, &eval_set, &tc, s.resume, device,
    )?;
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
            max_new_tokens: s.max_new_tokens,
            stop_ids: loaded.stop_ids.clone(),
            pad_id: loaded.pad_id,
            ..Default::default()
        };
        let out = model.generate(&[prompt], &gen, &LoraCtx::default(), &mut |_, _| {})?;
        let text = loaded.tokenizer.decode(&out[0], true).unwrap_or_default();
        println!("sample generation (adapter):\n{text}");
        std::fs::write(s.output_dir.join("sample_generation.txt"), &text)?;
    }
    if s.demo {
        let mut peft = PeftModel::new(model);
        peft.configs.insert("default".into(), lora_config(s));
        evaluate_model::<AB::InnerBackend>(
            s,
            &mut peft,
            &loaded.tokenizer,
            &loaded.stop_ids,
            loaded.pad_id,
            &c,
            &test_rows,
        )?;
    }
    Ok(())
}

fn adapter_dir(s: &Settings) -> PathBuf {
    s.adapter.clone().unwrap_or_else(|| s.output_dir.clone())
}

fn load_with_adapter<B: Backend>(
    s: &Settings,
    device: &B::Device,
) -> Result<(PeftModel<LlamaForCausalLM<B>>, Loaded<B>)> {
    let dir = adapter_dir(s);
    if !dir.join("adapter_config.json").exists() {
        bail!(
            "no adapter in {} (adapter_config.json missing); train first or pass --adapter DIR",
            dir.display()
        );
    }
    let mut loaded = load_model::<B>(s, device)?;
    let model = std::mem::replace(
        &mut loaded.model,
        LlamaForCausalLM::random(&LlamaConfig::tiny(8), device),
    );
    let mut peft = PeftModel::new(model);
    peft.load_adapter::<B>(&dir, "default")?;
    Ok((peft, loaded))
}

fn generate_texts<B: Backend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    tok: &tokenizers::Tokenizer,
    gen: &GenerationConfig,
) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for chunk in prompts.chunks(4) {
        for ids in model.generate(chunk, gen, &LoraCtx::default(), &mut |_, _| {})? {
            texts.push(tok.decode(&ids, true).unwrap_or_default());
        }
    }
    Ok(texts)
}

/// Base vs adapter on the test split: a score table and three side-by-side examples.
pub fn evaluate_model<B: Backend>(
    s: &Settings,
    peft: &mut PeftModel<LlamaForCausalLM<B>>,
    tok: &tokenizers::Tokenizer,
    stop_ids: &[u32],
    pad_id: u32,
    c: &ChatCollator,
    test: &[NewsRow],
) -> Result<()> {
    let n = if s.eval_samples == 0 {
        test.len()
    } else {
        s.eval_samples.min(test.len())
    };
    let rows = &test[..n];
    let prompts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| c.prompt_ids(&news2stock::prompt_messages(r)))
        .collect::<chat_collate::Result<_>>()?;
    let gen = GenerationConfig {
        max_new_tokens: s.max_new_tokens,
        stop_ids: stop_ids.to_vec(),
        pad_id,
        ..Default::default()
    };
    peft.set_adapters_disabled::<B>(true)?;
    let base = generate_texts(&peft.model, &prompts, tok, &gen)?;
    peft.set_adapters_disabled::<B>(false)?;
    let tuned = generate_texts(&peft.model, &prompts, tok, &gen)?;
    let (mut sb, mut st) = (Scores::default(), Scores::default());
    for (i, r) in rows.iter().enumerate() {
        let reference = parse_answer(&r.assistant).unwrap_or(serde_json::Value::Null);
        sb.add(&base[i], &reference);
        st.add(&tuned[i], &reference);
    }
    let table = format!(
        "{}\n{}\n{}\n",
        Scores::header(),
        sb.row("base"),
        st.row("adapter")
    );
    println!("evaluation on {n} test samples:\n{table}");
    let mut report = table.clone();
    for (i, r) in rows.iter().take(3).enumerate() {
        let ex = format!(
            "\n### example {}\nnews: {}\nreference: {}\nbase: {}\nadapter: {}\n",
            i + 1,
            r.user.chars().take(200).collect::<String>(),
            r.assistant,
            base[i],
            tuned[i]
        );
        println!("{ex}");
        report.push_str(&ex);
    }
    std::fs::create_dir_all(&s.output_dir)?;
    std::fs::write(s.output_dir.join("eval.md"), report)?;
    Ok(())
}

/// `eval`: load base + adapter and score both on the test split.
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
    )
}

/// `infer`: one news text with the tutorial's system prompt, adapter applied at run time.
pub fn infer<B: Backend>(s: &Settings, input: Option<&Path>, device: &B::Device) -> Result<()> {
    let text = match input {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading news text {}", p.display()))?,
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
        max_new_tokens: s.max_new_tokens,
        stop_ids: loaded.stop_ids.clone(),
        pad_id: loaded.pad_id,
        ..Default::default()
    };
    let tok = loaded.tokenizer.clone();
    let mut streamed = Vec::new();
    peft.model
        .generate(&[prompt], &gen, &LoraCtx::default(), &mut |_, t| {
            streamed.push(t);
            if let Ok(piece) = tok.decode(&[t], true) {
                print!("{piece}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        })?;
    println!();
    Ok(())
}

/// `merge`: merged safetensors + config.json that transformers loads.
pub fn merge<B: Backend>(s: &Settings, out: &Path, dtype: &str, device: &B::Device) -> Result<()> {
    let dtype = match dtype {
        "bf16" => llama::SaveDtype::Bf16,
        "f32" => llama::SaveDtype::F32,
        other => bail!("--dtype {other:?}: expected bf16 or f32"),
    };
    let (peft, loaded) = load_with_adapter::<B>(s, device)?;
    let merged = peft.merge_and_unload::<B>(true)?;
    merged.save_pretrained(out, dtype)?;
    if !s.demo {
        let files = llama::resolve(&ModelSource::parse(&s.model))?;
        for f in [files.tokenizer, files.tokenizer_config]
            .into_iter()
            .flatten()
        {
            std::fs::copy(&f, out.join(f.file_name().expect("file name")))?;
        }
    } else {
        loaded
            .tokenizer
            .save(out.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    println!("merged model written to {}", out.display());
    Ok(())
}

/// `bench-train`: tokens/s of LoRA training on the 8B shape with random weights and tokens.
pub fn bench_train<AB: AutodiffBackend>(
    s: &Settings,
    seq: usize,
    steps: u64,
    warmup: u64,
    tiny: bool,
    device: &AB::Device,
) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let cfg = if tiny {
        LlamaConfig::tiny(512)
    } else {
        LlamaConfig::llama3_8b()
    };
    AB::seed(device, s.seed);
    let t = std::time::Instant::now();
    let model = LlamaForCausalLM::<AB>::random(&cfg, device);
    let _ = AB::sync(device);
    println!(
        "random {}-layer model built in {:.1} s",
        cfg.num_layers,
        t.elapsed().as_secs_f64()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let n = s.batch_size * s.grad_accum * (steps + warmup) as usize;
    let samples: Vec<Sample> = (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            // As the anchor: the first half of each sequence is prompt (-100).
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < seq / 2 { -100 } else { t as i64 })
                .collect();
            Sample {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    let mut peft = PeftModel::new(model);
    peft.add_adapter::<AB>("default", &lora_config(s))?;
    peft.print_trainable_parameters::<AB>();
    let mut tc = train_config(s, 0);
    tc.progress_bar = false;
    tc.save_steps = 0;
    tc.logging_steps = 1;
    tc.max_steps = warmup;
    let t = std::time::Instant::now();
    sft_trainer::train::<AB, _>(&mut peft, "default", &samples, &[], &tc, false, device)?;
    println!(
        "warm-up: {warmup} steps in {:.1} s (autotune + compilation included)",
        t.elapsed().as_secs_f64()
    );
    tc.max_steps = steps;
    // The steps alone, as the anchor times them: the trainer leaves its final checkpoint write
    // (adapter + optimizer state) off `step_secs`.
    let summary =
        sft_trainer::train::<AB, _>(&mut peft, "default", &samples, &[], &tc, false, device)?;
    let secs = summary.step_secs;
    let tokens = (steps as usize * s.batch_size * s.grad_accum * seq) as f64;
    println!(
        "{}",
        serde_json::json!({
            "system": "burn-peft", "targets": s.target_modules, "r": s.lora_r, "gc": s.gradient_checkpointing,
            "batch": s.batch_size * s.grad_accum, "seq": seq, "steps": steps,
            "s_per_step": secs / steps as f64, "tokens_per_s": tokens / secs,
            "loss": summary.last_loss,
        })
    );
    Ok(())
}

/// `bench-model`: fixture parity on this backend, and 8B-shape forward / decode timings.
pub fn bench_model<B: Backend>(
    fixture: Option<&Path>,
    skip_8b: bool,
    device: &B::Device,
) -> Result<()> {
    use burn::tensor::{Int, Tensor, TensorData};
    if let Some(dir) = fixture {
        let files = llama::resolve(&ModelSource::Local(dir.to_path_buf()))?;
        let model = LlamaForCausalLM::<B>::load(&files, device)?;
        let exp = peft_lora::st::SafetensorsFile::open(&dir.join("expected.safetensors"))?;
        let int2 = |name: &str| -> Result<Tensor<B, 2, Int>> {
            let (s, v) = exp.read_i64(name)?;
            Ok(Tensor::from_data(TensorData::new(v, [s[0], s[1]]), device))
        };
        let mask = int2("attention_mask")?;
        let got: Vec<f32> = model
            .forward(int2("input_ids")?, Some(mask.clone()), &LoraCtx::default())
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let want = exp.read("logits")?;
        let m: Vec<i64> = mask.into_data().convert::<i64>().to_vec().expect("i64");
        let v = want.shape[2];
        let (mut diff, mut scale) = (0f32, 0f32);
        for (pos, &keep) in m.iter().enumerate() {
            if keep == 0 {
                continue;
            }
            for j in 0..v {
                let (a, b) = (got[pos * v + j], want.data[pos * v + j]);
                diff = diff.max((a - b).abs());
                scale = scale.max(b.abs());
            }
        }
        println!(
            "{}",
            serde_json::json!({"check": "fixture logits vs transformers f32", "fixture": dir.display().to_string(), "max_rel_err": diff / scale})
        );
    }
    if skip_8b {
        return Ok(());
    }
    let cfg = LlamaConfig::llama3_8b();
    let t = std::time::Instant::now();
    let model = LlamaForCausalLM::<B>::random_seeded(&cfg, device, 0);
    let _ = B::sync(device);
    let init_s = t.elapsed().as_secs_f64();
    let ids: Vec<i64> = (0..1024).map(|i| (i * 7919 % 128000) as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 1024]), device);
    let mut fwd = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let l = model.forward(input.clone(), None, &LoraCtx::default());
        let _ = B::sync(device);
        fwd.push(t.elapsed().as_secs_f64());
        drop(l);
    }
    let prompt: Vec<u32> = (0..32).map(|i| (i * 31 % 128000) as u32).collect();
    let gen = GenerationConfig {
        max_new_tokens: 64,
        min_new_tokens: 64,
        ..Default::default()
    };
    let _ = model.generate(
        std::slice::from_ref(&prompt),
        &GenerationConfig {
            max_new_tokens: 8,
            min_new_tokens: 8,
            ..Default::default()
        },
        &LoraCtx::default(),
        &mut |_, _| {},
    )?;
    let t = std::time::Instant::now();
    let out = model.generate(&[prompt], &gen, &LoraCtx::default(), &mut |_, _| {})?;
    let dec_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"system": "burn-peft", "random_init_s": init_s, "forward_1x1024_first_s": fwd[0],
            "forward_1x1024_s": fwd[1..].iter().cloned().fold(f64::MAX, f64::min), "decode_tokens": out[0].len(),
            "decode_tokens_per_s": out[0].len() as f64 / dec_s})
    );
    Ok(())
}

/// EVA: principal components of each target layer's inputs over the training batches (prompt
/// tokens masked by their -100 labels), then PEFT's rank redistribution. Adapters are disabled
/// while it runs, so nothing is recorded for autodiff.
fn run_eva<AB: AutodiffBackend>(
    peft: &mut PeftModel<LlamaForCausalLM<AB>>,
    train_set: &[Sample],
    s: &Settings,
    pad_id: u32,
    device: &AB::Device,
) -> Result<()> {
    let cfg = peft_lora::eva::EvaConfig::from_lora(&peft.configs["default"])?;
    let host = |t: &burn::tensor::Tensor<AB, 2, burn::tensor::Int>| -> Vec<i64> {
        t.to_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default()
    };
    let batches: Vec<_> = train_set
        .chunks(s.batch_size.max(1))
        .map(|c| {
            let refs: Vec<&Sample> = c.iter().collect();
            let b = sft_trainer::make_batch::<AB>(&refs, pad_id, device);
            let (mask, labels) = (host(&b.attention_mask), host(&b.labels));
            (b, mask, labels)
        })
        .collect();
    let report = peft.eva_init::<AB, _, _>(
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
        peft_lora::eva::EvaLimits::default(),
    )?;
    eprintln!();
    println!(
        "eva: ranks {:?} after {} batches",
        report.ranks.values().collect::<Vec<_>>(),
        report.batches
    );
    Ok(())
}
