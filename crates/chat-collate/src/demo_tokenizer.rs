//! A small byte-level BPE tokenizer built in code, for the CPU demo and the default tests:
//! Llama 3's pre-tokenizer regex and chat special tokens, about 1,000 ids, trained
//! deterministically on the bundled news2stock sample (typical samples stay under ~400
//! tokens). Any text round-trips, Korean included, because the base alphabet is all bytes.

use std::sync::OnceLock;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::special::{
    SpecialIds, BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, FINETUNE_RIGHT_PAD, START_HEADER,
};

/// Vocabulary size of [`demo_tokenizer`] (special tokens included).
pub const DEMO_VOCAB_SIZE: usize = 1000;

/// Llama 3's pre-tokenizer split pattern (from its `tokenizer.json`).
pub const LLAMA3_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens, in id order 0..6 of the demo tokenizer.
pub const DEMO_SPECIAL_TOKENS: [&str; 6] = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    START_HEADER,
    END_HEADER,
    EOT,
    FINETUNE_RIGHT_PAD,
];

/// The demo tokenizer, trained once per process on the bundled sample and then cloned.
pub fn demo_tokenizer() -> Tokenizer {
    static DEMO: OnceLock<Tokenizer> = OnceLock::new();
    DEMO.get_or_init(|| {
        // The bundled sample is compiled in and known to parse: a failure is a bug.
        let rows = crate::news2stock::load_sample().expect("bundled sample parses");
        let mut texts: Vec<String> = Vec::with_capacity(rows.len() * 3 + 1);
        texts.push("system user assistant".to_string());
        for r in rows {
            texts.extend([r.system, r.user, r.assistant]);
        }
        train_byte_level_bpe(texts.iter(), DEMO_VOCAB_SIZE).expect("demo tokenizer trains")
    })
    .clone()
}

/// The Llama 3 special-token ids of [`demo_tokenizer`] (`<|begin_of_text|>` = 0, ...,
/// `<|eot_id|>` = 4, `<|finetune_right_pad_id|>` = 5).
pub fn demo_special_ids() -> SpecialIds {
    SpecialIds {
        begin_of_text: 0,
        end_of_text: 1,
        start_header: 2,
        end_header: 3,
        eot: 4,
        finetune_right_pad: Some(5),
    }
}

/// Trains a byte-level BPE tokenizer with Llama 3's split pattern and its chat special tokens
/// (ids 0..6) on `texts`. Deterministic for the same texts and size.
pub fn train_byte_level_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let specials: Vec<AddedToken> = DEMO_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let split = Split::new(
        SplitPattern::Regex(LLAMA3_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(Error::tokenizer)?;
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut TrainerWrapper::BpeTrainer(trainer), texts)
        .map_err(Error::tokenizer)?;
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}
