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
        &[(4096, 4096)]
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

/// `news2stock check-fused`.
pub fn check(race_tokens: usize, race_dim: usize, race_steps: usize) -> Result<()> {
    let device = CudaDevice::default();
    let mut checks = Vec::new();
    // Element types are given explicitly: Burn's default float type is per device, fixed by
    // the first backend that touches it, whatever the backend's type parameter says.
    checks.extend(selftest::check_all::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_all::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_all::<Autodiff<Gpu, BalancedCheckpointing>>(
        "cuda-ckpt",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_attention::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_attention::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_attention::<
        Autodiff<Gpu, BalancedCheckpointing>,
    >("cuda-ckpt", DType::BF16, &device));
    checks.extend(selftest::check_cross_entropy::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_cross_entropy::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_rms_norm::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_rms_norm::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_swiglu::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_swiglu::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_rope::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_rope::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
    checks.extend(selftest::check_adamw::<Cuda<f32>>("cuda", DType::F32, &device));
    checks.extend(selftest::check_hashed_dropout::<Autodiff<Cuda<f32>>>(
        "cuda",
        DType::F32,
        &device,
    ));
    checks.extend(selftest::check_hashed_dropout::<Autodiff<Gpu>>(
        "cuda",
        DType::BF16,
        &device,
    ));
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
