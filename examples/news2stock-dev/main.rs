//! `news2stock-dev`: the developer tools of the news2stock example, kept out of the user CLI:
//! training throughput, model timings, batched generation, adapter-init timings and adapter-kernel throughput on the
//! Llama-3.1-8B shape (random weights), each printing the lines `scripts/gpu_fused_run.sh` and
//! the anchors in `scripts/` compare. LoRA and training flags go before or after the tool's
//! name: `news2stock-dev --lora-r 8 bench-train --steps 6` and
//! `news2stock-dev bench-train --steps 6 --lora-r 8` are the same.

#[path = "../news2stock/cli.rs"]
#[allow(dead_code)]
mod cli;
#[path = "../news2stock/launch.rs"]
#[allow(dead_code)]
mod launch;
#[path = "../news2stock/settings.rs"]
#[allow(dead_code)]
mod settings;

mod bench_generate;
mod bench_init;
#[cfg(feature = "cuda")]
mod bench_launch;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod bench_linear;
mod bench_train;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(target_os = "linux")]
mod host_profile;

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use cli::{LoraArgs, TrainingArgs};
use settings::Settings;

type Cpu = burn::backend::NdArray<f32>;

/// Developer tools of news2stock: benchmarks of the training step, the model, the adapter
/// inits and the adapter kernels.
#[derive(Parser, Debug)]
#[command(name = "news2stock-dev", version)]
struct DevCli {
    /// The tool.
    #[command(subcommand)]
    tool: Tool,
    /// LoRA settings (bench-train, bench-init).
    #[command(flatten, next_help_heading = "LoRA")]
    lora: LoraArgs,
    /// Training settings (bench-train).
    #[command(flatten, next_help_heading = "Training")]
    training: TrainingArgs,
}

/// The tools (their names are the command names the GPU scripts call).
#[derive(Subcommand, Debug, Clone)]
#[allow(clippy::enum_variant_names)]
enum Tool {
    /// Training throughput on the Llama-3.1-8B shape with random weights and random tokens
    /// (the same setup as `peft_baseline.py`): warm-up steps, then timed steps.
    BenchTrain {
        /// Tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 8)]
        steps: u64,
        /// Untimed warm-up steps (autotuning, compilation).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Use a tiny model instead of the 8B shape (to check the command on CPU).
        #[arg(long)]
        tiny: bool,
        /// Data-parallel processes on this host, one per GPU (NCCL; the GPU build): tokens/s
        /// count every process.
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
    },
    /// Model checks and timings: CPU-f32 fixture parity of this backend, then (unless
    /// `--skip-8b`) random-init time, forward time (batch 1 x 1024) and greedy decode tokens/s
    /// on the Llama-3.1-8B shape.
    BenchModel {
        /// A fixture folder (`fixtures/llama/<case>`) to compare logits with.
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// Skip the 8B timings.
        #[arg(long)]
        skip_8b: bool,
    },
    /// Batched greedy generation on the Llama-3.1-8B shape (random weights): prompt ~600
    /// tokens, 256 new tokens per row, one JSON line per batch size.
    BenchGenerate {
        /// Batch sizes (rows), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        batch: Vec<usize>,
        /// Prompt tokens per row.
        #[arg(long, default_value_t = 600)]
        prompt_len: usize,
        /// New tokens per row (no stop ids: every row generates all of them).
        #[arg(long, default_value_t = 256)]
        new_tokens: usize,
        /// Use a tiny model instead of the 8B shape (to check the command on CPU).
        #[arg(long)]
        tiny: bool,
        /// Time `news2stock eval`'s side-by-side pass instead: each batch's prompts twice in one
        /// call (base rows and rows routed to a q,v r8 adapter) against the two sides one after
        /// the other (issue 19's target: <= 0.6x).
        #[arg(long)]
        side_by_side: bool,
        /// Sample instead of greedy: temperature 0.6, top-k 50, top-p 0.9 (Llama 3 instruct's
        /// settings; the anchor's `--sample`). Not with `--side-by-side`.
        #[arg(long, conflicts_with = "side_by_side")]
        sample: bool,
    },
    /// Time a weight-decomposing init (pissa, pissa_niter_N, olora) on the 8B shape's q_proj and
    /// v_proj of every layer (random weights; the decomposition runs on the CPU).
    BenchInit {
        /// pissa, pissa_niter_N or olora.
        #[arg(long, default_value = "pissa")]
        method: String,
        /// Decoder layers (32 in Llama-3.1-8B).
        #[arg(long, default_value_t = 32)]
        layers: usize,
    },
    /// The host's cost of one launch on each path (Burn op, autodiff recording, cubecl kernel,
    /// cuBLASLt task) on tiny tensors; JSON lines (GPU build).
    BenchLaunch {
        /// Launches timed per path.
        #[arg(long, default_value_t = 5000)]
        launches: usize,
        /// Also the parts of a cuBLASLt task (an empty queued task, pointer resolution) and the
        /// batch-1 decode GEMMs through `frozen_linear` and Burn's `matmul`.
        #[arg(long)]
        parts: bool,
    },
    /// Adapter kernel throughput on the Llama-8B shapes (LoRA and DoRA forward, forward +
    /// backward, merged vs unmerged inference, ratio to the frozen GEMM alone); JSON lines.
    BenchLinear {
        /// Only the headline shapes (4096 tokens, 4096->4096 and 4096->1024, r 16), LoRA and DoRA.
        #[arg(long)]
        quick: bool,
        /// Also time the composed (unfused) path on the headline shape.
        #[arg(long)]
        composed: bool,
        /// Timed iterations per figure.
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
}

fn main() {
    if let Err(e) = profiled(run) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `f` under the host profiler when `PEFT_HOST_PROFILE` names a file (Linux; `host_profile`).
fn profiled(f: impl FnOnce() -> Result<()>) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        let profile = host_profile::start()?;
        let out = f();
        if let Some(p) = profile {
            p.finish()?;
        }
        out
    }
    #[cfg(not(target_os = "linux"))]
    {
        if std::env::var_os("PEFT_HOST_PROFILE").is_some() {
            anyhow::bail!("PEFT_HOST_PROFILE needs Linux (pprof's SIGPROF sampling)");
        }
        f()
    }
}

