//! The AdamW update of one adapter tensor as one cubecl kernel (`torch.optim.AdamW`'s rule:
//! decoupled decay, then the bias-corrected step), f32 inside, results rounded to the tensor's
//! dtype once. Burn's composed update runs about sixteen kernels per tensor; an 8B model with
//! LoRA on all linear layers has 448 adapter tensors, so the composed optimizer step is some
//! seven thousand tiny launches while the GPU waits. The global gradient norm before it is one
//! launch per tensor too ([`sums_of_squares`]), and its clip factor one more ([`grad_scale`]):
//! the updates read that factor from the device, so the host queues the whole step before it
//! reads the norm, and a step whose norm is not finite leaves every tensor as it was.

use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use burn::tensor::{DType, Shape};

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, reduce_sum, THREADS};
use super::kernels::{empty_as, Raw};
use super::switch;

/// The scalars of one update (the gradient's scale, the clip factor, is a 1-element tensor on
/// the device: see [`grad_scale`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// beta1, beta2.
    pub betas: (f32, f32),
    /// Step size.
    pub lr: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// epsilon.
    pub eps: f32,
    /// Bias corrections `1 - beta1^t`, `1 - beta2^t`.
    pub bias_corrections: (f32, f32),
}

/// [`AdamWStep`] as the kernels take it: `decay` is `1 - lr * weight_decay`, `bc1`/`bc2` the
/// bias corrections.
#[derive(CubeLaunch, CubeType)]
pub(crate) struct Hyper {
    beta1: f32,
    beta2: f32,
    lr: f32,
    decay: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
}

impl AdamWStep {
    fn hyper(&self) -> HyperLaunch<CudaRuntime> {
        HyperLaunch::new(
            self.betas.0,
            self.betas.1,
            self.lr,
            1.0 - self.lr * self.weight_decay,
            self.eps,
            self.bias_corrections.0,
            self.bias_corrections.1,
        )
    }
}

/// One element of `torch.optim.AdamW`'s step in f32: `(p, m, v)` after it, for parameter `p`,
/// gradient `g` (times `clip`) and moments `m`, `v`; a negative `clip` (a step whose gradient
/// norm is not finite, see [`grad_scale`]) returns `(p, m, v)` as they are.
#[cube]
fn adamw_step(p: f32, g: f32, m: f32, v: f32, clip: f32, h: &Hyper) -> (f32, f32, f32) {
    let one = f32::new(1.0);
    let mut po = p;
    let mut mo = m;
    let mut vo = v;
    if clip >= f32::new(0.0) {
        let gi = g * clip;
        mo = h.beta1 * m + (one - h.beta1) * gi;
        vo = h.beta2 * v + (one - h.beta2) * gi * gi;
        let denom = (vo / h.bc2).sqrt() + h.eps;
        po = p * h.decay - h.lr * (mo / h.bc1) / denom;
    }
    (po, mo, vo)
}

/// [`adamw_step`] over a tensor whose parameter, gradient and moments share the dtype `E`.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_kernel<E: Float>(
    p: &Tensor<E>,
    g: &Tensor<E>,
    m: &Tensor<E>,
    v: &Tensor<E>,
    p_out: &mut Tensor<E>,
    m_out: &mut Tensor<E>,
    v_out: &mut Tensor<E>,
    scale: &Tensor<f32>,
    n: u32,
    h: &Hyper,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= n as usize {
        terminate!();
    }
    let (pi, mi, vi) = adamw_step(
        f32::cast_from(p[i]),
        f32::cast_from(g[i]),
        f32::cast_from(m[i]),
        f32::cast_from(v[i]),
        scale[0],
        h,
    );
    p_out[i] = E::cast_from(pi);
    m_out[i] = E::cast_from(mi);
    v_out[i] = E::cast_from(vi);
}

