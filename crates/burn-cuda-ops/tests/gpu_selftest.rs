//! GPU self-test of burn-cuda-ops: every op against an f64 (or f32) host reference on the GPU,
//! forward and every gradient, odd shapes, bf16 and f32, with and without gradient
//! checkpointing, and a race test that fails when the GEMMs are not ordered with Burn's kernels.
//!
//! `cargo test --release -p burn-cuda-ops --test gpu_selftest` (add `--features fusion` to run
//! it under Burn's fusion backend). Without a CUDA GPU it prints that it skipped and passes; on a
//! GPU any failed check makes it exit non-zero. One JSON line per check.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};
use burn_cuda_ops as ops;
use burn_cuda_ops::device::{ordering, set_ordering, Ordering};
use half::bf16;
use test_support::check::{host, mm, rel_err, Check};
use test_support::sampling;

/// What a suite reports when its op did not run: a failure on a raw CUDA backend (where it must
/// run), a visible skip under the fusion backend (where the op is not registered).
fn not_taken<B: Backend>(name: String) -> Vec<Check> {
    let raw = ops::raw_backend::<B>();
    let why = if raw {
        ""
    } else {
        " (not registered with the fusion backend: skipped)"
    };
    let tol = if raw { -1.0 } else { 0.0 };
    vec![Check::fused(format!("{name}: op not taken{why}"), 0.0, tol)]
}

/// The accepted error for the element type the device actually used (Burn may create tensors in
/// the device's default float type rather than the backend's type parameter).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 2e-2,
    }
}

/// The op with a separate adapter input (`xd = x * mask / (1 - p)`, as LoRA dropout makes it)
/// against the host reference: `y`, `dx` (through both inputs), `dA`, `dB`. The mask is an
/// explicit tensor, so both sides use the same one.
#[allow(clippy::too_many_arguments)]
fn check_dropout<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    batch: usize,
    seq: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    device: &B::Device,
) -> Vec<Check> {
    let n = batch * seq;
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let keep = 0.9;
    let x = Tensor::<B, 2>::random([n, d_in], normal, opts).require_grad();
    let mask = Tensor::<B, 2>::random([n, d_in], Distribution::Bernoulli(keep), opts);
    let scale_w = 1.0 / (d_in as f64).sqrt();
    let w = Tensor::<B, 2>::random([d_in, d_out], normal, opts) * scale_w;
    let bias = Tensor::<B, 1>::random([d_out], normal, opts) * 0.1;
    let a = (Tensor::<B, 2>::random([d_in, r], normal, opts) * scale_w).require_grad();
    let b = (Tensor::<B, 2>::random([r, d_out], normal, opts) * 0.3).require_grad();
    let g = Tensor::<B, 2>::random([n, d_out], normal, opts);
    let s = 2.0f32;
    let xd = x.clone() * mask.clone() * (1.0 / keep);
    let dtype = x.dtype();
    let tol = tolerance(dtype);
    let name =
        |what: &str| format!("{label} {dtype:?} {n}x{d_in}->{d_out} r{r} dropout input {what}");
    let Some(y) = ops::low_rank_linear(&x, Some(&xd), &w, Some(&bias), &a, &b, s as f64) else {
        return vec![Check::fused(name("fused op not taken"), f64::INFINITY, tol)];
    };
    let grads = (y.clone() * g.clone()).sum().backward();
    let got_dx = host(x.grad(&grads).expect("dx"));
    let got_da = host(a.grad(&grads).expect("dA"));
    let got_db = host(b.grad(&grads).expect("dB"));
    let (xs, ms, ws, bs, as_, b_s, gs) = (
        host(x.clone()),
        host(mask),
        host(w),
        host(bias),
        host(a.clone()),
        host(b.clone()),
        host(g),
    );
    let xds: Vec<f32> = xs
        .iter()
        .zip(&ms)
        .map(|(x, m)| x * m / keep as f32)
        .collect();
    let mut y_ref = mm(&xs, &ws, n, d_in, d_out, false, false);
    let xa = mm(&xds, &as_, n, d_in, r, false, false);
    let lora = mm(&xa, &b_s, n, r, d_out, false, false);
    for (i, v) in y_ref.iter_mut().enumerate() {
        *v += bs[i % d_out] + s * lora[i];
    }
    let gb = mm(&gs, &b_s, n, d_out, r, false, true);
    let gba = mm(&gb, &as_, n, r, d_in, false, true);
    let mut dx = mm(&gs, &ws, n, d_out, d_in, false, true);
    for (i, v) in dx.iter_mut().enumerate() {
        *v += s * gba[i] * ms[i] / keep as f32;
    }
    let da: Vec<f32> = mm(&xds, &gb, d_in, n, r, true, false)
        .iter()
        .map(|v| s * v)
        .collect();
    let db: Vec<f32> = mm(&xa, &gs, r, n, d_out, true, false)
        .iter()
        .map(|v| s * v)
        .collect();
    [
        ("y", host(y), y_ref),
        ("dx", got_dx, dx),
        ("dA", got_da, da),
        ("dB", got_db, db),
    ]
    .into_iter()
    .map(|(what, got, want)| Check::fused(name(what), rel_err(&got, &want), tol))
    .collect()
}

/// A trainable low-rank linear `x W + s (x A) B` for the race test.
struct LowRank<B: AutodiffBackend> {
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
}

/// A chain of fused forward + backward calls whose inputs are written by Burn kernels right
/// before and whose outputs are read by Burn kernels right after, with no host synchronisation,
/// buffers freed and reused along the way. Returns the read-back accumulator.
fn race_chain<B: AutodiffBackend>(layer: &LowRank<B>, x0: &Tensor<B, 2>, steps: usize) -> Vec<f32> {
    let d_in = layer.w.dims()[0];
    let mut acc = Tensor::<B::InnerBackend, 1>::zeros([d_in], (&x0.device(), x0.dtype()));
    for i in 0..steps {
        // Written by a Burn kernel just before the fused op reads it.
        let x = (x0.clone() * (1.0 + 0.25 * i as f64) + 0.5)
            .detach()
            .require_grad();
        let y = ops::low_rank_linear(&x, None, &layer.w, None, &layer.a, &layer.b, 2.0)
            .expect("fused low-rank linear runs");
        // Read by a Burn kernel just after the fused op writes it.
        let loss = (y.clone() * 0.01).tanh().sum();
        let grads = loss.backward();
        let dx = x.grad(&grads).expect("dx");
        let da = layer.a.grad(&grads).expect("dA");
        acc = acc + dx.sum_dim(0).squeeze_dim(0) + da.sum_dim(1).squeeze_dim(1);
    }
    host(acc)
}

/// The ordering test: the chain in `mode` against the same chain with host synchronisation
/// around every fused op (correct by construction). Returns the relative error; a correct
/// ordering gives (close to) 0, a race gives garbage.
fn race<B: AutodiffBackend>(
    mode: Ordering,
    dtype: DType,
    n: usize,
    d: usize,
    steps: usize,
    device: &B::Device,
) -> f64 {
    let (opts, normal, r) = ((device, dtype), Distribution::Normal(0.0, 1.0), 16);
    let scale_w = 1.0 / (d as f64).sqrt();
    let layer = LowRank {
        w: Tensor::<B, 2>::random([d, d], normal, opts) * scale_w,
        a: (Tensor::<B, 2>::random([d, r], normal, opts) * scale_w).require_grad(),
        b: (Tensor::<B, 2>::random([r, d], normal, opts) * 0.25).require_grad(),
    };
    let x0 = Tensor::<B, 2>::random([n, d], normal, opts);
    let before = ordering();
    ops::set_enabled(true);
    set_ordering(Ordering::HostSync);
    let want = race_chain(&layer, &x0, steps);
    set_ordering(mode);
    let got = race_chain(&layer, &x0, steps);
    set_ordering(before);
    rel_err(&got, &want)
}

