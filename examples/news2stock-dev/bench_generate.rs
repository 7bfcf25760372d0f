//! `bench-generate`: batched greedy generation on the Llama-3.1-8B shape with random weights,
//! the shapes of `news2stock eval` (prompt ~600 tokens, 256 new tokens, batch 1 / 8 / 64). The
//! anchor is `scripts/bench_transformers_generate.py` (transformers `generate`, same shapes).

use anyhow::Result;
use burn::tensor::backend::Backend;
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM};
use peft_lora::{LoraConfig, LoraCtx, LoraModel, PeftModel};

/// One JSON line per batch size: prefill + decode time and generated tokens/s; greedy, or with
/// `sample` Llama 3 instruct's sampling settings (temperature 0.6, top-k 50, top-p 0.9).
pub fn bench_generate<B: Backend>(
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    tiny: bool,
    sample: bool,
    device: &B::Device,
) -> Result<()> {
    let gen = |n| sampling(gen(n), sample);
    let cfg = config(tiny);
    let model = LlamaForCausalLM::<B>::random_seeded(&cfg, device, 0);
    for &b in batches {
        let prompts = prompts(b, prompt_len, cfg.vocab_size);
        // Warm-up at this batch size (autotune, compilation), then one timed generation.
        model.generate(&prompts, &gen(4), &LoraCtx::default(), &mut |_, _| {})?;
        let _ = B::sync(device);
        let t = std::time::Instant::now();
        let out = model.generate(
            &prompts,
            &gen(new_tokens),
            &LoraCtx::default(),
            &mut |_, _| {},
        )?;
        let _ = B::sync(device);
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(Vec::len).sum();
        // FNV-1a of every generated id: runs with an op switched on and off compare their
        // tokens by this (greedy decoding of the same weights).
        let ids_hash = out
            .iter()
            .flatten()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
                (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3)
            });
        println!(
            "{}",
            serde_json::json!({"system": "burn-peft", "batch": b, "prompt": prompt_len,
                "sample": sample, "new_tokens": new_tokens, "generated": tokens, "seconds": secs,
                "tokens_per_s": tokens as f64 / secs, "ids_fnv1a": format!("{ids_hash:016x}")})
        );
    }
    Ok(())
}

fn config(tiny: bool) -> LlamaConfig {
    if tiny {
        LlamaConfig::tiny(512)
    } else {
        LlamaConfig::llama3_8b()
    }
}

/// Every row generates exactly `n` tokens (no stop ids), as the anchor does.
fn gen(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        min_new_tokens: n,
        ..Default::default()
    }
}

/// `cfg` with Llama 3 instruct's sampling settings when `sample` (the anchor's `--sample`).
fn sampling(cfg: GenerationConfig, sample: bool) -> GenerationConfig {
    match sample {
        true => GenerationConfig {
            do_sample: true,
            temperature: 0.6,
            top_k: 50,
            top_p: 0.9,
            seed: 0,
            ..cfg
        },
        false => cfg,
    }
}

/// `b` distinct prompts of `len` tokens.
fn prompts(b: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    let vocab = vocab as u64;
    (0..b)
        .map(|r| {
            (0..len)
                .map(|i| ((i as u64 * 31 + r as u64 * 7919 + 1) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// `news2stock eval`'s side-by-side pass (each prompt once routed to the base model and once to
/// the adapter, `2 b` rows in one call) against the two sides one after the other (`b` rows
/// each); one JSON line per batch size with both times and their ratio.
pub fn bench_side_by_side<B: Backend>(
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    tiny: bool,
    device: &B::Device,
) -> Result<()> {
    let cfg = config(tiny);
    let mut peft = PeftModel::new(LlamaForCausalLM::<B>::random_seeded(&cfg, device, 0));
    peft.add_adapter("default", &LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]))?;
    // B starts at zero: give the adapter an effect, as a trained one has.
    for (_, l) in peft.model.lora_linears_mut() {
        if let Some(a) = l.adapters.first_mut() {
            let b = a.lora_b.val();
            let r = b.random_like(burn::tensor::Distribution::Normal(0.0, 0.02));
            a.lora_b = burn::module::Param::from_tensor(r);
        }
    }
    let model = &peft.model;
    let tuned = LoraCtx::default();
    for &b in batches {
        // Every row routed to no adapter: the base model.
        let base = LoraCtx {
            row_adapters: Some(vec![None; b]),
            ..Default::default()
        };
        let prompts = prompts(b, prompt_len, cfg.vocab_size);
        let rows: Vec<Vec<u32>> = prompts.iter().chain(&prompts).cloned().collect();
        let routed = LoraCtx {
            row_adapters: Some(
                (0..2 * b)
                    .map(|r| (r >= b).then(|| "default".to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        // Warm-up of both shapes (autotune, compilation).
        model.generate(&rows, &gen(4), &routed, &mut |_, _| {})?;
        model.generate(&prompts, &gen(4), &tuned, &mut |_, _| {})?;
        let _ = B::sync(device);
        let t = std::time::Instant::now();
        model.generate(&prompts, &gen(new_tokens), &base, &mut |_, _| {})?;
        model.generate(&prompts, &gen(new_tokens), &tuned, &mut |_, _| {})?;
        let _ = B::sync(device);
        let apart = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        model.generate(&rows, &gen(new_tokens), &routed, &mut |_, _| {})?;
        let _ = B::sync(device);
        let together = t.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"system": "burn-peft", "bench": "side-by-side", "prompts": b,
                "prompt": prompt_len, "new_tokens": new_tokens, "two_passes_s": apart,
                "one_pass_s": together, "one_over_two": together / apart})
        );
    }
    Ok(())
}