/// [`adamw_step`] on an f32 master copy of a 16-bit parameter (mixed precision, as PEFT keeps
/// adapters in f32 on a bf16 model): master, moments and gradient in f32, and the parameter the
/// forward uses written once more in the gradient's dtype `E` (the parameter's own dtype, or f32
/// for gradients summed over micro-batches, rounded by the caller).
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_master_kernel<E: Float>(
    p: &Tensor<f32>,
    g: &Tensor<E>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
    p_out: &mut Tensor<f32>,
    m_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    low_out: &mut Tensor<E>,
    scale: &Tensor<f32>,
    n: u32,
    h: &Hyper,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= n as usize {
        terminate!();
    }
    let (pi, mi, vi) = adamw_step(p[i], f32::cast_from(g[i]), m[i], v[i], scale[0], h);
    p_out[i] = pi;
    m_out[i] = mi;
    v_out[i] = vi;
    low_out[i] = E::cast_from(pi);
}

/// [`adamw_master_kernel`] over several tensors in one launch: cubes `starts[i]..starts[i + 1]`
/// take tensor `i`, one element per thread (`(cube - starts[i]) * CUBE_DIM_X + UNIT_POS_X`),
/// with one step's scalars `h` and the one clip factor `scale[0]` for all.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_master_many_kernel<E: Float>(
    p: &Sequence<Tensor<f32>>,
    g: &Sequence<Tensor<E>>,
    m: &Sequence<Tensor<f32>>,
    v: &Sequence<Tensor<f32>>,
    p_out: &mut Sequence<Tensor<f32>>,
    m_out: &mut Sequence<Tensor<f32>>,
    v_out: &mut Sequence<Tensor<f32>>,
    low_out: &mut Sequence<Tensor<E>>,
    starts: Sequence<u32>,
    scale: &Tensor<f32>,
    h: &Hyper,
    #[define(E)] _dtype: StorageType,
) {
    let cube = CUBE_POS_X;
    let count = comptime![p.len()];
    #[unroll]
    for i in 0..count {
        let lo = starts[i];
        if cube >= lo && cube < starts[i + 1] {
            let j = (cube - lo) as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
            let pt = p.index(i);
            if j < pt.len() {
                let (pi, mi, vi) = adamw_step(
                    pt[j],
                    f32::cast_from(g.index(i)[j]),
                    m.index(i)[j],
                    v.index(i)[j],
                    scale[0],
                    h,
                );
                let po = p_out.index_mut(i);
                po[j] = pi;
                let mo = m_out.index_mut(i);
                mo[j] = mi;
                let vo = v_out.index_mut(i);
                vo[j] = vi;
                let lw = low_out.index_mut(i);
                lw[j] = E::cast_from(pi);
            }
        }
    }
}

/// `out[base + c] = sum(t^2)` in f32 over the elements cube `c` of the launch covers (a
/// grid-stride loop: cube `c` takes elements `c * threads + tid`, then every
/// `cubes * threads` after it).
#[cube(launch, launch_unchecked)]
pub(crate) fn sum_squares_kernel<E: Float>(
    t: &Tensor<E>,
    out: &mut Tensor<f32>,
    n: u32,
    base: u32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let first = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let stride = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
    let acc = squares_from(t, n as usize, first, stride);
    write_cube_sum(acc, out, base as usize + CUBE_POS_X as usize, threads);
}

/// This unit's f32 sum of `t[j]^2` for `j = first, first + stride, ..` below `n`.
#[cube]
fn squares_from<E: Float>(t: &Tensor<E>, n: usize, first: usize, stride: usize) -> f32 {
    let mut acc = f32::new(0.0);
    let mut j = first;
    while j < n {
        let v = f32::cast_from(t[j]);
        acc += v * v;
        j += stride;
    }
    acc
}

/// The cube's sum of every unit's `acc` (a tree in shared memory of `threads`), written by unit
/// 0 to `out[at]`. Every unit of the cube must call it.
#[cube]
fn write_cube_sum(acc: f32, out: &mut Tensor<f32>, at: usize, #[comptime] threads: u32) {
    let tid = UNIT_POS_X as usize;
    let mut sh = SharedMemory::<f32>::new(threads as usize);
    sh[tid] = acc;
    sync_cube();
    reduce_sum(&mut sh);
    if tid == 0 {
        out[at] = sh[0];
    }
}