/// `softmax(scale q k^T + mask) v` and its gradients on the host in f64, for `q [g, m, d]`,
/// `k`, `v [g, t, d]`, `mask [mb, s, t]` (rows of group `i` are `heads x s`), output gradient
/// `dout [g, m, d]`. Returns `[out, dq, dk, dv]`.
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dout: &[f32],
    (g, m, t, d): (usize, usize, usize, usize),
    (mb, s): (usize, usize),
    scale: f64,
) -> [Vec<f32>; 4] {
    let mut out = vec![0f32; g * m * d];
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; g * m * d],
        vec![0f64; g * t * d],
        vec![0f64; g * t * d],
    );
    let heads_total = g * m / s;
    for gi in 0..g {
        for i in 0..m {
            let row = gi * m + i; // flattened [mb, heads, s] row
            let (h, qi) = (row / s, row % s);
            let mrow = (h / (heads_total / mb)) * s * t + qi * t;
            let qv = &q[row * d..(row + 1) * d];
            let mut sc: Vec<f64> = (0..t)
                .map(|j| {
                    let kv = &k[(gi * t + j) * d..(gi * t + j + 1) * d];
                    let dot: f64 = qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum();
                    dot * scale + mask[mrow + j] as f64
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            for x in sc.iter_mut() {
                *x = (*x - mx).exp() / z;
            }
            let p = sc;
            let go = &dout[row * d..(row + 1) * d];
            // dP_j = dout . v_j ; dS_j = P_j (dP_j - sum_l P_l dP_l)
            let dp: Vec<f64> = (0..t)
                .map(|j| {
                    let vv = &v[(gi * t + j) * d..(gi * t + j + 1) * d];
                    go.iter().zip(vv).map(|(a, b)| *a as f64 * *b as f64).sum()
                })
                .collect();
            let rs: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..t {
                let ds = p[j] * (dp[j] - rs) * scale;
                for e in 0..d {
                    let vj = v[(gi * t + j) * d + e] as f64;
                    out[row * d + e] += (p[j] * vj) as f32;
                    dv[(gi * t + j) * d + e] += p[j] * go[e] as f64;
                    dq[row * d + e] += ds * k[(gi * t + j) * d + e] as f64;
                    dk[(gi * t + j) * d + e] += ds * qv[e] as f64;
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    [out, f(dq), f(dk), f(dv)]
}

/// The fused attention (`ops::attention`) against the f64 host reference: output and the
/// gradients of `q`, `k`, `v`, with GQA (several query heads per KV group), a causal mask shared
/// by the batch and a causal + key-padding mask per row, and a query length shorter than the keys
/// (a KV cache). Composed-path errors are reported beside.
fn check_attention<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    // (batch, kv groups, rep, s, t, d, per-row padding)
    for (b, g, rep, s, t, d, padded) in [
        (2, 2, 3, 7, 7, 16, false),
        (2, 1, 2, 9, 9, 64, true),
        (1, 2, 4, 3, 11, 32, false),
        // Rows of 12 and 40 keys: the softmax kernels' 4- and 8-wide vector loads; 36 rows
        // leave the last cube of 8 rows part-filled.
        (1, 1, 3, 12, 12, 32, false),
        (2, 2, 2, 40, 40, 32, true),
        // Decode steps (one new token, `rep` rows per group): the one-kernel attention, head
        // sizes 32 / 64 / 128 (vectors of 1, 2, 4), 1 to 8 rows, keys past one plane's turn.
        (2, 2, 4, 1, 37, 128, true),
        (1, 3, 2, 1, 300, 64, false),
        (3, 1, 1, 1, 5, 32, true),
        (1, 2, 8, 1, 129, 128, false),
        // Two new tokens of two heads per group: four rows, the causal mask per position.
        (2, 2, 2, 2, 9, 64, true),
    ] {
        let m = rep * s;
        let q = Tensor::<B, 4>::random([b, g, m, d], normal, opts).require_grad();
        let k = Tensor::<B, 4>::random([b, g, t, d], normal, opts).require_grad();
        let v = Tensor::<B, 4>::random([b, g, t, d], normal, opts).require_grad();
        let dout = Tensor::<B, 4>::random([b, g, m, d], normal, opts);
        let dtype = q.dtype();
        // Causal with the queries at the end of the keys; padding hides the last two keys of row
        // 1 (right padding). No query row is fully masked: there the f32 sum `score - 1e9` loses
        // the score (a uniform row on the GPU, as in transformers) while f64 keeps it.
        let mb = if padded { b } else { 1 };
        let mut mask = vec![0f32; mb * s * t];
        for r in 0..mb {
            for i in 0..s {
                for j in 0..t {
                    let hidden = j > t - s + i || (padded && r == 1 && j + 2 >= t);
                    if hidden {
                        mask[r * s * t + i * t + j] = -1e9;
                    }
                }
            }
        }
        let mask_t = Tensor::<B, 4>::from_data(
            burn::tensor::TensorData::new(mask.clone(), [mb, 1, s, t]),
            (device, DType::F32),
        );
        let scale = 1.0 / (d as f64).sqrt();
        let run = |fused: bool| {
            ops::set_attention_enabled(fused);
            let out = if fused {
                ops::attention(&q, &k, &v, &mask_t, scale).expect("fused attention runs")
            } else {
                let heads = g * rep;
                let sc = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
                let sc = sc
                    .reshape([b, heads, s, t])
                    .cast(burn::tensor::FloatDType::F32)
                    + mask_t.clone();
                let p = burn::tensor::activation::softmax(sc, 3)
                    .cast(dtype)
                    .reshape([b, g, m, t]);
                p.matmul(v.clone())
            };
            let grads = (out.clone() * dout.clone()).sum().backward();
            let gr = |t: &Tensor<B, 4>| host(t.grad(&grads).expect("gradient"));
            [host(out.clone()), gr(&q), gr(&k), gr(&v)]
        };
        // The decode kernel (opt-in) where it applies, then the GEMM path.
        burn_cuda_ops::set_decode_attention_enabled(true);
        let decode = run(true);
        burn_cuda_ops::set_decode_attention_enabled(false);
        let fused = run(true);
        // One KV group per chunk: the chunked GEMMs' offsets and the softmax's row offset into
        // the per-row mask.
        burn_cuda_ops::attention::set_score_chunk_elems(1);
        let chunked = run(true);
        burn_cuda_ops::attention::set_score_chunk_elems(
            burn_cuda_ops::attention::DEFAULT_SCORE_CHUNK_ELEMS,
        );
        // The probabilities kept by the forward for the backward (a checkpointed layer's
        // recomputation), in one chunk and in one group per chunk.
        burn_cuda_ops::set_keep_attention_probs(true);
        let kept = burn_cuda_ops::attention::keeping_probs(|| run(true));
        burn_cuda_ops::attention::set_score_chunk_elems(1);
        let kept_chunked = burn_cuda_ops::attention::keeping_probs(|| run(true));
        burn_cuda_ops::attention::set_score_chunk_elems(
            burn_cuda_ops::attention::DEFAULT_SCORE_CHUNK_ELEMS,
        );
        // (Back to the default: on.)
        burn_cuda_ops::set_keep_attention_probs(true);
        let composed = run(false);
        ops::set_attention_enabled(true);
        let want = attention_reference(
            &host(q.clone()),
            &host(k.clone()),
            &host(v.clone()),
            &mask,
            &host(dout.clone()),
            (b * g, m, t, d),
            (mb, s),
            scale,
        );
        let tol = tolerance(dtype);
        let label_case = format!(
            "{label} {dtype:?} attention b{b} g{g} rep{rep} s{s} t{t} d{d}{}",
            if padded { " padded" } else { "" }
        );
        for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            // Kept probabilities are the recomputed ones: the same kernels on the same inputs.
            for (got, base, how) in [
                (&kept, &fused, ""),
                (&kept_chunked, &chunked, ", one group per chunk"),
            ] {
                checks.push(Check::fused(
                    format!("{label_case} {what}, probabilities kept = recomputed{how}"),
                    rel_err(&got[i], &base[i]),
                    0.0,
                ));
            }
            for (got, how) in [
                (&fused, ""),
                (&chunked, ", one group per chunk"),
                (&decode, ", decode kernel on"),
                (&kept, ", probabilities kept"),
                (&kept_chunked, ", probabilities kept, one group per chunk"),
            ] {
                checks.push(Check {
                    name: format!(
                        "{label} {dtype:?} attention b{b} g{g} rep{rep} s{s} t{t} d{d}{} {what}{how}",
                        if padded { " padded" } else { "" }
                    ),
                    err_fused: rel_err(&got[i], &want[i]),
                    err_composed: rel_err(&composed[i], &want[i]),
                    tol,
                });
            }
        }
    }
    checks
}

/// Head-major query rows `[b, g, rep * s, d]` as the position-major `[b, g, s * rep, d]` that
/// `ops::causal_attention` and `ops::rope_grouped` use (and back with `rep` and `s` swapped).
fn position_major<B: Backend>(x: Tensor<B, 4>, rep: usize, s: usize) -> Tensor<B, 4> {
    let [b, g, _, d] = x.dims();
    x.reshape([b, g, rep, s, d])
        .swap_dims(2, 3)
        .reshape([b, g, s * rep, d])
}

/// Causal attention in row blocks (`ops::causal_attention`, position-major queries) against
/// the f64 host reference of dense attention: output and the gradients of `q`, `k`, `v`, with
/// GQA, a causal mask shared by the batch or causal + left padding per row (no row fully
/// masked), 1, 2 and 3 blocks, a length that is not a multiple of 8 (a short last block),
/// one group per chunk, and the probabilities kept by the forward (equal to the recomputed ones).
fn check_causal_attention<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    ops::set_causal_attention_enabled(true);
    // (batch, kv groups, rep, s, d, per-row padding)
    for (b, g, rep, s, d, padded) in [
        (2, 2, 3, 16, 16, false),
        (2, 1, 2, 40, 64, true),
        (1, 2, 4, 64, 128, true),
        (2, 2, 4, 19, 32, true),
    ] {
        let m = rep * s;
        let q = Tensor::<B, 4>::random([b, g, m, d], normal, opts).require_grad();
        let k = Tensor::<B, 4>::random([b, g, s, d], normal, opts).require_grad();
        let v = Tensor::<B, 4>::random([b, g, s, d], normal, opts).require_grad();
        let dout = Tensor::<B, 4>::random([b, g, m, d], normal, opts);
        let dtype = q.dtype();
        // Causal; row 1 of a padded batch hides its first two keys from the positions after
        // them (left padding), which still see themselves.
        let mb = if padded { b } else { 1 };
        let mut mask = vec![0f32; mb * s * s];
        for r in 0..mb {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (padded && r == 1 && j < 2 && j != i) {
                        mask[(r * s + i) * s + j] = -1e9;
                    }
                }
            }
        }
        let mask_t = Tensor::<B, 4>::from_data(
            burn::tensor::TensorData::new(mask.clone(), [mb, 1, s, s]),
            (device, DType::F32),
        );
        let scale = 1.0 / (d as f64).sqrt();
        let run = |blocks: usize| -> Option<[Vec<f32>; 4]> {
            ops::set_causal_blocks(blocks);
            let qp = position_major(q.clone(), rep, s);
            let out = ops::causal_attention(&qp, &k, &v, &mask_t, scale)?;
            let out = position_major(out, s, rep);
            let grads = (out.clone() * dout.clone()).sum().backward();
            let gr = |t: &Tensor<B, 4>| host(t.grad(&grads).expect("gradient"));
            Some([host(out.clone()), gr(&q), gr(&k), gr(&v)])
        };
        let case = format!(
            "{label} {dtype:?} causal attention b{b} g{g} rep{rep} s{s} d{d}{}",
            if padded { " padded" } else { "" }
        );
        let want = attention_reference(
            &host(q.clone()),
            &host(k.clone()),
            &host(v.clone()),
            &mask,
            &host(dout.clone()),
            (b * g, m, s, d),
            (mb, s),
            scale,
        );
        let mut runs = Vec::new();
        for blocks in [1, 2, 3] {
            runs.push((format!("{blocks} blocks"), run(blocks)));
        }
        ops::attention::set_score_chunk_elems(1);
        runs.push(("2 blocks, one group per chunk".into(), run(2)));
        ops::attention::set_score_chunk_elems(ops::attention::DEFAULT_SCORE_CHUNK_ELEMS);
        ops::set_keep_attention_probs(true);
        let kept = ops::attention::keeping_probs(|| run(2));
        let recomputed = runs[1].1.clone();
        runs.push(("2 blocks, probabilities kept".into(), kept.clone()));
        ops::set_causal_blocks(ops::DEFAULT_CAUSAL_BLOCKS);
        for (how, got) in &runs {
            let Some(got) = got else {
                checks.extend(not_taken::<B>(format!("{case}, {how}")));
                continue;
            };
            for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                checks.push(Check::fused(
                    format!("{case} {what}, {how}"),
                    rel_err(&got[i], &want[i]),
                    tolerance(dtype),
                ));
            }
        }
        if let (Some(kept), Some(base)) = (kept, recomputed) {
            for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                checks.push(Check::fused(
                    format!("{case} {what}, probabilities kept = recomputed"),
                    rel_err(&kept[i], &base[i]),
                    0.0,
                ));
            }
        }
    }
    ops::set_causal_attention_enabled(false);
    checks
}

