//! Pieces the cubecl kernels share ([`super::softmax`], [`super::rms_norm`], [`super::swiglu`],
//! [`super::rope`]): one cube per row (or per [`THREADS`] elements) on a 2-D grid, tree
//! reductions through shared memory, and the vector width of their loads.

use cubecl::prelude::*;

/// Launches a kernel declared `#[cube(launch, launch_unchecked)]`: with cubecl's bounds checks
/// (every global and shared-memory index compared with its buffer's length, out-of-range reads
/// giving 0 and writes dropped), or without them when `PEFT_LORA_UNCHECKED_KERNELS=1`
/// ([`crate::set_unchecked_kernels_enabled`]), as Burn launches its own kernels.
/// `launch!(kernel::<CudaRuntime>(client, count, dim, args..))`.
macro_rules! launch {
    ($kernel:ident::<$rt:ty>($($arg:expr),* $(,)?)) => {
        if $crate::switch::UNCHECKED.on() {
            // SAFETY: every kernel of this crate keeps its indices inside the buffers it is
            // launched with: rows and elements past the sizes it is given return or are skipped
            // before any access (checked in the GPU self-test under cubecl's `validate` mode).
            unsafe { $kernel::launch_unchecked::<$rt>($($arg),*) }
        } else {
            $kernel::launch::<$rt>($($arg),*)
        }
    };
}
pub(crate) use launch;

/// Threads per row (a power of two).
pub const THREADS: u32 = 256;

/// Tree reduction of `sh[0..CUBE_DIM_X]` into `sh[0]` by max (`CUBE_DIM_X` a power of two).
#[cube]
pub fn reduce_max(sh: &mut SharedMemory<f32>) {
    let tid = UNIT_POS_X;
    let mut stride = CUBE_DIM_X / 2;
    while stride > 0 {
        if tid < stride {
            let b = sh[(tid + stride) as usize];
            if b > sh[tid as usize] {
                sh[tid as usize] = b;
            }
        }
        sync_cube();
        stride /= 2;
    }
}

/// The same by sum.
#[cube]
pub fn reduce_sum(sh: &mut SharedMemory<f32>) {
    let tid = UNIT_POS_X;
    let mut stride = CUBE_DIM_X / 2;
    while stride > 0 {
        if tid < stride {
            let b = sh[(tid + stride) as usize];
            sh[tid as usize] += b;
        }
        sync_cube();
        stride /= 2;
    }
}

/// The largest of `init` and the `n` elements of `v` (a running maximum's step).
#[cube]
pub fn vector_max<N: Size>(v: Vector<f32, N>, init: f32, #[comptime] n: usize) -> f32 {
    let mut m = init;
    #[unroll]
    for e in 0..n {
        if v[e] > m {
            m = v[e];
        }
    }
    m
}

/// `sum_e exp(v[e] - max)` over the `n` elements of `v`.
#[cube]
pub fn exp_sum<N: Size>(v: Vector<f32, N>, max: f32, #[comptime] n: usize) -> f32 {
    let ex = (v - Vector::new(max)).exp();
    let mut s = f32::new(0.0);
    #[unroll]
    for e in 0..n {
        s += ex[e];
    }
    s
}

/// The sum of the `n` elements of `v`.
#[cube]
pub fn vector_sum<N: Size>(v: Vector<f32, N>, #[comptime] n: usize) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for e in 0..n {
        s += v[e];
    }
    s
}

/// The row this cube handles (a 2-D grid, so that more than 65,535 rows fit).
#[cube]
pub fn row_index() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// The grid for `rows` rows, one cube each.
pub fn grid(rows: usize) -> CubeCount {
    let x = rows.clamp(1, 65_535);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}

/// The widest vector (8, 4, 2 or 1 elements; 8 bf16 = one 16-byte load) that divides `n`: the
/// vector width of the elementwise and row kernels over rows or runs of `n` elements.
pub fn vector_size(n: usize) -> usize {
    [8, 4, 2, 1]
        .into_iter()
        .find(|v| n.is_multiple_of(*v))
        .unwrap_or(1)
}

/// The element this unit handles in a flat elementwise launch over [`elem_grid`].
#[cube]
pub fn elem_index() -> usize {
    row_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize
}

/// The grid for an elementwise launch over `n` elements, [`THREADS`] per cube.
pub fn elem_grid(n: usize) -> CubeCount {
    grid(n.div_ceil(THREADS as usize))
}
