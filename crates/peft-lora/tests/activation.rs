//! Which adapters run after add, load, set, merge, delete and disable, on the model and on every
//! layer: exactly as PEFT (`add_adapter` / `load_adapter` never change the active set; the first
//! adapter of a model without adapters becomes active; `set_adapter` applies to every layer, a
//! layer without the adapter running its base; deleting the active adapter activates the first
//! remaining one by name).

use burn::backend::NdArray;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{LoraConfig, LoraLinear, LoraModel, PeftModel};
use test_support::{fresh_temp_dir, max_abs_diff};

type B = NdArray<f32>;

/// A 2-layer MLP with modules `fc1` and `fc2`.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: LoraLinear<B>,
    fc2: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Mlp {
            fc1: LoraLinear::random(6, 10, true, device),
            fc2: LoraLinear::random(10, 4, true, device),
        }
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(self.fc1.forward(x).tanh())
    }
}

impl<B: Backend> LoraModel<B> for Mlp<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![("fc1".into(), &self.fc1), ("fc2".into(), &self.fc2)]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![("fc1".into(), &mut self.fc1), ("fc2".into(), &mut self.fc2)]
    }
}

fn cfg(targets: &[&str]) -> LoraConfig {
    LoraConfig::new(2, 4.0, targets)
}

/// Gives adapter `name`'s B a non-zero value on every layer, so that it changes the output.
fn perturb(m: &mut PeftModel<B, Mlp<B>>, name: &str) {
    for (_, layer) in m.model.lora_linears_mut() {
        if let Some(a) = layer.adapter_mut(name) {
            let b = a.lora_b.val();
            a.lora_b = Param::from_tensor(Tensor::random(
                b.shape(),
                Distribution::Normal(0.0, 0.5),
                &b.device(),
            ));
        }
    }
}

fn layer_active(m: &PeftModel<B, Mlp<B>>) -> [Vec<String>; 2] {
    [
        m.model.fc1.state.active.clone(),
        m.model.fc2.state.active.clone(),
    ]
}

fn input(device: &burn::backend::ndarray::NdArrayDevice) -> Tensor<B, 2> {
    Tensor::random([5, 6], Distribution::Normal(0.0, 1.0), device)
}

/// `task_a` on fc1 + fc2, then `task_b` on fc2 only (the case of issue 17).
fn two_tasks(base: &Mlp<B>) -> PeftModel<B, Mlp<B>> {
    let mut peft = PeftModel::new(base.clone());
    peft.add_adapter("task_a", &cfg(&["fc1", "fc2"])).unwrap();
    perturb(&mut peft, "task_a");
    assert_eq!(peft.active, ["task_a"], "the first adapter becomes active");
    peft.add_adapter("task_b", &cfg(&["fc2"])).unwrap();
    perturb(&mut peft, "task_b");
    peft
}

fn same(a: Tensor<B, 2>, b: Tensor<B, 2>) {
    assert_eq!(max_abs_diff(a, b), 0.0);
}

#[test]
fn add_keeps_the_active_adapter_on_every_layer() {
    let device = Default::default();
    let base = Mlp::<B>::new(&device);
    let x = input(&device);
    let mut peft = two_tasks(&base);

    // Adding task_b changed nothing: task_a still runs, on both layers.
    assert_eq!(peft.active, ["task_a"]);
    assert_eq!(layer_active(&peft), [vec!["task_a"], vec!["task_a"]]);
    let after_add = peft.model.forward(x.clone());
    peft.set_active(&["task_a"]).unwrap();
    same(after_add, peft.model.forward(x.clone()));

    // set_active(task_b): fc1 (which has no task_b) runs its base, fc2 runs task_b.
    peft.set_active(&["task_b"]).unwrap();
    assert_eq!(layer_active(&peft), [vec![], vec!["task_b"]]);
    same(
        peft.model.fc1.forward(x.clone()),
        base.fc1.forward(x.clone()),
    );
    let h = base.fc1.forward(x.clone()).tanh();
    assert!(max_abs_diff(peft.model.fc2.forward(h.clone()), base.fc2.forward(h)) > 1e-3);

    // Both at once.
    peft.set_active(&["task_a", "task_b"]).unwrap();
    assert_eq!(
        layer_active(&peft),
        [vec!["task_a"], vec!["task_a", "task_b"]]
    );
}

