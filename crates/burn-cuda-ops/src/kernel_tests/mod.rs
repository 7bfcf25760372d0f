//! The crate's cubecl kernels run on a CPU Vulkan device (Mesa's lavapipe, through the SPIR-V
//! path of cubecl's wgpu runtime), in f32, against a CPU computation of the same formula: their
//! index math, guards, reductions and vector widths checked by `cargo test` on any machine.
//! The GPU self-test (`tests/gpu_selftest.rs`) checks the same kernels on CUDA in bf16 against
//! Burn's composed ops; these tests catch the mistakes that need no GPU to show.
//!
//! Every kernel runs twice: launched with cubecl's bounds checks and without them (as
//! `PEFT_LORA_UNCHECKED_KERNELS=1` launches them). Each buffer has [`PAD`] elements past its
//! logical end: inputs carry a huge value there (a read past the end spoils the result), outputs
//! a sentinel bit pattern that must come back unchanged (a write past the end is caught). Sizes
//! that are not multiples of the vector width or of the cube size exercise the guards.
//!
//! A machine without a Vulkan device fails these tests (Debian and Ubuntu: `apt-get install
//! mesa-vulkan-drivers`; `.ci/run` installs it).

mod argmax;
mod causal;
mod decode;
mod dora_norm;
mod elementwise;
mod heads;
mod optim;
mod rows;
mod sample;

use cubecl::prelude::*;
use cubecl_runtime::server::Handle;
use cubecl_wgpu::{WgpuDevice, WgpuRuntime};

/// The runtime the tests launch on.
pub(super) type Rt = WgpuRuntime;

/// Elements past each buffer's logical end.
pub(super) const PAD: usize = 64;
/// What an input holds past its end: large enough to spoil any sum, maximum or product.
pub(super) const INPUT_PAD: f32 = 1.0e30;
/// What an output holds before the launch (a NaN with a recognisable payload).
const SENTINEL_BITS: u32 = 0x7fc0_dead;

/// How a test launches a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// `launch`: cubecl's bounds checks on.
    Checked,
    /// `launch_unchecked`, as `PEFT_LORA_UNCHECKED_KERNELS=1` does.
    Unchecked,
}

/// Both modes, checked first.
pub(super) const MODES: [Mode; 2] = [Mode::Checked, Mode::Unchecked];

/// `launch_in!(mode, kernel::<Rt>(client, count, dim, args..))`: the kernel in `mode`.
macro_rules! launch_in {
    ($mode:expr, $kernel:ident::<$rt:ty>($($arg:expr),* $(,)?)) => {
        match $mode {
            $crate::kernel_tests::Mode::Checked => $kernel::launch::<$rt>($($arg),*),
            // SAFETY: the point of the test: the padding around every buffer catches an
            // index past the end.
            $crate::kernel_tests::Mode::Unchecked => unsafe {
                $kernel::launch_unchecked::<$rt>($($arg),*)
            },
        }
    };
}
pub(super) use launch_in;

/// The CPU Vulkan device's client; panics with what to install when there is none.
pub(super) fn client() -> ComputeClient<Rt> {
    let found = std::panic::catch_unwind(|| Rt::client(&WgpuDevice::default()));
    match found {
        Ok(client) => client,
        Err(_) => panic!(
            "no Vulkan device for the kernel tests: install Mesa's CPU driver lavapipe \
             (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`)"
        ),
    }
}

/// A device buffer of `len` logical elements followed by [`PAD`] more.
pub(super) struct Buf {
    pub handle: Handle,
    pub len: usize,
}

impl Buf {
    /// The buffer as a contiguous tensor of `shape` (its element count at most `len`).
    pub fn arg(&self, shape: &[usize]) -> TensorArg<Rt> {
        assert!(shape.iter().product::<usize>() <= self.len);
        let mut strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        // SAFETY: the strides are the dense ones of `shape`, which fits the buffer.
        unsafe { TensorArg::from_raw_parts(self.handle.clone(), strides.into(), shape.into()) }
    }