/// [`sum_squares_kernel`] over several tensors in one launch: cubes `starts[i]..starts[i + 1]`
/// take tensor `i` (its grid-stride loop over those cubes), and cube `c` writes
/// `out[base + c]`.
/// Every cube runs the one shared-memory reduction, whichever tensor it took.
#[cube(launch, launch_unchecked)]
pub(crate) fn sum_squares_many_kernel<E: Float>(
    ts: &Sequence<Tensor<E>>,
    starts: Sequence<u32>,
    out: &mut Tensor<f32>,
    base: u32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let cube = CUBE_POS_X;
    let mut acc = f32::new(0.0);
    let count = comptime![ts.len()];
    #[unroll]
    for i in 0..count {
        let lo = starts[i];
        let hi = starts[i + 1];
        if cube >= lo && cube < hi {
            let t = ts.index(i);
            let first = (cube - lo) as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
            acc = squares_from(t, t.len(), first, (hi - lo) as usize * CUBE_DIM_X as usize);
        }
    }
    write_cube_sum(acc, out, (base + cube) as usize, threads);
}

/// Elements one cube of [`sums_of_squares`] sums (16 per thread): enough cubes that a tensor of
/// the 8B model's adapters (up to ~230k elements) spreads over the GPU instead of one SM
/// looping over it.
const ELEMS_PER_CUBE: usize = THREADS as usize * 16;

/// Cubes of [`sums_of_squares`] for a tensor of `n` elements.
fn square_cubes(n: usize) -> usize {
    n.div_ceil(ELEMS_PER_CUBE).clamp(1, 1024)
}

