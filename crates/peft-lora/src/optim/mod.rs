//! Optimizers for adapters: AdamW, LoRA+ and LoRA-FA (PEFT's `create_loraplus_optimizer` and
//! `LoraFAOptimizer`), with gradient accumulation, global-norm clipping and savable state.
//!
//! They walk the model through [`LoraModel`], so only adapter tensors (and trainable token rows
//! and `modules_to_save` copies) are ever touched; the frozen base has no gradient and no
//! optimizer state.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, FloatDType, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::host::{to_host, HostTensor};
use crate::linalg::pinv;
use crate::model::LoraModel;
use crate::modules_to_save::{for_each_saveable_mut, saveable};

#[cfg(feature = "cuda")]
mod many;

/// Which update rule.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Plain AdamW on every adapter tensor.
    AdamW,
    /// LoRA+: B (and 1-D adapter tensors) at `lr * lr_ratio`.
    LoraPlus {
        /// Ratio of B's learning rate to A's (PEFT's `loraplus_lr_ratio`, commonly 16).
        lr_ratio: f64,
        /// LoRA+'s own weight decay (PEFT's `loraplus_weight_decay`, default 0); it replaces
        /// `AdamWConfig::weight_decay`, as in PEFT.
        #[serde(default)]
        weight_decay: f64,
    },
    /// LoRA-FA: A frozen; B's gradient projected by `(1/s^2) (A A^T + 1e-8 I)^+`, then PEFT's
    /// `LoraFAOptimizer` Adam update (use eps 1e-6, its default).
    LoraFa,
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Which tensor of an adapter a gradient belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    A,
    B,
    BBias,
    Magnitude,
    TokenDelta,
    SavedWeight,
    SavedBias,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Slot::A => "lora_A",
            Slot::B => "lora_B",
            Slot::BBias => "lora_B_bias",
            Slot::Magnitude => "lora_magnitude_vector",
            Slot::TokenDelta => "trainable_tokens_delta",
            Slot::SavedWeight => "modules_to_save.weight",
            Slot::SavedBias => "modules_to_save.bias",
        }
    }
}

/// The backend an autodiff backend `AB` differentiates (where gradients and optimizer state live).
type Inner<AB> = <AB as AutodiffBackend>::InnerBackend;

/// Accumulated gradients of one or more micro-batches of a model on the autodiff backend `AB`,
/// keyed by `path.adapter.slot`.
pub struct GradAccumulator<AB: AutodiffBackend> {
    grads: BTreeMap<String, Tensor<Inner<AB>, 2>>,
}

impl<AB: AutodiffBackend> Default for GradAccumulator<AB> {
    fn default() -> Self {
        GradAccumulator {
            grads: BTreeMap::new(),
        }
    }
}

fn key(path: &str, adapter: &str, slot: Slot) -> String {
    format!("{path}.{adapter}.{}", slot.name())
}

/// A 16-bit float dtype: such parameters get an f32 master copy and f32 moments.
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `t` in f32 (itself when it already is).
fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

/// `old + g`, in f32 when either is 16-bit (PEFT's f32 adapters accumulate their gradients in
/// f32; a bf16 running sum would round every micro-batch away into 8 bits).
fn accumulate<B: Backend>(old: Tensor<B, 2>, g: Tensor<B, 2>) -> Tensor<B, 2> {
    if is_half(old.dtype()) || is_half(g.dtype()) {
        to_f32(old) + to_f32(g)
    } else {
        old + g
    }
}

