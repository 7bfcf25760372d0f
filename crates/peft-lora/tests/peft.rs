//! Behaviour of `peft-lora` on a toy two-layer model (no Llama): init, merge, DoRA, adapters,
//! the PEFT file format, and bad input. Parity with Python PEFT lives in the workspace's
//! `tests/parity.rs`, which has the Llama model.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_lora::{Error, LoraConfig, LoraCtx, LoraLinear, LoraModel, PeftModel, TargetModules};

type B = NdArray<f32>;
type AD = Autodiff<B>;

#[derive(Module, Debug)]
struct Toy<B: Backend> {
    up: LoraLinear<B>,
    down: LoraLinear<B>,
}

impl<B: Backend> Toy<B> {
    fn new(device: &B::Device) -> Self {
        Toy {
            up: LoraLinear::random(6, 10, true, device),
            down: LoraLinear::random(10, 6, false, device),
        }
    }
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down.forward(self.up.forward(x).tanh())
    }
    fn forward_ctx(&self, x: Tensor<B, 3>, ctx: &LoraCtx) -> Tensor<B, 3> {
        self.down
            .forward_ctx(self.up.forward_ctx(x, ctx).tanh(), ctx)
    }
}

impl<B: Backend> LoraModel<B> for Toy<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        vec![
            ("model.mlp.up".into(), &self.up),
            ("model.mlp.down".into(), &self.down),
        ]
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![
            ("model.mlp.up".into(), &mut self.up),
            ("model.mlp.down".into(), &mut self.down),
        ]
    }
}

fn input<B: Backend>(device: &B::Device) -> Tensor<B, 3> {
    Tensor::random([2, 3, 6], Distribution::Normal(0.0, 1.0), device)
}

fn max_rel(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().max(1e-6);
    (a - b).abs().max().into_scalar() / scale
}

/// Gives every B a non-zero value so the adapter matters.
fn perturb<B: Backend>(m: &mut PeftModel<Toy<B>>) {
    for (_, layer) in m.model.lora_linears_mut() {
        for a in &mut layer.adapters {
            let shape = a.lora_b.shape();
            let device = a.lora_b.device();
            a.lora_b = burn::module::Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.3),
                &device,
            ));
        }
    }
}

fn config(targets: &[&str]) -> LoraConfig {
    LoraConfig::new(4, 8.0, targets)
}

#[test]
fn default_init_is_identity_and_disable_gives_base() {
    let device = Default::default();
    let base = Toy::<B>::new(&device);
    let x = input::<B>(&device);
    let y0 = base.forward(x.clone());
    let mut peft = PeftModel::new(base);
    let paths = peft
        .add_adapter::<B>("default", &config(&["up", "down"]))
        .unwrap();
    assert_eq!(paths, vec!["model.mlp.up", "model.mlp.down"]);
    assert_eq!(max_rel(peft.model.forward(x.clone()), y0.clone()), 0.0);
    perturb(&mut peft);
    assert!(max_rel(peft.model.forward(x.clone()), y0.clone()) > 1e-3);
    peft.set_adapters_disabled::<B>(true).unwrap();
    assert_eq!(max_rel(peft.model.forward(x), y0), 0.0);
}

#[test]
fn merge_unmerge_and_unload_match_unmerged_forward() {
    for dora in [false, true] {
        let device = Default::default();
        let mut cfg = config(&["up", "down"]);
        cfg.use_dora = dora;
        cfg.lora_bias = !dora;
        let mut peft = PeftModel::new(Toy::<B>::new(&device));
        peft.add_adapter::<B>("default", &cfg).unwrap();
        perturb(&mut peft);
        let x = input::<B>(&device);
        let y = peft.model.forward(x.clone());
        peft.merge::<B>(true).unwrap();
        assert!(
            max_rel(peft.model.forward(x.clone()), y.clone()) < 1e-5,
            "merged, dora={dora}"
        );
        peft.unmerge::<B>().unwrap();
        assert!(
            max_rel(peft.model.forward(x.clone()), y.clone()) < 1e-5,
            "unmerged, dora={dora}"
        );
        let plain = peft.merge_and_unload::<B>(true).unwrap();
        assert!(plain.up.adapters.is_empty());
        assert!(
            max_rel(plain.forward(x), y) < 1e-5,
            "merge_and_unload, dora={dora}"
        );
    }
}

