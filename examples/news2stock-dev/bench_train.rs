//! `bench-train` and `bench-model`: LoRA training throughput and model timings on the
//! Llama-3.1-8B shape with random weights (the setup of the HF PEFT anchor `peft_baseline.py`).

use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM, ModelSource};
use peft_lora::{LoraCtx, PeftModel};
use sft_trainer::Sample;

use crate::settings::Settings;

/// `bench-train`: tokens/s of LoRA training on the 8B shape with random weights and tokens; as
/// one process of several (`comm`), of the data-parallel run (rank 0 prints).
pub fn bench_train<AB: AutodiffBackend>(
    s: &Settings,
    seq: usize,
    steps: u64,
    warmup: u64,
    tiny: bool,
    device: &AB::Device,
    comm: &dyn data_parallel::Communicator,
) -> Result<()> {
    let world = comm.world_size();
    use rand::{Rng, SeedableRng};
    let cfg = if tiny {
        LlamaConfig::tiny(512)
    } else {
        LlamaConfig::llama3_8b()
    };
    AB::seed(device, s.training.seed);
    let t = std::time::Instant::now();
    let model = LlamaForCausalLM::<AB>::random(&cfg, device);
    let _ = AB::sync(device);
    println!(
        "random {}-layer model built in {:.1} s",
        cfg.num_layers,
        t.elapsed().as_secs_f64()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.training.seed);
    let tr = &s.training;
    let n = tr.per_device_train_batch_size
        * tr.gradient_accumulation_steps
        * (steps + warmup) as usize
        * world;
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
    peft.add_adapter("default", &s.lora_config()?)?;
    peft.print_trainable_parameters();
    let mut tc = s.train_config(0);
    tc.progress_bar = false;
    tc.save_steps = 0;
    tc.logging_steps = 1;
    let mut run = |max_steps: u64| {
        let tc = sft_trainer::TrainConfig {
            max_steps,
            ..tc.clone()
        };
        sft_trainer::train_data_parallel::<AB, _>(
            &mut peft,
            "default",
            &samples,
            &[],
            &tc,
            false,
            device,
            comm,
        )
    };
    let t = std::time::Instant::now();
    run(warmup)?;
    println!(
        "warm-up: {warmup} steps in {:.1} s (autotune + compilation included)",
        t.elapsed().as_secs_f64()
    );
    // The steps alone, as the anchor times them: the trainer leaves its final checkpoint write
    // (adapter + optimizer state) off `step_secs`.
    let summary = run(steps)?;
    if comm.rank() != 0 {
        return Ok(());
    }
    let secs = summary.step_secs;
    let tokens = (steps as usize
        * tr.per_device_train_batch_size
        * tr.gradient_accumulation_steps
        * seq
        * world) as f64;
    println!(
        "{}",
        serde_json::json!({
            "system": "burn-peft", "targets": s.lora.target_modules, "r": s.lora.lora_r, "gc": tr.gradient_checkpointing,
            "batch": tr.per_device_train_batch_size * tr.gradient_accumulation_steps, "seq": seq, "steps": steps, "processes": world,
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
        let exp = peft_lora::SafetensorsFile::open(&dir.join("expected.safetensors"))?;
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
