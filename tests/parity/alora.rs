//! aLoRA parity with PEFT 0.21.2 (`scripts/fixtures_alora.py`, `fixtures/alora/`): offsets,
//! logits (base before the invocation, PEFT's after), loss and gradients, generation with a KV
//! cache, reuse of a base-model prefix cache, save / load, and the refused merge.

use std::path::PathBuf;

use burn::tensor::{backend::Backend, Tensor};
use llama::{GenerationConfig, LlamaForCausalLM};
use peft_lora::SafetensorsFile;
use peft_lora::{Error, LoraCtx, LoraModel, PeftModel};
use sft_trainer::CausalLm;

use super::{batch, fixtures, float, load_base, AD, B, E};
use test_support::st::i64s;
use test_support::{masked, max_abs_diff, max_rel};

fn dir() -> PathBuf {
    fixtures().join("alora")
}

fn expected() -> SafetensorsFile {
    SafetensorsFile::open(&dir().join("expected.safetensors")).unwrap()
}

fn model<BK: Backend>() -> PeftModel<BK, LlamaForCausalLM<BK>> {
    let mut peft = PeftModel::new(load_base::<BK>(&fixtures().join("llama/tied_gqa_llama3")));
    peft.load_adapter(&dir().join("adapter"), "default")
        .unwrap();
    peft
}

/// Unpadded rows of a `[b, s]` id tensor and its mask.
fn rows(st: &SafetensorsFile, ids: &str, mask: &str) -> Vec<Vec<u32>> {
    let (shape, ids) = i64s(st, ids);
    let (_, mask) = i64s(st, mask);
    ids.chunks(shape[1])
        .zip(mask.chunks(shape[1]))
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, m)| **m == 1)
                .map(|(t, _)| *t as u32)
                .collect()
        })
        .collect()
}

#[test]
fn alora_logits_are_the_base_before_the_invocation_and_pefts_after() {
    let exp = expected();
    let b = batch::<B>(&exp);
    let mut peft = model::<B>();
    let (_, want) = i64s(&exp, "offsets");
    let want: Vec<Option<usize>> = want
        .iter()
        .map(|&o| (o >= 0).then_some(o as usize))
        .collect();
    let got = peft.model.alora_offsets(&b.input_ids, &LoraCtx::default());
    assert_eq!(got, Some(want.clone()), "offsets");

    let ctx = LoraCtx::default();
    let logits = peft
        .model
        .forward(b.input_ids.clone(), Some(b.attention_mask.clone()), &ctx);
    let err = max_rel(
        masked(logits.clone(), &b.attention_mask),
        masked(float(&exp, "logits"), &b.attention_mask),
    );
    eprintln!("aLoRA logits vs PEFT: rel err {err:.3e}");
    assert!(err <= 1e-4, "logits rel err {err}");

    peft.set_adapters_disabled(true).unwrap();
    let base = peft
        .model
        .forward(b.input_ids.clone(), Some(b.attention_mask.clone()), &ctx);
    let base_err = max_rel(
        masked(base.clone(), &b.attention_mask),
        masked(float(&exp, "base_logits"), &b.attention_mask),
    );
    assert!(base_err <= 1e-4, "base logits rel err {base_err}");
    let [n, s, v] = logits.dims();
    let (_, mask) = i64s(&exp, "attention_mask");
    for (r, off) in want.iter().enumerate().take(n) {
        let start = s - off.unwrap_or(0);
        // Left padding: compare only real positions.
        let first = mask[r * s..(r + 1) * s]
            .iter()
            .position(|m| *m == 1)
            .unwrap();
        let row = |t: &Tensor<B, 3>, a: usize, z: usize| t.clone().slice([r..r + 1, a..z, 0..v]);
        if first < start {
            let d = max_abs_diff(row(&logits, first, start), row(&base, first, start));
            assert_eq!(
                d, 0.0,
                "row {r}: positions before the invocation differ from the base"
            );
        }
        if off.is_some() {
            let last = mask[r * s..(r + 1) * s]
                .iter()
                .rposition(|m| *m == 1)
                .unwrap()
                + 1;
            let d = max_abs_diff(row(&logits, start, last), row(&base, start, last));
            assert!(
                d > 1e-3,
                "row {r}: the adapter changes nothing after the invocation"
            );
        }
    }
}

