//! Deterministic batching of encoded samples: the order depends only on the seed and the
//! epoch, so a resumed run sees exactly the batches an uninterrupted one would.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// One tokenised training sample: ids and labels (-100 = not trained on).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, same length; -100 where the loss ignores the token.
    pub labels: Vec<i64>,
}

/// A right-padded batch on a device.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// `[batch, seq]`, -100 where ignored.
    pub labels: Tensor<B, 2, Int>,
    /// Number of labelled tokens (loss targets after the shift).
    pub n_label_tokens: usize,
    /// Number of non-padding tokens.
    pub n_tokens: usize,
}

/// Pads `samples` on the right into one batch.
pub fn make_batch<B: Backend>(samples: &[&Sample], pad_id: u32, device: &B::Device) -> Batch<B> {
    let len = samples
        .iter()
        .map(|s| s.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let n = samples.len();
    let (mut ids, mut mask, mut labels) = (
        Vec::with_capacity(n * len),
        Vec::with_capacity(n * len),
        Vec::with_capacity(n * len),
    );
    let (mut n_label, mut n_tok) = (0, 0);
    for s in samples {
        for i in 0..len {
            match s.input_ids.get(i) {
                Some(&t) => {
                    ids.push(t as i64);
                    mask.push(1i64);
                    labels.push(s.labels[i]);
                    n_tok += 1;
                    if i > 0 && s.labels[i] != -100 {
                        n_label += 1;
                    }
                }
                None => {
                    ids.push(pad_id as i64);
                    mask.push(0);
                    labels.push(-100);
                }
            }
        }
    }
    let t = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [n, len]), device);
    Batch {
        input_ids: t(ids),
        attention_mask: t(mask),
        labels: t(labels),
        n_label_tokens: n_label,
        n_tokens: n_tok,
    }
}

/// The sample order of `epoch` for `n` samples under `seed`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch));
    idx.shuffle(&mut rng);
    idx
}

/// Micro-batches of `epoch` as lists of sample indices (the last one may be smaller).
pub fn epoch_batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    epoch_order(n, seed, epoch)
        .chunks(batch_size)
        .map(|c| c.to_vec())
        .collect()
}
