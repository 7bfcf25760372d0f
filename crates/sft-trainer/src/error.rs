//! Errors of the trainer.

use std::path::PathBuf;

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("training setting `{field}` = {value}: {expected}")]
    Config {
        /// The setting.
        field: String,
        /// Its value.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The loss or the gradient became NaN or infinite.
    #[error("non-finite {what} at optimizer step {step} (value {value}); stopping. The last good checkpoint is intact in {output_dir}")]
    NonFinite {
        /// "loss" or "gradient norm".
        what: String,
        /// The step.
        step: u64,
        /// The value.
        value: f64,
        /// Where the checkpoints are.
        output_dir: PathBuf,
    },
    /// A checkpoint could not be restored.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An adapter operation failed.
    #[error(transparent)]
    Peft(#[from] peft_lora::Error),
    /// The processes of a data-parallel run disagree (different adapters, a changed world size).
    #[error("data-parallel training: {0}")]
    Distributed(String),
    /// A collective or the rendezvous of a data-parallel run failed.
    #[error("data-parallel training: {0}")]
    Comm(#[from] data_parallel::Error),
}

/// Result type of the trainer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn non_finite(what: &str, step: u64, value: f64, out: &std::path::Path) -> Self {
        Error::NonFinite {
            what: what.into(),
            step,
            value,
            output_dir: out.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
