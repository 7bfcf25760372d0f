//! What a command line does: the subcommand's settings resolved, the backend chosen, the job
//! run.

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde_json::{Map, Value};

use data_parallel::{Communicator, Solo};

use crate::cli::{given_on_command_line, Cli, Command, DEFAULT_MODEL};
use crate::settings::{self, to_map, Resolved, Settings, Sources};
use crate::{job, launch, push};

type Cpu = burn::backend::NdArray<f32>;

/// Printed when a CPU build is asked for the tutorial's (8B) job.
pub const NO_GPU: &str = "this build has no GPU backend. The full job needs an NVIDIA GPU: cargo run --release --features cuda --example news2stock\n\
     To run the whole pipeline on CPU with a tiny model and bundled data: cargo run --release --example news2stock -- --demo\n\
     To fine-tune a small local model on CPU: news2stock train --model DIR --dataset FILE.jsonl";

/// The developer tools that were subcommands of news2stock before.
const DEV_TOOLS: &[&str] = &["bench-train", "bench-model", "bench-init", "bench-linear"];

/// A hint for a command line clap refused because of this CLI's layout: a setting given before
/// its subcommand, or a developer tool asked of the user CLI.
pub fn parse_error_hint(e: &clap::Error) -> Option<String> {
    let ContextValue::String(arg) = e
        .get(ContextKind::InvalidArg)
        .or(e.get(ContextKind::InvalidSubcommand))?
    else {
        return None;
    };
    match e.kind() {
        ErrorKind::InvalidSubcommand | ErrorKind::UnknownArgument
            if DEV_TOOLS.contains(&arg.as_str()) =>
        {
            Some(format!(
                "`{arg}` is a developer tool, in its own binary now: cargo run --release --features cuda --example news2stock-dev -- {arg}"
            ))
        }
        ErrorKind::UnknownArgument => {
            let flag = arg.split('=').next()?.strip_prefix("--")?;
            let cmd = Cli::command();
            let owners: Vec<&str> = cmd
                .get_subcommands()
                .filter(|sub| {
                    sub.get_arguments().any(|a| {
                        a.get_long() == Some(flag)
                            || a.get_all_aliases().unwrap_or_default().contains(&flag)
                    })
                })
                .map(|sub| sub.get_name())
                .collect();
            (!owners.is_empty()).then(|| {
                format!(
                    "`--{flag}` is a flag of `{}`: settings go after the subcommand, e.g. news2stock {} --demo --{flag} ...",
                    owners.join("`, `"),
                    owners[0]
                )
            })
        }
        _ => None,
    }
}

/// The settings groups of a subcommand as one JSON object (defaults included).
fn command_settings(command: &Command) -> Map<String, Value> {
    let mut m = Map::new();
    match command {
        Command::Train(a) => {
            m.extend(to_map(&a.model));
            m.extend(to_map(&a.data));
            m.extend(to_map(&a.template));
            m.extend(to_map(&a.lora));
            m.extend(to_map(&a.training));
            m.extend(to_map(&a.generation));
            m.extend(to_map(&a.score));
            m.extend(to_map(&a.hub));
        }
        Command::Eval(a) => {
            m.extend(to_map(&a.adapter));
            m.extend(to_map(&a.model));
            m.extend(to_map(&a.data));
            m.extend(to_map(&a.template));
            m.extend(to_map(&a.generation));
            m.extend(to_map(&a.score));
        }
        Command::Infer(a) => {
            m.extend(to_map(&a.adapter));
            m.extend(to_map(&a.model));
            m.extend(to_map(&a.template));
            m.extend(to_map(&a.generation));
        }
        Command::Merge(a) => {
            m.extend(to_map(&a.adapter));
            m.extend(to_map(&a.model));
        }
        Command::Push(_) => {}
    }
    m
}

