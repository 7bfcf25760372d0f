//! Training mode and LoRA's input dropout (PEFT's `lora_dropout`), with the seed stream of the
//! fused CUDA dropout.

use burn::tensor::{backend::Backend, Distribution, Tensor};

use crate::fused;

thread_local! {
    static FORCED_TRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The explicit mode of the layer whose forward runs on this thread (`None`: automatic).
    static LAYER_MODE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (one layer's forward) in the layer's explicit mode: `Some(true)` training,
/// `Some(false)` evaluation, `None` automatic (see [`training`]).
pub(crate) fn in_mode<R>(mode: Option<bool>, f: impl FnOnce() -> R) -> R {
    let before = LAYER_MODE.with(|c| c.replace(mode));
    let out = f();
    LAYER_MODE.with(|c| c.set(before));
    out
}

/// Runs `f` in training mode on any backend: LoRA dropout applies even where autodiff is off,
/// and in layers set to evaluation (`PeftModel::eval`).
/// Per-layer gradient checkpointing runs a layer's forward on the inner (non-autodiff) backend
/// and again under autodiff in the backward; with the same random seed both draw the same
/// dropout masks, so the recomputed layer is the one whose output was used.
pub fn with_training<R>(f: impl FnOnce() -> R) -> R {
    let before = FORCED_TRAINING.with(|c| c.replace(true));
    let out = f();
    FORCED_TRAINING.with(|c| c.set(before));
    out
}

/// Training mode (LoRA dropout on): inside [`with_training`]; else the layer's explicit mode
/// (`PeftModel::train` / `PeftModel::eval`); else automatic: on an autodiff backend.
pub(crate) fn training<B: Backend>(device: &B::Device) -> bool {
    if FORCED_TRAINING.with(|c| c.get()) {
        return true;
    }
    LAYER_MODE
        .with(|c| c.get())
        .unwrap_or_else(|| B::ad_enabled(device))
}

thread_local! {
    /// The state of the fused (hashed) dropout's seed stream ([`seed_dropout`]).
    static DROPOUT_SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(0x5eed_d80f) };
}

/// Restarts this thread's seed stream of the fused CUDA dropout (which hashes its masks from a
/// seed instead of drawing them from the backend's generator). Call it wherever the backend is
/// seeded for reproducible dropout (`B::seed`): the trainer does once per step and per-layer
/// gradient checkpointing before a layer's forward and its recomputation. The composed dropout
/// of other backends draws from the backend's generator and ignores this.
pub fn seed_dropout(seed: u64) {
    DROPOUT_SEED.with(|c| c.set(seed));
}

/// The next seed of this thread's fused-dropout stream (splitmix64).
fn next_dropout_seed() -> u64 {
    DROPOUT_SEED.with(|c| {
        let s = c.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        c.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Inverted dropout on the adapter input, active only in training mode ([`training`]).
pub(crate) fn dropout<B: Backend>(x: Tensor<B, 2>, p: f64) -> Tensor<B, 2> {
    if p == 0.0 || !training::<B>(&x.device()) {
        return x;
    }
    // On CUDA: one kernel each way, the mask hashed from a seed and never stored.
    if let Some(y) = fused::dropout(&x, p, next_dropout_seed) {
        return y;
    }
    let keep = x.random_like(Distribution::Bernoulli(1.0 - p));
    x * keep * (1.0 / (1.0 - p))
}
