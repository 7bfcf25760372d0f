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
//! - inside [`keeping_probs`] (a checkpointed layer's recomputation, whose backward runs right
//!   after it) the forward keeps `P` for the backward instead: one `[g, m, t]` tensor alive for
//!   one layer, and the backward's GEMM and softmax of the recomputation gone. The same kernels
//!   on the same inputs, so the gradients are the same bits either way.
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
use std::cell::Cell;

use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::device;
use super::kernels::{dtype_of, empty_as, Raw};
use super::lt::{self, Operand, Output};
use super::score_chunks::{backward_chunks, dense, dims3, group_chunks, shapes};
pub use super::score_chunks::{set_score_chunk_elems, KeptProbs, DEFAULT_SCORE_CHUNK_ELEMS};
use super::{prim, tensor};

/// Backends with the attention op (with or without autodiff).
pub trait FusedAttention: Backend {
    /// `softmax(scale q k^T + mask) v` for `q [g, m, d]`, `k`, `v [g, t, d]`, `mask [mb, 1, s, t]`,
    /// the query rows laid out as `layout` says.
    fn fused_attention(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
        layout: Layout,
    ) -> Prim<Self>;
}

/// How the query rows of a call are laid out, and which scores it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `m = rep * s` rows head-major (head `h`'s rows at `h * s..`), any additive mask: every
    /// score (this module's forward and backward).
    Full,
    /// `m = s * rep` rows position-major (row `i * rep + h`) over `t = s` keys, under a causal
    /// mask: the scores of each block of positions up to the block's end only
    /// ([`causal_attention`](mod@crate::causal_attention), `blocks` blocks).
    Causal {
        /// Query rows per position (query heads per KV head).
        rep: usize,
        /// Blocks the positions are cut into ([`crate::causal_plan::Plan::new`]).
        blocks: usize,
    },
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
        layout: Layout,
    ) -> Prim<Self>;
    /// The forward and, where it computed them chunk by chunk, the probabilities for the
    /// backward (`None` on the paths that do not: the decode kernel, Burn's softmax, and by
    /// default a backend that keeps nothing).
    fn attention_forward_keeping(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
        layout: Layout,
    ) -> (Prim<Self>, Option<KeptProbs<Prim<Self>>>) {
        (Self::attention_forward(q, k, v, mask, scale, layout), None)
    }
    /// `[dq, dk, dv]` from the output gradient; `probs` from the forward, or recomputed when
    /// `None`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        dout: Prim<Self>,
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        probs: Option<KeptProbs<Prim<Self>>>,
        scale: f32,
        layout: Layout,
    ) -> [Prim<Self>; 3];
}

thread_local! {
    /// Whether this thread's attention forwards keep their probabilities ([`keeping_probs`]).
    static KEEP: Cell<bool> = const { Cell::new(false) };
}

/// Restores the previous [`KEEP`] when [`keeping_probs`]'s closure ends, even by unwinding.
struct KeepGuard(bool);

impl Drop for KeepGuard {
    fn drop(&mut self) {
        KEEP.with(|k| k.set(self.0));
    }
}

/// Runs `f` with the recorded attention forwards on this thread keeping their probabilities
/// (`[groups, query rows, keys]` in the model's dtype) for their backward, which then skips
/// recomputing them. For a forward whose backward follows at once, as a checkpointed layer's
/// recomputation: the probabilities of one layer are alive at a time. Off
/// (`PEFT_LORA_KEEP_PROBS=0`, or [`crate::set_keep_attention_probs`]), `f` just runs.
pub fn keeping_probs<R>(f: impl FnOnce() -> R) -> R {
    if !super::switch::KEEP_PROBS.on() {
        return f();
    }
    let _restore = KeepGuard(KEEP.with(|k| k.replace(true)));
    f()
}

/// Whether a forward on this thread keeps its probabilities now.
fn keeping() -> bool {
    KEEP.with(|k| k.get())
}

