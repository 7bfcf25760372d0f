//! The fused adapted linear on raw cubecl CUDA tensors: forward and backward as a handful of
//! cuBLASLt GEMMs enqueued together (see [`super::device`] for the ordering).
//!
//! Burn layout throughout: `x [n, in]`, `W [in, out]`, `A [in, r]`, `B [r, out]`.
//! - forward: `xa = xd A`; `y = s xa B (+ bias)`; `y += x W` (beta = 1: the frozen GEMM adds
//!   itself onto the low-rank term in its epilogue, no extra pass);
//! - backward: `g = dy B^T`; `dx = s g A^T`; `dx += dy W^T` (with dropout `dxd = s g A^T` and
//!   `dx = dy W^T` apart); `dA = s xd^T g` and `dB = s xa^T dy` on a side stream, overlapping
//!   the `dx` GEMMs. Never `dW`.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::server::Handle;

use super::device;
use super::lt::{self, Dtype, Operand, Output};

/// A raw cubecl CUDA tensor.
pub type Raw = CubeTensor<CudaRuntime>;

/// The cuBLASLt element type of a tensor (bf16, f16, f32).
pub(super) fn dtype_of(t: &Raw) -> Result<Dtype, String> {
    match t.dtype {
        DType::BF16 => Ok(Dtype::Bf16),
        DType::F16 => Ok(Dtype::F16),
        DType::F32 => Ok(Dtype::F32),
        other => Err(format!("unsupported dtype {other:?} (bf16, f16 or f32)")),
    }
}

fn dims2(t: &Raw, what: &str) -> Result<[usize; 2], String> {
    let s = t.meta.shape();
    if s.num_dims() != 2 {
        return Err(format!("fused linear: {what} must be 2-D, got {s:?}"));
    }
    Ok([s[0], s[1]])
}

/// A tensor as a GEMM operand: kept alive, with its storage layout. Row-major and transposed
/// (column-major) views are used in place; anything else is made contiguous first.
#[derive(Clone)]
pub(super) struct Prepared {
    pub(super) t: Raw,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) ld: usize,
    pub(super) trans: bool,
}

pub(super) fn prepare(t: Raw) -> Prepared {
    let shape = t.meta.shape().clone();
    let strides = t.meta.strides().clone();
    let (r, c) = (shape[0], shape[1]);
    let (s0, s1) = (strides[0], strides[1]);
    if (s1 == 1 || c == 1) && (s0 >= c.max(1) || r == 1) {
        let ld = if r == 1 { c.max(1) } else { s0 };
        return Prepared {
            t,
            rows: r,
            cols: c,
            ld,
            trans: false,
        };
    }
    if (s0 == 1 || r == 1) && (s1 >= r.max(1) || c == 1) {
        let ld = if c == 1 { r.max(1) } else { s1 };
        return Prepared {
            t,
            rows: c,
            cols: r,
            ld,
            trans: true,
        };
    }
    let t = into_contiguous(t);
    Prepared {
        t,
        rows: r,
        cols: c,
        ld: c,
        trans: false,
    }
}

/// The widest vector (8, 4, 2 or 1 elements) a kernel may load a view `t` with from its start:
/// the view's offset in its buffer is a multiple of that many elements.
pub(super) fn start_vector(t: &Raw) -> usize {
    let start = t.handle.offset_start.unwrap_or(0);
    [8usize, 4, 2, 1]
        .into_iter()
        .find(|v| start.is_multiple_of((v * t.dtype.size()) as u64))
        .unwrap_or(1)
}

/// A new, uninitialised contiguous tensor of `shape` and `dtype` on `like`'s device.
pub(super) fn empty_as(like: &Raw, shape: Shape, dtype: DType) -> Raw {
    let bytes = (shape.num_elements() * dtype.size()).max(1);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        like.client.empty(bytes),
        dtype,
    )
}

fn empty(like: &Raw, shape: [usize; 2]) -> Raw {
    empty_as(like, Shape::new(shape), like.dtype)
}

/// Collects the handles a GEMM batch touches; operands refer to them by index.
#[derive(Default)]
pub(super) struct Binds {
    pub(super) handles: Vec<Handle>,
}

