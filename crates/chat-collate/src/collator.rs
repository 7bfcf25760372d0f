//! Conversation -> (input_ids, labels): render, tokenise once without added special tokens,
//! label the tokens whose offsets fall in an answer span, then apply the length policy.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::encoded::{EncodeOutcome, EncodeReport, Encoded, SkipReason, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::jinja::JinjaRenderer;
use crate::message::{validate_messages, Conversation, Message};
use crate::special::{SpecialIds, END_HEADER, EOT, START_HEADER};
use crate::template::{render_builtin, ChatFormat, Rendered};

/// What to do with a sample longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationPolicy {
    /// Keep the first `max_length` tokens (skipped, and counted, if no label is left).
    Truncate,
    /// Leave the sample out and count it in the [`EncodeReport`].
    #[default]
    Skip,
    /// Fail with [`Error::TooLong`].
    Error,
}

/// Collation settings (saved with a training run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollatorConfig {
    /// Longest sample in tokens.
    pub max_length: usize,
    /// What happens to longer samples.
    pub truncation: TruncationPolicy,
    /// How conversations become text.
    pub format: ChatFormat,
    /// Label every assistant turn (`true`, the better default) or only the first (the
    /// tutorial's behaviour).
    pub label_all_assistant_turns: bool,
}

impl Default for CollatorConfig {
    fn default() -> Self {
        Self::llama3(1024)
    }
}

impl CollatorConfig {
    /// Built-in Llama 3 format, every answer labelled, long samples skipped.
    pub fn llama3(max_length: usize) -> Self {
        Self {
            max_length,
            truncation: TruncationPolicy::Skip,
            format: ChatFormat::Llama3,
            label_all_assistant_turns: true,
        }
    }

    /// The tutorial's collator: single `\n` after headers, first answer only, truncation.
    pub fn tutorial(max_length: usize) -> Self {
        Self {
            max_length,
            truncation: TruncationPolicy::Truncate,
            format: ChatFormat::Tutorial,
            label_all_assistant_turns: false,
        }
    }
}

/// Turns conversations into training samples with assistant-only labels.
#[derive(Debug)]
pub struct ChatCollator {
    tokenizer: Tokenizer,
    cfg: CollatorConfig,
    jinja: Option<JinjaRenderer>,
    bos_id: Option<u32>,
}

