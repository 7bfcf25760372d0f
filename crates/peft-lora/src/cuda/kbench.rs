//! Each step kernel timed alone at the Llama-8B training shape (batch 2 x 1024, bf16): the time
//! per call and the bandwidth it reaches on the bytes it must move (inputs read once, outputs
//! written once), so a kernel can be held against the card's HBM bandwidth, and the attention op
//! (GEMMs and softmax) forward and forward + backward.
//!
//! Used by `news2stock bench-kernels`; the figures go to `docs/PERFORMANCE.md`.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use half::bf16;

use super::{prim, rms_norm, rope, softmax, swiglu, CubeCuda};

type Gpu = CubeCuda<bf16>;

/// One kernel's figure.
#[derive(Debug, Clone)]
pub struct KernelTime {
    /// What ran, with its shape.
    pub name: String,
    /// Microseconds per call (mean over the timed calls).
    pub micros: f64,
    /// Bytes the call must move (0 where that is not the point, e.g. GEMM-bound ops).
    pub bytes: f64,
}

impl KernelTime {
    /// GB/s on [`Self::bytes`].
    pub fn gbps(&self) -> f64 {
        self.bytes / self.micros / 1e3
    }
}

fn time<F: FnMut()>(name: String, bytes: f64, iters: usize, mut f: F) -> KernelTime {
    let device = Default::default();
    for _ in 0..3 {
        f();
    }
    Gpu::sync(&device).expect("device sync");
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    Gpu::sync(&device).expect("device sync");
    KernelTime {
        name,
        micros: t0.elapsed().as_secs_f64() * 1e6 / iters as f64,
        bytes,
    }
}

fn causal_mask(s: usize) -> Tensor<Gpu, 4> {
    let mut m = vec![0f32; s * s];
    for i in 0..s {
        for j in i + 1..s {
            m[i * s + j] = -1e9;
        }
    }
    Tensor::from_data(
        TensorData::new(m, [1, 1, s, s]),
        (&Default::default(), DType::F32),
    )
}

/// Times every step kernel `iters` times at batch `b` x `s` tokens of Llama-8B (32 heads, 8 KV
/// heads, head_dim 128, hidden 4096, intermediate 14336), bf16.
pub fn bench_kernels(b: usize, s: usize, iters: usize) -> Vec<KernelTime> {
    let device = Default::default();
    let (nh, nkv, hd, hidden, inter) = (32, 8, 128, 4096, 14336);
    let opts = (&device, DType::BF16);
    let normal = Distribution::Normal(0.0, 1.0);
    let rnd = |shape: Vec<usize>| Tensor::<Gpu, 3>::random(shape, normal, opts);
    let mut out = Vec::new();

    // Attention softmax over [b * nkv, rep * s, s] scores.
    let (g, m) = (b * nkv, (nh / nkv) * s);
    let n = (g * m * s) as f64;
    let scores = rnd(vec![g, m, s]);
    let mask = causal_mask(s);
    out.push(time(
        format!("softmax forward [{g}, {m}, {s}]"),
        4.0 * n,
        iters,
        || drop(softmax::forward(prim(scores.clone()), prim(mask.clone()))),
    ));
    let probs = rnd(vec![g, m, s]);
    let dprobs = rnd(vec![g, m, s]);
    out.push(time(
        format!("softmax backward [{g}, {m}, {s}]"),
        6.0 * n,
        iters,
        || {
            drop(softmax::backward(
                prim(probs.clone()),
                prim(dprobs.clone()),
                0.088,
            ))
        },
    ));
    drop((scores, probs, dprobs));

    // SwiGLU over [b * s, inter].
    let n = (b * s * inter) as f64;
    let gate = rnd(vec![1, b * s, inter]).reshape([b * s, inter]);
    let up = rnd(vec![1, b * s, inter]).reshape([b * s, inter]);
    let dy = rnd(vec![1, b * s, inter]).reshape([b * s, inter]);
    out.push(time(
        format!("swiglu forward [{}, {inter}]", b * s),
        6.0 * n,
        iters,
        || drop(swiglu::forward(prim(gate.clone()), prim(up.clone()))),
    ));
    out.push(time(
        format!("swiglu backward [{}, {inter}]", b * s),
        10.0 * n,
        iters,
        || {
            drop(swiglu::backward(
                prim(dy.clone()),
                prim(gate.clone()),
                prim(up.clone()),
            ))
        },
    ));
    drop((gate, up, dy));

    // RoPE with the split into heads, queries [b, s, nh, hd].
    let n = (b * s * nh * hd) as f64;
    let x = rnd(vec![b * s, nh, hd]).reshape([b, s, nh, hd]);
    let cos = rnd(vec![b, s, hd]);
    let sin = rnd(vec![b, s, hd]);
    out.push(time(
        format!("rope forward [{b}, {s}, {nh}, {hd}]"),
        4.0 * n,
        iters,
        || {
            drop(rope::forward(
                prim(x.clone()),
                prim(cos.clone()),
                prim(sin.clone()),
            ))
        },
    ));
    drop(x);

    // RMSNorm over [b * s, hidden].
    let n = (b * s * hidden) as f64;
    let x = rnd(vec![1, b * s, hidden]).reshape([b * s, hidden]);
    let w = Tensor::<Gpu, 1>::random([hidden], normal, opts);
    out.push(time(
        format!("rms_norm forward [{}, {hidden}]", b * s),
        4.0 * n,
        iters,
        || drop(rms_norm::forward(prim(x.clone()), prim(w.clone()), 1e-5)),
    ));
    drop((x, w));

    // The whole attention op (cuBLASLt GEMMs + softmax), forward and forward + backward.
    let q4 = Tensor::<Gpu, 4>::random([b, nkv, m, hd], normal, opts);
    let k4 = Tensor::<Gpu, 4>::random([b, nkv, s, hd], normal, opts);
    let v4 = Tensor::<Gpu, 4>::random([b, nkv, s, hd], normal, opts);
    let scale = 1.0 / (hd as f64).sqrt();
    out.push(time(
        format!("attention forward q [{b}, {nkv}, {m}, {hd}]"),
        0.0,
        iters,
        || drop(super::attention(&q4, &k4, &v4, &mask, scale).expect("fused attention")),
    ));
    type Ad = Autodiff<Gpu>;
    let lift = |t: &Tensor<Gpu, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
    let (q, k, v) = (lift(&q4), lift(&k4), lift(&v4));
    let mask_ad = Tensor::<Ad, 4>::from_inner(mask.clone());
    out.push(time(
        format!("attention forward+backward q [{b}, {nkv}, {m}, {hd}]"),
        0.0,
        iters,
        || {
            let o = super::attention(&q, &k, &v, &mask_ad, scale).expect("fused attention");
            drop(o.sum().backward());
        },
    ));
    out
}
