//! EVA (Explained Variance Adaptation, PEFT's `init_lora_weights="eva"`): A is initialised from
//! the principal components of each target layer's *inputs*, collected by streaming batches
//! through the model, and ranks are redistributed across layers by explained variance.
//!
//! Usage: add the adapter with `init_lora_weights = "eva"` (A random, B = 0 until EVA runs),
//! then call [`crate::PeftModel::eva_init`] with batches, a forward function and a token mask.
//! The resulting `rank_pattern`, `alpha_pattern` and `target_modules` are written into the
//! adapter's config, so a saved EVA adapter loads in PEFT. EVA reads its settings from the
//! config's typed `eva_config` ([`crate::EvaConfig`]).

mod capture;
mod install;
mod ipca;
mod rank;

use std::collections::{BTreeMap, HashMap};

use burn::tensor::backend::Backend;
use faer::Mat;

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::model::LoraModel;
use capture::{capture_batch, restore_disabled, set_capture};
use ipca::IncrementalPca;
use rank::{rank_distribution, same};

/// Progress of an EVA run, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaProgress {
    /// Batches run so far.
    pub batches: usize,
    /// Layers whose components have converged.
    pub converged: usize,
    /// Target layers.
    pub layers: usize,
}

/// What EVA decided.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaReport {
    /// Rank given to each target layer (0 = the layer lost its adapter).
    pub ranks: BTreeMap<String, usize>,
    /// Batches run until every layer converged.
    pub batches: usize,
}

/// Stops a run that does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaLimits {
    /// Give up (with an error) after this many batches.
    pub max_batches: usize,
}

impl Default for EvaLimits {
    fn default() -> Self {
        EvaLimits {
            max_batches: 10_000,
        }
    }
}

/// The state of one input hook: the running PCA of a layer's inputs and its convergence.
struct Hook {
    pca: IncrementalPca,
    converged: Vec<bool>,
    active: bool,
}

/// What EVA changes in the adapter's config, as PEFT writes it back.
pub(crate) struct EvaOutcome {
    /// What EVA decided.
    pub report: EvaReport,
    /// `rank_pattern`: every layer whose rank differs from `r`.
    pub rank_pattern: BTreeMap<String, usize>,
    /// `alpha_pattern`: every layer whose alpha differs from `lora_alpha`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `target_modules`: the layers that kept an adapter.
    pub targets: Vec<String>,
}

