//! Multi-process data-parallel plumbing, torchrun-style: one process per GPU, a rank each.
//!
//! The crate knows nothing of models, LoRA, Burn or CUDA; it depends on `std` and `thiserror`.
//!
//! - [`World`]: this process's rank, world size, local rank and rank 0's address, read from
//!   torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!   `MASTER_ADDR`, `MASTER_PORT`) by [`World::from_env`]; `Ok(None)` for a single process.
//! - [`Communicator`]: the collectives a trainer needs (`all_reduce_sum`, `broadcast`,
//!   `barrier` over `f32` buffers). [`Solo`] is the world of one. [`InProcess`] runs a world of
//!   threads, for tests only; on GPUs the collective is NCCL.
//! - [`rendezvous`]: rank 0 hands every rank a payload (NCCL's unique id) over TCP at
//!   `MASTER_ADDR:MASTER_PORT`; rank 0 checks each worker's world size and rank.
//! - [`Watchdog`] ([`Rendezvous::into_watchdog`]): heartbeats over the rendezvous connections,
//!   so that a rank that exits or goes silent becomes a [`Failure`] reported on every rank
//!   within a bounded time, instead of a collective that waits forever. The crate never exits
//!   the process; the caller's `on_failure` decides.
//! - [`launch`]: torchrun's local part: start `nproc_per_node` children with those variables,
//!   stop them all when one fails.
//!
//! ```
//! use data_parallel::{Communicator, InProcess};
//! let handles = InProcess::world(2);
//! let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let threads: Vec<_> = handles
//!         .into_iter()
//!         .map(|comm| {
//!             s.spawn(move || {
//!                 let mut grad = vec![comm.rank() as f32 + 1.0; 3];
//!                 comm.all_reduce_sum(&mut grad)?;
//!                 Ok::<_, data_parallel::Error>(grad)
//!             })
//!         })
//!         .collect();
//!     threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
//! });
//! assert_eq!(sums, vec![vec![3.0; 3], vec![3.0; 3]]);
//! ```
//!
//! # NCCL's library
//!
//! The NCCL communicator (cudarc) loads NCCL at run time by the name `libnccl.so`. NCCL's
//! packages and the pip wheel `nvidia-nccl-cu12` install `libnccl.so.2` only (the unversioned
//! name comes with `libnccl-dev`). So a directory in which `libnccl.so` resolves must be on the
//! processes' `LD_LIBRARY_PATH` when they start (the loader reads the variable at start-up;
//! setting it from inside the process is too late). [`launch`] does this itself with
//! [`nccl_loader_dir`]. Processes started any other way (torchrun, a scheduler) need it done by
//! hand: install `libnccl-dev`, or link `libnccl.so -> libnccl.so.2` in a directory of your
//! own and put that directory on `LD_LIBRARY_PATH`. [`nccl_library_dir`] shows where NCCL was
//! found.
//!
//! [`launch`] also sets `NCCL_NVLS_ENABLE=0` unless the environment sets it: NVLink multicast
//! must stay off on the machines this project is measured on.

#![warn(missing_docs)]

mod comm;
mod error;
mod failure;
mod frame;
mod handshake;
mod in_process;
mod launch;
#[cfg(feature = "nccl")]
mod nccl;
mod nccl_lib;
mod options;
mod rendezvous;
mod watchdog;
mod world;

pub use comm::{Communicator, Solo};
pub use error::{Error, Result};
pub use failure::{Failure, FailureKind};
pub use handshake::HandshakeMismatch;
pub use in_process::InProcess;
pub use launch::{free_port, launch, LaunchSpec, KILL_GRACE};
#[cfg(feature = "nccl")]
pub use nccl::{cuda_device_count, Nccl};
pub use nccl_lib::{nccl_library_dir, nccl_loader_dir};
pub use options::{RendezvousOptions, PEER_TIMEOUT_VAR};
pub use rendezvous::{rendezvous, Rendezvous};
pub use watchdog::Watchdog;
pub use world::{World, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT};
