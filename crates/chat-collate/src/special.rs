//! Llama 3's special tokens and their ids in a given tokenizer.

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Starts every sequence (id 128000 in Llama 3).
pub const BEGIN_OF_TEXT: &str = "<|begin_of_text|>";
/// End of a document (id 128001 in Llama 3; `config.json`'s eos).
pub const END_OF_TEXT: &str = "<|end_of_text|>";
/// Opens a role header (id 128006 in Llama 3).
pub const START_HEADER: &str = "<|start_header_id|>";
/// Closes a role header (id 128007 in Llama 3).
pub const END_HEADER: &str = "<|end_header_id|>";
/// Ends a turn; generation stops on it (id 128009 in Llama 3).
pub const EOT: &str = "<|eot_id|>";
/// Llama 3.1's dedicated padding token (id 128004), present in the demo tokenizer too.
pub const FINETUNE_RIGHT_PAD: &str = "<|finetune_right_pad_id|>";

/// The ids of Llama 3's chat special tokens in one tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    /// `<|begin_of_text|>`.
    pub begin_of_text: u32,
    /// `<|end_of_text|>`.
    pub end_of_text: u32,
    /// `<|start_header_id|>`.
    pub start_header: u32,
    /// `<|end_header_id|>`.
    pub end_header: u32,
    /// `<|eot_id|>`.
    pub eot: u32,
    /// `<|finetune_right_pad_id|>` when the vocabulary has it.
    pub finetune_right_pad: Option<u32>,
}

impl SpecialIds {
    /// Looks the tokens up in `tokenizer`; fails naming the first missing one.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::MissingToken(t.to_string()))
        };
        Ok(Self {
            begin_of_text: id(BEGIN_OF_TEXT)?,
            end_of_text: id(END_OF_TEXT)?,
            start_header: id(START_HEADER)?,
            end_header: id(END_HEADER)?,
            eot: id(EOT)?,
            finetune_right_pad: tokenizer.token_to_id(FINETUNE_RIGHT_PAD),
        })
    }

    /// A padding id for training batches: `<|finetune_right_pad_id|>` if present, else
    /// `<|end_of_text|>` (padding is masked and labelled -100, so any id is correct).
    pub fn pad(&self) -> u32 {
        self.finetune_right_pad.unwrap_or(self.end_of_text)
    }
}
