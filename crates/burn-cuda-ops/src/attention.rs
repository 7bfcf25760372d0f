//! Scaled-dot-product attention on CUDA with its own backward: the GEMMs in cuBLASLt, nothing of
//! size `[seq, seq]` kept between the forward and the backward.
//!
//! Shapes: `q [g, m, d]`, `k`, `v [g, t, d]`, `mask [mb, 1, s, t]` (additive, f32), out
//! `[g, m, d]`. `g` groups share one K/V (batch x KV heads) and `m` stacks the query rows of the
//! heads that read them (GQA without copying K/V: `m = rep * s`), so the `g * m` rows flatten to
//! `[mb, heads, s]` for the mask, as transformers' `repeat_kv` orders heads.
//! - forward: `S = scale q k^T` (cuBLASLt), `P = softmax(f32(S) + mask)` in f32 (as transformers'
//!   eager attention), `out = P v` (cuBLASLt); `S` and `P` are freed at once.
//! - backward: keeps `q`, `k`, `v` (through Burn's checkpointer) and recomputes `P` (one more GEMM
//!   and softmax: the FlashAttention trade of arithmetic for memory), then `dv = P^T dout`,
//!   `dP = dout v^T`, `dS = scale P (dP - rowsum(dP P))` in f32, `dq = dS k`, `dk = dS^T q`.
//!
//! The composed path keeps, per layer, the f32 softmax output and its low-precision copy
//! (6 bytes per score in bf16: 0.4 GB per Llama-8B layer at batch 2 x 1024), and runs its
//! matmuls in Burn's GEMM; this op keeps nothing of that size.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn::tensor::{activation, FloatDType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::device;
use super::kernels::{dtype_of, empty_as, Raw};
use super::lt::{self, Operand, Output};
use super::{prim, tensor};