    /// The buffer as a tensor of `shape` at `strides` (its last element within `len`).
    pub fn arg_strided(&self, shape: &[usize], strides: &[usize]) -> TensorArg<Rt> {
        let last: usize = shape.iter().zip(strides).map(|(n, s)| (n - 1) * s).sum();
        assert!(shape.len() == strides.len() && last < self.len);
        // SAFETY: every element the shape and strides reach lies inside the buffer.
        unsafe { TensorArg::from_raw_parts(self.handle.clone(), strides.into(), shape.into()) }
    }

    /// The buffer as a one-dimensional tensor of its `len` elements.
    pub fn flat(&self) -> TensorArg<Rt> {
        self.arg(&[self.len])
    }
}

/// An f32 input holding `data`, [`INPUT_PAD`] past its end.
pub(super) fn input(client: &ComputeClient<Rt>, data: &[f32]) -> Buf {
    let mut all = data.to_vec();
    all.resize(data.len() + PAD, INPUT_PAD);
    Buf {
        handle: client.create_from_slice(f32::as_bytes(&all)),
        len: data.len(),
    }
}

/// A u32 input holding `data`, `u32::MAX` past its end.
pub(super) fn input_u32(client: &ComputeClient<Rt>, data: &[u32]) -> Buf {
    let mut all = data.to_vec();
    all.resize(data.len() + PAD, u32::MAX);
    Buf {
        handle: client.create_from_slice(u32::as_bytes(&all)),
        len: data.len(),
    }
}

/// An f32 output of `len` elements, the sentinel everywhere.
pub(super) fn output(client: &ComputeClient<Rt>, len: usize) -> Buf {
    let all = vec![f32::from_bits(SENTINEL_BITS); len + PAD];
    Buf {
        handle: client.create_from_slice(f32::as_bytes(&all)),
        len,
    }
}

/// The logical elements of an output written by a kernel; panics when an element past its end
/// changed (`what` names the buffer).
pub(super) fn read_output(client: &ComputeClient<Rt>, buf: &Buf, what: &str) -> Vec<f32> {
    let all = read_all(client, buf);
    for (k, v) in all[buf.len..].iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            SENTINEL_BITS,
            "{what}: element {} past the end ({} long) was written",
            k,
            buf.len
        );
    }
    all[..buf.len].to_vec()
}

/// The logical elements of a buffer written in place; panics when its padding changed.
pub(super) fn read_in_place(client: &ComputeClient<Rt>, buf: &Buf, what: &str) -> Vec<f32> {
    let all = read_all(client, buf);
    for (k, v) in all[buf.len..].iter().enumerate() {
        assert_eq!(
            *v, INPUT_PAD,
            "{what}: element {k} past the end ({} long) was written",
            buf.len
        );
    }
    all[..buf.len].to_vec()
}

fn read_all(client: &ComputeClient<Rt>, buf: &Buf) -> Vec<f32> {
    let bytes = client
        .read_one(buf.handle.clone())
        .expect("reading a buffer back from the Vulkan device");
    f32::from_bytes(&bytes).to_vec()
}

/// The vector widths (of 8, 4, 2, 1) a run of `n` elements can be loaded with: the host's pick
/// ([`crate::cube_util::vector_size`], the widest) first, then every narrower one dividing `n`.
pub(super) fn widths(n: usize) -> Vec<usize> {
    let all: Vec<usize> = [8, 4, 2, 1]
        .into_iter()
        .filter(|v| n.is_multiple_of(*v))
        .collect();
    assert_eq!(
        all[0],
        crate::cube_util::vector_size(n),
        "the host's width comes first"
    );
    all
}

/// f32 as a kernel's `#[define(E)]` storage type.
pub(super) fn f32_type() -> StorageType {
    f32::as_type_native_unchecked().storage_type()
}

/// u32 as a kernel's `#[define(I)]` storage type.
pub(super) fn u32_type() -> StorageType {
    u32::as_type_native_unchecked().storage_type()
}

/// Deterministic values in `[-scale, scale)` (a small LCG: no dependency, same on every run).
pub(super) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Panics when `got` and `want` differ anywhere by more than `atol + rtol |want|`, naming
/// the first such element.
pub(super) fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = *g as f64;
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i} is {g}, expected {w}"
        );
    }
}
