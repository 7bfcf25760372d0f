//! Saving a PiSSA / OLoRA adapter so it applies to the original, unmodified base: PEFT's
//! `save_pretrained(..., path_initial_model_for_weight_conversion=...)`.
//!
//! With `W = W_res + s B0 A0` at init and `W_res + s B A` after training, the update is
//! `s (B A - B0 A0) = s [B | -B0] [A ; A0]`: a plain LoRA of rank 2r with the same scaling
//! (alpha doubled; times sqrt 2 under rsLoRA).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{Error, Result};
use crate::host::HostTensor;
use crate::io::{adapter_dir, adapter_state_dict, WEIGHTS_FILE};
use crate::model::LoraModel;
use crate::peft::PeftModel;
use crate::st::{write_f32, SafetensorsFile};

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Saves adapter `name` under `dir` as a plain LoRA adapter for the original base model.
    ///
    /// `initial` is the folder where the same adapter was saved right after its PiSSA / OLoRA
    /// init, before training. As PEFT does, that folder's config is rewritten with
    /// `init_lora_weights = true` (so loading it never decomposes the base again).
    pub fn save_adapter_converted(
        &self,
        dir: &Path,
        name: &str,
        initial: &Path,
    ) -> Result<PathBuf> {
        let cfg = self.configs.get(name).ok_or_else(|| self.unknown(name))?;
        check_convertible(cfg)?;
        let init_file = initial.join(WEIGHTS_FILE);
        let init = SafetensorsFile::open(&init_file)?;
        let mut tensors = BTreeMap::new();
        let mut problems = Vec::new();
        for (key, now) in adapter_state_dict(&self.model, name) {
            let (is_a, is_b) = (
                key.ends_with("lora_A.weight"),
                key.ends_with("lora_B.weight"),
            );
            if !is_a && !is_b {
                // Whole saved modules (`modules_to_save`) and other tensors are not factors of
                // the update: PEFT writes them as they are.
                tensors.insert(key, now);
                continue;
            }
            let before = match init.read(&key) {
                Ok(t) if t.shape == now.shape => t,
                Ok(t) => {
                    problems.push(format!(
                        "{key}: initial adapter has shape {:?}, trained one {:?}",
                        t.shape, now.shape
                    ));
                    continue;
                }
                Err(_) => {
                    problems.push(format!("{key}: missing from the initial adapter"));
                    continue;
                }
            };
            let joined = if is_a {
                stack_rows(&now, &before)
            } else {
                stack_cols_negated(&now, &before)
            };
            tensors.insert(key, joined);
        }
        if !problems.is_empty() {
            return Err(Error::Mismatch {
                path: init_file,
                report: problems.join("\n"),
            });
        }

        let mut initial_cfg = LoraConfig::from_file(initial)?;
        initial_cfg.init_lora_weights = InitLoraWeights::Default;
        initial_cfg.save(initial)?;

        let out = adapter_dir(dir, name);
        converted_config(cfg).save(&out)?;
        write_f32(&out.join(WEIGHTS_FILE), &tensors)?;
        Ok(out)
    }
}

fn check_convertible(cfg: &LoraConfig) -> Result<()> {
    let unsupported = |field: &str, reason: &str| Error::Unsupported {
        field: field.into(),
        value: "set".into(),
        reason: format!("path_initial_model_for_weight_conversion: {reason}"),
    };
    if cfg.use_rslora && (!cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty()) {
        return Err(unsupported(
            "use_rslora",
            "not supported together with rank_pattern / alpha_pattern (as in PEFT)",
        ));
    }
    if cfg.use_dora {
        return Err(unsupported(
            "use_dora",
            "a DoRA magnitude cannot be expressed as a plain LoRA difference",
        ));
    }
    if cfg.lora_bias {
        return Err(unsupported(
            "lora_bias",
            "the bias difference is not part of PEFT's converted format",
        ));
    }
    Ok(())
}

/// PEFT's config for the converted adapter: init `true`, rank doubled, scaling kept.
fn converted_config(cfg: &LoraConfig) -> LoraConfig {
    let mut c = cfg.clone();
    c.init_lora_weights = InitLoraWeights::Default;
    c.r *= 2;
    c.lora_alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
    c.rank_pattern.values_mut().for_each(|r| *r *= 2);
    c.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
    c.inference_mode = true;
    c
}

/// `[a; b]` for `[r, in]` matrices.
fn stack_rows(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let mut data = a.data.clone();
    data.extend_from_slice(&b.data);
    HostTensor {
        shape: vec![a.shape[0] + b.shape[0], a.shape[1]],
        data,
    }
}

/// `[a | -b]` for `[out, r]` matrices.
fn stack_cols_negated(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let (rows, ca, cb) = (a.shape[0], a.shape[1], b.shape[1]);
    let mut data = Vec::with_capacity(rows * (ca + cb));
    for i in 0..rows {
        data.extend_from_slice(&a.data[i * ca..(i + 1) * ca]);
        data.extend(b.data[i * cb..(i + 1) * cb].iter().map(|v| -v));
    }
    HostTensor {
        shape: vec![rows, ca + cb],
        data,
    }
}