/// Backends with the attention op (with or without autodiff).
pub trait FusedAttention: Backend {
    /// `softmax(scale q k^T + mask) v` for `q [g, m, d]`, `k`, `v [g, t, d]`, `mask [mb, 1, s, t]`.
    fn fused_attention(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> Prim<Self>;
}

/// Inner (non-autodiff) backends: the forward and the recomputing backward.
pub trait AttentionOps: Backend {
    /// The forward.
    fn attention_forward(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> Prim<Self>;
    /// `[dq, dk, dv]` from the output gradient.
    fn attention_backward(
        dout: Prim<Self>,
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> [Prim<Self>; 3];
}

type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("burn-cuda-ops attention: {e}"))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> AttentionOps for Cb<F, I, BT> {
    fn attention_forward(q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32) -> Raw {
        ok(forward::<F, I, BT>(q, k, v, mask, scale))
    }

    fn attention_backward(dout: Raw, q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32) -> [Raw; 3] {
        ok(backward::<F, I, BT>(dout, q, k, v, mask, scale))
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedAttention for Cb<F, I, BT> {
    fn fused_attention(q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32) -> Raw {
        Self::attention_forward(q, k, v, mask, scale)
    }
}

/// What the backward keeps: `q`, `k`, `v` through the checkpointer, the (constant) mask.
#[derive(Debug, Clone)]
struct AttnState<T> {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: T,
    scale: f32,
}

#[derive(Debug)]
struct AttnBackward;

impl<B: AttentionOps> Backward<B, 3> for AttnBackward {
    type State = AttnState<Prim<B>>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let st = ops.state;
        let q = ckpt.retrieve_node_output::<Prim<B>>(st.q);
        let k = ckpt.retrieve_node_output::<Prim<B>>(st.k);
        let v = ckpt.retrieve_node_output::<Prim<B>>(st.v);
        let [dq, dk, dv] = B::attention_backward(dout, q, k, v, st.mask, st.scale);
        for (node, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionOps, C: CheckpointStrategy> FusedAttention for Autodiff<B, C> {
    fn fused_attention(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> Prim<Self> {
        let mask = mask.primitive;
        match AttnBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = AttnState {
                    q: prep.checkpoint(&q),
                    k: prep.checkpoint(&k),
                    v: prep.checkpoint(&v),
                    mask: mask.clone(),
                    scale,
                };
                let out = B::attention_forward(q.primitive, k.primitive, v.primitive, mask, scale);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_forward(
                q.primitive,
                k.primitive,
                v.primitive,
                mask,
                scale,
            )),
        }
    }
}

fn dims3(t: &Raw, what: &str) -> Result<[usize; 3], String> {
    let s = t.meta.shape();
    if s.num_dims() != 3 {
        return Err(format!("{what} must be 3-D, got {s:?}"));
    }
    Ok([s[0], s[1], s[2]])
}

/// Dense row-major storage (what the strided GEMM loop below addresses).
fn dense(t: Raw, what: &str) -> Result<Raw, String> {
    let t = into_contiguous(t);
    let [_, r, c] = dims3(&t, what)?;
    let st = t.meta.strides();
    if (r > 1 && st[1] != c) || (c > 1 && st[2] != 1) {
        return Err(format!("{what}: strides {st:?} are not dense"));
    }
    Ok(t)
}

/// `out[i] = alpha op(a[i]) op(b[i])` for every `i < g`: `a [g, ra, ca]`, `b [g, rb, cb]` dense,
/// `op` a transpose when asked; one strided-batched cuBLASLt call.
fn bgemm(a: &Raw, ta: bool, b: &Raw, tb: bool, alpha: f32) -> Result<Raw, String> {
    let dt = dtype_of(a)?;
    if dtype_of(b)? != dt {
        return Err("GEMM operands differ in dtype".into());
    }
    let [g, ra, ca] = dims3(a, "a")?;
    let [gb, rb, cb] = dims3(b, "b")?;
    let (m, k) = if ta { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if tb { (cb, rb) } else { (rb, cb) };
    if g != gb || k != kb {
        return Err(format!(
            "batched GEMM shapes {:?}{} x {:?}{} do not fit",
            [g, ra, ca],
            if ta { "^T" } else { "" },
            [gb, rb, cb],
            if tb { "^T" } else { "" }
        ));
    }
    let out = empty_as(a, Shape::new([g, m, n]), a.dtype);
    let handles = vec![a.handle.clone(), b.handle.clone(), out.handle.clone()];
    let batch = lt::Batch {
        count: g,
        stride_a: ra * ca,
        stride_b: rb * cb,
        stride_c: m * n,
    };
    device::enqueue(&a.device, handles, move |ctx, p| {
        let operand = |ptr, rows, cols, trans| Operand {
            ptr,
            rows,
            cols,
            ld: cols,
            trans,
        };
        let oa = operand(p[0], ra, ca, ta);
        let ob = operand(p[1], rb, cb, tb);
        let oc = Output { ptr: p[2], ld: n };
        lt::gemm_batched(ctx, dt, oa, ob, oc, alpha, 0.0, None, batch)
    })?;
    Ok(out)
}

/// Checked shapes of one call: `(g, m, t, d)`.
fn shapes(q: &Raw, k: &Raw, v: &Raw, mask: &Raw) -> Result<(usize, usize, usize, usize), String> {
    let [g, m, d] = dims3(q, "q")?;
    let [gk, t, dk] = dims3(k, "k")?;
    let [gv, tv, dv] = dims3(v, "v")?;
    let ms = mask.meta.shape();
    let bad = || {
        format!(
            "shapes q {:?}, k {:?}, v {:?}, mask {:?} do not fit",
            [g, m, d],
            [gk, t, dk],
            [gv, tv, dv],
            ms
        )
    };
    if ms.num_dims() != 4 || gk != g || gv != g || tv != t || dk != d || dv != d {
        return Err(bad());
    }
    let (mb, s, mt) = (ms[0], ms[2], ms[3]);
    if ms[1] != 1 || mt != t || s == 0 || mb == 0 || (g * m) % (s * mb) != 0 {
        return Err(bad());
    }
    Ok((g, m, t, d))
}

/// `softmax(f32(S) + mask)` over the keys, f32, `[g, m, t]`.
fn probs<B: Backend>(scores: Tensor<B, 3>, mask: Tensor<B, 4>) -> Tensor<B, 3> {
    let [g, m, t] = scores.dims();
    let [mb, _, s, _] = mask.dims();
    let heads = g * m / (s * mb);
    let x = scores.cast(FloatDType::F32).reshape([mb, heads, s, t]) + mask.cast(FloatDType::F32);
    activation::softmax(x, 3).reshape([g, m, t])
}

fn forward<F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    scale: f32,
) -> Result<Raw, String> {
    shapes(&q, &k, &v, &mask)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    let s = bgemm(&q, false, &k, true, scale)?;
    let p = if softmax_kernel() {
        super::softmax::forward(s, mask)
    } else {
        let dt = FloatDType::from(q.dtype);
        prim(probs::<Cb<F, I, BT>>(tensor(s), tensor(mask)).cast(dt))
    };
    let p = dense(p, "probabilities")?;
    bgemm(&p, false, &v, false, 1.0)
}

/// The cubecl softmax kernels ([`super::softmax`]) unless `PEFT_LORA_SOFTMAX_KERNEL=0` (then
/// Burn's composed tensor ops, for comparison).
fn softmax_kernel() -> bool {
    super::switch::SOFTMAX.on()
}

fn backward<F: FloatElement, I: IntElement, BT: BoolElement>(
    dout: Raw,
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    scale: f32,
) -> Result<[Raw; 3], String> {
    shapes(&q, &k, &v, &mask)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    let dout = dense(dout, "output gradient")?;
    let dt = FloatDType::from(q.dtype);
    let s = bgemm(&q, false, &k, true, scale)?;
    let (ds, dv) = if softmax_kernel() {
        let p = dense(super::softmax::forward(s, mask), "probabilities")?;
        let dv = bgemm(&p, true, &dout, false, 1.0)?;
        let dp = bgemm(&dout, false, &v, true, 1.0)?;
        let ds = dense(super::softmax::backward(p, dp, scale), "score gradient")?;
        (ds, dv)
    } else {
        let p32 = probs::<Cb<F, I, BT>>(tensor(s), tensor(mask));
        let p = dense(prim(p32.clone().cast(dt)), "probabilities")?;
        let dv = bgemm(&p, true, &dout, false, 1.0)?;
        drop(p);
        let dp = bgemm(&dout, false, &v, true, 1.0)?;
        let dp32 = tensor::<Cb<F, I, BT>, 3>(dp).cast(FloatDType::F32);
        let row = (dp32.clone() * p32.clone()).sum_dim(2);
        let ds = ((dp32 - row) * p32 * scale as f64).cast(dt);
        (dense(prim(ds), "score gradient")?, dv)
    };
    let dq = bgemm(&ds, false, &k, false, 1.0)?;
    let dk = bgemm(&ds, true, &q, false, 1.0)?;
    Ok([dq, dk, dv])
}
