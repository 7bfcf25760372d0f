//! Path-walking weight loading (candle's `VarBuilder`): `vb.pp("model").pp("layers.0")` builds
//! the HF key, so a missing tensor error names the full key, the files and the expected shape.
//!
//! Tensors are read one at a time from memory-mapped files (bf16/f16/f32 -> f32 on the host,
//! then the backend's float type on the device), so loading needs about one tensor of host
//! memory beyond the page cache, not a copy of the checkpoint.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use peft_lora::SafetensorsFile;

use crate::error::{Error, Result};

/// The opened checkpoint files and which file holds which tensor.
pub struct Checkpoint {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Maps every file (validating its header: a truncated file fails here, naming it) and
    /// indexes its tensors.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.is_file() {
                return Err(Error::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "weights file not found",
                    ),
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

    /// Every tensor name in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

/// A cursor at a key prefix in a checkpoint.
#[derive(Clone)]
pub struct VarBuilder<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    prefix: String,
    device: B::Device,
    nf4: bool,
}

impl<'a, B: Backend> VarBuilder<'a, B> {
    /// The root of `ckpt`; tensors go to `device`.
    pub fn new(ckpt: &'a Checkpoint, device: &B::Device) -> Self {
        VarBuilder {
            ckpt,
            prefix: String::new(),
            device: device.clone(),
            nf4: false,
        }
    }

    /// Linear weights read through [`Self::linear`] are quantized to NF4 on the host, so the
    /// dense matrix never reaches the device (bitsandbytes' `load_in_4bit`).
    pub fn with_nf4(mut self, on: bool) -> Self {
        self.nf4 = on;
        self
    }

    /// Whether linear weights are loaded in NF4.
    pub fn nf4(&self) -> bool {
        self.nf4
    }

    /// One level deeper: `pp("layers.0")`.
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        VarBuilder {
            ckpt: self.ckpt,
            prefix: self.key(name.as_ref()),
            device: self.device.clone(),
            nf4: self.nf4,
        }
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
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

    /// Reads `name`, checking its shape.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.read_host(name, &shape)?;
        // The host vector moves into the tensor data: no second copy.
        Ok(Tensor::from_data(
            TensorData::new(data, shape),
            &self.device,
        ))
    }

    fn read_host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = self.key(name);
        let Some(&i) = self.ckpt.index.get(&key) else {
            let files: Vec<String> = self
                .ckpt
                .files
                .iter()
                .map(|f| f.path().display().to_string())
                .collect();
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
        Ok(host.data)
    }

    /// A frozen (no gradient) parameter.
    pub fn frozen<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.get(name, shape)?).set_require_grad(false))
    }

    /// A linear layer's `weight` quantized to NF4 (PyTorch layout `[out, in]`, bitsandbytes'
    /// blocks of 64 along the input features).
    pub fn linear_weight_nf4(&self, d_in: usize, d_out: usize) -> Result<peft_lora::Nf4Tensor> {
        let out_in = self.read_host("weight", &[d_out, d_in])?;
        Ok(peft_lora::Nf4Tensor::quantize(&out_in, [d_out, d_in]))
    }

    /// A linear layer's `weight`, stored `[out, in]` as PyTorch does, returned in Burn layout
    /// `[in, out]`. This is the one place where the PyTorch -> Burn transpose happens on load
    /// (saving does the inverse). It is done on the host so the device tensor is contiguous.
    pub fn linear_weight(&self, d_in: usize, d_out: usize) -> Result<Tensor<B, 2>> {
        let out_in = self.read_host("weight", &[d_out, d_in])?;
        let in_out = transpose(&out_in, d_out, d_in);
        drop(out_in);
        Ok(Tensor::from_data(
            TensorData::new(in_out, [d_in, d_out]),
            &self.device,
        ))
    }
}

/// Row-major `[rows, cols]` -> `[cols, rows]`, in cache-sized tiles.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut dst = vec![0f32; src.len()];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_is_exact() {
        let (r, c) = (37, 70);
        let src: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
        let t = super::transpose(&src, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], src[i * c + j]);
            }
        }
    }
}
