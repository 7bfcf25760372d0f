//! Several GPUs, as `torchrun` / `accelerate launch` give a PEFT script: `news2stock train
//! --nproc-per-node N ...` starts N copies of this program with the same command line, one per
//! GPU (`data_parallel::launch`). Each copy finds its place in torchrun's environment (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), joins the others through NCCL
//! (the unique id travels over a TCP rendezvous at the master address, so the same lines run
//! across hosts: one launcher per host with `--nnodes` and `--node-rank`) and trains its shard.
//! A process started by torchrun itself (or by hand with those variables) is a worker as well.

use anyhow::{bail, Result};
use clap::Args;
use data_parallel::{LaunchSpec, World};

/// Processes and hosts (torchrun's flags).
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Training processes on this host, one per GPU (torchrun's --nproc-per-node).
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Hosts taking part (each runs this command with its own --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This host's index among the --nnodes hosts.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of the host of rank 0 (where the rendezvous listens).
    #[arg(long, default_value = data_parallel::DEFAULT_MASTER_ADDR)]
    pub master_addr: String,
    /// Port of the rendezvous on --master-addr.
    #[arg(long, default_value_t = data_parallel::DEFAULT_MASTER_PORT)]
    pub master_port: u16,
}

impl Default for LaunchArgs {
    fn default() -> Self {
        crate::cli::defaults()
    }
}

impl LaunchArgs {
    /// Processes over all hosts.
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    fn validate(&self) -> Result<()> {
        if self.nproc_per_node == 0 {
            bail!("--nproc-per-node 0: expected at least 1 process");
        }
        if self.nnodes == 0 {
            bail!("--nnodes 0: expected at least 1 host");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {}: expected a host index below --nnodes {}",
                self.node_rank,
                self.nnodes
            );
        }
        Ok(())
    }
}

/// The data-parallel world this process belongs to, from torchrun's environment (`None`: a
/// single process). A world of several processes needs the CUDA build (NCCL).
pub fn worker_world() -> Result<Option<World>> {
    let world = World::from_env()?;
    if let Some(w) = &world {
        if w.world_size > 1 && !cfg!(feature = "cuda") {
            bail!(
                "this process is rank {} of {} (RANK / WORLD_SIZE are set), but data-parallel \
                 training runs through NCCL and needs the CUDA build: cargo run --release \
                 --features cuda --example news2stock -- train --nproc-per-node N ...",
                w.rank,
                w.world_size
            );
        }
    }
    Ok(world)
}

/// Joins the NCCL world of `w` on GPU `w.local_rank`, under a watchdog that ends this process
/// with an error naming a rank that dies or stops answering (instead of a hang in a collective).
/// Shut the watchdog down when the job is done.
#[cfg(feature = "cuda")]
pub fn join_nccl(w: &World) -> Result<(data_parallel::Nccl, data_parallel::Watchdog)> {
    let opts = data_parallel::RendezvousOptions::from_env()?;
    let (comm, rdv) = data_parallel::Nccl::connect(w, w.local_rank, &opts)?;
    let rank = w.rank;
    let watchdog = rdv.into_watchdog(move |f| {
        eprintln!("error: rank {rank} stops: {f}");
        std::process::exit(1);
    });
    Ok((comm, watchdog))
}

/// When this process was asked for several processes and is not one of them already: starts
/// them (this program, the same arguments) and waits. `Ok(false)`: run the job here.
pub fn launch_if_asked(a: &LaunchArgs) -> Result<bool> {
    a.validate()?;
    if a.world_size() == 1 || World::from_env()?.is_some() {
        return Ok(false);
    }
    if !cfg!(feature = "cuda") {
        bail!(
            "--nproc-per-node {} --nnodes {}: data-parallel training runs through NCCL and needs \
             the CUDA build: cargo run --release --features cuda --example news2stock -- train \
             --nproc-per-node N ...",
            a.nproc_per_node,
            a.nnodes
        );
    }
    let spec = LaunchSpec {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr.clone(),
        master_port: a.master_port,
        program: std::env::current_exe()?,
        args: std::env::args().skip(1).collect(),
        env: vec![],
    };
    println!(
        "starting {} training processes on this host ({} in all), rendezvous at {}:{}",
        a.nproc_per_node,
        a.world_size(),
        a.master_addr,
        a.master_port
    );
    data_parallel::launch(&spec)?;
    Ok(true)
}