/// `ops::rope_grouped` (the heads of a group position-major) against `ops::rope` rearranged, bit
/// for bit, forward and `dx`: the same arithmetic per element, written elsewhere.
fn check_rope_grouped<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    for (b, s, n, d, group) in [(2, 5, 8, 64, 4), (1, 7, 6, 12, 3), (2, 3, 4, 128, 2)] {
        let x = Tensor::<B, 3>::random([b, s, n * d], normal, opts).require_grad();
        let angles = Tensor::<B, 4>::random([b, 1, s, d], Distribution::Uniform(-4.0, 4.0), opts);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let dy = Tensor::<B, 4>::random([b, n / group, s * group, d], normal, opts);
        let case = format!("{label} {dtype:?} rope grouped {b}x{s}x{n}x{d} group {group}");
        let (Some(yg), Some(y)) = (
            ops::rope_grouped(&x, n, group, &cos, &sin),
            ops::rope(&x, n, &cos, &sin),
        ) else {
            return not_taken::<B>(case);
        };
        let gg = (yg.clone() * dy.clone()).sum().backward();
        let dx_g = host(x.grad(&gg).expect("dx"));
        // The head-major output rearranged, and the gradient rearranged back.
        let y = y.reshape([b, n / group, group * s, d]);
        let y_pm = position_major(y, group, s);
        let dy_hm = position_major(dy, s, group).reshape([b, n, s, d]);
        let x2 = x.clone().detach().require_grad();
        let y2 = ops::rope(&x2, n, &cos, &sin).expect("rope runs");
        let g2 = (y2 * dy_hm).sum().backward();
        let dx = host(x2.grad(&g2).expect("dx"));
        for (what, got, want) in [("y", host(yg), host(y_pm)), ("dx", dx_g, dx)] {
            checks.push(Check::fused(
                format!("{case} {what} = rope rearranged"),
                rel_err(&got, &want),
                0.0,
            ));
        }
    }
    checks
}

/// The fused head + cross-entropy (`ops::linear_cross_entropy`) against the f64 host
/// reference: the loss sum and `dh` for a loss gradient of 0.7, with chunks of 5 rows (so rows
/// cross chunk borders) and a transposed head view (a tied embedding), then with one chunk.
fn check_cross_entropy<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    for (n, hid, vocab, transposed, chunk_elems) in [
        (13, 32, 50, false, 5 * 50),
        (13, 32, 50, true, 5 * 50),
        (7, 64, 301, false, ops::cross_entropy::DEFAULT_CHUNK_ELEMS),
        // The log-sum-exp kernel's rows: 625 vectors of 8 over 256 units (three turns, the
        // last one part-filled), and an odd width (vectors of 1).
        (5, 32, 5000, false, ops::cross_entropy::DEFAULT_CHUNK_ELEMS),
        (4, 32, 4099, false, 2 * 4099),
    ] {
        ops::cross_entropy::set_chunk_elems(chunk_elems);
        let h = Tensor::<B, 2>::random([n, hid], normal, opts).require_grad();
        // A head's scale (logits of order 1, as from a normed hidden state): with N(0, 1) weights
        // the logits' spread is sqrt(hid), and rounding them to bf16 alone moved `dh` by up to
        // ~2% of its largest element on some draws (a failed check on an H100, 2026-12-06; a
        // host simulation of the bf16 roundings gives 1.2% mean, 2.1% worst of 40 draws, against
        // 0.35% / 0.6% at this scale).
        let head = Distribution::Normal(0.0, 1.0 / (hid as f64).sqrt());
        let w = if transposed {
            Tensor::<B, 2>::random([vocab, hid], head, opts).transpose()
        } else {
            Tensor::<B, 2>::random([hid, vocab], head, opts)
        };
        let targets: Vec<i64> = (0..n).map(|i| ((i * 37 + 11) % vocab) as i64).collect();
        let t = Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(targets.clone(), [n]),
            device,
        );
        let sum = ops::linear_cross_entropy(&h, &w, &t).expect("fused cross-entropy runs");
        let grads = (sum.clone() * 0.7).sum().backward();
        let dh = host(h.grad(&grads).expect("dh"));
        let (hh, wh) = (host(h.clone()), host(w.clone()));
        let (mut loss, mut dref) = (0f64, vec![0f32; n * hid]);
        for i in 0..n {
            let logits: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..hid)
                        .map(|e| hh[i * hid + e] as f64 * wh[e * vocab + v] as f64)
                        .sum()
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            loss += lse - logits[targets[i] as usize];
            for e in 0..hid {
                let mut acc = 0f64;
                for (v, l) in logits.iter().enumerate() {
                    let g = (l - lse).exp() - if v == targets[i] as usize { 1.0 } else { 0.0 };
                    acc += g * wh[e * vocab + v] as f64;
                }
                dref[i * hid + e] = (0.7 * acc) as f32;
            }
        }
        let dtype = h.dtype();
        let name = format!(
            "{label} {dtype:?} head+CE n{n} h{hid} V{vocab}{}{}",
            if transposed { " W^T-view" } else { "" },
            if chunk_elems < n * vocab {
                " chunked"
            } else {
                ""
            }
        );
        checks.push(Check::fused(
            format!("{name} loss"),
            rel_err(&host(sum), &[loss as f32]),
            tolerance(dtype),
        ));
        checks.push(Check::fused(
            format!("{name} dh"),
            rel_err(&dh, &dref),
            tolerance(dtype),
        ));
    }
    ops::cross_entropy::set_chunk_elems(ops::cross_entropy::DEFAULT_CHUNK_ELEMS);
    checks
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, in f64.
fn rstd_host(row: &[f32], eps: f64) -> f64 {
    let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / row.len() as f64;
    1.0 / (ms + eps).sqrt()
}

/// RMSNorm of the rows of `x` (each `w.len()` wide) in f64: `w x / sqrt(mean(x^2) + eps)`.
fn rms_norm_host(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    for (r, row) in x.chunks(h).enumerate() {
        let rs = rstd_host(row, eps);
        for j in 0..h {
            y[r * h + j] = (row[j] as f64 * rs * w[j] as f64) as f32;
        }
    }
    y
}

/// The fused RMSNorm (`ops::rms_norm`) against an f64 host reference: output and `dx` for an
/// output gradient, rows shorter and longer than the kernel's 256 threads.
fn check_rms_norm<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    // Widths of 6, 5 and 64 / 1000 / 4096: vectors of 2, 1 and 8.
    for (b, s, h) in [(2, 3, 6), (1, 2, 5), (2, 3, 64), (1, 5, 1000), (3, 7, 4096)] {
        let x = Tensor::<B, 3>::random([b, s, h], normal, opts).require_grad();
        let w = Tensor::<B, 1>::random([h], Distribution::Normal(1.0, 0.2), opts);
        let dy = Tensor::<B, 3>::random([b, s, h], normal, opts);
        let eps = 1e-5;
        let Some(y) = ops::rms_norm(&x, &w, eps) else {
            return not_taken::<B>(format!("{label} rms_norm"));
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let dx = host(x.grad(&grads).expect("dx"));
        let (xh, wh, gh) = (host(x.clone()), host(w.clone()), host(dy.clone()));
        let rows = b * s;
        let yr = rms_norm_host(&xh, &wh, eps);
        let mut dxr = vec![0f32; rows * h];
        for r in 0..rows {
            let xs = &xh[r * h..(r + 1) * h];
            let rs = rstd_host(xs, eps);
            let gx: f64 = (0..h)
                .map(|j| gh[r * h + j] as f64 * wh[j] as f64 * xs[j] as f64)
                .sum::<f64>()
                / h as f64;
            for j in 0..h {
                let g = gh[r * h + j] as f64 * wh[j] as f64;
                dxr[r * h + j] = (rs * g - rs.powi(3) * xs[j] as f64 * gx) as f32;
            }
        }
        let dtype = x.dtype();
        for (what, got, want) in [("y", host(y), yr), ("dx", dx, dxr)] {
            checks.push(Check::fused(
                format!("{label} {dtype:?} rms_norm {b}x{s}x{h} {what}"),
                rel_err(&got, &want),
                tolerance(dtype),
            ));
        }
    }
    checks
}

/// The residual add fused with RMSNorm (`ops::add_rms_norm`, inference: on the backend without
/// autodiff) against Burn's add (torch rounds the f32 sum to bf16, as the kernel does; Burn's
/// bf16 add may round once, hence the dtype's tolerance) and an f64 host norm of that sum.
fn check_add_rms_norm<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    for (b, s, h) in [
        (2, 3, 6),
        (1, 2, 5),
        (1, 5, 1000),
        (64, 1, 4096),
        (3, 7, 4096),
    ] {
        let x = Tensor::<I<B>, 3>::random([b, s, h], normal, opts);
        let d = Tensor::<I<B>, 3>::random([b, s, h], normal, opts);
        let w = Tensor::<I<B>, 1>::random([h], Distribution::Normal(1.0, 0.2), opts);
        let eps = 1e-5;
        let Some((sum, y)) = ops::add_rms_norm(&x, &d, &w, eps) else {
            return not_taken::<I<B>>(format!("{label} add_rms_norm"));
        };
        let (sh, wh) = (host(x.clone() + d.clone()), host(w.clone()));
        let yr = rms_norm_host(&sh, &wh, eps);
        let dtype = x.dtype();
        let name = format!("{label} {dtype:?} add_rms_norm {b}x{s}x{h}");
        checks.push(Check::fused(
            format!("{name} sum (against Burn's add)"),
            rel_err(&host(sum), &sh),
            tolerance(dtype),
        ));
        checks.push(Check::fused(
            format!("{name} y"),
            rel_err(&host(y), &yr),
            tolerance(dtype),
        ));
    }
    checks
}

