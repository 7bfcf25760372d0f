//! PiSSA (full and randomized), OLoRA and the PiSSA/OLoRA -> LoRA conversion against PEFT
//! (fixtures from `scripts/fixtures_init.py`).

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::Tensor;
use peft_lora::SafetensorsFile;
use peft_lora::{LoraConfig, LoraModel, PeftModel};

use super::{batch, fixtures, float, load_base, logits, B};
use test_support::{masked, max_rel};

const DECOMPOSED: &[&str] = &["pissa", "olora_rslora"];

struct Case {
    dir: PathBuf,
    base: PathBuf,
    config: LoraConfig,
    meta: serde_json::Value,
    exp: SafetensorsFile,
}

fn case(name: &str) -> Case {
    let dir = fixtures().join("init").join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let base = fixtures()
        .join("llama")
        .join(meta["base"].as_str().unwrap());
    let config: LoraConfig = serde_json::from_value(meta["lora_config"].clone()).unwrap();
    let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    Case {
        dir,
        base,
        config,
        meta,
        exp,
    }
}

/// Frobenius norm of a host matrix difference, relative to `scale`.
fn fro(a: Tensor<B, 2>) -> f32 {
    a.powf_scalar(2.0).sum().sqrt().into_scalar()
}

fn logits_err(m: &llama::LlamaForCausalLM<B>, c: &Case, key: &str) -> f32 {
    let b = batch::<B>(&c.exp);
    max_rel(
        masked(logits(m, &b), &b.attention_mask),
        masked(float(&c.exp, key), &b.attention_mask),
    )
}

#[test]
fn init_pissa_and_olora_match_peft_residual_delta_and_logits() {
    for name in DECOMPOSED {
        let c = case(name);
        let mut peft = PeftModel::new(load_base::<B>(&c.base));
        let adapted = peft.add_adapter("default", &c.config).unwrap();
        assert_eq!(adapted.len(), c.meta["modules"].as_object().unwrap().len());
        for (path, layer) in peft.model.lora_linears() {
            if !adapted.contains(&path) {
                continue;
            }
            let want: Tensor<B, 2> = float(&c.exp, &format!("residual.{path}"));
            let err = max_rel(layer.weight.val().transpose(), want);
            assert!(err <= 1e-4, "{name}: residual {path} rel err {err}");
            // Singular vectors have a sign freedom: compare s * B A, not A and B.
            let want: Tensor<B, 2> = float(&c.exp, &format!("delta.{path}"));
            let delta = layer.adapter("default").unwrap().delta_weight().transpose();
            let err = max_rel(delta, want);
            assert!(err <= 1e-4, "{name}: delta {path} rel err {err}");
        }
        let err = logits_err(&peft.model, &c, "logits_base");
        assert!(err <= 1e-4, "{name}: logits after init vs base: {err}");
    }
}

#[test]
fn init_pissa_niter_is_as_good_as_pefts_randomized_svd() {
    let c = case("pissa_niter");
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 0);
    let original = load_base::<B>(&c.base);
    let mut peft = PeftModel::new(load_base::<B>(&c.base));
    let adapted = peft.add_adapter("default", &c.config).unwrap();
    let before = original.lora_linears();
    for (path, layer) in peft.model.lora_linears() {
        if !adapted.contains(&path) {
            continue;
        }
        let w = before
            .iter()
            .find(|(p, _)| *p == path)
            .unwrap()
            .1
            .weight
            .val();
        let delta = layer.adapter("default").unwrap().delta_weight();
        // Residual + adapter = W exactly (up to f32 rounding).
        let err = max_rel(layer.weight.val() + delta.clone(), w.clone());
        assert!(err <= 1e-5, "{path}: W_res + sBA != W ({err})");
        // The low-rank part approximates W as well as PEFT's svd_lowrank did.
        let ours = fro(w.clone() - delta) / fro(w.clone());
        let peft_err = c.meta["checks"][format!("niter_err.{path}")]
            .as_f64()
            .unwrap() as f32;
        let exact = c.meta["checks"][format!("exact_err.{path}")]
            .as_f64()
            .unwrap() as f32;
        // Randomized: both are a little above the optimum; ours stays within a small multiple
        // of PEFT's excess (the sketch is seeded, so this is deterministic).
        assert!(
            ours / exact - 1.0 <= 2.5 * (peft_err / exact - 1.0) + 0.005,
            "{path}: ||W - sBA||/||W|| = {ours}, PEFT {peft_err}, exact SVD {exact}"
        );
        assert!(
            ours >= exact - 1e-4,
            "{path}: better than the exact SVD? {ours} < {exact}"
        );
    }
}

