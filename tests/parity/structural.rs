//! `layer_replication`, `trainable_token_indices` and `modules_to_save` against Python PEFT
//! (`scripts/fixtures_structural.py`, fixtures under `fixtures/structural/`): PEFT-saved adapters
//! load here with PEFT's logits, loss, gradients, cached generation, parameter counts, merged
//! model (which keeps the trained copy of a `modules_to_save` module) and AdamW steps, and
//! adapters saved here have PEFT's keys, shapes, values and config
//! (`scripts/check_rust_adapters.py --suite structural` loads them in Python).

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use llama::{GenerationConfig, LlamaForCausalLM};
use peft_lora::SafetensorsFile;
use peft_lora::{
    AdamWConfig, GradAccumulator, LoraCtx, LoraModel, LoraOptimizer, OptimizerKind, PeftModel,
};
use sft_trainer::CausalLm;

use super::{batch, fixtures, float, load_base, logits, AD, B, E};
use test_support::st::i64s;
use test_support::{host, masked, max_rel};

const REPLICATION: &[&str] = &["replicate_qv", "replicate_reorder"];
const TOKENS: &[&str] = &["tokens_untied", "tokens_tied"];
/// `modules_to_save`: the untied head, and the input embedding.
const SAVED: &[&str] = &["save_lm_head", "save_embed"];

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("structural").join(case)
}