/// RoPE of a cached step with its cache writes (`ops::rope_append`, inference) against the RoPE
/// op and Burn's `slice_assign` on the same inputs: the rotated queries, and both caches (the
/// new positions written, every other position kept). A shared cache is given back untouched.
fn check_rope_append<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    // [b, s, heads, kv_heads, d, capacity, pos]: the 8B decode step at batch 1 and 64, two
    // tokens mid-cache, no GQA up to the last position.
    for [b, s, nh, nkv, d, cap, pos] in [
        [1, 1, 32, 8, 128, 856, 600],
        [64, 1, 32, 8, 128, 856, 700],
        [3, 2, 4, 2, 64, 37, 20],
        [2, 3, 2, 2, 8, 10, 7],
    ] {
        let q = Tensor::<I<B>, 3>::random([b, s, nh * d], normal, opts);
        let k = Tensor::<I<B>, 3>::random([b, s, nkv * d], normal, opts);
        let v = Tensor::<I<B>, 3>::random([b, s, nkv * d], normal, opts);
        let cos = Tensor::<I<B>, 4>::random([b, 1, s, d], normal, opts);
        let sin = Tensor::<I<B>, 4>::random([b, 1, s, d], normal, opts);
        let kc = Tensor::<I<B>, 4>::random([b, nkv, cap, d], normal, opts);
        let vc = Tensor::<I<B>, 4>::random([b, nkv, cap, d], normal, opts);
        let name = format!(
            "{label} {dtype:?} rope_append b{b} s{s} {nh}/{nkv} heads d{d} cap{cap} pos{pos}"
        );
        let (Some(q_ref), Some(k_rot)) = (
            ops::rope(&q, nh, &cos, &sin),
            ops::rope(&k, nkv, &cos, &sin),
        ) else {
            return not_taken::<I<B>>(format!("{label} rope"));
        };
        let at = [0..b, 0..nkv, pos..pos + s, 0..d];
        let v_heads = v.clone().reshape([b, s, nkv, d]).swap_dims(1, 2);
        let k_ref = host(kc.clone().slice_assign(at.clone(), k_rot));
        let v_ref = host(vc.clone().slice_assign(at, v_heads));
        // Copies the op may write into (the originals stay for the reference above).
        let (kw, vw) = (kc.clone() * 1.0, vc.clone() * 1.0);
        let Ok((q_out, k_out, v_out)) = ops::rope_append(&q, &k, &v, &cos, &sin, kw, vw, pos)
        else {
            checks.push(Check::fused(
                format!("{name}: not taken"),
                f64::INFINITY,
                0.0,
            ));
            continue;
        };
        for (what, got, want) in [
            ("q", host(q_out), host(q_ref)),
            ("k cache", host(k_out), k_ref),
            ("v cache", host(v_out), v_ref),
        ] {
            checks.push(Check::fused(
                format!("{name} {what}"),
                rel_err(&got, &want),
                1e-6,
            ));
        }
        // A cache shared with another tensor is not written.
        let shared = kc.clone();
        let back = ops::rope_append(&q, &k, &v, &cos, &sin, kc.clone(), vc.clone() * 1.0, pos);
        let untouched = match back {
            Err((k_back, _)) => rel_err(&host(k_back), &host(shared)),
            Ok(_) => f64::INFINITY,
        };
        checks.push(Check::fused(
            format!("{name} shared cache given back"),
            untouched,
            0.0,
        ));
    }
    checks
}

/// Linears over one input as one op (`ops::shared_input_linear`, inference) against Burn's
/// composed `x W + s (x A) B` per part: weights as separate tensors and as the column views of
/// one packed buffer (the op's one-GEMM case), a low-rank term on some parts. Then the packed
/// output's column views fed to `rope_append` (q, k, v) and `swiglu` (gate, up) in place,
/// against the same ops on contiguous copies.
fn check_shared_input<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 0.05);
    let mut checks = Vec::new();
    ops::set_shared_input_enabled(true);
    // [n, in, outs, ranks (0: no term)]: the 8B q/k/v at batch 1 and 64 (q and v adapted), an
    // MLP's gate/up, odd small shapes.
    let cases: [(usize, usize, Vec<usize>, Vec<usize>); 4] = [
        (1, 4096, vec![4096, 1024, 1024], vec![8, 0, 8]),
        (64, 4096, vec![4096, 1024, 1024], vec![8, 0, 8]),
        (3, 4096, vec![14336, 14336], vec![0, 16]),
        (5, 96, vec![64, 32, 32], vec![0, 4, 0]),
    ];
    for (n, d_in, outs, ranks) in cases {
        let x = Tensor::<I<B>, 2>::random([n, d_in], Distribution::Normal(0.0, 1.0), opts);
        let total: usize = outs.iter().sum();
        let packed = Tensor::<I<B>, 2>::random([d_in, total], normal, opts);
        let mut off = 0;
        let mut views = Vec::new();
        for out in &outs {
            views.push(packed.clone().slice([0..d_in, off..off + out]));
            off += out;
        }
        let separate: Vec<Tensor<I<B>, 2>> = views.iter().map(|w| w.clone() * 1.0).collect();
        let adapters: Vec<_> = ranks
            .iter()
            .zip(&outs)
            .map(|(&r, &out)| {
                (r > 0).then(|| {
                    let a = Tensor::<I<B>, 2>::random([d_in, r], normal, opts);
                    let b = Tensor::<I<B>, 2>::random([r, out], normal, opts);
                    (a, b, 2.0)
                })
            })
            .collect();
        // The host reference (f64 sums) on the first and the last row: `x W_i + s (x A_i) B_i`
        // per part, with and without the low-rank terms.
        let xh = host(x.clone());
        let parts_h: Vec<_> = separate
            .iter()
            .zip(&adapters)
            .zip(&ranks)
            .map(|((w, lr), &r)| {
                let lr = lr
                    .as_ref()
                    .map(|(a, b, s)| (host(a.clone()), host(b.clone()), *s, r));
                (host(w.clone()), lr)
            })
            .collect();
        let check_rows = [0, n - 1];
        let reference = |with_terms: &dyn Fn(usize) -> bool| -> Vec<f32> {
            let mut out = Vec::new();
            for &row in &check_rows {
                let xr = &xh[row * d_in..(row + 1) * d_in];
                for ((w, lr), &o) in parts_h.iter().zip(&outs) {
                    let mut y = mm(xr, w, 1, d_in, o, false, false);
                    if let (Some((a, b, s, r)), true) = (lr, with_terms(row)) {
                        let xa = mm(xr, a, 1, d_in, *r, false, false);
                        let t = mm(&xa, b, 1, *r, o, false, false);
                        y.iter_mut()
                            .zip(t)
                            .for_each(|(y, t)| *y += (*s * t as f64) as f32);
                    }
                    out.extend(y);
                }
            }
            out
        };
        let want = reference(&|_| true);
        // The low-rank terms on the last half of the rows only (a routed block).
        let block = n / 2..n;
        let want_block = reference(&|row| block.contains(&row));
        let rows_of = |y: Vec<f32>| -> Vec<f32> {
            check_rows
                .iter()
                .flat_map(|&r| y[r * total..(r + 1) * total].to_vec())
                .collect()
        };
        for (layout, ws, rows) in [
            ("separate", &separate, None),
            ("packed", &views, None),
            (
                "packed, terms on a block of rows",
                &views,
                Some(block.clone()),
            ),
        ] {
            let parts: Vec<ops::SharedLinear<'_, I<B>>> = ws
                .iter()
                .zip(&adapters)
                .map(|(w, lr)| ops::SharedLinear {
                    w,
                    bias: None,
                    low_rank: lr.as_ref().map(|(a, b, s)| (a, b, *s)),
                    rows: rows.clone(),
                })
                .collect();
            let Some(y) = ops::shared_input_linear(&x, &parts) else {
                return not_taken::<I<B>>(format!("{label} shared_input_linear"));
            };
            let want = if rows.is_some() { &want_block } else { &want };
            checks.push(Check::fused(
                format!(
                    "{label} {dtype:?} shared_input_linear {n}x{d_in} -> {outs:?} {layout} \
                     (rows 0 and {}, host reference)",
                    n - 1
                ),
                rel_err(&rows_of(host(y)), want),
                tolerance(dtype),
            ));
        }
    }
    // The packed output's column views read in place by rope_append and swiglu.
    // Column offsets on cubecl's 512-byte alignment, so the slices are views (else copies).
    let (b, nh, nkv, d, cap, pos) = (2, 4, 4, 64, 9, 3);
    let w = (nh + 2 * nkv) * d;
    let qkv = Tensor::<I<B>, 3>::random([b, 1, w], Distribution::Normal(0.0, 1.0), opts);
    let col = |t: &Tensor<I<B>, 3>, from: usize, to: usize| t.clone().slice([0..b, 0..1, from..to]);
    let (q, k, v) = (
        col(&qkv, 0, nh * d),
        col(&qkv, nh * d, (nh + nkv) * d),
        col(&qkv, (nh + nkv) * d, w),
    );
    let cos = Tensor::<I<B>, 4>::random([b, 1, 1, d], Distribution::Normal(0.0, 1.0), opts);
    let sin = Tensor::<I<B>, 4>::random([b, 1, 1, d], Distribution::Normal(0.0, 1.0), opts);
    let cache = || Tensor::<I<B>, 4>::zeros([b, nkv, cap, d], opts);
    let dense = |t: &Tensor<I<B>, 3>| t.clone() * 1.0;
    let run = |q: &Tensor<I<B>, 3>, k: &Tensor<I<B>, 3>, v: &Tensor<I<B>, 3>| {
        ops::rope_append(q, k, v, &cos, &sin, cache(), cache(), pos).ok()
    };
    match (run(&q, &k, &v), run(&dense(&q), &dense(&k), &dense(&v))) {
        (Some(got), Some(want)) => {
            for (what, g, w) in [
                ("q", got.0, want.0),
                ("k", got.1, want.1),
                ("v", got.2, want.2),
            ] {
                checks.push(Check::fused(
                    format!("{label} {dtype:?} rope_append of packed column views {what}"),
                    rel_err(&host(g), &host(w)),
                    0.0,
                ));
            }
        }
        _ => checks.extend(not_taken::<I<B>>(format!("{label} rope_append (views)"))),
    }
    let gu = Tensor::<I<B>, 2>::random([7, 2 * 1536], Distribution::Normal(0.0, 2.0), opts);
    let (g, u) = (
        gu.clone().slice([0..7, 0..1536]),
        gu.slice([0..7, 1536..3072]),
    );
    let as3 = |t: Tensor<I<B>, 2>| t.reshape([1, 7, 1536]);
    match (
        ops::swiglu(&as3(g.clone()), &as3(u.clone())),
        ops::swiglu(&as3(g * 1.0), &as3(u * 1.0)),
    ) {
        (Some(got), Some(want)) => checks.push(Check::fused(
            format!("{label} {dtype:?} swiglu of packed column views"),
            rel_err(&host(got), &host(want)),
            0.0,
        )),
        _ => checks.extend(not_taken::<I<B>>(format!("{label} swiglu (views)"))),
    }
    ops::set_shared_input_enabled(false);
    checks
}

