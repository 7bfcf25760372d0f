//! The adapted linear layer: a frozen base `y = x W + b` (dense, or NF4 for QLoRA) plus any
//! number of named adapters, merged into the base or not.

mod adopt;
mod forward;
mod input_grad;
mod saved;
mod shared;

pub use adopt::LoraLinearConfig;

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};

use crate::adapter::{AdapterMeta, LayerState, LoraAdapter, VariantKind};
use crate::error::{Error, Result};
use crate::nf4::Nf4Tensor;
use crate::nf4_weight::{quantize_burn, Nf4Weight};
use crate::saved::SavedCopies;
use crate::variant::{variant_of, Dora};

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
    /// Trainable whole copies of the base (`modules_to_save`), one per adapter listing it.
    pub saved: SavedCopies<B>,
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
            saved: SavedCopies::default(),
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

    /// The weight the forward uses as its base `[in, out]`: the live `modules_to_save` copy
    /// when one runs, else [`Self::base_weight`].
    pub fn live_weight(&self) -> Tensor<B, 2> {
        match self.saved.live() {
            Some(c) => c.weight.val(),
            None => self.base_weight(),
        }
    }

    /// The bias the forward uses: the live `modules_to_save` copy's when one runs, else the
    /// frozen `bias`.
    pub fn live_bias(&self) -> Option<Tensor<B, 1>> {
        match self.saved.live() {
            Some(c) => c.bias.as_ref().map(|b| b.val()),
            None => self.bias.as_ref().map(|b| b.val()),
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

    /// Adds an adapter with given tensors (Burn layout) and makes it active on this layer.
    ///
    /// This is the layer-level primitive; [`crate::PeftModel::add_adapter`] and
    /// [`crate::PeftModel::load_adapter`] then apply the model's active set to every layer, so
    /// through them a new adapter does not become active (as in PEFT).
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

/// The frozen base in NF4 (QLoRA, LoftQ).
impl<B: Backend> LoraLinear<B> {
    /// A frozen layer whose base is an NF4 matrix (PyTorch layout `[out, in]`), with an optional
    /// bias `[out]`.
    pub fn from_nf4(q: &Nf4Tensor, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        LoraLinear {
            weight: placeholder(device),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            nf4: Some(Nf4Weight::from_host(q, device)),
            adapters: Vec::new(),
            saved: SavedCopies::default(),
            state: LayerState::default(),
        }
    }

    /// Whether the frozen base is stored in NF4.
    pub fn is_nf4(&self) -> bool {
        self.nf4.is_some()
    }

    /// Stores the frozen base in NF4 (bitsandbytes' `load_in_4bit`), dropping the dense weight.
    /// A no-op when it already is; refused while adapters are merged into the weight.
    pub fn quantize_nf4(&mut self, module: &str) -> Result<()> {
        if self.nf4.is_some() {
            return Ok(());
        }
        if let Some(name) = self.state.merged.first() {
            return Err(Error::Merge {
                adapter: name.clone(),
                module: module.into(),
                reason: "unmerge before quantizing the base to NF4".into(),
            });
        }
        let q = quantize_burn(self.weight.val());
        self.set_nf4_base(&q);
        Ok(())
    }

    /// Makes `q` (PyTorch layout `[out, in]`) the frozen base, dropping the dense weight.
    pub fn set_nf4_base(&mut self, q: &Nf4Tensor) {
        let device = self.weight.device();
        self.nf4 = Some(Nf4Weight::from_host(q, &device));
        self.weight = placeholder(&device);
    }

    /// Replaces the frozen base with `w` (Burn layout `[in, out]`), requantizing to NF4 when the
    /// base is stored in NF4 (as PEFT merges into a bitsandbytes 4-bit layer: dequantize, add,
    /// quantize again, which rounds).
    pub(crate) fn set_base_weight(&mut self, w: Tensor<B, 2>) {
        let device = w.device();
        if self.nf4.is_some() {
            self.nf4 = Some(Nf4Weight::from_host(&quantize_burn(w), &device));
        } else {
            self.weight = Param::from_tensor(w.detach()).set_require_grad(false);
        }
    }
}

/// The `weight` of an NF4 layer: a 1x1 zero, so that any code still reading `weight` directly
/// fails on a shape mismatch instead of computing with a stale dense matrix.
fn placeholder<B: Backend>(device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::zeros([1, 1], device)).set_require_grad(false)
}
