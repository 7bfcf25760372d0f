//! `bench-linear`: the fused CUDA linear's throughput (its correctness is checked by
//! `peft-lora`'s `gpu_fused` test and `burn-cuda-ops`' `gpu_selftest`).

use anyhow::Result;
use burn::backend::cuda::CudaDevice;
use burn::backend::Cuda;
use burn_cuda_ops as cuda;
use half::bf16;

use crate::bench_linear::{bench_shape, LLAMA_8B_SHAPES};

type Gpu = Cuda<bf16>;
/// `news2stock-dev bench-linear`.
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