/// An int tensor's queued read (`ops::start_read`) with more work queued behind it before the
/// wait: the ids equal Burn's own read, on the raw backend (the autodiff one reads through it).
fn check_start_read<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let opts = (device, dtype);
    let mut checks = Vec::new();
    ops::set_queued_read_enabled(true);
    for n in [1usize, 64, 100_003] {
        let x = Tensor::<I<B>, 2>::random([n, 7], Distribution::Normal(0.0, 1.0), opts);
        let ids = x.clone().argmax(1).reshape([n]);
        let want: Vec<i64> = ids
            .clone()
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("ids");
        let Ok(read) = ops::start_read(ids) else {
            return not_taken::<I<B>>(format!("{label} start_read"));
        };
        // Work queued after the read started; the wait does not need it.
        let busy = Tensor::<I<B>, 2>::random([2048, 2048], Distribution::Default, opts);
        let _later = busy.clone().matmul(busy);
        let got: Vec<i64> = read
            .wait()
            .expect("read")
            .convert::<i64>()
            .to_vec()
            .expect("ids");
        let wrong =
            got.iter().zip(&want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        checks.push(Check::fused(
            format!("{label} {dtype:?} start_read {n} ids (ids wrong)"),
            wrong as f64,
            0.0,
        ));
    }
    checks
}

/// The fused SwiGLU gate (`ops::swiglu`) against an f64 host reference: output and both input
/// gradients, element counts that do and do not fill the last cube.
fn check_swiglu<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 2.0);
    let mut checks = Vec::new();
    // 15, 18, 14,000 and 176,128 elements: vectors of 1, 2 and 8.
    for (b, s, i) in [(1, 3, 5), (1, 3, 6), (2, 7, 1000), (2, 64, 1376)] {
        let gate = Tensor::<B, 3>::random([b, s, i], normal, opts).require_grad();
        let up = Tensor::<B, 3>::random([b, s, i], normal, opts).require_grad();
        let dy = Tensor::<B, 3>::random([b, s, i], normal, opts);
        let Some(y) = ops::swiglu(&gate, &up) else {
            return not_taken::<B>(format!("{label} swiglu"));
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let dg = host(gate.grad(&grads).expect("dgate"));
        let du = host(up.grad(&grads).expect("dup"));
        let (gh, uh, dh) = (host(gate.clone()), host(up.clone()), host(dy.clone()));
        let n = b * s * i;
        let (mut yr, mut dgr, mut dur) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        for e in 0..n {
            let (g, u, d) = (gh[e] as f64, uh[e] as f64, dh[e] as f64);
            let sig = 1.0 / (1.0 + (-g).exp());
            yr[e] = (g * sig * u) as f32;
            dur[e] = (d * g * sig) as f32;
            dgr[e] = (d * u * sig * (1.0 + g * (1.0 - sig))) as f32;
        }
        let dtype = gate.dtype();
        for (what, got, want) in [("y", host(y), yr), ("dgate", dg, dgr), ("dup", du, dur)] {
            checks.push(Check::fused(
                format!("{label} {dtype:?} swiglu {b}x{s}x{i} {what}"),
                rel_err(&got, &want),
                tolerance(dtype),
            ));
        }
    }
    checks
}

/// The fused RoPE + head split (`ops::rope`) against an f64 host reference: output and `dx`,
/// with per-batch position tables as the model builds them.
fn check_rope<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    // Half heads of 3, 6, 4, 64 and 32 elements: vectors of 1, 2, 4 and 8.
    for (b, s, n, d) in [
        (1, 2, 3, 6),
        (1, 3, 2, 12),
        (2, 3, 4, 8),
        (1, 5, 32, 128),
        (2, 7, 8, 64),
    ] {
        let x = Tensor::<B, 3>::random([b, s, n * d], normal, opts).require_grad();
        let angles = Tensor::<B, 4>::random([b, 1, s, d], Distribution::Uniform(-4.0, 4.0), opts);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let dy = Tensor::<B, 4>::random([b, n, s, d], normal, opts);
        let Some(y) = ops::rope(&x, n, &cos, &sin) else {
            return not_taken::<B>(format!("{label} rope"));
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let dx = host(x.grad(&grads).expect("dx"));
        let (xh, ch, sh, gh) = (host(x.clone()), host(cos), host(sin), host(dy.clone()));
        let half = d / 2;
        let (mut yr, mut dxr) = (vec![0f32; b * s * n * d], vec![0f32; b * s * n * d]);
        for bi in 0..b {
            for si in 0..s {
                let cs = (bi * s + si) * d;
                for ni in 0..n {
                    let xin = ((bi * s + si) * n + ni) * d;
                    let out = ((bi * n + ni) * s + si) * d;
                    for j in 0..d {
                        let (c, sn) = (ch[cs + j] as f64, sh[cs + j] as f64);
                        let rot = if j < half {
                            -(xh[xin + j + half] as f64)
                        } else {
                            xh[xin + j - half] as f64
                        };
                        yr[out + j] = (xh[xin + j] as f64 * c + rot * sn) as f32;
                        let back = if j < half {
                            gh[out + j + half] as f64 * sh[cs + j + half] as f64
                        } else {
                            -(gh[out + j - half] as f64) * sh[cs + j - half] as f64
                        };
                        dxr[xin + j] = (gh[out + j] as f64 * c + back) as f32;
                    }
                }
            }
        }
        let dtype = x.dtype();
        for (what, got, want) in [("y", host(y), yr), ("dx", dx, dxr)] {
            checks.push(Check::fused(
                format!("{label} {dtype:?} rope {b}x{s}x{n}x{d} {what}"),
                rel_err(&got, &want),
                tolerance(dtype),
            ));
        }
    }
    checks
}

/// `torch.optim.AdamW`'s rule for one element in f64: `(p, m, v)` after a clipped, decayed,
/// bias-corrected step (the host reference of the AdamW checks).
fn adamw_reference(
    p: f64,
    g: f64,
    m: f64,
    v: f64,
    clip: f64,
    h: &ops::AdamWStep,
) -> (f64, f64, f64) {
    let f = |x: f32| x as f64;
    let g = g * clip;
    let m = f(h.betas.0) * m + (1.0 - f(h.betas.0)) * g;
    let v = f(h.betas.1) * v + (1.0 - f(h.betas.1)) * g * g;
    let denom = (v / f(h.bias_corrections.1)).sqrt() + f(h.eps);
    let decayed = p * (1.0 - f(h.lr) * f(h.weight_decay));
    (
        decayed - f(h.lr) * m / f(h.bias_corrections.0) / denom,
        m,
        v,
    )
}

