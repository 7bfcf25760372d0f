//! GPU checks of the fused ops, callable from a test or a binary on a machine with a GPU:
//! the fused op against an f32 host reference and against the composed op (forward and every
//! gradient, odd shapes, transposed weights, bias, 3-D inputs, DoRA, frozen layers), and a race
//! test that fails when the GEMMs are not ordered with Burn's kernels.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};

use super::device::{ordering, set_ordering, Ordering};
use super::set_enabled;
use crate::layer::{AdapterMeta, LoraLinear};
use crate::variant::VariantKind;

/// One comparison: the largest absolute difference over the largest absolute reference value.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was compared.
    pub name: String,
    /// Error of the fused op.
    pub err_fused: f64,
    /// Error of the composed op against the same reference (context; `NaN` when not computed).
    pub err_composed: f64,
    /// Largest accepted `err_fused`.
    pub tol: f64,
}

impl Check {
    /// A check of the fused op alone against a reference (no composed op compared).
    fn fused(name: String, err_fused: f64, tol: f64) -> Check {
        Check {
            name,
            err_fused,
            err_composed: f64::NAN,
            tol,
        }
    }

    /// Whether the fused op is within tolerance.
    pub fn pass(&self) -> bool {
        self.err_fused <= self.tol
    }
}

/// What a suite reports when its op did not run: a failure on a raw CUDA backend (where it must
/// run), a visible skip under the fusion backend (where the op is not registered).
fn not_taken<B: Backend>(name: String) -> Vec<Check> {
    let raw = super::raw_backend::<B>();
    let why = if raw {
        ""
    } else {
        " (not registered with the fusion backend: skipped)"
    };
    let tol = if raw { -1.0 } else { 0.0 };
    vec![Check::fused(format!("{name}: op not taken{why}"), 0.0, tol)]
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared tensors differ in size");
    let (mut d, mut s) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        d = d.max((*g as f64 - *w as f64).abs());
        s = s.max((*w as f64).abs());
    }
    if !d.is_finite() {
        return f64::INFINITY;
    }
    d / s.max(1e-30)
}

/// Row-major `[m, k] x [k, n]` (with optional transposes of the stored operands) in f64.
fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                acc += av as f64 * bv as f64;
            }
            c[i * n + j] = acc as f32;
        }
    }
    c
}

struct Outputs {
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
}

/// Forward with `x`, loss `sum(y * g)` (so `dL/dy = g`), backward; everything read back.
fn run<B: AutodiffBackend>(
    layer: &LoraLinear<B>,
    x: &Tensor<B, 3>,
    g: &Tensor<B, 3>,
    fused: bool,
) -> Outputs {
    set_enabled(fused);
    B::seed(&x.device(), 20251128);
    let xg = x.clone().detach().require_grad();
    let y = layer.forward(xg.clone());
    let grads = (y.clone() * g.clone()).sum().backward();
    let mut named = Vec::new();
    for ad in &layer.adapters {
        let mut push = |name: &str, t: Option<Tensor<B::InnerBackend, 2>>| {
            if let Some(t) = t {
                named.push((format!("d{name}"), host(t)));
            }
        };
        push("A", ad.lora_a.val().grad(&grads));
        push("B", ad.lora_b.val().grad(&grads));
        if let Some(m) = &ad.magnitude {
            if let Some(t) = m.val().grad(&grads) {
                named.push(("dmagnitude".into(), host(t)));
            }
        }
    }
    let out = Outputs {
        y: host(y),
        dx: host(xg.grad(&grads).expect("x gradient")),
        grads: named,
    };
    set_enabled(true);
    out
}

/// The shape and contents of one comparison case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Batch rows (the input is `[batch, seq, in]`).
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// LoRA rank (0: no adapter, the frozen layer alone).
    pub r: usize,
    /// With a base bias.
    pub bias: bool,
    /// The base weight is a transposed view (as a PyTorch `[out, in]` weight used in place).
    pub transposed_weight: bool,
    /// DoRA instead of LoRA.
    pub dora: bool,
    /// Adapter dropout of the layer (the dropout path itself is checked by [`check_dropout`]).
    pub dropout: f64,
}