/// The parsed command line: the subcommand (`train` when none), `--demo`, and the settings of
/// a job resolved from defaults, `--demo`, the adapter's saved run, `--config` and the flags.
pub fn resolve(matches: &ArgMatches) -> Result<(Command, bool, Option<Resolved>)> {
    let cli = Cli::from_arg_matches(matches)?;
    let demo = cli.global.demo;
    let command = cli
        .command
        .unwrap_or_else(|| Command::Train(Default::default()));
    if matches!(command, Command::Push(_)) {
        return Ok((command, demo, None));
    }
    let given: BTreeSet<String> = matches
        .subcommand()
        .map(|(_, m)| given_on_command_line(m))
        .unwrap_or_default();
    let flags = command_settings(&command);
    let mut sources = Sources {
        demo,
        config: command.config().or(cli.global.config.config.as_deref()),
        saved_run: None,
    };
    let mut resolved = settings::resolve(&flags, &given, &sources)?;
    if !matches!(command, Command::Train(_)) {
        // eval / infer / merge take over the base model and its inputs from the adapter's run.
        sources.saved_run = settings::saved_run(&resolved.settings.adapter_dir())?;
        if sources.saved_run.is_some() {
            resolved = settings::resolve(&flags, &given, &sources)?;
        }
    }
    resolved.settings.on_cpu = runs_on_cpu(&resolved)?;
    Ok((command, demo, Some(resolved)))
}

/// The demo runs on the CPU; otherwise the GPU build uses the GPU, and the CPU build runs any
/// model it is given but refuses the tutorial's 8B default.
fn runs_on_cpu(r: &Resolved) -> Result<bool> {
    if r.settings.demo {
        return Ok(true);
    }
    if cfg!(feature = "cuda") {
        return Ok(false);
    }
    if r.settings.model.model == DEFAULT_MODEL && !r.explicit.contains("model") {
        bail!("{NO_GPU}");
    }
    Ok(true)
}

/// Runs a parsed command line.
pub fn run(matches: &ArgMatches) -> Result<()> {
    let (command, demo, resolved) = resolve(matches)?;
    let Some(resolved) = resolved else {
        let Command::Push(args) = &command else {
            unreachable!("only push resolves no settings")
        };
        return push::run(args, demo);
    };
    let s = &resolved.settings;
    if let (Command::Train(_), Some(repo)) = (&command, &s.hub.push_to_hub) {
        // Before hours of training, not after.
        push::check_repo_id(repo)?;
        push::check_token(&hub_push::HubClient::from_env())?;
    }
    if let Command::Train(a) = &command {
        if launch::launch_if_asked(&a.launch)? {
            return Ok(());
        }
    }
    let world = launch::worker_world()?.filter(|w| w.world_size > 1);
    if world.is_some() && !matches!(command, Command::Train(_)) {
        bail!("only `train` runs as several processes (RANK / WORLD_SIZE are set); run eval, infer and merge as one");
    }
    if s.on_cpu {
        dispatch::<Cpu>(s, &command, &Default::default(), &Solo)
    } else {
        gpu(s, &command, world)
    }
}

fn dispatch<B: Backend>(
    s: &Settings,
    command: &Command,
    device: &B::Device,
    comm: &dyn Communicator,
) -> Result<()> {
    match command {
        Command::Train(_) => {
            job::train::<burn::backend::Autodiff<B>>(s, device, comm)?;
            if let (0, Some(repo)) = (comm.rank(), &s.hub.push_to_hub) {
                let req = push::PushRequest {
                    repo_id: repo,
                    private: s.hub.hub_private_repo,
                    revision: None,
                    commit_message: "Upload LoRA adapter (news2stock train --push-to-hub)",
                };
                push::push(
                    &hub_push::HubClient::from_env(),
                    &s.training.output_dir,
                    &req,
                )?;
            }
            Ok(())
        }
        Command::Eval(_) => job::eval::<B>(s, device),
        Command::Infer(a) => job::infer::<B>(s, a.input.as_deref(), device),
        Command::Merge(a) => job::merge::<B>(s, a.out.as_deref(), a.dtype, device),
        Command::Push(_) => unreachable!("push runs without a model"),
    }
}

#[cfg(feature = "cuda")]
fn gpu(s: &Settings, command: &Command, world: Option<data_parallel::World>) -> Result<()> {
    use burn::backend::cuda::CudaDevice;
    type Gpu = burn::backend::Cuda<half::bf16>;
    // `--gradient-checkpointing true` recomputes per decoder layer (the trainer, with llama's
    // `backward_checkpointed`), on the plain autodiff backend.
    let Some(w) = world else {
        return dispatch::<Gpu>(s, command, &CudaDevice::default(), &Solo);
    };
    // One GPU per process, NCCL between them.
    let (comm, watchdog) = launch::join_nccl(&w)?;
    let done = dispatch::<Gpu>(s, command, &CudaDevice::new(w.local_rank), &comm);
    watchdog.shutdown();
    done
}

#[cfg(not(feature = "cuda"))]
fn gpu(_s: &Settings, _command: &Command, _world: Option<data_parallel::World>) -> Result<()> {
    bail!("{NO_GPU}")
}
