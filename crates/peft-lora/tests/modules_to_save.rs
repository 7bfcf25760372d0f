//! `modules_to_save` on a toy classifier (no Llama), PEFT's semantics: a trainable copy per
//! adapter, the original frozen, the active adapter's copy runs (disabled: the original),
//! saved under `base_model.model.<path>.weight` / `.bias`, restored on load, kept by
//! `merge_and_unload`, dropped by `unload`. Parity with Python PEFT on a Llama lives in the
//! workspace's `tests/parity/structural.rs` (`save_lm_head`, `save_embed`).

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Int, Tensor, TensorData};
use peft_lora::{
    AdamWConfig, Error, GradAccumulator, LoraConfig, LoraLinear, LoraModel, LoraOptimizer,
    OptimizerKind, PeftModel, SafetensorsFile, TrainableTokens,
};
use test_support::{fresh_temp_dir, max_abs_diff};

type B = NdArray<f32>;
type AD = Autodiff<B>;

/// Embedding -> fc -> head (paths `embed`, `fc`, `head`).
#[derive(Module, Debug, LoraModel)]
struct Clf<B: Backend> {
    embed: TrainableTokens<B>,
    fc: LoraLinear<B>,
    head: LoraLinear<B>,
}

impl<B: Backend> Clf<B> {
    fn new(device: &B::Device) -> Self {
        Clf {
            embed: TrainableTokens::from_weight(Tensor::random(
                [7, 5],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            fc: LoraLinear::random(5, 8, true, device),
            head: LoraLinear::random(8, 3, true, device),
        }
    }
    fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.head
            .forward(self.fc.forward(self.embed.forward(ids)).tanh())
    }
}

fn ids<B: Backend>(device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(vec![0i64, 3, 6, 2, 5, 1], [2, 3]), device)
}

fn cfg(saved: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(2, 4.0, &["fc"]);
    c.modules_to_save = Some(saved.iter().map(|s| s.to_string()).collect());
    c
}

/// Moves adapter `name`'s copies away from the original, so that the copy matters.
fn perturb_copies<B: Backend>(m: &mut PeftModel<B, Clf<B>>, name: &str) {
    let bump = |p: &Param<Tensor<B, 2>>| {
        let w = p.val();
        Param::from_tensor(w.clone() + w.random_like(Distribution::Normal(0.0, 0.3)))
    };
    for c in m
        .model
        .head
        .saved
        .copies
        .iter_mut()
        .filter(|c| c.name == name)
    {
        c.weight = bump(&c.weight);
    }
    for c in m
        .model
        .embed
        .saved
        .copies
        .iter_mut()
        .filter(|c| c.name == name)
    {
        c.weight = bump(&c.weight);
    }
}

#[test]
fn the_copy_trains_and_the_original_stays_frozen() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<AD>::new(&device));
    let adapted = peft
        .add_adapter("default", &cfg(&["head", "embed"]))
        .unwrap();
    // modules_to_save takes precedence over LoRA targeting (PEFT wraps the module instead).
    assert_eq!(adapted, vec!["fc".to_string()]);
    assert!(peft.model.head.adapters.is_empty());
    let grads = peft.model.forward(ids(&device)).sum().backward();
    let head = &peft.model.head;
    assert!(head.weight.val().grad(&grads).is_none());
    assert!(head.bias.as_ref().unwrap().val().grad(&grads).is_none());
    let copy = head.saved.get("default").unwrap();
    assert!(copy.weight.val().grad(&grads).is_some());
    assert!(copy.bias.as_ref().unwrap().val().grad(&grads).is_some());
    let embed = &peft.model.embed;
    assert!(embed.weight.val().grad(&grads).is_none());
    assert!(embed
        .saved
        .get("default")
        .unwrap()
        .weight
        .val()
        .grad(&grads)
        .is_some());
    // Counted as trainable (weight + bias of the head, the whole table), and in the total.
    let report = peft.trainable_parameters();
    let lora = 5 * 2 + 2 * 8;
    assert_eq!(report.trainable, lora + (8 * 3 + 3) + 7 * 5);
    assert_eq!(report.total, 2 * (8 * 3 + 3 + 7 * 5) + (5 * 8 + 8) + lora);
}