/// The global gradient norm's sum of squares over 45 tensors of the 8B model's adapter shapes
/// and odd ones (two launches of the multi-tensor kernel: 32 tensors, then 13, each run at its
/// base in the partials) against the f64 host sum, with the multi-tensor launches on and off,
/// and the norm `grad_scale` keeps on the device from the multi-tensor partials; in bf16, the
/// master updates of all 45 as runs of up to 8 a launch against one launch each.
fn check_sums_many<B: Backend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let shapes = [
        (4096, 8),
        (8, 4096),
        (4096, 16),
        (16, 14336),
        (14336, 16),
        (3, 5),
        (1, 1),
    ];
    let ts: Vec<Tensor<B, 2>> = (0..45)
        .map(|k| {
            let (r, c) = shapes[k % shapes.len()];
            let sd = 1e-3 * (1.0 + k as f64);
            Tensor::random([r, c], Distribution::Normal(0.0, sd), (device, dtype))
        })
        .collect();
    let want: f64 = ts
        .iter()
        .flat_map(|t| host(t.clone()))
        .map(|x| (x as f64).powi(2))
        .sum();
    let mut checks = Vec::new();
    // The master updates of all 45 (bf16 gradients only: f32 ones go one by one) in runs of
    // up to 8 a launch, against one launch each, bit for bit; `None` with the switch off.
    if dtype == DType::BF16 {
        let f32_of = |t: &Tensor<B, 2>| t.clone().cast(burn::tensor::FloatDType::F32);
        let items: Vec<ops::MasterUpdate<B>> = ts
            .iter()
            .map(|g| {
                let p = f32_of(g) * 3.0 + 0.01;
                let m = f32_of(g) * 0.1;
                let v = (f32_of(g) * f32_of(g)) * 0.01;
                (p, g.clone(), m, v)
            })
            .collect();
        let h = ops::AdamWStep {
            betas: (0.9, 0.999),
            lr: 2e-4,
            weight_decay: 0.01,
            eps: 1e-8,
            bias_corrections: (1.0 - 0.9f32.powi(3), 1.0 - 0.999f32.powi(3)),
        };
        let Some(gs) = ops::grad_scale(&ts, Some(0.5)) else {
            return not_taken::<B>(format!("{label} adamw master, many tensors"));
        };
        let off = ops::adamw_update_master_many(&items, &gs.scale, h, dtype).is_none();
        ops::set_multi_tensor_enabled(true);
        let many = ops::adamw_update_master_many(&items, &gs.scale, h, dtype);
        ops::set_multi_tensor_enabled(false);
        let Some(many) = many else {
            return not_taken::<B>(format!("{label} adamw master, many tensors"));
        };
        let mut err = 0f64;
        for ((p, g, m, v), (p2, m2, v2, low2)) in items.iter().zip(many) {
            let Some((p1, m1, v1, low1)) =
                ops::adamw_update_master(p, g, m, v, &gs.scale, h, dtype)
            else {
                return not_taken::<B>(format!("{label} adamw master, one tensor"));
            };
            for (a, b) in [(p1, p2), (m1, m2), (v1, v2), (low1, low2)] {
                err = err.max(rel_err(&host(b), &host(a)));
            }
        }
        checks.push(Check::fused(
            format!("{label} {dtype:?} adamw master of 45 tensors, 8 a launch vs one each"),
            err,
            0.0,
        ));
        checks.push(Check::fused(
            format!("{label} {dtype:?} adamw master many: None with the switch off (0 = yes)"),
            f64::from(u8::from(!off)),
            0.0,
        ));
    }
    for multi in [true, false] {
        ops::set_multi_tensor_enabled(multi);
        let got = ops::sum_of_squares(&ts);
        let norm = ops::grad_scale(&ts, None).map(|g| host(g.norm));
        ops::set_multi_tensor_enabled(false);
        let (Some(got), Some(norm)) = (got, norm) else {
            return not_taken::<B>(format!("{label} sums of squares, many tensors"));
        };
        let how = if multi {
            "one launch per 32"
        } else {
            "one launch each"
        };
        checks.push(Check::fused(
            format!("{label} {dtype:?} sum of squares of 45 tensors, {how}"),
            rel_err(&[got as f32], &[want as f32]),
            tolerance(dtype),
        ));
        checks.push(Check::fused(
            format!("{label} {dtype:?} grad_scale norm of 45 tensors, {how}"),
            rel_err(&norm, &[want.sqrt() as f32]),
            tolerance(dtype),
        ));
    }
    checks
}

/// The one-kernel AdamW update (`ops::adamw_update`) against an f64 host reference of
/// `torch.optim.AdamW`'s rule: parameter and both moments after a clipped, decayed step; the
/// fused sum of squares behind the global gradient norm; and the norm and clip factor kept on
/// the device (`ops::grad_scale`), which the update reads.
fn check_adamw<B: Backend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let mut checks = Vec::new();
    // The last two: an adapter B of the 8B MLP (56 cubes in the sum of squares), and a tensor
    // past its 1024-cube cap (a grid-stride loop).
    for (rows, cols, t) in [(8, 3, 1), (4096, 16, 7), (16, 14336, 3), (2048, 4100, 2)] {
        let rand =
            |sd: f64| Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, sd), opts);
        let (p, g, m) = (rand(0.02), rand(1e-3), rand(1e-4));
        let v = rand(1e-6).abs();
        let h = ops::AdamWStep {
            betas: (0.9, 0.999),
            lr: 2e-4,
            weight_decay: 0.01,
            eps: 1e-8,
            bias_corrections: (1.0 - 0.9f32.powi(t), 1.0 - 0.999f32.powi(t)),
        };
        let (gh, mh) = (host(g.clone()), host(m.clone()));
        let want: f64 = gh.iter().chain(&mh).map(|x| (*x as f64).powi(2)).sum();
        // Clipped to 0.7 of the norm of (g, m), the norm and the factor left on the device.
        let max_norm = 0.7 * want.sqrt();
        let clip = max_norm / (want.sqrt() + 1e-6);
        let (Some(norm2), Some(gs)) = (
            ops::sum_of_squares(&[g.clone(), m.clone()]),
            ops::grad_scale(&[g.clone(), m.clone()], Some(max_norm)),
        ) else {
            return not_taken::<B>(format!("{label} adamw"));
        };
        let Some((p2, m2, v2)) = ops::adamw_update(&p, &g, &m, &v, &gs.scale, h) else {
            return not_taken::<B>(format!("{label} adamw"));
        };
        let (ph, vh) = (host(p), host(v));
        let n = rows * cols;
        let (mut pr, mut mr, mut vr) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        for i in 0..n {
            let (pi, mi, vi) = adamw_reference(
                ph[i] as f64,
                gh[i] as f64,
                mh[i] as f64,
                vh[i] as f64,
                clip,
                &h,
            );
            (pr[i], mr[i], vr[i]) = (pi as f32, mi as f32, vi as f32);
        }
        checks.push(Check::fused(
            format!("{label} {dtype:?} sum of squares {rows}x{cols} x2"),
            rel_err(&[norm2 as f32], &[want as f32]),
            tolerance(dtype),
        ));
        checks.push(Check::fused(
            format!("{label} {dtype:?} grad_scale norm {rows}x{cols} x2"),
            rel_err(&host(gs.norm), &[want.sqrt() as f32]),
            tolerance(dtype),
        ));
        checks.push(Check::fused(
            format!("{label} {dtype:?} grad_scale clip factor {rows}x{cols} x2"),
            rel_err(&host(gs.scale), &[clip as f32]),
            tolerance(dtype),
        ));
        // The step moves p by far less than p: compare the step itself, not p, in relative
        // terms. Device and reference each round the new p to f32, so the step carries up to
        // one unit in the last place of p either side on top of the arithmetic's error.
        let step = |a: &[f32]| -> Vec<f32> { a.iter().zip(&ph).map(|(x, p0)| x - p0).collect() };
        let (got_step, want_step) = (step(&host(p2)), step(&pr));
        let p_max = ph.iter().fold(0f32, |a, x| a.max(x.abs()));
        let step_max = want_step.iter().fold(0f32, |a, x| a.max(x.abs()));
        let ulp = 2f64.powi(p_max.log2().floor() as i32 - 23);
        let step_tol = tolerance(dtype) + 2.0 * ulp / (step_max as f64).max(1e-30);
        for (what, got, want, tol) in [
            ("p - p0", got_step, want_step, step_tol),
            ("m", host(m2), mr, tolerance(dtype)),
            ("v", host(v2), vr, tolerance(dtype)),
        ] {
            checks.push(Check::fused(
                format!("{label} {dtype:?} adamw {rows}x{cols} t{t} {what}"),
                rel_err(&got, &want),
                tol,
            ));
        }
    }
    checks
}

/// The hashed dropout (`ops::dropout`): the device mask equals the host hash for the drawn
/// seed, re-seeding reproduces it and the next call draws another, the kept share is `1 - p`
/// within six standard deviations, and output and `dx` are `x / (1 - p)`, `dy / (1 - p)` where
/// kept and zero elsewhere.
/// Two shapes: 8 elements per unit, and an odd size (one per unit): the same mask either way.
fn check_hashed_dropout<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    [(2048, 1000), (999, 1001)]
        .into_iter()
        .flat_map(|(rows, cols)| hashed_dropout_case::<B>(label, dtype, device, rows, cols))
        .collect()
}

fn hashed_dropout_case<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
    rows: usize,
    cols: usize,
) -> Vec<Check> {
    let opts = (device, dtype);
    let p = 0.1;
    let n = rows * cols;
    let x =
        Tensor::<B, 2>::random([rows, cols], Distribution::Uniform(1.0, 2.0), opts).require_grad();
    let dy = Tensor::<B, 2>::random([rows, cols], Distribution::Uniform(1.0, 2.0), opts);
    // A restartable seed stream, as a caller keeps one (seeds 42, 43, ...).
    let mut next = 42u64;
    let mut seed = || {
        next += 1;
        next - 1
    };
    let mask = ops::dropout::DropMask::new(p, 42);
    let (Some(y), Some(again)) = (
        ops::dropout(&x, p, &mut seed),
        ops::dropout(&x, p, &mut seed),
    ) else {
        return not_taken::<B>(format!("{label} hashed dropout"));
    };
    let Some(replay) = ops::dropout(&x, p, || 42) else {
        return not_taken::<B>(format!("{label} hashed dropout replay"));
    };
    let grads = (y.clone() * dy.clone()).sum().backward();
    let dx = host(x.grad(&grads).expect("dx"));
    let (xh, gh, yh) = (host(x.clone()), host(dy), host(y));
    let (mut yr, mut dxr, mut wrong, mut kept) = (vec![0f32; n], vec![0f32; n], 0usize, 0usize);
    let scale = 1.0 / (1.0 - p);
    for i in 0..n {
        let keep = mask.keeps(i as u32);
        kept += keep as usize;
        wrong += (keep != (yh[i] != 0.0)) as usize;
        if keep {
            yr[i] = (xh[i] as f64 * scale) as f32;
            dxr[i] = (gh[i] as f64 * scale) as f32;
        }
    }
    let differs = host(again)
        .iter()
        .zip(&yh)
        .filter(|(a, b)| (**a == 0.0) != (**b == 0.0))
        .count();
    let sigma = (p * (1.0 - p) / n as f64).sqrt();
    let name = |what: &str| format!("{label} {dtype:?} hashed dropout {rows}x{cols} p{p} {what}");
    vec![
        Check::fused(name("mask vs host hash (mismatches)"), wrong as f64, 0.0),
        Check::fused(
            name("re-seeded replay (relative difference)"),
            rel_err(&host(replay), &yh),
            0.0,
        ),
        Check::fused(
            name("next call draws another mask (1 - share of differing positions)"),
            1.0 - differs as f64 / n as f64 / (2.0 * p * (1.0 - p)),
            0.05,
        ),
        Check::fused(
            name("kept share vs 1 - p (|difference|)"),
            (kept as f64 / n as f64 - (1.0 - p)).abs(),
            6.0 * sigma,
        ),
        Check::fused(name("y"), rel_err(&yh, &yr), tolerance(dtype)),
        Check::fused(name("dx"), rel_err(&dx, &dxr), tolerance(dtype)),
    ]
}

