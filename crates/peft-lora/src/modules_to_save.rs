//! `modules_to_save` over a whole model: which modules a config names, their trainable copies
//! per adapter, and their tensors under PEFT's keys (`get_peft_model_state_dict`:
//! `base_model.model.<path>.weight` / `.bias`, PyTorch layout, no wrapper or adapter name).

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::host::{to_host, HostTensor};
use crate::keys::saved_module_keys as keys;
use crate::model::LoraModel;
use crate::saved::{SaveableModule, MODULES_TO_SAVE};
use crate::target::is_saved_module;

/// Every module `modules_to_save` can name: the LoRA linears, the head linears and the token
/// tables, with their paths.
pub(crate) fn saveable<B: Backend, M: LoraModel<B>>(
    model: &M,
) -> Vec<(String, &dyn SaveableModule<B>)> {
    let mut out: Vec<(String, &dyn SaveableModule<B>)> = Vec::new();
    for (p, l) in model.lora_linears() {
        out.push((p, l));
    }
    for (p, l) in model.head_linears() {
        out.push((p, l));
    }
    for (p, t) in model.token_tables() {
        out.push((p, t));
    }
    out
}

/// Runs `f` on every module `modules_to_save` can name, mutably, in [`saveable`]'s order (the
/// trait hands out one mutable list at a time, so the kinds are visited one after the other).
pub(crate) fn for_each_saveable_mut<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    mut f: impl FnMut(&str, &mut dyn SaveableModule<B>) -> Result<()>,
) -> Result<()> {
    for (p, l) in model.lora_linears_mut() {
        f(&p, l)?;
    }
    for (p, l) in model.head_linears_mut() {
        f(&p, l)?;
    }
    for (p, t) in model.token_tables_mut() {
        f(&p, t)?;
    }
    Ok(())
}

/// The paths of the modules `cfg.modules_to_save` names (PEFT's suffix match); empty when the
/// field is absent. An error when the list names no module of this model, listing what it
/// could name.
pub(crate) fn resolve<B: Backend, M: LoraModel<B>>(
    model: &M,
    cfg: &LoraConfig,
) -> Result<Vec<String>> {
    let Some(names) = cfg.modules_to_save.as_ref().filter(|n| !n.is_empty()) else {
        return Ok(Vec::new());
    };
    let all = saveable(model);
    let hits: Vec<String> = all
        .iter()
        .map(|(p, _)| p)
        .filter(|p| is_saved_module(cfg, p))
        .cloned()
        .collect();
    if hits.is_empty() {
        // Heads and tables first: they are what modules_to_save usually names.
        let mut known: Vec<String> = model.head_linears().into_iter().map(|(p, _)| p).collect();
        known.extend(model.token_tables().into_iter().map(|(p, _)| p));
        known.extend(model.lora_linears().into_iter().map(|(p, _)| p).take(4));
        return Err(Error::config(
            MODULES_TO_SAVE,
            format!(
                "{names:?} names no module this model can train whole (linear layers, heads and \
                 embeddings it exposes through LoraModel, e.g. {})",
                known.join(", ")
            ),
        ));
    }
    Ok(hits)
}

/// The keys and PyTorch shapes adapter files hold for the modules at `paths`.
pub(crate) fn expected_keys<B: Backend, M: LoraModel<B>>(
    model: &M,
    paths: &[String],
) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for (path, module) in saveable(model) {
        if !paths.contains(&path) {
            continue;
        }
        let (w, b) = module.original();
        let mut shape = w.dims().to_vec();
        if module.transposed_in_file() {
            shape.reverse();
        }
        let (wk, bk) = keys(&path);
        out.insert(wk, shape);
        if let Some(b) = b {
            out.insert(bk, b.dims().to_vec());
        }
    }
    out
}

/// Adds adapter `name`'s copy to each module at `paths`: of the frozen original, or of the
/// tensors `file(path, device, has_bias)` gives (PyTorch layout) when loading.
pub(crate) fn add_copies<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    name: &str,
    paths: &[String],
    mut file: impl FnMut(&str, &B::Device, bool) -> Result<Option<HostTensorPair<B>>>,
) -> Result<()> {
    for_each_saveable_mut(model, |path, module| {
        if !paths.iter().any(|p| p == path) {
            return Ok(());
        }
        let (w0, b0) = module.original();
        let device = w0.device();
        let (w, b) = match file(path, &device, b0.is_some())? {
            Some((w, b)) if module.transposed_in_file() => (w.transpose(), b),
            Some(pair) => pair,
            None => (w0, b0),
        };
        module.saved_mut().add(name, w, b, path)
    })
}

/// A weight and an optional bias.
pub(crate) type HostTensorPair<B> = (Tensor<B, 2>, Option<Tensor<B, 1>>);

/// Reads the copy of the module at `path` from `read(key)` (PyTorch layout), the bias only
/// when `with_bias`.
pub(crate) fn read_copy<B: Backend>(
    path: &str,
    device: &B::Device,
    with_bias: bool,
    mut read: impl FnMut(&str) -> Result<HostTensor>,
) -> Result<HostTensorPair<B>> {
    let (wk, bk) = keys(path);
    let w = read(&wk)?.to_tensor(&wk, device)?;
    let b = if with_bias {
        Some(read(&bk)?.to_tensor(&bk, device)?)
    } else {
        None
    };
    Ok((w, b))
}

/// Adds adapter `name`'s copies to `out` under PEFT's keys, in PyTorch layout.
pub(crate) fn state_dict<B: Backend, M: LoraModel<B>>(
    model: &M,
    name: &str,
    out: &mut BTreeMap<String, HostTensor>,
) {
    for (path, module) in saveable(model) {
        let Some(copy) = module.saved().get(name) else {
            continue;
        };
        let (wk, bk) = keys(&path);
        let w = copy.weight.val();
        let w = if module.transposed_in_file() {
            w.transpose()
        } else {
            w
        };
        out.insert(wk, to_host(w));
        if let Some(b) = &copy.bias {
            out.insert(bk, to_host(b.val()));
        }
    }
}

/// Makes the copy that runs in each module its frozen original and drops every copy (PEFT's
/// `merge_and_unload` keeps the active adapter's module).
pub(crate) fn keep_live_copies<B: Backend, M: LoraModel<B>>(model: &mut M) -> Result<()> {
    for_each_saveable_mut(model, |_, module| {
        if let Some((w, b)) = module.saved_mut().take_live() {
            module.replace_original(w, b);
        }
        Ok(())
    })
}

/// Drops every copy (the frozen originals stay).
pub(crate) fn drop_copies<B: Backend, M: LoraModel<B>>(model: &mut M) -> Result<()> {
    for_each_saveable_mut(model, |_, module| {
        module.saved_mut().take_live();
        Ok(())
    })
}