#[test]
fn switching_adapters_switches_the_copy_and_disabling_runs_the_original() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    let x = ids::<B>(&device);
    let base = peft.model.forward(x.clone());
    peft.add_adapter("a", &cfg(&["head"])).unwrap();
    peft.add_adapter("b", &cfg(&["head"])).unwrap();
    perturb_copies(&mut peft, "a");
    perturb_copies(&mut peft, "b");
    let out_a = peft.model.forward(x.clone());
    assert!(max_abs_diff(out_a.clone(), base.clone()) > 1e-2);
    peft.set_active(&["b"]).unwrap();
    let out_b = peft.model.forward(x.clone());
    assert!(max_abs_diff(out_b.clone(), out_a.clone()) > 1e-2);
    // The copy that runs is exactly b's weight.
    let w_b = peft.model.head.saved.get("b").unwrap().weight.val();
    assert_eq!(max_abs_diff(peft.model.head.live_weight(), w_b), 0.0);
    let off = peft
        .with_adapters_disabled(|m| m.forward(x.clone()))
        .unwrap();
    assert_eq!(max_abs_diff(off, base.clone()), 0.0);
    // Two active adapters with a copy of the same module: refused, nothing changes.
    let err = peft.set_active(&["a", "b"]).unwrap_err().to_string();
    assert!(
        err.contains("modules_to_save") && err.contains("`head`"),
        "{err}"
    );
    assert_eq!(peft.active, vec!["b".to_string()]);
    // Deleting b: a becomes active (the first remaining), with its copy.
    peft.delete_adapter("b").unwrap();
    assert!(peft.model.head.saved.get("b").is_none());
    assert_eq!(max_abs_diff(peft.model.forward(x), out_a), 0.0);
}

#[test]
fn save_load_uses_peft_keys_and_restores_the_copies() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    peft.add_adapter("default", &cfg(&["head", "embed"]))
        .unwrap();
    perturb_copies(&mut peft, "default");
    let x = ids::<B>(&device);
    let trained = peft.model.forward(x.clone());
    let dir = fresh_temp_dir("peft-lora-mts", "save");
    peft.save_adapter(&dir, "default").unwrap();
    let st = SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    let shapes = st.shapes();
    let keys: Vec<&str> = shapes.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        vec![
            "base_model.model.embed.weight",
            "base_model.model.fc.lora_A.weight",
            "base_model.model.fc.lora_B.weight",
            "base_model.model.head.bias",
            "base_model.model.head.weight",
        ]
    );
    // PyTorch layout: a linear's weight is [out, in], an embedding's [vocab, dim].
    assert_eq!(shapes["base_model.model.head.weight"], vec![3, 8]);
    assert_eq!(shapes["base_model.model.embed.weight"], vec![7, 5]);
    let cfg_back = LoraConfig::from_file(&dir).unwrap();
    assert_eq!(
        cfg_back.modules_to_save,
        Some(vec!["head".to_string(), "embed".to_string()])
    );

    let mut fresh = PeftModel::new(peft.model.clone());
    peft_lora_unload(&mut fresh);
    fresh.load_adapter(&dir, "default").unwrap();
    assert_eq!(max_abs_diff(fresh.model.forward(x), trained), 0.0);
}

/// Replaces `m` with its base model (every adapter and copy gone).
fn peft_lora_unload(m: &mut PeftModel<B, Clf<B>>) {
    let model = std::mem::replace(m, PeftModel::new(Clf::new(&Default::default())));
    *m = PeftModel::new(model.unload().unwrap());
}

#[test]
fn merge_and_unload_keeps_the_active_copy_and_unload_the_original() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    let x = ids::<B>(&device);
    peft.add_adapter("default", &cfg(&["head"])).unwrap();
    perturb_copies(&mut peft, "default");
    let trained = peft.model.forward(x.clone());
    let copy = peft.model.head.saved.get("default").unwrap().weight.val();

    let merged = peft.merge_and_unload(true).unwrap();
    assert!(merged.head.saved.copies.is_empty());
    assert_eq!(max_abs_diff(merged.head.weight.val(), copy), 0.0);
    assert!(max_abs_diff(merged.forward(x.clone()), trained) < 1e-5);

    let mut again = PeftModel::new(Clf::<B>::new(&device));
    let base2 = again.model.forward(x.clone());
    again.add_adapter("default", &cfg(&["head"])).unwrap();
    perturb_copies(&mut again, "default");
    let unloaded = again.unload().unwrap();
    assert!(unloaded.head.saved.copies.is_empty());
    assert_eq!(max_abs_diff(unloaded.forward(x), base2), 0.0);
}