#[test]
fn load_keeps_the_active_adapter_on_every_layer() {
    let device = Default::default();
    let base = Mlp::<B>::new(&device);
    let x = input(&device);
    let mut peft = two_tasks(&base);
    let dir = fresh_temp_dir("peft-lora-activation", "load");
    let dir_a = peft.save_adapter(&dir, "task_a").unwrap();
    let dir_b = peft.save_adapter(&dir, "task_b").unwrap();
    peft.set_active(&["task_a"]).unwrap();
    let y_a = peft.model.forward(x.clone());
    peft.set_active(&["task_b"]).unwrap();
    let y_b = peft.model.forward(x.clone());

    let mut loaded = PeftModel::new(base.clone());
    loaded.load_adapter(&dir_a, "task_a").unwrap();
    assert_eq!(
        loaded.active,
        ["task_a"],
        "the first adapter becomes active"
    );
    loaded.load_adapter(&dir_b, "task_b").unwrap();
    assert_eq!(loaded.active, ["task_a"]);
    assert_eq!(layer_active(&loaded), [vec!["task_a"], vec!["task_a"]]);
    same(loaded.model.forward(x.clone()), y_a);

    loaded.set_active(&["task_b"]).unwrap();
    assert_eq!(layer_active(&loaded), [vec![], vec!["task_b"]]);
    same(loaded.model.forward(x.clone()), y_b);
    same(loaded.model.fc1.forward(x.clone()), base.fc1.forward(x));
}

#[test]
fn merge_merges_only_the_active_adapters() {
    let device = Default::default();
    let base = Mlp::<B>::new(&device);
    let x = input(&device);

    // Right after adding task_b: task_a is what runs, and what merges, on both layers.
    let mut peft = two_tasks(&base);
    let y_a = peft.model.forward(x.clone());
    peft.merge(true).unwrap();
    assert_eq!(peft.model.fc1.state.merged, ["task_a"]);
    assert_eq!(peft.model.fc2.state.merged, ["task_a"]);
    assert!(max_abs_diff(peft.model.forward(x.clone()), y_a) < 1e-5);

    // As PEFT's set_adapter: switching unmerges first, then task_b alone runs.
    peft.set_active(&["task_b"]).unwrap();
    assert!(peft.model.fc1.state.merged.is_empty() && peft.model.fc2.state.merged.is_empty());
    let y_b = peft.model.forward(x.clone());
    peft.merge(true).unwrap();
    assert!(peft.model.fc1.state.merged.is_empty());
    assert_eq!(peft.model.fc2.state.merged, ["task_b"]);
    assert!(max_abs_diff(peft.model.forward(x.clone()), y_b.clone()) < 1e-5);
    assert!(max_abs_diff(peft.model.fc1.weight.val(), base.fc1.weight.val()) < 1e-6);

    // merge_and_unload keeps task_b only.
    let plain = peft.merge_and_unload(true).unwrap();
    assert!(max_abs_diff(plain.forward(x), y_b) < 1e-5);
}

#[test]
fn delete_activates_what_peft_activates() {
    let device = Default::default();
    let base = Mlp::<B>::new(&device);
    let x = input(&device);
    let mut peft = two_tasks(&base);
    peft.add_adapter("task_c", &cfg(&["fc1"])).unwrap();
    perturb(&mut peft, "task_c");
    peft.set_active(&["task_b"]).unwrap();
    let y_b = peft.model.forward(x.clone());

    // Deleting an active adapter keeps the other active ones.
    peft.set_active(&["task_a", "task_b"]).unwrap();
    peft.delete_adapter("task_a").unwrap();
    assert_eq!(peft.active, ["task_b"]);
    assert_eq!(layer_active(&peft), [vec![], vec!["task_b"]]);
    same(peft.model.forward(x.clone()), y_b);

    // Deleting the only active one activates the first remaining by name (task_c), everywhere.
    peft.delete_adapter("task_b").unwrap();
    assert_eq!(peft.active, ["task_c"]);
    assert_eq!(layer_active(&peft), [vec!["task_c"], vec![]]);
    let h = base.fc1.forward(x.clone());
    same(peft.model.fc2.forward(h.clone()), base.fc2.forward(h));

    // Deleting the last one leaves the base.
    peft.delete_adapter("task_c").unwrap();
    assert!(peft.active.is_empty());
    same(peft.model.forward(x.clone()), base.forward(x.clone()));

    // A model without adapters again: the next one added becomes active.
    peft.add_adapter("task_d", &cfg(&["fc2"])).unwrap();
    assert_eq!(peft.active, ["task_d"]);
    assert_eq!(layer_active(&peft), [vec![], vec!["task_d"]]);
}

#[test]
fn disabled_adapters_run_the_base_inside_the_context_only() {
    let device = Default::default();
    let base = Mlp::<B>::new(&device);
    let x = input(&device);
    let mut peft = two_tasks(&base);
    let y = peft.model.forward(x.clone());
    let inside = peft
        .with_adapters_disabled(|m| m.forward(x.clone()))
        .unwrap();
    same(inside, base.forward(x.clone()));
    assert_eq!(peft.active, ["task_a"]);
    same(peft.model.forward(x.clone()), y);

    // Already disabled before: stays disabled after.
    peft.set_adapters_disabled(true).unwrap();
    peft.with_adapters_disabled(|_| ()).unwrap();
    same(peft.model.forward(x.clone()), base.forward(x));
}
