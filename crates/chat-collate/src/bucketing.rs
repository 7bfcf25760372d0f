//! Batch orders for an epoch: plain seeded shuffles and length-bucketed batches that put
//! samples of similar length together to cut padding.

use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};

fn rng(seed: u64, epoch: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Indices `0..n` shuffled by `seed` and `epoch`, cut into batches of `batch_size` (the last
/// one may be smaller). Same seed and epoch, same batches.
pub fn shuffled_batches(n: usize, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng(seed, epoch));
    idx.chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Length-bucketed batches: shuffle, take windows of `batch_size * bucket_factor` samples,
/// sort each window by length, cut into batches, then shuffle the batch order. Randomness
/// stays (windows and batch order change per epoch) while each batch holds similar lengths.
/// `bucket_factor` 1 is a plain shuffle; larger values cut more padding.
pub fn bucketed_batches(
    lengths: &[usize],
    batch_size: usize,
    bucket_factor: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = rng(seed, epoch);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in idx.chunks(batch_size * bucket_factor.max(1)) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_is_a_seeded_permutation() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 200).collect();
        let a = bucketed_batches(&lengths, 8, 4, 1, 0);
        assert_eq!(a, bucketed_batches(&lengths, 8, 4, 1, 0));
        assert_ne!(a, bucketed_batches(&lengths, 8, 4, 1, 1));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        let plain = shuffled_batches(103, 8, 1, 0);
        assert!(
            crate::packing::padding_fraction(&lengths, &a)
                < crate::packing::padding_fraction(&lengths, &plain)
        );
    }
}
