//! Writing a model the way transformers reads it: `config.json` + safetensors with HF names and
//! PyTorch `[out, in]` layout, one file or shards with `model.safetensors.index.json` (used by
//! merge/export, and by tests that need a checkpoint on disk).
//!
//! Shards are converted and written one at a time, so saving needs about one shard of host
//! memory, not a copy of the model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::LlamaForCausalLM;

/// Storage type of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// float32.
    F32,
    /// bfloat16 (round to nearest even).
    Bf16,
}

impl SaveDtype {
    fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
    fn st(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }
    fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 => 2,
        }
    }
}

/// Shard size transformers uses by default (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// A tensor to save, in PyTorch layout (transposes are views until converted). (A few per
/// save, each moved once: the size of the NF4 variant does not matter.)
#[allow(clippy::large_enum_variant)]
enum Src<B: Backend> {
    One(Tensor<B, 1>),
    Two(Tensor<B, 2>),
    /// An NF4 base, dequantized only when its shard is written.
    Nf4(peft_lora::Nf4Weight<B>),
}

impl<B: Backend> Src<B> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Src::One(t) => t.dims().to_vec(),
            Src::Two(t) => t.dims().to_vec(),
            Src::Nf4(q) => vec![q.d_out, q.d_in],
        }
    }
    fn bytes(&self, dtype: SaveDtype) -> Result<Vec<u8>> {
        let data = match self {
            Src::One(t) => t.to_data(),
            Src::Two(t) => t.to_data(),
            Src::Nf4(q) => q.dequantize().transpose().into_data(),
        };
        let v: Vec<f32> = data
            .convert::<f32>()
            .into_vec()
            .map_err(|e| Error::Data(format!("{e:?}")))?;
        Ok(match dtype {
            SaveDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        })
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.into(),
        source: e,
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Every weight under its HF name, PyTorch layout. Adapters are not included: merge them
    /// first (`PeftModel::merge_and_unload`).
    fn hf_tensors(&self) -> Vec<(String, Src<B>)> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                Src::Two(self.model.embed_tokens.weight.val()),
            ),
            (
                "model.norm.weight".to_string(),
                Src::One(self.model.norm.weight.val()),
            ),
        ];
        if let Some(h) = &self.lm_head {
            out.push((
                "lm_head.weight".into(),
                Src::Two(h.base_weight().transpose()),
            ));
        }
        for (i, l) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                Src::One(l.input_layernorm.weight.val()),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                Src::One(l.post_attention_layernorm.weight.val()),
            ));
        }
        for (path, lin) in peft_lora::LoraModel::lora_linears(self) {
            // Burn [in, out] -> PyTorch [out, in]: the inverse of `VarBuilder::linear_weight`.
            let w = match &lin.nf4 {
                Some(q) => Src::Nf4(q.clone()),
                None => Src::Two(lin.weight.val().transpose()),
            };
            out.push((format!("{path}.weight"), w));
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), Src::One(b.val())));
            }
        }
        out
    }

    /// Saves `config.json` and `model.safetensors` (shards above 5 GB) into `dir`.
    pub fn save_pretrained(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        self.save_pretrained_sharded(dir, dtype, DEFAULT_MAX_SHARD_BYTES)
    }

    /// Saves with shards of at most `max_shard_bytes` (a larger tensor gets a shard alone):
    /// `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, or one
    /// `model.safetensors` when everything fits.
    pub fn save_pretrained_sharded(
        &self,
        dir: &Path,
        dtype: SaveDtype,
        max_shard_bytes: usize,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut hf = self.config.to_hf();
        hf.torch_dtype = Some(dtype.torch_name().into());
        let cfg_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&hf).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&cfg_path, json).map_err(io_err(&cfg_path))?;

        // Group tensors into shards by size, in a stable order.
        let tensors = self.hf_tensors();
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        let mut current = 0usize;
        let mut total = 0usize;
        for (i, (_, t)) in tensors.iter().enumerate() {
            let size = t.shape().iter().product::<usize>() * dtype.size();
            if current > 0 && current + size > max_shard_bytes {
                shards.push(Vec::new());
                current = 0;
            }
            shards.last_mut().expect("one shard at least").push(i);
            current += size;
            total += size;
        }
        let n = shards.len();
        let name = |k: usize| {
            if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", k + 1)
            }
        };
        let mut weight_map = BTreeMap::new();
        for (k, members) in shards.iter().enumerate() {
            let file = name(k);
            let mut owned = Vec::with_capacity(members.len());
            for &i in members {
                let (key, t) = &tensors[i];
                owned.push((key.clone(), t.shape(), t.bytes(dtype)?));
                weight_map.insert(key.clone(), file.clone());
            }
            let path = dir.join(&file);
            let views = owned
                .iter()
                .map(|(key, shape, b)| {
                    TensorView::new(dtype.st(), shape.clone(), b)
                        .map(|v| (key.clone(), v))
                        .map_err(|e| Error::Io {
                            path: path.clone(),
                            source: std::io::Error::other(e.to_string()),
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            let tmp = path.with_extension("tmp-write");
            safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| Error::Io {
                path: tmp.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        let index = dir.join("model.safetensors.index.json");
        if n > 1 {
            let json =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            std::fs::write(
                &index,
                serde_json::to_string_pretty(&json).unwrap_or_default(),
            )
            .map_err(io_err(&index))?;
        } else if index.exists() {
            // A stale index would point the loader at old shards.
            std::fs::remove_file(&index).map_err(io_err(&index))?;
        }
        Ok(())
    }
}
