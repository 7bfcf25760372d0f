//! The AdamW updates of many LoRA tensors in few launches (burn-cuda-ops'
//! `adamw_update_master_many`, `PEFT_LORA_MULTI_TENSOR=1`): an 8B model with LoRA on every
//! linear layer has 448 adapter tensors, and one launch each bound the optimizer step by the
//! host's launches while the GPU waited. The rule, the moments and the master copies are those
//! of [`LoraOptimizer::update`]; only the launches are grouped.

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use super::{is_half, key, trainable, GradAccumulator, Hyper, Inner, LoraOptimizer, Slot};
use crate::model::LoraModel;

/// One tensor's update: its key, its gradient and its step scalars (`lr`, weight decay).
struct Job<B: Backend> {
    key: String,
    g: Tensor<B, 2>,
    rate: (f64, f64),
}

/// Updates sharing one launch's arguments: the parameters' dtype and the step scalars.
struct Group<B: Backend> {
    dtype: DType,
    rate: (f64, f64),
    jobs: Vec<Job<B>>,
}

impl<AB: AutodiffBackend> LoraOptimizer<AB> {
    /// Updates every LoRA A and B of `model` that has a gradient in `acc` and a 16-bit
    /// parameter (an f32 master) whose gradient has the parameter's dtype, in batched launches
    /// grouped by step scalars, with the device's clip factor `scale`; their gradients leave
    /// `acc`, so the per-tensor loop skips them. Does nothing unless the multi-tensor launches
    /// are on and run for this backend (then every tensor goes through
    /// [`LoraOptimizer::update`]).
    pub(super) fn apply_many<M: LoraModel<AB>>(
        &mut self,
        model: &mut M,
        acc: &mut GradAccumulator<AB>,
        h: &Hyper,
        scale: &Tensor<Inner<AB>, 1>,
    ) {
        if !burn_cuda_ops::multi_tensor_enabled()
            || !burn_cuda_ops::optimizer_kernels_on::<Inner<AB>>()
        {
            return;
        }
        // The jobs, in the model's order, each with its moments (made at the first step).
        let mut jobs = Vec::new();
        for (path, layer) in model.lora_linears() {
            for ad in &layer.adapters {
                for (slot, param) in [(Slot::A, &ad.lora_a), (Slot::B, &ad.lora_b)] {
                    let k = key(&path, &ad.meta.name, slot);
                    let Some(g) = acc.grads.get(&k) else {
                        continue;
                    };
                    let old = param.val().inner();
                    if !is_half(old.dtype()) || g.dtype() != old.dtype() {
                        continue;
                    }
                    let g = g.clone();
                    self.moments(k.clone(), &old, &g);
                    jobs.push((
                        old.dtype(),
                        Job {
                            key: k,
                            g,
                            rate: self.rate_and_decay(slot, h.lr),
                        },
                    ));
                }
            }
        }
        // Groups of one dtype and one pair of step scalars (LoRA+ gives A and B two), each
        // in the model's order.
        let mut groups: Vec<Group<Inner<AB>>> = Vec::new();
        for (dtype, job) in jobs {
            match groups
                .iter_mut()
                .find(|gr| gr.dtype == dtype && gr.rate == job.rate)
            {
                Some(gr) => gr.jobs.push(job),
                None => groups.push(Group {
                    dtype,
                    rate: job.rate,
                    jobs: vec![job],
                }),
            }
        }
        let mut updated: BTreeMap<String, Tensor<Inner<AB>, 2>> = BTreeMap::new();
        for Group {
            dtype: low,
            rate: (lr, wd),
            jobs: js,
        } in groups
        {
            let items: Vec<_> = js
                .iter()
                .map(|j| {
                    let st = &self.state[&j.key];
                    let master = st.master.clone().expect("16-bit parameters have a master");
                    (master, j.g.clone(), st.m.clone(), st.v.clone())
                })
                .collect();
            let step = self.kernel_step(h, lr, wd);
            let Some(results) = burn_cuda_ops::adamw_update_master_many(&items, scale, step, low)
            else {
                continue;
            };
            for (j, (master, m, v, p)) in js.into_iter().zip(results) {
                let st = self.state.get_mut(&j.key).expect("made above");
                (st.m, st.v, st.master) = (m, v, Some(master));
                acc.grads.remove(&j.key);
                updated.insert(j.key, p);
            }
        }
        if updated.is_empty() {
            return;
        }
        for (path, layer) in model.lora_linears_mut() {
            for ad in &mut layer.adapters {
                let name = ad.meta.name.clone();
                if let Some(p) = updated.remove(&key(&path, &name, Slot::A)) {
                    ad.lora_a = trainable(p);
                }
                if let Some(p) = updated.remove(&key(&path, &name, Slot::B)) {
                    ad.lora_b = trainable(p);
                }
            }
        }
    }
}
