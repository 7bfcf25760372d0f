//! `bench-generate`: batched greedy generation on the Llama-3.1-8B shape with random weights,
//! the shapes of `news2stock eval` (prompt ~600 tokens, 256 new tokens, batch 1 / 8 / 64). The
//! anchor is `scripts/bench_transformers_generate.py` (transformers `generate`, same shapes).

use anyhow::Result;
use burn::tensor::backend::Backend;
use llama::{GenerationConfig, LlamaConfig, LlamaForCausalLM};
use peft_lora::LoraCtx;

/// One JSON line per batch size: prefill + decode time and generated tokens/s.
pub fn bench_generate<B: Backend>(
    batches: &[usize],
    prompt_len: usize,
    new_tokens: usize,
    tiny: bool,
    device: &B::Device,
) -> Result<()> {
    let cfg = if tiny {
        LlamaConfig::tiny(512)
    } else {
        LlamaConfig::llama3_8b()
    };
    let vocab = cfg.vocab_size as u64;
    let model = LlamaForCausalLM::<B>::random_seeded(&cfg, device, 0);
    // Every row generates exactly `new_tokens` (no stop ids), as the anchor does.
    let gen = |n: usize| GenerationConfig {
        max_new_tokens: n,
        min_new_tokens: n,
        ..Default::default()
    };
    for &b in batches {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..prompt_len)
                    .map(|i| ((i as u64 * 31 + r as u64 * 7919 + 1) % vocab) as u32)
                    .collect()
            })
            .collect();
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
        println!(
            "{}",
            serde_json::json!({"system": "burn-peft", "batch": b, "prompt": prompt_len,
                "new_tokens": new_tokens, "generated": tokens, "seconds": secs,
                "tokens_per_s": tokens as f64 / secs})
        );
    }
    Ok(())
}
