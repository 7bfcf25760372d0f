//! Trainable tokens (`trainable_token_indices`): a frozen embedding table in which only listed rows
//! train, PEFT's `TrainableTokensLayer`.
//!
//! Each adapter holds *replacement* rows `[n, dim]` (PEFT's `trainable_tokens_delta`, despite the
//! name not a difference), initialised from the table's own rows. A lookup of a listed id returns
//! the adapter's row; every other id returns the frozen row. A tied output head computes its
//! logits against the same replaced table ([`TrainableTokens::project`]), so it follows the
//! embedding. Nothing of vocabulary size is copied per call: the rows are picked through a
//! per-adapter id -> slot table.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor, TensorData};

use crate::adapter::LayerState;
use crate::error::{Error, Result};
use crate::saved::{SaveableModule, SavedCopies};

/// One adapter's trainable rows of one table.
#[derive(Module, Debug)]
pub struct TokenAdapter<B: Backend> {
    /// Replacement rows `[n, dim]` (PEFT's `token_adapter.trainable_tokens_delta`).
    pub delta: Param<Tensor<B, 2>>,
    /// The table's rows when the adapter was made, `[n, dim]`: what an unmerge writes back
    /// (PEFT's `trainable_tokens_original`, a buffer that is not saved).
    pub original: Tensor<B, 2>,
    /// `[vocab]`: the row of `delta` for each token id, `n` for ids that are not listed.
    pub slot_of: Tensor<B, 1, Int>,
    /// Adapter name.
    #[module(skip)]
    pub name: String,
    /// The listed token ids, in the order of `delta`'s rows.
    #[module(skip)]
    pub indices: Vec<usize>,
}

/// `rows` (`[n, d]` along `axis` 0, or `[d, n]` along `axis` 1) picked by `slots` along `axis`,
/// where slot `n` (an id that is not listed) picks zeros.
fn pick<B: Backend>(rows: Tensor<B, 2>, slots: Tensor<B, 1, Int>, axis: usize) -> Tensor<B, 2> {
    let mut pad_shape = rows.dims();
    pad_shape[axis] = 1;
    let pad = Tensor::zeros(pad_shape, (&rows.device(), rows.dtype()));
    Tensor::cat(vec![rows, pad], axis).select(axis, slots)
}

/// An embedding table `[vocab, dim]` with frozen rows and named trainable-token adapters.
///
/// Use it for a model's input embedding and expose it through
/// [`crate::LoraModel::token_tables`]; with a tied output head, compute the logits through
/// [`TrainableTokens::project`].
#[derive(Module, Debug)]
pub struct TrainableTokens<B: Backend> {
    /// The frozen table `[vocab, dim]` (PyTorch's `nn.Embedding.weight` layout).
    pub weight: Param<Tensor<B, 2>>,
    /// Token adapters, in insertion order.
    pub adapters: Vec<TokenAdapter<B>>,
    /// Trainable whole copies of the table (`modules_to_save`), one per adapter listing it.
    pub saved: SavedCopies<B>,
    /// Active / disabled / merged adapters.
    #[module(skip)]
    pub state: LayerState,
}

impl<B: Backend> TrainableTokens<B> {
    /// A frozen table from its weight `[vocab, dim]`.
    pub fn from_weight(weight: Tensor<B, 2>) -> Self {
        TrainableTokens {
            weight: Param::from_tensor(weight).set_require_grad(false),
            adapters: Vec::new(),
            saved: SavedCopies::default(),
            state: LayerState::default(),
        }
    }

    /// The table lookups read: the live `modules_to_save` copy when one runs, else `weight`.
    pub fn live_weight(&self) -> Tensor<B, 2> {
        match self.saved.live() {
            Some(c) => c.weight.val(),
            None => self.weight.val(),
        }
    }

