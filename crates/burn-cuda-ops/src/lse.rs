//! The log-sum-exp of each row of a `[rows, width]` tensor as one cubecl kernel, in f32 from
//! any float dtype: the cross-entropy's normaliser over a vocabulary-wide row of logits.
//!
//! Burn's `max_dim` / `sum_dim` over a 128,256-wide row ran 5.4 ms per `[256, 128256]` f32
//! chunk on an H100 (eight of them were 18% of a q,v training step's GPU time), after a cast of
//! the chunk to f32 and an `exp` pass, each a round trip of the chunk. This kernel reads the
//! logits once in their own dtype: one cube of [`THREADS`] units per row, each unit keeping a
//! running maximum and its rescaled sum of exponentials (online softmax) over 8-wide vectors,
//! then the cube's maximum and sum through shared memory.
//!
//! [`ce_grad_in_place`] is its backward with the target's pick: the gradient of the chunk's
//! cross-entropy with respect to its logits, `(softmax - one_hot(target)) * d`, written over the
//! logits in one pass (it was a cast to f32, a subtraction, an `exp`, a scatter, a product and a
//! cast back, each a round trip of an f32 chunk).

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{
    exp_sum, grid, launch, reduce_max, reduce_sum, row_index, vector_max, vector_size, THREADS,
};
use super::kernels::{empty_as, Raw};

#[cube(launch, launch_unchecked)]
pub(crate) fn lse_rows_kernel<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    out: &mut Tensor<f32>,
    rows: u32,
    wv: u32,
    #[comptime] threads: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = x.vector_size();
    let wv = wv as usize;
    let tid = UNIT_POS_X as usize;
    let base = row * wv;
    let mut mx = f32::new(-3.0e38);
    let mut sum = f32::new(0.0);
    let mut j = tid;
    while j < wv {
        let v = Vector::<f32, N>::cast_from(x[base + j]);
        let vmax = vector_max::<N>(v, mx, n);
        sum = sum * (mx - vmax).exp() + exp_sum::<N>(v, vmax, n);
        mx = vmax;
        j += CUBE_DIM_X as usize;
    }
    let mut sh = SharedMemory::<f32>::new(threads as usize);
    sh[tid] = mx;
    sync_cube();
    reduce_max(&mut sh);
    let row_max = sh[0];
    sync_cube();
    sh[tid] = sum * (mx - row_max).exp();
    sync_cube();
    reduce_sum(&mut sh);
    if tid == 0 {
        out[row] = sh[0].ln() + row_max;
    }
}

/// `log(sum_j exp(x[i, j]))` for each row of `x [rows, width]` (any float dtype), `[rows]` f32.
pub fn rows(x: Raw) -> Raw {
    let x = into_contiguous(x);
    let [rows, width] = x.meta.shape().dims::<2>();
    let out = empty_as(&x, Shape::new([rows]), DType::F32);
    let dtype = x.dtype;
    let v = vector_size(width);
    launch!(lse_rows_kernel::<CudaRuntime>(
        &x.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        v,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        (width / v) as u32,
        THREADS,
        dtype.into(),
    ));
    out
}

/// In place over the logits `x [rows, width]` (any float dtype; `width / wv` lanes per vector):
/// `x[i, j] = (exp(x[i, j] - lse[i]) - [j == t[i]]) * d[0]`, in f32 and rounded once.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ce_grad_kernel<E: Float, I: Numeric, N: Size>(
    x: &mut Tensor<Vector<E, N>>,
    lse: &Tensor<f32>,
    targets: &Tensor<I>,
    d: &Tensor<f32>,
    rows: u32,
    wv: u32,
    #[define(E, I)] _dtypes: [StorageType; 2],
) {
    let row = row_index();
    if row >= rows as usize {
        terminate!();
    }
    let n = x.vector_size();
    let wv = wv as usize;
    let base = row * wv;
    let l = Vector::<f32, N>::new(lse[row]);
    let scale = Vector::<f32, N>::new(d[0]);
    let t = u32::cast_from(targets[row]) as usize;
    let mut j = UNIT_POS_X as usize;
    while j < wv {
        let mut g = (Vector::<f32, N>::cast_from(x[base + j]) - l).exp();
        let first = j * n;
        if t >= first && t < first + n {
            #[unroll]
            for e in 0..n {
                if first + e == t {
                    g[e] -= f32::new(1.0);
                }
            }
        }
        x[base + j] = Vector::<E, N>::cast_from(g * scale);
        j += CUBE_DIM_X as usize;
    }
}

/// The cross-entropy's gradient with respect to one chunk's logits, written over them:
/// `logits[i, j] = (exp(logits[i, j] - lse[i]) - [j == targets[i]]) * d[0]` for `logits [rows,
/// width]` (contiguous, any float dtype), `lse [rows]` f32 (from [`rows`]), `targets [rows]` (an
/// int dtype, each in `0..width`) and `d [1]` f32, the loss's upstream gradient. Returns the
/// logits' buffer.
pub fn ce_grad_in_place(logits: Raw, lse: Raw, targets: Raw, d: Raw) -> Raw {
    let [rows, width] = logits.meta.shape().dims::<2>();
    let (dtype, tdtype) = (logits.dtype, targets.dtype);
    let v = vector_size(width);
    launch!(ce_grad_kernel::<CudaRuntime>(
        &logits.client.clone(),
        grid(rows),
        CubeDim::new_1d(THREADS),
        v,
        logits.clone().into_tensor_arg(),
        into_contiguous(lse).into_tensor_arg(),
        into_contiguous(targets).into_tensor_arg(),
        into_contiguous(d).into_tensor_arg(),
        rows as u32,
        (width / v) as u32,
        [dtype.into(), tdtype.into()],
    ));
    logits
}
