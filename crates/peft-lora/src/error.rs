//! Errors of the `peft-lora` crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading, saving or merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` (or a config given in code) is invalid.
    #[error("adapter config {path}: field `{field}`: {message}")]
    Config {
        /// Where the config came from (a file, or `<in memory>`).
        path: String,
        /// The offending field.
        field: String,
        /// What was expected.
        message: String,
    },
    /// A config asks for a feature that changes numerics and is not implemented.
    #[error("adapter config field `{field}` = {value}: not supported by peft-lora ({reason})")]
    Unsupported {
        /// The field.
        field: String,
        /// Its value as JSON.
        value: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// An adapter file does not fit the model it is loaded into.
    #[error("adapter {path} does not fit this model:\n{report}")]
    Mismatch {
        /// The adapter file.
        path: PathBuf,
        /// Missing keys, unexpected keys and shape mismatches, one per line.
        report: String,
    },
    /// A tensor has an unexpected shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor's key.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// No adapter of that name exists.
    #[error("no adapter named `{0}` (known: {1})")]
    UnknownAdapter(String, String),
    /// An adapter of that name exists already.
    #[error("an adapter named `{0}` exists already")]
    DuplicateAdapter(String),
    /// The target patterns matched no module.
    #[error(
        "target_modules {0} matched no module of the model (its adaptable modules are e.g. {1})"
    )]
    NoTarget(String, String),
    /// A merge would produce non-finite weights, or cannot be done for this variant.
    #[error("cannot merge adapter `{adapter}` into `{module}`: {reason}")]
    Merge {
        /// The adapter.
        adapter: String,
        /// The module path.
        module: String,
        /// Why.
        reason: String,
    },
    /// A layer got an input whose last dimension is not its `in_features`.
    #[error(
        "LoraLinear `{module}`: the input's last dimension is {found}, but the layer's in_features is {in_features}"
    )]
    InputWidth {
        /// The module path (`<unnamed>` for a layer no [`crate::PeftModel`] has named).
        module: String,
        /// The layer's input features.
        in_features: usize,
        /// The input's last dimension.
        found: usize,
    },
    /// Layers given to [`crate::LoraLinear::pack_shared_input`] cannot share one weight buffer.
    #[error("cannot pack the weights of {modules} into one buffer: {reason}")]
    Pack {
        /// The layers' module paths (`<unnamed>` where no [`crate::PeftModel`] named one).
        modules: String,
        /// Why.
        reason: String,
    },
    /// A numerical routine (SVD, QR) failed.
    #[error("linear algebra failed for `{module}`: {message}")]
    LinAlg {
        /// The module path.
        module: String,
        /// What failed.
        message: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        Error::Config {
            path: "<in memory>".into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
