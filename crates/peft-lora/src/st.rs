//! Reading and writing safetensors files (memory-mapped; bf16/f16/f32 -> f32 one tensor at a time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::host::HostTensor;

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; a concurrent truncation by another process is
        // the usual mmap caveat and is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
            path: path.into(),
            message: e.to_string(),
        })?;
        Ok(SafetensorsFile {
            path: path.into(),
            mmap,
        })
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated at open")
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name with its shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.view()
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect()
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    /// The safetensors metadata (`__metadata__`).
    pub fn metadata(&self) -> Option<std::collections::HashMap<String, String>> {
        SafeTensors::read_metadata(&self.mmap)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
    }

    /// Reads `name` as f32.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let st = self.view();
        let view = st.tensor(name).map_err(|_| Error::Safetensors {
            path: self.path.clone(),
            message: format!("tensor `{name}` is missing"),
        })?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(Error::Safetensors {
                    path: self.path.clone(),
                    message: format!(
                        "tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"
                    ),
                })
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
        })
    }

    /// Reads an integer tensor (I64/I32) as i64.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let st = self.view();
        let view = st.tensor(name).map_err(|_| Error::Safetensors {
            path: self.path.clone(),
            message: format!("tensor `{name}` is missing"),
        })?;
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => {
                return Err(Error::Safetensors {
                    path: self.path.clone(),
                    message: format!("tensor `{name}` has dtype {other:?}; expected I64 or I32"),
                })
            }
        };
        Ok((view.shape().to_vec(), data))
    }
}

/// Writes f32 tensors to `path` with metadata `{"format": "pt"}`, atomically.
pub fn write_f32(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let b: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), b, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                    .expect("consistent sizes"),
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Safetensors {
        path: path.into(),
        message: e.to_string(),
    })?;
    write_atomic(path, &data)
}
