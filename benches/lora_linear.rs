//! Adapter kernel throughput: the adapted linear's forward, forward + backward, and merged vs
//! unmerged inference, with the time ratio to the frozen GEMM alone (the LoRA overhead).
//!
//! `cargo bench` runs small shapes on the CPU backend; `cargo bench --features cuda` adds the
//! Llama-8B shapes on the GPU when one is present (`BENCH_QUICK=1`: the headline shape only).
//! The same measurements run as `news2stock-dev bench-linear` (one binary to carry to a GPU box).

#[path = "../examples/news2stock-dev/bench_linear.rs"]
#[allow(dead_code)]
mod bench_linear;

use bench_linear::bench_shape;

fn main() {
    #[cfg(feature = "ndarray")]
    {
        type Cpu = burn::backend::NdArray<f32>;
        let device = Default::default();
        for (tokens, d, r) in [(256, 512, 8), (256, 512, 16), (512, 1024, 16)] {
            for dora in [false, true] {
                let row = bench_shape::<Cpu>("cpu-ndarray", tokens, d, d, r, dora, 5, &device);
                println!("{}", row.line());
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        if !burn_cuda_ops::gpu_present() {
            println!("no CUDA GPU: GPU shapes skipped");
            return;
        }
        type Gpu = burn::backend::Cuda<half::bf16>;
        let device = Default::default();
        let quick = std::env::var("BENCH_QUICK").is_ok();
        let shapes: &[(usize, usize)] = if quick {
            &[(4096, 4096)]
        } else {
            &bench_linear::LLAMA_8B_SHAPES
        };
        let tokens_list: &[usize] = if quick { &[4096] } else { &[2048, 4096] };
        let ranks: &[usize] = if quick { &[16] } else { &[8, 16, 64] };
        for &tokens in tokens_list {
            for &(d_in, d_out) in shapes {
                for &r in ranks {
                    let row =
                        bench_shape::<Gpu>("cuda-bf16", tokens, d_in, d_out, r, false, 20, &device);
                    println!("{}", row.line());
                }
            }
        }
        for &(d_in, d_out) in shapes {
            let row = bench_shape::<Gpu>("cuda-bf16", 4096, d_in, d_out, 16, true, 20, &device);
            println!("{}", row.line());
        }
    }
}
