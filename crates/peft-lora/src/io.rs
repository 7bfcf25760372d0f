//! PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`, both ways.
//!
//! Keys are `base_model.model.<module path>.lora_A.weight` `[r, in]`, `...lora_B.weight`
//! `[out, r]`, `...lora_B.bias` `[out]`, `...lora_magnitude_vector` `[out]`, and for trainable
//! tokens `base_model.model.<embedding path>.token_adapter.trainable_tokens_delta` `[n, dim]`
//! (the replacement rows; a tied head saves nothing of its own), and for `modules_to_save`
//! `base_model.model.<path>.weight` / `.bias` (the whole trained copy). Burn keeps A, B and a
//! linear's weight transposed
//! (`[in, r]`, `[r, out]`); the transpose happens here and nowhere else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};

use crate::adapter::{AdapterMeta, VariantKind};
use crate::add::{add_token_adapters, check_alora, resolve_token_tables};
use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{Error, Result};
use crate::host::{to_host, HostTensor};
use crate::init::init_factors;
use crate::keys::{token_delta_key, KEY_PREFIX};
use crate::loftq::loftq_init_layer;
use crate::model::LoraModel;
use crate::modules_to_save;
use crate::peft::PeftModel;
use crate::st::{write_f32, SafetensorsFile};
use crate::target::is_target;