impl<AB: AutodiffBackend> GradAccumulator<AB> {
    /// Adds the adapter gradients of one backward pass.
    pub fn add<M: LoraModel<AB>>(&mut self, model: &M, grads: &AB::Gradients) {
        for (path, layer) in model.lora_linears() {
            for ad in &layer.adapters {
                let name = ad.name();
                let mut put = |slot: Slot, g: Option<Tensor<Inner<AB>, 2>>| {
                    if let Some(g) = g {
                        let k = key(&path, name, slot);
                        let v = match self.grads.remove(&k) {
                            Some(old) => accumulate(old, g),
                            None => g,
                        };
                        self.grads.insert(k, v);
                    }
                };
                put(Slot::A, ad.lora_a.val().grad(grads));
                put(Slot::B, ad.lora_b.val().grad(grads));
                put(
                    Slot::BBias,
                    ad.lora_b_bias
                        .as_ref()
                        .and_then(|p| p.val().grad(grads))
                        .map(|g| g.unsqueeze_dim(0)),
                );
                put(
                    Slot::Magnitude,
                    ad.magnitude
                        .as_ref()
                        .and_then(|p| p.val().grad(grads))
                        .map(|g| g.unsqueeze_dim(0)),
                );
            }
        }
        for (path, table) in model.token_tables() {
            for ad in &table.adapters {
                if let Some(g) = ad.delta.val().grad(grads) {
                    self.put(key(&path, &ad.name, Slot::TokenDelta), g);
                }
            }
        }
        for (path, module) in saveable(model) {
            for copy in &module.saved().copies {
                if let Some(g) = copy.weight.val().grad(grads) {
                    self.put(key(&path, &copy.name, Slot::SavedWeight), g);
                }
                if let Some(g) = copy.bias.as_ref().and_then(|b| b.val().grad(grads)) {
                    self.put(key(&path, &copy.name, Slot::SavedBias), g.unsqueeze_dim(0));
                }
            }
        }
    }

    fn put(&mut self, k: String, g: Tensor<Inner<AB>, 2>) {
        let v = match self.grads.remove(&k) {
            Some(old) => accumulate(old, g),
            None => g,
        };
        self.grads.insert(k, v);
    }

    /// The global L2 norm of all accumulated gradients (one device-to-host read).
    pub fn global_norm(&self) -> f64 {
        // On CUDA: one kernel per tensor instead of three.
        #[cfg(feature = "cuda")]
        {
            let ts: Vec<Tensor<Inner<AB>, 2>> = self.grads.values().cloned().collect();
            if let Some(sum) = burn_cuda_ops::sum_of_squares(&ts) {
                return sum.sqrt();
            }
        }
        let squares = self
            .grads
            .values()
            .map(|g| to_f32(g.clone()).powf_scalar(2.0).sum());
        let Some(total) = squares.reduce(|a, b| a + b) else {
            return 0.0;
        };
        total.into_scalar().elem::<f64>().sqrt()
    }

    /// Whether nothing was accumulated.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Elements accumulated, over every tensor.
    pub fn numel(&self) -> usize {
        self.grads.values().map(|g| g.shape().num_elements()).sum()
    }

    /// Names of the accumulated tensors (`<path>.<adapter>.<slot>`), in the order of
    /// [`Self::to_flat`].
    pub fn keys(&self) -> Vec<String> {
        self.grads.keys().cloned().collect()
    }

    /// Every gradient in f32, flattened in key order into one buffer: one bucket for one
    /// collective (data parallelism averages it over the processes), one read from the device.
    pub fn to_flat(&self) -> Vec<f32> {
        let parts: Vec<Tensor<Inner<AB>, 1>> = self
            .grads
            .values()
            .map(|g| {
                let n = g.shape().num_elements();
                to_f32(g.clone()).reshape([n])
            })
            .collect();
        if parts.is_empty() {
            return Vec::new();
        }
        Tensor::cat(parts, 0)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 data reads as f32")
    }

    /// Replaces every gradient by its part of `flat` times `scale` (the layout of
    /// [`Self::to_flat`]; each keeps its dtype), with one upload.
    pub fn load_flat(&mut self, flat: &[f32], scale: f32) -> Result<()> {
        if flat.len() != self.numel() {
            return Err(Error::Shape {
                name: "flat gradient buffer".into(),
                expected: vec![self.numel()],
                found: vec![flat.len()],
            });
        }
        let Some(first) = self.grads.values().next() else {
            return Ok(());
        };
        let device = first.device();
        let all = Tensor::<Inner<AB>, 1>::from_data(
            TensorData::new(flat.to_vec(), [flat.len()]),
            &device,
        ) * scale as f64;
        let mut at = 0;
        for g in self.grads.values_mut() {
            let [r, c] = g.dims();
            let part = all.clone().slice(at..at + r * c).reshape([r, c]);
            at += r * c;
            *g = match g.dtype() {
                DType::F32 => part,
                d => part.cast(FloatDType::from(d)),
            };
        }
        Ok(())
    }
}