/// f32 partial sums of squares whose total is the sum of squares of every tensor in `ts`: one
/// launch per tensor (instead of a square, a sum and an add each), each over as many cubes as
/// the tensor's size asks (16 elements per thread, at most 1024 cubes), each cube writing its
/// own partial. `ts` must not be empty. (One cube per tensor, as before, left the GPU on one SM
/// for 75 ms of an all-linear optimizer step on the 8B shape.)
pub fn sums_of_squares(ts: Vec<Raw>) -> Raw {
    let cubes: Vec<usize> = ts
        .iter()
        .map(|t| square_cubes(t.meta.shape().num_elements()))
        .collect();
    let out = empty_as(&ts[0], Shape::new([cubes.iter().sum()]), DType::F32);
    if switch::MULTI_TENSOR.on() {
        sums_of_squares_many(ts, &cubes, &out);
        return out;
    }
    let mut base = 0;
    for (t, c) in ts.into_iter().zip(cubes) {
        let t = into_contiguous(t);
        let n = t.meta.shape().num_elements();
        let (dtype, client) = (t.dtype, t.client.clone());
        launch!(sum_squares_kernel::<CudaRuntime>(
            &client,
            CubeCount::Static(c as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            t.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            n as u32,
            base as u32,
            THREADS,
            dtype.into(),
        ));
        base += c;
    }
    out
}

/// Tensors one [`sum_squares_many_kernel`] launch takes at most (cubecl compiles one variant
/// per count and dtype).
const MANY: usize = 32;

/// [`sums_of_squares`]'s partials with one launch per run of at most [`MANY`] tensors of one
/// dtype ([`sum_squares_many_kernel`]), each tensor on the cubes `cubes` gives it, at the same
/// places in `out` as the per-tensor launches.
fn sums_of_squares_many(ts: Vec<Raw>, cubes: &[usize], out: &Raw) {
    let mut base = 0u32;
    let mut i = 0;
    while i < ts.len() {
        let dtype = ts[i].dtype;
        let end = (i..ts.len())
            .take(MANY)
            .take_while(|&k| ts[k].dtype == dtype)
            .last()
            .map_or(i + 1, |k| k + 1);
        let mut starts = SequenceArg::new();
        let mut seq = SequenceArg::new();
        let mut cube = 0u32;
        for (t, c) in ts[i..end].iter().zip(&cubes[i..end]) {
            starts.push(cube);
            seq.push(into_contiguous(t.clone()).into_tensor_arg());
            cube += *c as u32;
        }
        starts.push(cube);
        let client = ts[i].client.clone();
        launch!(sum_squares_many_kernel::<CudaRuntime>(
            &client,
            CubeCount::Static(cube, 1, 1),
            CubeDim::new_1d(THREADS),
            seq,
            starts,
            out.clone().into_tensor_arg(),
            base,
            THREADS,
            dtype.into(),
        ));
        base += cube;
        i = end;
    }
}

/// `norm[0]` = the square root of the sum of `partials` (f32) and `scale[0]` = the gradient's
/// clip factor: `max_norm / (norm + 1e-6)` when `norm > max_norm`, else 1, and -1 when the norm
/// is not finite (the updates then leave every tensor as it was). One cube of `threads`.
#[cube(launch, launch_unchecked)]
pub(crate) fn grad_scale_kernel(
    partials: &Tensor<f32>,
    norm: &mut Tensor<f32>,
    scale: &mut Tensor<f32>,
    n: u32,
    max_norm: f32,
    #[comptime] threads: u32,
) {
    let tid = UNIT_POS_X as usize;
    let mut sh = SharedMemory::<f32>::new(threads as usize);
    let mut acc = f32::new(0.0);
    let mut j = tid;
    while j < n as usize {
        acc += partials[j];
        j += threads as usize;
    }
    sh[tid] = acc;
    sync_cube();
    reduce_sum(&mut sh);
    if tid == 0 {
        let total = f32::sqrt(sh[0]);
        norm[0] = total;
        let mut s = f32::new(1.0);
        if total.is_nan() || total.is_inf() {
            s = f32::new(-1.0);
        } else if total > max_norm {
            s = max_norm / (total + f32::new(1e-6));
        }
        scale[0] = s;
    }
}

/// `(norm, scale)`, each one f32 element on the device, from the partial sums of squares of
/// [`sums_of_squares`]: the global gradient norm and the factor [`update`] and [`update_master`]
/// scale the gradient by (global-norm clipping to `max_norm`, `None` for none, as
/// `torch.nn.utils.clip_grad_norm_` with the trainer's rule: scaled only when above; -1 when the
/// norm is not finite, which makes the updates leave every tensor as it was).
pub fn grad_scale(partials: Raw, max_norm: Option<f32>) -> (Raw, Raw) {
    let partials = into_contiguous(partials);
    let n = partials.meta.shape().num_elements();
    let one = || empty_as(&partials, Shape::new([1]), DType::F32);
    let (norm, scale) = (one(), one());
    launch!(grad_scale_kernel::<CudaRuntime>(
        &partials.client.clone(),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(THREADS),
        partials.into_tensor_arg(),
        norm.clone().into_tensor_arg(),
        scale.clone().into_tensor_arg(),
        n as u32,
        max_norm.unwrap_or(f32::INFINITY),
        THREADS,
    ));
    (norm, scale)
}

/// `(p, m, v)` after one update of parameter `p` with gradient `g` times `scale[0]` (see
/// [`grad_scale`]) and moments `m`, `v` (all of one shape and dtype).
pub fn update(p: Raw, g: Raw, m: Raw, v: Raw, scale: Raw, h: AdamWStep) -> (Raw, Raw, Raw) {
    let (p, g, m, v) = (
        into_contiguous(p),
        into_contiguous(g),
        into_contiguous(m),
        into_contiguous(v),
    );
    let shape = p.meta.shape().clone();
    let n = shape.num_elements();
    let out = || empty_as(&p, shape.clone(), p.dtype);
    let (p2, m2, v2) = (out(), out(), out());
    let (dtype, client) = (p.dtype, p.client.clone());
    launch!(adamw_kernel::<CudaRuntime>(
        &client,
        elem_grid(n),
        CubeDim::new_1d(THREADS),
        p.into_tensor_arg(),
        g.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        p2.clone().into_tensor_arg(),
        m2.clone().into_tensor_arg(),
        v2.clone().into_tensor_arg(),
        into_contiguous(scale).into_tensor_arg(),
        n as u32,
        h.hyper(),
        dtype.into(),
    ));
    (p2, m2, v2)
}

/// `(master, m, v, p)` after one update of the f32 `master` with gradient `g` and f32 moments:
/// [`update`] in f32, plus the new master rounded to `g`'s dtype.
pub fn update_master(
    master: Raw,
    g: Raw,
    m: Raw,
    v: Raw,
    scale: Raw,
    h: AdamWStep,
) -> (Raw, Raw, Raw, Raw) {
    let ([p, g, m, v], [p2, m2, v2, p_low]) = master_buffers(master, g, m, v);
    let n = p.meta.shape().num_elements();
    let low = g.dtype;
    let client = p.client.clone();
    launch!(adamw_master_kernel::<CudaRuntime>(
        &client,
        elem_grid(n),
        CubeDim::new_1d(THREADS),
        p.into_tensor_arg(),
        g.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        p2.clone().into_tensor_arg(),
        m2.clone().into_tensor_arg(),
        v2.clone().into_tensor_arg(),
        p_low.clone().into_tensor_arg(),
        into_contiguous(scale).into_tensor_arg(),
        n as u32,
        h.hyper(),
        low.into(),
    ));
    (p2, m2, v2, p_low)
}

/// Tensors one [`adamw_master_many_kernel`] launch takes at most: eight buffers each, so a
/// launch binds at most 64 tensors.
const MANY_UPDATES: usize = 8;

/// Cubes one [`adamw_master_many_kernel`] launch may use (a 1-D grid).
const MAX_CUBES: usize = 65_535;

/// A master update's inputs `(master, g, m, v)` made contiguous, and its outputs of `master`'s
/// shape: the new master and moments in f32, and the master rounded to `g`'s dtype.
fn master_buffers(master: Raw, g: Raw, m: Raw, v: Raw) -> ([Raw; 4], [Raw; 4]) {
    let ins = [master, g, m, v].map(into_contiguous);
    let shape = ins[0].meta.shape().clone();
    let out = |dtype| empty_as(&ins[0], shape.clone(), dtype);
    let outs = [
        out(DType::F32),
        out(DType::F32),
        out(DType::F32),
        out(ins[1].dtype),
    ];
    (ins, outs)
}

/// [`update_master`] of every `(master, g, m, v)` of `items` (each with `g` of the one 16-bit
/// dtype the results are rounded to; all under the one step `h` and factor `scale`), as one
/// launch per run of up to 8 tensors ([`adamw_master_many_kernel`]); a tensor too
/// large for one launch's grid gets its own [`update_master`]. The results, in order.
pub fn update_master_many(
    items: Vec<(Raw, Raw, Raw, Raw)>,
    scale: Raw,
    h: AdamWStep,
) -> Vec<(Raw, Raw, Raw, Raw)> {
    let scale = into_contiguous(scale);
    let cubes = |t: &Raw| t.meta.shape().num_elements().div_ceil(THREADS as usize);
    let mut out = Vec::with_capacity(items.len());
    let mut run: Vec<(Raw, Raw, Raw, Raw)> = Vec::new();
    let mut run_cubes = 0;
    for item in items {
        let c = cubes(&item.0);
        if c > MAX_CUBES {
            out.extend(update_master_run(std::mem::take(&mut run), &scale, h));
            run_cubes = 0;
            out.push(update_master(
                item.0,
                item.1,
                item.2,
                item.3,
                scale.clone(),
                h,
            ));
            continue;
        }
        if run.len() == MANY_UPDATES || run_cubes + c > MAX_CUBES {
            out.extend(update_master_run(std::mem::take(&mut run), &scale, h));
            run_cubes = 0;
        }
        run_cubes += c;
        run.push(item);
    }
    out.extend(update_master_run(run, &scale, h));
    out
}

/// One [`adamw_master_many_kernel`] launch over `run` (at most [`MANY_UPDATES`] tensors of at
/// most [`MAX_CUBES`] cubes in all; nothing when empty).
fn update_master_run(
    run: Vec<(Raw, Raw, Raw, Raw)>,
    scale: &Raw,
    h: AdamWStep,
) -> Vec<(Raw, Raw, Raw, Raw)> {
    let Some(first) = run.first() else {
        return Vec::new();
    };
    let (client, low) = (first.0.client.clone(), first.1.dtype);
    let mut results = Vec::with_capacity(run.len());
    let (mut p, mut g, mut m, mut v) = (
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
    );
    let (mut po, mut mo, mut vo, mut lo) = (
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
    );
    let mut starts = SequenceArg::new();
    let mut cube = 0u32;
    for (pi, gi, mi, vi) in run {
        let ([pi, gi, mi, vi], [p2, m2, v2, low_out]) = master_buffers(pi, gi, mi, vi);
        let n = pi.meta.shape().num_elements();
        starts.push(cube);
        cube += n.div_ceil(THREADS as usize) as u32;
        p.push(pi.into_tensor_arg());
        g.push(gi.into_tensor_arg());
        m.push(mi.into_tensor_arg());
        v.push(vi.into_tensor_arg());
        po.push(p2.clone().into_tensor_arg());
        mo.push(m2.clone().into_tensor_arg());
        vo.push(v2.clone().into_tensor_arg());
        lo.push(low_out.clone().into_tensor_arg());
        results.push((p2, m2, v2, low_out));
    }
    starts.push(cube);
    launch!(adamw_master_many_kernel::<CudaRuntime>(
        &client,
        CubeCount::Static(cube, 1, 1),
        CubeDim::new_1d(THREADS),
        p,
        g,
        m,
        v,
        po,
        mo,
        vo,
        lo,
        starts,
        scale.clone().into_tensor_arg(),
        h.hyper(),
        low.into(),
    ));
    results
}

/// Inner backends with the one-kernel AdamW update (raw cubecl CUDA).
pub trait FusedAdamW: Backend {
    /// `(p, m, v)` after one update (see [`update`]).
    fn fused_adamw(
        p: Prim<Self>,
        g: Prim<Self>,
        m: Prim<Self>,
        v: Prim<Self>,
        scale: Prim<Self>,
        h: AdamWStep,
    ) -> (Prim<Self>, Prim<Self>, Prim<Self>);
    /// `(master, m, v, p)` after one update of an f32 master copy (see [`update_master`]).
    fn fused_adamw_master(
        master: Prim<Self>,
        g: Prim<Self>,
        m: Prim<Self>,
        v: Prim<Self>,
        scale: Prim<Self>,
        h: AdamWStep,
    ) -> (Prim<Self>, Prim<Self>, Prim<Self>, Prim<Self>);
    /// `(norm, scale)` from partial sums of squares (see [`grad_scale`]).
    fn fused_grad_scale(partials: Prim<Self>, max_norm: Option<f32>) -> (Prim<Self>, Prim<Self>);
    /// f32 partial sums of squares whose total is the sum of squares of the tensors (not
    /// empty; see [`sums_of_squares`]).
    fn fused_sums_of_squares(ts: Vec<Prim<Self>>) -> Prim<Self>;
    /// [`Self::fused_adamw_master`] of several tensors in few launches (see
    /// [`update_master_many`]).
    #[allow(clippy::type_complexity)]
    fn fused_adamw_master_many(
        items: Vec<(Prim<Self>, Prim<Self>, Prim<Self>, Prim<Self>)>,
        scale: Prim<Self>,
        h: AdamWStep,
    ) -> Vec<(Prim<Self>, Prim<Self>, Prim<Self>, Prim<Self>)>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedAdamW
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_adamw(p: Raw, g: Raw, m: Raw, v: Raw, scale: Raw, h: AdamWStep) -> (Raw, Raw, Raw) {
        update(p, g, m, v, scale, h)
    }

    fn fused_adamw_master(
        master: Raw,
        g: Raw,
        m: Raw,
        v: Raw,
        scale: Raw,
        h: AdamWStep,
    ) -> (Raw, Raw, Raw, Raw) {
        update_master(master, g, m, v, scale, h)
    }

    fn fused_grad_scale(partials: Raw, max_norm: Option<f32>) -> (Raw, Raw) {
        grad_scale(partials, max_norm)
    }

    fn fused_sums_of_squares(ts: Vec<Raw>) -> Raw {
        sums_of_squares(ts)
    }

    fn fused_adamw_master_many(
        items: Vec<(Raw, Raw, Raw, Raw)>,
        scale: Raw,
        h: AdamWStep,
    ) -> Vec<(Raw, Raw, Raw, Raw)> {
        update_master_many(items, scale, h)
    }
}
