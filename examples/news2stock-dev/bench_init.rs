//! `bench-init`: time of a weight-decomposing init (PiSSA, OLoRA) on the Llama-3.1-8B shape's
//! q_proj (4096 -> 4096) and v_proj (4096 -> 1024) of every layer, random weights, on the CPU
//! (the decompositions run on the host with faer whatever the backend).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::InitLoraWeights;

use crate::settings::Settings;

/// Runs `method` on `layers` x (q_proj, v_proj) and prints per-matrix and total times.
pub fn bench_init<B: Backend>(
    s: &Settings,
    method: &str,
    layers: usize,
    device: &B::Device,
) -> Result<()> {
    let m: InitLoraWeights = method.parse()?;
    let scaling = s.lora.lora_alpha / s.lora.lora_r as f64;
    let shapes = [("q_proj", 4096, 4096), ("v_proj", 4096, 1024)];
    println!(
        "bench-init: {method}, r {}, {layers} layers x q_proj 4096x4096 + v_proj 4096x1024, threads {}",
        s.lora.lora_r,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let start = Instant::now();
    let mut per_kind = [0f64; 2];
    for layer in 0..layers {
        for (k, (name, d_in, d_out)) in shapes.iter().enumerate() {
            let w =
                Tensor::<B, 2>::random([*d_in, *d_out], Distribution::Normal(0.0, 0.02), device);
            let t = Instant::now();
            let lin = peft_lora::LoraLinear::from_weight(w, None);
            let init = peft_lora::init_factors(
                &lin,
                m,
                s.lora.lora_r,
                scaling,
                &format!("model.layers.{layer}.self_attn.{name}"),
            )?;
            // Wait for the device work (residual upload) before stopping the clock.
            let _ = init.residual.map(|r| r.sum().into_scalar());
            per_kind[k] += t.elapsed().as_secs_f64();
        }
        if layer == 0 {
            println!(
                "  first layer: q_proj {:.2} s, v_proj {:.2} s",
                per_kind[0], per_kind[1]
            );
        }
    }
    println!(
        "bench-init: {} matrices in {:.1} s (q_proj {:.2} s each, v_proj {:.2} s each)",
        2 * layers,
        start.elapsed().as_secs_f64(),
        per_kind[0] / layers as f64,
        per_kind[1] / layers as f64
    );
    Ok(())
}
