//! Behaviour of `peft-lora` on a toy two-layer model (no Llama): init, merge, DoRA, adapters,
//! the PEFT file format, and bad input. Parity with Python PEFT lives in the workspace's
//! `tests/parity.rs`, which has the Llama model.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use peft_lora::{
    Error, LoraConfig, LoraCtx, LoraLinear, LoraModel, Nf4Tensor, PeftModel, TargetModules,
};
use test_support::{fresh_temp_dir, max_abs_diff, max_rel};

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

/// [`Toy`]'s layers without aLoRA offsets (the default `supports_alora`).
#[derive(Module, Debug)]
struct Plain<B: Backend> {
    up: LoraLinear<B>,
    down: LoraLinear<B>,
}

impl<B: Backend> Plain<B> {
    fn new(device: &B::Device) -> Self {
        let t = Toy::new(device);
        Plain {
            up: t.up,
            down: t.down,
        }
    }
}

impl<B: Backend> LoraModel<B> for Plain<B> {
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
    /// The aLoRA tests pass the offsets through `forward_ctx` themselves.
    fn supports_alora(&self) -> bool {
        true
    }
}

fn input<B: Backend>(device: &B::Device) -> Tensor<B, 3> {
    Tensor::random([2, 3, 6], Distribution::Normal(0.0, 1.0), device)
}

/// Gives every B a non-zero value so the adapter matters.
fn perturb<B: Backend>(m: &mut PeftModel<B, Toy<B>>) {
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
        .add_adapter("default", &config(&["up", "down"]))
        .unwrap();
    assert_eq!(paths, vec!["model.mlp.up", "model.mlp.down"]);
    assert_eq!(max_rel(peft.model.forward(x.clone()), y0.clone()), 0.0);
    perturb(&mut peft);
    assert!(max_rel(peft.model.forward(x.clone()), y0.clone()) > 1e-3);
    peft.set_adapters_disabled(true).unwrap();
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
        peft.add_adapter("default", &cfg).unwrap();
        perturb(&mut peft);
        let x = input::<B>(&device);
        let y = peft.model.forward(x.clone());
        peft.merge(true).unwrap();
        assert!(
            max_rel(peft.model.forward(x.clone()), y.clone()) < 1e-5,
            "merged, dora={dora}"
        );
        peft.unmerge().unwrap();
        assert!(
            max_rel(peft.model.forward(x.clone()), y.clone()) < 1e-5,
            "unmerged, dora={dora}"
        );
        let plain = peft.merge_and_unload(true).unwrap();
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
    peft.add_adapter("default", &config(&["up"])).unwrap();
    let a = &mut peft.model.up.adapters[0];
    a.lora_b = burn::module::Param::from_tensor(a.lora_b.val().add_scalar(f32::INFINITY));
    let before = peft.model.up.weight.val();
    let err = peft.merge(true).unwrap_err();
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
    peft.add_adapter("a", &config(&["up"])).unwrap();
    peft.add_adapter("b", &config(&["up", "down"])).unwrap();
    perturb(&mut peft);
    // Adding does not activate (PEFT): "a", the first adapter, still runs.
    assert_eq!(peft.active, vec!["a"]);
    peft.set_active(&["b"]).unwrap();
    let yb = peft.model.forward(x.clone());
    peft.set_active(&["a"]).unwrap();
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
        peft.set_active(&["zzz"]),
        Err(Error::UnknownAdapter(..))
    ));
    peft.delete_adapter("a").unwrap();
    peft.delete_adapter("b").unwrap();
    assert_eq!(max_rel(peft.model.forward(x), base), 0.0);
}

#[test]
fn frozen_base_gets_no_gradient() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<AD>::new(&device));
    peft.add_adapter("default", &config(&["up", "down"]))
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
    let report = peft.trainable_parameters();
    assert_eq!(report.trainable, (6 * 4 + 4 * 10) + (10 * 4 + 4 * 6));
    assert_eq!(report.total, report.trainable + 6 * 10 + 10 + 10 * 6);
    assert!(report
        .to_string()
        .starts_with("trainable params: 128 || all params: 258"));
}

#[test]
fn save_load_round_trip_in_peft_format() {
    let device = Default::default();
    let dir = fresh_temp_dir("peft-lora-test", "roundtrip");
    let mut cfg = config(&["up"]);
    cfg.use_dora = true;
    cfg.extra
        .insert("some_future_field".into(), serde_json::json!({"x": 1}));
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter("default", &cfg).unwrap();
    peft.add_adapter("other", &config(&["down"])).unwrap();
    perturb(&mut peft);
    peft.set_active(&["default"]).unwrap();
    let x = input::<B>(&device);
    let y = peft.model.forward(x.clone());
    peft.save_adapter(&dir, "default").unwrap();
    let sub = peft.save_adapter(&dir, "other").unwrap();
    assert_eq!(sub, dir.join("other"));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["some_future_field"]["x"], 1);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["use_dora"], true);
    let st = peft_lora::SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
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
    loaded.load_adapter(&dir, "default").unwrap();
    assert!(max_rel(loaded.model.forward(x), y) < 1e-6);
    assert!(matches!(
        loaded.load_adapter(&dir, "default"),
        Err(Error::DuplicateAdapter(_))
    ));
}

