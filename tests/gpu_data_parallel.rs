//! Data-parallel training on GPUs through NCCL, on a tiny Llama in f32 (feature `cuda`; ignored
//! by default: they need one or two GPUs and a loadable `libnccl.so`). On a GPU box:
//! `LD_LIBRARY_PATH=<dir with libnccl.so>:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0 cargo test
//! --release --features cuda --test gpu_data_parallel -- --ignored`. They fail, never skip,
//! without the GPUs they name.
#![cfg(feature = "cuda")]

use burn::backend::cuda::CudaDevice;
use burn::backend::{Autodiff, Cuda};
use data_parallel::{free_port, Communicator, Nccl, RendezvousOptions, World};
use llama::{LlamaConfig, LlamaForCausalLM};
use peft_lora::{adapter_state_dict, LoraConfig, PeftModel};
use sft_trainer::{Sample, TrainConfig};
use test_support::host::max_abs_diff;

type AB = Autodiff<Cuda<f32>>;

fn gpus() -> usize {
    data_parallel::cuda_device_count().unwrap()
}

/// Rows of equal length with every position after the first labelled, so a micro-batch of two
/// and two micro-batches of one average the same tokens.
fn samples(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..12).map(|j| ((i * 7 + j * 3) % 60 + 1) as u32).collect();
            let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            labels[0] = -100;
            Sample {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn model(device: &CudaDevice) -> PeftModel<AB, LlamaForCausalLM<AB>> {
    let base = LlamaForCausalLM::<AB>::random_seeded(&LlamaConfig::tiny(64), device, 3);
    let mut p = PeftModel::new(base);
    p.add_adapter("default", &LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]))
        .unwrap();
    p
}

fn cfg(name: &str, batch: usize) -> TrainConfig {
    TrainConfig {
        output_dir: test_support::fresh_temp_dir("gpu-dp", name),
        learning_rate: 1e-2,
        per_device_train_batch_size: batch,
        gradient_accumulation_steps: 1,
        max_steps: 4,
        save_steps: 0,
        logging_steps: 1,
        progress_bar: false,
        ..Default::default()
    }
}

fn weights(p: &PeftModel<AB, LlamaForCausalLM<AB>>) -> Vec<f32> {
    adapter_state_dict(&p.model, "default")
        .into_values()
        .flat_map(|t| t.data)
        .collect()
}

/// The adapter after the plain (single-process) trainer with a micro-batch of 2 on GPU 0.
fn plain_weights(name: &str) -> Vec<f32> {
    let device = CudaDevice::new(0);
    let mut p = model(&device);
    sft_trainer::train::<AB, _>(
        &mut p,
        "default",
        &samples(16),
        &[],
        &cfg(name, 2),
        false,
        &device,
    )
    .unwrap();
    weights(&p)
}

/// `n` ranks in threads, rank r on GPU r, each training with a micro-batch of `batch`.
fn data_parallel(n: usize, batch: usize, name: &str) -> Vec<Vec<f32>> {
    let port = free_port().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                s.spawn(move || {
                    let world = World::localhost(rank, n, port);
                    let (comm, _rdv) =
                        Nccl::connect(&world, rank, &RendezvousOptions::default()).unwrap();
                    assert_eq!(comm.world_size(), n);
                    let device = CudaDevice::new(rank);
                    let mut p = model(&device);
                    let c = cfg(&format!("{name}-rank{rank}"), batch);
                    sft_trainer::train_data_parallel::<AB, _>(
                        &mut p,
                        "default",
                        &samples(16),
                        &[],
                        &c,
                        false,
                        &device,
                        &comm,
                    )
                    .unwrap();
                    weights(&p)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
#[ignore = "needs a GPU and libnccl.so: run with --ignored on a GPU box"]
fn one_rank_through_nccl_trains_what_the_plain_trainer_trains() {
    assert!(gpus() >= 1, "no CUDA device");
    let want = plain_weights("plain");
    let got = data_parallel(1, 2, "world1");
    let d = max_abs_diff(&want, &got[0]);
    assert!(d <= 1e-6, "NCCL world of one vs the plain trainer: {d}");
}

#[test]
#[ignore = "needs two GPUs and libnccl.so: run with --ignored on a GPU box"]
fn two_ranks_of_batch_1_train_what_one_rank_of_batch_2_trains() {
    assert!(gpus() >= 2, "{} CUDA device(s); this test needs 2", gpus());
    let want = plain_weights("one");
    for (rank, got) in data_parallel(2, 1, "two").iter().enumerate() {
        let d = max_abs_diff(&want, got);
        assert!(
            d <= 1e-5,
            "rank {rank}: 2 x batch 1 vs 1 x batch 2 differ by {d}"
        );
    }
}
