//! Batching encoded samples into [`TrainBatch`]es: directly, or through Burn's `Batcher` and
//! data loaders (seeded shuffling, worker threads) with the `dataloader` feature.

use burn::tensor::backend::Backend;

use crate::encoded::Encoded;
use crate::padding::{pad_batch, PadConfig, TrainBatch};

/// Pads encoded samples (right, for training) and moves them to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatBatcher {
    /// Padding settings.
    pub pad: PadConfig,
}

impl ChatBatcher {
    /// Right padding with `pad_id`.
    pub fn new(pad_id: u32) -> Self {
        Self {
            pad: PadConfig::right(pad_id),
        }
    }

    /// One batch of `items` on `device`.
    pub fn collate<B: Backend>(&self, items: &[Encoded], device: &B::Device) -> TrainBatch<B> {
        pad_batch(items, &self.pad).to_tensors(device)
    }
}

#[cfg(feature = "dataloader")]
mod burn_loader {
    use std::sync::Arc;

    use burn::data::dataloader::{batcher::Batcher, DataLoader, DataLoaderBuilder};
    use burn::data::dataset::InMemDataset;
    use burn::tensor::backend::Backend;

    use super::ChatBatcher;
    use crate::encoded::Encoded;
    use crate::padding::TrainBatch;

    impl<B: Backend> Batcher<B, Encoded, TrainBatch<B>> for ChatBatcher {
        fn batch(&self, items: Vec<Encoded>, device: &B::Device) -> TrainBatch<B> {
            self.collate(&items, device)
        }
    }

    /// Options of [`data_loader`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct LoaderConfig {
        /// Samples per batch.
        pub batch_size: usize,
        /// Shuffle every epoch from this seed (`None`: dataset order).
        pub shuffle_seed: Option<u64>,
        /// Background threads batching (0: batch on the calling thread).
        pub num_workers: usize,
    }

    /// A Burn data loader over already-encoded samples.
    pub fn data_loader<B: Backend>(
        samples: Vec<Encoded>,
        batcher: ChatBatcher,
        cfg: LoaderConfig,
    ) -> Arc<dyn DataLoader<B, TrainBatch<B>>> {
        let mut builder = DataLoaderBuilder::new(batcher)
            .batch_size(cfg.batch_size.max(1))
            .num_workers(cfg.num_workers);
        if let Some(seed) = cfg.shuffle_seed {
            builder = builder.shuffle(seed);
        }
        builder.build(InMemDataset::new(samples))
    }
}

#[cfg(feature = "dataloader")]
pub use burn_loader::{data_loader, LoaderConfig};
