//! transformers' causal-LM loss: logits at position `t` predict `labels[t + 1]`, `-100` is
//! ignored, the mean runs over labelled tokens; computed in f32.

use burn::tensor::{activation, backend::Backend, FloatDType, Int, Tensor, TensorData};
use peft_lora::LoraCtx;

use crate::model::LlamaForCausalLM;

/// The label value that is not predicted (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// How [`LlamaForCausalLM::forward_loss`] computes the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossOptions {
    /// Run the LM head only at positions whose next token has a label. The logits
    /// (`[tokens, vocab]`, 128k wide for Llama 3) are the largest activation of training; this
    /// skips prompt and padding positions and gives the same loss. No logits are returned then.
    pub head_only_on_labels: bool,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            head_only_on_labels: true,
        }
    }
}

/// Loss and, when computed, logits.
#[derive(Debug, Clone)]
pub struct CausalLmOutput<B: Backend> {
    /// Mean cross-entropy over labelled tokens, f32, shape `[1]` (0 when nothing is labelled,
    /// where transformers gives NaN, so such a batch leaves the adapters unchanged).
    pub loss: Tensor<B, 1>,
    /// `[batch, seq, vocab]`, unless `head_only_on_labels`.
    pub logits: Option<Tensor<B, 3>>,
    /// Number of labelled tokens the mean ran over.
    pub n_tokens: usize,
}

/// `-mean(log_softmax(logits)[target])` in f32. `logits` `[n, vocab]`, `targets` `n` ids.
fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Vec<i64>) -> Tensor<B, 1> {
    let n = targets.len();
    let device = logits.device();
    let logp = activation::log_softmax(logits.cast(FloatDType::F32), 1);
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let picked: Tensor<B, 1> = logp.gather(1, t.unsqueeze_dim::<2>(1)).reshape([n]);
    -picked.sum() / n as f64
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// `cross_entropy(lm_head(hidden), targets)`; on CUDA with a frozen head (no live
    /// `modules_to_save` copy) one op that never
    /// holds the `[n, vocab]` logits beyond a chunk of rows (`crate::ops`).
    fn head_cross_entropy(&self, hidden: Tensor<B, 2>, targets: Vec<i64>) -> Tensor<B, 1> {
        if crate::ops::cross_entropy_supported::<B>() && !self.head_trains() {
            let n = targets.len();
            let w = self.head_weight();
            let t = Tensor::<B, 1, Int>::from_data(
                TensorData::new(targets.clone(), [n]),
                &hidden.device(),
            );
            if let Some(sum) = crate::ops::linear_cross_entropy(&hidden, &w, &t) {
                return sum / n as f64;
            }
        }
        cross_entropy(self.lm_head(hidden), targets)
    }

    /// Loss (and optionally logits) of a batch.
    ///
    /// # Shapes
    /// input_ids, attention_mask, labels: `[batch, seq]`
    pub fn forward_loss(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        labels: Tensor<B, 2, Int>,
        opts: LossOptions,
        ctx: &LoraCtx,
    ) -> CausalLmOutput<B> {
        let [b, s] = input_ids.dims();
        assert_eq!(
            labels.dims(),
            [b, s],
            "labels must have the shape of input_ids"
        );
        let hidden = self.hidden_states(input_ids, attention_mask, None, None, ctx);
        self.loss_from_hidden(hidden, labels, opts)
    }

    /// The loss (and optionally logits) from the final hidden states `[batch, seq, hidden]`.
    pub(crate) fn loss_from_hidden(
        &self,
        hidden: Tensor<B, 3>,
        labels: Tensor<B, 2, Int>,
        opts: LossOptions,
    ) -> CausalLmOutput<B> {
        let [b, s, _] = hidden.dims();
        let device = hidden.device();
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);

        // Position t (of the first s - 1) predicts labels[t + 1].
        let shifted: Vec<i64> = if s < 2 {
            Vec::new()
        } else {
            let next = labels.slice([0..b, 1..s]).reshape([b * (s - 1)]);
            next.into_data()
                .convert::<i64>()
                .into_vec()
                .expect("converted to i64")
        };
        let keep: Vec<i64> = (0..shifted.len() as i64)
            .filter(|&i| shifted[i as usize] != IGNORE_INDEX)
            .collect();
        let targets: Vec<i64> = keep.iter().map(|&i| shifted[i as usize]).collect();
        let n = keep.len();
        let rows = |t: Tensor<B, 2>| {
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.clone(), [n]), &device);
            t.select(0, idx)
        };

        if opts.head_only_on_labels {
            let loss = if n == 0 {
                // Keeps the graph connected so `backward` works on such a batch.
                hidden.sum().cast(FloatDType::F32) * 0.0
            } else {
                let hidden = hidden
                    .slice([0..b, 0..s - 1, 0..h])
                    .reshape([b * (s - 1), h]);
                self.head_cross_entropy(rows(hidden), targets)
            };
            return CausalLmOutput {
                loss,
                logits: None,
                n_tokens: n,
            };
        }
        let logits = self.lm_head(hidden.reshape([b * s, h])).reshape([b, s, v]);
        let loss = if n == 0 {
            logits.clone().sum().cast(FloatDType::F32) * 0.0
        } else {
            let shifted_logits = logits
                .clone()
                .slice([0..b, 0..s - 1, 0..v])
                .reshape([b * (s - 1), v]);
            cross_entropy(rows(shifted_logits), targets)
        };
        CausalLmOutput {
            loss,
            logits: Some(logits),
            n_tokens: n,
        }
    }

    /// [`Self::forward_loss`]'s loss alone, shape `[1]`.
    pub fn loss(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        labels: Tensor<B, 2, Int>,
        opts: LossOptions,
        ctx: &LoraCtx,
    ) -> Tensor<B, 1> {
        self.forward_loss(input_ids, attention_mask, labels, opts, ctx)
            .loss
    }
}
