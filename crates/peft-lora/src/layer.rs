//! The adapted linear layer: a frozen base `y = x W + b` plus any number of named adapters.

use burn::module::{Module, Param};
use burn::tensor::{
    backend::Backend, Distribution, ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData,
};

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::nf4_weight::Nf4Weight;
use crate::st::{to_host, HostTensor};
use crate::variant::{variant_of, Base, Dora, VariantKind};

/// Hyper-parameters of one adapter on one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMeta {
    /// Adapter name (`"default"` unless given).
    pub name: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scaling: f64,
    /// Input dropout probability (training only).
    pub dropout: f64,
    /// Which variant computes the forward and the merge.
    pub variant: VariantKind,
    /// aLoRA: the token ids that switch the adapter on (`Some` exactly for
    /// [`VariantKind::Alora`]).
    pub alora_invocation_tokens: Option<Vec<u32>>,
}

/// One adapter's trainable tensors on one layer, in Burn layout.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// A, `[in, r]` (PEFT's `lora_A.weight` is its transpose, `[r, in]`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// B, `[r, out]` (PEFT's `lora_B.weight` is `[out, r]`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// `lora_bias`: a bias on B, `[out]`.
    pub lora_b_bias: Option<Param<Tensor<B, 1>>>,
    /// DoRA magnitude, `[out]` (`lora_magnitude_vector`).
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// Name, rank, scaling, variant.
    #[module(skip)]
    pub meta: AdapterMeta,
    /// DoRA: the per-output scale applied at merge time, kept for an exact unmerge.
    pub merge_scale: Option<Tensor<B, 1>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// `s * (x A) B (+ s * lora_bias)`: the low-rank term for input `x` `[n, in]`.
    pub fn lora_term(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.lora_a.val()).matmul(self.lora_b.val());
        let y = match &self.lora_b_bias {
            Some(b) => y + b.val().unsqueeze_dim::<2>(0),
            None => y,
        };
        y * self.meta.scaling
    }

    /// `s * A B`, the weight delta in Burn layout `[in, out]`.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.meta.scaling
    }

    /// `s * A B` where no gradient is wanted (merges, DoRA's detached norm): the fused
    /// cuBLASLt GEMM on CUDA backends, the same values as [`Self::delta_weight`] elsewhere.
    pub(crate) fn delta_weight_nograd(&self) -> Tensor<B, 2> {
        #[cfg(feature = "cuda")]
        {
            let (a, b) = (self.lora_a.val().detach(), self.lora_b.val().detach());
            if let Some(d) = crate::cuda::frozen_linear(&a, &b, None) {
                return d * self.meta.scaling;
            }
        }
        self.delta_weight().detach()
    }

    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
}

/// Which adapters run, and which are merged into the base weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerState {
    /// Adapters applied in the forward (in order).
    pub active: Vec<String>,
    /// When true the layer computes the base alone.
    pub disabled: bool,
    /// Adapters currently merged into `weight`.
    pub merged: Vec<String>,
    /// A forward hook (EVA): when set, every forward copies its input `[n, in]` here.
    pub capture: Option<InputCapture>,
}

/// Collects the inputs a layer sees (PyTorch's forward hook, as EVA uses it).
#[derive(Clone, Default)]
pub struct InputCapture(Arc<Mutex<Vec<HostTensor>>>);

impl InputCapture {
    /// Takes every input recorded since the last call.
    pub fn take(&self) -> Vec<HostTensor> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, x: HostTensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(x);
    }
}

impl PartialEq for InputCapture {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for InputCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputCapture")
    }
}

/// Per-call routing: mixed-adapter batches and aLoRA offsets.
#[derive(Debug, Clone, Default)]
pub struct LoraCtx {
    /// One entry per batch row: the adapter that row uses (`None` = the base model). When the
    /// whole field is `None`, every row uses the layer's active adapters.
    pub row_adapters: Option<Vec<Option<String>>>,
    /// aLoRA: one entry per batch row, the number of trailing positions of the row's input in
    /// this call that get an aLoRA adapter (clipped to the call's length; `None` = none, the row
    /// runs as the base). When the whole field is `None` aLoRA adapters act nowhere; models fill
    /// it from their token ids with [`crate::alora::offsets_for`] (PEFT's `alora_offsets`).
    /// Plain LoRA and DoRA adapters ignore it.
    pub alora_offsets: Option<Vec<Option<usize>>>,
}

