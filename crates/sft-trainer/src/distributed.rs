//! Data parallelism in the training loop, as `accelerate` runs it with PEFT: every process
//! reads a disjoint shard of each epoch's shuffled order (the same seed everywhere), the adapter
//! gradients are averaged with one all-reduce per optimizer step (after accumulation, before
//! clipping, so the clipped norm is the true global one), and every process starts from rank
//! 0's adapter. The collective itself is a [`Communicator`] (NCCL on GPUs).

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use data_parallel::Communicator;
use peft_lora::{adapter_state_dict, write_f32, GradAccumulator, LoraModel, PeftModel};

use crate::error::{Error, Result};

/// The micro-batches of `rank`: batches `rank`, `rank + world`, ... of the epoch's order, after
/// the order is extended by batches from its start until every rank has as many
/// (accelerate's `even_batches`). One process keeps the order as it is.
pub fn shard(batches: Vec<Vec<usize>>, rank: usize, world: usize) -> Vec<Vec<usize>> {
    if world <= 1 || batches.is_empty() {
        return batches;
    }
    let n = batches.len();
    (rank..n.div_ceil(world) * world)
        .step_by(world)
        .map(|i| batches[i % n].clone())
        .collect()
}

/// What every rank learns at the end of a step's accumulation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepTotals {
    /// Mean over the ranks of their step loss.
    pub loss: f64,
    /// Non-padding tokens of the step, every rank counted.
    pub tokens: usize,
}

/// Ends a step's accumulation on every rank: checks that no rank saw a non-finite loss and that
/// all hold the same gradient layout, then replaces the gradients by their mean over the ranks
/// (two collectives: a small header, then one bucket of every gradient).
///
/// `bad_loss` is this rank's non-finite loss, if any; `step` the step being finished.
pub(crate) fn finish_step<AB: AutodiffBackend>(
    acc: &mut GradAccumulator<AB>,
    comm: &dyn Communicator,
    loss: f64,
    tokens: usize,
    bad_loss: Option<f64>,
    step: u64,
    output_dir: &Path,
) -> Result<StepTotals> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        if let Some(value) = bad_loss {
            return Err(Error::non_finite("loss", step, value, output_dir));
        }
        return Ok(StepTotals { loss, tokens });
    }
    // [flag of each rank..., loss, tokens, numel / 2^20, numel % 2^20, key checksum]: sums of
    // integers below 2^24 are exact in f32.
    let numel = acc.numel();
    let mut header = vec![0f32; world + 5];
    header[rank] = f32::from(bad_loss.is_some());
    header[world] = if bad_loss.is_some() { 0.0 } else { loss as f32 };
    header[world + 1] = tokens as f32;
    header[world + 2] = (numel >> 20) as f32;
    header[world + 3] = (numel & 0xF_FFFF) as f32;
    header[world + 4] = key_checksum(&acc.keys()) as f32;
    let mine = header.clone();
    comm.all_reduce_sum(&mut header)?;
    let bad: Vec<String> = (0..world)
        .filter(|r| header[*r] > 0.0)
        .map(|r| r.to_string())
        .collect();
    if !bad.is_empty() {
        let value = bad_loss.unwrap_or(f64::NAN);
        return Err(Error::non_finite(
            &format!("loss (rank {})", bad.join(", ")),
            step,
            value,
            output_dir,
        ));
    }
    let w = world as f32;
    if (2..5).any(|i| header[world + i] != mine[world + i] * w) {
        return Err(Error::Distributed(format!(
            "the ranks hold different adapter gradients at step {step}: rank {rank} has {numel} \
             elements in {} tensors, and the sums over the ranks do not match {world} copies of \
             that; every rank must train the same adapters on the same model",
            acc.keys().len()
        )));
    }
    let mut flat = acc.to_flat();
    comm.all_reduce_sum(&mut flat)?;
    acc.load_flat(&flat, 1.0 / w)?;
    Ok(StepTotals {
        loss: header[world] as f64 / world as f64,
        tokens: header[world + 1] as usize,
    })
}

