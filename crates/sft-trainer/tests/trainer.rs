//! The training loop on a toy causal LM (embedding + adapted linear head): the loss falls,
//! a killed run resumes to the same result, a non-finite loss stops cleanly, bad settings fail
//! before any work.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use peft_lora::{LoraConfig, LoraLinear, LoraModel, OptimizerKind, PeftModel};
use sft_trainer::{train, Batch, CausalLm, Error, Sample, ScheduleKind, TrainConfig};
use test_support::host;

type AD = Autodiff<NdArray<f32>>;
const VOCAB: usize = 16;

#[derive(Module, Debug)]
struct ToyLm<B: Backend> {
    embed: Param<Tensor<B, 2>>,
    mix: LoraLinear<B>,
    head: LoraLinear<B>,
}

impl<B: Backend> ToyLm<B> {
    /// Weights from a local seeded RNG: Burn's backend RNG is global and tests run in parallel.
    fn new(device: &B::Device) -> Self {
        ToyLm {
            embed: Param::from_tensor(seeded([VOCAB, 8], 1, device)).set_require_grad(false),
            mix: LoraLinear::from_weight(seeded([8, 8], 2, device), None),
            head: LoraLinear::from_weight(
                seeded([8, VOCAB], 3, device),
                Some(seeded::<B, 2>([1, VOCAB], 4, device).reshape([VOCAB])),
            ),
        }
    }
}

impl<B: Backend> LoraModel<B> for ToyLm<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![
            ("model.mix".into(), &self.mix),
            ("model.head".into(), &self.head),
        ]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![
            ("model.mix".into(), &mut self.mix),
            ("model.head".into(), &mut self.head),
        ]
    }
}

impl<B: Backend> CausalLm<B> for ToyLm<B> {
    fn causal_lm_loss(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        let [b, s] = batch.input_ids.dims();
        let ids = batch.input_ids.clone().reshape([b * s]);
        let h = self.embed.val().select(0, ids).reshape([b, s, 8]);
        let logits = self.head.forward(self.mix.forward(h).tanh()); // [b, s, V]
        let logits = logits
            .slice([0..b, 0..s - 1, 0..VOCAB])
            .reshape([b * (s - 1), VOCAB]);
        let labels = batch
            .labels
            .clone()
            .slice([0..b, 1..s])
            .reshape([b * (s - 1)]);
        let mask = labels.clone().not_equal_elem(-100).float();
        let safe = labels.clamp_min(0);
        let logp = burn::tensor::activation::log_softmax(logits, 1);
        let picked: Tensor<B, 1> = logp
            .gather(1, safe.unsqueeze_dim::<2>(1))
            .reshape([b * (s - 1)]);
        -(picked * mask.clone()).sum() / mask.sum()
    }
}

fn seeded<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    Tensor::from_data(burn::tensor::TensorData::new(v, shape), device)
}