/// A linear layer with a frozen base and named LoRA adapters.
///
/// Build every projection of a model through this type and expose them with
/// [`crate::LoraModel`]; the rest (targeting, init, save/load, merge) then works unchanged.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// Frozen base weight, Burn layout `[in, out]` (the transpose of PyTorch's `[out, in]`); a
    /// 1x1 placeholder when the base is stored in NF4 (`nf4`): read it with [`Self::base_weight`].
    pub weight: Param<Tensor<B, 2>>,
    /// Frozen base bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The frozen base in NF4 (QLoRA / LoftQ), replacing `weight`.
    pub nf4: Option<Nf4Weight<B>>,
    /// The adapters, in insertion order.
    pub adapters: Vec<LoraAdapter<B>>,
    /// Active / disabled / merged.
    #[module(skip)]
    pub state: LayerState,
}

impl<B: Backend> LoraLinear<B> {
    /// A frozen layer from a Burn-layout weight `[in, out]` and an optional bias.
    pub fn from_weight(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        LoraLinear {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            nf4: None,
            adapters: Vec::new(),
            state: LayerState::default(),
        }
    }

    /// A frozen layer with random weights (tests, benchmarks).
    pub fn random(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let dist = Distribution::Uniform(-bound, bound);
        Self::from_weight(
            Tensor::random([d_in, d_out], dist, device),
            bias.then(|| Tensor::random([d_out], dist, device)),
        )
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        match &self.nf4 {
            Some(q) => q.d_in,
            None => self.weight.dims()[0],
        }
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        match &self.nf4 {
            Some(q) => q.d_out,
            None => self.weight.dims()[1],
        }
    }

    /// The frozen base weight `[in, out]`: `weight`, or the NF4 base dequantized (f32).
    pub fn base_weight(&self) -> Tensor<B, 2> {
        match &self.nf4 {
            Some(q) => q.dequantize(),
            None => self.weight.val(),
        }
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter<B>> {
        self.adapters.iter().find(|a| a.meta.name == name)
    }

    /// The adapter called `name`, mutably.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut LoraAdapter<B>> {
        self.adapters.iter_mut().find(|a| a.meta.name == name)
    }

    /// Adds an adapter with given tensors (Burn layout) and makes it active.
    pub fn add_adapter(&mut self, adapter: LoraAdapter<B>) -> Result<()> {
        if self.adapter(&adapter.meta.name).is_some() {
            return Err(Error::DuplicateAdapter(adapter.meta.name.clone()));
        }
        let name = adapter.meta.name.clone();
        self.adapters.push(adapter);
        if !self.state.active.contains(&name) {
            self.state.active.push(name);
        }
        Ok(())
    }