impl ChatCollator {
    /// Checks the configuration against the tokenizer (the Llama 3 formats need its chat
    /// tokens as single special tokens) and compiles a Jinja template.
    pub fn new(tokenizer: Tokenizer, cfg: CollatorConfig) -> Result<Self> {
        if cfg.max_length == 0 {
            return Err(Error::InvalidArgument("max_length must be positive".into()));
        }
        let (jinja, bos_id) = match &cfg.format {
            ChatFormat::Llama3 | ChatFormat::Tutorial => {
                let ids = SpecialIds::from_tokenizer(&tokenizer)?;
                for (tok, id) in [
                    (crate::special::BEGIN_OF_TEXT, ids.begin_of_text),
                    (START_HEADER, ids.start_header),
                    (END_HEADER, ids.end_header),
                    (EOT, ids.eot),
                ] {
                    let enc = tokenizer.encode(tok, false).map_err(Error::tokenizer)?;
                    if enc.get_ids() != [id] {
                        return Err(Error::Tokenizer(format!(
                            "{tok} is in the vocabulary but is not split out as a special token"
                        )));
                    }
                }
                (None, Some(ids.begin_of_text))
            }
            ChatFormat::Jinja(t) => {
                let bos = (!t.bos_token.is_empty())
                    .then(|| tokenizer.token_to_id(&t.bos_token))
                    .flatten();
                (Some(JinjaRenderer::new(t)?), bos)
            }
        };
        Ok(Self {
            tokenizer,
            cfg,
            jinja,
            bos_id,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The configuration.
    pub fn config(&self) -> &CollatorConfig {
        &self.cfg
    }

    /// Renders a conversation to train on, with the byte spans that keep their labels.
    pub fn render(&self, conv: &Conversation) -> Result<Rendered> {
        validate_messages(&conv.messages, true)?;
        let first_only = !self.cfg.label_all_assistant_turns;
        let mut r = match (&self.cfg.format, &self.jinja) {
            (ChatFormat::Jinja(_), Some(j)) => j.render_with_spans(&conv.messages)?,
            (format, _) => render_builtin(
                &conv.messages,
                matches!(format, ChatFormat::Tutorial),
                false,
                first_only,
            ),
        };
        if first_only {
            r.label_spans.truncate(1);
        }
        Ok(r)
    }

    /// Renders `messages` as a prompt; with `add_generation_prompt` it ends with the
    /// assistant header the model continues from.
    pub fn render_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        validate_messages(messages, false)?;
        match (&self.cfg.format, &self.jinja) {
            (ChatFormat::Jinja(_), Some(j)) => j.render(messages, add_generation_prompt),
            (format, _) => Ok(render_builtin(
                messages,
                matches!(format, ChatFormat::Tutorial),
                add_generation_prompt,
                false,
            )
            .text),
        }
    }

    /// Token ids of the generation prompt for `messages` (a single BOS, no answer).
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render_prompt(messages, true)?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(Error::tokenizer)?;
        let mut ids = enc.get_ids().to_vec();
        if self.double_bos(&ids) {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// Encodes one conversation; `None` when the length policy skips it.
    pub fn encode(&self, conv: &Conversation) -> Result<Option<Encoded>> {
        Ok(match self.encode_detailed(conv)? {
            EncodeOutcome::Encoded(e) => Some(e),
            EncodeOutcome::Skipped(_) => None,
        })
    }

    /// Encodes one conversation, saying why when it is skipped.
    pub fn encode_detailed(&self, conv: &Conversation) -> Result<EncodeOutcome> {
        let rendered = self.render(conv)?;
        let enc = self
            .tokenizer
            .encode(rendered.text.as_str(), false)
            .map_err(Error::tokenizer)?;
        let mut ids = enc.get_ids().to_vec();
        let mut labels = labels_from_offsets(&ids, enc.get_offsets(), &rendered.label_spans);
        if self.double_bos(&ids) {
            ids.remove(0);
            labels.remove(0);
        }
        let len = ids.len();
        let max = self.cfg.max_length;
        let mut truncated = false;
        if len > max {
            match self.cfg.truncation {
                TruncationPolicy::Error => {
                    return Err(Error::TooLong {
                        len,
                        max_length: max,
                    })
                }
                TruncationPolicy::Skip => {
                    return Ok(EncodeOutcome::Skipped(SkipReason::TooLong { len }))
                }
                TruncationPolicy::Truncate => {
                    ids.truncate(max);
                    labels.truncate(max);
                    truncated = true;
                }
            }
        }
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Ok(EncodeOutcome::Skipped(SkipReason::NoLabelsLeft { len }));
        }
        let n = ids.len();
        Ok(EncodeOutcome::Encoded(Encoded {
            input_ids: ids,
            labels,
            segment_lengths: vec![n],
            truncated,
        }))
    }

    /// Encodes a dataset in order; errors carry the sample's index.
    pub fn encode_all(&self, convs: &[Conversation]) -> Result<(Vec<Encoded>, EncodeReport)> {
        self.encode_range(convs, 0)
    }

    /// [`Self::encode_all`] on `threads` threads; same output, same order.
    pub fn encode_all_parallel(
        &self,
        convs: &[Conversation],
        threads: usize,
    ) -> Result<(Vec<Encoded>, EncodeReport)> {
        let threads = threads.max(1);
        if threads == 1 || convs.len() < 2 * threads {
            return self.encode_all(convs);
        }
        let chunk = convs.len().div_ceil(threads);
        let parts: Vec<Result<(Vec<Encoded>, EncodeReport)>> = std::thread::scope(|s| {
            let handles: Vec<_> = convs
                .chunks(chunk)
                .enumerate()
                .map(|(k, part)| s.spawn(move || self.encode_range(part, k * chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut out = Vec::with_capacity(convs.len());
        let mut report = EncodeReport::default();
        for part in parts {
            let (samples, r) = part?;
            out.extend(samples);
            report.total += r.total;
            report.encoded += r.encoded;
            report.truncated += r.truncated;
            report.skipped_too_long.extend(r.skipped_too_long);
            report.skipped_no_labels.extend(r.skipped_no_labels);
            report.tokens += r.tokens;
            report.label_tokens += r.label_tokens;
            report.max_len = report.max_len.max(r.max_len);
        }
        Ok((out, report))
    }

    fn encode_range(
        &self,
        convs: &[Conversation],
        offset: usize,
    ) -> Result<(Vec<Encoded>, EncodeReport)> {
        let mut out = Vec::with_capacity(convs.len());
        let mut report = EncodeReport::default();
        for (i, conv) in convs.iter().enumerate() {
            let outcome = self
                .encode_detailed(conv)
                .map_err(|e| e.in_sample(offset + i))?;
            report.record(offset + i, &outcome);
            if let EncodeOutcome::Encoded(e) = outcome {
                out.push(e);
            }
        }
        Ok((out, report))
    }

    fn double_bos(&self, ids: &[u32]) -> bool {
        matches!((self.bos_id, ids), (Some(b), [x, y, ..]) if *x == b && *y == b)
    }
}

/// Labels from byte offsets: a token keeps its id when it starts inside an answer span.
/// Spans are sorted and disjoint; token starts are non-decreasing.
fn labels_from_offsets(
    ids: &[u32],
    offsets: &[(usize, usize)],
    spans: &[Range<usize>],
) -> Vec<i64> {
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    let mut s = 0;
    for (i, (&id, &(start, _))) in ids.iter().zip(offsets).enumerate() {
        while s < spans.len() && spans[s].end <= start {
            s += 1;
        }
        if s < spans.len() && spans[s].start <= start {
            labels[i] = i64::from(id);
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_inside_spans_are_labelled() {
        let ids = [10, 11, 12, 13, 14];
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12)];
        let labels = labels_from_offsets(&ids, &offsets, &[2..6, 9..12]);
        assert_eq!(labels, [-100, 11, 12, -100, 14]);
    }
}