/// Learning rate and bias corrections of one step.
struct Hyper {
    lr: f64,
    bc1: f64,
    bc2: f64,
}

/// The factor one step scales every gradient by (global-norm clipping; 1 when off, negative
/// when the step must change nothing), on the host, on the device, or both: on CUDA it is
/// computed on the device beside the norm, so the updates are queued before anything is read.
struct Scale<B: Backend> {
    host: Option<f64>,
    device: Option<Tensor<B, 1>>,
}

impl<B: Backend> Scale<B> {
    /// A factor known on the host.
    fn host_value(c: f64) -> Self {
        Scale {
            host: Some(c),
            device: None,
        }
    }

    /// The factor on the host (read from the device the first time, if it lives there).
    fn host(&mut self) -> f64 {
        if let Some(c) = self.host {
            return c;
        }
        let c = match &self.device {
            Some(t) => t.clone().into_scalar().elem::<f64>(),
            None => 1.0,
        };
        self.host = Some(c);
        c
    }

    /// The factor as one f32 element on `device` (uploaded once if it is a host number).
    #[cfg(feature = "cuda")]
    fn on_device(&mut self, device: &B::Device) -> Tensor<B, 1> {
        if self.device.is_none() {
            let c = self.host() as f32;
            let data = burn::tensor::TensorData::new(vec![c], [1]);
            self.device = Some(Tensor::from_data(data, (device, DType::F32)));
        }
        self.device.clone().expect("set above")
    }
}

/// Moments of one tensor, and the f32 master copy of a 16-bit parameter.
///
/// Mixed precision: PEFT casts adapters to f32 on a bf16 model (`autocast_adapter_dtype`), so
/// its AdamW keeps f32 weights and moments. A bf16 weight cannot take that update (a step of
/// lr = 2e-4 on a weight of 0.02 is about one bf16 unit in the last place, and smaller ones are
/// lost), so the rule runs on an f32 master with f32 moments and the parameter the forward uses
/// is the master rounded to its dtype after every step.
struct Moments<B: Backend> {
    m: Tensor<B, 2>,
    v: Tensor<B, 2>,
    master: Option<Tensor<B, 2>>,
}

/// AdamW / LoRA+ / LoRA-FA over the adapters of a [`LoraModel`] on the autodiff backend `AB`
/// (the model's own backend: nothing names it, it follows from the model).
///
/// A training loop of your own: the loss's `backward()`, then one [`Self::step_grads`] (or,
/// with gradient accumulation, a [`GradAccumulator`] fed by every micro-batch and one
/// [`Self::step`]). [`crate::PeftModel::train`] / [`crate::PeftModel::eval`] switch LoRA
/// dropout on and off.
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::module::Module;
/// use burn::tensor::{backend::Backend, Distribution, ElementConversion, Tensor};
/// use peft_lora::{AdamWConfig, LoraConfig, LoraLinear, LoraModel};
/// use peft_lora::{LoraOptimizer, OptimizerKind, PeftModel};
///
/// #[derive(Module, Debug, LoraModel)]
/// struct Net<B: Backend> {
///     fc: LoraLinear<B>,
/// }
///
/// # fn main() -> peft_lora::Result<()> {
/// let device = Default::default();
/// let net = Net::<Autodiff<NdArray>> { fc: LoraLinear::random(4, 1, true, &device) };
/// let mut peft = PeftModel::new(net);
/// peft.add_adapter("default", &LoraConfig::new(2, 4.0, &["fc"]))?;
/// let x: Tensor<_, 2> = Tensor::random([16, 4], Distribution::Normal(0.0, 1.0), &device);
/// let y = x.clone().sum_dim(1); // learn a sum
/// let mut opt = LoraOptimizer::new(OptimizerKind::AdamW, AdamWConfig::default());
/// peft.train();
/// let mut losses = Vec::new();
/// for _ in 0..30 {
///     let loss = (peft.model.fc.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
///     losses.push(loss.clone().into_scalar().elem::<f32>());
///     opt.step_grads(&mut peft.model, &loss.backward(), 5e-2);
/// }
/// peft.eval();
/// assert!(losses[29] < losses[0]);
/// # Ok(())
/// # }
/// ```
pub struct LoraOptimizer<AB: AutodiffBackend> {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Hyper-parameters.
    pub adamw: AdamWConfig,
    /// Steps taken (for bias correction).
    pub step: u64,
    state: BTreeMap<String, Moments<Inner<AB>>>,
}

