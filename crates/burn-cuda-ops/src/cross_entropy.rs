//! The LM head and its cross-entropy as one op on CUDA: `sum_i lse(h_i W) - (h_i W)[t_i]` for a
//! frozen head `W [hidden, vocab]`, in row chunks, so neither the `[tokens, vocab]` logits nor
//! their f32 copy exist beyond one chunk, and nothing of that size is kept for the backward.
//!
//! - forward, per chunk: logits in cuBLASLt (the model's dtype, f32 accumulation), then the
//!   per-row log-sum-exp in f32 as one kernel ([`super::lse`]) and the target's logit; keeps the
//!   per-row log-sum-exp (`[tokens]`, f32).
//! - backward, per chunk: logits again (one more GEMM), `g = d * (softmax - onehot)` in f32 and
//!   rounded once, written over the logits by one kernel ([`super::lse::ce_grad_in_place`]), then
//!   `dh = g W^T` into its rows of `dh` by cuBLASLt. Never `dW` (the head is frozen).
//!
//! The composed path keeps the logits, their f32 copy and the f32 log-softmax for the backward:
//! 10 bytes per logit, 2.6 GB at 2 x 1024 tokens and Llama 3's 128,256-word vocabulary.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::device;
use super::kernels::{dtype_of, empty_as, prepare, Raw};
use super::lt::{self, Operand, Output};
use super::{prim, tensor};

/// A backend's int tensor primitive.
pub type IntPrim<B> = <B as burn::tensor::backend::BackendTypes>::IntTensorPrimitive;

/// Logits per chunk (elements) unless [`set_chunk_elems`] says otherwise: 2^25, i.e. 64 MiB of
/// bf16 logits and 128 MiB for each f32 temporary (261 rows of Llama 3's 128,256-word vocabulary,
/// still a full-speed GEMM). The training step keeps each buffer size it used allocated for reuse
/// (exact-size allocations), so the chunk's temporaries count in the step's peak for the whole
/// run: at the former 2^27, an estimated ~1.3 GB of the 8B q,v step's 3.3 GB above the weights
/// (bf16 logits, their f32 copy and one f32 temporary of the forward's log-sum-exp).
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 25;

static CHUNK_ELEMS: AtomicUsize = AtomicUsize::new(DEFAULT_CHUNK_ELEMS);

/// Sets the number of logits computed at once (tests use small chunks to cross chunk borders;
/// [`DEFAULT_CHUNK_ELEMS`] restores the default).
pub fn set_chunk_elems(n: usize) {
    CHUNK_ELEMS.store(n.max(1), AtomicOrdering::SeqCst);
}

/// Backends with the fused head + cross-entropy (with or without autodiff).
pub trait FusedCrossEntropy: Backend {
    /// `[1]` f32: the sum over rows of `-log softmax(h W)[target]`; `h [n, hidden]`,
    /// `W [hidden, vocab]` frozen, `targets [n]` in `0..vocab`.
    fn fused_linear_cross_entropy(
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
    ) -> Prim<Self>;
}

/// Inner (non-autodiff) backends: forward and recomputing backward.
pub trait CrossEntropyOps: Backend {
    /// `(loss sum [1], log-sum-exp per row [n])`, both f32.
    fn ce_forward(h: Prim<Self>, w: Prim<Self>, targets: IntPrim<Self>)
        -> (Prim<Self>, Prim<Self>);
    /// `dh` from the loss gradient `d` (`[1]`).
    fn ce_backward(
        d: Prim<Self>,
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
        lse: Prim<Self>,
    ) -> Prim<Self>;
}

