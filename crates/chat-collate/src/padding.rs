//! Padding samples into rectangular batches (right for training, left for generation), as
//! plain vectors and as Burn tensors.

use std::borrow::Borrow;

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::encoded::{Encoded, IGNORE_INDEX};

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingSide {
    /// Tokens first, then padding: training.
    #[default]
    Right,
    /// Padding first, then tokens: batched generation, so every prompt ends at the last
    /// column.
    Left,
}

/// How to pad a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PadConfig {
    /// Id written into padding positions (masked and labelled -100, so any id is correct).
    pub pad_id: u32,
    /// Where padding goes.
    pub side: PaddingSide,
    /// Round the batch length up to a multiple of this (kernels like multiples of 8).
    pub pad_to_multiple_of: Option<usize>,
}

impl PadConfig {
    /// Right padding with `pad_id`, no rounding.
    pub fn right(pad_id: u32) -> Self {
        Self {
            pad_id,
            side: PaddingSide::Right,
            pad_to_multiple_of: None,
        }
    }

    /// Left padding with `pad_id`, no rounding.
    pub fn left(pad_id: u32) -> Self {
        Self {
            side: PaddingSide::Left,
            ..Self::right(pad_id)
        }
    }
}

/// A padded batch as row-major `[batch, seq]` vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaddedBatch {
    /// Rows.
    pub batch_size: usize,
    /// Columns.
    pub seq_len: usize,
    /// Token ids, `pad_id` in padding.
    pub input_ids: Vec<i64>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Labels, -100 in padding.
    pub labels: Vec<i64>,
    /// Position of each token within its packed segment (0 in padding).
    pub position_ids: Vec<i64>,
    /// 1, 2, ... for the packed segments of a row (all 1 when not packed), 0 in padding.
    pub segment_ids: Vec<i64>,
}

/// Pads `samples` into one batch (length = longest sample, rounded up if configured).
pub fn pad_batch<S: Borrow<Encoded>>(samples: &[S], cfg: &PadConfig) -> PaddedBatch {
    let longest = samples.iter().map(|s| s.borrow().len()).max().unwrap_or(0);
    let seq_len = match cfg.pad_to_multiple_of {
        Some(m) if m > 1 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let n = samples.len() * seq_len;
    let mut b = PaddedBatch {
        batch_size: samples.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        attention_mask: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
    };
    for s in samples {
        let s = s.borrow();
        let pad = seq_len - s.len();
        if cfg.side == PaddingSide::Left {
            b.push_padding(pad, cfg.pad_id);
        }
        b.input_ids
            .extend(s.input_ids.iter().map(|&t| i64::from(t)));
        b.attention_mask.extend(std::iter::repeat_n(1, s.len()));
        b.labels.extend_from_slice(&s.labels);
        let mut covered = 0;
        for (k, seg) in s.segments().into_iter().enumerate() {
            let seg = seg.min(s.len() - covered);
            b.position_ids.extend(0..seg as i64);
            b.segment_ids.extend(std::iter::repeat_n(k as i64 + 1, seg));
            covered += seg;
        }
        // Segment lengths that fall short of the sample: the rest is one more segment.
        if covered < s.len() {
            let k = b.segment_ids.last().copied().unwrap_or(0) + 1;
            b.position_ids.extend(0..(s.len() - covered) as i64);
            b.segment_ids
                .extend(std::iter::repeat_n(k, s.len() - covered));
        }
        if cfg.side == PaddingSide::Right {
            b.push_padding(pad, cfg.pad_id);
        }
    }
    b
}

/// Left-pads generation prompts (labels all -100).
pub fn pad_prompts(prompts: &[Vec<u32>], pad_id: u32) -> PaddedBatch {
    let samples: Vec<Encoded> = prompts
        .iter()
        .map(|p| Encoded::new(p.clone(), vec![IGNORE_INDEX; p.len()]))
        .collect();
    pad_batch(&samples, &PadConfig::left(pad_id))
}

impl PaddedBatch {
    fn push_padding(&mut self, n: usize, pad_id: u32) {
        self.input_ids
            .extend(std::iter::repeat_n(i64::from(pad_id), n));
        for v in [
            &mut self.attention_mask,
            &mut self.position_ids,
            &mut self.segment_ids,
        ] {
            v.extend(std::iter::repeat_n(0, n));
        }
        self.labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
    }

    /// Non-padding tokens.
    pub fn n_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Loss targets after the shift (labelled tokens that are not a row's first column).
    pub fn n_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .enumerate()
            .filter(|(i, &l)| l != IGNORE_INDEX && i % self.seq_len.max(1) != 0)
            .count()
    }

    /// Whether query `q` may attend to key `k` in row `row`: causal, same segment, no padding.
    pub fn may_attend(&self, row: usize, q: usize, k: usize) -> bool {
        let base = row * self.seq_len;
        let (sq, sk) = (self.segment_ids[base + q], self.segment_ids[base + k]);
        k <= q && sq != 0 && sq == sk
    }

    /// `[batch, 1, seq, seq]` boolean mask, `true` where attention is allowed
    /// ([`Self::may_attend`]); needed only for packed batches. Rows of padding queries are
    /// all `false`.
    pub fn attention_mask_4d<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let (b, s) = (self.batch_size, self.seq_len);
        let mut data = Vec::with_capacity(b * s * s);
        for row in 0..b {
            for q in 0..s {
                data.extend((0..s).map(|k| self.may_attend(row, q, k)));
            }
        }
        Tensor::from_data(TensorData::new(data, [b, 1, s, s]), device)
    }

    /// Moves the batch to `device` as Burn tensors.
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> TrainBatch<B> {
        let shape = [self.batch_size, self.seq_len];
        let t = |v: &Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.clone(), shape), device)
        };
        TrainBatch {
            input_ids: t(&self.input_ids),
            attention_mask: t(&self.attention_mask),
            labels: t(&self.labels),
            position_ids: t(&self.position_ids),
            segment_ids: t(&self.segment_ids),
            n_tokens: self.n_tokens(),
            n_label_tokens: self.n_label_tokens(),
        }
    }
}

/// A padded batch on a device; all tensors are `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// Token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<B, 2, Int>,
    /// Labels, -100 where ignored (not shifted).
    pub labels: Tensor<B, 2, Int>,
    /// Positions, restarting at each packed segment.
    pub position_ids: Tensor<B, 2, Int>,
    /// Packed-segment ids (1, 2, ...), 0 in padding; attention must not cross segments.
    pub segment_ids: Tensor<B, 2, Int>,
    /// Non-padding tokens.
    pub n_tokens: usize,
    /// Loss targets after the shift.
    pub n_label_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_and_left_padding() {
        let a = Encoded::new(vec![1, 2, 3], vec![-100, 2, 3]);
        let b = Encoded::new(vec![4], vec![-100]);
        let r = pad_batch(&[&a, &b], &PadConfig::right(0));
        assert_eq!(r.input_ids, [1, 2, 3, 4, 0, 0]);
        assert_eq!(r.attention_mask, [1, 1, 1, 1, 0, 0]);
        assert_eq!(r.labels, [-100, 2, 3, -100, -100, -100]);
        let l = pad_batch(&[a, b], &PadConfig::left(9));
        assert_eq!(l.input_ids, [1, 2, 3, 9, 9, 4]);
        assert_eq!(l.position_ids, [0, 1, 2, 0, 0, 0]);
        assert_eq!(l.n_tokens(), 4);
        assert_eq!(l.n_label_tokens(), 2);
    }
}
