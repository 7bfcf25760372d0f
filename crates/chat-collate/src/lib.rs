//! Chat-template collation for supervised fine-tuning, and the chat datasets it feeds on.
//!
//! A [`Conversation`] is rendered with a [`ChatFormat`] (built-in Llama 3, the tutorial's
//! variant, or the tokenizer's Jinja `chat_template`), tokenised once without added special
//! tokens, and labelled from the rendered text's byte offsets: assistant content and its
//! closing `<|eot_id|>` keep their ids, everything else is -100. [`ChatCollator`] applies the
//! length policy; [`pad_batch`], [`pack`] and [`bucketed_batches`] turn samples into batches;
//! [`ChatBatcher`] makes Burn tensors ([`TrainBatch`]).
//!
//! Datasets: [`news2stock`] (local parquet/JSONL or the Hub, a bundled synthetic sample) and
//! generic `{"messages": [...]}` JSONL ([`load_chat_jsonl`]). Malformed rows are errors naming
//! file, row and field, or counted skips in a [`LoadReport`]; never silent drops.
//!
//! The crate knows nothing of models or LoRA.
//!
//! ```
//! use chat_collate::{demo_tokenizer, news2stock, ChatCollator, CollatorConfig, pad_batch, PadConfig};
//! let rows = news2stock::load_sample()?;
//! let collator = ChatCollator::new(demo_tokenizer(), CollatorConfig::llama3(512))?;
//! let conv = news2stock::to_conversation(&rows[0]);
//! let sample = collator.encode(&conv)?.expect("fits in 512 tokens");
//! assert_eq!(sample.label_runs().len(), 1);
//! let batch = pad_batch(&[sample], &PadConfig::right(chat_collate::demo_special_ids().pad()));
//! assert_eq!(batch.batch_size, 1);
//! # Ok::<(), chat_collate::Error>(())
//! ```

#![warn(missing_docs)]

mod batcher;
mod bucketing;
mod collator;
mod demo_tokenizer;
mod encoded;
mod error;
pub mod hub;
mod jinja;
mod load;
mod message;
pub mod news2stock;
mod news2stock_parquet;
mod packing;
mod padding;
mod parquet_io;
pub mod pyjson;
mod special;
mod template;

pub use batcher::ChatBatcher;
#[cfg(feature = "dataloader")]
pub use batcher::{data_loader, LoaderConfig};
pub use bucketing::{bucketed_batches, shuffled_batches};
pub use collator::{ChatCollator, CollatorConfig, TruncationPolicy};
pub use demo_tokenizer::{
    demo_special_ids, demo_tokenizer, train_byte_level_bpe, DEMO_SPECIAL_TOKENS, DEMO_VOCAB_SIZE,
    LLAMA3_SPLIT_PATTERN,
};
pub use encoded::{EncodeOutcome, EncodeReport, Encoded, SkipReason, IGNORE_INDEX};
pub use error::{Error, Result, RowIssue, RowLocation};
pub use load::{load_chat_jsonl, load_chat_jsonl_with, BadRowPolicy, LoadReport};
pub use message::{Conversation, Message, ASSISTANT};
pub use news2stock_parquet::{write_news_parquet, AssistantColumn};
pub use packing::{pack, padding_fraction};
pub use padding::{pad_batch, pad_prompts, PadConfig, PaddedBatch, PaddingSide, TrainBatch};
pub use special::{
    SpecialIds, BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, FINETUNE_RIGHT_PAD, START_HEADER,
};
pub use template::{ChatFormat, JinjaTemplate, Rendered, LLAMA3_CHAT_TEMPLATE};