#[test]
fn safe_merge_refuses_non_finite() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter::<B>("default", &config(&["up"])).unwrap();
    let a = &mut peft.model.up.adapters[0];
    a.lora_b = burn::module::Param::from_tensor(a.lora_b.val().add_scalar(f32::INFINITY));
    let before = peft.model.up.weight.val();
    let err = peft.merge::<B>(true).unwrap_err();
    assert!(matches!(err, Error::Merge { .. }), "{err}");
    assert!(err.to_string().contains("model.mlp.up"));
    let after = peft.model.up.weight.val();
    assert_eq!((after - before).abs().max().into_scalar(), 0.0);
}

#[test]
fn several_adapters_switch_delete_and_mixed_batches() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    let x = input::<B>(&device);
    let base = peft.model.forward(x.clone());
    peft.add_adapter::<B>("a", &config(&["up"])).unwrap();
    peft.add_adapter::<B>("b", &config(&["up", "down"]))
        .unwrap();
    perturb(&mut peft);
    assert_eq!(peft.active, vec!["b"]);
    let yb = peft.model.forward(x.clone());
    peft.set_active::<B>(&["a"]).unwrap();
    let ya = peft.model.forward(x.clone());
    assert!(max_rel(ya.clone(), yb.clone()) > 1e-3);
    // Mixed batch: row 0 on "a", row 1 on the base.
    let ctx = LoraCtx {
        row_adapters: Some(vec![Some("a".into()), None]),
        ..Default::default()
    };
    let mixed = peft.model.forward_ctx(x.clone(), &ctx);
    let row = |t: Tensor<B, 3>, i: usize| t.slice([i..i + 1, 0..3, 0..6]);
    assert!(max_rel(row(mixed.clone(), 0), row(ya, 0)) < 1e-6);
    assert!(max_rel(row(mixed, 1), row(base.clone(), 1)) < 1e-6);
    assert!(matches!(
        peft.set_active::<B>(&["zzz"]),
        Err(Error::UnknownAdapter(..))
    ));
    peft.delete_adapter::<B>("a").unwrap();
    peft.delete_adapter::<B>("b").unwrap();
    assert_eq!(max_rel(peft.model.forward(x), base), 0.0);
}

#[test]
fn frozen_base_gets_no_gradient() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<AD>::new(&device));
    peft.add_adapter::<AD>("default", &config(&["up", "down"]))
        .unwrap();
    perturb(&mut peft);
    let loss = peft
        .model
        .forward(input::<AD>(&device))
        .powf_scalar(2.0)
        .mean();
    let grads = loss.backward();
    assert!(peft.model.up.weight.val().grad(&grads).is_none());
    assert!(peft
        .model
        .up
        .bias
        .as_ref()
        .unwrap()
        .val()
        .grad(&grads)
        .is_none());
    let ga = peft.model.up.adapters[0]
        .lora_a
        .val()
        .grad(&grads)
        .expect("A has a gradient");
    assert!(ga.abs().sum().into_scalar() > 0.0);
    let report = peft.trainable_parameters::<AD>();
    assert_eq!(report.trainable, (6 * 4 + 4 * 10) + (10 * 4 + 4 * 6));
    assert_eq!(report.total, report.trainable + 6 * 10 + 10 + 10 * 6);
    assert!(report
        .to_string()
        .starts_with("trainable params: 128 || all params: 258"));
}