impl Binds {
    pub(super) fn op(&mut self, p: &Prepared) -> (usize, Operand) {
        self.handles.push(p.t.handle.clone());
        (
            self.handles.len() - 1,
            Operand {
                ptr: 0,
                rows: p.rows,
                cols: p.cols,
                ld: p.ld,
                trans: p.trans,
            },
        )
    }

    pub(super) fn out(&mut self, t: &Raw) -> usize {
        self.handles.push(t.handle.clone());
        self.handles.len() - 1
    }
}

pub(super) fn at(op: (usize, Operand), ptrs: &[u64]) -> Operand {
    Operand {
        ptr: ptrs[op.0],
        ..op.1
    }
}

fn out_at(idx: usize, ld: usize, ptrs: &[u64]) -> Output {
    Output { ptr: ptrs[idx], ld }
}

fn same_dtype(ts: &[&Raw]) -> Result<Dtype, String> {
    let d = dtype_of(ts[0])?;
    for t in ts {
        if dtype_of(t)? != d {
            return Err("fused linear: all tensors must share one dtype".into());
        }
    }
    Ok(d)
}

/// `y = x W (+ bias)`.
pub fn linear_forward(x: Raw, w: Raw, bias: Option<Raw>) -> Result<Raw, String> {
    let dt = same_dtype(&[&x, &w])?;
    let [n, d_in] = dims2(&x, "x")?;
    let [w_in, d_out] = dims2(&w, "weight")?;
    if w_in != d_in {
        return Err(format!(
            "fused linear: x has {d_in} features, weight {w_in}"
        ));
    }
    let y = empty(&x, [n, d_out]);
    let (x, w) = (prepare(x), prepare(w));
    let bias = bias.map(into_contiguous);
    let mut binds = Binds::default();
    let (xo, wo) = (binds.op(&x), binds.op(&w));
    let bo = bias.as_ref().map(|b| binds.out(b));
    let yo = binds.out(&y);
    device::enqueue(&x.t.device, binds.handles, move |ctx, p| {
        let bias = bo.map(|i| p[i]);
        lt::gemm(
            ctx,
            dt,
            at(xo, p),
            at(wo, p),
            out_at(yo, d_out, p),
            1.0,
            0.0,
            bias,
        )
    })?;
    Ok(y)
}

/// `dx = dy W^T` (the input gradient of a frozen linear).
pub fn linear_backward(dy: Raw, w: Raw) -> Result<Raw, String> {
    let dt = same_dtype(&[&dy, &w])?;
    let [n, d_out] = dims2(&dy, "dy")?;
    let [d_in, w_out] = dims2(&w, "weight")?;
    if w_out != d_out {
        return Err(format!(
            "fused linear: dy has {d_out} features, weight {w_out}"
        ));
    }
    let dx = empty(&dy, [n, d_in]);
    let (dy, mut w) = (prepare(dy), prepare(w));
    w.trans = !w.trans;
    let mut binds = Binds::default();
    let (go, wo) = (binds.op(&dy), binds.op(&w));
    let xo = binds.out(&dx);
    device::enqueue(&dy.t.device, binds.handles, move |ctx, p| {
        lt::gemm(
            ctx,
            dt,
            at(go, p),
            at(wo, p),
            out_at(xo, d_in, p),
            1.0,
            0.0,
            None,
        )
    })?;
    Ok(dx)
}

/// The tensors of one low-rank-update linear forward (`y = x W + s (xd A) B`).
pub struct LowRankInputs<T = Raw> {
    /// Base input `[n, in]`.
    pub x: T,
    /// The adapter's input when it differs from `x` (dropout), `[n, in]`.
    pub xd: Option<T>,
    /// Frozen weight `[in, out]`.
    pub w: T,
    /// Frozen bias `[out]`.
    pub bias: Option<T>,
    /// `A [in, r]`.
    pub a: T,
    /// `B [r, out]`.
    pub b: T,
    /// The scale `s` of the low-rank term.
    pub scale: f32,
}

/// Shapes `(n, in, out, r)` of a low-rank call, checked.
fn low_rank_dims(
    x: &Raw,
    w: &Raw,
    a: &Raw,
    b: &Raw,
) -> Result<(usize, usize, usize, usize), String> {
    let [n, d_in] = dims2(x, "x")?;
    let [w_in, d_out] = dims2(w, "weight")?;
    let [a_in, r] = dims2(a, "A")?;
    let [b_r, b_out] = dims2(b, "B")?;
    if w_in != d_in || a_in != d_in || b_r != r || b_out != d_out {
        return Err(format!(
            "low-rank linear: shapes x {:?}, W {:?}, A {:?}, B {:?} do not fit",
            [n, d_in],
            [w_in, d_out],
            [a_in, r],
            [b_r, b_out]
        ));
    }
    Ok((n, d_in, d_out, r))
}