/// A step whose gradient norm is not finite (one NaN in the gradient): `ops::grad_scale` gives
/// a NaN norm and the factor -1, and both update kernels then return the parameter, the moments
/// (and the master's rounding) exactly as they were; without clipping a finite norm gives 1.
fn check_grad_scale_skip<B: Backend>(label: &str, _: DType, device: &B::Device) -> Vec<Check> {
    let f32s = (device, DType::F32);
    let (rows, cols) = (64, 48);
    let rand = |sd: f64| Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, sd), f32s);
    let (p, m) = (rand(0.02), rand(1e-4));
    let v = rand(1e-6).abs();
    let mut gh = host(rand(1e-3));
    let name = |what: &str| format!("{label} grad_scale non-finite {rows}x{cols} {what}");
    let Some(finite) = ops::grad_scale(
        &[Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(gh.clone(), [rows, cols]),
            f32s,
        )],
        None,
    ) else {
        return not_taken::<B>(name("factor"));
    };
    gh[rows * cols / 2] = f32::NAN;
    let g = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(gh, [rows, cols]), f32s);
    let Some(gs) = ops::grad_scale(&[g.clone(), m.clone()], Some(1.0)) else {
        return not_taken::<B>(name("factor"));
    };
    let h = ops::AdamWStep {
        betas: (0.9, 0.999),
        lr: 2e-4,
        weight_decay: 0.01,
        eps: 1e-8,
        bias_corrections: (0.1, 0.001),
    };
    let (Some((p2, m2, v2)), Some((mp, mm, mv, low))) = (
        ops::adamw_update(&p, &g, &m, &v, &gs.scale, h),
        ops::adamw_update_master(&p, &g, &m, &v, &gs.scale, h, DType::BF16),
    ) else {
        return not_taken::<B>(name("update"));
    };
    let norm_nan = f64::from(u8::from(!host(gs.norm)[0].is_nan()));
    let (ph, mh, vh) = (host(p.clone()), host(m), host(v));
    let rounded: Vec<f32> = ph
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    vec![
        Check::fused(
            name("no clip: factor 1"),
            rel_err(&host(finite.scale), &[1.0]),
            0.0,
        ),
        Check::fused(name("norm is NaN (0 = yes)"), norm_nan, 0.0),
        Check::fused(name("factor -1"), rel_err(&host(gs.scale), &[-1.0]), 0.0),
        Check::fused(name("p kept"), rel_err(&host(p2), &ph), 0.0),
        Check::fused(name("m kept"), rel_err(&host(m2), &mh), 0.0),
        Check::fused(name("v kept"), rel_err(&host(v2), &vh), 0.0),
        Check::fused(name("master kept"), rel_err(&host(mp), &ph), 0.0),
        Check::fused(name("master m kept"), rel_err(&host(mm), &mh), 0.0),
        Check::fused(name("master v kept"), rel_err(&host(mv), &vh), 0.0),
        Check::fused(
            name("bf16 parameter = master rounded"),
            rel_err(&host(low), &rounded),
            0.0,
        ),
    ]
}

/// AdamW on the f32 master of a bf16 parameter (`ops::adamw_update_master`): three chained
/// steps against an f64 host reference (master and moments), the bf16 parameter equal to the
/// master rounded, and the master keeping steps far below one bf16 unit in the last place.
fn check_adamw_master<B: Backend>(label: &str, device: &B::Device) -> Vec<Check> {
    let f32s = (device, DType::F32);
    let (rows, cols) = (4096, 16);
    let n = rows * cols;
    // Weights near 1 (a bf16 ulp of 2^-7) and a step size of 1e-5: each step is ~1/800 of a
    // bf16 ulp, so an update of the bf16 weight itself would leave it unchanged (total step 0,
    // relative error 1 below); the master must hold every step.
    let p0 = Tensor::<B, 2>::random([rows, cols], Distribution::Uniform(1.0, 1.5), f32s);
    let (mut p, mut m, mut v) = (p0.clone(), p0.zeros_like(), p0.zeros_like());
    let (mut pr, mut mr, mut vr): (Vec<f64>, Vec<f64>, Vec<f64>) = (
        host(p0.clone()).iter().map(|x| *x as f64).collect(),
        vec![0.0; n],
        vec![0.0; n],
    );
    let mut low = None;
    for t in 1..=3 {
        // bf16 gradients (one kernel), and f32 ones at the last step (summed micro-batches).
        let g_dtype = if t == 3 { DType::F32 } else { DType::BF16 };
        let g = Tensor::<B, 2>::random(
            [rows, cols],
            Distribution::Normal(0.0, 1e-3),
            (device, g_dtype),
        );
        let h = ops::AdamWStep {
            betas: (0.9, 0.999),
            lr: 1e-5,
            weight_decay: 0.01,
            eps: 1e-8,
            bias_corrections: (1.0 - 0.9f32.powi(t), 1.0 - 0.999f32.powi(t)),
        };
        let scale =
            Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(vec![0.7f32], [1]), f32s);
        let Some((p2, m2, v2, l)) =
            ops::adamw_update_master(&p, &g, &m, &v, &scale, h, DType::BF16)
        else {
            return not_taken::<B>(format!("{label} adamw master"));
        };
        for (i, gi) in host(g).iter().enumerate() {
            (pr[i], mr[i], vr[i]) = adamw_reference(pr[i], *gi as f64, mr[i], vr[i], 0.7, &h);
        }
        (p, m, v, low) = (p2, m2, v2, Some(l));
    }
    let Some(low) = low else {
        return not_taken::<B>(format!("{label} adamw master"));
    };
    let ph0 = host(p0);
    let name = |what: &str| format!("{label} bf16 adamw master {rows}x{cols} t3 {what}");
    let (got_p, low_dtype, low_h) = (host(p), low.dtype(), host(low));
    let narrow = |x: &[f64]| x.iter().map(|v| *v as f32).collect::<Vec<_>>();
    // The total step against the reference, as in `check_adamw` (3 roundings of p).
    let step = |a: &[f32]| -> Vec<f32> { a.iter().zip(&ph0).map(|(x, p0)| x - p0).collect() };
    let (got_step, want_step) = (step(&got_p), step(&narrow(&pr)));
    let step_max = want_step.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let step_tol = 1e-4 + 3.0 * 2f64.powi(-23) / step_max.max(1e-30);
    let rounded: Vec<f32> = got_p
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    vec![
        Check::fused(
            name("master - p0"),
            rel_err(&got_step, &want_step),
            step_tol,
        ),
        Check::fused(name("m"), rel_err(&host(m), &narrow(&mr)), 1e-4),
        Check::fused(name("v"), rel_err(&host(v), &narrow(&vr)), 1e-4),
        Check::fused(
            name("parameter dtype is bf16 (0 = yes)"),
            f64::from(u8::from(low_dtype != DType::BF16)),
            0.0,
        ),
        Check::fused(
            name("parameter = master rounded"),
            rel_err(&low_h, &rounded),
            0.0,
        ),
    ]
}

/// Host offload ([`ops::offload`]): tensors parked in pinned memory while the device reuses
/// their buffers (same-size tensors written right after each release), then prefetched and
/// restored in reverse order, as the checkpointed backward does, must come back bit for bit.
/// One tensor is restored without its device copy released (handed back as is).
fn check_offload<B: Backend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let (n, shape) = (6, [2, 1000, 1536]);
    let mut originals = Vec::new();
    let mut parked = Vec::new();
    let mut noise = Vec::new();
    for i in 0..n {
        let t = Tensor::<B, 3>::random(shape, normal, opts);
        originals.push(host(t.clone()));
        let mut p = match ops::offload(t) {
            Ok(p) => p,
            Err(_) => {
                return vec![Check::fused(
                    format!("{label} {dtype:?} offload: not taken"),
                    1.0,
                    0.0,
                )]
            }
        };
        if i + 1 < n {
            p.release_device();
        }
        parked.push(p);
        // Same-size work right away: the pool hands out the released buffers.
        noise.push(Tensor::<B, 3>::random(shape, normal, opts) * 3.0);
    }
    drop(noise);
    let mut worst = 0f64;
    while let Some(p) = parked.pop() {
        if let Some(before) = parked.last_mut() {
            before.prefetch();
        }
        let t = p.restore();
        // Work on the restored tensor and on fresh same-size buffers before reading it.
        let _busy = Tensor::<B, 3>::random(shape, normal, opts) + t.clone();
        let got = host(t);
        let want = &originals[parked.len()];
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| match f64::from((a - b).abs()) {
                d if d.is_nan() => f64::INFINITY,
                d => d,
            })
            .fold(0f64, f64::max);
        worst = worst.max(d);
    }
    vec![Check::fused(
        format!("{label} {dtype:?} offload: {n} tensors of {shape:?} parked, reused, restored (max abs diff)"),
        worst,
        0.0,
    )]
}

type Gpu = Cuda<bf16>;

/// A suite: checks for one label and element type.
/// Greedy decoding's argmax kernel against the host's argmax of the same values (the first index
/// of each row's maximum): a vocabulary-wide row, odd widths, ties, and Burn's `argmax` beside it.
fn check_argmax<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let mut checks = Vec::new();
    ops::set_argmax_kernel_enabled(true);
    for (rows, width) in [(64, 128_256), (3, 1_003), (70_000, 8), (1, 128_256)] {
        // Integers in a small range: many ties, exact in bf16.
        let x =
            Tensor::<B, 2>::random([rows, width], Distribution::Uniform(-40.0, 40.0), opts).round();
        let Some(got) = ops::argmax_rows(&x) else {
            return not_taken::<B>(format!("{label} argmax"));
        };
        let got: Vec<i64> = got
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("argmax ids");
        let burn: Vec<i64> = x
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("ids");
        let xh = host(x);
        let mut wrong = 0usize;
        let mut burn_wrong = 0usize;
        for r in 0..rows {
            let row = &xh[r * width..(r + 1) * width];
            let mut at = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[at] {
                    at = i;
                }
            }
            wrong += usize::from(got[r] != at as i64);
            burn_wrong += usize::from(burn[r] != at as i64);
        }
        checks.push(Check {
            name: format!(
                "{label} {dtype:?} argmax {rows}x{width} (rows wrong; Burn's argmax beside)"
            ),
            err_fused: wrong as f64,
            err_composed: burn_wrong as f64,
            tol: 0.0,
        });
    }
    checks
}

