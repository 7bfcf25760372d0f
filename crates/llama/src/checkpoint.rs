//! Gradient checkpointing per decoder layer, as transformers' `gradient_checkpointing_enable()`:
//! the forward runs every layer without recording it (on the inner backend) and keeps only each
//! layer's input; the backward then runs layer by layer, last to first: the layer again under
//! autodiff from its kept input, and a backward from the gradient of its output. Activations
//! alive between the forward and the backward: one `[batch, seq, hidden]` per layer.
//!
//! The backward is a chain of ordinary `backward()` calls (the head and loss, each layer, the
//! embedding): Burn 0.21 cannot start a backward from inside another one's step. Each call's
//! gradients go to the caller (`on_grads`), which accumulates the adapters' gradients as it does
//! for gradient accumulation.
//!
//! LoRA dropout draws the same masks in the forward and in the recomputation: both start from
//! the same random seed, in training mode ([`peft_lora::with_training`]).

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use peft_lora::LoraCtx;

use crate::loss::LossOptions;
use crate::model::LlamaForCausalLM;
use crate::ops::Kept;

/// Seeds for the forward / recomputation pairs (one per layer call).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Restarts the sequence of dropout seeds the checkpointed layers use (reproducible runs, tests).
pub fn restart_seeds(start: u64) {
    CALLS.store(start, Ordering::Relaxed);
}

fn next_seed() -> u64 {
    // splitmix64 of a counter: distinct, deterministic seeds.
    let mut z = CALLS
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The result of [`LlamaForCausalLM::backward_checkpointed`].
#[derive(Debug, Clone)]
pub struct CheckpointedLoss<B: Backend> {
    /// The mean cross-entropy (unscaled), `[1]`.
    pub loss: Tensor<B, 1>,
    /// Number of labelled tokens the mean ran over.
    pub n_tokens: usize,
}

impl<B: AutodiffBackend> LlamaForCausalLM<B> {
    /// The loss of a batch and the gradients of `scale * loss`, with every decoder layer
    /// checkpointed: `on_grads` receives the gradient containers of the successive backward
    /// calls (head and loss, layers from last to first, then the embedding when it trains);
    /// together they hold the gradients a single `(scale * loss).backward()` would give.
    ///
    /// # Shapes
    /// input_ids, attention_mask, labels: `[batch, seq]`
    #[allow(clippy::too_many_arguments)]
    pub fn backward_checkpointed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        labels: Tensor<B, 2, Int>,
        opts: LossOptions,
        ctx: &LoraCtx,
        scale: f64,
        mut on_grads: impl FnMut(&B::Gradients),
    ) -> CheckpointedLoss<B::InnerBackend> {
        let s = input_ids.dims()[1];
        let p = self.prologue(input_ids, attention_mask, None, 0, s, ctx);
        // Only a trainable embedding needs its output again (its own backward at the end).
        let embedded = self.model.embed_tokens.trains().then(|| p.x.clone());
        let (cos, sin, mask) = (p.cos.inner(), p.sin.inner(), p.mask.inner());
        let ctx = p.ctx;

        // Forward, unrecorded: keep each layer's input and the seed its dropout used. On CUDA
        // the inputs go to pinned host memory while the next layers run (all but the last,
        // which the backward needs first); the copy of one layer's input overlaps its forward.
        let mut x = p.x.inner();
        let n = self.model.layers.len();
        let mut kept = Vec::with_capacity(n);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let seed = next_seed();
            let device = x.device();
            B::InnerBackend::seed(&device, seed);
            peft_lora::seed_dropout(seed);
            let mut input = if i + 1 < n {
                Kept::offload(x.clone())
            } else {
                Kept::device(x.clone())
            };
            let inner = layer.valid();
            let (y, _) =
                peft_lora::with_training(|| inner.forward(x, &cos, &sin, &mask, None, &ctx));
            input.release_device();
            kept.push((input, seed));
            x = y;
        }

        // Head and loss from the last hidden state.
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let out = self.loss_from_hidden(self.model.norm.forward(last.clone()), labels, opts);
        let loss = out.loss.clone().inner();
        let grads = (out.loss * scale).backward();
        on_grads(&grads);
        let mut g = last
            .grad(&grads)
            .expect("the last hidden state has a gradient");
        drop(grads);

        // Layers, last to first: recompute, backpropagate the output gradient.
        let (cos, sin, mask) = (
            Tensor::<B, 4>::from_inner(cos),
            Tensor::<B, 4>::from_inner(sin),
            Tensor::<B, 4>::from_inner(mask),
        );
        for layer in self.model.layers.iter().rev() {
            let (input, seed) = kept.pop().expect("one kept input per layer");
            // The input of the layer before comes back while this one runs.
            if let Some((before, _)) = kept.last_mut() {
                before.prefetch();
            }
            let x = Tensor::<B, 3>::from_inner(input.into_tensor()).require_grad();
            B::InnerBackend::seed(&x.device(), seed);
            peft_lora::seed_dropout(seed);
            let grads = layer_backward(layer, x.clone(), g, &cos, &sin, &mask, &ctx);
            on_grads(&grads);
            g = x.grad(&grads).expect("a layer input has a gradient");
        }

        // The embedding, when it has trainable rows.
        if let Some(embedded) = embedded {
            let grads = (embedded * Tensor::from_inner(g)).backward();
            on_grads(&grads);
        }
        CheckpointedLoss {
            loss,
            n_tokens: out.n_tokens,
        }
    }
}

/// One checkpointed layer's backward: its forward again under autodiff from its kept input `x`,
/// then a backward from its output gradient `g`. The recomputation's attention keeps its
/// probabilities, as its backward is next.
///
/// With seeded roots (`ops::seeded_backward_enabled`), the backward starts at the tensors
/// [`crate::model::DecoderLayer::backward_seeds`] gives, each handed its gradient as it is (on
/// CUDA, a `[1]` root with no product; elsewhere the sum of `<t, g>`); when `down_proj` trains
/// nothing, its output is never computed. Otherwise `y * g` seeds it: the backward of a
/// non-scalar root starts from ones of its shape, so `y * g` hands `y` exactly `g` (no `sum()`:
/// its reduction over the whole hidden state cost more than the rest of this seeding).
fn layer_backward<B: AutodiffBackend>(
    layer: &crate::model::DecoderLayer<B>,
    x: Tensor<B, 3>,
    g: Tensor<B::InnerBackend, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    ctx: &LoraCtx,
) -> B::Gradients {
    let g = Tensor::<B, 3>::from_inner(g);
    if crate::ops::seeded_backward_enabled() {
        let seeds =
            crate::ops::keeping_attention_probs(|| layer.backward_seeds(x, g, cos, sin, mask, ctx));
        let root = crate::ops::seeded_root(seeds.clone()).unwrap_or_else(|| {
            seeds
                .into_iter()
                .map(|(t, g)| (t * g).sum())
                .reduce(|a, b| a + b)
                .expect("a layer seeds at least one tensor")
        });
        return root.backward();
    }
    let (y, _) =
        crate::ops::keeping_attention_probs(|| layer.forward(x, cos, sin, mask, None, ctx));
    (y * g).backward()
}
