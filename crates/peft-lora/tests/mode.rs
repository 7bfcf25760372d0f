//! Train / eval mode: one explicit switch on the model (`PeftModel::train` / `eval` /
//! `set_training`) decides whether LoRA dropout applies, on an autodiff backend and on a plain
//! one alike; without it, dropout applies on autodiff backends only (the previous behaviour).

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{LoraConfig, LoraLinear, LoraModel, PeftModel};
use test_support::max_abs_diff;

#[derive(Module, Debug, LoraModel)]
struct Net<B: Backend> {
    fc: LoraLinear<B>,
}

/// A model with a dropout-0.5 adapter whose B is non-zero, and an input.
fn setup<B: Backend>() -> (PeftModel<B, Net<B>>, Tensor<B, 2>) {
    let device = Default::default();
    let mut peft = PeftModel::new(Net {
        fc: LoraLinear::random(32, 8, true, &device),
    });
    let mut cfg = LoraConfig::new(4, 8.0, &["fc"]);
    cfg.lora_dropout = 0.5;
    peft.add_adapter("default", &cfg).unwrap();
    let a = &mut peft.model.fc.adapters[0];
    a.lora_b = Param::from_tensor(a.lora_b.val().random_like(Distribution::Normal(0.0, 1.0)));
    let x = Tensor::random([4, 32], Distribution::Normal(0.0, 1.0), &device);
    (peft, x)
}

/// Whether two forwards differ (dropout draws a new mask each time).
fn drops<B: Backend>(peft: &PeftModel<B, Net<B>>, x: &Tensor<B, 2>) -> bool {
    let a = peft.model.fc.forward(x.clone());
    let b = peft.model.fc.forward(x.clone());
    max_abs_diff(a, b) > 1e-4
}

#[test]
fn plain_backend_drops_only_in_train_mode() {
    let (mut peft, x) = setup::<NdArray>();
    assert!(!drops(&peft, &x), "no dropout by default without autodiff");
    let eval_out = peft.model.fc.forward(x.clone());
    peft.train();
    assert!(drops(&peft, &x), "train() turns dropout on");
    peft.eval();
    assert!(!drops(&peft, &x));
    assert_eq!(
        max_abs_diff(peft.model.fc.forward(x.clone()), eval_out),
        0.0
    );
}

#[test]
fn autodiff_backend_drops_until_eval() {
    let (mut peft, x) = setup::<Autodiff<NdArray>>();
    assert!(drops(&peft, &x), "dropout by default on autodiff");
    peft.eval();
    assert!(
        !drops(&peft, &x),
        "eval() turns dropout off on autodiff too"
    );
    let inner = peft.model.valid();
    let want = inner.fc.forward(x.clone().inner());
    assert_eq!(
        max_abs_diff(peft.model.fc.forward(x.clone()).inner(), want),
        0.0
    );
    peft.set_training(true);
    assert!(drops(&peft, &x));
}

#[test]
fn the_mode_survives_adding_and_unloading_adapters() {
    let (mut peft, x) = setup::<NdArray>();
    peft.train();
    peft.add_adapter("other", &LoraConfig::new(2, 4.0, &["fc"]))
        .unwrap();
    assert!(drops(&peft, &x));
    let model = peft.unload().unwrap();
    assert_eq!(model.fc.state.training, Some(true));
}
