//! Path-walking weight loading (candle's `VarBuilder`): `vb.pp("model").pp("layers.0")` builds
//! the HF key, so a missing tensor error names the full key, the files and the expected shape.
//! Tensors are read one at a time from memory-mapped files and converted to the model's float.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};
use peft_lora::st::SafetensorsFile;

use crate::error::{Error, Result};

/// The opened checkpoint files and which holds which tensor.
pub struct Checkpoint {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens every file (validating headers) and indexes its tensors.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(Error::Io {
                    path: p.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
                });
            }
            let f = SafetensorsFile::open(p)?;
            for k in f.shapes().into_keys() {
                index.insert(k, i);
            }
            files.push(f);
        }
        Ok(Checkpoint { files, index })
    }
}

/// A cursor at a key prefix in a checkpoint.
#[derive(Clone)]
pub struct VarBuilder<'a, B: Backend> {
    ckpt: Arc<&'a Checkpoint>,
    prefix: String,
    device: B::Device,
}

impl<'a, B: Backend> VarBuilder<'a, B> {
    /// The root of `ckpt`.
    pub fn new(ckpt: &'a Checkpoint, device: &B::Device) -> Self {
        VarBuilder {
            ckpt: Arc::new(ckpt),
            prefix: String::new(),
            device: device.clone(),
        }
    }

    /// One level deeper: `pp("layers.0")`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.as_ref().to_string()
        } else {
            format!("{}.{}", self.prefix, name.as_ref())
        };
        VarBuilder {
            ckpt: self.ckpt.clone(),
            prefix,
            device: self.device.clone(),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.into()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` exists here.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.index.contains_key(&self.key(name))
    }

    /// The device tensors go to.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Reads `name` checking its shape.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        let Some(&i) = self.ckpt.index.get(&key) else {
            let files: Vec<String> = self.ckpt.files.iter().map(|f| f.path().display().to_string()).collect();
            return Err(Error::MissingTensor {
                name: key,
                expected: shape.to_vec(),
                files: files.join(", "),
            });
        };
        let file = &self.ckpt.files[i];
        let host = file.read(&key)?;
        if host.shape != shape {
            return Err(Error::TensorShape {
                name: key,
                file: file.path().into(),
                expected: shape.to_vec(),
                found: host.shape,
            });
        }
        Ok(host.to_tensor(&key, &self.device)?)
    }

    /// A frozen parameter.
    pub fn frozen<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.get(name, shape)?).set_require_grad(false))
    }

    /// A linear layer's weight `[out, in]` from the file, returned in Burn layout `[in, out]`.
    /// This is the one place where the PyTorch -> Burn transpose happens.
    pub fn linear_weight(&self, d_in: usize, d_out: usize) -> Result<Tensor<B, 2>> {
        Ok(self.get("weight", [d_out, d_in])?.transpose())
    }
}
