//! The NCCL communicator on real GPUs (feature `nccl`; ignored by default: it needs a CUDA
//! driver, one or more GPUs and a loadable `libnccl.so`). On a GPU box:
//! `LD_LIBRARY_PATH=<dir with libnccl.so> NCCL_NVLS_ENABLE=0 cargo test --release -p
//! data-parallel --features nccl --test nccl -- --ignored`. It fails, never skips, when the
//! driver or NCCL is missing. One test runs everywhere: the error without a driver.
#![cfg(feature = "nccl")]

use data_parallel::{free_port, Communicator, Nccl, RendezvousOptions, World};

fn gpus() -> usize {
    // SAFETY: only tries to load the library.
    assert!(
        unsafe { cudarc::driver::sys::is_culib_present() },
        "no CUDA driver (libcuda.so)"
    );
    cudarc::driver::CudaContext::device_count().expect("a CUDA driver") as usize
}

/// Without a CUDA driver (CI's machines), joining is an error that names the driver library,
/// not cudarc's panic; with one, a world of one joins.
#[test]
fn a_missing_driver_is_an_error_naming_it() {
    let driver = data_parallel::cuda_device_count().is_ok();
    let world = World::localhost(0, 1, free_port().unwrap());
    match Nccl::connect(&world, 0, &RendezvousOptions::default()) {
        Err(e) if !driver => assert!(e.to_string().contains("libcuda.so"), "{e}"),
        Err(e) => assert!(e.to_string().contains("libnccl"), "driver present: {e}"),
        Ok(_) => assert!(driver, "joined without a driver"),
    }
}

/// Every rank of a world of `n` (one thread and one GPU each) sums and broadcasts through NCCL.
fn collectives_on(n: usize) {
    let port = free_port().unwrap();
    let opts = RendezvousOptions::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                s.spawn(move || {
                    let world = World::localhost(rank, n, port);
                    let (comm, rdv) = Nccl::connect(&world, rank, &opts).unwrap();
                    assert_eq!((comm.rank(), comm.world_size()), (rank, n));
                    let mut v: Vec<f32> = (0..1000).map(|i| (i * (rank + 1)) as f32).collect();
                    comm.all_reduce_sum(&mut v).unwrap();
                    let k = (n * (n + 1) / 2) as f32;
                    assert!(v.iter().enumerate().all(|(i, x)| *x == i as f32 * k));
                    let mut b = vec![rank as f32 + 7.0; 33];
                    comm.broadcast(&mut b, n - 1).unwrap();
                    assert!(b.iter().all(|x| *x == (n - 1) as f32 + 7.0));
                    comm.barrier().unwrap();
                    rdv.into_watchdog(|f| panic!("watchdog fired: {f}"))
                        .shutdown();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

#[test]
#[ignore = "needs a GPU and libnccl.so: run with --ignored on a GPU box"]
fn one_rank_on_one_gpu() {
    assert!(gpus() >= 1, "no CUDA device");
    collectives_on(1);
}

#[test]
#[ignore = "needs two GPUs and libnccl.so: run with --ignored on a GPU box"]
fn two_ranks_on_two_gpus() {
    assert!(gpus() >= 2, "{} CUDA device(s); this test needs 2", gpus());
    collectives_on(2);
}
