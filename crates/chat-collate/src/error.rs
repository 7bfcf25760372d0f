//! The crate's error type: every variant names what went wrong and where (file, row, field,
//! turn), so a bad dataset row is never a silent drop.

use std::fmt;
use std::path::PathBuf;

/// Where a row sits in its source: JSONL rows are named by line, parquet rows by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLocation {
    /// 1-based line number of a JSONL file.
    Line(usize),
    /// 0-based row index of a parquet file (across row groups).
    Row(usize),
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowLocation::Line(n) => write!(f, "line {n}"),
            RowLocation::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// One bad row: which file, which row, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowIssue {
    /// The file (or the name of an in-memory source) the row comes from.
    pub file: String,
    /// The row's position in that file.
    pub location: RowLocation,
    /// Dotted path of the offending field (`assistant.summary`, `messages[2].content`), or `""`
    /// when the row as a whole is unreadable.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for RowIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}: {}", self.file, self.location, self.message)
        } else {
            write!(
                f,
                "{}: {}: field `{}`: {}",
                self.file, self.location, self.field, self.message
            )
        }
    }
}

/// Errors of chat rendering, collation and dataset loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset row is malformed (missing field, wrong type, empty answer, bad JSON).
    #[error("{0}")]
    Row(RowIssue),
    /// A parquet file is unreadable (corrupt footer, unsupported encoding, ...).
    #[error("{path}: corrupt or unreadable parquet file: {message}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What the parquet reader reported.
        message: String,
    },
    /// A JSON configuration file (`tokenizer_config.json`) is malformed.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer failed (encode, decode, training, loading).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A token the chosen chat format needs is not in the tokenizer's vocabulary.
    #[error("tokenizer has no token {0:?}, which this chat format needs")]
    MissingToken(String),
    /// The Jinja chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A conversation has no messages.
    #[error("conversation has no messages")]
    EmptyConversation,
    /// A conversation to train on has no assistant message.
    #[error("conversation has no assistant message to learn")]
    NoAssistantTurn,
    /// An assistant message is empty (or only whitespace).
    #[error("message {turn} (assistant) has empty content")]
    EmptyAnswer {
        /// 0-based index of the message in the conversation.
        turn: usize,
    },
    /// A message has an empty role.
    #[error("message {turn} has an empty role")]
    EmptyRole {
        /// 0-based index of the message in the conversation.
        turn: usize,
    },
    /// A sample is longer than `max_length` under [`crate::TruncationPolicy::Error`].
    #[error("sample has {len} tokens, more than max_length {max_length}")]
    TooLong {
        /// Tokens in the rendered sample.
        len: usize,
        /// The configured limit.
        max_length: usize,
    },
    /// An error about one sample of a batch of conversations, with its index.
    #[error("sample {index}: {source}")]
    Sample {
        /// 0-based index of the conversation in the input slice.
        index: usize,
        /// What went wrong.
        source: Box<Error>,
    },
    /// The Hugging Face Hub could not be reached or the repo has no usable files.
    #[error("hub: {0}")]
    Hub(String),
    /// An argument is out of range (for example a test fraction of 1.5).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Wraps `source` with the index of the sample it is about.
    pub fn in_sample(self, index: usize) -> Self {
        Error::Sample {
            index,
            source: Box::new(self),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(e: impl fmt::Display) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
