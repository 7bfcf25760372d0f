//! Errors of the Llama crate.

use std::path::PathBuf;

/// What can go wrong loading or running a Llama.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is invalid or misses a field.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The checkpoint is not a Llama.
    #[error("{path}: architecture {found:?} is not supported; expected LlamaForCausalLM")]
    Architecture {
        /// The config file.
        path: PathBuf,
        /// What the file says.
        found: Vec<String>,
    },
    /// A tensor is missing from the checkpoint.
    #[error("tensor `{name}` (expected shape {expected:?}) is missing from {files}")]
    MissingTensor {
        /// Its key.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The files searched.
        files: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        /// Its key.
        name: String,
        /// The file.
        file: PathBuf,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
    },
    /// A safetensors file is corrupt or truncated.
    #[error(transparent)]
    Weights(#[from] peft_lora::Error),
    /// The tokenizer is missing or invalid.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The Hugging Face Hub could not give a file.
    #[error("Hugging Face Hub, repo `{repo}`, file `{file}`: {message}")]
    Hub {
        /// The repo id.
        repo: String,
        /// The file.
        file: String,
        /// What happened.
        message: String,
    },
    /// Invalid generation arguments.
    #[error("generation: {0}")]
    Generation(String),
    /// A tensor could not be read back from the device.
    #[error("reading tensor data: {0}")]
    Data(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