#[test]
fn save_load_round_trip_in_peft_format() {
    let device = Default::default();
    let dir = tempdir("roundtrip");
    let mut cfg = config(&["up"]);
    cfg.use_dora = true;
    cfg.extra
        .insert("some_future_field".into(), serde_json::json!({"x": 1}));
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter::<B>("default", &cfg).unwrap();
    peft.add_adapter::<B>("other", &config(&["down"])).unwrap();
    perturb(&mut peft);
    peft.set_active::<B>(&["default"]).unwrap();
    let x = input::<B>(&device);
    let y = peft.model.forward(x.clone());
    peft.save_adapter::<B>(&dir, "default").unwrap();
    let sub = peft.save_adapter::<B>(&dir, "other").unwrap();
    assert_eq!(sub, dir.join("other"));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["some_future_field"]["x"], 1);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["use_dora"], true);
    let st = peft_lora::st::SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(st.metadata().unwrap()["format"], "pt");
    let shapes = st.shapes();
    assert_eq!(
        shapes["base_model.model.model.mlp.up.lora_A.weight"],
        vec![4, 6]
    );
    assert_eq!(
        shapes["base_model.model.model.mlp.up.lora_B.weight"],
        vec![10, 4]
    );
    assert_eq!(
        shapes["base_model.model.model.mlp.up.lora_magnitude_vector"],
        vec![10]
    );

    // A fresh copy of the same base: take the base weights of `peft`.
    let mut fresh = Toy::<B>::new(&device);
    fresh.up.weight = peft.model.up.weight.clone();
    fresh.up.bias = peft.model.up.bias.clone();
    fresh.down.weight = peft.model.down.weight.clone();
    let mut loaded = PeftModel::new(fresh);
    loaded.load_adapter::<B>(&dir, "default").unwrap();
    assert!(max_rel(loaded.model.forward(x), y) < 1e-6);
    assert!(matches!(
        loaded.load_adapter::<B>(&dir, "default"),
        Err(Error::DuplicateAdapter(_))
    ));
}