/// Forward: returns `y = x W (+ bias) + s (xd A) B` and `xa = xd A` (kept for the backward).
pub fn low_rank_forward(inp: LowRankInputs) -> Result<(Raw, Raw), String> {
    let dt = same_dtype(&[&inp.x, &inp.w, &inp.a, &inp.b])?;
    let (n, _d_in, d_out, r) = low_rank_dims(&inp.x, &inp.w, &inp.a, &inp.b)?;
    let y = empty(&inp.x, [n, d_out]);
    let xa = empty(&inp.x, [n, r]);
    let device = inp.x.device.clone();
    let x = prepare(inp.x);
    let xd = inp.xd.map(prepare);
    let (w, a, b) = (prepare(inp.w), prepare(inp.a), prepare(inp.b));
    let bias = inp.bias.map(into_contiguous);
    let mut binds = Binds::default();
    let xo = binds.op(&x);
    let xdo = xd.as_ref().map(|t| binds.op(t)).unwrap_or(xo);
    let (wo, ao, bo) = (binds.op(&w), binds.op(&a), binds.op(&b));
    let bias_o = bias.as_ref().map(|t| binds.out(t));
    let (yo, xao) = (binds.out(&y), binds.out(&xa));
    let s = inp.scale;
    device::enqueue(&device, binds.handles, move |ctx, p| {
        let xa_out = out_at(xao, r, p);
        lt::gemm(ctx, dt, at(xdo, p), at(ao, p), xa_out, 1.0, 0.0, None)?;
        let xa_op = Operand {
            ptr: xa_out.ptr,
            rows: n,
            cols: r,
            ld: r,
            trans: false,
        };
        // The skinny GEMM writes y (with the bias), the big one accumulates into it (beta = 1):
        // its read of y hides under its arithmetic, so the low-rank term costs one write of y.
        let y_out = out_at(yo, d_out, p);
        let bias = bias_o.map(|i| p[i]);
        lt::gemm(ctx, dt, xa_op, at(bo, p), y_out, s, 0.0, bias)?;
        lt::gemm(ctx, dt, at(xo, p), at(wo, p), y_out, 1.0, 1.0, None)
    })?;
    Ok((y, xa))
}

/// What the backward must produce.
#[derive(Debug, Clone, Copy)]
pub struct LowRankNeeds {
    /// Gradient of the base input `x` (with the low-rank part added unless `split`).
    pub dx: bool,
    /// The adapter input is a separate tensor (dropout): its gradient goes to `dxd`.
    pub split: bool,
    /// Gradient of the adapter input (only with `split`).
    pub dxd: bool,
    /// Gradient of `A`.
    pub da: bool,
    /// Gradient of `B`.
    pub db: bool,
}

/// The gradients of one low-rank backward (the ones asked for).
#[derive(Debug)]
pub struct LowRankGrads<T = Raw> {
    /// `dL/dx`.
    pub dx: Option<T>,
    /// `dL/dxd` (dropout case).
    pub dxd: Option<T>,
    /// `dL/dA`.
    pub da: Option<T>,
    /// `dL/dB`.
    pub db: Option<T>,
}

/// Saved state and parameters for a low-rank backward.
pub struct LowRankSaved<T = Raw> {
    /// The adapter input `xd` (needed for `dA`).
    pub xd: Option<T>,
    /// `xa = xd A` from the forward (needed for `dB`).
    pub xa: Option<T>,
    /// Frozen weight.
    pub w: T,
    /// `A`.
    pub a: T,
    /// `B`.
    pub b: T,
    /// The scaling.
    pub scale: f32,
}