fn layer_for<B: AutodiffBackend>(case: &Case, dtype: DType, device: &B::Device) -> LoraLinear<B> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let scale_w = 1.0 / (case.d_in as f64).sqrt();
    let w = if case.transposed_weight {
        Tensor::<B, 2>::random([case.d_out, case.d_in], normal, opts).transpose() * scale_w
    } else {
        Tensor::<B, 2>::random([case.d_in, case.d_out], normal, opts) * scale_w
    };
    let bias = case
        .bias
        .then(|| Tensor::<B, 1>::random([case.d_out], normal, opts) * 0.1);
    let mut layer = LoraLinear::from_weight(w, bias);
    if case.r > 0 {
        let r = case.r;
        let meta = AdapterMeta {
            name: "default".into(),
            r,
            alpha: 2.0 * r as f64,
            scaling: 2.0,
            dropout: case.dropout,
            variant: if case.dora {
                VariantKind::Dora
            } else {
                VariantKind::Lora
            },
            alora_invocation_tokens: None,
        };
        let a = Tensor::random([case.d_in, r], normal, opts) * scale_w;
        let b = Tensor::random([r, case.d_out], normal, opts) * (1.0 / (r as f64).sqrt());
        let adapter = layer.new_adapter(meta, a, b, false);
        layer.add_adapter(adapter).expect("fresh layer");
    }
    layer
}

/// The accepted error for the element type the device actually used (Burn may create tensors in
/// the device's default float type rather than the backend's type parameter).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 2e-2,
    }
}

/// Fused vs host reference and vs composed for one case; the tolerance follows the dtype.
pub fn check_case<B: AutodiffBackend>(
    label: &str,
    case: Case,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let layer = layer_for::<B>(&case, dtype, device);
    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<B, 3>::random([case.batch, case.seq, case.d_in], normal, opts);
    let g = Tensor::<B, 3>::random([case.batch, case.seq, case.d_out], normal, opts);
    let dtype = x.dtype();
    let tol = tolerance(dtype);
    let label = format!("{label} {dtype:?}");
    let fused = run(&layer, &x, &g, true);
    let composed = run(&layer, &x, &g, false);
    let name = |what: &str| {
        format!(
            "{label} {}x{}x{}->{} r{}{}{}{}{} {what}",
            case.batch,
            case.seq,
            case.d_in,
            case.d_out,
            case.r,
            if case.bias { " bias" } else { "" },
            if case.transposed_weight {
                " W^T-view"
            } else {
                ""
            },
            if case.dora { " dora" } else { "" },
            if case.dropout > 0.0 { " dropout" } else { "" },
        )
    };
    let mut checks = Vec::new();
    // Against the composed op the error is the composed op's own in f32: Burn's f32 matmul runs
    // on the tensor cores at reduced precision (3e-4 to 7e-4 from the f64 reference on an H200,
    // where the fused op is at 1e-7 to 4e-7).
    let tol_vs_composed = if dtype == DType::F32 { 2e-3 } else { tol };
    let mut push = |what: &str, f: &[f32], c: &[f32], reference: Option<&[f32]>| {
        let (ef, ec, tol) = match reference {
            Some(r) => (rel_err(f, r), rel_err(c, r), tol),
            None => (rel_err(f, c), f64::NAN, tol_vs_composed),
        };
        checks.push(Check {
            name: name(what),
            err_fused: ef,
            err_composed: ec,
            tol,
        });
    };
    if case.dora || case.dropout > 0.0 {
        // DoRA, dropout: against the composed op (itself checked against PEFT on CPU).
        push("y vs composed", &fused.y, &composed.y, None);
        push("dx vs composed", &fused.dx, &composed.dx, None);
        for ((n, f), (_, c)) in fused.grads.iter().zip(&composed.grads) {
            push(&format!("{n} vs composed"), f, c, None);
        }
        return checks;
    }
    // Host reference in f64 from the very values the device used.
    let n = case.batch * case.seq;
    let (d_in, d_out, r) = (case.d_in, case.d_out, case.r);
    let xs = host(x.clone());
    let gs = host(g.clone());
    let ws = host(layer.weight.val());
    let mut y = mm(&xs, &ws, n, d_in, d_out, false, false);
    if let Some(b) = &layer.bias {
        let bs = host(b.val());
        for (i, v) in y.iter_mut().enumerate() {
            *v += bs[i % d_out];
        }
    }
    let mut dx = mm(&gs, &ws, n, d_out, d_in, false, true);
    let mut refs = Vec::new();
    if let Some(ad) = layer.adapters.first() {
        let s = ad.meta.scaling as f32;
        let a = host(ad.lora_a.val());
        let b = host(ad.lora_b.val());
        let xa = mm(&xs, &a, n, d_in, r, false, false);
        let lora = mm(&xa, &b, n, r, d_out, false, false);
        y.iter_mut().zip(&lora).for_each(|(v, l)| *v += s * l);
        let gb = mm(&gs, &b, n, d_out, r, false, true);
        let gba = mm(&gb, &a, n, r, d_in, false, true);
        dx.iter_mut().zip(&gba).for_each(|(v, l)| *v += s * l);
        let da: Vec<f32> = mm(&xs, &gb, d_in, n, r, true, false)
            .iter()
            .map(|v| s * v)
            .collect();
        let db: Vec<f32> = mm(&xa, &gs, r, n, d_out, true, false)
            .iter()
            .map(|v| s * v)
            .collect();
        refs.push(("dA".to_string(), da));
        refs.push(("dB".to_string(), db));
    }
    push("y", &fused.y, &composed.y, Some(&y));
    push("dx", &fused.dx, &composed.dx, Some(&dx));
    for (name, want) in &refs {
        let f = fused.grads.iter().find(|(n, _)| n == name);
        let c = composed.grads.iter().find(|(n, _)| n == name);
        match (f, c) {
            (Some((_, f)), Some((_, c))) => push(name, f, c, Some(want)),
            _ => push(&format!("{name} missing"), &[f32::INFINITY], &[0.0], None),
        }
    }
    checks
}

