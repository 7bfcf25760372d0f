//! Causal attention in row blocks on CUDA ([`crate::attention::Layout::Causal`]): the GEMMs of
//! [`super::causal_plan`] in cuBLASLt and the in-place softmax of [`super::causal_softmax`].
//!
//! Shapes: `q [g, m, d]` with `m = s * rep` rows position-major (row `i * rep + h`, as
//! [`rope`](mod@super::rope) lays the queries out with `group = rep`), `k`, `v [g, s, d]`, `mask [mb, 1,
//! s, s]` additive f32 hiding every key after its query's position (causal; padding as well).
//! Against the dense path ([`attention`](mod@super::attention)), with two blocks:
//! - 3/4 of the scores' GEMM work and bytes, softmax included (the keys no row of a block can
//!   see are never computed);
//! - the GEMMs of one stage (the scores, the output, the value and score gradients, the query and
//!   key gradients) are one task on the device thread, not one per GEMM and chunk of groups;
//! - the softmax runs in place (forward over the scores, backward over `dP`), so a chunk of
//!   groups holds two score-sized buffers at most, and a chunk may be twice the dense path's.
//!
//! The softmax also skips the keys after each row's position (written 0 unread: their `exp`
//! underflows to 0 wherever one visible key is unmasked). A query row whose visible keys are all
//! masked (a padding position with nothing before it) then gets a uniform distribution over the
//! keys up to its position (to the end of its vector of 8) instead of over all keys: that row's
//! output reaches no loss and no other row, so the loss and every gradient are the same.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Shape;

use super::causal_plan::{Buf, Gemm, Plan};
use super::causal_softmax;
use super::device;
use super::kernels::{dtype_of, empty_as, Raw};
use super::lt::{self, Operand, Output};
use super::score_chunks::{backward_chunks, dense, group_chunks, shapes, KeptProbs};

/// The blocks [`crate::causal_attention()`] cuts the positions into by default: two (3/4 of the scores,
/// the GEMM tasks of the two-chunk dense path).
pub const DEFAULT_CAUSAL_BLOCKS: usize = 2;

/// 0: not read yet; else the count.
static CAUSAL_BLOCKS: AtomicUsize = AtomicUsize::new(0);

/// Sets the blocks of [`crate::causal_attention()`] (process-wide; at least one; read from
/// `PEFT_LORA_CAUSAL_BLOCKS` otherwise, [`DEFAULT_CAUSAL_BLOCKS`] when unset).
pub fn set_causal_blocks(blocks: usize) {
    CAUSAL_BLOCKS.store(blocks.max(1), Ordering::SeqCst);
}

/// The blocks of [`crate::causal_attention()`] now.
pub fn causal_blocks() -> usize {
    match CAUSAL_BLOCKS.load(Ordering::SeqCst) {
        0 => {
            let n = match std::env::var("PEFT_LORA_CAUSAL_BLOCKS") {
                Err(_) => DEFAULT_CAUSAL_BLOCKS,
                Ok(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        eprintln!(
                            "burn-cuda-ops: PEFT_LORA_CAUSAL_BLOCKS={v:?} is not a count of \
                             blocks (1 or more); using {DEFAULT_CAUSAL_BLOCKS}"
                        );
                        DEFAULT_CAUSAL_BLOCKS
                    }
                },
            };
            let _ = CAUSAL_BLOCKS.compare_exchange(0, n, Ordering::SeqCst, Ordering::SeqCst);
            CAUSAL_BLOCKS.load(Ordering::SeqCst)
        }
        n => n,
    }
}

/// One tensor a stage's GEMMs use: dense `[groups, rows, cols]`, from group `g0` on.
struct Bound<'a> {
    buf: Buf,
    t: &'a Raw,
    g0: usize,
}

fn bound(buf: Buf, t: &Raw, g0: usize) -> Bound<'_> {
    Bound { buf, t, g0 }
}

/// One operand of a queued GEMM: which handle, the byte offset, the view, its batch stride.
#[derive(Clone, Copy)]
struct Place {
    handle: usize,
    offset: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    stride: usize,
}