/// Runs EVA for adapter `name` of `model` (added with `cfg`, `init_lora_weights = "eva"`);
/// `active` is the model's active adapter set, restored on every layer afterwards. See
/// [`crate::PeftModel::eva_init`] for `batches`, `forward`, `mask` and `progress`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<B, M, T, I>(
    model: &mut M,
    name: &str,
    cfg: &LoraConfig,
    active: &[String],
    batches: I,
    mut forward: impl FnMut(&M, &T),
    mut mask: impl FnMut(&T) -> Vec<bool>,
    mut progress: impl FnMut(EvaProgress),
    limits: EvaLimits,
) -> Result<EvaOutcome>
where
    B: Backend,
    M: LoraModel<B>,
    I: Iterator<Item = T> + Clone,
{
    let eva = cfg.eva_settings();
    // Target layers, their rank and the budget (PEFT: sum of r over layers).
    let mut order: Vec<String> = Vec::new();
    let mut max_components: HashMap<String, usize> = HashMap::new();
    let mut budget = 0;
    for (path, layer) in model.lora_linears() {
        if let Some(a) = layer.adapter(name) {
            max_components.insert(path.clone(), (a.meta.r as f64 * eva.rho).round() as usize);
            budget += a.meta.r;
            order.push(path);
        }
    }
    let mut batch_iter = batches.clone();
    let Some(first) = batch_iter.next() else {
        return Err(Error::config("eva", "the EVA data loader is empty"));
    };

    let was_disabled = set_capture(model, name, true);
    let result = (|| {
        // First batch: find layers that see identical inputs (q/k/v, gate/up) so one SVD
        // serves them all (PEFT's HashHook).
        let inputs = capture_batch(model, &first, &order, &mut forward, &mut mask)?;
        let mut groups: Vec<Vec<String>> = Vec::new();
        for path in &order {
            let x = &inputs[path];
            match groups.iter_mut().find(|g| same(&inputs[&g[0]], x)) {
                Some(g) => g.push(path.clone()),
                None => groups.push(vec![path.clone()]),
            }
        }
        let mut equal: Vec<(String, String)> = Vec::new();
        for g in groups.iter().filter(|g| g.len() > 1) {
            let mx = g.iter().map(|p| max_components[p]).max().unwrap_or(0);
            for p in g {
                max_components.insert(p.clone(), mx);
            }
            for p in &g[1..] {
                equal.push((p.clone(), g[0].clone()));
            }
        }
        let hook_names: Vec<String> = groups.iter().map(|g| g[0].clone()).collect();
        let mut hooks: BTreeMap<String, Hook> = hook_names
            .iter()
            .map(|p| {
                let hook = Hook {
                    pca: IncrementalPca::new(max_components[p]),
                    converged: vec![false; max_components[p]],
                    active: true,
                };
                (p.clone(), hook)
            })
            .collect();
        // layer -> hook layer, hooks first then duplicates (PEFT's order, used for ties).
        let layer_hook: Vec<(String, String)> = hook_names
            .iter()
            .map(|p| (p.clone(), p.clone()))
            .chain(equal.iter().cloned())
            .collect();

        let mut rank_dist: HashMap<String, usize> = max_components.clone();
        let mut done: HashMap<String, bool> =
            hook_names.iter().map(|p| (p.clone(), false)).collect();
        let mut n_batches = 0;
        let mut stream = batches.clone().cycle();
        loop {
            for p in &hook_names {
                let h = hooks.get_mut(p).expect("hook");
                let conv = h.converged[..rank_dist[p].min(h.converged.len())]
                    .iter()
                    .all(|c| *c);
                if !done[p] && conv && h.active {
                    h.active = false;
                    done.insert(p.clone(), true);
                } else if done[p] && !conv {
                    h.active = true;
                    done.insert(p.clone(), false);
                }
            }
            let converged = layer_hook.iter().filter(|(_, h)| done[h]).count();
            progress(EvaProgress {
                batches: n_batches,
                converged,
                layers: layer_hook.len(),
            });
            if done.values().all(|d| *d) {
                break;
            }
            if n_batches >= limits.max_batches {
                return Err(Error::config(
                        "eva_config.tau",
                        format!(
                            "EVA did not converge after {n_batches} batches ({converged}/{} layers); lower tau or give more data",
                            layer_hook.len()
                        ),
                    ));
            }
            let batch = stream.next().expect("cycled non-empty iterator");
            let active: Vec<String> = hook_names
                .iter()
                .filter(|p| hooks[*p].active)
                .cloned()
                .collect();
            let inputs = capture_batch(model, &batch, &active, &mut forward, &mut mask)?;
            n_batches += 1;
            for p in &active {
                let x = &inputs[p];
                let h = hooks.get_mut(p).expect("hook");
                if x.nrows() < h.pca.n_components {
                    continue; // PEFT skips batches with fewer tokens than components
                }
                let previous = h.pca.components.clone();
                h.pca.partial_fit(x, p)?;
                if let (Some(prev), Some(now)) = (previous, &h.pca.components) {
                    let sim = ipca::row_cosine(now, &prev);
                    h.converged = (0..h.converged.len())
                        .map(|i| sim.get(i).is_some_and(|s| *s as f64 >= eva.tau))
                        .collect();
                }
            }
            if hooks.values().all(|h| h.pca.components.is_some()) {
                rank_dist = rank_distribution(&hooks, &layer_hook, &equal, budget, &max_components);
            }
        }
        Ok((hooks, layer_hook, rank_dist, n_batches))
    })();
    set_capture(model, name, false);
    restore_disabled(model, was_disabled);
    let (hooks, layer_hook, rank_dist, n_batches) = result?;

    // Components per layer: A = top `rank` components (whitened if asked), B = 0.
    let mut components: HashMap<String, Mat<f32>> = HashMap::new();
    for (layer, hook_name) in &layer_hook {
        let h = &hooks[hook_name];
        let rank = rank_dist[layer];
        if !h.converged[..rank.min(h.converged.len())]
            .iter()
            .all(|c| *c)
        {
            return Err(Error::LinAlg {
                module: layer.clone(),
                message: format!("EVA assigned rank {rank} to a layer that has not converged"),
            });
        }
        let c = h.pca.components.as_ref().expect("fitted");
        let u = Mat::from_fn(rank, c.ncols(), |i, j| {
            let v = c[(i, j)];
            if eva.whiten {
                v / h.pca.singular_values[i].sqrt()
            } else {
                v
            }
        });
        components.insert(layer.clone(), u);
    }
    install::install(model, name, cfg, &eva, components, n_batches, active)
}
