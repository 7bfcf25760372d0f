//! `add_weighted_adapter`: a new adapter from a weighted combination of existing ones
//! (PEFT's `cat`, `linear` and `svd`).

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::adapter::{AdapterMeta, VariantKind};
use crate::error::{Error, Result};
use crate::linalg::svd_top;
use crate::model::LoraModel;
use crate::modules_to_save::{self, saveable};
use crate::peft::PeftModel;

/// How adapters are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Exact: A = concat(w_i s_i A_i), B = concat(B_i); rank = sum of ranks.
    Cat,
    /// Same-rank adapters: A = sum(sqrt(w_i) s_i A_i), B = sum(sqrt(w_i) B_i) (an approximation).
    Linear,
    /// Truncated SVD of sum(w_i s_i B_i A_i) at `rank` (default: the largest rank).
    Svd {
        /// Rank of the result (None = max rank of the inputs).
        rank: Option<usize>,
    },
}

impl<B: Backend, M: LoraModel<B>> PeftModel<B, M> {
    /// Adds adapter `name` combining `adapters` with `weights` (PEFT's `add_weighted_adapter`).
    /// The new adapter has scaling 1 (alpha = r); DoRA adapters cannot be combined. aLoRA
    /// adapters combine only with aLoRA adapters of the same invocation sequence, and the result
    /// is aLoRA with that sequence (PEFT silently takes the first adapter's sequence).
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        combination: Combination,
    ) -> Result<()> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(Error::config(
                "add_weighted_adapter",
                "give one weight per adapter, at least one adapter",
            ));
        }
        if self.configs.contains_key(name) {
            return Err(Error::DuplicateAdapter(name.into()));
        }
        for a in adapters {
            let cfg = self.configs.get(*a).ok_or_else(|| self.unknown(a))?;
            if cfg.use_dora {
                return Err(Error::config(
                    "add_weighted_adapter",
                    format!("adapter `{a}` is DoRA; only plain LoRA adapters combine"),
                ));
            }
        }
        let invocation = self.configs[adapters[0]].alora_invocation_tokens.clone();
        for a in adapters {
            if self.configs[*a].alora_invocation_tokens != invocation {
                return Err(Error::config(
                    "add_weighted_adapter",
                    format!(
                        "adapter `{a}` has alora_invocation_tokens {:?} but `{}` has {:?}; aLoRA adapters combine only with aLoRA adapters of the same invocation sequence",
                        self.configs[*a].alora_invocation_tokens, adapters[0], invocation
                    ),
                ));
            }
        }
        // As PEFT: a module that several of them train whole (`modules_to_save`) has no
        // defined combination.
        for (path, module) in saveable(&self.model) {
            let with_copy: Vec<&&str> = adapters
                .iter()
                .filter(|a| module.saved().get(a).is_some())
                .collect();
            if with_copy.len() > 1 {
                return Err(Error::config(
                    "add_weighted_adapter",
                    format!(
                        "adapters {with_copy:?} all train `{path}` whole (modules_to_save); \
                         such modules cannot be combined"
                    ),
                ));
            }
        }
        let mut new_rank_cfg = 0usize;
        for (path, layer) in self.model.lora_linears_mut() {
            let parts: Vec<_> = adapters
                .iter()
                .zip(weights)
                .filter_map(|(a, w)| layer.adapter(a).map(|ad| (ad, *w)))
                .collect();
            if parts.is_empty() {
                continue;
            }
            let (a, b) = match combination {
                Combination::Cat => {
                    let a = Tensor::cat(
                        parts
                            .iter()
                            .map(|(ad, w)| ad.lora_a.val() * (w * ad.meta.scaling))
                            .collect(),
                        1,
                    );
                    let b = Tensor::cat(parts.iter().map(|(ad, _)| ad.lora_b.val()).collect(), 0);
                    (a, b)
                }
                Combination::Linear => {
                    let r0 = parts[0].0.meta.r;
                    if parts.iter().any(|(ad, _)| ad.meta.r != r0) {
                        return Err(Error::config(
                            "add_weighted_adapter",
                            format!("`linear` needs adapters of one rank (module {path})"),
                        ));
                    }
                    let mut a = parts[0].0.lora_a.val().zeros_like();
                    let mut b = parts[0].0.lora_b.val().zeros_like();
                    for (ad, w) in &parts {
                        a = a + ad.lora_a.val() * (w.sqrt() * ad.meta.scaling);
                        b = b + ad.lora_b.val() * w.sqrt();
                    }
                    (a, b)
                }
                Combination::Svd { rank } => {
                    let r = rank.unwrap_or_else(|| {
                        parts.iter().map(|(ad, _)| ad.meta.r).max().unwrap_or(1)
                    });
                    let mut delta = parts[0].0.delta_weight().zeros_like();
                    for (ad, w) in &parts {
                        delta = delta + ad.delta_weight() * *w;
                    }
                    svd_factors(delta, r, &path)?
                }
            };
            let r = a.dims()[1];
            new_rank_cfg = new_rank_cfg.max(r);
            let meta = AdapterMeta {
                name: name.into(),
                r,
                alpha: r as f64,
                scaling: 1.0,
                dropout: parts[0].0.meta.dropout,
                variant: if invocation.is_some() {
                    VariantKind::Alora
                } else {
                    VariantKind::Lora
                },
                alora_invocation_tokens: invocation.clone(),
            };
            let adapter = layer.new_adapter(meta, a, b, false);
            layer.add_adapter(adapter)?;
        }
        let mut cfg = self.configs[adapters[0]].clone();
        cfg.r = new_rank_cfg;
        cfg.lora_alpha = new_rank_cfg as f64;
        cfg.rank_pattern.clear();
        cfg.alpha_pattern.clear();
        cfg.use_rslora = false;
        // The combination holds LoRA factors only: no trainable token rows of its own.
        cfg.trainable_token_indices = None;
        // As PEFT's injection of the new adapter: its own copy of each `modules_to_save`
        // module, taken from the frozen original.
        let saved_paths = modules_to_save::resolve(&self.model, &cfg)?;
        modules_to_save::add_copies(&mut self.model, name, &saved_paths, |_, _, _| Ok(None))?;
        self.configs.insert(name.into(), cfg);
        // The new adapter is added, not activated (as in PEFT): keep the active set.
        self.activate(self.active.clone(), false)
    }
}

/// `delta` (Burn layout `[in, out]`) = A B with A `[in, r]`, B `[r, out]` from a truncated SVD.
fn svd_factors<B: Backend>(
    delta: Tensor<B, 2>,
    r: usize,
    module: &str,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    let [d_in, d_out] = delta.dims();
    let device = delta.device();
    let host: Vec<f32> = delta.into_data().convert::<f32>().to_vec().expect("f32");
    let m = faer::Mat::<f64>::from_fn(d_in, d_out, |i, j| host[i * d_out + j] as f64);
    // The top `r` triplets, singular values descending (as torch.linalg.svd).
    let svd = svd_top(m.as_ref(), r, module)?;
    let r = svd.s.len();
    let mut a = Vec::with_capacity(d_in * r);
    for row in 0..d_in {
        for k in 0..r {
            a.push((svd.u[(row, k)] * svd.s[k]) as f32);
        }
    }
    let mut b = Vec::with_capacity(r * d_out);
    for k in 0..r {
        for col in 0..d_out {
            b.push(svd.v[(col, k)] as f32);
        }
    }
    Ok((
        Tensor::from_data(TensorData::new(a, [d_in, r]), &device),
        Tensor::from_data(TensorData::new(b, [r, d_out]), &device),
    ))
}