/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The folder PEFT uses for adapter `name` under `dir` (`default` at the top, others in a
/// subfolder).
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The tensors of adapter `name` under PEFT's key names, in PyTorch layout.
pub fn adapter_state_dict<B: Backend, M: LoraModel<B>>(
    model: &M,
    name: &str,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (path, layer) in model.lora_linears() {
        let Some(a) = layer.adapter(name) else {
            continue;
        };
        let key = format!("{KEY_PREFIX}{path}");
        out.insert(
            format!("{key}.lora_A.weight"),
            to_host(a.lora_a.val().transpose()),
        );
        out.insert(
            format!("{key}.lora_B.weight"),
            to_host(a.lora_b.val().transpose()),
        );
        if let Some(b) = &a.lora_b_bias {
            out.insert(format!("{key}.lora_B.bias"), to_host(b.val()));
        }
        if let Some(m) = &a.magnitude {
            out.insert(format!("{key}.lora_magnitude_vector"), to_host(m.val()));
        }
    }
    for (path, table) in model.token_tables() {
        if let Some(a) = table.adapter(name) {
            out.insert(token_delta_key(&path), to_host(a.delta.val()));
        }
    }
    modules_to_save::state_dict(model, name, &mut out);
    out
}

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Saves adapter `name` in PEFT's format under `dir` (a subfolder for non-default names).
    pub fn save_adapter(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let cfg = self.configs.get(name).ok_or_else(|| self.unknown(name))?;
        let out = adapter_dir(dir, name);
        cfg.save(&out)?;
        write_f32(
            &out.join(WEIGHTS_FILE),
            &adapter_state_dict(&self.model, name),
        )?;
        Ok(out)
    }

    /// Loads a PEFT adapter folder as adapter `name`. Every missing key, unexpected key and shape
    /// mismatch is reported by name in one error.
    ///
    /// As PEFT's `load_adapter`, this does not change which adapters run: the first adapter of a
    /// model without adapters becomes active (as `PeftModel.from_pretrained` does), any later
    /// one stays inactive on every layer until [`PeftModel::set_active`] names it.
    ///
    /// A LoftQ adapter (`init_lora_weights = "loftq"`) loaded onto a full-precision base runs
    /// LoftQ on each adapted layer first, as PEFT does, so the base becomes the NF4 `Q` the
    /// adapter was trained with; a base already in NF4 is used as it is.
    ///
    /// A `layer_replication` in the config replicates the model's layers first (see
    /// [`crate::layer_map`]); if the file then does not fit, the model keeps the replicated
    /// stack, so load the next attempt onto a fresh base.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let cfg = LoraConfig::from_file(dir)?;
        check_alora(
            &cfg,
            &self.model,
            &dir.join("adapter_config.json").display().to_string(),
        )?;
        if self.configs.contains_key(name) {
            return Err(Error::DuplicateAdapter(name.into()));
        }
        let file_path = dir.join(WEIGHTS_FILE);
        if !file_path.exists() {
            return Err(Error::io(
                &file_path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights not found"),
            ));
        }
        let file = SafetensorsFile::open(&file_path)?;
        let in_file = file.shapes();
        let token_targets = resolve_token_tables(&self.model, &cfg)?;
        let saved_paths = modules_to_save::resolve(&self.model, &cfg)?;
        self.prepare_replication(&cfg)?;

        // What the config implies for this model.
        let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut targets = Vec::new();
        for (path, layer) in self.model.lora_linears() {
            if !is_target(&cfg, &path)? {
                continue;
            }
            let meta = AdapterMeta::from_config(&cfg, name, &path);
            let key = format!("{KEY_PREFIX}{path}");
            let (d_in, d_out) = (layer.d_in(), layer.d_out());
            expected.insert(format!("{key}.lora_A.weight"), vec![meta.r, d_in]);
            expected.insert(format!("{key}.lora_B.weight"), vec![d_out, meta.r]);
            if cfg.lora_bias {
                expected.insert(format!("{key}.lora_B.bias"), vec![d_out]);
            }
            if meta.variant == VariantKind::Dora {
                expected.insert(format!("{key}.lora_magnitude_vector"), vec![d_out]);
            }
            targets.push(path);
        }
        for (path, table) in self.model.token_tables() {
            if let Some((_, ids)) = token_targets.iter().find(|(p, _)| *p == path) {
                expected.insert(token_delta_key(&path), vec![ids.len(), table.dim()]);
            }
        }
        expected.extend(modules_to_save::expected_keys(&self.model, &saved_paths));
        let mut problems = Vec::new();
        let file_keys: BTreeSet<&String> = in_file.keys().collect();
        for (k, shape) in &expected {
            match in_file.get(k) {
                None => problems.push(format!("missing key {k} (expected shape {shape:?})")),
                Some(s) if s != shape => problems.push(format!(
                    "shape mismatch for {k}: file has {s:?}, model needs {shape:?}"
                )),
                _ => {}
            }
        }
        for k in file_keys {
            if !expected.contains_key(k) {
                problems.push(format!("unexpected key {k} {:?}", in_file[k]));
            }
        }
        if targets.is_empty() {
            problems.push(format!(
                "target_modules {} matches no module of this model",
                serde_json::to_string(&cfg.target_modules).unwrap_or_default()
            ));
        }
        if !problems.is_empty() {
            return Err(Error::Mismatch {
                path: file_path,
                report: problems.join("\n"),
            });
        }

        let paths: BTreeSet<String> = targets.into_iter().collect();
        let method = cfg.init_lora_weights;
        let loftq = cfg.loftq_settings()?;
        for (path, layer) in self.model.lora_linears_mut() {
            if !paths.contains(&path) {
                continue;
            }
            let device = layer.weight.device();
            let key = format!("{KEY_PREFIX}{path}");
            let meta = AdapterMeta::from_config(&cfg, name, &path);
            if let Some(lq) = loftq.as_ref().filter(|_| !layer.is_nf4()) {
                // As PEFT's from_pretrained: a LoftQ adapter on a full-precision base runs LoftQ
                // again, which quantizes the base to the Q it was trained on (deterministic);
                // the computed factors are replaced by the saved ones below.
                loftq_init_layer(layer, lq, meta.r, &path)?;
            }
            if matches!(
                method,
                InitLoraWeights::Pissa { .. } | InitLoraWeights::Olora
            ) {
                // As PEFT's from_pretrained: the init runs again on the base, so an adapter
                // trained from PiSSA/OLoRA loads onto the original model and reproduces it.
                let init = init_factors(layer, method, meta.r, meta.scaling, &path)?;
                if let Some(residual) = init.residual {
                    layer.set_base_weight(residual);
                }
            }
            let a: Tensor<B, 2> = file
                .read(&format!("{key}.lora_A.weight"))?
                .to_tensor(&key, &device)?;
            let b: Tensor<B, 2> = file
                .read(&format!("{key}.lora_B.weight"))?
                .to_tensor(&key, &device)?;
            let mut adapter = layer.new_adapter(meta, a.transpose(), b.transpose(), false);
            if cfg.lora_bias {
                let bias: Tensor<B, 1> = file
                    .read(&format!("{key}.lora_B.bias"))?
                    .to_tensor(&key, &device)?;
                adapter.lora_b_bias = Some(Param::from_tensor(bias));
            }
            if adapter.meta.variant == VariantKind::Dora {
                let m: Tensor<B, 1> = file
                    .read(&format!("{key}.lora_magnitude_vector"))?
                    .to_tensor(&key, &device)?;
                adapter.magnitude = Some(Param::from_tensor(m));
            }
            layer.add_adapter(adapter)?;
        }
        add_token_adapters(&mut self.model, name, &token_targets, |path, device| {
            let key = token_delta_key(path);
            Ok(Some(file.read(&key)?.to_tensor(&key, device)?))
        })?;
        modules_to_save::add_copies(&mut self.model, name, &saved_paths, |path, device, bias| {
            modules_to_save::read_copy(path, device, bias, |k| file.read(k)).map(Some)
        })?;
        self.configs.insert(name.into(), cfg);
        self.keep_active_after_add(name)
    }
}