/// `gemms` for `count` groups, each a strided-batched cuBLASLt call, all in one task on the
/// device thread (queued in order with the stream's kernels, as [`device::enqueue`] does).
fn run(gemms: Vec<Gemm>, tensors: &[Bound<'_>], count: usize) -> Result<(), String> {
    let first = tensors.first().ok_or("a GEMM stage with no tensors")?;
    let dt = dtype_of(first.t)?;
    let bytes = first.t.dtype.size() as u64;
    let place = |v: &super::causal_plan::View| -> Result<Place, String> {
        let (i, b) = tensors
            .iter()
            .enumerate()
            .find(|(_, b)| b.buf == v.buf)
            .ok_or_else(|| format!("no tensor bound for {:?}", v.buf))?;
        let s = b.t.meta.shape();
        let [g, r, c] = [s[0], s[1], s[2]];
        if b.t.dtype != first.t.dtype
            || b.g0 + count > g
            || v.row0 + v.rows > r
            || v.col0 + v.cols > c
        {
            return Err(format!(
                "{v:?} of {count} groups from {} does not fit {:?} {:?}",
                b.g0,
                b.t.dtype,
                [g, r, c]
            ));
        }
        Ok(Place {
            handle: i,
            offset: ((b.g0 * r + v.row0) * c + v.col0) as u64 * bytes,
            rows: v.rows,
            cols: v.cols,
            ld: c,
            stride: r * c,
        })
    };
    let mut calls = Vec::with_capacity(gemms.len());
    for g in &gemms {
        calls.push((
            place(&g.a)?,
            g.ta,
            place(&g.b)?,
            g.tb,
            place(&g.out)?,
            g.alpha,
        ));
    }
    let handles = tensors.iter().map(|b| b.t.handle.clone()).collect();
    device::enqueue(&first.t.device, handles, move |ctx, p| {
        for (a, ta, b, tb, out, alpha) in &calls {
            let operand = |x: &Place, trans| Operand {
                ptr: p[x.handle] + x.offset,
                rows: x.rows,
                cols: x.cols,
                ld: x.ld,
                trans,
            };
            let batch = lt::Batch {
                count,
                stride_a: a.stride,
                stride_b: b.stride,
                stride_c: out.stride,
            };
            let oc = Output {
                ptr: p[out.handle] + out.offset,
                ld: out.ld,
            };
            lt::gemm_batched(
                ctx,
                dt,
                operand(a, *ta),
                operand(b, *tb),
                oc,
                *alpha,
                0.0,
                None,
                batch,
            )?;
        }
        Ok(())
    })
}

/// Checked shapes `(g, m, s, d)` and the plan.
fn plan_of(
    q: &Raw,
    k: &Raw,
    v: &Raw,
    mask: &Raw,
    rep: usize,
    blocks: usize,
) -> Result<(usize, usize, usize, Plan), String> {
    let (g, m, t, d) = shapes(q, k, v, mask)?;
    if rep == 0 || m != t * rep || mask.meta.shape()[2] != t {
        return Err(format!(
            "causal attention needs q [g, s * rep, d] over s keys and a mask [mb, 1, s, s]: q \
             {:?}, k {:?}, mask {:?}, rep {rep}",
            q.meta.shape(),
            k.meta.shape(),
            mask.meta.shape()
        ));
    }
    Ok((g, m, t, Plan::new(t, rep, d, blocks)))
}

/// Chunks of groups: two score-sized buffers per chunk at most (the softmax is in place), so
/// twice the dense path's limit.
fn chunks(g: usize, m: usize, t: usize) -> Vec<(usize, usize)> {
    group_chunks(g, m, t, 2)
}

/// The probabilities of groups `g0..g0 + n` of `g`: scores, then the softmax in place.
fn probs(
    q: &Raw,
    k: &Raw,
    mask: &Raw,
    plan: &Plan,
    scale: f32,
    [g0, n, g]: [usize; 3],
) -> Result<Raw, String> {
    let (m, t) = (plan.m(), plan.s);
    let p = empty_as(q, Shape::new([n, m, t]), q.dtype);
    let tensors = [
        bound(Buf::Q, q, g0),
        bound(Buf::K, k, g0),
        bound(Buf::P, &p, 0),
    ];
    run(plan.scores_forward(scale), &tensors, n)?;
    Ok(causal_softmax::forward_in_place(
        p,
        mask.clone(),
        g0 * m,
        g * m,
        plan.rep,
        plan.block,
    ))
}

/// The forward, and the probabilities chunk by chunk when `keep` asks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    scale: f32,
    rep: usize,
    blocks: usize,
    keep: bool,
) -> Result<(Raw, Option<KeptProbs<Raw>>), String> {
    let (g, m, t, plan) = plan_of(&q, &k, &v, &mask, rep, blocks)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    let out = empty_as(&q, Shape::new([g, m, plan.d]), q.dtype);
    let mut kept = keep.then(Vec::new);
    for (g0, n) in chunks(g, m, t) {
        let p = probs(&q, &k, &mask, &plan, scale, [g0, n, g])?;
        let tensors = [
            bound(Buf::P, &p, 0),
            bound(Buf::V, &v, g0),
            bound(Buf::Out, &out, g0),
        ];
        run(plan.output(), &tensors, n)?;
        if let Some(kept) = kept.as_mut() {
            kept.push((g0, n, p));
        }
    }
    Ok((out, kept))
}

/// `[dq, dk, dv]`; `kept` the forward's probabilities, or recomputed when `None`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dout: Raw,
    q: Raw,
    k: Raw,
    v: Raw,
    mask: Raw,
    kept: Option<KeptProbs<Raw>>,
    scale: f32,
    rep: usize,
    blocks: usize,
) -> Result<[Raw; 3], String> {
    let (g, m, t, plan) = plan_of(&q, &k, &v, &mask, rep, blocks)?;
    let (q, k, v) = (dense(q, "q")?, dense(k, "k")?, dense(v, "v")?);
    let dout = dense(dout, "output gradient")?;
    let d = plan.d;
    let dq = empty_as(&q, Shape::new([g, m, d]), q.dtype);
    let dk = empty_as(&q, Shape::new([g, t, d]), q.dtype);
    let dv = empty_as(&q, Shape::new([g, t, d]), q.dtype);
    for (g0, n, p) in backward_chunks(kept, || chunks(g, m, t)) {
        let p = match p {
            Some(p) => p,
            None => probs(&q, &k, &mask, &plan, scale, [g0, n, g])?,
        };
        let grad = empty_as(&q, Shape::new([n, m, t]), q.dtype);
        let tensors = [
            bound(Buf::P, &p, 0),
            bound(Buf::DOut, &dout, g0),
            bound(Buf::V, &v, g0),
            bound(Buf::G, &grad, 0),
            bound(Buf::DV, &dv, g0),
        ];
        run(plan.value_and_prob_grads(), &tensors, n)?;
        let grad = causal_softmax::backward_in_place(p, grad, scale, plan.rep, plan.block);
        let tensors = [
            bound(Buf::G, &grad, 0),
            bound(Buf::K, &k, g0),
            bound(Buf::Q, &q, g0),
            bound(Buf::DQ, &dq, g0),
            bound(Buf::DK, &dk, g0),
        ];
        run(plan.query_and_key_grads(), &tensors, n)?;
    }
    Ok([dq, dk, dv])
}
