//! Parity with Python PEFT on the committed fixtures (`scripts/make_fixtures.py`,
//! `scripts/make_optimizer_fixtures.py`): a PEFT adapter loaded here gives PEFT's logits, loss,
//! gradients, merged weights and merged logits; the adapter optimizers take PEFT's steps; and an
//! adapter saved here has PEFT's keys, shapes and config (Python loads it: `scripts/check_rust_adapters.py`).

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use llama::LlamaForCausalLM;
use peft_lora::SafetensorsFile;
use peft_lora::{
    AdamWConfig, GradAccumulator, LoraCtx, LoraModel, LoraOptimizer, OptimizerKind, PeftModel,
};
use sft_trainer::{Batch, CausalLm};
use test_support::st::{float, int};
use test_support::{host, masked, max_rel};

#[path = "parity/eva.rs"]
mod eva;
#[path = "parity/init.rs"]
mod init;
#[path = "parity/structural.rs"]
mod structural;

type B = NdArray<f32>;
type AD = Autodiff<B>;

const PEFT_CASES: &[&str] = &[
    "lora_qv",
    "all_linear_rslora",
    "dora_attn",
    "regex_target",
    "layers_exclude",
];

fn fixtures() -> PathBuf {
    test_support::fixtures_dir()
}

fn base_of(case: &str) -> PathBuf {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft").join(case).join("meta.json")).unwrap(),
    )
    .unwrap();
    fixtures()
        .join("llama")
        .join(meta["base"].as_str().unwrap())
}

fn load_base<BK: Backend>(dir: &Path) -> LlamaForCausalLM<BK> {
    let files =
        llama::resolve(&llama::ModelSource::Local(dir.to_path_buf())).expect("fixture model files");
    LlamaForCausalLM::load(&files, &Default::default()).expect("fixture model loads")
}

fn batch<BK: Backend>(st: &SafetensorsFile) -> Batch<BK> {
    Batch {
        input_ids: int(st, "input_ids"),
        attention_mask: int(st, "attention_mask"),
        labels: int(st, "labels"),
        n_label_tokens: 0,
        n_tokens: 0,
    }
}

fn logits<BK: Backend>(m: &LlamaForCausalLM<BK>, b: &Batch<BK>) -> Tensor<BK, 3> {
    m.forward(
        b.input_ids.clone(),
        Some(b.attention_mask.clone()),
        &LoraCtx::default(),
    )
}

trait E {
    fn elem(self) -> f32;
}
impl<T: burn::tensor::Element> E for T {
    fn elem(self) -> f32 {
        burn::tensor::ElementConversion::elem::<f32>(self)
    }
}

#[test]
fn peft_adapters_match_logits_loss_and_merged_model() {
    for case in PEFT_CASES {
        let dir = fixtures().join("peft").join(case);
        let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        let b = batch::<B>(&exp);
        let mut peft = PeftModel::new(load_base::<B>(&base_of(case)));
        peft.load_adapter(&dir.join("adapter"), "default")
            .unwrap_or_else(|e| panic!("{case}: {e}"));

        let l = logits(&peft.model, &b);
        let err = max_rel(
            masked(l, &b.attention_mask),
            masked(float(&exp, "logits"), &b.attention_mask),
        );
        assert!(err <= 1e-4, "{case}: logits rel err {err}");
        let loss: f32 = peft.model.causal_lm_loss(&b).into_scalar().elem();
        let want: f32 = float::<B, 1>(&exp, "loss").into_scalar().elem();
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{case}: loss {loss} vs {want}"
        );

        // Per-layer merged weights, then the merged model's logits.
        let deltas = SafetensorsFile::open(&dir.join("delta.safetensors")).unwrap();
        peft.merge(true).unwrap();
        for (path, layer) in peft.model.lora_linears() {
            let key = format!("{path}.weight");
            if deltas.contains(&key) {
                let want: Tensor<B, 2> = float(&deltas, &key);
                let err = max_rel(layer.weight.val().transpose(), want);
                assert!(err <= 1e-5, "{case}: merged {key} rel err {err}");
            }
        }
        let l = logits(&peft.model, &b);
        let err = max_rel(
            masked(l, &b.attention_mask),
            masked(float(&exp, "merged_logits"), &b.attention_mask),
        );
        assert!(err <= 1e-4, "{case}: merged logits rel err {err}");
    }
}

