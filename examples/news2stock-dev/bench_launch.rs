//! `bench-launch`: the host's cost of one launch on each path a training step and a decode step
//! take (Burn's op dispatch, Burn's autodiff recording, a cubecl kernel of burn-cuda-ops, a
//! cuBLASLt GEMM queued on cubecl's device thread), on tensors small enough that the device
//! finishes each launch faster than the host queues the next. One JSON line per path:
//! `host_us` is the time to queue one launch, `total_us` the time per launch including the final
//! synchronisation; when they are equal the path is bound by the host.

use std::time::Instant;

use anyhow::Result;
use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use burn_cuda_ops as cuda;
use half::bf16;

type Gpu = Cuda<bf16>;
type Ad = Autodiff<Gpu>;

/// Queues `n` launches of `op`, then synchronises: `(host us, total us)` per launch.
fn time<T>(n: usize, device: &CudaDevice, mut op: impl FnMut() -> T) -> Result<(f64, f64)> {
    // Warm-up: compilation, autotuning, the memory pool.
    for _ in 0..20 {
        drop(op());
    }
    Gpu::sync(device)?;
    let start = Instant::now();
    let mut keep = Vec::with_capacity(n);
    for _ in 0..n {
        keep.push(op());
    }
    let queued = start.elapsed().as_secs_f64();
    Gpu::sync(device)?;
    let total = start.elapsed().as_secs_f64();
    drop(keep);
    Ok((queued * 1e6 / n as f64, total * 1e6 / n as f64))
}

fn emit(path: &str, launches_per_op: usize, (host, total): (f64, f64)) {
    let per = launches_per_op as f64;
    println!(
        "{}",
        serde_json::json!({
            "bench": "launch",
            "path": path,
            "launches_per_op": launches_per_op,
            "host_us_per_launch": (host / per * 100.0).round() / 100.0,
            "total_us_per_launch": (total / per * 100.0).round() / 100.0,
        })
    );
}

/// `news2stock-dev bench-launch`.
pub fn bench_launch(n: usize) -> Result<()> {
    let device = CudaDevice::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<Gpu, 2>::random([8, 4096], normal, &device);
    let y = Tensor::<Gpu, 2>::random([8, 4096], normal, &device);
    emit("burn add", 1, time(n, &device, || x.clone() + y.clone())?);

    let xa = Tensor::<Ad, 2>::random([8, 4096], normal, &device).require_grad();
    let ya = Tensor::<Ad, 2>::random([8, 4096], normal, &device);
    emit(
        "burn add, autodiff recorded",
        1,
        time(n, &device, || xa.clone() + ya.clone())?,
    );

    let x3 = x.clone().reshape([1, 8, 4096]);
    let w = Tensor::<Gpu, 1>::ones([4096], &device);
    if cuda::rms_norm(&x3, &w, 1e-5).is_some() {
        emit(
            "burn-cuda-ops cubecl kernel (rms_norm)",
            1,
            time(n, &device, || cuda::rms_norm(&x3, &w, 1e-5))?,
        );
    }
    let wl = Tensor::<Gpu, 2>::random([4096, 64], normal, &device);
    if cuda::frozen_linear(&x, &wl, None).is_some() {
        emit(
            "burn-cuda-ops cuBLASLt GEMM task (frozen_linear)",
            1,
            time(n, &device, || cuda::frozen_linear(&x, &wl, None))?,
        );
    }
    Ok(())
}

/// The parts of a cuBLASLt task's host cost, and the decode step's GEMM shapes on both paths
/// (`news2stock-dev bench-launch --parts`): a queued task that does nothing, one that resolves
/// three tensors' device pointers (what every GEMM task does first), and a batch-1 projection
/// `[1, 4096] x [4096, out]` through `frozen_linear` and through Burn's `matmul`.
#[cfg(feature = "fusion")]
pub fn bench_launch_parts(_n: usize) -> Result<()> {
    anyhow::bail!(
        "bench-launch --parts needs the raw CUDA backend: build without --features fusion"
    )
}

/// See the `fusion` build's stub above: the raw handles exist only without Burn's fusion.
#[cfg(not(feature = "fusion"))]
pub fn bench_launch_parts(n: usize) -> Result<()> {
    use burn::tensor::TensorPrimitive;
    let device = CudaDevice::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let raw = |t: &Tensor<Gpu, 2>| match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => p.handle,
        TensorPrimitive::QFloat(p) => p.handle,
    };
    let x = Tensor::<Gpu, 2>::random([8, 4096], normal, &device);
    let wl = Tensor::<Gpu, 2>::random([4096, 64], normal, &device);
    // A queued task's error only surfaces at a later call: run one task to completion first, so
    // that a failing path stops here instead of being timed.
    let hs = vec![raw(&x), raw(&wl), raw(&x)];
    cuda::device::run(&device, hs, |_, _| Ok(())).map_err(anyhow::Error::msg)?;
    emit(
        "device task, queued, nothing resolved",
        1,
        time(n, &device, || {
            cuda::device::enqueue(&device, Vec::new(), |_, _| Ok(())).map_err(anyhow::Error::msg)
        })?,
    );
    emit(
        "device task, queued, 3 tensors resolved",
        1,
        time(n, &device, || {
            let hs = vec![raw(&x), raw(&wl), raw(&x)];
            cuda::device::enqueue(&device, hs, |_, _| Ok(())).map_err(anyhow::Error::msg)
        })?,
    );
    let x1 = Tensor::<Gpu, 2>::random([1, 4096], normal, &device);
    for out in [4096usize, 14336] {
        let w = Tensor::<Gpu, 2>::random([4096, out], normal, &device);
        let m = (n / 5).max(20);
        if cuda::frozen_linear(&x1, &w, None).is_some() {
            emit(
                &format!("decode GEMM [1, 4096] x [4096, {out}], frozen_linear"),
                1,
                time(m, &device, || cuda::frozen_linear(&x1, &w, None))?,
            );
        }
        emit(
            &format!("decode GEMM [1, 4096] x [4096, {out}], Burn matmul"),
            1,
            time(m, &device, || x1.clone().matmul(w.clone()))?,
        );
    }
    Ok(())
}
