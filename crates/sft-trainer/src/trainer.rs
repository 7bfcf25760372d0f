//! The training loop, written out: warmup + schedule, accumulation micro-steps, clipping,
//! periodic logging, evaluation and checkpoints, and exact resume.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use peft_lora::adapter_dir;
use peft_lora::{write_f32, SafetensorsFile};
use peft_lora::{GradAccumulator, LoraOptimizer, PeftModel};

use data_parallel::{Communicator, Solo};

use crate::alloc::ExactAlloc;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{epoch_batches, make_batch, Sample};
use crate::distributed::{agree_on_start, broadcast_adapter, finish_step, shard};
use crate::error::{Error, Result};
use crate::metrics::{host_memory_mib, plot_loss, read_metrics, LogEntry, MetricsWriter};
use crate::phases::PhaseClock;
use crate::schedule::Schedule;
use crate::CausalLm;

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps done in total.
    pub global_step: u64,
    /// Mean loss of the first logging window of this process.
    pub first_loss: Option<f64>,
    /// Mean loss of the last logging window.
    pub last_loss: Option<f64>,
    /// Last evaluation loss.
    pub eval_loss: Option<f64>,
    /// Where the final adapter was written.
    pub adapter_dir: PathBuf,
    /// Mean training throughput (non-padding tokens per second, every process of a
    /// data-parallel run counted) of this run, over [`TrainSummary::step_secs`].
    pub tokens_per_s: f64,
    /// Wall time of this process's training steps: the loop without evaluations and
    /// checkpoint writes (the device is synchronised before each such pause).
    pub step_secs: f64,
    /// The step this process resumed from, if it resumed.
    pub resumed_from: Option<u64>,
}

/// Mean loss over `samples` with the adapters as they are (no dropout, no graph).
pub fn evaluate<B: Backend, M: CausalLm<B>>(
    model: &M,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
    device: &B::Device,
) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in samples.chunks(batch_size.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let batch = make_batch::<B>(&refs, pad_id, device);
        let loss: f64 = model.causal_lm_loss(&batch).into_scalar().elem::<f64>();
        sum += loss * batch.n_label_tokens as f64;
        n += batch.n_label_tokens;
    }
    sum / n.max(1) as f64
}

/// Trains adapter `adapter` of `peft` on `train`, evaluating on `eval`. With `resume`, continues
/// from the newest checkpoint in `cfg.output_dir` (and reaches what an uninterrupted run with the
/// same seed reaches).
pub fn train<AB, M>(
    peft: &mut PeftModel<AB, M>,
    adapter: &str,
    train: &[Sample],
    eval: &[Sample],
    cfg: &TrainConfig,
    resume: bool,
    device: &AB::Device,
) -> Result<TrainSummary>
where
    AB: AutodiffBackend,
    M: CausalLm<AB> + AutodiffModule<AB>,
    M::InnerModule: CausalLm<AB::InnerBackend>,
{
    train_data_parallel(peft, adapter, train, eval, cfg, resume, device, &Solo)
}