type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("burn-cuda-ops cross-entropy: {e}"))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> CrossEntropyOps for Cb<F, I, BT> {
    fn ce_forward(h: Raw, w: Raw, targets: Raw) -> (Raw, Raw) {
        ok(forward::<F, I, BT>(h, w, targets))
    }

    fn ce_backward(d: Raw, h: Raw, w: Raw, targets: Raw, lse: Raw) -> Raw {
        ok(backward::<F, I, BT>(d, h, w, targets, lse))
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedCrossEntropy for Cb<F, I, BT> {
    fn fused_linear_cross_entropy(h: Raw, w: Raw, targets: Raw) -> Raw {
        Self::ce_forward(h, w, targets).0
    }
}

#[derive(Debug, Clone)]
struct CeState<T, U> {
    h: NodeId,
    w: T,
    targets: U,
    lse: T,
}

#[derive(Debug)]
struct CeBackward;

impl<B: CrossEntropyOps> Backward<B, 1> for CeBackward {
    type State = CeState<Prim<B>, IntPrim<B>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [ph] = ops.parents;
        let d = grads.consume::<B>(&ops.node);
        let st = ops.state;
        if let Some(node) = ph {
            let h = ckpt.retrieve_node_output::<Prim<B>>(st.h);
            grads.register::<B>(node.id, B::ce_backward(d, h, st.w, st.targets, st.lse));
        }
    }
}

impl<B: CrossEntropyOps, C: CheckpointStrategy> FusedCrossEntropy for Autodiff<B, C> {
    fn fused_linear_cross_entropy(
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
    ) -> Prim<Self> {
        let w = w.primitive;
        match CeBackward
            .prepare::<C>([h.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let saved = prep.checkpoint(&h);
                let (loss, lse) = B::ce_forward(h.primitive, w.clone(), targets.clone());
                let state = CeState {
                    h: saved,
                    w,
                    targets,
                    lse,
                };
                prep.finish(state, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ce_forward(h.primitive, w, targets).0),
        }
    }
}

/// `(n, hidden, vocab)`, checked; `h` made dense.
fn shapes(h: Raw, w: &Raw, targets: &Raw) -> Result<(Raw, usize, usize, usize), String> {
    let h = into_contiguous(h);
    let (hs, ws, ts) = (h.meta.shape(), w.meta.shape(), targets.meta.shape());
    if hs.num_dims() != 2 || ws.num_dims() != 2 || ts.num_dims() != 1 {
        return Err(format!("shapes h {hs:?}, W {ws:?}, targets {ts:?}"));
    }
    let (n, hid, vocab) = (hs[0], hs[1], ws[1]);
    if ws[0] != hid || ts[0] != n || n == 0 || vocab == 0 {
        return Err(format!(
            "shapes h {hs:?}, W {ws:?}, targets {ts:?} do not fit"
        ));
    }
    if dtype_of(&h)? != dtype_of(w)? {
        return Err("h and W differ in dtype".into());
    }
    let st = h.meta.strides();
    if hid > 1 && (st[1] != 1 || (n > 1 && st[0] != hid)) {
        return Err(format!("h strides {st:?} are not dense"));
    }
    Ok((h, n, hid, vocab))
}

/// `out = op(a) op(b)` for `a` = rows `r0..r0 + rows` of a dense `[_, k]` matrix.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    a: &Raw,
    r0: usize,
    rows: usize,
    k: usize,
    b: &super::kernels::Prepared,
    out: &Raw,
    out_r0: usize,
    n: usize,
) -> Result<(), String> {
    let dt = dtype_of(a)?;
    let eb = a.dtype.size() as u64;
    let ob = out.dtype.size() as u64;
    let (brows, bcols, bld, btrans) = (b.rows, b.cols, b.ld, b.trans);
    let handles = vec![a.handle.clone(), b.t.handle.clone(), out.handle.clone()];
    device::enqueue(&a.device, handles, move |ctx, p| {
        let oa = Operand {
            ptr: p[0] + (r0 * k) as u64 * eb,
            rows,
            cols: k,
            ld: k,
            trans: false,
        };
        let ob_ = Operand {
            ptr: p[1],
            rows: brows,
            cols: bcols,
            ld: bld,
            trans: btrans,
        };
        let oc = Output {
            ptr: p[2] + (out_r0 * n) as u64 * ob,
            ld: n,
        };
        lt::gemm(ctx, dt, oa, ob_, oc, 1.0, 0.0, None)
    })
}

/// Rows per chunk for `n` rows: at most the chunk's element budget allows, split evenly, so the
/// chunks of one call share one size (the exact-size allocations then keep one set of chunk
/// buffers, not a second for a short last chunk; `n` a multiple of the chunk count leaves no
/// short chunk at all).
fn chunk_rows(n: usize, vocab: usize, hidden: usize) -> usize {
    rows_per_chunk(
        n,
        CHUNK_ELEMS.load(AtomicOrdering::SeqCst),
        vocab.max(hidden),
    )
}

/// [`chunk_rows`] for an element budget and a row width.
fn rows_per_chunk(n: usize, budget: usize, width: usize) -> usize {
    let most = (budget / width.max(1)).max(1);
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

// `slice([a..b])` is Burn's one range for the one sliced axis, not a vec of one range.
#[allow(clippy::single_range_in_vec_init)]
fn forward<F: FloatElement, I: IntElement, BT: BoolElement>(
    h: Raw,
    w: Raw,
    targets: Raw,
) -> Result<(Raw, Raw), String> {
    type T<F, I, BT> = Cb<F, I, BT>;
    let (h, n, hid, vocab) = shapes(h, &w, &targets)?;
    let wp = prepare(w);
    let tg = Tensor::<T<F, I, BT>, 1, Int>::from_primitive(targets);
    let chunk = chunk_rows(n, vocab, hid);
    let mut total: Option<Tensor<T<F, I, BT>, 1>> = None;
    let mut lses = Vec::new();
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let logits = empty_as(&h, Shape::new([rows, vocab]), h.dtype);
        gemm_rows(&h, r0, rows, hid, &wp, &logits, 0, vocab)?;
        let t = tg.clone().slice([r0..r0 + rows]).unsqueeze_dim::<2>(1);
        let (lse, picked) = if super::switch::LSE_KERNEL.on() {
            // One kernel reads the logits once for the log-sum-exp (Burn's max / sum over a
            // vocabulary-wide row took milliseconds per chunk); the target's logit is gathered
            // from the logits in their dtype (the cast to f32 is exact).
            let lse = tensor::<T<F, I, BT>, 1>(super::lse::rows(logits.clone()));
            let picked = tensor::<T<F, I, BT>, 2>(logits).gather(1, t);
            (lse.reshape([rows, 1]), picked.cast(FloatDType::F32))
        } else {
            let l32 = tensor::<T<F, I, BT>, 2>(logits).cast(FloatDType::F32);
            let mx = l32.clone().max_dim(1);
            let lse = (l32.clone() - mx.clone()).exp().sum_dim(1).log() + mx;
            (lse, l32.gather(1, t))
        }; // [rows, 1] each
        let part = (lse.clone() - picked).sum();
        total = Some(match total {
            Some(acc) => acc + part,
            None => part,
        });
        lses.push(lse.reshape([rows]));
    }
    let total = total.ok_or("no rows")?;
    let lse = Tensor::cat(lses, 0);
    Ok((prim(total), prim(lse)))
}

// `slice([a..b])` is Burn's one range for the one sliced axis, not a vec of one range.
#[allow(clippy::single_range_in_vec_init)]
fn backward<F: FloatElement, I: IntElement, BT: BoolElement>(
    d: Raw,
    h: Raw,
    w: Raw,
    targets: Raw,
    lse: Raw,
) -> Result<Raw, String> {
    type T<F, I, BT> = Cb<F, I, BT>;
    let (h, n, hid, vocab) = shapes(h, &w, &targets)?;
    let dt = FloatDType::from(h.dtype);
    let wp = prepare(w);
    let mut wt = wp.clone();
    wt.trans = !wt.trans;
    let tg = Tensor::<T<F, I, BT>, 1, Int>::from_primitive(targets);
    let lse = tensor::<T<F, I, BT>, 1>(lse);
    let d = tensor::<T<F, I, BT>, 1>(d)
        .cast(FloatDType::F32)
        .reshape([1, 1]);
    let dh = empty_as(&h, Shape::new([n, hid]), h.dtype);
    let chunk = chunk_rows(n, vocab, hid);
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let logits = empty_as(&h, Shape::new([rows, vocab]), h.dtype);
        gemm_rows(&h, r0, rows, hid, &wp, &logits, 0, vocab)?;
        let g = if super::switch::LSE_KERNEL.on() {
            // One pass over the chunk, written over the logits (see `lse::ce_grad_in_place`).
            let l = lse.clone().slice([r0..r0 + rows]);
            let t = tg.clone().slice([r0..r0 + rows]).into_primitive();
            super::lse::ce_grad_in_place(logits, prim(l), t, prim(d.clone().reshape([1])))
        } else {
            let l32 = tensor::<T<F, I, BT>, 2>(logits).cast(FloatDType::F32);
            let l = lse.clone().slice([r0..r0 + rows]).unsqueeze_dim::<2>(1);
            let p = (l32 - l).exp();
            let t = tg.clone().slice([r0..r0 + rows]).unsqueeze_dim::<2>(1);
            let minus_one =
                Tensor::<T<F, I, BT>, 2>::full([rows, 1], -1.0, (&p.device(), DType::F32));
            let g = p.scatter(1, t, minus_one, IndexingUpdateOp::Add) * d.clone();
            into_contiguous(prim(g.cast(dt)))
        };
        gemm_rows(&g, 0, rows, vocab, &wt, &dh, r0, hid)?;
    }
    Ok(dh)
}

#[cfg(test)]
mod tests {
    use super::rows_per_chunk;

    #[test]
    fn chunks_split_the_rows_evenly_within_the_budget() {
        // The 8B bench's labelled rows (2 x 512) over Llama 3's vocabulary: 4 chunks of 256
        // instead of 261 + 261 + 261 + 241.
        assert_eq!(rows_per_chunk(1024, 1 << 25, 128_256), 256);
        assert_eq!(rows_per_chunk(1023, 1 << 25, 128_256), 256);
        // Within the budget: one chunk when everything fits, never more rows than allowed.
        assert_eq!(rows_per_chunk(200, 1 << 25, 128_256), 200);
        for n in 1..2000 {
            let r = rows_per_chunk(n, 1 << 25, 128_256);
            assert!(r <= 261 && n.div_ceil(r) == n.div_ceil(261), "n {n}: {r}");
        }
        // The self-test's chunked case still ends with a short chunk (5, 5, 3).
        assert_eq!(rows_per_chunk(13, 5 * 50, 50), 5);
        assert_eq!(rows_per_chunk(3, 1, 50), 1);
        assert_eq!(rows_per_chunk(0, 1 << 25, 128_256), 1);
    }
}