/// Backward of [`low_rank_forward`] for the output gradient `dy [n, out]`.
pub fn low_rank_backward(
    dy: Raw,
    saved: LowRankSaved,
    needs: LowRankNeeds,
) -> Result<LowRankGrads, String> {
    let dt = same_dtype(&[&dy, &saved.w, &saved.a, &saved.b])?;
    let [n, d_out] = dims2(&dy, "dy")?;
    let [d_in, _] = dims2(&saved.w, "weight")?;
    let [_, r] = dims2(&saved.a, "A")?;
    let need_dxd = needs.split && needs.dxd;
    let need_g = needs.dx && !needs.split || need_dxd || needs.da;
    let mut grads = LowRankGrads {
        dx: needs.dx.then(|| empty(&dy, [n, d_in])),
        dxd: need_dxd.then(|| empty(&dy, [n, d_in])),
        da: needs.da.then(|| empty(&dy, [d_in, r])),
        db: needs.db.then(|| empty(&dy, [r, d_out])),
    };
    if needs.da && saved.xd.is_none() || needs.db && saved.xa.is_none() {
        return Err("low-rank linear backward: missing saved activations".into());
    }
    let g = need_g.then(|| empty(&dy, [n, r]));
    let device = dy.device.clone();
    let dy = prepare(dy);
    let mut w_t = prepare(saved.w);
    w_t.trans = !w_t.trans;
    let mut a_t = prepare(saved.a);
    a_t.trans = !a_t.trans;
    let mut b_t = prepare(saved.b);
    b_t.trans = !b_t.trans;
    let xd_t = saved.xd.map(|t| {
        let mut p = prepare(t);
        p.trans = !p.trans;
        p
    });
    let xa_t = saved.xa.map(|t| {
        let mut p = prepare(t);
        p.trans = !p.trans;
        p
    });
    let mut binds = Binds::default();
    let dyo = binds.op(&dy);
    let (wo, ao, bo) = (binds.op(&w_t), binds.op(&a_t), binds.op(&b_t));
    let xdo = xd_t.as_ref().map(|t| binds.op(t));
    let xao = xa_t.as_ref().map(|t| binds.op(t));
    let go = g.as_ref().map(|t| binds.out(t));
    let dxo = grads.dx.as_ref().map(|t| binds.out(t));
    let dxdo = grads.dxd.as_ref().map(|t| binds.out(t));
    let dao = grads.da.as_ref().map(|t| binds.out(t));
    let dbo = grads.db.as_ref().map(|t| binds.out(t));
    let s = saved.scale;
    device::enqueue(&device, binds.handles, move |ctx, p| {
        let g_op = go.map(|i| Operand {
            ptr: p[i],
            rows: n,
            cols: r,
            ld: r,
            trans: false,
        });
        if let (Some(i), Some(_)) = (go, g_op) {
            lt::gemm(
                ctx,
                dt,
                at(dyo, p),
                at(bo, p),
                out_at(i, r, p),
                1.0,
                0.0,
                None,
            )?;
        }
        // dA and dB overlap the big dx GEMM on a side stream (they only read, and write their
        // own outputs); the main stream waits for them before the op returns.
        let side = if dao.is_some() || dbo.is_some() {
            Some(device::fork(ctx)?)
        } else {
            None
        };
        if let Some(sc) = &side {
            if let (Some(i), Some(xa)) = (dbo, xao) {
                let db = out_at(i, d_out, p);
                lt::gemm(sc, dt, at(xa, p), at(dyo, p), db, s, 0.0, None)?;
            }
            if let (Some(i), Some(xd)) = (dao, xdo) {
                let g = g_op.ok_or("low-rank linear backward: g missing")?;
                lt::gemm(sc, dt, at(xd, p), g, out_at(i, r, p), s, 0.0, None)?;
            }
        }
        if let Some(i) = dxo {
            // As in the forward: the skinny GEMM first, the big one accumulating into it.
            let dx = out_at(i, d_in, p);
            let beta = if needs.split {
                0.0
            } else {
                let g = g_op.ok_or("low-rank linear backward: g missing")?;
                lt::gemm(ctx, dt, g, at(ao, p), dx, s, 0.0, None)?;
                1.0
            };
            lt::gemm(ctx, dt, at(dyo, p), at(wo, p), dx, 1.0, beta, None)?;
        }
        if let Some(i) = dxdo {
            let g = g_op.ok_or("low-rank linear backward: g missing")?;
            lt::gemm(ctx, dt, g, at(ao, p), out_at(i, d_in, p), s, 0.0, None)?;
        }
        if side.is_some() {
            device::join(ctx)?;
        }
        Ok(())
    })?;
    drop(g);
    if !needs.dx {
        grads.dx = None;
    }
    Ok(grads)
}