    /// Builds a fresh adapter with the given init; DoRA's magnitude starts at `||W + s B A||`.
    pub fn new_adapter(
        &self,
        meta: AdapterMeta,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        lora_bias: bool,
    ) -> LoraAdapter<B> {
        let device = self.weight.device();
        let mut adapter = LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            lora_b_bias: lora_bias
                .then(|| Param::from_tensor(Tensor::zeros([self.d_out()], &device))),
            magnitude: None,
            meta,
            merge_scale: None,
        };
        if adapter.meta.variant == VariantKind::Dora {
            let norm = Dora::weight_norm(self.base_weight() + adapter.delta_weight_nograd());
            adapter.magnitude = Some(Param::from_tensor(norm.detach()));
        }
        adapter
    }

    /// Removes the adapter called `name` (unmerging it first if merged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.state.merged.iter().any(|m| m == name) {
            self.unmerge()?;
        }
        let before = self.adapters.len();
        self.adapters.retain(|a| a.meta.name != name);
        if self.adapters.len() == before {
            return Err(self.unknown(name));
        }
        self.state.active.retain(|a| a != name);
        Ok(())
    }

    pub(crate) fn unknown(&self, name: &str) -> Error {
        let known: Vec<&str> = self.adapters.iter().map(|a| a.name()).collect();
        Error::UnknownAdapter(name.into(), known.join(", "))
    }

    /// Sets which adapters run; names that do not exist here are ignored (a model-level call
    /// checks that each exists somewhere).
    pub fn set_active(&mut self, names: &[String]) {
        self.state.active = names
            .iter()
            .filter(|n| self.adapter(n).is_some())
            .cloned()
            .collect();
    }

    /// Disables (base output only) or re-enables the adapters; merged adapters are unmerged.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled && !self.state.merged.is_empty() {
            self.unmerge()?;
        }
        self.state.disabled = disabled;
        Ok(())
    }

    /// Merges the active adapters into the frozen weight. With `safe`, a non-finite result is
    /// refused and the weight left untouched.
    pub fn merge(&mut self, safe: bool, module: &str) -> Result<()> {
        let names: Vec<String> = self
            .state
            .active
            .iter()
            .filter(|n| !self.state.merged.contains(n))
            .cloned()
            .collect();
        self.check_mergeable(&names, module)?;
        for name in names {
            let idx = self
                .adapters
                .iter()
                .position(|a| a.meta.name == name)
                .ok_or_else(|| self.unknown(&name))?;
            let adapter = &self.adapters[idx];
            let variant = variant_of::<B>(adapter.meta.variant);
            let (merged, kept) = variant.merge(adapter, self.base_weight());
            if safe {
                let finite = merged.clone().is_finite().all().into_scalar();
                if !finite.elem::<bool>() {
                    return Err(Error::Merge {
                        adapter: name,
                        module: module.into(),
                        reason: "the merged weight has NaN or infinite values".into(),
                    });
                }
            }
            // Any bias of the adapter folds into the base bias.
            if let Some(lb) = &adapter.lora_b_bias {
                let add = lb.val() * adapter.meta.scaling;
                let new_bias = match &self.bias {
                    Some(b) => b.val() + add,
                    None => add,
                };
                self.bias = Some(Param::from_tensor(new_bias.detach()).set_require_grad(false));
            }
            self.adapters[idx].merge_scale = kept;
            self.set_base_weight(merged);
            self.state.merged.push(name);
        }
        Ok(())
    }

    /// Refuses (before anything changes) when one of `names` is of a variant that cannot merge.
    pub fn check_mergeable(&self, names: &[String], module: &str) -> Result<()> {
        for name in names {
            let adapter = self.adapter(name).ok_or_else(|| self.unknown(name))?;
            if let Some(reason) = variant_of::<B>(adapter.meta.variant).merge_refusal() {
                return Err(Error::Merge {
                    adapter: name.clone(),
                    module: module.into(),
                    reason: reason.into(),
                });
            }
        }
        Ok(())
    }

    /// Removes every merged adapter from the weight again (in reverse merge order).
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(name) = self.state.merged.pop() {
            let idx = self
                .adapters
                .iter()
                .position(|a| a.meta.name == name)
                .ok_or_else(|| self.unknown(&name))?;
            let kept = self.adapters[idx].merge_scale.take();
            let adapter = &self.adapters[idx];
            let w =
                variant_of::<B>(adapter.meta.variant).unmerge(adapter, self.base_weight(), kept);
            if let Some(lb) = &adapter.lora_b_bias {
                if let Some(b) = &self.bias {
                    let nb = b.val() - lb.val() * adapter.meta.scaling;
                    self.bias = Some(Param::from_tensor(nb.detach()).set_require_grad(false));
                }
            }
            self.set_base_weight(w);
        }
        Ok(())
    }

    /// Forward with the active adapters.
    ///
    /// # Shapes
    /// - x: `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_ctx(x, &LoraCtx::default())
    }

    /// Forward with per-call routing: `ctx.row_adapters[i]` names the adapter of batch row `i`
    /// (or `None` for the base), and `ctx.alora_offsets` selects the positions aLoRA adapters
    /// act on (see [`LoraCtx`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]` (or `[batch, in]`, one position per row) -> `[.., out]`
    pub fn forward_ctx<const D: usize>(&self, x: Tensor<B, D>, ctx: &LoraCtx) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let n: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([n, d_in]);
        if let Some(capture) = &self.state.capture {
            capture.push(to_host(x2.clone()));
        }
        let mut out_dims = dims;
        out_dims[D - 1] = self.d_out();
        #[cfg(feature = "cuda")]
        if self.nf4.is_none() {
            if let Some(out) = self.forward_fused(&x2, ctx) {
                return out.reshape(out_dims);
            }
        }
        let weight = match &self.nf4 {
            // Dequantized on the fly into the input's dtype; only the 4-bit codes stay resident.
            Some(q) => q.dequantize().cast(x2.dtype()),
            None => self.weight.val(),
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        let base_out = match &bias {
            Some(b) => x2.clone().matmul(weight.clone()) + b.clone().unsqueeze_dim::<2>(0),
            None => x2.clone().matmul(weight.clone()),
        };
        let mut out = base_out.clone();
        if !self.state.disabled && !self.adapters.is_empty() {
            let base = Base {
                weight: &weight,
                bias: bias.as_ref(),
            };
            let batch = if D >= 2 { dims[0] } else { 1 };
            let seq = n / batch.max(1);
            for adapter in &self.adapters {
                let name = &adapter.meta.name;
                if self.state.merged.contains(name) {
                    continue;
                }
                // Which batch rows run this adapter (`None` = all).
                let rows_on: Option<Vec<bool>> = match &ctx.row_adapters {
                    None => {
                        if !self.state.active.contains(name) {
                            continue;
                        }
                        None
                    }
                    Some(rows) => {
                        let on: Vec<bool> = rows
                            .iter()
                            .map(|r| r.as_deref() == Some(name.as_str()))
                            .collect();
                        if !on.iter().any(|o| *o) {
                            continue;
                        }
                        Some(on)
                    }
                };
                let variant = variant_of::<B>(adapter.meta.variant);
                out = match variant.positions(ctx, batch, seq) {
                    None => {
                        let xd = dropout(x2.clone(), adapter.meta.dropout);
                        let updated = variant.forward(adapter, &base, xd, &base_out, out.clone());
                        match rows_on {
                            None => updated,
                            Some(on) => {
                                let mask: Vec<f32> = on
                                    .iter()
                                    .flat_map(|o| std::iter::repeat_n(f32::from(u8::from(*o)), seq))
                                    .collect();
                                let m = Tensor::<B, 1>::from_floats(mask.as_slice(), &x2.device())
                                    .unsqueeze_dim::<2>(1);
                                out.clone() + (updated - out) * m
                            }
                        }
                    }
                    Some(mut pos) => {
                        if let Some(on) = &rows_on {
                            pos.retain(|p| on[p / seq]);
                        }
                        self.forward_at(adapter, variant, &base, &x2, &base_out, out, &pos)
                    }
                };
            }
        }
        out.reshape(out_dims)
    }

    /// Adds `adapter`'s term at the flat positions `pos` of `out` only (aLoRA): the other rows
    /// stay exactly as they are, and the adapter is computed on the selected rows alone.
    #[allow(clippy::too_many_arguments)]
    fn forward_at(
        &self,
        adapter: &LoraAdapter<B>,
        variant: &dyn crate::variant::LoraVariant<B>,
        base: &Base<'_, B>,
        x2: &Tensor<B, 2>,
        base_out: &Tensor<B, 2>,
        out: Tensor<B, 2>,
        pos: &[usize],
    ) -> Tensor<B, 2> {
        let n = x2.dims()[0];
        if pos.is_empty() {
            return out;
        }
        if pos.len() == n {
            let xd = dropout(x2.clone(), adapter.meta.dropout);
            return variant.forward(adapter, base, xd, base_out, out);
        }
        let idx: Vec<i64> = pos.iter().map(|&p| p as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [pos.len()]), &x2.device());
        let xs = dropout(x2.clone().select(0, idx.clone()), adapter.meta.dropout);
        let bs = base_out.clone().select(0, idx.clone());
        // The variant adds its term to a zero result, so `out + term` is exact at those rows.
        let term = variant.forward(adapter, base, xs, &bs, bs.zeros_like());
        out.select_assign(0, idx, term, IndexingUpdateOp::Add)
    }

    /// Number of trainable parameters in the adapters.
    pub fn adapter_param_count(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| {
                a.lora_a.shape().num_elements()
                    + a.lora_b.shape().num_elements()
                    + a.lora_b_bias
                        .as_ref()
                        .map_or(0, |b| b.shape().num_elements())
                    + a.magnitude.as_ref().map_or(0, |m| m.shape().num_elements())
            })
            .sum()
    }
}

