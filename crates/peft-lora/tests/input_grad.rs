//! `LoraLinear::frozen_input_grad`: the input gradient of a layer that trains nothing, against
//! autodiff's gradient of the layer's forward, and `None` whenever something in it trains.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{LoraConfig, LoraCtx, LoraLinear, LoraModel, PeftModel};
use test_support::max_abs_diff;

type B = Autodiff<NdArray<f32>>;

/// One adaptable layer, `fc`.
#[derive(Module, Debug)]
struct One<B: Backend> {
    fc: LoraLinear<B>,
}

impl<B: Backend> LoraModel<B> for One<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![("fc".into(), &self.fc)]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![("fc".into(), &mut self.fc)]
    }
}

/// `x`'s gradient of `<fc(x), g>` by autodiff.
fn autodiff_input_grad(fc: &LoraLinear<B>, x: &Tensor<B, 3>, g: &Tensor<B, 3>) -> Tensor<B, 3> {
    let x = x.clone().detach().require_grad();
    let grads = (fc.forward(x.clone()) * g.clone()).sum().backward();
    Tensor::from_inner(x.grad(&grads).unwrap())
}

#[test]
fn a_frozen_layer_gives_its_input_gradient_and_a_training_one_none() {
    let dev = Default::default();
    let x = Tensor::<B, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &dev);
    let g = Tensor::<B, 3>::random([2, 3, 5], Distribution::Normal(0.0, 1.0), &dev);
    let ctx = LoraCtx::default();

    // A frozen layer (with a frozen bias): `g W^T`, autodiff's gradient.
    let one = One {
        fc: LoraLinear::<B>::random(6, 5, true, &dev),
    };
    let got = one.fc.frozen_input_grad(g.clone(), &ctx).expect("frozen");
    assert_eq!(got.dims(), [2, 3, 6]);
    let want = autodiff_input_grad(&one.fc, &x, &g);
    let err = max_abs_diff(got, want.clone());
    assert!(err <= 1e-5, "{err}");

    // With a live adapter the layer trains: `None`.
    let mut peft = PeftModel::new(one);
    peft.add_adapter("default", &LoraConfig::new(2, 4.0, &["fc"]))
        .unwrap();
    assert!(peft.model.fc.frozen_input_grad(g.clone(), &ctx).is_none());

    // Disabled, it is frozen again, and the gradient is the base's.
    peft.model.fc.set_disabled(true).unwrap();
    let got = peft
        .model
        .fc
        .frozen_input_grad(g.clone(), &ctx)
        .expect("disabled");
    let err = max_abs_diff(got, want);
    assert!(err <= 1e-5, "{err}");
}
