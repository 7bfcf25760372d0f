//! Each step kernel timed alone at the Llama-8B training shape (batch 2 x 1024, bf16): the time
//! per call and the bandwidth it reaches on the bytes it must move (inputs read once, outputs
//! written once), so a kernel can be held against the card's HBM bandwidth, and the attention op
//! (GEMMs and softmax) forward and forward + backward.
//!
//! Also each cuBLASLt GEMM of the low-rank linear alone at two projection shapes.
//!
//! `cargo bench -p burn-cuda-ops --bench kernels [-- --iters N]` on a machine with a CUDA GPU
//! (it says so and exits when there is none); one line per kernel, then its JSON. The figures go
//! to `docs/PERFORMANCE.md`.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use half::bf16;

use burn::tensor::TensorPrimitive;
use burn_cuda_ops::{rms_norm, rope, softmax, swiglu, CubeCuda};

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
fn bench_kernels(b: usize, s: usize, iters: usize, emit: &mut dyn FnMut(KernelTime)) {
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
                1,
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
        || drop(burn_cuda_ops::attention(&q4, &k4, &v4, &mask, scale).expect("fused attention")),
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
            let o = burn_cuda_ops::attention(&q, &k, &v, &mask_ad, scale).expect("fused attention");
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
    let ours = burn_cuda_ops::attention(q4, k4, v4, mask, scale).expect("fused attention");
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
    type Strategy = (&'static str, fn() -> AttentionStrategy);
    let strategies: [Strategy; 4] = [
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
                options,
                strategy(),
            )
        };
        let first = match run() {
            Ok(t) => tensor::<Gpu, 4>(t),
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

/// Each cuBLASLt GEMM of the fused low-rank linear (see `burn_cuda_ops::kernels`) timed alone with GPU
/// events at `n` tokens, `d_in -> d_out`, rank `r`, bf16. The figure is the algorithm the plan
/// uses (the fastest candidate when `burn_cuda_ops::lt` autotunes, else the heuristic's first); the name
/// carries the heuristic's first and the fastest candidate's times beside it. `bytes` is what the
/// skinny GEMMs must move (0 for the big ones, which are compute-bound).
fn bench_low_rank_parts(
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    iters: usize,
    emit: &mut dyn FnMut(KernelTime),
) -> Result<(), String> {
    use burn_cuda_ops::lt::{self, Dtype, Operand, Output};
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let rnd = |rows: usize, cols: usize| {
        prim(Tensor::<Gpu, 2>::random(
            [rows, cols],
            normal,
            (&device, DType::BF16),
        ))
    };
    let ts = [
        rnd(n, d_in),
        rnd(d_in, d_out),
        rnd(d_in, r),
        rnd(r, d_out),
        rnd(n, d_out),
        rnd(n, d_out),
        rnd(n, d_in),
        rnd(n, r),
        rnd(n, r),
        rnd(d_in, r),
        rnd(r, d_out),
    ];
    let [x, w, a, b, y, dy, dx, xa, g, da, db] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let handles = ts.iter().map(|t| t.handle.clone()).collect();
    let rows = burn_cuda_ops::device::run(&ts[0].device, handles, |ctx, p| {
        let op = |i: usize, rows: usize, cols: usize, trans: bool| Operand {
            ptr: p[i],
            rows,
            cols,
            ld: cols,
            trans,
        };
        let out = |i: usize, ld: usize| Output { ptr: p[i], ld };
        let (e, s) = (2.0, 0.5);
        let parts = [
            (
                "y = x W",
                op(x, n, d_in, false),
                op(w, d_in, d_out, false),
                out(y, d_out),
                1.0,
                0.0,
                0.0,
            ),
            (
                "y += x W (beta 1)",
                op(x, n, d_in, false),
                op(w, d_in, d_out, false),
                out(y, d_out),
                1.0,
                1.0,
                0.0,
            ),
            (
                "xa = x A",
                op(x, n, d_in, false),
                op(a, d_in, r, false),
                out(xa, r),
                1.0,
                0.0,
                e * (n * d_in) as f64,
            ),
            (
                "y = s xa B",
                op(xa, n, r, false),
                op(b, r, d_out, false),
                out(y, d_out),
                s,
                0.0,
                e * (n * d_out) as f64,
            ),
            (
                "y += s xa B (beta 1: a rank-r update of the output)",
                op(xa, n, r, false),
                op(b, r, d_out, false),
                out(y, d_out),
                s,
                1.0,
                2.0 * e * (n * d_out) as f64,
            ),
            (
                "g = dy B^T",
                op(dy, n, d_out, false),
                op(b, r, d_out, true),
                out(g, r),
                1.0,
                0.0,
                e * (n * d_out) as f64,
            ),
            (
                "dx = s g A^T",
                op(g, n, r, false),
                op(a, d_in, r, true),
                out(dx, d_in),
                s,
                0.0,
                e * (n * d_in) as f64,
            ),
            (
                "dx += s g A^T (beta 1: a rank-r update of the output)",
                op(g, n, r, false),
                op(a, d_in, r, true),
                out(dx, d_in),
                s,
                1.0,
                2.0 * e * (n * d_in) as f64,
            ),
            (
                "dx = dy W^T",
                op(dy, n, d_out, false),
                op(w, d_in, d_out, true),
                out(dx, d_in),
                1.0,
                0.0,
                0.0,
            ),
            (
                "dx += dy W^T (beta 1)",
                op(dy, n, d_out, false),
                op(w, d_in, d_out, true),
                out(dx, d_in),
                1.0,
                1.0,
                0.0,
            ),
            (
                "dB = s xa^T dy",
                op(xa, n, r, true),
                op(dy, n, d_out, false),
                out(db, d_out),
                s,
                0.0,
                e * (n * d_out) as f64,
            ),
            (
                "dA = s x^T g",
                op(x, n, d_in, true),
                op(g, n, r, false),
                out(da, r),
                s,
                0.0,
                e * (n * d_in) as f64,
            ),
        ];
        let mut rows = Vec::new();
        for (name, pa, pb, pc, alpha, beta, bytes) in parts {
            let (times, chosen) =
                lt::candidate_times(ctx, Dtype::Bf16, pa, pb, pc, alpha, beta, iters)?;
            let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
            rows.push(KernelTime {
                name: format!(
                    "low-rank {d_in}->{d_out} r{r} n{n}: {name} (first {:.1} us, best {:.1} us of {})",
                    times[0] * 1e3,
                    best * 1e3,
                    times.len()
                ),
                micros: times[chosen] * 1e3,
                bytes,
            });
        }
        Ok(rows)
    })?;
    for row in rows {
        emit(row);
    }
    Ok(())
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn main() {
    if !burn_cuda_ops::gpu_present() {
        println!("burn-cuda-ops kernels bench: skipped, no CUDA GPU found");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut emit = |k: KernelTime| {
        println!("{:<48} {:>9.1} us {:>8.0} GB/s", k.name, k.micros, k.gbps());
        println!(
            "{}",
            serde_json::json!({"kernel": k.name, "us": k.micros, "bytes": k.bytes, "gbps": k.gbps()})
        );
    };
    // The low-rank linear's GEMMs one by one, on the 8B q/o shape and the k/v projection.
    for (d_in, d_out) in [(4096, 4096), (4096, 1024)] {
        if let Err(e) = bench_low_rank_parts(4096, d_in, d_out, 16, iters, &mut emit) {
            eprintln!("low-rank GEMM parts: {e}");
            std::process::exit(1);
        }
    }
    bench_kernels(2, 1024, iters, &mut emit);
}