/// The standard set of cases (odd and aligned shapes, bias, transposed weight, DoRA, frozen).
pub fn cases() -> Vec<Case> {
    let base = Case {
        batch: 1,
        seq: 37,
        d_in: 53,
        d_out: 29,
        r: 5,
        bias: false,
        transposed_weight: false,
        dora: false,
        dropout: 0.0,
    };
    vec![
        base,
        Case { bias: true, ..base },
        Case {
            transposed_weight: true,
            ..base
        },
        Case {
            batch: 2,
            seq: 19,
            ..base
        },
        Case {
            batch: 1,
            seq: 1,
            d_in: 16,
            d_out: 8,
            r: 1,
            ..base
        },
        Case { r: 0, ..base },
        Case {
            r: 0,
            bias: true,
            transposed_weight: true,
            ..base
        },
        Case {
            batch: 2,
            seq: 150,
            d_in: 512,
            d_out: 384,
            r: 16,
            ..base
        },
        Case { dora: true, ..base },
        Case {
            dora: true,
            bias: true,
            batch: 2,
            seq: 64,
            d_in: 256,
            d_out: 192,
            r: 8,
            ..base
        },
    ]
}

/// Runs every case and the dropout check; returns the checks.
pub fn check_all<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let mut checks: Vec<Check> = cases()
        .into_iter()
        .flat_map(|c| check_case::<B>(label, c, dtype, device))
        .collect();
    checks.extend(check_dropout::<B>(label, dtype, 2, 45, 96, 80, 8, device));
    checks
}

