//! Writing a model the way transformers reads it: `config.json` + `model.safetensors` with HF
//! names and PyTorch `[out, in]` layout (used by merge/export and by tests that need a
//! checkpoint on disk).

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::LlamaForCausalLM;

/// Storage type of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
}

fn bytes<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: SaveDtype) -> (Vec<usize>, Vec<u8>) {
    let shape = t.dims().to_vec();
    let v: Vec<f32> = t.into_data().convert::<f32>().to_vec().expect("f32");
    let b = match dtype {
        SaveDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SaveDtype::Bf16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
    };
    (shape, b)
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Saves config and weights into `dir` (adapters are not saved: merge them first).
    pub fn save_pretrained(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        let io = |e: std::io::Error| Error::Io { path: dir.into(), source: e };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut hf = self.config.to_hf();
        hf.torch_dtype = Some(match dtype {
            SaveDtype::F32 => "float32".into(),
            SaveDtype::Bf16 => "bfloat16".into(),
        });
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&hf).expect("json")).map_err(io)?;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut put = |name: String, (shape, b): (Vec<usize>, Vec<u8>)| tensors.push((name, shape, b));
        put("model.embed_tokens.weight".into(), bytes(self.model.embed_tokens.weight.val(), dtype));
        put("model.norm.weight".into(), bytes(self.model.norm.weight.val(), dtype));
        if let Some(h) = &self.lm_head {
            put("lm_head.weight".into(), bytes(h.val().transpose(), dtype));
        }
        for (i, l) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            put(format!("{p}.input_layernorm.weight"), bytes(l.input_layernorm.weight.val(), dtype));
            put(format!("{p}.post_attention_layernorm.weight"), bytes(l.post_attention_layernorm.weight.val(), dtype));
        }
        for (path, lin) in peft_lora::LoraModel::lora_linears(self) {
            put(format!("{path}.weight"), bytes(lin.weight.val().transpose(), dtype));
            if let Some(b) = &lin.bias {
                put(format!("{path}.bias"), bytes(b.val(), dtype));
            }
        }
        let st_dtype = match dtype {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(st_dtype, s.clone(), b).expect("sizes")))
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Io {
            path: dir.join("model.safetensors"),
            source: std::io::Error::other(e.to_string()),
        })?;
        peft_lora::io::write_atomic(&dir.join("model.safetensors"), &data)?;
        Ok(())
    }
}
