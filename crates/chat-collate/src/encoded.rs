//! The result of collating one conversation, and the report over many.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The label value the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenised sample: ids and labels of equal length, before padding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoded {
    /// Token ids of the rendered conversation.
    pub input_ids: Vec<u32>,
    /// `input_ids[i]` where the token is trained on (assistant content and its closing
    /// `<|eot_id|>`), [`IGNORE_INDEX`] elsewhere. Not shifted: the model shifts.
    pub labels: Vec<i64>,
    /// Lengths of the samples packed into this one, in order (one entry when not packed);
    /// attention never crosses these boundaries and positions restart at each.
    pub segment_lengths: Vec<usize>,
    /// Whether the sample was cut to `max_length`.
    pub truncated: bool,
}

impl Encoded {
    /// A single-segment sample. Panics if the lengths differ (a programmer error).
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        assert_eq!(
            input_ids.len(),
            labels.len(),
            "ids and labels differ in length"
        );
        let n = input_ids.len();
        Self {
            input_ids,
            labels,
            segment_lengths: vec![n],
            truncated: false,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// All ones (padding is added by [`crate::pad_batch`]).
    pub fn attention_mask(&self) -> Vec<u32> {
        vec![1; self.len()]
    }

    /// Number of tokens that keep their label.
    pub fn n_label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// The labelled ids grouped into maximal contiguous runs (one run per answer).
    pub fn label_runs(&self) -> Vec<Vec<u32>> {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut open = false;
        for &l in &self.labels {
            if l == IGNORE_INDEX {
                open = false;
            } else {
                if !open {
                    runs.push(Vec::new());
                    open = true;
                }
                if let Some(run) = runs.last_mut() {
                    run.push(l as u32);
                }
            }
        }
        runs
    }

    /// The segment lengths, treating an empty list as one segment of the whole sample.
    pub(crate) fn segments(&self) -> Vec<usize> {
        if self.segment_lengths.is_empty() {
            vec![self.len()]
        } else {
            self.segment_lengths.clone()
        }
    }
}

/// Why a conversation was skipped instead of encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkipReason {
    /// Longer than `max_length` under [`crate::TruncationPolicy::Skip`].
    TooLong {
        /// Tokens in the rendered sample.
        len: usize,
    },
    /// Truncation cut every labelled token, so nothing would be learnt.
    NoLabelsLeft {
        /// Tokens in the rendered sample before truncation.
        len: usize,
    },
}

/// The outcome of collating one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeOutcome {
    /// The sample, possibly truncated.
    Encoded(Encoded),
    /// Not used, and why.
    Skipped(SkipReason),
}

/// Counts over a dataset: nothing is dropped without showing up here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeReport {
    /// Conversations seen.
    pub total: usize,
    /// Samples produced.
    pub encoded: usize,
    /// Of those, how many were cut to `max_length`.
    pub truncated: usize,
    /// Indices of conversations skipped for length, with their token counts.
    pub skipped_too_long: Vec<(usize, usize)>,
    /// Indices of conversations whose labels were all cut away by truncation.
    pub skipped_no_labels: Vec<usize>,
    /// Tokens in the produced samples.
    pub tokens: usize,
    /// Labelled tokens in the produced samples.
    pub label_tokens: usize,
    /// Longest produced sample.
    pub max_len: usize,
}

impl EncodeReport {
    /// Number of skipped conversations.
    pub fn skipped(&self) -> usize {
        self.skipped_too_long.len() + self.skipped_no_labels.len()
    }

    pub(crate) fn record(&mut self, index: usize, outcome: &EncodeOutcome) {
        self.total += 1;
        match outcome {
            EncodeOutcome::Encoded(e) => {
                self.encoded += 1;
                self.truncated += usize::from(e.truncated);
                self.tokens += e.len();
                self.label_tokens += e.n_label_tokens();
                self.max_len = self.max_len.max(e.len());
            }
            EncodeOutcome::Skipped(SkipReason::TooLong { len }) => {
                self.skipped_too_long.push((index, *len))
            }
            EncodeOutcome::Skipped(SkipReason::NoLabelsLeft { .. }) => {
                self.skipped_no_labels.push(index)
            }
        }
    }
}

impl fmt::Display for EncodeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} conversations: {} encoded ({} truncated), {} skipped as too long, {} skipped \
             with no labels left; {} tokens, {} labelled, longest {}",
            self.total,
            self.encoded,
            self.truncated,
            self.skipped_too_long.len(),
            self.skipped_no_labels.len(),
            self.tokens,
            self.label_tokens,
            self.max_len
        )
    }
}
