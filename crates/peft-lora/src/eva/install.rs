//! PEFT's `_load_eva_state_dict`: the adapters rebuilt from EVA's components.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{backend::Backend, Tensor};
use faer::Mat;

use super::{EvaOutcome, EvaReport};
use crate::adapter::AdapterMeta;
use crate::config::{EvaConfig, LoraConfig};
use crate::error::Result;
use crate::linalg::from_mat;
use crate::model::LoraModel;

/// New ranks, alphas, A from the components, B = 0, on every layer of adapter `name`; the
/// layers' active adapters become `active` again. Returns what the config's `rank_pattern` /
/// `alpha_pattern` / `target_modules` become.
pub(super) fn install<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    name: &str,
    cfg: &LoraConfig,
    eva: &EvaConfig,
    mut components: HashMap<String, Mat<f32>>,
    batches: usize,
    active: &[String],
) -> Result<EvaOutcome> {
    let mut ranks = BTreeMap::new();
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    let mut targets = Vec::new();
    for (path, layer) in model.lora_linears_mut() {
        let Some(old) = layer.adapter(name).map(|a| a.meta.clone()) else {
            continue;
        };
        let Some(u) = components.remove(&path) else {
            continue;
        };
        let new_r = u.nrows();
        ranks.insert(path.clone(), new_r);
        if new_r == 0 {
            layer.delete_adapter(name)?;
            continue;
        }
        let mut alpha = old.alpha;
        if new_r != old.r && eva.adjust_scaling_factors {
            alpha *= new_r as f64 / old.r as f64;
        }
        let meta = AdapterMeta {
            r: new_r,
            alpha,
            scaling: cfg.scaling_for(new_r, alpha),
            ..old
        };
        let device = layer.weight.device();
        let a = from_mat::<B>(u.transpose(), &device);
        let b = Tensor::zeros([new_r, layer.d_out()], &device);
        let had_bias = layer.adapter(name).is_some_and(|a| a.lora_b_bias.is_some());
        layer.delete_adapter(name)?;
        let adapter = layer.new_adapter(meta, a, b, had_bias);
        layer.add_adapter(adapter)?;
        if new_r != cfg.r {
            rank_pattern.insert(path.clone(), new_r);
        }
        if alpha != cfg.lora_alpha {
            alpha_pattern.insert(path.clone(), alpha);
        }
        targets.push(path);
    }
    for (_, layer) in model.lora_linears_mut() {
        layer.set_active(active);
    }
    Ok(EvaOutcome {
        report: EvaReport { ranks, batches },
        rank_pattern,
        alpha_pattern,
        targets,
    })
}