#[test]
fn loading_into_another_model_names_the_keys() {
    let device = Default::default();
    let dir = fresh_temp_dir("peft-lora-test", "mismatch");
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter("default", &config(&["up"])).unwrap();
    peft.save_adapter(&dir, "default").unwrap();
    // Another "base model": the up layer has a different input size.
    let mut other = Toy::<B>::new(&device);
    other.up = LoraLinear::random(7, 10, true, &device);
    let err = PeftModel::new(other)
        .load_adapter(&dir, "default")
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
        .load_adapter(&dir, "default")
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
    assert!(bad(r#"{"modules_to_save": [""]}"#).contains("modules_to_save"));
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    let err = peft
        .add_adapter("default", &config(&["nothing"]))
        .unwrap_err();
    assert!(matches!(err, Error::NoTarget(..)), "{err}");
    let err = peft
        .load_adapter(&fresh_temp_dir("peft-lora-test", "empty"), "default")
        .unwrap_err();
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
    // A truncated weights file.
    let dir = fresh_temp_dir("peft-lora-test", "truncated");
    peft.add_adapter("default", &config(&["up"])).unwrap();
    peft.save_adapter(&dir, "default").unwrap();
    let f = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = PeftModel::new(Toy::<B>::new(&device))
        .load_adapter(&dir, "default")
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

#[test]
fn weighted_adapters_cat_and_svd_are_exact_linear_runs() {
    use peft_lora::Combination;
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    peft.add_adapter("a", &config(&["up", "down"])).unwrap();
    let mut c2 = LoraConfig::new(2, 3.0, &["up", "down"]);
    c2.use_rslora = true;
    peft.add_adapter("b", &c2).unwrap();
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
    peft.add_weighted_adapter(&["a", "b"], &[0.7, 0.4], "cat", Combination::Cat)
        .unwrap();
    peft.add_weighted_adapter(
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
        .add_weighted_adapter(&["a", "b"], &[1.0, 1.0], "lin", Combination::Linear)
        .unwrap_err();
    assert!(err.to_string().contains("one rank"), "{err}");
    peft.add_weighted_adapter(&["a", "cat"], &[1.0], "bad", Combination::Cat)
        .unwrap_err();
}

fn host_pt(w: Tensor<B, 2>) -> Vec<f32> {
    // Burn [in, out] -> PyTorch [out, in], row-major.
    w.transpose().into_data().to_vec::<f32>().unwrap()
}

#[test]
fn nf4_base_forward_is_the_dequantized_matmul_and_stays_4bit() {
    let device = Default::default();
    let dense = LoraLinear::<B>::random(128, 96, true, &device);
    let mut q = dense.clone();
    q.quantize_nf4("m").unwrap();
    assert!(q.is_nf4() && (q.d_in(), q.d_out()) == (128, 96));
    assert_eq!(q.weight.dims(), [1, 1], "the dense weight is dropped");
    let nf4 = q.nf4.as_ref().unwrap();
    assert_eq!(nf4.packed.val().dtype(), burn::tensor::DType::U8);
    assert_eq!(nf4.storage_bytes(), 128 * 96 / 2 + 4 * 128 * 96 / 64);
    // The device copy holds exactly the host quantization, and dequantizes to the same values.
    let host = Nf4Tensor::quantize(&host_pt(dense.weight.val()), [96, 128]);
    assert_eq!(nf4.to_host(), host);
    assert_eq!(host_pt(q.base_weight()), host.dequantize());
    let w_dq = Tensor::<B, 2>::from_data(TensorData::new(host.dequantize(), [96, 128]), &device)
        .transpose();
    let x = Tensor::<B, 3>::random([2, 3, 128], Distribution::Normal(0.0, 1.0), &device);
    let bias = dense
        .bias
        .as_ref()
        .unwrap()
        .val()
        .unsqueeze_dim::<2>(0)
        .unsqueeze_dim::<3>(0);
    let want = x.clone().matmul(w_dq.unsqueeze_dim::<3>(0)) + bias;
    let got = q.forward(x.clone());
    assert!(max_rel(got.clone(), want) < 1e-6);
    // ... and differs from the dense layer by NF4's rounding only.
    let err = max_rel(got, dense.forward(x));
    assert!(err > 1e-4 && err < 0.2, "NF4 vs dense rel err {err}");
}

#[test]
fn nf4_base_trains_adapters_and_merges_by_requantizing() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<AD>::new(&device));
    for (p, l) in peft.model.lora_linears_mut() {
        l.quantize_nf4(&p).unwrap();
    }
    peft.add_adapter("default", &config(&["up", "down"]))
        .unwrap();
    perturb(&mut peft);
    let x = input::<AD>(&device);
    let loss = peft.model.forward(x.clone()).powf_scalar(2.0).sum();
    let grads = loss.backward();
    let up = &peft.model.up;
    assert!(up.adapters[0].lora_a.val().grad(&grads).is_some());
    assert!(up.nf4.as_ref().unwrap().absmax.val().grad(&grads).is_none());

    // Merge = dequantize, add, quantize again (PEFT on a bitsandbytes 4-bit layer).
    let before = peft.model.up.base_weight().inner();
    let delta = peft.model.up.adapters[0].delta_weight().inner();
    peft.merge(false).unwrap();
    let merged = peft.model.up.nf4.as_ref().unwrap().to_host();
    assert_eq!(
        merged,
        Nf4Tensor::quantize(&host_pt(before + delta), [10, 6])
    );
    assert!(peft.model.up.is_nf4() && peft.model.up.weight.dims() == [1, 1]);
    // Quantizing a layer with merged adapters is refused.
    let mut dense = Toy::<AD>::new(&device);
    dense.up.state.merged.push("x".into());
    let err = dense.up.quantize_nf4("model.mlp.up").unwrap_err();
    assert!(err.to_string().contains("model.mlp.up"), "{err}");
}

#[test]
fn loftq_config_is_required_and_validated() {
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    let lq = |cfg: &str| format!(r#"{{"init_lora_weights": "loftq", "loftq_config": {cfg}}}"#);
    assert!(bad(r#"{"init_lora_weights": "loftq"}"#).contains("`loftq_config`"));
    assert!(bad(&lq("{}")).contains("must be given"));
    let e = bad(&lq(r#"{"loftq_bits": 2, "loftq_iter": 1}"#));
    assert!(e.contains("loftq_bits") && e.contains("2 bits"), "{e}");
    let e = bad(&lq(r#"{"loftq_bits": 8, "loftq_iter": 1}"#));
    assert!(
        e.contains("loftq_bits") && e.contains("not implemented"),
        "{e}"
    );
    let e = bad(&lq(r#"{"loftq_bits": 4, "loftq_iter": 0}"#));
    assert!(e.contains("loftq_iter") && e.contains("at least 1"), "{e}");
    assert!(bad(&lq(r#"{"loftq_bit": 4}"#)).contains("unknown key `loftq_bit`"));
    assert!(bad(&lq(r#"{"loftq_iter": -1}"#)).contains("non-negative integer"));
    let ok = LoraConfig::from_json_str(&lq(r#"{"loftq_bits": 4, "loftq_iter": 3}"#), "x").unwrap();
    assert_eq!(
        ok.loftq_config.unwrap(),
        peft_lora::LoftQConfig {
            loftq_bits: 4,
            loftq_iter: 3
        }
    );
    assert!(ok.to_json_string().contains("\"loftq_iter\": 3"));
}

#[test]
fn loftq_quantizes_the_base_and_beats_plain_nf4() {
    let device = Default::default();
    let fro = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let base = Toy::<B>::new(&device);
    let w_up = host_pt(base.up.weight.val());
    let nf4_err = {
        let dq = Nf4Tensor::quantize(&w_up, [10, 6]).dequantize();
        fro(&w_up.iter().zip(&dq).map(|(a, b)| a - b).collect::<Vec<_>>())
    };
    // (The error need not fall at every iteration on a matrix this small: the NF4 scales move
    // with the residual. `tests/parity/loftq.rs` checks the fall on PEFT's cases.)
    for iter in 1..=4 {
        let mut cfg = LoraConfig::new(4, 4.0, &["up", "down"]);
        cfg.init_lora_weights = peft_lora::InitLoraWeights::LoftQ;
        cfg.loftq_config = Some(peft_lora::LoftQConfig {
            loftq_bits: 4,
            loftq_iter: iter,
        });
        let mut peft = PeftModel::new(base.clone());
        peft.add_adapter("default", &cfg).unwrap();
        let up = &peft.model.up;
        assert!(up.is_nf4() && peft.model.down.is_nf4());
        // Scaling 1 (alpha = r): the initial model approximates W.
        let approx = host_pt(up.base_weight() + up.adapters[0].delta_weight());
        let err = fro(&w_up
            .iter()
            .zip(&approx)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>());
        assert!(
            err < 0.9 * nf4_err,
            "iter {iter}: LoftQ {err} vs NF4 {nf4_err}"
        );
    }
    // An NF4 base cannot be LoftQ'd again, and a rank above min(out, in) is refused.
    let mut cfg = LoraConfig::new(4, 4.0, &["up"]);
    cfg.init_lora_weights = peft_lora::InitLoraWeights::LoftQ;
    cfg.loftq_config = Some(peft_lora::LoftQConfig::default());
    let mut peft = PeftModel::new(base.clone());
    peft.model.up.quantize_nf4("up").unwrap();
    let e = peft.add_adapter("default", &cfg).unwrap_err();
    assert!(e.to_string().contains("already stored in NF4"), "{e}");
    cfg.r = 7;
    let e = PeftModel::new(base)
        .add_adapter("default", &cfg)
        .unwrap_err();
    assert!(e.to_string().contains("rank 7 exceeds"), "{e}");
}

/// PiSSA / OLoRA on a 4-bit base (PEFT: dequantize, decompose, quantize the residual again):
/// the base stays in NF4 and the initial model approximates the dequantized base up to the
/// residual's own rounding, instead of adding the principal part twice.
#[test]
fn pissa_and_olora_on_an_nf4_base_requantize_the_residual() {
    let device = Default::default();
    let fro = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    for init in ["pissa", "olora"] {
        let mut peft = PeftModel::new(Toy::<B>::new(&device));
        peft.model.up.quantize_nf4("up").unwrap();
        let w_deq = host_pt(peft.model.up.base_weight());
        peft.add_adapter("default", &with_init(&["up"], 4, init))
            .unwrap();
        let up = &peft.model.up;
        assert!(up.is_nf4(), "{init}: the base must stay in NF4");
        let delta = host_pt(up.adapters[0].delta_weight());
        let approx = host_pt(up.base_weight() + up.adapters[0].delta_weight());
        let err = fro(&diff(&w_deq, &approx));
        let moved = fro(&delta);
        // Without the requantized residual the error would be |sBA| itself; with it, it is the
        // rounding of the residual (about a tenth of its norm). Weights are random per run.
        assert!(
            moved > 0.3 * fro(&w_deq) && err < 0.35 * moved,
            "{init}: |W - (Q(res) + sBA)| = {err}, |sBA| = {moved}, |W| = {}",
            fro(&w_deq)
        );
    }
}

fn with_init(targets: &[&str], r: usize, init: &str) -> LoraConfig {
    let mut c = LoraConfig::new(r, 8.0, targets);
    c.init_lora_weights = init.parse().unwrap();
    c
}

#[test]
fn orthogonal_init_starts_at_the_base_and_needs_an_even_rank() {
    let device = Default::default();
    let base = Toy::<B>::new(&device);
    let x = input::<B>(&device);
    let y0 = base.forward(x.clone());
    let mut peft = PeftModel::new(base);
    peft.add_adapter("default", &with_init(&["up", "down"], 4, "orthogonal"))
        .unwrap();
    for (_, l) in peft.model.lora_linears() {
        let a = l.adapter("default").unwrap();
        // B A = 0 although neither is zero: A's and B's row spaces come from orthogonal rows.
        let ab = a
            .lora_a
            .val()
            .matmul(a.lora_b.val())
            .abs()
            .max()
            .into_scalar();
        assert!(ab < 1e-6, "A B = {ab}");
        assert!(a.lora_a.val().abs().max().into_scalar() > 1e-3);
        assert!(a.lora_b.val().abs().max().into_scalar() > 1e-3);
    }
    assert!(max_rel(peft.model.forward(x), y0) < 1e-6);
    let err = PeftModel::new(Toy::<B>::new(&device))
        .add_adapter("default", &with_init(&["up"], 3, "orthogonal"))
        .unwrap_err();
    assert!(err.to_string().contains("even rank"), "{err}");
}

#[test]
fn pissa_and_olora_keep_the_output_and_check_their_input() {
    let device = Default::default();
    let base = Toy::<B>::new(&device);
    let x = input::<B>(&device);
    let y0 = base.forward(x.clone());
    for init in ["pissa", "pissa_niter_2", "olora"] {
        let mut peft = PeftModel::new(Toy::<B>::new(&device));
        peft.model = Toy {
            up: LoraLinear::from_weight(
                base.up.weight.val(),
                base.up.bias.as_ref().map(|b| b.val()),
            ),
            down: LoraLinear::from_weight(base.down.weight.val(), None),
        };
        peft.add_adapter("default", &with_init(&["up", "down"], 4, init))
            .unwrap();
        assert!(
            max_rel(peft.model.forward(x.clone()), y0.clone()) < 1e-5,
            "{init}"
        );
        // The residual really changed: the principal part moved into the adapter.
        let w = peft.model.up.weight.val();
        assert!(
            (w - base.up.weight.val()).abs().max().into_scalar() > 1e-2,
            "{init}"
        );
    }
    // r larger than min(in, out) = 6.
    let err = PeftModel::new(Toy::<B>::new(&device))
        .add_adapter("default", &with_init(&["up"], 8, "pissa"))
        .unwrap_err();
    assert!(err.to_string().contains("r <= min(in, out) = 6"), "{err}");
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    assert!(bad(r#"{"init_lora_weights": "pissa_niter_x"}"#).contains("pissa_niter_<number"));
    assert!(bad(r#"{"init_lora_weights": "eva", "eva_config": {"rho": 0.5}}"#).contains("rho"));
}

/// A toy stack with an embedding, for `layer_replication` and `trainable_token_indices`.
#[derive(Module, Debug)]
struct Stack<B: Backend> {
    embed: peft_lora::TrainableTokens<B>,
    layers: Vec<LoraLinear<B>>,
}

impl<B: Backend> Stack<B> {
    fn new(device: &B::Device) -> Self {
        Stack {
            embed: peft_lora::TrainableTokens::from_weight(Tensor::random(
                [12, 6],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            layers: (0..3)
                .map(|_| LoraLinear::random(6, 6, false, device))
                .collect(),
        }
    }
    fn forward(&self, ids: Tensor<B, 2, burn::tensor::Int>) -> Tensor<B, 2> {
        let [b, s] = ids.dims();
        let mut x = self.embed.forward(ids);
        for l in &self.layers {
            x = x.clone() + l.forward(x).tanh();
        }
        self.embed.project(x.reshape([b * s, 6]))
    }
}

impl<B: Backend> LoraModel<B> for Stack<B> {
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let p = |i| format!("model.layers.{i}.proj");
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (p(i), l))
            .collect()
    }
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let p = |i| format!("model.layers.{i}.proj");
        self.layers
            .iter_mut()
            .enumerate()
            .map(|(i, l)| (p(i), l))
            .collect()
    }
    fn token_tables(&self) -> Vec<(String, &peft_lora::TrainableTokens<B>)> {
        vec![("model.embed".into(), &self.embed)]
    }
    fn token_tables_mut(&mut self) -> Vec<(String, &mut peft_lora::TrainableTokens<B>)> {
        vec![("model.embed".into(), &mut self.embed)]
    }
    fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> peft_lora::Result<()> {
        let map = peft_lora::layer_map(ranges, self.layers.len())?;
        self.layers = map.iter().map(|&i| self.layers[i].clone()).collect();
        Ok(())
    }
}

fn ids<B: Backend>(device: &B::Device) -> Tensor<B, 2, burn::tensor::Int> {
    Tensor::from_data(
        burn::tensor::TensorData::new(vec![1i64, 5, 5, 7, 0, 11, 3, 5], [2, 4]),
        device,
    )
}

#[test]
fn layer_replication_errors_name_the_field_and_range() {
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    let e = bad(r#"{"layer_replication": []}"#);
    assert!(
        e.contains("layer_replication") && e.contains("empty list"),
        "{e}"
    );
    let e = bad(r#"{"layer_replication": [[0, 2], [2, 2]]}"#);
    assert!(
        e.contains("layer_replication") && e.contains("[2, 2]"),
        "{e}"
    );
    let e = bad(r#"{"layer_replication": [[3, 1]]}"#);
    assert!(e.contains("[3, 1]"), "{e}");
    let e = bad(r#"{"layer_replication": [[0, 1]], "init_lora_weights": "pissa"}"#);
    assert!(
        e.contains("layer_replication") && e.contains("pissa"),
        "{e}"
    );
    let e = peft_lora::layer_map(&[[0, 2], [1, 5]], 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer_replication") && e.contains("[1, 5]") && e.contains("3 layers"),
        "{e}"
    );
    assert_eq!(
        peft_lora::layer_map(&[[0, 4], [2, 5]], 5).unwrap(),
        vec![0, 1, 2, 3, 2, 3, 4]
    );
    // A model without the hook refuses; out-of-range layers are caught before anything changes.
    let device = Default::default();
    let mut cfg = config(&["up"]);
    cfg.layer_replication = Some(vec![[0, 1]]);
    let e = PeftModel::new(Toy::<B>::new(&device))
        .add_adapter("default", &cfg)
        .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported { .. }) && e.to_string().contains("replicate_layers"),
        "{e}"
    );
    let mut peft = PeftModel::new(Stack::<B>::new(&device));
    let mut cfg = config(&["proj"]);
    cfg.layer_replication = Some(vec![[0, 4]]);
    let e = peft.add_adapter("default", &cfg).unwrap_err().to_string();
    assert!(e.contains("[0, 4]") && e.contains("3 layers"), "{e}");
    assert_eq!(peft.model.layers.len(), 3);
}

#[test]
fn replicated_layers_share_base_weights_and_own_adapters() {
    let device = Default::default();
    let base = Stack::<B>::new(&device);
    let mut peft = PeftModel::new(base.clone());
    let base_total = peft.model.num_params();
    let mut cfg = config(&["proj"]);
    cfg.layer_replication = Some(vec![[0, 2], [1, 3]]);
    let adapted = peft.add_adapter("default", &cfg).unwrap();
    assert_eq!(adapted.len(), 4);
    assert_eq!(adapted[3], "model.layers.3.proj");
    let l = &peft.model.layers;
    assert_eq!(l[1].weight.id, l[2].weight.id);
    assert_ne!(l[1].adapters[0].lora_a.id, l[2].adapters[0].lora_a.id);
    // Shared weights count once; each copy's adapter counts.
    let report = peft.trainable_parameters();
    assert_eq!(report.trainable, 4 * (6 * 4 + 4 * 6));
    assert_eq!(report.total, base_total + report.trainable);
    perturb_stack(&mut peft);
    let want = peft.model.forward(ids(&device));
    assert!(peft
        .merge(false)
        .unwrap_err()
        .to_string()
        .contains("replicated"));

    // Save, load on a fresh copy of the base: replicated again, same output.
    let dir = fresh_temp_dir("peft-lora-test", "replicated");
    peft.save_adapter(&dir, "default").unwrap();
    let mut again = PeftModel::new(base.clone());
    again.load_adapter(&dir, "default").unwrap();
    assert_eq!(again.model.layers.len(), 4);
    assert!(max_rel(again.model.forward(ids(&device)), want) < 1e-6);
    // The same ranges again reuse the stack; other ranges or a late replication are refused.
    again.load_adapter(&dir, "second").unwrap();
    assert_eq!(again.model.layers.len(), 4);
    let mut other = config(&["proj"]);
    other.layer_replication = Some(vec![[0, 1]]);
    let e = again.add_adapter("third", &other).unwrap_err().to_string();
    assert!(e.contains("differs"), "{e}");
    let mut plain = PeftModel::new(Stack::<B>::new(&device));
    plain.add_adapter("a", &config(&["proj"])).unwrap();
    let e = plain.add_adapter("b", &cfg).unwrap_err().to_string();
    assert!(e.contains("before any adapter"), "{e}");
}

fn perturb_stack<B: Backend>(m: &mut PeftModel<B, Stack<B>>) {
    for (_, layer) in m.model.lora_linears_mut() {
        for a in &mut layer.adapters {
            let (shape, device) = (a.lora_b.shape(), a.lora_b.device());
            a.lora_b = burn::module::Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.3),
                &device,
            ));
        }
    }
    for (_, t) in m.model.token_tables_mut() {
        for a in &mut t.adapters {
            let (shape, device) = (a.delta.shape(), a.delta.device());
            a.delta = burn::module::Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 1.0),
                &device,
            ));
        }
    }
}

#[test]
fn trainable_tokens_replace_rows_train_only_them_and_merge_exactly() {
    let device = Default::default();
    let mut peft = PeftModel::new(Stack::<AD>::new(&device));
    let base_out = peft.model.forward(ids(&device));
    let mut cfg = config(&["proj"]);
    cfg.trainable_token_indices = Some(serde_json::json!([5, 9, 11]));
    peft.add_adapter("default", &cfg).unwrap();
    // Rows start as the table's own: the model is unchanged.
    let err = (peft.model.forward(ids(&device)) - base_out.clone())
        .abs()
        .max()
        .into_scalar();
    assert!(err < 1e-6, "{err}");
    perturb_stack(&mut peft);
    let table = &peft.model.embed;
    // The lookup and the tied projection equal those of the table with rows written in.
    let view = table.weight_view();
    let flat = ids::<AD>(&device).reshape([8]);
    let got = table.forward(ids(&device)).reshape([8, 6]);
    assert_eq!(
        (got - view.clone().select(0, flat))
            .abs()
            .max()
            .into_scalar(),
        0.0
    );
    let x = Tensor::<AD, 2>::random([5, 6], Distribution::Normal(0.0, 1.0), &device);
    let err = (table.project(x.clone()) - x.matmul(view.transpose()))
        .abs()
        .max()
        .into_scalar();
    assert!(err < 1e-5, "{err}");

    // Gradients: only the rows, and a listed id absent from the input (9) still gets one
    // through the tied projection.
    let grads = peft
        .model
        .forward(ids(&device))
        .powf_scalar(2.0)
        .sum()
        .backward();
    assert!(peft.model.embed.weight.val().grad(&grads).is_none());
    let g = peft.model.embed.adapters[0]
        .delta
        .val()
        .grad(&grads)
        .unwrap();
    assert_eq!(g.dims(), [3, 6]);
    assert!(g.abs().sum_dim(1).min().into_scalar() > 0.0);

    // Merge writes the rows exactly; unmerge restores the table exactly.
    let mut peft = PeftModel::new(Stack::<B>::new(&device));
    peft.add_adapter("default", &cfg).unwrap();
    perturb_stack(&mut peft);
    let before = peft.model.embed.weight.val();
    let want = peft.model.forward(ids(&device));
    peft.merge(true).unwrap();
    let merged = peft.model.embed.weight.val();
    let rows = peft.model.embed.adapters[0].delta.val();
    let idx = Tensor::from_data(
        burn::tensor::TensorData::new(vec![5i64, 9, 11], [3]),
        &device,
    );
    assert_eq!(
        (merged.select(0, idx) - rows).abs().max().into_scalar(),
        0.0
    );
    assert!(max_rel(peft.model.forward(ids(&device)), want.clone()) < 1e-6);
    peft.unmerge().unwrap();
    assert_eq!(
        (peft.model.embed.weight.val() - before)
            .abs()
            .max()
            .into_scalar(),
        0.0
    );
    // Disabled: the base model.
    peft.set_adapters_disabled(true).unwrap();
    assert!(max_rel(peft.model.forward(ids(&device)), want) > 1e-3);
}

#[test]
fn trainable_token_errors_name_the_field_and_id() {
    let bad = |json: &str| {
        LoraConfig::from_json_str(json, "adapter_config.json")
            .unwrap_err()
            .to_string()
    };
    for (json, needle) in [
        (r#"{"trainable_token_indices": [1, -2]}"#, "-2"),
        (r#"{"trainable_token_indices": []}"#, "no token id"),
        (
            r#"{"trainable_token_indices": "embed"}"#,
            "list of token ids",
        ),
        (r#"{"trainable_token_indices": {"embed": [1.5]}}"#, "1.5"),
    ] {
        let e = bad(json);
        assert!(
            e.contains("trainable_token_indices") && e.contains(needle),
            "{e}"
        );
    }
    let device = Default::default();
    let add = |v: serde_json::Value| {
        let mut cfg = config(&["proj"]);
        cfg.trainable_token_indices = Some(v);
        PeftModel::new(Stack::<B>::new(&device))
            .add_adapter("default", &cfg)
            .unwrap_err()
            .to_string()
    };
    let e = add(serde_json::json!([3, 12]));
    assert!(
        e.contains("trainable_token_indices") && e.contains("12") && e.contains("12 rows"),
        "{e}"
    );
    let e = add(serde_json::json!([3, 3]));
    assert!(e.contains("listed twice"), "{e}");
    let e = add(serde_json::json!({"lm_head": [3]}));
    assert!(e.contains("`lm_head`") && e.contains("model.embed"), "{e}");
    let e = PeftModel::new(Toy::<B>::new(&device))
        .add_adapter("default", &{
            let mut c = config(&["up"]);
            c.trainable_token_indices = Some(serde_json::json!([1]));
            c
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no input embedding"), "{e}");
    // Two active adapters may not train the same id.
    let mut peft = PeftModel::new(Stack::<B>::new(&device));
    let mut a = config(&["proj"]);
    a.trainable_token_indices = Some(serde_json::json!({"embed": [1, 2]}));
    peft.add_adapter("a", &a).unwrap();
    a.trainable_token_indices = Some(serde_json::json!([2, 4]));
    peft.add_adapter("b", &a).unwrap();
    let e = peft.set_active(&["a", "b"]).unwrap_err().to_string();
    assert!(e.contains("token 2"), "{e}");
    a.trainable_token_indices = Some(serde_json::json!([3, 4]));
    peft.add_adapter("c", &a).unwrap();
    peft.set_active(&["a", "c"]).unwrap();
}

/// The same base and adapter weights as aLoRA and as plain LoRA.
fn alora_and_plain() -> (PeftModel<B, Toy<B>>, PeftModel<B, Toy<B>>) {
    let toy = Toy::<B>::new(&Default::default());
    let mut al = PeftModel::new(toy.clone());
    let mut pl = PeftModel::new(toy);
    let mut cfg = config(&["up", "down"]);
    cfg.alora_invocation_tokens = Some(vec![5, 6]);
    al.add_adapter("default", &cfg).unwrap();
    pl.add_adapter("default", &config(&["up", "down"])).unwrap();
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

#[test]
fn alora_acts_only_on_the_offset_positions_and_never_merges() {
    let device = Default::default();
    let (mut al, pl) = alora_and_plain();
    let x = input::<B>(&device); // [2, 3, 6]
    let plain = pl.model.forward(x.clone());
    let base = {
        let mut p = PeftModel::new(al.model.clone());
        p.set_adapters_disabled(true).unwrap();
        p.model.forward(x.clone())
    };
    let at =
        |t: &Tensor<B, 3>, r: usize, a: usize, z: usize| t.clone().slice([r..r + 1, a..z, 0..6]);
    let ctx = |offsets: Vec<Option<usize>>| LoraCtx {
        alora_offsets: Some(offsets),
        ..Default::default()
    };
    // No offsets at all: an aLoRA adapter contributes nothing (PEFT's "base only").
    assert_eq!(max_abs_diff(al.model.forward(x.clone()), base.clone()), 0.0);
    // Row 0: the last 2 positions; row 1: none.
    let y = al.model.forward_ctx(x.clone(), &ctx(vec![Some(2), None]));
    assert_eq!(max_abs_diff(at(&y, 0, 0, 1), at(&base, 0, 0, 1)), 0.0);
    assert!(max_abs_diff(at(&y, 0, 1, 3), at(&plain, 0, 1, 3)) < 1e-6);
    assert!(max_abs_diff(at(&plain, 0, 1, 3), at(&base, 0, 1, 3)) > 1e-3);
    assert_eq!(max_abs_diff(at(&y, 1, 0, 3), at(&base, 1, 0, 3)), 0.0);
    // Offsets longer than the call are clipped: every position, exactly plain LoRA.
    let y = al
        .model
        .forward_ctx(x.clone(), &ctx(vec![Some(9), Some(3)]));
    assert_eq!(max_abs_diff(y, plain.clone()), 0.0);
    // With row routing: row 0 on the base, row 1 on the adapter from its last position.
    let routed = LoraCtx {
        row_adapters: Some(vec![None, Some("default".into())]),
        alora_offsets: Some(vec![Some(3), Some(1)]),
    };
    let y = al.model.forward_ctx(x.clone(), &routed);
    assert_eq!(max_abs_diff(at(&y, 0, 0, 3), at(&base, 0, 0, 3)), 0.0);
    assert_eq!(max_abs_diff(at(&y, 1, 0, 2), at(&base, 1, 0, 2)), 0.0);
    assert!(max_abs_diff(at(&y, 1, 2, 3), at(&plain, 1, 2, 3)) < 1e-6);

    // Merging is refused, for the model and for a layer, and changes nothing.
    let w = al.model.up.weight.val();
    let err = al.merge(true).unwrap_err();
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
    assert!(al.merge_and_unload(false).is_err());
}

#[test]
fn alora_gradients_flow_only_from_adapted_positions() {
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<AD>::new(&device));
    let mut cfg = config(&["up"]);
    cfg.alora_invocation_tokens = Some(vec![1]);
    peft.add_adapter("default", &cfg).unwrap();
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
    // A model that does not supply aLoRA offsets refuses an aLoRA adapter, added or loaded,
    // instead of never running it.
    let device = Default::default();
    let mut stack = PeftModel::new(Stack::<B>::new(&device));
    let mut al = LoraConfig::new(2, 4.0, &["proj"]);
    al.alora_invocation_tokens = Some(vec![3]);
    let err = stack.add_adapter("al", &al).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("supports_alora"), "{err}");
    assert!(stack.configs.is_empty());
    let mut toy = PeftModel::new(Toy::<B>::new(&device));
    let mut al = config(&["up"]);
    al.alora_invocation_tokens = Some(vec![3]);
    toy.add_adapter("default", &al).unwrap();
    let dir = fresh_temp_dir("peft-lora-test", "alora-guard");
    toy.save_adapter(&dir, "default").unwrap();
    let mut plain = PeftModel::new(Plain::<B>::new(&device));
    let err = plain.load_adapter(&dir, "default").unwrap_err();
    assert!(err.to_string().contains("supports_alora"), "{err}");

    // An empty list built in code is refused by add_adapter too.
    let device = Default::default();
    let mut peft = PeftModel::new(Toy::<B>::new(&device));
    let mut empty = config(&["up"]);
    empty.alora_invocation_tokens = Some(vec![]);
    let err = peft.add_adapter("e", &empty).unwrap_err();
    assert!(err.to_string().contains("alora_invocation_tokens"), "{err}");

    // add_weighted_adapter: aLoRA only with aLoRA of the same invocation; the result is aLoRA.
    use peft_lora::Combination;
    let mut a1 = config(&["up"]);
    a1.alora_invocation_tokens = Some(vec![7]);
    let mut a2 = a1.clone();
    a2.alora_invocation_tokens = Some(vec![8]);
    peft.add_adapter("a1", &a1).unwrap();
    peft.add_adapter("a1b", &a1).unwrap();
    peft.add_adapter("a2", &a2).unwrap();
    peft.add_adapter("p", &config(&["up"])).unwrap();
    for pair in [["a1", "p"], ["p", "a1"], ["a1", "a2"]] {
        let err = peft
            .add_weighted_adapter(&pair, &[1.0, 1.0], "w", Combination::Cat)
            .unwrap_err();
        assert!(err.to_string().contains("alora_invocation_tokens"), "{err}");
    }
    peft.add_weighted_adapter(&["a1", "a1b"], &[1.0, 0.5], "w", Combination::Cat)
        .unwrap();
    let w = peft.model.up.adapter("w").unwrap();
    assert_eq!(w.meta.variant, peft_lora::VariantKind::Alora);
    assert_eq!(w.meta.alora_invocation_tokens, Some(vec![7]));
}
