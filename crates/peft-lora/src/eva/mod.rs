//! EVA (Explained Variance Adaptation, PEFT's `init_lora_weights="eva"`): A is initialised from
//! the principal components of each target layer's *inputs*, collected by streaming batches
//! through the model, and ranks are redistributed across layers by explained variance.
//!
//! Usage: add the adapter with `init_lora_weights = "eva"` (A random, B = 0 until EVA runs),
//! then call [`PeftModel::eva_init`] with batches, a forward function and a token mask. The
//! resulting `rank_pattern`, `alpha_pattern` and `target_modules` are written into the adapter's
//! config, so a saved EVA adapter loads in PEFT.

mod ipca;

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{backend::Backend, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::layer::{AdapterMeta, InputCapture};
use crate::linalg::from_mat;
use crate::model::{LoraModel, PeftModel};

pub use ipca::IncrementalPca;

/// `eva_config` of `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaConfig {
    /// Maximum rank of a layer is `round(r * rho)` (>= 1).
    pub rho: f64,
    /// A component has converged when its cosine similarity between steps reaches `tau`.
    pub tau: f64,
    /// Drop tokens whose label equals `label_mask_value`.
    pub use_label_mask: bool,
    /// The ignored-label value (-100).
    pub label_mask_value: i64,
    /// Divide the components by the square root of their singular values.
    pub whiten: bool,
    /// Scale alpha by `new_r / r` when a layer's rank changes.
    pub adjust_scaling_factors: bool,
}

impl Default for EvaConfig {
    fn default() -> Self {
        EvaConfig {
            rho: 2.0,
            tau: 0.99,
            use_label_mask: true,
            label_mask_value: -100,
            whiten: false,
            adjust_scaling_factors: true,
        }
    }
}

impl EvaConfig {
    /// The `eva_config` of a LoRA config (defaults when absent), validated.
    pub fn from_lora(cfg: &LoraConfig) -> Result<Self> {
        let c: EvaConfig = match cfg.extra.get("eva_config") {
            None | Some(serde_json::Value::Null) => EvaConfig::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::config("eva_config", e.to_string()))?,
        };
        if c.rho < 1.0 || !c.rho.is_finite() {
            return Err(Error::config(
                "eva_config.rho",
                format!("must be >= 1.0, got {}", c.rho),
            ));
        }
        if !(0.0..=1.0).contains(&c.tau) {
            return Err(Error::config(
                "eva_config.tau",
                format!("must be between 0.0 and 1.0, got {}", c.tau),
            ));
        }
        Ok(c)
    }

    /// Which flattened tokens (`batch * seq`, row-major) feed the SVD: attended, and with a
    /// label other than `label_mask_value` when `use_label_mask` and labels are given.
    pub fn token_mask(&self, attention_mask: &[i64], labels: Option<&[i64]>) -> Vec<bool> {
        attention_mask
            .iter()
            .enumerate()
            .map(|(i, m)| {
                *m != 0
                    && !(self.use_label_mask
                        && labels.is_some_and(|l| l.get(i) == Some(&self.label_mask_value)))
            })
            .collect()
    }
}

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

struct Hook {
    pca: IncrementalPca,
    converged: Vec<bool>,
    active: bool,
}

