//! torchrun's local part: start one process per GPU of this node with the variables
//! [`crate::World::from_env`] reads, wait, and stop them all when one fails.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::nccl_lib::nccl_loader_dir;

/// How long the other children may take to exit on their own (their watchdogs see the failed
/// rank) before they are killed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often the children's status is polled.
const POLL: Duration = Duration::from_millis(20);

/// What to launch on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Processes on this node (one per GPU).
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index, `0..nnodes`; node 0 hosts rank 0.
    pub node_rank: usize,
    /// Host of rank 0 as every node reaches it.
    pub master_addr: String,
    /// Port of rank 0's rendezvous.
    pub master_port: u16,
    /// The program every child runs.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables of the children (the rank variables override these).
    pub env: Vec<(String, String)>,
}

/// Runs `spec.nproc_per_node` children of `spec.program` and waits for them.
///
/// Child `local` gets `RANK = node_rank * nproc_per_node + local`, `WORLD_SIZE = nnodes *
/// nproc_per_node`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, and
/// `NCCL_NVLS_ENABLE=0` unless this process's environment (or `spec.env`) sets
/// `NCCL_NVLS_ENABLE`: NVLink multicast (NVLS) must stay off on the machines this project is
/// measured on, and users who want it set the variable themselves. When NCCL is found, the
/// directory of [`nccl_loader_dir`] (cache under `$XDG_CACHE_HOME` or `~/.cache`) goes in
/// front of the children's `LD_LIBRARY_PATH`: the dynamic loader reads that variable at
/// process start, so it must be set before the child starts.
///
/// Returns `Ok` when every child exits with status 0. When one fails, the others get
/// [`KILL_GRACE`] to exit, are then killed, and the error names the first failed rank and its
/// exit status. It is also an error when NCCL is found but the `libnccl.so` symlink cannot
/// be made ([`Error::NcclLink`]).
pub fn launch(spec: &LaunchSpec) -> Result<()> {
    check_spec(spec)?;
    let ld_library_path = library_path(spec)?;
    let world_size = spec.nnodes * spec.nproc_per_node;
    let nvls_set = std::env::var_os("NCCL_NVLS_ENABLE").is_some()
        || spec.env.iter().any(|(k, _)| k == "NCCL_NVLS_ENABLE");

    let mut children = Children(Vec::new());
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", spec.master_port.to_string());
        if !nvls_set {
            cmd.env("NCCL_NVLS_ENABLE", "0");
        }
        if let Some(path) = &ld_library_path {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            rank,
            program: spec.program.clone(),
            source,
        })?;
        children.0.push(Running {
            rank,
            local_rank: local,
            child,
            status: None,
        });
    }
    children.wait_all()
}

/// Binds 127.0.0.1:0 and returns the port the OS chose (free now; another process may take it
/// before it is used).
pub fn free_port() -> Result<u16> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::FreePort { source })
}

fn check_spec(spec: &LaunchSpec) -> Result<()> {
    let bad = |field, value: String, expected: String| {
        Err(Error::LaunchSpec {
            field,
            value,
            expected,
        })
    };
    if spec.nproc_per_node == 0 {
        return bad("nproc_per_node", "0".into(), "at least 1".into());
    }
    if spec.nnodes == 0 {
        return bad("nnodes", "0".into(), "at least 1".into());
    }
    if spec.node_rank >= spec.nnodes {
        return bad(
            "node_rank",
            spec.node_rank.to_string(),
            format!("a node index in 0..{} (below nnodes)", spec.nnodes),
        );
    }
    if spec.master_addr.trim().is_empty() {
        return bad(
            "master_addr",
            format!("{:?}", spec.master_addr),
            "rank 0's host".into(),
        );
    }
    if spec.master_port == 0 {
        return bad("master_port", "0".into(), "a TCP port in 1..=65535".into());
    }
    Ok(())
}

/// The children's `LD_LIBRARY_PATH` with NCCL's loader directory in front; `None` leaves the
/// inherited (or `spec.env`'s) value alone.
fn library_path(spec: &LaunchSpec) -> Result<Option<OsString>> {
    let Some(dir) = nccl_loader_dir(&nccl_cache_dir())? else {
        return Ok(None);
    };
    let current = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "LD_LIBRARY_PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("LD_LIBRARY_PATH"));
    let mut paths = vec![dir];
    if let Some(current) = current {
        paths.extend(std::env::split_paths(&current).filter(|p| !p.as_os_str().is_empty()));
    }
    // Paths holding ':' cannot be listed; leave the variable alone rather than break it.
    Ok(std::env::join_paths(paths).ok())
}

/// Where the `libnccl.so` symlink goes when one is needed.
fn nccl_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("data-parallel").join("nccl")
}

struct Running {
    rank: usize,
    local_rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// The children of one launch; any still running when it drops are killed and reaped.
struct Children(Vec<Running>);

impl Children {
    /// Waits for every child; on the first failure, gives the others [`KILL_GRACE`], then
    /// kills them.
    fn wait_all(mut self) -> Result<()> {
        let mut first_failure: Option<(usize, usize, ExitStatus)> = None;
        let mut kill_at: Option<Instant> = None;
        loop {
            for r in self.0.iter_mut().filter(|r| r.status.is_none()) {
                let status = r.child.try_wait().map_err(|source| Error::Wait {
                    rank: r.rank,
                    source,
                })?;
                if let Some(status) = status {
                    r.status = Some(status);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((r.rank, r.local_rank, status));
                        kill_at = Some(Instant::now() + KILL_GRACE);
                    }
                }
            }
            if self.0.iter().all(|r| r.status.is_some()) {
                break;
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                self.kill_running();
                break;
            }
            thread::sleep(POLL);
        }
        match first_failure {
            None => Ok(()),
            Some((rank, local_rank, status)) => Err(Error::ChildFailed {
                rank,
                local_rank,
                status,
            }),
        }
    }

    /// Kills and reaps every child still running.
    fn kill_running(&mut self) {
        for r in self.0.iter_mut().filter(|r| r.status.is_none()) {
            // Errors mean the child already exited; `wait` then reaps it either way.
            let _ = r.child.kill();
            r.status = r.child.wait().ok();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_running();
    }
}