#[test]
fn init_trained_and_converted_peft_adapters_load_onto_the_original_base() {
    for name in DECOMPOSED {
        let c = case(name);
        for form in ["trained", "converted"] {
            let mut peft = PeftModel::new(load_base::<B>(&c.base));
            peft.load_adapter(&c.dir.join(form), "default")
                .unwrap_or_else(|e| panic!("{name}/{form}: {e}"));
            let err = logits_err(&peft.model, &c, "logits_trained");
            assert!(err <= 1e-4, "{name}/{form}: logits rel err {err}");
        }
    }
}

/// Sets every adapter's A and B to the tensors of a PEFT adapter file (PyTorch layout).
fn set_adapter_from(peft: &mut PeftModel<B, llama::LlamaForCausalLM<B>>, file: &Path) {
    let st = SafetensorsFile::open(file).unwrap();
    for (path, layer) in peft.model.lora_linears_mut() {
        let Some(ad) = layer.adapter_mut("default") else {
            continue;
        };
        let key = format!("base_model.model.{path}");
        let a: Tensor<B, 2> = float(&st, &format!("{key}.lora_A.weight"));
        let b: Tensor<B, 2> = float(&st, &format!("{key}.lora_B.weight"));
        ad.lora_a = Param::from_tensor(a.transpose());
        ad.lora_b = Param::from_tensor(b.transpose());
    }
}

#[test]
fn init_converted_save_applies_to_the_original_base() {
    for name in DECOMPOSED {
        let c = case(name);
        let tmp = std::env::temp_dir().join(format!("parity-init-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let mut peft = PeftModel::new(load_base::<B>(&c.base));
        peft.add_adapter("default", &c.config).unwrap();
        let initial = peft.save_adapter(&tmp.join("initial"), "default").unwrap();
        // "Train": take PEFT's trained A and B. Our residual equals PEFT's (sign-free), so the
        // model must now be PEFT's trained model.
        set_adapter_from(
            &mut peft,
            &c.dir.join("trained").join("adapter_model.safetensors"),
        );
        let err = logits_err(&peft.model, &c, "logits_trained");
        assert!(err <= 1e-4, "{name}: trained logits rel err {err}");

        let out = peft
            .save_adapter_converted(&tmp.join("converted"), "default", &initial)
            .unwrap();
        let mut fresh = PeftModel::new(load_base::<B>(&c.base));
        fresh.load_adapter(&out, "default").unwrap();
        let err = logits_err(&fresh.model, &c, "logits_trained");
        assert!(
            err <= 1e-4,
            "{name}: converted adapter on the original base: {err}"
        );

        // Same config as PEFT's converted adapter, and the initial folder now says `true`.
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(c.dir.join("converted").join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for k in [
            "r",
            "lora_alpha",
            "init_lora_weights",
            "use_rslora",
            "rank_pattern",
        ] {
            let (a, b) = (&ours[k], &theirs[k]);
            let same = match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * y.abs().max(1.0),
                _ => a == b,
            };
            assert!(same, "{name}: converted config {k}: ours {a}, PEFT {b}");
        }
        let init_cfg = std::fs::read_to_string(initial.join("adapter_config.json")).unwrap();
        assert!(
            init_cfg.contains("\"init_lora_weights\": true"),
            "{init_cfg}"
        );
        if let Ok(export) = std::env::var("RUST_ADAPTER_EXPORT") {
            let dst = Path::new(&export).join(name);
            std::fs::create_dir_all(&dst).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(out.join(f), dst.join(f)).unwrap();
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