impl<M> PeftModel<M> {
    /// Runs EVA for adapter `name` (added with `init_lora_weights = "eva"`).
    ///
    /// `batches` is cycled until every layer's components converge; `forward` runs the model
    /// on one batch (adapters are disabled meanwhile); `mask` gives the flattened tokens of a
    /// batch that feed the SVD (see [`EvaConfig::token_mask`]); `progress` is called after
    /// every batch.
    pub fn eva_init<B, T, I>(
        &mut self,
        name: &str,
        batches: I,
        mut forward: impl FnMut(&M, &T),
        mut mask: impl FnMut(&T) -> Vec<bool>,
        mut progress: impl FnMut(EvaProgress),
        limits: EvaLimits,
    ) -> Result<EvaReport>
    where
        B: Backend,
        M: LoraModel<B>,
        I: Iterator<Item = T> + Clone,
    {
        let cfg = self.configs.get(name).cloned().ok_or_else(|| {
            Error::UnknownAdapter(
                name.into(),
                self.configs.keys().cloned().collect::<Vec<_>>().join(", "),
            )
        })?;
        let eva = EvaConfig::from_lora(&cfg)?;
        // Target layers, their rank and the budget (PEFT: sum of r over layers).
        let mut order: Vec<String> = Vec::new();
        let mut max_components: HashMap<String, usize> = HashMap::new();
        let mut budget = 0;
        for (path, layer) in self.model.lora_linears() {
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

        let was_disabled = self.set_capture::<B>(name, true);
        let result = (|| {
            // First batch: find layers that see identical inputs (q/k/v, gate/up) so one SVD
            // serves them all (PEFT's HashHook).
            let inputs = self.capture_batch::<B, T>(&first, &order, &mut forward, &mut mask)?;
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
                let inputs =
                    self.capture_batch::<B, T>(&batch, &active, &mut forward, &mut mask)?;
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
                    rank_dist =
                        rank_distribution(&hooks, &layer_hook, &equal, budget, &max_components);
                }
            }
            Ok((hooks, layer_hook, rank_dist, n_batches))
        })();
        self.set_capture::<B>(name, false);
        self.restore_disabled::<B>(was_disabled);
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
        self.load_eva(name, &cfg, &eva, components, n_batches)
    }

    /// Installs (or removes) the input hooks on the layers of adapter `name`; while installed
    /// the adapters are disabled (PEFT runs EVA under `disable_adapter()`). Returns each
    /// layer's previous `disabled` flag.
    fn set_capture<B: Backend>(&mut self, name: &str, on: bool) -> Vec<bool>
    where
        M: LoraModel<B>,
    {
        let mut was = Vec::new();
        for (_, layer) in self.model.lora_linears_mut() {
            was.push(layer.state.disabled);
            if layer.adapter(name).is_some() {
                layer.state.capture = on.then(InputCapture::default);
                if on {
                    layer.state.disabled = true;
                }
            }
        }
        was
    }

    fn restore_disabled<B: Backend>(&mut self, was: Vec<bool>)
    where
        M: LoraModel<B>,
    {
        for ((_, layer), d) in self.model.lora_linears_mut().into_iter().zip(was) {
            layer.state.disabled = d;
        }
    }

    /// Runs one batch and returns the masked inputs of the `wanted` layers, `[tokens, in]`.
    fn capture_batch<B: Backend, T>(
        &mut self,
        batch: &T,
        wanted: &[String],
        forward: &mut impl FnMut(&M, &T),
        mask: &mut impl FnMut(&T) -> Vec<bool>,
    ) -> Result<HashMap<String, Mat<f32>>>
    where
        M: LoraModel<B>,
    {
        forward(&self.model, batch);
        let keep = mask(batch);
        let mut out = HashMap::new();
        for (path, layer) in self.model.lora_linears() {
            let Some(capture) = &layer.state.capture else {
                continue;
            };
            let seen = capture.take();
            if !wanted.contains(&path) {
                continue;
            }
            let Some(x) = seen.into_iter().last() else {
                return Err(Error::config(
                    "eva",
                    format!("the forward function never ran layer `{path}`"),
                ));
            };
            let (n, d) = (x.shape[0], x.shape[1]);
            if keep.len() != n {
                return Err(Error::config(
                    "eva",
                    format!(
                        "the token mask has {} entries but layer `{path}` saw {n} tokens",
                        keep.len()
                    ),
                ));
            }
            let rows: Vec<usize> = (0..n).filter(|i| keep[*i]).collect();
            out.insert(
                path,
                Mat::from_fn(rows.len(), d, |i, j| x.data[rows[i] * d + j]),
            );
        }
        Ok(out)
    }

    /// PEFT's `_load_eva_state_dict`: new ranks, alphas, A from the components, B = 0, and the
    /// config's `rank_pattern` / `alpha_pattern` / `target_modules` rewritten.
    fn load_eva<B: Backend>(
        &mut self,
        name: &str,
        cfg: &LoraConfig,
        eva: &EvaConfig,
        mut components: HashMap<String, Mat<f32>>,
        batches: usize,
    ) -> Result<EvaReport>
    where
        M: LoraModel<B>,
    {
        let mut ranks = BTreeMap::new();
        let mut rank_pattern = BTreeMap::new();
        let mut alpha_pattern = BTreeMap::new();
        let mut targets = Vec::new();
        for (path, layer) in self.model.lora_linears_mut() {
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
        let active = self.active.clone();
        for (_, layer) in self.model.lora_linears_mut() {
            layer.set_active(&active);
        }
        let c = self.configs.get_mut(name).expect("checked above");
        c.rank_pattern = rank_pattern;
        c.alpha_pattern = alpha_pattern;
        c.target_modules = Some(TargetModules::List(targets));
        c.layers_to_transform = None;
        c.layers_pattern = None;
        c.exclude_modules = None;
        Ok(EvaReport { ranks, batches })
    }
}

/// Exact equality of two captured inputs.
fn same(a: &Mat<f32>, b: &Mat<f32>) -> bool {
    a.nrows() == b.nrows()
        && a.ncols() == b.ncols()
        && (0..a.nrows())
            .all(|i| (0..a.ncols()).all(|j| a[(i, j)].to_bits() == b[(i, j)].to_bits()))
}

/// PEFT's `_get_rank_distribution`: every layer's explained-variance ratios, sorted globally;
/// the top `budget` decide the ranks; a hook layer keeps the largest rank of its group.
fn rank_distribution(
    hooks: &BTreeMap<String, Hook>,
    layer_hook: &[(String, String)],
    equal: &[(String, String)],
    budget: usize,
    max_components: &HashMap<String, usize>,
) -> HashMap<String, usize> {
    let mut entries: Vec<(usize, f32)> = Vec::new();
    for (i, (_, hook)) in layer_hook.iter().enumerate() {
        let evr = &hooks[hook].pca.explained_variance_ratio;
        for v in evr.iter().take(max_components[hook]) {
            entries.push((i, *v));
        }
    }
    // Stable: ties keep PEFT's enumeration order.
    entries.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut counts: HashMap<String, usize> =
        layer_hook.iter().map(|(l, _)| (l.clone(), 0)).collect();
    for (i, _) in entries.iter().take(budget) {
        *counts.get_mut(&layer_hook[*i].0).expect("layer") += 1;
    }
    for (k, k_hook) in equal {
        let (rank, rank_hook) = (counts[k], counts[k_hook]);
        if rank_hook >= rank {
            continue;
        }
        counts.insert(k_hook.clone(), rank);
        counts.insert(k.clone(), rank_hook);
    }
    counts
}
