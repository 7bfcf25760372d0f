//! `bench-linear` and `check-fused`: the fused CUDA linear's throughput and correctness.

use anyhow::Result;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::tensor::DType;
use half::bf16;
use peft_lora::cuda::{self, selftest, Ordering};

use crate::bench_linear::{bench_shape, LLAMA_8B_SHAPES};

type Gpu = Cuda<bf16>;
/// `news2stock bench-linear`.
pub fn bench_linear(quick: bool, composed: bool, iters: usize) -> Result<()> {
    let device = CudaDevice::default();
    let tokens_list: &[usize] = if quick { &[4096] } else { &[2048, 4096] };
    let shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096), (4096, 1024)]
    } else {
        &LLAMA_8B_SHAPES
    };
    let ranks: &[usize] = if quick { &[16] } else { &[8, 16, 64] };
    let emit = |row: crate::bench_linear::Row| {
        println!("{}", row.line());
        println!("{}", serde_json::to_string(&row).expect("json"));
    };
    for &tokens in tokens_list {
        for &(d_in, d_out) in shapes {
            for &r in ranks {
                emit(bench_shape::<Gpu>(
                    "cuda-bf16",
                    tokens,
                    d_in,
                    d_out,
                    r,
                    false,
                    iters,
                    &device,
                ));
            }
        }
    }
    for &(d_in, d_out) in shapes {
        emit(bench_shape::<Gpu>(
            "cuda-bf16",
            4096,
            d_in,
            d_out,
            16,
            true,
            iters,
            &device,
        ));
    }
    println!(
        "{}",
        serde_json::json!({"fused_ops_on_cubecl_stream": cuda::cubecl_stream_used()})
    );
    if composed {
        cuda::set_enabled(false);
        emit(bench_shape::<Gpu>(
            "cuda-bf16",
            4096,
            4096,
            4096,
            16,
            false,
            iters,
            &device,
        ));
        cuda::set_enabled(true);
    }
    Ok(())
}

/// `news2stock bench-kernels`: one line per kernel, and its JSON.
pub fn bench_kernels(iters: usize) -> Result<()> {
    let mut emit = |k: cuda::kbench::KernelTime| {
        println!("{:<48} {:>9.1} us {:>8.0} GB/s", k.name, k.micros, k.gbps());
        println!(
            "{}",
            serde_json::json!({"kernel": k.name, "us": k.micros, "bytes": k.bytes, "gbps": k.gbps()})
        );
    };
    // The fused LoRA linear's GEMMs one by one, on the headline shape and the k/v projection.
    for (d_in, d_out) in [(4096, 4096), (4096, 1024)] {
        cuda::kbench::bench_lora_parts(4096, d_in, d_out, 16, iters, &mut emit)
            .map_err(|e| anyhow::anyhow!("LoRA GEMM parts: {e}"))?;
    }
    cuda::kbench::bench_kernels(2, 1024, iters, &mut emit);
    Ok(())
}

/// `news2stock check-fused`.
pub fn check(race_tokens: usize, race_dim: usize, race_steps: usize) -> Result<()> {
    let device = CudaDevice::default();
    // Element types are given explicitly: Burn's default float type is per device, fixed by
    // the first backend that touches it, whatever the backend's type parameter says.
    type Suite = fn(&str, DType, &CudaDevice) -> Vec<selftest::Check>;
    type F32 = Autodiff<Cuda<f32>>;
    type Bf16 = Autodiff<Gpu>;
    type Bf16Ckpt = Autodiff<Gpu, BalancedCheckpointing>;
    let (f32_, bf16_) = (("cuda", DType::F32), ("cuda", DType::BF16));
    let ckpt = ("cuda-ckpt", DType::BF16);
    let suites: [((&str, DType), Suite); 19] = [
        (f32_, selftest::check_all::<F32>),
        (bf16_, selftest::check_all::<Bf16>),
        (ckpt, selftest::check_all::<Bf16Ckpt>),
        (f32_, selftest::check_attention::<F32>),
        (bf16_, selftest::check_attention::<Bf16>),
        (ckpt, selftest::check_attention::<Bf16Ckpt>),
        (f32_, selftest::check_cross_entropy::<F32>),
        (bf16_, selftest::check_cross_entropy::<Bf16>),
        (f32_, selftest::check_rms_norm::<F32>),
        (bf16_, selftest::check_rms_norm::<Bf16>),
        (f32_, selftest::check_swiglu::<F32>),
        (bf16_, selftest::check_swiglu::<Bf16>),
        (f32_, selftest::check_rope::<F32>),
        (bf16_, selftest::check_rope::<Bf16>),
        (f32_, selftest::check_adamw::<Cuda<f32>>),
        (bf16_, |l, _, d| {
            selftest::check_adamw_master::<Cuda<bf16>>(l, d)
        }),
        (bf16_, |l, _, d| {
            selftest::check_optimizer_master::<Bf16>(l, d)
        }),
        (f32_, selftest::check_hashed_dropout::<F32>),
        (bf16_, selftest::check_hashed_dropout::<Bf16>),
    ];
    let mut checks = Vec::new();
    for ((label, dtype), suite) in suites {
        checks.extend(suite(label, dtype, &device));
    }
    let mut failed = 0;
    for c in &checks {
        if !c.pass() {
            failed += 1;
        }
        println!(
            "{}",
            serde_json::json!({"check": c.name, "err_fused": c.err_fused, "err_composed": c.err_composed, "tol": c.tol, "pass": c.pass()})
        );
    }
    let stream = selftest::race::<Autodiff<Gpu>>(
        Ordering::Stream,
        DType::BF16,
        race_tokens,
        race_dim,
        race_steps,
        &device,
    );
    let on_stream = cuda::cubecl_stream_used();
    let unordered = selftest::race::<Autodiff<Gpu>>(
        Ordering::UnorderedForTests,
        DType::BF16,
        race_tokens,
        race_dim,
        race_steps,
        &device,
    );
    let race_ok = stream <= 1e-6 && on_stream;
    println!(
        "{}",
        serde_json::json!({
            "check": "race: fused ops on cubecl's stream vs host-synchronised",
            "err": stream, "on_cubecl_stream": on_stream, "pass": race_ok,
            "broken_ordering_err": unordered, "broken_ordering_detected": !(unordered <= 1e-6),
        })
    );
    if !race_ok {
        failed += 1;
    }
    println!("{} checks, {failed} failed", checks.len() + 1);
    anyhow::ensure!(failed == 0, "{failed} fused-op checks failed");
    Ok(())
}
