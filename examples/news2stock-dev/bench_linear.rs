//! Adapter kernel throughput (shared by `cargo bench --bench lora_linear` and
//! `news2stock-dev bench-linear`): the adapted linear's forward, forward + backward, and merged vs
//! unmerged inference, with the time ratio to the frozen GEMM alone (the LoRA overhead).
//!
//! Timing: `warmup` untimed runs, then `iters` runs and one device synchronisation; the mean
//! (as the PyTorch anchor `scripts/bench_lora_linear_torch.py` does).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
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

/// Mean seconds of `iters` runs of `f` after `warmup` runs, one synchronisation at the end.
pub fn time<B: Backend>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(),
) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let _ = B::sync(device);
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    let _ = B::sync(device);
    t.elapsed().as_secs_f64() / iters as f64
}

/// `x W` for a frozen `W`: the fused op on CUDA backends, Burn's matmul elsewhere.
fn frozen<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    if let Some(y) = burn_cuda_ops::frozen_linear(x, w, None) {
        return y;
    }
    x.clone().matmul(w.clone())
}

/// One shape's figures, seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Backend label.
    pub label: String,
    /// "lora" or "dora".
    pub variant: String,
    /// Whether the fused CUDA path was on.
    pub fused: bool,
    /// Tokens (rows of x).
    pub tokens: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
    /// Frozen GEMM alone `x W`.
    pub gemm_ms: f64,
    /// Its throughput.
    pub gemm_tflops: f64,
    /// The frozen GEMM pair of a training step: `y = x W`, `dx = dy W^T`.
    pub pair_ms: f64,
    /// Unmerged adapted forward (inference).
    pub fwd_ms: f64,
    /// Merged forward (inference).
    pub merged_ms: f64,
    /// Adapted forward + backward (training; `dx`, `dA`, `dB`).
    pub fwd_bwd_ms: f64,
    /// Frozen layer forward + backward through autodiff (`dx` only).
    pub frozen_fwd_bwd_ms: f64,
}

impl Row {
    /// One line of text.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} tokens={} {}->{} r={}: gemm {:.3} ms ({:.1} TFLOP/s) | fwd {:.3} ms (x{:.2} of gemm) | merged fwd {:.3} ms | fwd+bwd {:.3} ms (x{:.2} of gemm pair {:.3} ms) | frozen fwd+bwd {:.3} ms",
            self.label,
            self.variant,
            if self.fused { "fused" } else { "composed" },
            self.tokens,
            self.d_in,
            self.d_out,
            self.r,
            self.gemm_ms,
            self.gemm_tflops,
            self.fwd_ms,
            self.fwd_ms / self.gemm_ms,
            self.merged_ms,
            self.fwd_bwd_ms,
            self.fwd_bwd_ms / self.pair_ms,
            self.pair_ms,
            self.frozen_fwd_bwd_ms,
        )
    }
}

/// Measures one shape.
#[allow(clippy::too_many_arguments)]
pub fn bench_shape<B: Backend>(
    label: &str,
    tokens: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    dora: bool,
    iters: usize,
    device: &B::Device,
) -> Row
where
    Autodiff<B>: Backend<Device = B::Device>,
{
    let warmup = 3;
    let base = LoraLinear::<Autodiff<B>>::random(d_in, d_out, false, device);
    let frozen_layer = base.clone();
    let mut peft = PeftModel::new(One(base));
    let mut cfg = LoraConfig::new(r, 2.0 * r as f64, &["proj"]);
    cfg.use_dora = dora;
    peft.add_adapter("default", &cfg).expect("adapter");
    // B starts at zero; make it non-zero so nothing is skipped.
    {
        let ad = &mut peft.model.0.adapters[0];
        let b = Tensor::random(ad.lora_b.dims(), Distribution::Normal(0.0, 0.02), device);
        ad.lora_b = burn::module::Param::from_tensor(b);
    }
    let x =
        Tensor::<Autodiff<B>, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), device);
    let xi = x.clone().inner();
    let layer = &peft.model.0;
    let w = layer.weight.val().inner();
    let wt = w.clone().transpose();

    let gemm = time::<B>(device, warmup, iters, || {
        let _ = frozen(&xi, &w);
    });
    let pair = time::<B>(device, warmup, iters, || {
        let y = frozen(&xi, &w);
        let _ = frozen(&y, &wt);
    });
    let inner_layer = peft.model.0.valid();
    let fwd = time::<B>(device, warmup, iters, || {
        let _ = inner_layer.forward(xi.clone());
    });
    let fwd_bwd = time::<B>(device, warmup, iters, || {
        let y = layer.forward(x.clone().require_grad());
        let _ = y.backward();
    });
    let frozen_fwd_bwd = time::<B>(device, warmup, iters, || {
        let y = frozen_layer.forward(x.clone().require_grad());
        let _ = y.backward();
    });
    let mut merged = PeftModel::new(One(inner_layer.clone()));
    merged.configs = peft.configs.clone();
    merged.merge(false).expect("merge");
    let fwd_merged = time::<B>(device, warmup, iters, || {
        let _ = merged.model.0.forward(xi.clone());
    });
    let flops = 2.0 * tokens as f64 * d_in as f64 * d_out as f64;
    Row {
        label: label.into(),
        variant: if dora { "dora" } else { "lora" }.into(),
        fused: fused_on(),
        tokens,
        d_in,
        d_out,
        r,
        gemm_ms: gemm * 1e3,
        gemm_tflops: flops / gemm / 1e12,
        pair_ms: pair * 1e3,
        fwd_ms: fwd * 1e3,
        merged_ms: fwd_merged * 1e3,
        fwd_bwd_ms: fwd_bwd * 1e3,
        frozen_fwd_bwd_ms: frozen_fwd_bwd * 1e3,
    }
}

fn fused_on() -> bool {
    #[cfg(feature = "cuda")]
    {
        burn_cuda_ops::enabled()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The Llama-8B adapter shapes `(d_in, d_out)`: q/o, k/v, gate/up, down.
pub const LLAMA_8B_SHAPES: [(usize, usize); 4] =
    [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)];