/// Checks that every rank starts from the same step (the same checkpoint, or none): a rank that
/// does not see rank 0's checkpoint would otherwise train a different number of steps and leave
/// the others waiting in a collective.
pub(crate) fn agree_on_start(comm: &dyn Communicator, step: u64, output_dir: &Path) -> Result<()> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let mut steps = vec![0f32; world];
    steps[comm.rank()] = step as f32;
    comm.all_reduce_sum(&mut steps)?;
    if steps.iter().any(|s| *s != steps[0]) {
        let by_rank: Vec<String> = steps
            .iter()
            .enumerate()
            .map(|(r, s)| format!("rank {r} at step {s}"))
            .collect();
        return Err(Error::Distributed(format!(
            "the processes start from different checkpoints ({}); every rank must see the same \
             checkpoints in {} (on several hosts, put output_dir on a shared filesystem to resume)",
            by_rank.join(", "),
            output_dir.display()
        )));
    }
    Ok(())
}

/// A 16-bit checksum of the gradient names, the same on every rank that trains the same
/// adapters.
fn key_checksum(keys: &[String]) -> u32 {
    keys.iter()
        .flat_map(|k| k.bytes().chain([0]))
        .fold(0u32, |h, b| {
            (h.wrapping_mul(31).wrapping_add(b as u32)) & 0xFFFF
        })
}

/// Gives every rank rank 0's weights of `adapter` (one broadcast; the other ranks reload them as
/// a PEFT folder written under `scratch`, the way a resume loads a checkpoint).
pub(crate) fn broadcast_adapter<B: Backend, M: LoraModel<B>>(
    peft: &mut PeftModel<B, M>,
    adapter: &str,
    comm: &dyn Communicator,
    scratch: &Path,
) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let mut tensors = adapter_state_dict(&peft.model, adapter);
    let numel: usize = tensors.values().map(|t| t.data.len()).sum();
    let mut sizes = vec![(numel >> 20) as f32, (numel & 0xF_FFFF) as f32];
    let mine = sizes.clone();
    comm.all_reduce_sum(&mut sizes)?;
    let w = comm.world_size() as f32;
    if sizes[0] != mine[0] * w || sizes[1] != mine[1] * w {
        return Err(Error::Distributed(format!(
            "rank {} has {numel} adapter weights and the other ranks a different number; every \
             rank must build the same model and adapter",
            comm.rank()
        )));
    }
    let mut flat: Vec<f32> = tensors.values().flat_map(|t| t.data.clone()).collect();
    comm.broadcast(&mut flat, 0)?;
    if comm.rank() == 0 {
        return Ok(());
    }
    let mut at = 0;
    for t in tensors.values_mut() {
        let n = t.data.len();
        t.data.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    let dir = scratch.join(format!(".rank{}-adapter", comm.rank()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let cfg = peft.configs[adapter].clone();
    cfg.save(&dir)?;
    write_f32(&dir.join(peft_lora::WEIGHTS_FILE), &tensors)?;
    let active = peft.active.clone();
    peft.delete_adapter(adapter)?;
    peft.load_adapter(&dir, adapter)?;
    peft.set_active(&active.iter().map(String::as_str).collect::<Vec<_>>())?;
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_cover_the_epoch_and_are_even() {
        let batches: Vec<Vec<usize>> = (0..7).map(|i| vec![2 * i, 2 * i + 1]).collect();
        let shards: Vec<_> = (0..3).map(|r| shard(batches.clone(), r, 3)).collect();
        assert!(shards.iter().all(|s| s.len() == 3));
        assert_eq!(
            shards[0],
            vec![batches[0].clone(), batches[3].clone(), batches[6].clone()]
        );
        assert_eq!(
            shards[1],
            vec![batches[1].clone(), batches[4].clone(), batches[0].clone()]
        );
        assert_eq!(
            shards[2],
            vec![batches[2].clone(), batches[5].clone(), batches[1].clone()]
        );
        assert_eq!(shard(batches.clone(), 0, 1), batches);
    }
}