impl<AB: AutodiffBackend> LoraOptimizer<AB> {
    /// A fresh optimizer.
    pub fn new(kind: OptimizerKind, adamw: AdamWConfig) -> Self {
        LoraOptimizer {
            kind,
            adamw,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Prepares a model for this optimizer: LoRA-FA freezes every A.
    pub fn prepare<M: LoraModel<AB>>(&self, model: &mut M) {
        if self.kind == OptimizerKind::LoraFa {
            for (_, layer) in model.lora_linears_mut() {
                for ad in &mut layer.adapters {
                    let a = ad.lora_a.val().detach();
                    ad.lora_a = Param::from_tensor(a).set_require_grad(false);
                }
            }
        }
    }

    /// One update from the gradients of one backward pass (no accumulation, no clipping):
    /// [`Self::step`] with a [`GradAccumulator`] holding `grads`. Returns the gradient norm.
    pub fn step_grads<M: LoraModel<AB>>(
        &mut self,
        model: &mut M,
        grads: &AB::Gradients,
        lr: f64,
    ) -> f64 {
        let mut acc = GradAccumulator::default();
        acc.add(model, grads);
        self.step(model, acc, lr, None)
    }

    /// One update with the accumulated gradients (already averaged by the caller), clipped to
    /// `max_grad_norm` if given. Returns the gradient norm before clipping; when it is not
    /// finite nothing is updated (weights, moments and the step count stay as they were).
    ///
    /// On CUDA (AdamW and LoRA+) the norm and the clip factor stay on the device: every update
    /// is queued with the factor and the norm is read last, so the device does not idle while
    /// the host queues the updates; a non-finite norm makes each update kernel keep its tensors.
    pub fn step<M: LoraModel<AB>>(
        &mut self,
        model: &mut M,
        acc: GradAccumulator<AB>,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> f64 {
        #[cfg(feature = "cuda")]
        if self.kind != OptimizerKind::LoraFa {
            let ts: Vec<Tensor<Inner<AB>, 2>> = acc.grads.values().cloned().collect();
            if let Some(gs) = burn_cuda_ops::grad_scale(&ts, max_grad_norm) {
                drop(ts);
                let scale = Scale {
                    host: None,
                    device: Some(gs.scale),
                };
                self.apply(model, acc, lr, scale);
                let norm = gs.norm.into_scalar().elem::<f64>();
                if !norm.is_finite() {
                    // Every update kept its tensors (the factor was negative).
                    self.step -= 1;
                }
                return norm;
            }
        }
        let norm = acc.global_norm();
        if !norm.is_finite() {
            // Leave the weights and the state untouched; the caller reports the step.
            return norm;
        }
        let clip = match max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.apply(model, acc, lr, Scale::host_value(clip));
        norm
    }

    /// Counts the step and updates every tensor that has a gradient in `acc`, each gradient
    /// scaled by `scale`.
    fn apply<M: LoraModel<AB>>(
        &mut self,
        model: &mut M,
        mut acc: GradAccumulator<AB>,
        lr: f64,
        mut scale: Scale<Inner<AB>>,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let h = Hyper {
            lr,
            bc1: 1.0 - self.adamw.beta1.powi(t),
            bc2: 1.0 - self.adamw.beta2.powi(t),
        };
        // On CUDA, with the multi-tensor launches on, the LoRA tensors first (few launches).
        #[cfg(feature = "cuda")]
        if self.kind != OptimizerKind::LoraFa {
            if let Some(factor) = scale.device.clone() {
                self.apply_many(model, &mut acc, &h, &factor);
            }
        }
        let sc = &mut scale;
        for (path, layer) in model.lora_linears_mut() {
            for ad in &mut layer.adapters {
                let name = ad.meta.name.clone();
                let scaling = ad.meta.scaling;
                let a_inner = ad.lora_a.val().inner();
                let mut next =
                    |slot: Slot, old: Tensor<Inner<AB>, 2>| -> Option<Tensor<Inner<AB>, 2>> {
                        let k = key(&path, &name, slot);
                        let mut g = acc.grads.remove(&k)?;
                        if self.kind == OptimizerKind::LoraFa && slot == Slot::B {
                            // Linear in g, so projecting before the clip equals projecting after.
                            g = lora_fa_project(g, &a_inner, scaling);
                        }
                        Some(self.update(k, slot, g, old, &h, sc))
                    };
                if let Some(n) = next(Slot::A, ad.lora_a.val().inner()) {
                    ad.lora_a = trainable(n);
                }
                if let Some(n) = next(Slot::B, ad.lora_b.val().inner()) {
                    ad.lora_b = trainable(n);
                }
                if let Some(p) = &ad.lora_b_bias {
                    if let Some(n) = next(Slot::BBias, p.val().inner().unsqueeze_dim(0)) {
                        ad.lora_b_bias = Some(trainable(n.squeeze_dim(0)));
                    }
                }
                if let Some(p) = &ad.magnitude {
                    if let Some(n) = next(Slot::Magnitude, p.val().inner().unsqueeze_dim(0)) {
                        ad.magnitude = Some(trainable(n.squeeze_dim(0)));
                    }
                }
            }
        }
        for (path, table) in model.token_tables_mut() {
            for ad in &mut table.adapters {
                let k = key(&path, &ad.name, Slot::TokenDelta);
                if let Some(g) = acc.grads.remove(&k) {
                    let n = self.update(k, Slot::TokenDelta, g, ad.delta.val().inner(), &h, sc);
                    ad.delta = trainable(n);
                }
            }
        }
        let _ = for_each_saveable_mut(model, |path, module| {
            for copy in &mut module.saved_mut().copies {
                let k = key(path, &copy.name, Slot::SavedWeight);
                if let Some(g) = acc.grads.remove(&k) {
                    let n = self.update(k, Slot::SavedWeight, g, copy.weight.val().inner(), &h, sc);
                    copy.weight = trainable(n);
                }
                let k = key(path, &copy.name, Slot::SavedBias);
                if let (Some(g), Some(b)) = (acc.grads.remove(&k), &copy.bias) {
                    let old = b.val().inner().unsqueeze_dim(0);
                    let n = self.update(k, Slot::SavedBias, g, old, &h, sc);
                    copy.bias = Some(trainable(n.squeeze_dim(0)));
                }
            }
            Ok(())
        });
    }

    /// The step size and decoupled weight decay of a tensor in `slot` at learning rate `lr`
    /// (LoRA+'s groups: `lora_B` and magnitudes at `lr * lr_ratio`, biases undecayed).
    fn rate_and_decay(&self, slot: Slot, lr: f64) -> (f64, f64) {
        match (&self.kind, slot) {
            (
                OptimizerKind::LoraPlus {
                    lr_ratio,
                    weight_decay,
                },
                Slot::B | Slot::Magnitude,
            ) => (lr * lr_ratio, *weight_decay),
            // 1-D tensors go to LoRA+'s group B; biases are never decayed there.
            (OptimizerKind::LoraPlus { lr_ratio, .. }, Slot::BBias | Slot::SavedBias) => {
                (lr * lr_ratio, 0.0)
            }
            // Token rows and saved weights are 2-D and not lora_B: PEFT puts them in LoRA+'s
            // group A.
            (OptimizerKind::LoraPlus { weight_decay, .. }, _) => (lr, *weight_decay),
            _ => (lr, self.adamw.weight_decay),
        }
    }

    /// One update's scalars as burn-cuda-ops' AdamW kernels take them.
    #[cfg(feature = "cuda")]
    fn kernel_step(&self, h: &Hyper, lr: f64, weight_decay: f64) -> burn_cuda_ops::AdamWStep {
        let c = &self.adamw;
        burn_cuda_ops::AdamWStep {
            betas: (c.beta1 as f32, c.beta2 as f32),
            lr: lr as f32,
            weight_decay: weight_decay as f32,
            eps: c.eps as f32,
            bias_corrections: (h.bc1 as f32, h.bc2 as f32),
        }
    }

    /// The moments kept under `k`, made at the first step: zeros, and for a 16-bit `old` an
    /// f32 master copy of it with f32 moments.
    fn moments(
        &mut self,
        k: String,
        old: &Tensor<Inner<AB>, 2>,
        g: &Tensor<Inner<AB>, 2>,
    ) -> &mut Moments<Inner<AB>> {
        self.state.entry(k).or_insert_with(|| {
            if is_half(old.dtype()) {
                let master = to_f32(old.clone());
                Moments {
                    m: master.zeros_like(),
                    v: master.zeros_like(),
                    master: Some(master),
                }
            } else {
                Moments {
                    m: g.zeros_like(),
                    v: g.zeros_like(),
                    master: None,
                }
            }
        })
    }

    /// One AdamW (or LoRA+ / LoRA-FA) update of the tensor `old` with gradient `g` (times
    /// `scale` here; a negative scale returns `old` and keeps the moments), keeping its moments
    /// under `k`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        k: String,
        slot: Slot,
        g: Tensor<Inner<AB>, 2>,
        old: Tensor<Inner<AB>, 2>,
        h: &Hyper,
        scale: &mut Scale<Inner<AB>>,
    ) -> Tensor<Inner<AB>, 2> {
        let c = self.adamw.clone();
        let (lr_here, wd) = self.rate_and_decay(slot, h.lr);
        let lora_fa = self.kind == OptimizerKind::LoraFa;
        #[cfg(feature = "cuda")]
        let step = self.kernel_step(h, lr_here, wd);
        let low = old.dtype();
        let st = self.moments(k, &old, &g);
        // With a master the rule runs in f32 on it; the parameter becomes the master rounded.
        let old = match &st.master {
            Some(master) => master.clone(),
            None => old,
        };
        // On CUDA: the whole AdamW rule in one kernel instead of ~16 tensor ops.
        #[cfg(feature = "cuda")]
        if !lora_fa && burn_cuda_ops::optimizer_kernels_on::<Inner<AB>>() {
            let scale_t = &scale.on_device(&old.device());
            if st.master.is_some() {
                if let Some((master, m, v, p)) =
                    burn_cuda_ops::adamw_update_master(&old, &g, &st.m, &st.v, scale_t, step, low)
                {
                    (st.m, st.v, st.master) = (m, v, Some(master));
                    return p;
                }
            } else if let Some((p, m, v)) =
                burn_cuda_ops::adamw_update(&old, &g, &st.m, &st.v, scale_t, step)
            {
                (st.m, st.v) = (m, v);
                return p;
            }
        }
        let clip = scale.host();
        if clip < 0.0 {
            // A step whose gradient norm is not finite: nothing changes.
            return match &st.master {
                Some(master) => master.clone().cast(FloatDType::from(low)),
                None => old,
            };
        }
        let g = if st.master.is_some() { to_f32(g) } else { g };
        let g = if clip != 1.0 { g * clip } else { g };
        st.m = st.m.clone() * c.beta1 + g.clone() * (1.0 - c.beta1);
        st.v = st.v.clone() * c.beta2 + g.powf_scalar(2.0) * (1.0 - c.beta2);
        let updated = if lora_fa {
            // PEFT's LoraFAOptimizer: eps added to the uncorrected sqrt(v), the bias
            // correction folded into the step size, decay applied after the update.
            let step_size = lr_here * h.bc2.sqrt() / h.bc1;
            let updated = old - st.m.clone() / (st.v.clone().sqrt() + c.eps) * step_size;
            updated.clone() - updated * (lr_here * wd)
        } else {
            // torch.optim.AdamW: decoupled decay first, then the bias-corrected step.
            let denom = (st.v.clone() / h.bc2).sqrt() + c.eps;
            let update = st.m.clone() / h.bc1 / denom;
            old * (1.0 - lr_here * wd) - update * lr_here
        };
        match &mut st.master {
            Some(master) => {
                *master = updated.clone();
                updated.cast(FloatDType::from(low))
            }
            None => updated,
        }
    }

    /// Optimizer state as host tensors (`<key>.exp_avg`, `<key>.exp_avg_sq`) for checkpoints.
    pub fn state_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (k, st) in &self.state {
            out.insert(format!("{k}.exp_avg"), to_host(st.m.clone()));
            out.insert(format!("{k}.exp_avg_sq"), to_host(st.v.clone()));
            if let Some(master) = &st.master {
                out.insert(format!("{k}.master"), to_host(master.clone()));
            }
        }
        out.insert(
            "step".into(),
            HostTensor {
                shape: vec![1],
                data: vec![self.step as f32],
            },
        );
        out
    }

    /// Restores what [`LoraOptimizer::state_tensors`] saved.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        device: &AB::Device,
    ) -> Result<()> {
        self.state.clear();
        self.step = tensors.get("step").map(|t| t.data[0] as u64).unwrap_or(0);
        for (k, t) in tensors {
            let Some(base) = k.strip_suffix(".exp_avg") else {
                continue;
            };
            let v =
                tensors
                    .get(&format!("{base}.exp_avg_sq"))
                    .ok_or_else(|| Error::Safetensors {
                        path: "optimizer state".into(),
                        message: format!("`{base}.exp_avg_sq` is missing"),
                    })?;
            // A saved master means a 16-bit parameter: master and moments are f32.
            let master = tensors.get(&format!("{base}.master"));
            let to2 = |h: &HostTensor| -> Tensor<Inner<AB>, 2> {
                let (r, c) = match h.shape.as_slice() {
                    [r, c] => (*r, *c),
                    [n] => (1, *n),
                    _ => (1, h.data.len()),
                };
                let data = TensorData::new(h.data.clone(), [r, c]);
                match master {
                    Some(_) => Tensor::from_data(data, (device, DType::F32)),
                    None => Tensor::from_data(data, device),
                }
            };
            self.state.insert(
                base.to_string(),
                Moments {
                    m: to2(t),
                    v: to2(v),
                    master: master.map(to2),
                },
            );
        }
        Ok(())
    }
}