fn meta(case: &str) -> serde_json::Value {
    let path = case_dir(case).join("meta.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (made by scripts/fixtures_structural.py --only {case})",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn base(case: &str) -> PathBuf {
    fixtures()
        .join("llama")
        .join(meta(case)["base"].as_str().unwrap())
}

fn expected(case: &str) -> SafetensorsFile {
    SafetensorsFile::open(&case_dir(case).join("expected.safetensors")).unwrap()
}

fn loaded<BK: burn::tensor::backend::Backend>(case: &str) -> PeftModel<BK, LlamaForCausalLM<BK>> {
    let mut peft = PeftModel::new(load_base::<BK>(&base(case)));
    peft.load_adapter(&case_dir(case).join("adapter"), "default")
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    peft
}

/// A fixture tensor as `[rows, cols]` (1-D tensors as one row).
fn host2(st: &SafetensorsFile, k: &str) -> Tensor<B, 2> {
    let t = st.read(k).unwrap_or_else(|e| panic!("{k}: {e}"));
    let (r, c) = match t.shape.as_slice() {
        [r, c] => (*r, *c),
        [n] => (1, *n),
        s => panic!("{k}: rank {}", s.len()),
    };
    Tensor::from_data(TensorData::new(t.data, [r, c]), &Default::default())
}

/// Address of an NdArray tensor's data: equal for two handles to the same storage.
fn storage_ptr(t: Tensor<B, 2>) -> usize {
    match t.into_primitive().tensor() {
        burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().as_ptr() as usize,
        _ => panic!("expected an f32 tensor"),
    }
}

fn check_logits_and_loss(case: &str, peft: &PeftModel<B, LlamaForCausalLM<B>>) -> (f32, f32) {
    let exp = expected(case);
    let b = batch::<B>(&exp);
    let err = max_rel(
        masked(logits(&peft.model, &b), &b.attention_mask),
        masked(float(&exp, "logits"), &b.attention_mask),
    );
    assert!(err <= 1e-4, "{case}: logits rel err {err}");
    let loss: f32 = peft.model.causal_lm_loss(&b).into_scalar().elem();
    let want: f32 = float::<B, 1>(&exp, "loss").into_scalar().elem();
    let loss_err = (loss - want).abs() / want.abs();
    assert!(loss_err <= 1e-5, "{case}: loss {loss} vs {want}");
    (err, loss_err)
}

/// Every `grad.<key>` of the fixture against the autodiff gradient of the same tensor.
fn check_gradients(case: &str) -> f32 {
    let exp = expected(case);
    let peft = loaded::<AD>(case);
    let grads = peft.model.causal_lm_loss(&batch::<AD>(&exp)).backward();
    let mut got: Vec<(String, Option<Tensor<B, 2>>)> = Vec::new();
    for (path, layer) in peft.model.lora_linears() {
        let key = format!("grad.base_model.model.{path}");
        for a in &layer.adapters {
            got.push((
                format!("{key}.lora_A.weight"),
                a.lora_a.val().grad(&grads).map(|g| g.transpose()),
            ));
            got.push((
                format!("{key}.lora_B.weight"),
                a.lora_b.val().grad(&grads).map(|g| g.transpose()),
            ));
        }
    }
    for (path, table) in peft.model.token_tables() {
        // Only the listed rows (or the copy) train: the frozen table has no gradient at all.
        assert!(table.weight.val().grad(&grads).is_none(), "{case}: {path}");
        for a in &table.adapters {
            got.push((
                format!("grad.{}", peft_lora::token_delta_key(&path)),
                a.delta.val().grad(&grads),
            ));
        }
        for c in &table.saved.copies {
            let (key, _) = peft_lora::saved_module_keys(&path);
            got.push((format!("grad.{key}"), c.weight.val().grad(&grads)));
        }
    }
    for (path, head) in peft.model.head_linears() {
        // The original head stays frozen; its copy trains (PyTorch layout `[out, in]`).
        assert!(head.weight.val().grad(&grads).is_none(), "{case}: {path}");
        for c in &head.saved.copies {
            let (key, _) = peft_lora::saved_module_keys(&path);
            let g = c.weight.val().grad(&grads).map(|g| g.transpose());
            got.push((format!("grad.{key}"), g));
        }
    }
    let want_keys: Vec<String> = exp
        .shapes()
        .into_keys()
        .filter(|k| k.starts_with("grad."))
        .collect();
    assert_eq!(got.len(), want_keys.len(), "{case}: trainable tensors");
    let mut worst = 0f32;
    for (k, g) in got {
        assert!(want_keys.contains(&k), "{case}: no reference gradient {k}");
        let g = g.unwrap_or_else(|| panic!("{case}: no gradient for {k}"));
        let err = max_rel(g, host2(&exp, &k));
        assert!(err <= 1e-3, "{case}: {k} rel err {err}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn replicated_layers_match_peft_logits_gradients_and_generation() {
    for case in REPLICATION {
        let m = meta(case);
        let peft = loaded::<B>(case);
        let n = m["num_layers"].as_u64().unwrap() as usize;
        assert_eq!(peft.model.model.layers.len(), n, "{case}");
        assert_eq!(peft.model.config.num_layers, n, "{case}");
        // Each copy has its own adapter under its new path, as PEFT saved them.
        let adapted: Vec<String> = peft
            .model
            .lora_linears()
            .into_iter()
            .filter(|(_, l)| !l.adapters.is_empty())
            .map(|(p, _)| p)
            .collect();
        assert_eq!(adapted.len() * 2, m["saved_keys"].as_array().unwrap().len());
        let report = peft.trainable_parameters();
        assert_eq!(
            report.trainable as u64,
            m["nb_params"]["trainable"].as_u64().unwrap()
        );
        assert_eq!(
            report.total as u64,
            m["nb_params"]["total"].as_u64().unwrap()
        );

        let (err, loss_err) = check_logits_and_loss(case, &peft);
        let grad_err = check_gradients(case);

        // Greedy generation with the KV cache: one cache slot per new layer position.
        let exp = expected(case);
        let (ps, pv) = i64s(&exp, "gen_prompt_ids");
        let (_, mv) = i64s(&exp, "gen_prompt_mask");
        let (gs, gv) = i64s(&exp, "gen_greedy_ids");
        let prompts: Vec<Vec<u32>> = (0..ps[0])
            .map(|r| {
                (0..ps[1])
                    .filter(|&i| mv[r * ps[1] + i] == 1)
                    .map(|i| pv[r * ps[1] + i] as u32)
                    .collect()
            })
            .collect();
        let cfg = GenerationConfig::greedy(gs[1] - ps[1], vec![]);
        let out = peft
            .model
            .generate(&prompts, &cfg, &LoraCtx::default(), &mut |_, _| {})
            .unwrap();
        for (r, row) in out.iter().enumerate() {
            let want: Vec<u32> = gv[r * gs[1] + ps[1]..(r + 1) * gs[1]]
                .iter()
                .map(|&t| t as u32)
                .collect();
            assert_eq!(row, &want, "{case}: greedy tokens of row {r}");
        }
        eprintln!(
            "{case}: {n} layers, logits rel err {err:.2e}, loss rel err {loss_err:.2e}, \
             gradients max rel err {grad_err:.2e}, generation equal"
        );
    }
}

#[test]
fn replicated_copies_share_frozen_weights_and_refuse_merge() {
    let mut peft = loaded::<B>("replicate_qv");
    let layers = &peft.model.model.layers;
    // Layers 1 and 2 are both original layer 1: same frozen parameters, own adapters.
    let (q1, q2) = (&layers[1].self_attn.q_proj, &layers[2].self_attn.q_proj);
    assert_eq!(q1.weight.id, q2.weight.id);
    assert_eq!(
        storage_ptr(q1.weight.val()),
        storage_ptr(q2.weight.val()),
        "replicated frozen weights must share storage"
    );
    assert_ne!(
        storage_ptr(layers[0].self_attn.q_proj.weight.val()),
        storage_ptr(q1.weight.val())
    );
    assert_ne!(q1.adapters[0].lora_a.id, q2.adapters[0].lora_a.id);
    let (a1, a2) = (q1.adapters[0].lora_a.val(), q2.adapters[0].lora_a.val());
    assert!(
        max_rel(a1, a2) > 1e-2,
        "copies must carry different adapters"
    );

    let err = peft.merge(true).unwrap_err().to_string();
    assert!(err.contains("layer_replication"), "{err}");
    let err = peft.merge_and_unload(false).unwrap_err().to_string();
    assert!(err.contains("replicated"), "{err}");
}

#[test]
fn trainable_tokens_match_peft_logits_gradients_and_merge() {
    for case in TOKENS {
        let m = meta(case);
        let ids: Vec<usize> = m["token_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut peft = loaded::<B>(case);
        let report = peft.trainable_parameters();
        assert_eq!(
            report.trainable as u64,
            m["nb_params"]["trainable"].as_u64().unwrap()
        );
        assert_eq!(
            report.total as u64,
            m["nb_params"]["total"].as_u64().unwrap()
        );
        let (err, loss_err) = check_logits_and_loss(case, &peft);
        let grad_err = check_gradients(case);

        // Disabled adapters: the base model, whose listed rows differ from the adapter's.
        let exp = expected(case);
        let b = batch::<B>(&exp);
        peft.set_adapters_disabled(true).unwrap();
        let base_l = logits(&peft.model, &b);
        assert!(max_rel(base_l, float(&exp, "logits")) > 1e-2, "{case}");
        peft.set_adapters_disabled(false).unwrap();

        // Merge writes the rows into the table (and the tied head); unmerge restores it.
        let before = peft.model.model.embed_tokens.weight.val();
        peft.merge(true).unwrap();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &Default::default(),
        );
        let rows = peft.model.model.embed_tokens.weight.val().select(0, idx);
        let rows_err = max_rel(rows, float(&exp, "merged_embed_rows"));
        assert!(rows_err == 0.0, "{case}: merged rows rel err {rows_err}");
        let merged_err = max_rel(
            masked(logits(&peft.model, &b), &b.attention_mask),
            masked(float(&exp, "merged_logits"), &b.attention_mask),
        );
        assert!(
            merged_err <= 1e-4,
            "{case}: merged logits rel err {merged_err}"
        );
        peft.unmerge().unwrap();
        let restored = peft.model.model.embed_tokens.weight.val();
        assert_eq!(max_rel(restored, before), 0.0, "{case}: unmerge");
        eprintln!(
            "{case}: logits rel err {err:.2e}, loss rel err {loss_err:.2e}, gradients max rel \
             err {grad_err:.2e}, merged logits rel err {merged_err:.2e}"
        );
    }
}

#[test]
fn trainable_tokens_take_torch_adamw_steps() {
    for case in TOKENS {
        let exp = expected(case);
        let m = meta(case);
        let (lr, wd) = (
            m["adamw"]["lr"].as_f64().unwrap(),
            m["adamw"]["weight_decay"].as_f64().unwrap(),
        );
        let mut peft = loaded::<AD>(case);
        let b = batch::<AD>(&exp);
        let cfg = AdamWConfig {
            weight_decay: wd,
            ..Default::default()
        };
        let mut opt = LoraOptimizer::<AD>::new(OptimizerKind::AdamW, cfg);
        for _ in 0..m["adamw"]["steps"].as_u64().unwrap() {
            let grads = peft.model.causal_lm_loss(&b).backward();
            let mut acc = GradAccumulator::<AD>::default();
            acc.add(&peft.model, &grads);
            opt.step(&mut peft.model, acc, lr, None);
        }
        let got = peft_lora::adapter_state_dict(&peft.model, "default");
        let mut worst = 0f32;
        for (k, t) in &got {
            let w = exp.read(&format!("adamw.{k}")).unwrap();
            let rel = host::max_rel(&t.data, &w.data);
            assert!(rel <= 1e-4, "{case}: {k} rel err {rel}");
            worst = worst.max(rel);
        }
        assert!(got.keys().any(|k| k.ends_with("trainable_tokens_delta")));
        eprintln!("{case}: two AdamW steps, max rel err {worst:.2e}");
    }
}

#[test]
fn modules_to_save_match_peft_logits_gradients_and_merge() {
    for case in SAVED {
        let m = meta(case);
        let mut peft = loaded::<B>(case);
        let report = peft.trainable_parameters();
        assert_eq!(
            report.trainable as u64,
            m["nb_params"]["trainable"].as_u64().unwrap(),
            "{case}: trainable parameters"
        );
        assert_eq!(
            report.total as u64,
            m["nb_params"]["total"].as_u64().unwrap(),
            "{case}: all parameters"
        );
        let saved: Vec<String> = peft_lora::adapter_state_dict(&peft.model, "default")
            .into_keys()
            .collect();
        let want: Vec<String> = m["saved_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(saved, want, "{case}: saved keys");
        let (err, loss_err) = check_logits_and_loss(case, &peft);
        let grad_err = check_gradients(case);

        // Disabled adapters: the frozen original runs, not the copy.
        let exp = expected(case);
        let b = batch::<B>(&exp);
        peft.set_adapters_disabled(true).unwrap();
        let base_l = logits(&peft.model, &b);
        assert!(max_rel(base_l, float(&exp, "logits")) > 1e-2, "{case}");
        peft.set_adapters_disabled(false).unwrap();

        // merge_and_unload keeps the copy as the module's weights.
        let merged = peft.merge_and_unload(true).unwrap();
        let merged_err = max_rel(
            masked(logits(&merged, &b), &b.attention_mask),
            masked(float(&exp, "merged_logits"), &b.attention_mask),
        );
        assert!(
            merged_err <= 1e-4,
            "{case}: merged logits rel err {merged_err}"
        );
        assert!(merged.lm_head.iter().all(|h| h.saved.copies.is_empty()));
        assert!(merged.model.embed_tokens.saved.copies.is_empty());
        eprintln!(
            "{case}: logits rel err {err:.2e}, loss rel err {loss_err:.2e}, gradients max rel \
             err {grad_err:.2e}, merged logits rel err {merged_err:.2e}"
        );
    }
}

#[test]
fn structural_adapters_save_as_peft_does() {
    for case in REPLICATION.iter().chain(TOKENS) {
        check_saved_as_peft(case);
    }
}

#[test]
fn modules_to_save_adapters_save_as_peft_does() {
    for case in SAVED {
        check_saved_as_peft(case);
    }
}

/// Saved here: PEFT's keys, shapes, values and config; loaded again here, the same logits;
/// exported for `scripts/check_rust_adapters.py` when `RUST_ADAPTER_EXPORT` is set.
fn check_saved_as_peft(case: &str) {
    {
        let dir = case_dir(case);
        let peft = loaded::<B>(case);
        let out =
            std::env::temp_dir().join(format!("parity-structural-{}-{case}", std::process::id()));
        peft.save_adapter(&out, "default").unwrap();
        let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
        let theirs = SafetensorsFile::open(&dir.join("adapter/adapter_model.safetensors")).unwrap();
        assert_eq!(ours.shapes(), theirs.shapes(), "{case}");
        for k in theirs.shapes().keys() {
            assert_eq!(
                ours.read(k).unwrap().data,
                theirs.read(k).unwrap().data,
                "{case}: {k}"
            );
        }
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (a, b) = (read(&out), read(&dir.join("adapter")));
        for (k, v) in b.as_object().unwrap() {
            assert_eq!(&a[k], v, "{case}: config field {k}");
        }
        // Loaded again here: the same replicated stack and rows.
        let mut again = PeftModel::new(load_base::<B>(&base(case)));
        again.load_adapter(&out, "default").unwrap();
        let exp = expected(case);
        let bt = batch::<B>(&exp);
        let err = max_rel(logits(&again.model, &bt), logits(&peft.model, &bt));
        assert!(err == 0.0, "{case}: reloaded logits rel err {err}");
        if let Ok(export) = std::env::var("RUST_ADAPTER_EXPORT") {
            let dst = Path::new(&export).join(case);
            std::fs::create_dir_all(&dst).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(out.join(f), dst.join(f)).unwrap();
            }
        }
    }
}