type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("burn-cuda-ops attention: {e}"))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> AttentionOps for Cb<F, I, BT> {
    fn attention_forward(q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32, layout: Layout) -> Raw {
        ok(forward_any::<F, I, BT>(q, k, v, mask, scale, layout, false)).0
    }

    fn attention_forward_keeping(
        q: Raw,
        k: Raw,
        v: Raw,
        mask: Raw,
        scale: f32,
        layout: Layout,
    ) -> (Raw, Option<KeptProbs<Raw>>) {
        ok(forward_any::<F, I, BT>(q, k, v, mask, scale, layout, true))
    }

    fn attention_backward(
        dout: Raw,
        q: Raw,
        k: Raw,
        v: Raw,
        mask: Raw,
        probs: Option<KeptProbs<Raw>>,
        scale: f32,
        layout: Layout,
    ) -> [Raw; 3] {
        ok(match layout {
            Layout::Full => backward::<F, I, BT>(dout, q, k, v, mask, probs, scale),
            Layout::Causal { rep, blocks } => {
                super::causal_attention::backward(dout, q, k, v, mask, probs, scale, rep, blocks)
            }
        })
    }
}

/// The forward of either layout.
fn forward_any<F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    scale: f32,
    layout: Layout,
    keep: bool,
) -> Result<(Raw, Option<KeptProbs<Raw>>), String> {
    match layout {
        Layout::Full => forward::<F, I, BT>(q, k, v, mask, scale, keep),
        Layout::Causal { rep, blocks } => {
            super::causal_attention::forward(q, k, v, mask, scale, rep, blocks, keep)
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedAttention for Cb<F, I, BT> {
    fn fused_attention(q: Raw, k: Raw, v: Raw, mask: Raw, scale: f32, layout: Layout) -> Raw {
        Self::attention_forward(q, k, v, mask, scale, layout)
    }
}

/// What the backward keeps: `q`, `k`, `v` through the checkpointer, the (constant) mask, and
/// the probabilities when the forward kept them ([`keeping_probs`]).
#[derive(Debug, Clone)]
struct AttnState<T> {
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: T,
    probs: Option<KeptProbs<T>>,
    scale: f32,
    layout: Layout,
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
        let [dq, dk, dv] =
            B::attention_backward(dout, q, k, v, st.mask, st.probs, st.scale, st.layout);
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
        layout: Layout,
    ) -> Prim<Self> {
        let mask = mask.primitive;
        match AttnBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (qn, kn, vn) = (
                    prep.checkpoint(&q),
                    prep.checkpoint(&k),
                    prep.checkpoint(&v),
                );
                let (out, probs) = if keeping() {
                    B::attention_forward_keeping(
                        q.primitive,
                        k.primitive,
                        v.primitive,
                        mask.clone(),
                        scale,
                        layout,
                    )
                } else {
                    let out = B::attention_forward(
                        q.primitive,
                        k.primitive,
                        v.primitive,
                        mask.clone(),
                        scale,
                        layout,
                    );
                    (out, None)
                };
                let state = AttnState {
                    q: qn,
                    k: kn,
                    v: vn,
                    mask,
                    probs,
                    scale,
                    layout,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_forward(
                q.primitive,
                k.primitive,
                v.primitive,
                mask,
                scale,
                layout,
            )),
        }
    }
}

/// One GEMM operand or output: groups `g0..` of a dense `[g, rows, cols]` tensor.
#[derive(Clone, Copy)]
struct Part<'a> {
    t: &'a Raw,
    g0: usize,
}

fn at(t: &Raw, g0: usize) -> Part<'_> {
    Part { t, g0 }
}