/// LoRA-FA's projection in Burn layout: `g_b <- (1/s^2) (a^T a + 1e-8 I)^+ g_b`, where `a` is
/// `[in, r]` and `g_b` is `[r, out]` (PEFT: `g_B @ pinv(A A^T + 1e-8 I) / s^2` with `B` `[out, r]`).
fn lora_fa_project<B: Backend>(g_b: Tensor<B, 2>, a: &Tensor<B, 2>, scaling: f64) -> Tensor<B, 2> {
    let r = a.dims()[1];
    let ata = a.clone().transpose().matmul(a.clone());
    let host: Vec<f32> = ata.into_data().convert::<f32>().to_vec().expect("f32");
    let m = faer::Mat::<f64>::from_fn(r, r, |i, j| {
        host[i * r + j] as f64 + if i == j { 1e-8 } else { 0.0 }
    });
    let pinv = pinv(m.as_ref(), 1e-12, "lora_fa").unwrap_or_else(|_| faer::Mat::identity(r, r));
    let flat: Vec<f32> = (0..r)
        .flat_map(|i| (0..r).map(move |j| (i, j)))
        .map(|(i, j)| pinv[(i, j)] as f32)
        .collect();
    let p = Tensor::<B, 2>::from_data(TensorData::new(flat, [r, r]), &g_b.device());
    p.matmul(g_b) * (1.0 / (scaling * scaling))
}

/// A fresh trainable parameter holding `value`.
fn trainable<AB: AutodiffBackend, const D: usize>(
    value: Tensor<AB::InnerBackend, D>,
) -> Param<Tensor<AB, D>> {
    Param::from_tensor(Tensor::from_inner(value).require_grad())
}
