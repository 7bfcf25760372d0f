//! `news2stock`: fine-tune NCSOFT/Llama-VARCO-8B-Instruct on Korean economic news with LoRA,
//! evaluate it and run inference. `--demo` runs the same pipeline on a tiny model, on CPU.

mod bench_init;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod bench_linear;
#[cfg(feature = "cuda")]
mod fused;
mod job;
mod metrics;
mod settings;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};

use settings::{Cli, Command, Settings};

type Cpu = burn::backend::NdArray<f32>;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let mut s: Settings = cli.settings.merge_file(&matches)?;
    if s.demo {
        s = s.demo_defaults(&matches);
    }
    s.validate()?;
    let cmd = cli.command.unwrap_or(Command::Train);
    if s.demo
        || matches!(
            cmd,
            Command::BenchTrain { tiny: true, .. }
                | Command::BenchModel { skip_8b: true, .. }
                | Command::BenchInit { .. }
        ) && !cfg!(feature = "cuda")
    {
        return dispatch::<Cpu>(&s, &cmd, &Default::default());
    }
    gpu(&s, &cmd)
}

fn dispatch<B: burn::tensor::backend::Backend>(
    s: &Settings,
    cmd: &Command,
    device: &B::Device,
) -> Result<()> {
    match cmd {
        Command::Train => job::train::<burn::backend::Autodiff<B>>(s, device),
        Command::Eval => job::eval::<B>(s, device),
        Command::Infer { input } => job::infer::<B>(s, input.as_deref(), device),
        Command::Merge { out, dtype } => job::merge::<B>(s, out, dtype, device),
        Command::BenchTrain {
            seq,
            steps,
            warmup,
            tiny,
        } => {
            job::bench_train::<burn::backend::Autodiff<B>>(s, *seq, *steps, *warmup, *tiny, device)
        }
        Command::BenchModel { fixture, skip_8b } => {
            job::bench_model::<B>(fixture.as_deref(), *skip_8b, device)
        }
        Command::BenchInit { method, layers } => {
            bench_init::bench_init::<B>(s, method, *layers, device)
        }
        Command::BenchLinear { .. } => {
            anyhow::bail!("bench-linear runs on the GPU build (--features cuda)")
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu(s: &Settings, cmd: &Command) -> Result<()> {
    type Gpu = burn::backend::Cuda<half::bf16>;
    let device = burn::backend::cuda::CudaDevice::default();
    match cmd {
        Command::BenchLinear {
            quick,
            composed,
            iters,
        } => return fused::bench_linear(*quick, *composed, *iters),
        _ => {}
    }
    // `--gradient-checkpointing true` recomputes per decoder layer (the trainer, with llama's
    // `backward_checkpointed`), on the plain autodiff backend.
    dispatch::<Gpu>(s, cmd, &device)
}

#[cfg(not(feature = "cuda"))]
fn gpu(_s: &Settings, _cmd: &Command) -> Result<()> {
    anyhow::bail!(
        "this build has no GPU backend. The full job needs an NVIDIA GPU: cargo run --release --features cuda --example news2stock\n\
         To run the whole pipeline on CPU with a tiny model and bundled data: cargo run --release --example news2stock -- --demo"
    )
}
