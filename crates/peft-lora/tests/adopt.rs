//! Adopting Burn's `nn::Linear` (`From` and `LoraLinearConfig`), and clear errors for a wrong
//! input width and a mistyped `adapter_config.json` field.

use burn::backend::NdArray;
use burn::module::{Initializer, Module};
use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{Error, LoraConfig, LoraLinear, LoraLinearConfig, LoraModel, PeftModel};
use test_support::{fresh_temp_dir, max_abs_diff};

type B = NdArray<f32>;

fn input<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

#[test]
fn from_nn_linear_keeps_weight_bias_and_forward() {
    let device = Default::default();
    for (bias, layout) in [
        (true, LinearLayout::Row),
        (false, LinearLayout::Row),
        (true, LinearLayout::Col),
    ] {
        let linear: Linear<B> = LinearConfig::new(6, 5)
            .with_bias(bias)
            .with_layout(layout)
            .init(&device);
        let x = input([2, 3, 6]);
        let y = linear.forward(x.clone());
        let layer: LoraLinear<B> = linear.clone().into();
        assert_eq!((layer.d_in(), layer.d_out()), (6, 5));
        assert_eq!(layer.bias.is_some(), bias);
        assert_eq!(max_abs_diff(layer.forward(x), y), 0.0);
        // The adopted base is frozen.
        assert!(!layer.weight.is_require_grad());
    }
}

#[test]
fn lora_linear_config_initialises_as_linear_config() {
    let device = Default::default();
    let cfg = LoraLinearConfig::new(8, 3);
    assert!(cfg.bias);
    let plain = LinearConfig::new(8, 3);
    assert_eq!(cfg.initializer, plain.initializer);
    let layer: LoraLinear<B> = cfg.init(&device);
    assert_eq!((layer.d_in(), layer.d_out()), (8, 3));
    assert!(layer.bias.is_some());

    // A constant initializer gives the same weights as Burn's Linear: same forward.
    let init = Initializer::Constant { value: 0.25 };
    let layer: LoraLinear<B> = LoraLinearConfig::new(8, 3)
        .with_initializer(init.clone())
        .init(&device);
    let linear: Linear<B> = LinearConfig::new(8, 3).with_initializer(init).init(&device);
    let x = input([4, 8]);
    assert_eq!(
        max_abs_diff(layer.forward(x.clone()), linear.forward(x)),
        0.0
    );

    let no_bias: LoraLinear<B> =
        LoraLinearConfig::from(LinearConfig::new(8, 3).with_bias(false)).init(&device);
    assert!(no_bias.bias.is_none());
}

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: LoraLinear<B>,
    fc2: LoraLinear<B>,
}

impl<B: Backend> LoraModel<B> for Mlp<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![
            ("encoder.fc1".into(), &self.fc1),
            ("encoder.fc2".into(), &self.fc2),
        ]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![
            ("encoder.fc1".into(), &mut self.fc1),
            ("encoder.fc2".into(), &mut self.fc2),
        ]
    }
}

#[test]
fn adapters_on_an_adopted_model_train_from_the_linear_forward() {
    let device = Default::default();
    let fc1: Linear<B> = LinearConfig::new(6, 10).init(&device);
    let fc2: Linear<B> = LinearConfig::new(10, 4).init(&device);
    let x = input([3, 6]);
    let y = fc2.forward(fc1.forward(x.clone()).tanh());
    let mut peft = PeftModel::new(Mlp {
        fc1: fc1.into(),
        fc2: fc2.into(),
    });
    peft.add_adapter("default", &LoraConfig::new(2, 4.0, &["fc1", "fc2"]))
        .unwrap();
    let m = &peft.model;
    // LoRA's B starts at zero: the adapted model computes the Linear model.
    assert_eq!(max_abs_diff(m.fc2.forward(m.fc1.forward(x).tanh()), y), 0.0);
}

#[test]
fn wrong_input_width_names_the_layer_and_both_widths() {
    let device = Default::default();
    let plain = LoraLinear::<B>::random(6, 4, true, &device);
    let e = plain.try_forward(input([2, 5])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InputWidth {
                in_features: 6,
                found: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(plain.try_forward(input([2, 3, 6])).is_ok());

    let peft = PeftModel::new(Mlp {
        fc1: LoraLinear::random(6, 10, true, &device),
        fc2: LoraLinear::random(10, 4, true, &device),
    });
    let e = peft.model.fc2.try_forward(input([2, 6])).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`encoder.fc2`") && msg.contains("is 6") && msg.contains("is 10"),
        "{msg}"
    );

    // The infallible forward panics with the same message, not Burn's matmul one.
    let fc2 = peft.model.fc2.clone();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        fc2.forward(input([2, 6]))
    }))
    .unwrap_err();
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_eq!(text, msg);
}

#[test]
fn json_type_errors_name_the_field() {
    let dir = fresh_temp_dir("peft-lora-adopt", "json");
    for (json, field) in [
        (r#"{"r": "8", "target_modules": ["q"]}"#, "r"),
        (
            r#"{"r": 8, "lora_alpha": "16", "target_modules": ["q"]}"#,
            "lora_alpha",
        ),
        (r#"{"r": 8, "target_modules": 3}"#, "target_modules"),
        (
            r#"{"r": 8, "target_modules": ["q"], "use_rslora": "yes"}"#,
            "use_rslora",
        ),
        (
            r#"{"r": 8, "target_modules": ["q"], "rank_pattern": {"q": "x"}}"#,
            "rank_pattern",
        ),
    ] {
        std::fs::write(dir.join("adapter_config.json"), json).unwrap();
        let e = LoraConfig::from_file(&dir).unwrap_err();
        match &e {
            Error::Config { field: f, path, .. } => {
                assert_eq!(f, field, "{json}: {e}");
                assert!(path.ends_with("adapter_config.json"), "{e}");
            }
            other => panic!("{json}: {other}"),
        }
        assert!(e.to_string().contains(&format!("field `{field}`")), "{e}");
    }
}
