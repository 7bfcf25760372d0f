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
/// heads, head_dim 128, hidden 4096, intermediate 14336), bf16; each figure goes to `emit` as
/// soon as it is measured.
pub fn bench_kernels(b: usize, s: usize, iters: usize, emit: &mut dyn FnMut(KernelTime)) {
    let device = Default::default();
    let (nh, nkv, hd, hidden, inter) = (32, 8, 128, 4096, 14336);
    let opts = (&device, DType::BF16);
    let normal = Distribution::Normal(0.0, 1.0);
    let rnd = |shape: Vec<usize>| Tensor::<Gpu, 3>::random(shape, normal, opts);

    // Attention softmax over [b * nkv, rep * s, s] scores.
    let (g, m) = (b * nkv, (nh / nkv) * s);
    let n = (g * m * s) as f64;
    let scores = rnd(vec![g, m, s]);
    let mask = causal_mask(s);
    emit(time(
        format!("softmax forward [{g}, {m}, {s}]"),
        4.0 * n,
        iters,
        || drop(softmax::forward(prim(scores.clone()), prim(mask.clone()))),
    ));
    let probs = rnd(vec![g, m, s]);
    let dprobs = rnd(vec![g, m, s]);
    emit(time(
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
    emit(time(
        format!("swiglu forward [{}, {inter}]", b * s),
        6.0 * n,
        iters,
        || drop(swiglu::forward(prim(gate.clone()), prim(up.clone()))),
    ));
    emit(time(
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
    emit(time(
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
    emit(time(
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
    emit(time(
        format!("attention forward q [{b}, {nkv}, {m}, {hd}]"),
        0.0,
        iters,
        || drop(super::attention(&q4, &k4, &v4, &mask, scale).expect("fused attention")),
    ));
    type Ad = Autodiff<Gpu>;
    let lift = |t: &Tensor<Gpu, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
    let (q, k, v) = (lift(&q4), lift(&k4), lift(&v4));
    let mask_ad = Tensor::<Ad, 4>::from_inner(mask.clone());
    emit(time(
        format!("attention forward+backward q [{b}, {nkv}, {m}, {hd}]"),
        0.0,
        iters,
        || {
            let o = super::attention(&q, &k, &v, &mask_ad, scale).expect("fused attention");
            drop(o.sum().backward());
        },
    ));
    burn_flash(&q4, &k4, &v4, &mask, scale, iters, emit);
}

/// Burn's own attention (`burn_cubecl::kernel::attention`: cubek's flash kernels, forward only,
/// causal flag instead of a mask, K/V repeated to every query head) beside ours, on the same
/// inputs: each strategy's time and its largest difference from our output. Run last: a kernel
/// that fails to compile leaves the device unusable for the rest of the process.
fn burn_flash(
    q4: &Tensor<Gpu, 4>,
    k4: &Tensor<Gpu, 4>,
    v4: &Tensor<Gpu, 4>,
    mask: &Tensor<Gpu, 4>,
    scale: f64,
    iters: usize,
    emit: &mut dyn FnMut(KernelTime),
) {
    use burn::tensor::ops::AttentionModuleOptions;
    use burn_cubecl::kernel::attention::{attention, AttentionStrategy};

    let [b, nkv, m, hd] = q4.dims();
    let s = k4.dims()[2];
    let (rep, nh) = (m / s, m / s * nkv);
    let ours = super::attention(q4, k4, v4, mask, scale).expect("fused attention");
    let q = q4.clone().reshape([b, nh, s, hd]);
    let heads = |t: &Tensor<Gpu, 4>| {
        t.clone()
            .unsqueeze_dim::<5>(2)
            .expand([b, nkv, rep, s, hd])
            .reshape([b, nh, s, hd])
    };
    let (k, v) = (heads(k4), heads(v4));
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let strategies: [(&str, fn() -> AttentionStrategy); 4] = [
        ("fallback", || AttentionStrategy::Fallback),
        ("flash unit", || AttentionStrategy::FlashUnit),
        ("flash accelerated, 4 planes", || flash_planes(4)),
        ("flash accelerated, 8 planes", || flash_planes(8)),
    ];
    for (label, strategy) in strategies {
        let run = || {
            attention(
                prim(q.clone()),
                prim(k.clone()),
                prim(v.clone()),
                None,
                None,
                options.clone(),
                strategy(),
            )
        };
        let first = match run() {
            Ok(t) => super::tensor::<Gpu, 4>(t),
            Err(e) => {
                eprintln!("burn attention {label}: {e:?}");
                continue;
            }
        };
        let diff = (first.reshape([b, nkv, m, hd]) - ours.clone())
            .abs()
            .max()
            .into_scalar()
            .to_f32();
        let scale_ref = ours.clone().abs().max().into_scalar().to_f32();
        emit(time(
            format!(
                "burn attention ({label}) forward, max diff to ours {:.1e}",
                diff / scale_ref
            ),
            0.0,
            iters,
            || drop(run()),
        ));
    }
}

/// cubek's tensor-core flash kernel with `num_planes` warps per cube.
fn flash_planes(num_planes: u8) -> burn_cubecl::kernel::attention::AttentionStrategy {
    use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
    burn_cubecl::kernel::attention::AttentionStrategy::FlashBlackboxAccelerated(
        BlackboxAcceleratedStrategy {
            num_planes,
            seq_q: 1,
            seq_kv: 1,
        },
    )
}