/// [`train`] as one process of a data-parallel run over `comm` (what `accelerate launch` gives
/// a PEFT script): this process trains on its shard of every epoch
/// ([`crate::distributed::shard`]), the gradients are averaged over the processes before
/// clipping, and only rank 0 logs, evaluates and writes files. Every process must call it with
/// the same model, data and settings; the global batch is
/// `per_device_train_batch_size * gradient_accumulation_steps * world_size`.
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel<AB, M>(
    peft: &mut PeftModel<AB, M>,
    adapter: &str,
    train: &[Sample],
    eval: &[Sample],
    cfg: &TrainConfig,
    resume: bool,
    device: &AB::Device,
    comm: &dyn Communicator,
) -> Result<TrainSummary>
where
    AB: AutodiffBackend,
    M: CausalLm<AB> + AutodiffModule<AB>,
    M::InnerModule: CausalLm<AB::InnerBackend>,
{
    cfg.validate()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let main = rank == 0;
    if train.is_empty() {
        return Err(Error::Config {
            field: "train dataset".into(),
            value: "0 samples".into(),
            expected: "at least one sample".into(),
        });
    }
    if !peft.configs.contains_key(adapter) {
        return Err(peft_lora::Error::UnknownAdapter(
            adapter.into(),
            peft.configs.keys().cloned().collect::<Vec<_>>().join(", "),
        )
        .into());
    }
    let out = cfg.output_dir.clone();
    let bs = cfg.per_device_train_batch_size;
    let accum = cfg.gradient_accumulation_steps;
    let micro_per_epoch = train.len().div_ceil(bs).div_ceil(world);
    let steps_per_epoch = (micro_per_epoch / accum).max(1) as u64;
    let total = if cfg.max_steps > 0 {
        cfg.max_steps
    } else {
        (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64
    };
    let schedule = Schedule {
        kind: cfg.lr_scheduler_type,
        lr: cfg.learning_rate,
        warmup_steps: Schedule::warmup_from(total, cfg.warmup_steps, cfg.warmup_ratio),
        total_steps: total,
    };
    let clip = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm);
    let mut opt = LoraOptimizer::<AB>::new(cfg.optimizer.clone(), cfg.adamw.clone());
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        batches_in_epoch: 0,
        seed: cfg.seed,
        max_steps: total,
        adapter: adapter.into(),
        world_size: world,
    };
    let metrics = MetricsWriter::new(&out);
    let mut resumed_from = None;
    if resume {
        if let Some(ck) = checkpoint::latest(&out) {
            state = checkpoint::read_state(&ck)?;
            if state.world_size != world {
                return Err(Error::Checkpoint {
                    path: ck,
                    message: format!(
                        "written by a run of {} process(es); this run has {world}. Resume with \
                         the same number of processes (each one's data shard and the global \
                         batch depend on it), or start a new run in another output_dir",
                        state.world_size
                    ),
                });
            }
            // Replace the adapter's weights with the checkpoint's; loading does not activate
            // (as in PEFT), so the active set is restored as it was.
            let active = peft.active.clone();
            peft.delete_adapter(adapter)?;
            peft.load_adapter(&adapter_dir(&ck, adapter), adapter)?;
            peft.set_active(&active.iter().map(String::as_str).collect::<Vec<_>>())?;
            let opt_file = SafetensorsFile::open(&ck.join("optimizer.safetensors"))?;
            let tensors = opt_file
                .shapes()
                .keys()
                .map(|k| opt_file.read(k).map(|t| (k.clone(), t)))
                .collect::<peft_lora::Result<_>>()?;
            opt.load_state(&tensors, device)?;
            if main {
                metrics.truncate_after(state.global_step)?;
            }
            resumed_from = Some(state.global_step);
        } else if main {
            let _ = std::fs::remove_file(metrics.path());
        }
    } else if main {
        let _ = std::fs::remove_file(metrics.path());
    }
    // Every process starts from rank 0's adapter.
    agree_on_start(comm, state.global_step, &out)?;
    broadcast_adapter(peft, adapter, comm, &out)?;
    opt.prepare(&mut peft.model);
    // Pages the memory pool kept from loading or building the model (temporaries of other
    // sizes than training uses) go back to the device before the first step.
    AB::memory_cleanup(device);
    if main {
        std::fs::write(
            out.join("train_config.json"),
            serde_json::to_string_pretty(cfg).expect("json"),
        )
        .map_err(|e| Error::io(&out, e))?;
    }

    let bar = progress_bar(cfg.progress_bar && main, total, state.global_step);
    let (mut win_loss, mut win_n, mut win_tokens) = (0.0f64, 0u64, 0usize);
    let mut win_start = Instant::now();
    let run_start = Instant::now();
    let mut off_clock = std::time::Duration::ZERO;
    let mut run_tokens = 0usize;
    let (mut first_loss, mut last_loss, mut eval_loss) = (None, None, None);
    let epoch_frac = |step: u64| step as f64 / steps_per_epoch as f64;

    // The order of the current epoch, shuffled once per epoch (a resume rebuilds it from the seed).
    let shard_of = |epoch| shard(epoch_batches(train.len(), bs, cfg.seed, epoch), rank, world);
    let mut batches = shard_of(state.epoch);
    let mut exact = ExactAlloc::from_env();
    let mut clock = PhaseClock::from_env();
    while state.global_step < total {
        // Dropout draws depend only on the seed and the step: a resumed run draws the same.
        let step_seed = cfg.seed.wrapping_mul(7919).wrapping_add(state.global_step);
        AB::seed(device, step_seed);
        peft_lora::seed_dropout(step_seed);
        let mut acc = GradAccumulator::<AB>::default();
        let mut step_loss = 0.0;
        let (mut step_tokens, mut bad_loss) = (0usize, None);
        // On one process the losses are read after the optimizer step is queued: reading one
        // waits for the device, and the device would then idle while the host queues the
        // gradient norm's launches. Several processes need them first (the step's header is
        // all-reduced before the gradients), and so does the phase clock.
        let defer_loss = world == 1 && !clock.is_on();
        let mut pending = Vec::new();
        for _ in 0..accum {
            if state.batches_in_epoch >= batches.len() {
                state.epoch += 1;
                state.batches_in_epoch = 0;
                batches = shard_of(state.epoch);
            }
            let refs: Vec<&Sample> = batches[state.batches_in_epoch]
                .iter()
                .map(|&i| &train[i])
                .collect();
            state.batches_in_epoch += 1;
            let batch = make_batch::<AB>(&refs, cfg.pad_token_id, device);
            let scale = 1.0 / accum as f64;
            exact.before_batch::<AB>(batch.input_ids.dims(), device);
            clock.micro_batch_start();
            let loss = exact.run::<AB, _>(device, || {
                let checkpointed = if cfg.gradient_checkpointing {
                    let model = &peft.model;
                    model.causal_lm_backward_checkpointed(&batch, scale, &mut |g| {
                        acc.add(model, g);
                        clock.grads_handed();
                    })
                } else {
                    None
                };
                match checkpointed {
                    Some(loss) => loss,
                    None => {
                        let loss = peft.model.causal_lm_loss(&batch);
                        // The backward is queued before the loss is read, so the device does not
                        // wait for the host in between; a non-finite loss stops the run below
                        // (its gradients are non-finite too, and the optimizer skips a step
                        // whose gradient norm is not finite).
                        let grads = (loss.clone() * scale).backward();
                        clock.grads_handed();
                        acc.add(&peft.model, &grads);
                        loss.inner()
                    }
                }
            });
            step_tokens += batch.n_tokens;
            if defer_loss {
                pending.push(loss);
                continue;
            }
            let read = loss_share(vec![loss], accum);
            clock.micro_batch_done();
            match read {
                Ok(share) => step_loss += share,
                Err(value) => {
                    bad_loss = Some(value);
                    break;
                }
            }
        }
        // Every rank's gradients averaged (and any rank's non-finite loss reported by all).
        let totals = finish_step(
            &mut acc,
            comm,
            step_loss,
            step_tokens,
            bad_loss,
            state.global_step + 1,
            &out,
        )?;
        let mut step_loss = totals.loss;
        win_tokens += totals.tokens;
        run_tokens += totals.tokens;
        let lr = schedule.lr_at(state.global_step);
        let norm = clock.optimizer::<AB, _>(state.global_step + 1, device, || {
            exact.run::<AB, _>(device, || opt.step(&mut peft.model, acc, lr, clip))
        });
        // The deferred losses, read now that the step's work is queued: a non-finite one stops
        // the run as it would have before the step (whose non-finite gradient norm left the
        // adapters and the optimizer's state untouched).
        match loss_share(pending, accum) {
            Ok(share) => step_loss += share,
            Err(value) => {
                return Err(Error::non_finite(
                    "loss",
                    state.global_step + 1,
                    value,
                    &out,
                ))
            }
        }
        if !norm.is_finite() {
            return Err(Error::non_finite(
                "gradient norm",
                state.global_step + 1,
                norm,
                &out,
            ));
        }
        state.global_step += 1;
        win_loss += step_loss;
        win_n += 1;
        bar.set_position(state.global_step);
        bar.set_message(format!("loss {step_loss:.4}"));

        let step = state.global_step;
        let is_last = step == total;
        if main && (step.is_multiple_of(cfg.logging_steps.max(1)) || is_last) {
            let secs = win_start.elapsed().as_secs_f64().max(1e-9);
            let mean = win_loss / win_n.max(1) as f64;
            first_loss.get_or_insert(mean);
            last_loss = Some(mean);
            metrics.write(&LogEntry {
                step,
                epoch: epoch_frac(step),
                loss: Some(mean),
                eval_loss: None,
                learning_rate: Some(lr),
                grad_norm: Some(norm),
                tokens_per_s: Some(win_tokens as f64 / secs),
                host_mem_mib: host_memory_mib(),
            })?;
            bar.println(format!(
                "step {step}/{total} epoch {:.2} loss {mean:.4} lr {lr:.2e} grad_norm {norm:.3} tok/s {:.0}",
                epoch_frac(step),
                win_tokens as f64 / secs
            ));
            (win_loss, win_n, win_tokens) = (0.0, 0, 0);
            win_start = Instant::now();
        }
        // Only rank 0 evaluates and writes; the others wait for it at the next collective.
        let do_eval = main
            && !eval.is_empty()
            && ((cfg.eval_steps > 0 && step.is_multiple_of(cfg.eval_steps)) || is_last);
        let do_save =
            main && ((cfg.save_steps > 0 && step.is_multiple_of(cfg.save_steps)) || is_last);
        // Evaluation and checkpoint writes stay off the throughput clocks: the device finishes
        // the step's queued work first, then the pause is timed and left out.
        let paused = (do_eval || do_save).then(|| {
            let _ = AB::sync(device);
            Instant::now()
        });
        if do_eval {
            let l = evaluate(
                &peft.model.valid(),
                eval,
                cfg.per_device_eval_batch_size,
                cfg.pad_token_id,
                device,
            );
            eval_loss = Some(l);
            metrics.write(&LogEntry {
                step,
                epoch: epoch_frac(step),
                loss: None,
                eval_loss: Some(l),
                learning_rate: None,
                grad_norm: None,
                tokens_per_s: None,
                host_mem_mib: None,
            })?;
            bar.println(format!("step {step}: eval_loss {l:.4}"));
        }
        if do_save {
            checkpoint::write(&out, &state, cfg.save_total_limit, |dir| {
                peft.save_adapter(dir, adapter)?;
                write_f32(&dir.join("optimizer.safetensors"), &opt.state_tensors())?;
                Ok(())
            })?;
        }
        if let Some(t0) = paused {
            let d = t0.elapsed();
            off_clock += d;
            win_start += d;
        }
    }
    let step_secs = (run_start.elapsed() - off_clock).as_secs_f64().max(1e-9);
    bar.finish_and_clear();
    let final_dir = if main {
        let dir = peft.save_adapter(&out, adapter)?;
        plot_loss(&read_metrics(metrics.path())?, &out.join("loss.png"))?;
        dir
    } else {
        adapter_dir(&out, adapter)
    };
    // The processes leave together, once rank 0's files are written.
    comm.barrier()?;
    Ok(TrainSummary {
        global_step: state.global_step,
        first_loss,
        last_loss,
        eval_loss,
        adapter_dir: final_dir,
        tokens_per_s: run_tokens as f64 / step_secs,
        step_secs,
        resumed_from,
    })
}

fn progress_bar(show: bool, total: u64, pos: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    bar.set_position(pos);
    bar
}

/// Reads the micro-batch `losses` (each `[1]`, one read each) and returns their sum divided by
/// `accum` (their share of the step's mean loss), or the first non-finite one.
fn loss_share<B: Backend>(
    losses: Vec<Tensor<B, 1>>,
    accum: usize,
) -> std::result::Result<f64, f64> {
    let mut sum = 0.0;
    for loss in losses {
        let value: f64 = loss.into_scalar().elem::<f64>();
        if !value.is_finite() {
            return Err(value);
        }
        sum += value / accum as f64;
    }
    Ok(sum)
}