fn run() -> Result<()> {
    // The settings flags are global: accepted before and after the tool's name (the GPU
    // scripts put them before).
    let matches = DevCli::command().mut_args(|a| a.global(true)).get_matches();
    let cli = DevCli::from_arg_matches(&matches)?;
    let cpu = matches!(
        cli.tool,
        Tool::BenchTrain { tiny: true, .. }
            | Tool::BenchModel { skip_8b: true, .. }
            | Tool::BenchInit { .. }
            | Tool::BenchGenerate { tiny: true, .. }
    ) && !cfg!(feature = "cuda");
    let s = Settings {
        lora: cli.lora,
        training: cli.training,
        on_cpu: cpu,
        ..Default::default()
    };
    s.validate()?;
    if let Tool::BenchTrain { nproc_per_node, .. } = cli.tool {
        let launch = launch::LaunchArgs {
            nproc_per_node,
            ..Default::default()
        };
        if launch::launch_if_asked(&launch)? {
            return Ok(());
        }
    }
    let world = launch::worker_world()?.filter(|w| w.world_size > 1);
    if world.is_some() && !matches!(cli.tool, Tool::BenchTrain { .. }) {
        anyhow::bail!("only bench-train runs as several processes (RANK / WORLD_SIZE are set)");
    }
    if cpu {
        return dispatch::<Cpu>(&s, &cli.tool, &Default::default(), &data_parallel::Solo);
    }
    gpu(&s, &cli.tool, world)
}

fn dispatch<B: Backend>(
    s: &Settings,
    tool: &Tool,
    device: &B::Device,
    comm: &dyn data_parallel::Communicator,
) -> Result<()> {
    match tool {
        Tool::BenchTrain {
            seq,
            steps,
            warmup,
            tiny,
            ..
        } => bench_train::bench_train::<burn::backend::Autodiff<B>>(
            s, *seq, *steps, *warmup, *tiny, device, comm,
        ),
        Tool::BenchModel { fixture, skip_8b } => {
            bench_train::bench_model::<B>(fixture.as_deref(), *skip_8b, device)
        }
        Tool::BenchInit { method, layers } => {
            bench_init::bench_init::<B>(s, method, *layers, device)
        }
        Tool::BenchGenerate {
            batch,
            prompt_len,
            new_tokens,
            tiny,
            side_by_side,
            sample,
        } => match side_by_side {
            true => bench_generate::bench_side_by_side::<B>(
                batch,
                *prompt_len,
                *new_tokens,
                *tiny,
                device,
            ),
            false => bench_generate::bench_generate::<B>(
                batch,
                *prompt_len,
                *new_tokens,
                *tiny,
                *sample,
                device,
            ),
        },
        Tool::BenchLinear { .. } => {
            anyhow::bail!("bench-linear runs on the GPU build (--features cuda)")
        }
        Tool::BenchLaunch { .. } => {
            anyhow::bail!("bench-launch runs on the GPU build (--features cuda)")
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu(s: &Settings, tool: &Tool, world: Option<data_parallel::World>) -> Result<()> {
    use burn::backend::cuda::CudaDevice;
    type Gpu = burn::backend::Cuda<half::bf16>;
    if let Tool::BenchLinear {
        quick,
        composed,
        iters,
    } = tool
    {
        return fused::bench_linear(*quick, *composed, *iters);
    }
    if let Tool::BenchLaunch { launches, parts } = tool {
        bench_launch::bench_launch(*launches)?;
        if *parts {
            bench_launch::bench_launch_parts(*launches)?;
        }
        return Ok(());
    }
    let Some(w) = world else {
        return dispatch::<Gpu>(s, tool, &CudaDevice::default(), &data_parallel::Solo);
    };
    let (comm, watchdog) = launch::join_nccl(&w)?;
    let done = dispatch::<Gpu>(s, tool, &CudaDevice::new(w.local_rank), &comm);
    watchdog.shutdown();
    done
}

#[cfg(not(feature = "cuda"))]
fn gpu(_s: &Settings, _tool: &Tool, _world: Option<data_parallel::World>) -> Result<()> {
    anyhow::bail!(
        "this build has no GPU backend; the developer tools run on an NVIDIA GPU: cargo run --release --features cuda --example news2stock-dev -- TOOL\n\
         (bench-train --tiny, bench-model --skip-8b and bench-init also run on the CPU build)"
    )
}
