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

/// The gradients of `x`, `A` and `B` for `<fc(x), g>`: by autodiff through the forward, and
/// from `backward_seeds` (each seeded tensor handed its gradient through `sum <t, g_t>`), with
/// the same dropout draws (the backend and dropout seeds reset before each side).
fn both_sides(
    peft: &PeftModel<B, One<B>>,
    x: &Tensor<B, 2>,
    g: &Tensor<B, 2>,
) -> [Vec<(String, Vec<f32>)>; 2] {
    let side = |seeded: bool| {
        B::seed(&x.device(), 11);
        peft_lora::seed_dropout(11);
        let fc = &peft.model.fc;
        let xl = x.clone().detach().require_grad();
        let grads = if seeded {
            let seeds = fc
                .backward_seeds(xl.clone(), g.clone(), &LoraCtx::default())
                .expect("one plain LoRA adapter on every row");
            assert_eq!(seeds.len(), 4);
            seeds
                .into_iter()
                .map(|(t, gt)| (t * gt).sum())
                .reduce(|a, b| a + b)
                .unwrap()
                .backward()
        } else {
            (fc.forward(xl.clone()) * g.clone()).sum().backward()
        };
        let ad = &fc.adapters[0];
        let host = |t: Tensor<NdArray<f32>, 2>| t.into_data().to_vec::<f32>().unwrap();
        vec![
            ("x".to_string(), host(xl.grad(&grads).unwrap())),
            ("A".to_string(), host(ad.lora_a.val().grad(&grads).unwrap())),
            ("B".to_string(), host(ad.lora_b.val().grad(&grads).unwrap())),
        ]
    };
    [side(false), side(true)]
}

#[test]
fn backward_seeds_of_a_lora_layer_give_its_gradients() {
    // With the `cuda` feature the adapted layer's seeds are opt-in (`PEFT_LORA_SEEDED_ADAPTERS`).
    #[cfg(feature = "cuda")]
    burn_cuda_ops::set_seeded_adapters_enabled(true);
    let dev = Default::default();
    let x = Tensor::<B, 2>::random([6, 7], Distribution::Normal(0.0, 1.0), &dev);
    let g = Tensor::<B, 2>::random([6, 5], Distribution::Normal(0.0, 1.0), &dev);
    for dropout in [0.0, 0.3] {
        let mut peft = PeftModel::new(One {
            fc: LoraLinear::<B>::random(7, 5, true, &dev),
        });
        let mut cfg = LoraConfig::new(3, 6.0, &["fc"]);
        cfg.lora_dropout = dropout;
        peft.add_adapter("default", &cfg).unwrap();
        // A non-zero B, so that A's gradient is not zero.
        let ad = &mut peft.model.fc.adapters[0];
        ad.lora_b = burn::module::Param::from_tensor(
            Tensor::random([3, 5], Distribution::Normal(0.0, 0.5), &dev).require_grad(),
        );
        peft.train();
        let [want, got] = both_sides(&peft, &x, &g);
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name}: no gradient (dropout {dropout})");
            let err = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{name} (dropout {dropout}): {err}"
            );
        }
    }
}