    /// Rows of the table (vocabulary size).
    pub fn vocab(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<&TokenAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Adds adapter `name` training the rows `indices` (each `< vocab`, no repeats), starting
    /// from the table's current rows, or from `rows` `[n, dim]` when given (a loaded adapter).
    /// `path` names the table in errors.
    pub fn add_adapter(
        &mut self,
        name: &str,
        indices: &[usize],
        rows: Option<Tensor<B, 2>>,
        path: &str,
    ) -> Result<()> {
        if self.adapter(name).is_some() {
            return Err(Error::DuplicateAdapter(name.into()));
        }
        let (vocab, dim) = (self.vocab(), self.dim());
        let field = "trainable_token_indices";
        if indices.is_empty() {
            return Err(Error::config(
                field,
                format!("no token id listed for `{path}`"),
            ));
        }
        let mut slot = vec![indices.len() as i64; vocab];
        for (i, &id) in indices.iter().enumerate() {
            if id >= vocab {
                return Err(Error::config(
                    field,
                    format!("token id {id} for `{path}` is out of range (its vocabulary has {vocab} rows)"),
                ));
            }
            if slot[id] != indices.len() as i64 {
                return Err(Error::config(
                    field,
                    format!("token id {id} is listed twice for `{path}`"),
                ));
            }
            slot[id] = i as i64;
        }
        let device = self.weight.device();
        let n = indices.len();
        let index = index_tensor::<B>(indices, &device);
        let original = self.weight.val().select(0, index).detach();
        let delta = match rows {
            Some(r) if r.dims() != [n, dim] => {
                return Err(Error::Shape {
                    name: format!("{path}.token_adapter.trainable_tokens_delta"),
                    expected: vec![n, dim],
                    found: r.dims().to_vec(),
                })
            }
            Some(r) => r,
            None => original.clone(),
        };
        self.adapters.push(TokenAdapter {
            delta: Param::from_tensor(delta.detach()),
            original,
            slot_of: Tensor::from_data(TensorData::new(slot, [vocab]), &device),
            name: name.into(),
            indices: indices.to_vec(),
        });
        self.state.active.push(name.into());
        Ok(())
    }

    /// Removes adapter `name` (unmerging first if it is merged). Missing names are ignored.
    pub fn delete_adapter(&mut self, name: &str) {
        if self.state.merged.iter().any(|m| m == name) {
            self.unmerge();
        }
        self.adapters.retain(|a| a.name != name);
        self.state.active.retain(|a| a != name);
    }

    /// Sets which adapters run; names without rows here are ignored. Two active adapters may not
    /// list the same id (PEFT refuses overlapping tokens too).
    pub fn set_active(&mut self, names: &[String], path: &str) -> Result<()> {
        self.state.active = self.check_active(names, path)?;
        Ok(())
    }

    /// The adapters of `names` this table has, refused when two of them list the same id.
    pub(crate) fn check_active(&self, names: &[String], path: &str) -> Result<Vec<String>> {
        let here: Vec<String> = names
            .iter()
            .filter(|n| self.adapter(n).is_some())
            .cloned()
            .collect();
        self.check_disjoint(&here, path)?;
        Ok(here)
    }

    fn check_disjoint(&self, names: &[String], path: &str) -> Result<()> {
        let mut seen = std::collections::BTreeMap::new();
        for name in names {
            let Some(a) = self.adapter(name) else {
                continue;
            };
            for id in &a.indices {
                if let Some(other) = seen.insert(*id, name.clone()) {
                    if &other != name {
                        return Err(Error::config(
                            "trainable_token_indices",
                            format!(
                                "adapters `{other}` and `{name}` both train token {id} of `{path}`; \
                                 only adapters with disjoint token ids can be active or merged together"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Disables (frozen table only) or re-enables the adapters; merged ones are unmerged.
    pub fn set_disabled(&mut self, disabled: bool) {
        if disabled && !self.state.merged.is_empty() {
            self.unmerge();
        }
        self.state.disabled = disabled;
    }

    /// Whether the lookup's output depends on a tensor that requires a gradient (a live
    /// adapter's rows, or an unfrozen table).
    pub fn trains(&self) -> bool {
        self.weight.is_require_grad()
            || self.saved.live().is_some()
            || self.live().any(|a| a.delta.is_require_grad())
    }

    /// Adapters that replace rows in the forward: active, not merged, not disabled.
    fn live(&self) -> impl Iterator<Item = &TokenAdapter<B>> {
        let state = &self.state;
        self.adapters.iter().filter(move |a| {
            !state.disabled && state.active.contains(&a.name) && !state.merged.contains(&a.name)
        })
    }

    /// Embedding lookup: listed ids take their adapter's row.
    ///
    /// # Shapes
    /// ids `[batch, seq]` -> `[batch, seq, dim]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let dim = self.dim();
        let flat = ids.reshape([b * s]);
        let mut x = self.live_weight().select(0, flat.clone());
        for a in self.live() {
            let n = a.indices.len() as i64;
            let slots = a.slot_of.clone().select(0, flat.clone());
            let hit = slots
                .clone()
                .lower_elem(n)
                .unsqueeze_dim::<2>(1)
                .expand([b * s, dim]);
            x = x.mask_where(hit, pick(a.delta.val(), slots, 0));
        }
        x.reshape([b, s, dim])
    }

    /// Logits of a tied output head, `x table^T` with the replaced rows (PEFT's tied
    /// `TrainableTokensLayer` over `lm_head`).
    ///
    /// # Shapes
    /// x `[n, dim]` -> `[n, vocab]`
    pub fn project(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let n_rows = x.dims()[0];
        let vocab = self.vocab();
        let mut logits = x.clone().matmul(self.live_weight().transpose());
        for a in self.live() {
            let n = a.indices.len() as i64;
            // [n_rows, n] logits against the listed rows, spread to their columns.
            let listed = x.clone().matmul(a.delta.val().transpose());
            let hit = a
                .slot_of
                .clone()
                .lower_elem(n)
                .unsqueeze_dim::<2>(0)
                .expand([n_rows, vocab]);
            logits = logits.mask_where(hit, pick(listed, a.slot_of.clone(), 1));
        }
        logits
    }

    /// The table with every live adapter's rows written in (PEFT's `get_merged_weights`),
    /// `[vocab, dim]`. Copies the table; the forward passes do not need it.
    pub fn weight_view(&self) -> Tensor<B, 2> {
        let mut w = self.live_weight();
        for a in self.live() {
            w = replace_rows(w, a, a.delta.val());
        }
        w
    }

    /// Writes the active adapters' rows into the frozen table (PEFT's `merge`). With `safe`, a
    /// non-finite row is refused and the table left untouched.
    pub fn merge(&mut self, safe: bool, path: &str) -> Result<()> {
        let names: Vec<String> = self
            .state
            .active
            .iter()
            .filter(|n| !self.state.merged.contains(n))
            .cloned()
            .collect();
        let mut all = self.state.merged.clone();
        all.extend(names.iter().cloned());
        self.check_disjoint(&all, path)?;
        for name in names {
            let a = self.adapter(&name).expect("active adapters exist");
            let rows = a.delta.val().detach();
            if safe {
                let finite: bool = rows.clone().is_finite().all().into_scalar().elem();
                if !finite {
                    return Err(Error::Merge {
                        adapter: name,
                        module: path.into(),
                        reason: "the trainable token rows have NaN or infinite values".into(),
                    });
                }
            }
            let w = replace_rows(self.weight.val().detach(), a, rows);
            self.weight = Param::from_tensor(w).set_require_grad(false);
            self.state.merged.push(name);
        }
        Ok(())
    }

    /// Writes the original rows back for every merged adapter (reverse merge order).
    pub fn unmerge(&mut self) {
        while let Some(name) = self.state.merged.pop() {
            let Some(a) = self.adapter(&name) else {
                continue;
            };
            let w = replace_rows(self.weight.val().detach(), a, a.original.clone());
            self.weight = Param::from_tensor(w).set_require_grad(false);
        }
    }

    /// Trainable parameters: the rows of every adapter.
    pub fn adapter_param_count(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| a.delta.shape().num_elements())
            .sum()
    }
}

/// An embedding as a `modules_to_save` module: the whole table trains as a copy per adapter
/// (saved as `<path>.weight`, `[vocab, dim]` as PyTorch stores it).
impl<B: Backend> SaveableModule<B> for TrainableTokens<B> {
    fn saved(&self) -> &SavedCopies<B> {
        &self.saved
    }

    fn saved_mut(&mut self) -> &mut SavedCopies<B> {
        &mut self.saved
    }

    fn original(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        (self.weight.val(), None)
    }

    fn transposed_in_file(&self) -> bool {
        false
    }

    fn replace_original(&mut self, weight: Tensor<B, 2>, _bias: Option<Tensor<B, 1>>) {
        self.weight = Param::from_tensor(weight.detach()).set_require_grad(false);
    }
}

/// `table` `[vocab, dim]` with the rows listed by `a` replaced by `rows` `[n, dim]`, exactly
/// (a masked pick, no arithmetic on the values).
fn replace_rows<B: Backend>(
    table: Tensor<B, 2>,
    a: &TokenAdapter<B>,
    rows: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [vocab, dim] = table.dims();
    let n = a.indices.len() as i64;
    let hit = a
        .slot_of
        .clone()
        .lower_elem(n)
        .unsqueeze_dim::<2>(1)
        .expand([vocab, dim]);
    table.mask_where(hit, pick(rows, a.slot_of.clone(), 0))
}

fn index_tensor<B: Backend>(indices: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [indices.len()]), device)
}