/// `out[i] = alpha op(a[i]) op(b[i])` for `i < count` (each part from its own first group):
/// dense `[g, r, c]` operands, `op` a transpose when asked; one strided-batched cuBLASLt call
/// writing into `out`.
fn bgemm_into(
    a: Part<'_>,
    ta: bool,
    b: Part<'_>,
    tb: bool,
    alpha: f32,
    count: usize,
    out: Part<'_>,
) -> Result<(), String> {
    let dt = dtype_of(a.t)?;
    if dtype_of(b.t)? != dt || out.t.dtype != a.t.dtype {
        return Err("GEMM operands differ in dtype".into());
    }
    let [ga, ra, ca] = dims3(a.t, "a")?;
    let [gb, rb, cb] = dims3(b.t, "b")?;
    let [gc, rc, cc] = dims3(out.t, "out")?;
    let (m, k) = if ta { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if tb { (cb, rb) } else { (rb, cb) };
    let fits = |p: Part<'_>, g: usize| p.g0 + count <= g;
    if k != kb || (rc, cc) != (m, n) || !fits(a, ga) || !fits(b, gb) || !fits(out, gc) {
        return Err(format!(
            "batched GEMM shapes {:?}{} x {:?}{} -> {:?} do not fit {count} groups from {}, {}, {}",
            [ga, ra, ca],
            if ta { "^T" } else { "" },
            [gb, rb, cb],
            if tb { "^T" } else { "" },
            [gc, rc, cc],
            a.g0,
            b.g0,
            out.g0
        ));
    }
    let bytes = a.t.dtype.size() as u64;
    let offsets = [
        (a.g0 * ra * ca) as u64 * bytes,
        (b.g0 * rb * cb) as u64 * bytes,
        (out.g0 * m * n) as u64 * bytes,
    ];
    let handles = vec![a.t.handle.clone(), b.t.handle.clone(), out.t.handle.clone()];
    let batch = lt::Batch {
        count,
        stride_a: ra * ca,
        stride_b: rb * cb,
        stride_c: m * n,
    };
    device::enqueue(&a.t.device, handles, move |ctx, p| {
        let operand = |ptr, rows, cols, trans| Operand {
            ptr,
            rows,
            cols,
            ld: cols,
            trans,
        };
        let oa = operand(p[0] + offsets[0], ra, ca, ta);
        let ob = operand(p[1] + offsets[1], rb, cb, tb);
        let oc = Output {
            ptr: p[2] + offsets[2],
            ld: n,
        };
        lt::gemm_batched(ctx, dt, oa, ob, oc, alpha, 0.0, None, batch)
    })
}

/// [`bgemm_into`] a new `[count, m, n]` tensor.
fn bgemm_new(
    a: Part<'_>,
    ta: bool,
    b: Part<'_>,
    tb: bool,
    alpha: f32,
    count: usize,
) -> Result<Raw, String> {
    let [_, ra, ca] = dims3(a.t, "a")?;
    let [_, rb, cb] = dims3(b.t, "b")?;
    let m = if ta { ca } else { ra };
    let n = if tb { rb } else { cb };
    let out = empty_as(a.t, Shape::new([count, m, n]), a.t.dtype);
    bgemm_into(a, ta, b, tb, alpha, count, at(&out, 0))?;
    Ok(out)
}

/// `out[i] = alpha op(a[i]) op(b[i])` for every group of `a`, `b`.
fn bgemm(a: &Raw, ta: bool, b: &Raw, tb: bool, alpha: f32) -> Result<Raw, String> {
    let g = dims3(a, "a")?[0];
    bgemm_new(at(a, 0), ta, at(b, 0), tb, alpha, g)
}

/// `softmax(f32(S) + mask)` over the keys, f32, `[g, m, t]`.
fn probs<B: Backend>(scores: Tensor<B, 3>, mask: Tensor<B, 4>) -> Tensor<B, 3> {
    let [g, m, t] = scores.dims();
    let [mb, _, s, _] = mask.dims();
    let heads = g * m / (s * mb);
    let x = scores.cast(FloatDType::F32).reshape([mb, heads, s, t]) + mask.cast(FloatDType::F32);
    activation::softmax(x, 3).reshape([g, m, t])
}

/// The forward, and the probabilities chunk by chunk when `keep` asks and the chunked path ran.
fn forward<F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    scale: f32,
    keep: bool,
) -> Result<(Raw, Option<KeptProbs<Raw>>), String> {
    let (g, m, t, d) = shapes(&q, &k, &v, &mask)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    // A decode step (a few query rows per group): one kernel instead of two GEMMs and a softmax.
    if super::switch::DECODE_ATTENTION.on() && super::attention_decode::applies(m, d) {
        return Ok((super::attention_decode::forward(q, k, v, mask, scale), None));
    }
    if !softmax_kernel() {
        let s = bgemm(&q, false, &k, true, scale)?;
        let dt = FloatDType::from(q.dtype);
        let p = prim(probs::<Cb<F, I, BT>>(tensor(s), tensor(mask)).cast(dt));
        return Ok((
            bgemm(&dense(p, "probabilities")?, false, &v, false, 1.0)?,
            None,
        ));
    }
    let out = empty_as(&q, Shape::new([g, m, d]), q.dtype);
    let mut kept = keep.then(Vec::new);
    for (g0, n) in group_chunks(g, m, t, 1) {
        let s = bgemm_new(at(&q, g0), false, at(&k, g0), true, scale, n)?;
        let p = super::softmax::forward_rows(s, mask.clone(), g0 * m, g * m);
        bgemm_into(at(&p, 0), false, at(&v, g0), false, 1.0, n, at(&out, g0))?;
        if let Some(kept) = kept.as_mut() {
            kept.push((g0, n, p));
        }
    }
    Ok((out, kept))
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
    kept: Option<KeptProbs<Raw>>,
    scale: f32,
) -> Result<[Raw; 3], String> {
    let (g, m, t, d) = shapes(&q, &k, &v, &mask)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    let dout = dense(dout, "output gradient")?;
    if !softmax_kernel() {
        let dt = FloatDType::from(q.dtype);
        let s = bgemm(&q, false, &k, true, scale)?;
        let p32 = probs::<Cb<F, I, BT>>(tensor(s), tensor(mask));
        let p = dense(prim(p32.clone().cast(dt)), "probabilities")?;
        let dv = bgemm(&p, true, &dout, false, 1.0)?;
        drop(p);
        let dp = bgemm(&dout, false, &v, true, 1.0)?;
        let dp32 = tensor::<Cb<F, I, BT>, 3>(dp).cast(FloatDType::F32);
        let row = (dp32.clone() * p32.clone()).sum_dim(2);
        let ds = ((dp32 - row) * p32 * scale as f64).cast(dt);
        let ds = dense(prim(ds), "score gradient")?;
        let dq = bgemm(&ds, false, &k, false, 1.0)?;
        let dk = bgemm(&ds, true, &q, false, 1.0)?;
        return Ok([dq, dk, dv]);
    }
    let dq = empty_as(&q, Shape::new([g, m, d]), q.dtype);
    let dk = empty_as(&q, Shape::new([g, t, d]), q.dtype);
    let dv = empty_as(&q, Shape::new([g, t, d]), q.dtype);
    for (g0, n, p) in backward_chunks(kept, || group_chunks(g, m, t, 1)) {
        let p = match p {
            Some(p) => p,
            None => {
                let s = bgemm_new(at(&q, g0), false, at(&k, g0), true, scale, n)?;
                super::softmax::forward_rows(s, mask.clone(), g0 * m, g * m)
            }
        };
        bgemm_into(at(&p, 0), true, at(&dout, g0), false, 1.0, n, at(&dv, g0))?;
        let dp = bgemm_new(at(&dout, g0), false, at(&v, g0), true, 1.0, n)?;
        let ds = super::softmax::backward(p, dp, scale);
        bgemm_into(at(&ds, 0), false, at(&k, g0), false, 1.0, n, at(&dq, g0))?;
        bgemm_into(at(&ds, 0), true, at(&q, g0), false, 1.0, n, at(&dk, g0))?;
    }
    Ok([dq, dk, dv])
}

#[cfg(test)]
mod tests {
    use super::{keeping, keeping_probs};

    #[test]
    fn keeping_probs_holds_only_inside_its_closure_and_nests() {
        crate::set_keep_attention_probs(true);
        assert!(!keeping());
        keeping_probs(|| {
            assert!(keeping());
            keeping_probs(|| assert!(keeping()));
            assert!(keeping(), "an inner scope leaves the outer one keeping");
        });
        assert!(!keeping());
        // A panic inside restores the state too.
        let r = std::panic::catch_unwind(|| keeping_probs(|| panic!("inside")));
        assert!(r.is_err());
        assert!(!keeping());
        // Switched off, the closure runs without keeping.
        crate::set_keep_attention_probs(false);
        keeping_probs(|| assert!(!keeping()));
        crate::set_keep_attention_probs(true);
    }
}
