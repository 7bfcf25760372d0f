//! The log-sum-exp of each row of a `[rows, width]` tensor as one cubecl kernel, in f32 from
//! any float dtype: the cross-entropy's normaliser over a vocabulary-wide row of logits.
//!
//! Burn's `max_dim` / `sum_dim` over a 128,256-wide row ran 5.4 ms per `[256, 128256]` f32
//! chunk on an H100 (eight of them were 18% of a q,v training step's GPU time), after a cast of
//! the chunk to f32 and an `exp` pass, each a round trip of the chunk. This kernel reads the
//! logits once in their own dtype: one cube of [`THREADS`] units per row, each unit keeping a
//! running maximum and its rescaled sum of exponentials (online softmax) over 8-wide vectors,
//! then the cube's maximum and sum through shared memory.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::cube_util::{grid, reduce_max, reduce_sum, row_index, vector_size, THREADS};
use super::kernels::{empty_as, Raw};

#[cube(launch)]
fn lse_rows_kernel<E: Float, N: Size>(
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
        let mut vmax = mx;
        #[unroll]
        for e in 0..n {
            if v[e] > vmax {
                vmax = v[e];
            }
        }
        let ex = (v - Vector::new(vmax)).exp();
        let mut vsum = f32::new(0.0);
        #[unroll]
        for e in 0..n {
            vsum += ex[e];
        }
        sum = sum * (mx - vmax).exp() + vsum;
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
    lse_rows_kernel::launch::<CudaRuntime>(
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
    );
    out
}