/// Sequences that follow a fixed rule (next = (3 * cur + 1) mod V): learnable by the adapters.
fn data(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let mut t = (i % VOCAB) as u32;
            let ids: Vec<u32> = (0..6 + i % 3)
                .map(|_| {
                    let c = t;
                    t = (3 * t + 1) % VOCAB as u32;
                    c
                })
                .collect();
            let mut labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            labels[0] = -100;
            Sample {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn peft(device: &burn::tensor::Device<AD>) -> PeftModel<AD, ToyLm<AD>> {
    let mut p = PeftModel::new(ToyLm::<AD>::new(device));
    p.add_adapter("default", &LoraConfig::new(4, 8.0, &["mix", "head"]))
        .unwrap();
    for (i, (_, layer)) in p.model.lora_linears_mut().into_iter().enumerate() {
        let a = &mut layer.adapters[0];
        a.lora_a =
            Param::from_tensor(seeded(a.lora_a.dims(), 10 + i as u64, device).require_grad());
    }
    p
}

fn cfg(dir: &str, max_steps: u64) -> TrainConfig {
    let out = std::env::temp_dir().join(format!("sft-trainer-test-{}-{dir}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    TrainConfig {
        output_dir: out,
        learning_rate: 5e-2,
        lr_scheduler_type: ScheduleKind::Cosine,
        warmup_ratio: 0.1,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        max_grad_norm: 1.0,
        max_steps,
        logging_steps: 2,
        eval_steps: 10,
        save_steps: 5,
        save_total_limit: 2,
        progress_bar: false,
        ..Default::default()
    }
}

fn adapter_values(p: &PeftModel<AD, ToyLm<AD>>) -> Vec<f32> {
    p.model
        .lora_linears()
        .iter()
        .flat_map(|(_, l)| {
            let a = &l.adapters[0];
            let mut v: Vec<f32> = a.lora_a.val().into_data().to_vec().unwrap();
            v.extend(a.lora_b.val().into_data().to_vec::<f32>().unwrap());
            v
        })
        .collect()
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let device = Default::default();
    for optimizer in [
        OptimizerKind::AdamW,
        OptimizerKind::LoraPlus {
            lr_ratio: 4.0,
            weight_decay: 0.0,
        },
        OptimizerKind::LoraFa,
    ] {
        let mut p = peft(&device);
        let mut c = cfg("falls", 30);
        c.optimizer = optimizer.clone();
        let s = train::<AD, _>(&mut p, "default", &data(24), &data(8), &c, false, &device).unwrap();
        let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
        assert!(last < 0.7 * first, "{optimizer:?}: loss {first} -> {last}");
        assert_eq!(s.global_step, 30);
        for f in [
            "metrics.jsonl",
            "loss.png",
            "adapter_config.json",
            "adapter_model.safetensors",
            "train_config.json",
        ] {
            assert!(c.output_dir.join(f).exists(), "{f}");
        }
        // Keep-last-2 checkpoints: 25 and 30.
        let ckpts: Vec<u64> = sft_trainer::checkpoint::list(&c.output_dir)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(ckpts, vec![25, 30]);
    }
}

#[test]
fn killed_run_resumes_to_the_same_result() {
    let device = Default::default();
    let full_cfg = cfg("full", 12);
    let mut full = peft(&device);
    train::<AD, _>(
        &mut full,
        "default",
        &data(20),
        &[],
        &full_cfg,
        false,
        &device,
    )
    .unwrap();

    // A run "killed" after step 10: its last complete checkpoint is checkpoint-10 (the final
    // one is removed, as if the kill came before it was written).
    let part_cfg = cfg("part", 12);
    let mut part = peft(&device);
    train::<AD, _>(
        &mut part,
        "default",
        &data(20),
        &[],
        &part_cfg,
        false,
        &device,
    )
    .unwrap();
    std::fs::remove_dir_all(part_cfg.output_dir.join("checkpoint-12")).unwrap();
    // A half-written checkpoint from the kill is ignored.
    std::fs::create_dir_all(part_cfg.output_dir.join(".tmp-checkpoint-12")).unwrap();

    let (a, b) = (adapter_values(&full), adapter_values(&part));
    let max_diff = host::max_abs_diff(&a, &b);
    assert!(max_diff < 1e-6, "two identical runs differ by {max_diff}");
    let mut resumed = peft(&device);
    let s = train::<AD, _>(
        &mut resumed,
        "default",
        &data(20),
        &[],
        &part_cfg,
        true,
        &device,
    )
    .unwrap();
    assert_eq!(s.resumed_from, Some(10));
    let (a, b) = (adapter_values(&full), adapter_values(&resumed));
    let max_diff = host::max_abs_diff(&a, &b);
    assert!(max_diff < 1e-5, "resumed run differs by {max_diff}");
}

#[test]
fn non_finite_loss_stops_with_the_step() {
    let device = Default::default();
    let mut p = peft(&device);
    let c = cfg("nan", 10);
    train::<AD, _>(
        &mut p,
        "default",
        &data(8),
        &[],
        &TrainConfig {
            max_steps: 5,
            ..c.clone()
        },
        false,
        &device,
    )
    .unwrap();
    // Poison the head's B: the next loss is NaN.
    let ad = &mut p.model.head.adapters[0];
    ad.lora_b = Param::from_tensor(
        Tensor::from_inner(ad.lora_b.val().inner().add_scalar(f32::NAN)).require_grad(),
    );
    let c2 = TrainConfig {
        max_steps: 10,
        ..c.clone()
    };
    let finite_before: Vec<f32> = adapter_values(&p)
        .into_iter()
        .filter(|v| v.is_finite())
        .collect();
    let err = train::<AD, _>(&mut p, "default", &data(8), &[], &c2, false, &device).unwrap_err();
    assert!(matches!(err, Error::NonFinite { step: 1, .. }), "{err}");
    assert!(err
        .to_string()
        .contains("non-finite loss at optimizer step 1"));
    // The loss is read after the step is queued (one process); the step's non-finite gradients
    // left every adapter weight as it was.
    let finite_after: Vec<f32> = adapter_values(&p)
        .into_iter()
        .filter(|v| v.is_finite())
        .collect();
    assert_eq!(finite_before, finite_after);
}

#[test]
fn bad_settings_fail_before_work() {
    let device = Default::default();
    let mut p = peft(&device);
    let bad = |c: TrainConfig| {
        train::<AD, _>(
            &mut peft(&device),
            "default",
            &data(4),
            &[],
            &c,
            false,
            &device,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(bad(TrainConfig {
        learning_rate: -1.0,
        ..cfg("b1", 1)
    })
    .contains("learning_rate"));
    assert!(bad(TrainConfig {
        per_device_train_batch_size: 0,
        ..cfg("b2", 1)
    })
    .contains("per_device_train_batch_size"));
    assert!(bad(TrainConfig {
        output_dir: "/proc/no-such-dir/x".into(),
        ..cfg("b3", 1)
    })
    .contains("/proc/no-such-dir/x"));
    let err =
        train::<AD, _>(&mut p, "default", &[], &[], &cfg("b4", 1), false, &device).unwrap_err();
    assert!(err.to_string().contains("train dataset"));
}

/// `gradient_checkpointing` on a tiny Llama (per-layer recomputation, llama's
/// `backward_checkpointed`) trains to the same adapters as the plain backward, with gradient
/// accumulation.
#[test]
fn gradient_checkpointing_trains_a_llama_like_the_plain_backward() {
    let device = Default::default();
    // One base for both runs (its random weights come from Burn's global RNG).
    let base =
        llama::LlamaForCausalLM::<AD>::random_seeded(&llama::LlamaConfig::tiny(VOCAB), &device, 77);
    let run = |gc: bool| {
        let mut p = PeftModel::new(base.clone());
        p.add_adapter(
            "default",
            &LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]),
        )
        .unwrap();
        for (i, (_, layer)) in p.model.lora_linears_mut().into_iter().enumerate() {
            // Both factors from local seeds: Burn's RNG is global and tests run in parallel.
            if let Some(a) = layer.adapters.first_mut() {
                a.lora_a = Param::from_tensor(
                    seeded(a.lora_a.dims(), 80 + i as u64, &device).require_grad(),
                );
                a.lora_b = Param::from_tensor(
                    seeded(a.lora_b.dims(), 40 + i as u64, &device).require_grad(),
                );
            }
        }
        let mut c = cfg(if gc { "gc-on" } else { "gc-off" }, 4);
        c.gradient_checkpointing = gc;
        c.save_steps = 0;
        c.eval_steps = 0;
        let s = train::<AD, _>(&mut p, "default", &data(16), &[], &c, false, &device).unwrap();
        let v: Vec<f32> = p
            .model
            .lora_linears()
            .iter()
            .flat_map(|(_, l)| {
                l.adapters.iter().flat_map(|a| {
                    let mut v: Vec<f32> = a.lora_a.val().into_data().to_vec().unwrap();
                    v.extend(a.lora_b.val().into_data().to_vec::<f32>().unwrap());
                    v
                })
            })
            .collect();
        (s.last_loss.unwrap(), v)
    };
    let (loss_plain, plain) = run(false);
    let (loss_gc, gc) = run(true);
    assert!(
        (loss_plain - loss_gc).abs() <= 1e-5 * loss_plain.abs(),
        "{loss_plain} vs {loss_gc}"
    );
    let scale = host::max_abs(&plain);
    let err = host::max_abs_diff(&plain, &gc);
    assert!(
        err <= 1e-5 * scale,
        "adapters differ by {err} (scale {scale})"
    );
}

/// Runs `f(rank, settings, communicator)` on two in-process ranks, one thread each; rank 1 writes
/// to `rank1_dir` (its own host's folder), rank 0 to `cfg.output_dir`.
fn two_ranks<T: Send>(
    cfg: &TrainConfig,
    rank1_dir: &std::path::Path,
    f: impl Fn(usize, &TrainConfig, &data_parallel::InProcess) -> T + Sync,
) -> Vec<T> {
    let comms = data_parallel::InProcess::world(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let mut c = cfg.clone();
                if rank == 1 {
                    c.output_dir = rank1_dir.to_path_buf();
                }
                let f = &f;
                s.spawn(move || f(rank, &c, &comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Data parallelism as accelerate runs it: two processes with a micro-batch of 2 each train the
/// adapter that one process trains with two accumulated micro-batches of 2 (the same samples
/// per step, the gradients averaged before clipping); only rank 0 writes files; a checkpoint
/// of two processes refuses to resume in one.
#[test]
fn two_processes_train_what_one_trains_with_accumulation() {
    let device = Default::default();
    let base = |name: &str| {
        let mut c = cfg(name, 6);
        c.per_device_train_batch_size = 2;
        c.save_steps = 3;
        c
    };
    let mut one_cfg = base("dp-one");
    one_cfg.gradient_accumulation_steps = 2;
    let mut one = peft(&device);
    let s_one = train::<AD, _>(
        &mut one,
        "default",
        &data(20),
        &data(4),
        &one_cfg,
        false,
        &device,
    )
    .unwrap();

    let mut two_cfg = base("dp-two");
    two_cfg.gradient_accumulation_steps = 1;
    let rank1_dir = std::env::temp_dir().join(format!(
        "sft-trainer-test-{}-dp-two-rank1",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&rank1_dir);
    let run_two = |resume: bool| {
        two_ranks(&two_cfg, &rank1_dir, |rank, c, comm| {
            let device = Default::default();
            let mut p = peft(&device);
            // Rank 1 starts from other weights: rank 0's are broadcast at the start.
            if rank == 1 {
                let layer = &mut p.model.lora_linears_mut()[0].1;
                let a = &mut layer.adapters[0];
                a.lora_a = Param::from_tensor(seeded(a.lora_a.dims(), 99, &device).require_grad());
            }
            let eval = if resume { vec![] } else { data(4) };
            let s = sft_trainer::train_data_parallel::<AD, _>(
                &mut p,
                "default",
                &data(20),
                &eval,
                c,
                resume,
                &device,
                comm,
            );
            (s, adapter_values(&p))
        })
    };
    let runs: Vec<_> = run_two(false)
        .into_iter()
        .map(|(s, v)| (s.unwrap(), v))
        .collect();
    let want = adapter_values(&one);
    for (rank, (s, got)) in runs.iter().enumerate() {
        assert_eq!(s.global_step, 6);
        let d = host::max_abs_diff(&want, got);
        assert!(
            d < 1e-5,
            "rank {rank}: 2 processes vs 1 with accumulation differ by {d}"
        );
    }
    let (l1, l2) = (s_one.first_loss.unwrap(), runs[0].0.first_loss.unwrap());
    assert!((l1 - l2).abs() < 1e-5, "logged loss {l1} vs {l2}");
    assert_eq!(runs[1].0.first_loss, None, "rank 1 logs nothing");
    for f in [
        "metrics.jsonl",
        "loss.png",
        "adapter_model.safetensors",
        "train_config.json",
        "checkpoint-6",
    ] {
        assert!(two_cfg.output_dir.join(f).exists(), "rank 0 writes {f}");
        assert!(!rank1_dir.join(f).exists(), "rank 1 writes no {f}");
    }
    // A resume where rank 1 does not see rank 0's checkpoints (another host, no shared
    // filesystem) stops both ranks with an error naming the steps, instead of a hang.
    let errs: Vec<String> = run_two(true)
        .into_iter()
        .map(|(s, _)| s.unwrap_err().to_string())
        .collect();
    for e in &errs {
        assert!(
            e.contains("rank 0 at step 6") && e.contains("rank 1 at step 0"),
            "{e}"
        );
    }

    // The checkpoint knows its world size; one process cannot resume it.
    let mut again = peft(&device);
    let err = train::<AD, _>(
        &mut again,
        "default",
        &data(20),
        &[],
        &two_cfg,
        true,
        &device,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Checkpoint { .. }) && msg.contains("2 process"),
        "{msg}"
    );
}