#[test]
fn loading_into_another_model_names_the_keys() {
    let device = Default::default();
    let dir = tempdir("mismatch");
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter::<B>("default", &config(&["up"])).unwrap();
    peft.save_adapter::<B>(&dir, "default").unwrap();
    // Another "base model": the up layer has a different input size.
    let mut other = Toy::<B>::new(&device);
    other.up = LoraLinear::random(7, 10, true, &device);
    let err = PeftModel::new(other)
        .load_adapter::<B>(&dir, "default")
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch { .. }), "{msg}");
    assert!(
        msg.contains("shape mismatch for base_model.model.model.mlp.up.lora_A.weight"),
        "{msg}"
    );
    // Unexpected key: the config targets only `down` now.
    let mut cfg = LoraConfig::from_file(&dir).unwrap();
    cfg.target_modules = Some(TargetModules::List(vec!["down".into()]));
    std::fs::write(dir.join("adapter_config.json"), cfg.to_json_string()).unwrap();
    let msg = PeftModel::new(Toy::<B>::new(&device))
        .load_adapter::<B>(&dir, "default")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing key base_model.model.model.mlp.down.lora_A.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected key base_model.model.model.mlp.up.lora_A.weight"),
        "{msg}"
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    assert!(bad(r#"{"r": 0}"#).contains("`r`"));
    assert!(bad(r#"{"r": "eight"}"#).contains("adapter_config.json"));
    assert!(bad(r#"{"init_lora_weights": "spiral"}"#).contains("unknown method \"spiral\""));
    assert!(bad(r#"{"use_qalora": true}"#).contains("use_qalora"));
    assert!(bad(r#"{"peft_type": "IA3"}"#).contains("LORA"));
    assert!(bad(r#"{"lora_dropout": 1.5}"#).contains("lora_dropout"));
    assert!(bad(r#"{"bias": "all"}"#).contains("bias"));
    assert!(bad(r#"{"modules_to_save": ["lm_head"]}"#).contains("modules_to_save"));
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    let err = peft
        .add_adapter::<B>("default", &config(&["nothing"]))
        .unwrap_err();
    assert!(matches!(err, Error::NoTarget(..)), "{err}");
    let err = peft
        .load_adapter::<B>(&tempdir("empty"), "default")
        .unwrap_err();
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
    // A truncated weights file.
    let dir = tempdir("truncated");
    peft.add_adapter::<B>("default", &config(&["up"])).unwrap();
    peft.save_adapter::<B>(&dir, "default").unwrap();
    let f = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = PeftModel::new(Toy::<B>::new(&device))
        .load_adapter::<B>(&dir, "default")
        .unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
}

#[test]
fn every_peft_config_shape_parses_and_round_trips() {
    let text = r#"{
      "alpha_pattern": {"o_proj": 3}, "auto_mapping": null, "base_model_name_or_path": "x",
      "bias": "none", "corda_config": null, "eva_config": null, "exclude_modules": null,
      "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
      "layer_replication": null, "layers_pattern": null, "layers_to_transform": null,
      "loftq_config": {}, "lora_alpha": 8, "lora_bias": false, "lora_dropout": 0.0,
      "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
      "peft_type": "LORA", "peft_version": "0.17.1", "qalora_group_size": 16, "r": 4,
      "rank_pattern": {"v_proj": 2}, "revision": null, "target_modules": "all-linear",
      "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
      "use_dora": false, "use_qalora": false, "use_rslora": true
    }"#;
    let cfg = LoraConfig::from_json_str(text, "t").unwrap();
    assert_eq!(
        cfg.target_modules,
        Some(TargetModules::Regex("all-linear".into()))
    );
    let back: serde_json::Value = serde_json::from_str(&cfg.to_json_string()).unwrap();
    let orig: serde_json::Value = serde_json::from_str(text).unwrap();
    // Every field of the original comes back unchanged (ours adds only nulls for known fields).
    for (k, v) in orig.as_object().unwrap() {
        assert_eq!(&back[k], v, "field {k}");
    }
    for (k, v) in back.as_object().unwrap() {
        assert!(
            orig.get(k).is_some() || v.is_null(),
            "added non-null field {k}"
        );
    }
    // Keys sorted, like PEFT's json.dumps(sort_keys=True).
    let s = cfg.to_json_string();
    assert!(s.find("\"alpha_pattern\"").unwrap() < s.find("\"use_rslora\"").unwrap());
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-lora-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn weighted_adapters_cat_and_svd_are_exact_linear_runs() {
    use peft_lora::Combination;
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter::<B>("a", &config(&["up", "down"]))
        .unwrap();
    let mut c2 = LoraConfig::new(2, 3.0, &["up", "down"]);
    c2.use_rslora = true;
    peft.add_adapter::<B>("b", &c2).unwrap();
    perturb(&mut peft);
    // The exact combined delta per layer.
    let want: Vec<Tensor<B, 2>> = peft
        .model
        .lora_linears()
        .iter()
        .map(|(_, l)| {
            l.adapter("a").unwrap().delta_weight() * 0.7
                + l.adapter("b").unwrap().delta_weight() * 0.4
        })
        .collect();
    peft.add_weighted_adapter::<B>(&["a", "b"], &[0.7, 0.4], "cat", Combination::Cat)
        .unwrap();
    peft.add_weighted_adapter::<B>(
        &["a", "b"],
        &[0.7, 0.4],
        "svd",
        Combination::Svd { rank: Some(6) },
    )
    .unwrap();
    for (i, (_, l)) in peft.model.lora_linears().iter().enumerate() {
        for name in ["cat", "svd"] {
            let got = l.adapter(name).unwrap().delta_weight();
            let scale = want[i].clone().abs().max().into_scalar();
            let err = (got - want[i].clone()).abs().max().into_scalar() / scale;
            assert!(err < 1e-5, "{name}: layer {i} rel err {err}");
        }
        assert_eq!(l.adapter("cat").unwrap().meta.r, 6);
    }
    assert_eq!(peft.configs["cat"].r, 6);
    // linear needs equal ranks; DoRA cannot combine.
    let err = peft
        .add_weighted_adapter::<B>(&["a", "b"], &[1.0, 1.0], "lin", Combination::Linear)
        .unwrap_err();
    assert!(err.to_string().contains("one rank"), "{err}");
    peft.add_weighted_adapter::<B>(&["a", "cat"], &[1.0], "bad", Combination::Cat)
        .unwrap_err();
}

/// The same base and adapter weights as aLoRA and as plain LoRA.
fn alora_and_plain() -> (PeftModel<Toy<B>>, PeftModel<Toy<B>>) {
    let toy = Toy::<B>::new(&Default::default());
    let mut al = PeftModel::new(toy.clone());
    let mut pl = PeftModel::new(toy);
    let mut cfg = config(&["up", "down"]);
    cfg.alora_invocation_tokens = Some(vec![5, 6]);
    al.add_adapter::<B>("default", &cfg).unwrap();
    pl.add_adapter::<B>("default", &config(&["up", "down"]))
        .unwrap();
    perturb(&mut al);
    for ((_, a), (_, p)) in al
        .model
        .lora_linears()
        .into_iter()
        .zip(pl.model.lora_linears_mut())
    {
        assert_eq!(a.adapters[0].meta.variant, peft_lora::VariantKind::Alora);
        p.adapters[0].lora_a = a.adapters[0].lora_a.clone();
        p.adapters[0].lora_b = a.adapters[0].lora_b.clone();
    }
    (al, pl)
}

fn max_abs(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn alora_acts_only_on_the_offset_positions_and_never_merges() {
    let device = Default::default();
    let (mut al, pl) = alora_and_plain();
    let x = input::<B>(&device); // [2, 3, 6]
    let plain = pl.model.forward(x.clone());
    let base = {
        let mut p = PeftModel::new(al.model.clone());
        p.set_adapters_disabled::<B>(true).unwrap();
        p.model.forward(x.clone())
    };
    let at =
        |t: &Tensor<B, 3>, r: usize, a: usize, z: usize| t.clone().slice([r..r + 1, a..z, 0..6]);
    let ctx = |offsets: Vec<Option<usize>>| LoraCtx {
        alora_offsets: Some(offsets),
        ..Default::default()
    };
    // No offsets at all: an aLoRA adapter contributes nothing (PEFT's "base only").
    assert_eq!(max_abs(al.model.forward(x.clone()), base.clone()), 0.0);
    // Row 0: the last 2 positions; row 1: none.
    let y = al.model.forward_ctx(x.clone(), &ctx(vec![Some(2), None]));
    assert_eq!(max_abs(at(&y, 0, 0, 1), at(&base, 0, 0, 1)), 0.0);
    assert!(max_abs(at(&y, 0, 1, 3), at(&plain, 0, 1, 3)) < 1e-6);
    assert!(max_abs(at(&plain, 0, 1, 3), at(&base, 0, 1, 3)) > 1e-3);
    assert_eq!(max_abs(at(&y, 1, 0, 3), at(&base, 1, 0, 3)), 0.0);
    // Offsets longer than the call are clipped: every position, exactly plain LoRA.
    let y = al
        .model
        .forward_ctx(x.clone(), &ctx(vec![Some(9), Some(3)]));
    assert_eq!(max_abs(y, plain.clone()), 0.0);
    // With row routing: row 0 on the base, row 1 on the adapter from its last position.
    let routed = LoraCtx {
        row_adapters: Some(vec![None, Some("default".into())]),
        alora_offsets: Some(vec![Some(3), Some(1)]),
    };
    let y = al.model.forward_ctx(x.clone(), &routed);
    assert_eq!(max_abs(at(&y, 0, 0, 3), at(&base, 0, 0, 3)), 0.0);
    assert_eq!(max_abs(at(&y, 1, 0, 2), at(&base, 1, 0, 2)), 0.0);
    assert!(max_abs(at(&y, 1, 2, 3), at(&plain, 1, 2, 3)) < 1e-6);

    // Merging is refused, for the model and for a layer, and changes nothing.
    let w = al.model.up.weight.val();
    let err = al.merge::<B>(true).unwrap_err();
    assert!(
        matches!(&err, Error::Merge { module, .. } if module == "model.mlp.up"),
        "{err}"
    );
    assert!(
        err.to_string().contains("aLoRA adapters cannot be merged"),
        "{err}"
    );
    assert!(al.model.down.merge(false, "down").is_err());
    assert_eq!(
        (al.model.up.weight.val() - w).abs().max().into_scalar(),
        0.0
    );
    assert!(al.model.up.state.merged.is_empty());
    assert!(al.merge_and_unload::<B>(false).is_err());
}

#[test]
fn alora_gradients_flow_only_from_adapted_positions() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<AD>::new(&device));
    let mut cfg = config(&["up"]);
    cfg.alora_invocation_tokens = Some(vec![1]);
    peft.add_adapter::<AD>("default", &cfg).unwrap();
    perturb(&mut peft);
    let x = input::<AD>(&device);
    let none = LoraCtx {
        alora_offsets: Some(vec![None, None]),
        ..Default::default()
    };
    let grads = peft.model.forward_ctx(x.clone(), &none).sum().backward();
    let a = &peft.model.up.adapters[0];
    let g = a.lora_b.val().grad(&grads);
    assert!(g.is_none_or(|g| g.abs().max().into_scalar() == 0.0));
    let some = LoraCtx {
        alora_offsets: Some(vec![Some(1), None]),
        ..Default::default()
    };
    let grads = peft.model.forward_ctx(x, &some).sum().backward();
    let g = a.lora_b.val().grad(&grads).expect("B gets a gradient");
    assert!(g.abs().max().into_scalar() > 0.0);
}

#[test]
fn alora_configs_are_validated_and_combine_only_alike() {
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    for json in [
        r#"{"alora_invocation_tokens": []}"#,
        r#"{"alora_invocation_tokens": [1, -2]}"#,
        r#"{"alora_invocation_tokens": [1, 2.5]}"#,
        r#"{"alora_invocation_tokens": "abc"}"#,
        r#"{"alora_invocation_tokens": [4294967296]}"#,
    ] {
        let msg = bad(json);
        assert!(
            msg.contains("`alora_invocation_tokens`") && msg.contains("adapter_config.json"),
            "{json}: {msg}"
        );
    }
    assert!(bad(r#"{"alora_invocation_tokens": [1, -2]}"#).contains("-2"));
    assert!(bad(r#"{"alora_invocation_tokens": [3], "use_dora": true}"#).contains("use_dora"));
    let ok = LoraConfig::from_json_str(r#"{"alora_invocation_tokens": [3, 4]}"#, "x").unwrap();
    assert_eq!(ok.alora_invocation_tokens, Some(vec![3, 4]));
    assert!(
        LoraConfig::from_json_str(r#"{"alora_invocation_tokens": null}"#, "x")
            .unwrap()
            .alora_invocation_tokens
            .is_none()
    );
    // An empty list built in code is refused by add_adapter too.
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    let mut empty = config(&["up"]);
    empty.alora_invocation_tokens = Some(vec![]);
    let err = peft.add_adapter::<B>("e", &empty).unwrap_err();
    assert!(err.to_string().contains("alora_invocation_tokens"), "{err}");

    // add_weighted_adapter: aLoRA only with aLoRA of the same invocation; the result is aLoRA.
    use peft_lora::Combination;
    let mut a1 = config(&["up"]);
    a1.alora_invocation_tokens = Some(vec![7]);
    let mut a2 = a1.clone();
    a2.alora_invocation_tokens = Some(vec![8]);
    peft.add_adapter::<B>("a1", &a1).unwrap();
    peft.add_adapter::<B>("a1b", &a1).unwrap();
    peft.add_adapter::<B>("a2", &a2).unwrap();
    peft.add_adapter::<B>("p", &config(&["up"])).unwrap();
    for pair in [["a1", "p"], ["p", "a1"], ["a1", "a2"]] {
        let err = peft
            .add_weighted_adapter::<B>(&pair, &[1.0, 1.0], "w", Combination::Cat)
            .unwrap_err();
        assert!(err.to_string().contains("alora_invocation_tokens"), "{err}");
    }
    peft.add_weighted_adapter::<B>(&["a1", "a1b"], &[1.0, 0.5], "w", Combination::Cat)
        .unwrap();
    let w = peft.model.up.adapter("w").unwrap();
    assert_eq!(w.meta.variant, peft_lora::VariantKind::Alora);
    assert_eq!(w.meta.alora_invocation_tokens, Some(vec![7]));
}
