//! Several frozen linears that read one input (a decoder's q, k, v; an MLP's gate and up), each
//! with an optional low-rank term, as one queued cuBLASLt task writing one packed output
//! (inference only).
//!
//! `x [n, in]`; part `i`: `W_i [in, out_i]`, optional bias `[out_i]`, optional `(A_i [in, r_i],
//! B_i [r_i, out_i], s_i)`. The output `y [n, sum out_i]` holds part `i` in columns
//! `off_i..off_i + out_i`:
//! - `y_i = x W_i (+ bias_i)`: one GEMM per part, or one GEMM for all of them when their weights
//!   are column blocks of one buffer lying side by side (same row stride, each starting where
//!   the one before ends, no bias), as a packed weight's views are; that is decided from the
//!   device pointers when the task runs, so a weight replaced since packing (a merge, an
//!   initialisation that rewrites it) just takes the per-part GEMMs;
//! - then `y_i += s_i (x A_i) B_i` (beta = 1): the base result first, then the adapter's term,
//!   as PEFT's `result + lora_B(lora_A(x)) * scaling` orders them; on a run of rows only where
//!   the part says so (per-row routing whose adapter rows are one block, as the side-by-side
//!   evaluation lays them out: the GEMMs address the rows by offset).

use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;

use super::device;
use super::kernels::{at, dtype_of, empty_as, prepare, Binds, Raw};
use super::lt::{self, Operand, Output};

/// One linear of a shared-input group.
pub struct SharedPart {
    /// Frozen weight `[in, out]`.
    pub w: Raw,
    /// Frozen bias `[out]`.
    pub bias: Option<Raw>,
    /// The low-rank term `(A [in, r], B [r, out], s)`.
    pub low_rank: Option<(Raw, Raw, f32)>,
    /// The rows of `x` the low-rank term acts on (`None`: all).
    pub rows: Option<std::ops::Range<usize>>,
}

/// The columns `[out]` of each part in the packed output, in order.
fn widths(parts: &[SharedPart]) -> Vec<usize> {
    parts.iter().map(|p| p.w.meta.shape()[1]).collect()
}

/// Checks the shapes and dtypes of a group: `(n, widths)`.
fn check(x: &Raw, parts: &[SharedPart]) -> Result<(usize, Vec<usize>), String> {
    let s = x.meta.shape();
    if s.num_dims() != 2 {
        return Err(format!("shared-input linear: x must be 2-D, got {s:?}"));
    }
    let (n, d_in) = (s[0], s[1]);
    if parts.is_empty() {
        return Err("shared-input linear: no parts".into());
    }
    let dt = dtype_of(x)?;
    for (i, p) in parts.iter().enumerate() {
        let w = p.w.meta.shape();
        let mut ts = vec![(&p.w, "W")];
        if let Some(b) = &p.bias {
            ts.push((b, "bias"));
        }
        if let Some((a, b, _)) = &p.low_rank {
            ts.push((a, "A"));
            ts.push((b, "B"));
        }
        for (t, what) in ts {
            if dtype_of(t)? != dt {
                return Err(format!(
                    "shared-input linear: part {i}'s {what} is not x's dtype"
                ));
            }
        }
        let out = if w.num_dims() == 2 && w[0] == d_in {
            w[1]
        } else {
            0
        };
        let bias_ok = p
            .bias
            .as_ref()
            .is_none_or(|b| b.meta.shape().dims::<1>() == [out]);
        let lr_ok = p.low_rank.as_ref().is_none_or(|(a, b, _)| {
            let (a, b) = (a.meta.shape(), b.meta.shape());
            a.num_dims() == 2 && b.num_dims() == 2 && a[0] == d_in && a[1] == b[0] && b[1] == out
        });
        let rows_ok = p
            .rows
            .as_ref()
            .is_none_or(|r| r.start < r.end && r.end <= n);
        if out == 0 || !bias_ok || !lr_ok || !rows_ok {
            return Err(format!(
                "shared-input linear: part {i}'s shapes do not fit x [{n}, {d_in}]"
            ));
        }
    }
    Ok((n, widths(parts)))
}