#[test]
fn alora_loss_and_gradients_match_peft() {
    let exp = expected();
    let b = batch::<AD>(&exp);
    let peft = model::<AD>();
    let loss = peft.model.causal_lm_loss(&b);
    let got: f32 = loss.clone().into_scalar().elem();
    let want: f32 = float::<B, 1>(&exp, "loss").into_scalar().elem();
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "loss {got} vs {want}"
    );
    let grads = loss.backward();
    let mut worst = 0f32;
    let mut checked = 0;
    for (path, layer) in peft.model.lora_linears() {
        for a in &layer.adapters {
            let key = format!("grad.base_model.model.{path}");
            for (k, g) in [
                (format!("{key}.lora_A.weight"), a.lora_a.val().grad(&grads)),
                (format!("{key}.lora_B.weight"), a.lora_b.val().grad(&grads)),
            ] {
                let g = g
                    .unwrap_or_else(|| panic!("no gradient for {k}"))
                    .transpose();
                let err = max_rel(g, float::<B, 2>(&exp, &k));
                worst = worst.max(err);
                checked += 1;
            }
        }
    }
    eprintln!("aLoRA gradients vs PEFT: {checked} tensors, worst rel err {worst:.3e}");
    assert_eq!(checked, 28);
    assert!(worst <= 1e-3, "gradient rel err {worst}");
}

#[test]
fn alora_generation_matches_pefts_generate_and_reuses_a_base_prefix_cache() {
    let exp = expected();
    let peft = model::<B>();
    let m = &peft.model;
    let prompts = rows(&exp, "gen_input_ids", "gen_attention_mask");
    let (shape, want_tokens) = i64s(&exp, "gen_tokens");
    let steps = shape[1];
    let want_logits: Tensor<B, 3> = float(&exp, "gen_logits");
    let greedy = GenerationConfig::greedy(steps, vec![]);
    let ctx = LoraCtx::default();
    let got = m.generate(&prompts, &greedy, &ctx, &mut |_, _| {}).unwrap();
    let got: Vec<i64> = got.iter().flatten().map(|&t| t as i64).collect();
    assert_eq!(got, want_tokens, "greedy tokens");

    // Step by step through the cache (PEFT's tokens fed back): every step's logits.
    let mut state = m.prefill(&prompts, 0, &ctx).unwrap();
    let mut worst = 0f32;
    for step in 0..steps {
        let l = m.next_logits(&state).unwrap();
        let [bsz, v] = l.dims();
        let w = want_logits
            .clone()
            .slice([0..bsz, step..step + 1, 0..v])
            .reshape([bsz, v]);
        worst = worst.max(max_rel(l, w));
        let next: Vec<Vec<u32>> = (0..bsz)
            .map(|r| vec![want_tokens[r * steps + step] as u32])
            .collect();
        m.extend(&mut state, &next, &ctx).unwrap();
    }
    eprintln!("aLoRA cached decode logits vs PEFT generate: worst rel err {worst:.3e}");
    assert!(worst <= 1e-4, "step logits rel err {worst}");

    // KV-cache reuse: the base model reads the context, the adapter starts at the invocation.
    let inv = peft.configs["default"]
        .alora_invocation_tokens
        .clone()
        .unwrap();
    let full = &prompts[0];
    let prefix = full[..full.len() - inv.len()].to_vec();
    let base_only = LoraCtx {
        row_adapters: Some(vec![None]),
        ..Default::default()
    };
    let mut reuse = m.prefill(&[prefix], 0, &base_only).unwrap();
    m.extend(&mut reuse, &[inv], &ctx).unwrap();
    assert_eq!(reuse.alora_start, vec![Some(full.len() - 3)]);
    let full_state = m.prefill(std::slice::from_ref(full), 0, &ctx).unwrap();
    let a = m.next_logits(&reuse).unwrap();
    let b = m.next_logits(&full_state).unwrap();
    let d = max_rel(a.clone(), b);
    let v = a.dims()[1];
    let w = want_logits
        .clone()
        .slice([0..1, 0..1, 0..v])
        .reshape([1, v]);
    let dp = max_rel(a, w);
    eprintln!("aLoRA after a reused base prefix: vs full aLoRA run {d:.3e}, vs PEFT {dp:.3e}");
    assert!(d <= 1e-5 && dp <= 1e-4, "reused prefix: {d} / {dp}");
    let toks = m.decode(&mut reuse, &greedy, &ctx, &mut |_, _| {}).unwrap();
    let toks: Vec<i64> = toks[0].iter().map(|&t| t as i64).collect();
    assert_eq!(toks, want_tokens[..steps], "tokens after a reused prefix");
}