/// Sampling's kernel against transformers' processors on the host (`test_support::sampling`):
/// each drawn token must be one they keep, and its row's uniform must fall inside the token's
/// span of the kept CDF (within 2e-5). Vocabulary-wide rows at batch 64 and 1, an odd width,
/// and a suppressed (`-inf`) column.
fn check_sample<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let mut checks = Vec::new();
    ops::set_sample_kernel_enabled(true);
    for (rows, width) in [(64, 128_256), (1, 128_256), (5, 1_003)] {
        let x = Tensor::<B, 2>::random([rows, width], Distribution::Normal(0.0, 3.0), opts);
        let x = x.slice_fill([0..rows, 7..8], f32::NEG_INFINITY);
        let xh = host(x.clone());
        let uh: Vec<f32> = (0..rows)
            .map(|r| ((r * 37 + 11) % 101) as f32 / 101.0)
            .collect();
        let u = Tensor::<B, 1>::from_data(
            burn::tensor::TensorData::new(uh.clone(), [rows]),
            (device, DType::F32),
        );
        for (t, k, p) in [
            (0.6f32, 50usize, 0.9f32),
            (1.0, 0, 1.0),
            (1.3, 0, 0.5),
            (0.8, 5, 1.0),
        ] {
            let params = ops::sample::SampleParams {
                temperature: t,
                top_k: k,
                top_p: p,
            };
            let Some(got) = ops::sample_rows(&x, &u, params) else {
                return not_taken::<B>(format!("{label} sample"));
            };
            let got: Vec<i64> = got
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("sampled ids");
            let mut wrong = 0usize;
            for r in 0..rows {
                let kept = sampling::kept(&xh[r * width..(r + 1) * width], t, k, p as f64);
                let uu = uh[r].min(ops::sample::U_MAX) as f64;
                let ok = usize::try_from(got[r])
                    .ok()
                    .and_then(|id| sampling::span(&kept, id))
                    .is_some_and(|(a, b)| a - 2e-5 <= uu && uu <= b + 2e-5);
                wrong += usize::from(!ok);
            }
            checks.push(Check::fused(
                format!("{label} {dtype:?} sample {rows}x{width} t {t} top_k {k} top_p {p} (rows wrong)"),
                wrong as f64,
                0.0,
            ));
        }
    }
    checks
}

/// The heads-merging op (`ops::merge_heads`, `PEFT_LORA_MERGE_HEADS`) against Burn's copy of the
/// transposed view: the output and the input's gradient, bit for bit (a copy either way).
fn check_merge_heads<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    ops::set_merge_heads_enabled(true);
    // The 8B training shape, rows of 64 / 12 / 6 elements (vectors of 8, 4, 2), one token.
    for [b, h, s, d] in [
        [2, 32, 1024, 128],
        [3, 4, 7, 64],
        [1, 2, 5, 12],
        [2, 3, 9, 6],
        [2, 4, 1, 8],
    ] {
        let x = Tensor::<B, 4>::random([b, h, s, d], normal, opts).require_grad();
        let dout = Tensor::<B, 3>::random([b, s, h * d], normal, opts);
        let name = format!("{label} {dtype:?} merge_heads [{b}, {h}, {s}, {d}]");
        let Some(got) = ops::merge_heads(&x) else {
            checks.extend(not_taken::<B>(name));
            continue;
        };
        let want = x.clone().swap_dims(1, 2).reshape([b, s, h * d]);
        let grad = |y: Tensor<B, 3>| {
            let g = (y * dout.clone()).sum().backward();
            host(x.grad(&g).expect("x has a gradient"))
        };
        let (gx, wx) = (grad(got.clone()), grad(want.clone()));
        checks.push(Check::fused(
            format!("{name} out"),
            rel_err(&host(got), &host(want)),
            0.0,
        ));
        checks.push(Check::fused(format!("{name} dx"), rel_err(&gx, &wx), 0.0));
    }
    ops::set_merge_heads_enabled(false);
    checks
}

type Suite = fn(&str, DType, &CudaDevice) -> Vec<Check>;

fn main() {
    if !ops::gpu_present() {
        println!("burn-cuda-ops GPU self-test: skipped, no CUDA GPU found (nothing was checked)");
        return;
    }
    let device = CudaDevice::default();
    // Element types are given explicitly: Burn's default float type is per device, fixed by the
    // first backend that touches it, whatever the backend's type parameter says.
    type F32 = Autodiff<Cuda<f32>>;
    type Bf16 = Autodiff<Gpu>;
    type Bf16Ckpt = Autodiff<Gpu, BalancedCheckpointing>;
    let (f32_, bf16_) = (("cuda", DType::F32), ("cuda", DType::BF16));
    let ckpt = ("cuda-ckpt", DType::BF16);
    // The defaults, and the opt-in unchecked launches; the suites below turn a switch off where
    // the other path needs a check of its own.
    ops::set_lse_kernel_enabled(true);
    ops::set_device_clip_enabled(true);
    ops::set_unchecked_kernels_enabled(true);
    let dropout_input: Suite = |l, dt, d| check_dropout::<Bf16>(l, dt, 2, 45, 96, 80, 8, d);
    let dropout_input_f32: Suite = |l, dt, d| check_dropout::<F32>(l, dt, 2, 45, 96, 80, 8, d);
    let dropout_input_ckpt: Suite =
        |l, dt, d| check_dropout::<Bf16Ckpt>(l, dt, 2, 45, 96, 80, 8, d);
    let suites: [((&str, DType), Suite); 43] = [
        (f32_, check_shared_input::<F32>),
        (bf16_, check_shared_input::<Bf16>),
        (f32_, check_argmax::<F32>),
        (bf16_, check_argmax::<Bf16>),
        (f32_, check_sample::<F32>),
        (bf16_, check_sample::<Bf16>),
        (f32_, check_offload::<Cuda<f32>>),
        (bf16_, check_offload::<Gpu>),
        (f32_, dropout_input_f32),
        (bf16_, dropout_input),
        (ckpt, dropout_input_ckpt),
        (f32_, check_attention::<F32>),
        (bf16_, check_attention::<Bf16>),
        (ckpt, check_attention::<Bf16Ckpt>),
        (f32_, check_causal_attention::<F32>),
        (bf16_, check_causal_attention::<Bf16>),
        (ckpt, check_causal_attention::<Bf16Ckpt>),
        (f32_, check_rope_grouped::<F32>),
        (bf16_, check_rope_grouped::<Bf16>),
        (f32_, check_cross_entropy::<F32>),
        (bf16_, check_cross_entropy::<Bf16>),
        (bf16_, |l, d, dev| {
            // The path with the row kernels off (`PEFT_LORA_LSE_KERNEL=0`).
            ops::set_lse_kernel_enabled(false);
            let c = check_cross_entropy::<Bf16>(&format!("{l} lse-off"), d, dev);
            ops::set_lse_kernel_enabled(true);
            c
        }),
        (f32_, check_rms_norm::<F32>),
        (bf16_, check_rms_norm::<Bf16>),
        (f32_, check_add_rms_norm::<F32>),
        (bf16_, check_add_rms_norm::<Bf16>),
        (f32_, check_rope_append::<F32>),
        (bf16_, check_rope_append::<Bf16>),
        (bf16_, check_start_read::<Bf16>),
        (f32_, check_swiglu::<F32>),
        (bf16_, check_swiglu::<Bf16>),
        (f32_, check_rope::<F32>),
        (bf16_, check_rope::<Bf16>),
        (f32_, check_merge_heads::<F32>),
        (bf16_, check_merge_heads::<Bf16>),
        (ckpt, check_merge_heads::<Bf16Ckpt>),
        (f32_, check_adamw::<Cuda<f32>>),
        (f32_, check_sums_many::<Cuda<f32>>),
        (bf16_, check_sums_many::<Cuda<bf16>>),
        (f32_, check_grad_scale_skip::<Cuda<f32>>),
        (bf16_, |l, _, d| check_adamw_master::<Cuda<bf16>>(l, d)),
        (f32_, check_hashed_dropout::<F32>),
        (bf16_, check_hashed_dropout::<Bf16>),
    ];
    let mut checks = Vec::new();
    // Each suite's checks are printed as soon as it ends (flushed), so a run cut short by a time
    // limit still reports the suites it finished.
    let mut failed = 0;
    for ((label, dtype), suite) in suites {
        let done = suite(label, dtype, &device);
        for c in &done {
            failed += usize::from(!c.pass());
            println!(
                "{}",
                serde_json::json!({"check": c.name, "err_fused": c.err_fused, "err_composed": c.err_composed, "tol": c.tol, "pass": c.pass()})
            );
        }
        std::io::Write::flush(&mut std::io::stdout()).expect("stdout");
        checks.extend(done);
    }
    let (tokens, dim, steps) = (4096, 4096, 6);
    let stream = race::<Bf16>(Ordering::Stream, DType::BF16, tokens, dim, steps, &device);
    let on_stream = ops::cubecl_stream_used();
    let unordered = race::<Bf16>(
        Ordering::UnorderedForTests,
        DType::BF16,
        tokens,
        dim,
        steps,
        &device,
    );
    let race_ok = stream <= 1e-6 && on_stream;
    println!(
        "{}",
        serde_json::json!({
            "check": "race: fused ops on cubecl's stream vs host-synchronised",
            "err": stream, "on_cubecl_stream": on_stream, "pass": race_ok,
            "broken_ordering_err": unordered, "broken_ordering_detected": unordered.is_nan() || unordered > 1e-6,
        })
    );
    failed += usize::from(!race_ok);
    println!(
        "burn-cuda-ops GPU self-test: {} checks, {failed} failed",
        checks.len() + 1
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