/// The packed forward: `y [n, sum out_i]` (see the module's documentation).
pub fn forward(x: Raw, parts: Vec<SharedPart>) -> Result<Raw, String> {
    let (n, outs) = check(&x, &parts)?;
    let dt = dtype_of(&x)?;
    let eb = lt::elem_bytes(dt);
    let total: usize = outs.iter().sum();
    let ranks: Vec<usize> = parts
        .iter()
        .map(|p| p.low_rank.as_ref().map_or(0, |(a, _, _)| a.meta.shape()[1]))
        .collect();
    let rank_total: usize = ranks.iter().sum();
    // `x A_i` of every part side by side, on as many rows as the widest run of rows needs.
    let xa_rows = parts
        .iter()
        .filter(|p| p.low_rank.is_some())
        .map(|p| p.rows.as_ref().map_or(n, |r| r.len()))
        .max()
        .unwrap_or(0);
    let y = empty_as(&x, Shape::new([n, total]), x.dtype);
    let xa = (rank_total > 0).then(|| empty_as(&x, Shape::new([xa_rows, rank_total]), x.dtype));
    let x = prepare(x);
    if x.trans && parts.iter().any(|p| p.rows.is_some()) {
        return Err("shared-input linear: a row range needs a row-major x".into());
    }
    let device = x.t.device.clone();
    // The binds keep every operand alive until the task has run; operands refer to them by
    // index: x, y, xa (when some part has a rank), then each part's W, bias, A, B.
    let mut binds = Binds::default();
    let xo = binds.op(&x);
    let yo = binds.out(&y);
    let xao = xa.as_ref().map(|t| binds.out(t));
    /// An operand's handle index and layout.
    type Slot = (usize, Operand);
    struct Slots {
        w: Slot,
        bias: Option<usize>,
        low_rank: Option<(Slot, Slot, f32)>,
        rows: Option<std::ops::Range<usize>>,
    }
    let mut slots = Vec::with_capacity(parts.len());
    for part in parts {
        let w = binds.op(&prepare(part.w));
        let bias = part.bias.map(|b| binds.out(&into_contiguous(b)));
        let low_rank = part.low_rank.map(|(a, b, s)| {
            let a = binds.op(&prepare(a));
            (a, binds.op(&prepare(b)), s)
        });
        slots.push(Slots {
            w,
            bias,
            low_rank,
            rows: part.rows,
        });
    }
    device::enqueue(&device, binds.handles, move |ctx, p| {
        let x = at(xo, p);
        let y_at = |off: usize| Output {
            ptr: p[yo] + (off as u64) * eb,
            ld: total,
        };
        let ws: Vec<Operand> = slots.iter().map(|s| at(s.w, p)).collect();
        // One GEMM when the weights are adjacent column blocks of one buffer and no part has a
        // bias; else one per part.
        let packed = slots.iter().all(|s| s.bias.is_none())
            && ws
                .iter()
                .all(|w| !w.trans && w.ld == ws[0].ld && w.ld >= total)
            && ws
                .windows(2)
                .zip(&outs)
                .all(|(w, &out)| w[1].ptr == w[0].ptr + out as u64 * eb);
        if packed {
            let w = Operand {
                cols: total,
                ..ws[0]
            };
            lt::gemm(ctx, dt, x, w, y_at(0), 1.0, 0.0, None)?;
        } else {
            let mut off = 0;
            for (s, (w, out)) in slots.iter().zip(ws.iter().zip(&outs)) {
                let bias = s.bias.map(|i| p[i]);
                lt::gemm(ctx, dt, x, *w, y_at(off), 1.0, 0.0, bias)?;
                off += out;
            }
        }
        let (mut off, mut roff) = (0, 0);
        for ((s, out), r) in slots.iter().zip(&outs).zip(&ranks) {
            if let Some((a, b, scale)) = s.low_rank {
                // The rows the term acts on: all, or a run addressed by offset.
                let (r0, count) = s
                    .rows
                    .as_ref()
                    .map_or((0, n), |r| (r.start, r.end - r.start));
                let x_rows = Operand {
                    ptr: x.ptr + (r0 * x.ld) as u64 * eb,
                    rows: count,
                    ..x
                };
                // Some part has a rank, so `xa` exists.
                let xa_out = Output {
                    ptr: xao.map_or(0, |i| p[i]) + (roff as u64) * eb,
                    ld: rank_total,
                };
                lt::gemm(ctx, dt, x_rows, at(a, p), xa_out, 1.0, 0.0, None)?;
                let xa_op = Operand {
                    ptr: xa_out.ptr,
                    rows: count,
                    cols: *r,
                    ld: rank_total,
                    trans: false,
                };
                let y_rows = Output {
                    ptr: y_at(off).ptr + (r0 * total) as u64 * eb,
                    ld: total,
                };
                lt::gemm(ctx, dt, xa_op, at(b, p), y_rows, scale, 1.0, None)?;
            }
            off += out;
            roff += r;
        }
        Ok(())
    })?;
    Ok(y)
}