/// The op with a separate adapter input (`xd = x * mask / (1 - p)`, as LoRA dropout makes it)
/// against the host reference: `y`, `dx` (through both inputs), `dA`, `dB`. The mask is an
/// explicit tensor, so both sides use the same one.
#[allow(clippy::too_many_arguments)]
pub fn check_dropout<B: AutodiffBackend>(
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
    let Some(y) = super::lora_linear(&x, Some(&xd), &w, Some(&bias), &a, &b, s as f64) else {
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

/// A chain of fused forward + backward calls whose inputs are written by Burn kernels right
/// before and whose outputs are read by Burn kernels right after, with no host synchronisation,
/// buffers freed and reused along the way. Returns the read-back accumulator.
fn race_chain<B: AutodiffBackend>(
    layer: &LoraLinear<B>,
    x0: &Tensor<B, 2>,
    steps: usize,
) -> Vec<f32> {
    let d_in = layer.d_in();
    let mut acc = Tensor::<B::InnerBackend, 1>::zeros([d_in], (&x0.device(), x0.dtype()));
    for i in 0..steps {
        // Written by a Burn kernel just before the fused op reads it.
        let x = (x0.clone() * (1.0 + 0.25 * i as f64) + 0.5)
            .detach()
            .require_grad();
        let y = layer.forward(x.clone());
        // Read by a Burn kernel just after the fused op writes it.
        let loss = (y.clone() * 0.01).tanh().sum();
        let grads = loss.backward();
        let dx = x.grad(&grads).expect("dx");
        let da = layer.adapters[0].lora_a.val().grad(&grads).expect("dA");
        acc = acc + dx.sum_dim(0).squeeze_dim(0) + da.sum_dim(1).squeeze_dim(1);
    }
    host(acc)
}

/// The ordering test: the chain in `mode` against the same chain with host synchronisation
/// around every fused op (correct by construction). Returns the relative error; a correct
/// ordering gives (close to) 0, a race gives garbage.
pub fn race<B: AutodiffBackend>(
    mode: Ordering,
    dtype: DType,
    n: usize,
    d: usize,
    steps: usize,
    device: &B::Device,
) -> f64 {
    let case = Case {
        batch: 1,
        seq: n,
        d_in: d,
        d_out: d,
        r: 16,
        bias: false,
        transposed_weight: false,
        dora: false,
        dropout: 0.0,
    };
    let layer = layer_for::<B>(&case, dtype, device);
    let x0 = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), (device, dtype));
    let before = ordering();
    set_enabled(true);
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

/// The fused attention (`super::attention`) against the f64 host reference: output and the
/// gradients of `q`, `k`, `v`, with GQA (several query heads per KV group), a causal mask shared
/// by the batch and a causal + key-padding mask per row, and a query length shorter than the keys
/// (a KV cache). Composed-path errors are reported beside.
pub fn check_attention<B: AutodiffBackend>(
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
            super::set_attention_enabled(fused);
            let out = if fused {
                super::attention(&q, &k, &v, &mask_t, scale).expect("fused attention runs")
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
        let fused = run(true);
        let composed = run(false);
        super::set_attention_enabled(true);
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
        for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            checks.push(Check {
                name: format!(
                    "{label} {dtype:?} attention b{b} g{g} rep{rep} s{s} t{t} d{d}{} {what}",
                    if padded { " padded" } else { "" }
                ),
                err_fused: rel_err(&fused[i], &want[i]),
                err_composed: rel_err(&composed[i], &want[i]),
                tol,
            });
        }
    }
    checks
}

/// The fused head + cross-entropy (`super::linear_cross_entropy`) against the f64 host
/// reference: the loss sum and `dh` for a loss gradient of 0.7, with chunks of 5 rows (so rows
/// cross chunk borders) and a transposed head view (a tied embedding), then with one chunk.
pub fn check_cross_entropy<B: AutodiffBackend>(
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
        (7, 64, 301, false, 1 << 27),
    ] {
        super::cross_entropy::set_chunk_elems(chunk_elems);
        let h = Tensor::<B, 2>::random([n, hid], normal, opts).require_grad();
        let w = if transposed {
            Tensor::<B, 2>::random([vocab, hid], normal, opts).transpose()
        } else {
            Tensor::<B, 2>::random([hid, vocab], normal, opts)
        };
        let targets: Vec<i64> = (0..n).map(|i| ((i * 37 + 11) % vocab) as i64).collect();
        let t = Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(targets.clone(), [n]),
            device,
        );
        let sum = super::linear_cross_entropy(&h, &w, &t).expect("fused cross-entropy runs");
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
    super::cross_entropy::set_chunk_elems(1 << 27);
    checks
}