thread_local! {
    static FORCED_TRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` in training mode on any backend: LoRA dropout applies even where autodiff is off.
/// Per-layer gradient checkpointing runs a layer's forward on the inner (non-autodiff) backend
/// and again under autodiff in the backward; with the same random seed both draw the same
/// dropout masks, so the recomputed layer is the one whose output was used.
pub fn with_training<R>(f: impl FnOnce() -> R) -> R {
    let before = FORCED_TRAINING.with(|c| c.replace(true));
    let out = f();
    FORCED_TRAINING.with(|c| c.set(before));
    out
}

/// Training mode: an autodiff backend, or inside [`with_training`].
pub(crate) fn training<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device) || FORCED_TRAINING.with(|c| c.get())
}

thread_local! {
    /// The state of the fused (hashed) dropout's seed stream ([`seed_dropout`]).
    static DROPOUT_SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(0x5eed_d80f) };
}

/// Restarts this thread's seed stream of the fused CUDA dropout (which hashes its masks from a
/// seed instead of drawing them from the backend's generator). Call it wherever the backend is
/// seeded for reproducible dropout (`B::seed`): the trainer does once per step and per-layer
/// gradient checkpointing before a layer's forward and its recomputation. The composed dropout
/// of other backends draws from the backend's generator and ignores this.
pub fn seed_dropout(seed: u64) {
    DROPOUT_SEED.with(|c| c.set(seed));
}

/// The next seed of this thread's fused-dropout stream (splitmix64).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn next_dropout_seed() -> u64 {
    DROPOUT_SEED.with(|c| {
        let s = c.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        c.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Inverted dropout on the adapter input, active only in training mode ([`training`]).
pub(crate) fn dropout<B: Backend>(x: Tensor<B, 2>, p: f64) -> Tensor<B, 2> {
    if p == 0.0 || !training::<B>(&x.device()) {
        return x;
    }
    // On CUDA: one kernel each way, the mask hashed from a seed and never stored.
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::dropout(&x, p) {
        return y;
    }
    let keep = x.random_like(Distribution::Bernoulli(1.0 - p));
    x * keep * (1.0 / (1.0 - p))
}
