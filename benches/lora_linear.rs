//! Adapter kernel throughput: the adapted linear's forward, forward + backward, and merged vs
//! unmerged inference, with the time ratio to the frozen GEMM alone (the LoRA overhead).
//!
//! `cargo bench` runs small shapes on the CPU backend; `cargo bench --features cuda` adds the
//! Llama-8B shapes on the GPU.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{LoraConfig, LoraLinear, LoraModel, PeftModel};

struct One<B: Backend>(LoraLinear<B>);

impl<B: Backend> LoraModel<B> for One<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![("proj".into(), &self.0)]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![("proj".into(), &mut self.0)]
    }
}

/// Median seconds of `iters` runs of `f` after `warmup` runs, synchronising the device.
fn time<B: Backend>(device: &B::Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let _ = B::sync(device);
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            let _ = B::sync(device);
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

fn bench_shape<B: Backend>(
    label: &str,
    tokens: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    dora: bool,
    device: &B::Device,
) where
    Autodiff<B>: Backend<Device = B::Device>,
{
    let iters = 5;
    let base = LoraLinear::<Autodiff<B>>::random(d_in, d_out, false, device);
    let mut peft = PeftModel::new(One(base));
    let mut cfg = LoraConfig::new(r, 2.0 * r as f64, &["proj"]);
    cfg.use_dora = dora;
    peft.add_adapter::<Autodiff<B>>("default", &cfg)
        .expect("adapter");
    let x =
        Tensor::<Autodiff<B>, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), device);
    let xi = x.clone().inner();
    let layer = &peft.model.0;
    let w = layer.weight.val().inner();

    let gemm = time::<B>(device, 2, iters, || {
        let _ = xi.clone().matmul(w.clone());
    });
    let inner_layer = burn::module::AutodiffModule::valid(&peft.model.0);
    let fwd = time::<B>(device, 2, iters, || {
        let _ = inner_layer.forward(xi.clone());
    });
    let fwd_bwd = time::<B>(device, 2, iters, || {
        let xg = x.clone().require_grad();
        let y = layer.forward(xg);
        let _ = y.sum().backward();
    });
    let gemm_pair = time::<B>(device, 2, iters, || {
        // The frozen GEMM pair of a LoRA step: y = x W and dX = dY W^T.
        let y = xi.clone().matmul(w.clone());
        let _ = y.matmul(w.clone().transpose());
    });
    let mut merged = PeftModel::new(One(inner_layer.clone()));
    merged.configs = peft.configs.clone();
    merged.merge::<B>(false).expect("merge");
    let fwd_merged = time::<B>(device, 2, iters, || {
        let _ = merged.model.0.forward(xi.clone());
    });
    let flops = 2.0 * tokens as f64 * d_in as f64 * d_out as f64;
    let variant = if dora { "dora" } else { "lora" };
    println!(
        "{label} {variant} tokens={tokens} {d_in}->{d_out} r={r}: gemm {:.3} ms ({:.2} TFLOP/s) | fwd {:.3} ms (x{:.2}) | merged fwd {:.3} ms | fwd+bwd {:.3} ms (x{:.2} of gemm pair {:.3} ms)",
        gemm * 1e3,
        flops / gemm / 1e12,
        fwd * 1e3,
        fwd / gemm,
        fwd_merged * 1e3,
        fwd_bwd * 1e3,
        fwd_bwd / gemm_pair,
        gemm_pair * 1e3,
    );
}

fn main() {
    #[cfg(feature = "ndarray")]
    {
        type Cpu = burn::backend::NdArray<f32>;
        let device = Default::default();
        for (tokens, d, r) in [(256, 512, 8), (256, 512, 16), (512, 1024, 16)] {
            for dora in [false, true] {
                bench_shape::<Cpu>("cpu-ndarray", tokens, d, d, r, dora, &device);
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        type Gpu = burn::backend::Cuda<half::bf16>;
        let device = Default::default();
        // Every new shape costs tens of seconds of autotuning in burn 0.21: BENCH_QUICK=1 runs
        // only the headline shape (4096 tokens, 4096->4096, r 16).
        let quick = std::env::var("BENCH_QUICK").is_ok();
        let shapes: &[(usize, usize)] = if quick {
            &[(4096, 4096)]
        } else {
            &[(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
        };
        let tokens_list: &[usize] = if quick { &[4096] } else { &[2048, 4096] };
        let ranks: &[usize] = if quick { &[16] } else { &[8, 16, 64] };
        for &tokens in tokens_list {
            for &(d_in, d_out) in shapes {
                for &r in ranks {
                    bench_shape::<Gpu>("cuda-bf16", tokens, d_in, d_out, r, false, &device);
                }
            }
        }
        bench_shape::<Gpu>("cuda-bf16", 4096, 4096, 4096, 16, true, &device);
    }
}
