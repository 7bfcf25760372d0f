//! Layers that read one input: `LoraLinear::pack_shared_input` lays their frozen weights side by
//! side in one buffer without changing any value, id or gradient flag, and
//! `LoraLinear::forward_shared` gives each layer's own forward (here on the CPU, where the
//! fused op does not run; `gpu_fused` checks the fused op against these forwards on CUDA).

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{Error, LoraConfig, LoraCtx, LoraLinear, LoraModel, PeftModel};
use test_support::max_abs_diff;

#[derive(Module, Debug, LoraModel)]
struct Qkv<B: Backend> {
    q_proj: LoraLinear<B>,
    k_proj: LoraLinear<B>,
    v_proj: LoraLinear<B>,
}

/// Three layers over one 24-wide input, LoRA on q and v with non-zero B.
fn setup<B: Backend>() -> PeftModel<B, Qkv<B>> {
    let device = Default::default();
    let mut peft = PeftModel::new(Qkv {
        q_proj: LoraLinear::random(24, 16, false, &device),
        k_proj: LoraLinear::random(24, 8, true, &device),
        v_proj: LoraLinear::random(24, 8, false, &device),
    });
    peft.add_adapter("default", &LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]))
        .unwrap();
    for layer in [&mut peft.model.q_proj, &mut peft.model.v_proj] {
        let a = &mut layer.adapters[0];
        a.lora_b = Param::from_tensor(a.lora_b.val().random_like(Distribution::Normal(0.0, 1.0)));
    }
    peft.eval();
    peft
}

fn outputs<B: Backend>(m: &Qkv<B>, x: &Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
    [&m.q_proj, &m.k_proj, &m.v_proj]
        .iter()
        .map(|l| l.forward(x.clone()))
        .collect()
}

#[test]
fn packing_keeps_values_ids_and_flags_and_the_forward() {
    type B = NdArray;
    let mut peft = setup::<B>();
    let x = Tensor::<B, 3>::random(
        [2, 3, 24],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let before = outputs(&peft.model, &x);
    let layers = |m: &Qkv<B>| [m.q_proj.clone(), m.k_proj.clone(), m.v_proj.clone()];
    let old = layers(&peft.model);
    let m = &mut peft.model;
    LoraLinear::pack_shared_input(&mut [&mut m.q_proj, &mut m.k_proj, &mut m.v_proj]).unwrap();
    for (new, old) in layers(&peft.model).iter().zip(&old) {
        assert_eq!(new.weight.id, old.weight.id, "the parameter keeps its id");
        assert_eq!(new.weight.dims(), old.weight.dims());
        assert!(!new.weight.val().is_require_grad(), "the base stays frozen");
        assert_eq!(max_abs_diff(new.weight.val(), old.weight.val()), 0.0);
    }
    for (a, b) in outputs(&peft.model, &x).into_iter().zip(before.clone()) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // The shared forward is each layer's forward.
    let m = &peft.model;
    let shared = LoraLinear::forward_shared(
        &[&m.q_proj, &m.k_proj, &m.v_proj],
        x.clone(),
        &LoraCtx::default(),
    );
    assert_eq!(shared.len(), 3);
    for (a, b) in shared.into_iter().zip(before) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // A merge replaces one view; the layers beside it keep their values.
    let merged_out = peft.model.q_proj.forward(x.clone());
    peft.merge(true).unwrap();
    let m = &peft.model;
    assert!(max_abs_diff(m.q_proj.forward(x.clone()), merged_out) < 1e-4);
    assert_eq!(
        max_abs_diff(m.k_proj.weight.val(), old[1].weight.val()),
        0.0
    );
}

#[test]
fn packed_weights_train_the_adapter_as_before() {
    type B = Autodiff<NdArray>;
    let device = Default::default();
    let x = Tensor::<B, 3>::random([2, 3, 24], Distribution::Normal(0.0, 1.0), &device);
    let grads_of = |m: &Qkv<B>| {
        let loss = outputs(m, &x)
            .into_iter()
            .map(|y| y.powi_scalar(2).sum())
            .reduce(|a, b| a + b)
            .unwrap();
        let g = loss.backward();
        let a = &m.q_proj.adapters[0].lora_a;
        (a.val().grad(&g).unwrap(), m.q_proj.weight.val().grad(&g))
    };
    let mut peft = setup::<B>();
    let (want, _) = grads_of(&peft.model);
    let m = &mut peft.model;
    LoraLinear::pack_shared_input(&mut [&mut m.q_proj, &mut m.k_proj, &mut m.v_proj]).unwrap();
    let (got, base_grad) = grads_of(&peft.model);
    assert!(base_grad.is_none(), "no gradient reaches the packed base");
    assert!(max_abs_diff(got, want) < 1e-5);
}

#[test]
fn layers_of_different_input_widths_are_not_packed() {
    type B = NdArray;
    let device = Default::default();
    let mut a = LoraLinear::<B>::random(24, 16, false, &device);
    let mut b = LoraLinear::<B>::random(12, 16, false, &device);
    let (wa, wb) = (a.weight.val(), b.weight.val());
    let err = LoraLinear::pack_shared_input(&mut [&mut a, &mut b]).unwrap_err();
    assert!(matches!(err, Error::Pack { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("in_features") && msg.contains("[12, _]"),
        "{msg}"
    );
    assert_eq!(max_abs_diff(a.weight.val(), wa), 0.0, "nothing changed");
    assert_eq!(max_abs_diff(b.weight.val(), wb), 0.0);
}