#[test]
fn peft_adapters_match_gradients() {
    for case in PEFT_CASES {
        let dir = fixtures().join("peft").join(case);
        let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
        let b = batch::<AD>(&exp);
        let mut peft = PeftModel::new(load_base::<AD>(&base_of(case)));
        peft.load_adapter(&dir.join("adapter"), "default").unwrap();
        let grads = peft.model.causal_lm_loss(&b).backward();
        let mut checked = 0;
        for (path, layer) in peft.model.lora_linears() {
            for a in &layer.adapters {
                let key = format!("grad.base_model.model.{path}");
                let pairs: Vec<(String, Option<Tensor<B, 2>>)> = vec![
                    (
                        format!("{key}.lora_A.weight"),
                        a.lora_a.val().grad(&grads).map(|g| g.transpose()),
                    ),
                    (
                        format!("{key}.lora_B.weight"),
                        a.lora_b.val().grad(&grads).map(|g| g.transpose()),
                    ),
                    (
                        format!("{key}.lora_magnitude_vector"),
                        a.magnitude
                            .as_ref()
                            .and_then(|m| m.val().grad(&grads))
                            .map(|g| g.unsqueeze_dim(0)),
                    ),
                ];
                for (k, got) in pairs {
                    if !exp.contains(&k) {
                        continue;
                    }
                    let got = got.unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
                    let want = exp.read(&k).unwrap();
                    let want: Tensor<B, 2> = if want.shape.len() == 1 {
                        let n = want.shape[0];
                        Tensor::from_data(TensorData::new(want.data, [1, n]), &Default::default())
                    } else {
                        want.to_tensor(&k, &Default::default()).unwrap()
                    };
                    let err = max_rel(got, want);
                    assert!(err <= 1e-3, "{case}: {k} rel err {err}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 0, "{case}: no gradient compared");
    }
}

#[test]
fn optimizers_take_pefts_steps() {
    let dir = fixtures().join("peft").join("lora_qv");
    let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    for (kind, opt_kind, eps) in [
        ("adamw", OptimizerKind::AdamW, 1e-8),
        (
            "loraplus",
            OptimizerKind::LoraPlus {
                lr_ratio: 16.0,
                weight_decay: 0.01,
            },
            1e-8,
        ),
        ("lorafa", OptimizerKind::LoraFa, 1e-6),
    ] {
        let want =
            SafetensorsFile::open(&fixtures().join("optim").join(format!("{kind}.safetensors")))
                .unwrap();
        let b = batch::<AD>(&exp);
        let mut peft = PeftModel::new(load_base::<AD>(&base_of("lora_qv")));
        peft.load_adapter(&dir.join("adapter"), "default").unwrap();
        let cfg = AdamWConfig {
            eps,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = LoraOptimizer::<AD>::new(opt_kind, cfg);
        opt.prepare(&mut peft.model);
        for _ in 0..2 {
            let grads = peft.model.causal_lm_loss(&b).backward();
            let mut acc = GradAccumulator::<AD>::default();
            acc.add(&peft.model, &grads);
            opt.step(&mut peft.model, acc, 1e-3, None);
        }
        let got = peft_lora::adapter_state_dict(&peft.model, "default");
        for (k, t) in got {
            let w = want.read(&k).unwrap();
            let rel = host::max_rel(&t.data, &w.data);
            assert!(rel <= 1e-4, "{kind}: {k} rel err {rel}");
        }
    }
}

#[test]
fn saved_adapter_has_pefts_keys_shapes_and_config() {
    for case in PEFT_CASES {
        let dir = fixtures().join("peft").join(case);
        let mut peft = PeftModel::new(load_base::<B>(&base_of(case)));
        peft.load_adapter(&dir.join("adapter"), "default").unwrap();
        let out = std::env::temp_dir().join(format!("parity-save-{}-{case}", std::process::id()));
        peft.save_adapter(&out, "default").unwrap();
        let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
        let theirs =
            SafetensorsFile::open(&dir.join("adapter").join("adapter_model.safetensors")).unwrap();
        assert_eq!(ours.shapes(), theirs.shapes(), "{case}");
        for k in theirs.shapes().keys() {
            assert_eq!(
                ours.read(k).unwrap().data,
                theirs.read(k).unwrap().data,
                "{case}: {k}"
            );
        }
        let a: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let b: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter").join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for (k, v) in b.as_object().unwrap() {
            assert_eq!(&a[k], v, "{case}: config field {k}");
        }
        // Keep a copy where scripts/check_rust_adapters.py can find it.
        if let Ok(export) = std::env::var("RUST_ADAPTER_EXPORT") {
            let dst = Path::new(&export).join(case);
            std::fs::create_dir_all(&dst).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(out.join(f), dst.join(f)).unwrap();
            }
        }
    }
}

#[path = "parity/alora.rs"]
mod alora;
#[path = "parity/loftq.rs"]
mod loftq;