/// The fused RMSNorm (`super::rms_norm`) against an f64 host reference: output and `dx` for an
/// output gradient, rows shorter and longer than the kernel's 256 threads.
pub fn check_rms_norm<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 1.0);
    let mut checks = Vec::new();
    // Widths of 6, 5 and 64 / 1000 / 4096: vectors of 2, 1 and 8.
    for (b, s, h) in [(2, 3, 6), (1, 2, 5), (2, 3, 64), (1, 5, 1000), (3, 7, 4096)] {
        let x = Tensor::<B, 3>::random([b, s, h], normal, opts).require_grad();
        let w = Tensor::<B, 1>::random([h], Distribution::Normal(1.0, 0.2), opts);
        let dy = Tensor::<B, 3>::random([b, s, h], normal, opts);
        let eps = 1e-5;
        let Some(y) = super::rms_norm(&x, &w, eps) else {
            return not_taken::<B>(format!("{label} rms_norm"));
        };
        let grads = (y.clone() * dy.clone()).sum().backward();
        let dx = host(x.grad(&grads).expect("dx"));
        let (xh, wh, gh) = (host(x.clone()), host(w.clone()), host(dy.clone()));
        let rows = b * s;
        let (mut yr, mut dxr) = (vec![0f32; rows * h], vec![0f32; rows * h]);
        for r in 0..rows {
            let xs = &xh[r * h..(r + 1) * h];
            let ms: f64 = xs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            let rs = 1.0 / (ms + eps).sqrt();
            let gx: f64 = (0..h)
                .map(|j| gh[r * h + j] as f64 * wh[j] as f64 * xs[j] as f64)
                .sum::<f64>()
                / h as f64;
            for j in 0..h {
                let g = gh[r * h + j] as f64 * wh[j] as f64;
                yr[r * h + j] = (xs[j] as f64 * rs * wh[j] as f64) as f32;
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

/// The fused SwiGLU gate (`super::swiglu`) against an f64 host reference: output and both input
/// gradients, element counts that do and do not fill the last cube.
pub fn check_swiglu<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let normal = Distribution::Normal(0.0, 2.0);
    let mut checks = Vec::new();
    // 15, 18, 14,000 and 176,128 elements: vectors of 1, 2 and 8.
    for (b, s, i) in [(1, 3, 5), (1, 3, 6), (2, 7, 1000), (2, 64, 1376)] {
        let gate = Tensor::<B, 3>::random([b, s, i], normal, opts).require_grad();
        let up = Tensor::<B, 3>::random([b, s, i], normal, opts).require_grad();
        let dy = Tensor::<B, 3>::random([b, s, i], normal, opts);
        let Some(y) = super::swiglu(&gate, &up) else {
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

/// The fused RoPE + head split (`super::rope`) against an f64 host reference: output and `dx`,
/// with per-batch position tables as the model builds them.
pub fn check_rope<B: AutodiffBackend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
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
        let Some(y) = super::rope(&x, n, &cos, &sin) else {
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
fn adamw_reference(p: f64, g: f64, m: f64, v: f64, h: &super::AdamWStep) -> (f64, f64, f64) {
    let f = |x: f32| x as f64;
    let g = g * f(h.clip);
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

/// The one-kernel AdamW update (`super::adamw_update`) against an f64 host reference of
/// `torch.optim.AdamW`'s rule: parameter and both moments after a clipped, decayed step; and
/// the fused sum of squares behind the global gradient norm.
pub fn check_adamw<B: Backend>(label: &str, dtype: DType, device: &B::Device) -> Vec<Check> {
    let opts = (device, dtype);
    let mut checks = Vec::new();
    for (rows, cols, t) in [(8, 3, 1), (4096, 16, 7)] {
        let rand =
            |sd: f64| Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, sd), opts);
        let (p, g, m) = (rand(0.02), rand(1e-3), rand(1e-4));
        let v = rand(1e-6).abs();
        let h = super::AdamWStep {
            clip: 0.7,
            betas: (0.9, 0.999),
            lr: 2e-4,
            weight_decay: 0.01,
            eps: 1e-8,
            bias_corrections: (1.0 - 0.9f32.powi(t), 1.0 - 0.999f32.powi(t)),
        };
        let (Some(norm2), Some((p2, m2, v2))) = (
            super::sum_of_squares(&[g.clone(), m.clone()]),
            super::adamw_update(&p, &g, &m, &v, h),
        ) else {
            return not_taken::<B>(format!("{label} adamw"));
        };
        let (ph, gh, mh, vh) = (host(p), host(g), host(m), host(v));
        let n = rows * cols;
        let (mut pr, mut mr, mut vr) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        for i in 0..n {
            let (pi, mi, vi) =
                adamw_reference(ph[i] as f64, gh[i] as f64, mh[i] as f64, vh[i] as f64, &h);
            (pr[i], mr[i], vr[i]) = (pi as f32, mi as f32, vi as f32);
        }
        let want: f64 = gh.iter().chain(&mh).map(|x| (*x as f64).powi(2)).sum();
        checks.push(Check::fused(
            format!("{label} {dtype:?} sum of squares {rows}x{cols} x2"),
            rel_err(&[norm2 as f32], &[want as f32]),
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

/// The hashed dropout (`super::dropout`): the device mask equals the host hash for the drawn
/// seed, re-seeding reproduces it and the next call draws another, the kept share is `1 - p`
/// within six standard deviations, and output and `dx` are `x / (1 - p)`, `dy / (1 - p)` where
/// kept and zero elsewhere.
pub fn check_hashed_dropout<B: AutodiffBackend>(
    label: &str,
    dtype: DType,
    device: &B::Device,
) -> Vec<Check> {
    let opts = (device, dtype);
    let (rows, cols, p) = (2048, 1000, 0.1);
    let n = rows * cols;
    let x =
        Tensor::<B, 2>::random([rows, cols], Distribution::Uniform(1.0, 2.0), opts).require_grad();
    let dy = Tensor::<B, 2>::random([rows, cols], Distribution::Uniform(1.0, 2.0), opts);
    crate::layer::seed_dropout(42);
    let mask = super::dropout::DropMask::new(p, crate::layer::next_dropout_seed());
    crate::layer::seed_dropout(42);
    let (Some(y), Some(again)) = (super::dropout(&x, p), super::dropout(&x, p)) else {
        return not_taken::<B>(format!("{label} hashed dropout"));
    };
    crate::layer::seed_dropout(42);
    let Some(replay) = super::dropout(&x, p) else {
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

/// AdamW on the f32 master of a bf16 parameter (`super::adamw_update_master`): three chained
/// steps against an f64 host reference (master and moments), the bf16 parameter equal to the
/// master rounded, and the master keeping steps far below one bf16 unit in the last place.
pub fn check_adamw_master<B: Backend>(label: &str, device: &B::Device) -> Vec<Check> {
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
        let h = super::AdamWStep {
            clip: 0.7,
            betas: (0.9, 0.999),
            lr: 1e-5,
            weight_decay: 0.01,
            eps: 1e-8,
            bias_corrections: (1.0 - 0.9f32.powi(t), 1.0 - 0.999f32.powi(t)),
        };
        let Some((p2, m2, v2, l)) = super::adamw_update_master(&p, &g, &m, &v, h, DType::BF16)
        else {
            return not_taken::<B>(format!("{label} adamw master"));
        };
        for (i, gi) in host(g).iter().enumerate() {
            (pr[i], mr[i], vr[i]) = adamw_reference(pr[i], *gi as f64, mr[i], vr[i], &h);
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

/// One adapted layer as a [`crate::LoraModel`], for the optimizer check.
struct OneLayer<B: Backend>(LoraLinear<B>);

impl<B: Backend> crate::LoraModel<B> for OneLayer<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![("proj".into(), &self.0)]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![("proj".into(), &mut self.0)]
    }
}

/// [`crate::LoraOptimizer`] on a bf16 adapter: three AdamW steps with the one-kernel master
/// update and with the composed one (`PEFT_LORA_FUSED_ADAMW` off) agree on the f32 masters and
/// the bf16 weights; a fourth step after saving and restoring the state equals one without.
pub fn check_optimizer_master<B: AutodiffBackend>(label: &str, device: &B::Device) -> Vec<Check> {
    use crate::{
        AdamWConfig, GradAccumulator, LoraConfig, LoraOptimizer, OptimizerKind, PeftModel,
    };
    let (n, d_in, d_out, r) = (64, 96, 80, 8);
    let mut peft = PeftModel::new(OneLayer(LoraLinear::<B>::random(
        d_in, d_out, false, device,
    )));
    if peft
        .add_adapter::<B>("default", &LoraConfig::new(r, 16.0, &["proj"]))
        .is_err()
    {
        return not_taken::<B>(format!("{label} optimizer master: adapter"));
    }
    // A bf16 layer, as a model loaded in bf16 has (`random` makes f32 tensors).
    {
        use burn::module::Param;
        use burn::tensor::FloatDType;
        let layer = &mut peft.model.0;
        // Cast on the inner backend: a cast on the autodiff one is not a leaf, and a parameter
        // must be.
        let bf = |t: Tensor<B, 2>| Tensor::<B, 2>::from_inner(t.inner().cast(FloatDType::BF16));
        layer.weight = Param::from_tensor(bf(layer.weight.val())).set_require_grad(false);
        let ad = &mut layer.adapters[0];
        ad.lora_a = Param::from_tensor(bf(ad.lora_a.val()).require_grad());
        ad.lora_b = Param::from_tensor(bf(ad.lora_b.val()).require_grad());
    }
    let xs: Vec<Tensor<B, 2>> = (0..4)
        .map(|_| {
            Tensor::random(
                [n, d_in],
                Distribution::Normal(0.0, 1.0),
                (device, DType::BF16),
            )
        })
        .collect();
    let adamw = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let run = |fused: bool,
               steps: &[Tensor<B, 2>],
               model: &mut OneLayer<B>,
               opt: &mut LoraOptimizer<B::InnerBackend>| {
        super::switch::ADAMW.set(fused);
        for x in steps {
            let y = model.0.forward(x.clone());
            let grads = (y.clone() * y).mean().backward();
            let mut acc = GradAccumulator::default();
            acc.add::<B, OneLayer<B>>(model, &grads);
            opt.step::<B, OneLayer<B>>(model, acc, 2e-3, Some(1.0));
        }
        super::switch::ADAMW.set(true);
    };
    let masters = |opt: &LoraOptimizer<B::InnerBackend>| -> Vec<f32> {
        opt.state_tensors()
            .iter()
            .filter(|(k, _)| k.ends_with(".master"))
            .flat_map(|(_, t)| t.data.clone())
            .collect()
    };
    let weights = |m: &OneLayer<B>| -> Vec<f32> {
        let ad = &m.0.adapters[0];
        let mut w = host(ad.lora_a.val());
        w.extend(host(ad.lora_b.val()));
        w
    };
    let new_opt = || LoraOptimizer::<B::InnerBackend>::new(OptimizerKind::AdamW, adamw.clone());
    let (mut fused_m, mut composed_m) = (
        OneLayer(peft.model.0.clone()),
        OneLayer(peft.model.0.clone()),
    );
    let (mut fused_o, mut composed_o) = (new_opt(), new_opt());
    run(true, &xs[..3], &mut fused_m, &mut fused_o);
    run(false, &xs[..3], &mut composed_m, &mut composed_o);
    let dtype = fused_m.0.adapters[0].lora_a.val().dtype();
    let (fm, cm) = (masters(&fused_o), masters(&composed_o));
    let name =
        |what: &str| format!("{label} {dtype:?} optimizer master {n}x{d_in}->{d_out} r{r} {what}");
    let mut checks = vec![
        Check::fused(
            name("masters kept (one per A and B; 0 = yes)"),
            f64::from(u8::from(fm.len() != d_in * r + r * d_out)),
            0.0,
        ),
        Check::fused(
            name("fused vs composed masters, 3 steps"),
            rel_err(&fm, &cm),
            1e-4,
        ),
        Check::fused(
            name("fused vs composed bf16 weights, 3 steps"),
            rel_err(&weights(&fused_m), &weights(&composed_m)),
            tolerance(dtype),
        ),
    ];
    // Resume: the saved state restored into a fresh optimizer takes the same fourth step.
    let mut resumed_o = new_opt();
    let mut resumed_m = OneLayer(fused_m.0.clone());
    if resumed_o
        .load_state(&fused_o.state_tensors(), device)
        .is_err()
    {
        return not_taken::<B>(format!("{label} optimizer master: load_state"));
    }
    run(true, &xs[3..], &mut fused_m, &mut fused_o);
    run(true, &xs[3..], &mut resumed_m, &mut resumed_o);
    checks.push(Check::fused(
        name("resumed vs uninterrupted master, step 4"),
        rel_err(&masters(&resumed_o), &masters(&fused_o)),
        0.0,
    ));
    checks
}