/// An aLoRA adapter made here (its own invocation and targets, random B), saved with the logits
/// this crate computes for the fixture batch: `scripts/fixtures_alora.py --check-rust` loads it
/// in PEFT and compares.
fn export_rust_made_adapter(dst: &std::path::Path) {
    use burn::tensor::Distribution;
    let mut peft = PeftModel::new(load_base::<B>(&fixtures().join("llama/tied_gqa_llama3")));
    let mut cfg = peft_lora::LoraConfig::new(2, 6.0, &["q_proj", "v_proj", "down_proj"]);
    cfg.alora_invocation_tokens = Some(vec![42, 99]);
    cfg.task_type = Some("CAUSAL_LM".into());
    cfg.base_model_name_or_path = Some("llama/tied_gqa_llama3".into());
    peft.add_adapter("default", &cfg).unwrap();
    for (_, l) in peft.model.lora_linears_mut() {
        for a in &mut l.adapters {
            let b = a.lora_b.val().random_like(Distribution::Normal(0.0, 0.2));
            a.lora_b = burn::module::Param::from_tensor(b);
        }
    }
    let exp = expected();
    let b = batch::<B>(&exp);
    let logits = peft
        .model
        .forward(b.input_ids, Some(b.attention_mask), &LoraCtx::default());
    peft.save_adapter(dst, "default").unwrap();
    let mut out = std::collections::BTreeMap::new();
    out.insert("logits".to_string(), peft_lora::to_host(logits));
    peft_lora::write_f32(&dst.join("rust_logits.safetensors"), &out).unwrap();
}

#[test]
fn alora_adapter_saves_as_peft_and_refuses_to_merge() {
    let mut peft = model::<B>();
    let out = std::env::temp_dir().join(format!("parity-alora-{}", std::process::id()));
    peft.save_adapter(&out, "default").unwrap();
    let ours = SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let theirs =
        SafetensorsFile::open(&dir().join("adapter").join("adapter_model.safetensors")).unwrap();
    assert_eq!(ours.shapes(), theirs.shapes());
    for k in theirs.shapes().keys() {
        assert_eq!(
            ours.read(k).unwrap().data,
            theirs.read(k).unwrap().data,
            "{k}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["alora_invocation_tokens"],
        serde_json::json!([17, 42, 99])
    );
    if let Ok(export) = std::env::var("RUST_ADAPTER_EXPORT") {
        let dst = std::path::Path::new(&export).join("alora");
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(out.join(f), dst.join(f)).unwrap();
        }
        export_rust_made_adapter(&std::path::Path::new(&export).join("alora_rust_made"));
    }

    let before: Vec<Tensor<B, 2>> = peft
        .model
        .lora_linears()
        .iter()
        .map(|(_, l)| l.weight.val())
        .collect();
    for safe in [false, true] {
        let err = peft.merge(safe).unwrap_err();
        assert!(matches!(err, Error::Merge { .. }), "{err}");
        assert!(err.to_string().contains("aLoRA"), "{err}");
    }
    for ((_, l), w) in peft.model.lora_linears().iter().zip(before) {
        assert_eq!(
            max_abs_diff(l.weight.val(), w),
            0.0,
            "a refused merge changed a weight"
        );
        assert!(l.state.merged.is_empty());
    }
    let err = peft.merge_and_unload(false).unwrap_err();
    assert!(err.to_string().contains("cannot be merged"), "{err}");
}