#[test]
fn modules_to_save_errors_name_the_field() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    let err = peft
        .add_adapter("default", &cfg(&["classifier"]))
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("modules_to_save"), "{err}");
    assert!(err.to_string().contains("embed, fc, head"), "{err}");
    assert!(peft.configs.is_empty() && peft.model.head.saved.copies.is_empty());
}

#[test]
fn the_optimizer_steps_the_copy_and_leaves_the_original() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<AD>::new(&device));
    peft.add_adapter("default", &cfg(&["head"])).unwrap();
    let original = peft.model.head.weight.val();
    let before = peft.model.head.saved.get("default").unwrap().weight.val();
    let grads = peft.model.forward(ids(&device)).sum().backward();
    let mut acc = GradAccumulator::default();
    acc.add(&peft.model, &grads);
    let mut opt = LoraOptimizer::new(OptimizerKind::AdamW, AdamWConfig::default());
    opt.step(&mut peft.model, acc, 1e-2, None);
    let after = peft.model.head.saved.get("default").unwrap().weight.val();
    // AdamW's first step moves every element with a non-zero gradient by about lr.
    let moved = max_abs_diff(after.clone(), before);
    assert!((moved - 1e-2).abs() < 1e-3, "{moved}");
    assert_eq!(max_abs_diff(peft.model.head.weight.val(), original), 0.0);
    // The moments are kept under the copy's key.
    let state = opt.state_tensors();
    assert!(state.contains_key("head.default.modules_to_save.weight.exp_avg"));
    assert!(state.contains_key("head.default.modules_to_save.bias.exp_avg"));
}

#[test]
fn weighted_adapters_take_a_fresh_copy_and_refuse_two_trained_ones() {
    use peft_lora::Combination;
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    peft.add_adapter("a", &cfg(&["head"])).unwrap();
    peft.add_adapter("plain", &LoraConfig::new(2, 4.0, &["fc"]))
        .unwrap();
    perturb_copies(&mut peft, "a");
    // One of them trains the head: the combination gets its own copy of the original (as
    // PEFT injects the new adapter with the first adapter's modules_to_save).
    peft.add_weighted_adapter(&["a", "plain"], &[0.5, 0.5], "ab", Combination::Cat)
        .unwrap();
    let copy = peft.model.head.saved.get("ab").unwrap().weight.val();
    assert_eq!(max_abs_diff(copy, peft.model.head.weight.val()), 0.0);
    // Two of them train it: refused, nothing added.
    peft.add_adapter("b", &cfg(&["head"])).unwrap();
    let err = peft
        .add_weighted_adapter(&["a", "b"], &[0.5, 0.5], "c", Combination::Cat)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`head`") && err.contains("modules_to_save"),
        "{err}"
    );
    assert!(!peft.configs.contains_key("c") && peft.model.fc.adapter("c").is_none());
}

#[test]
fn a_converted_pissa_adapter_keeps_the_trained_copy_as_it_is() {
    let device = Default::default();
    let mut peft = PeftModel::new(Clf::<B>::new(&device));
    let mut c = cfg(&["head"]);
    c.init_lora_weights = peft_lora::InitLoraWeights::Pissa { niter: None };
    peft.add_adapter("default", &c).unwrap();
    let initial = fresh_temp_dir("peft-lora-mts", "pissa-initial");
    peft.save_adapter(&initial, "default").unwrap();
    perturb_copies(&mut peft, "default");
    let out = fresh_temp_dir("peft-lora-mts", "pissa-converted");
    let dir = peft
        .save_adapter_converted(&out, "default", &initial)
        .unwrap();
    let st = SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    let saved = st.read("base_model.model.head.weight").unwrap();
    let copy = peft.model.head.saved.get("default").unwrap().weight.val();
    assert_eq!(
        saved.data,
        copy.transpose().into_data().to_vec::<f32>().unwrap()
    );
    // The LoRA factors are converted (rank doubled).
    assert_eq!(st.shapes()["base_model.model.fc.lora_A.weight"], vec![4, 5]);
}
