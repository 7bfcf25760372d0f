//! Parity with transformers on the committed fixtures (`scripts/make_fixtures.py`), generation,
//! save/load, and every bad input the issue lists.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use llama::{Error, GenerationConfig, LlamaConfig, LlamaForCausalLM, LossOptions, ModelSource, RopeKind, SaveDtype};
use peft_lora::st::SafetensorsFile;
use peft_lora::LoraCtx;

type B = NdArray<f32>;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama").join(case)
}

fn load(dir: &Path) -> llama::Result<LlamaForCausalLM<B>> {
    let files = llama::resolve(&ModelSource::Local(dir.to_path_buf()))?;
    LlamaForCausalLM::load(&files, &Default::default())
}

fn ints(st: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<i64>) {
    st.read_i64(name).unwrap()
}

fn int2(st: &SafetensorsFile, name: &str) -> Tensor<B, 2, Int> {
    let (s, v) = ints(st, name);
    Tensor::from_data(TensorData::new(v, [s[0], s[1]]), &Default::default())
}

/// Max |a - b| / max |b| over positions where `mask` is 1.
fn rel_masked(a: Tensor<B, 3>, b: Tensor<B, 3>, mask: &Tensor<B, 2, Int>) -> f32 {
    let m = mask.clone().float().unsqueeze_dim::<3>(2);
    let scale = (b.clone() * m.clone()).abs().max().into_scalar();
    ((a - b) * m).abs().max().into_scalar() / scale
}

const CASES: &[&str] = &["tied_gqa_llama3", "untied_mha", "sharded_bf16"];

#[test]
fn logits_loss_and_greedy_match_transformers() {
    for case in CASES {
        let model = load(&fixture(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        let exp = SafetensorsFile::open(&fixture(case).join("expected.safetensors")).unwrap();
        let (ids, mask, labels) = (int2(&exp, "input_ids"), int2(&exp, "attention_mask"), int2(&exp, "labels"));
        let want: Tensor<B, 3> = exp.read("logits").unwrap().to_tensor("logits", &Default::default()).unwrap();
        let got = model.forward(ids.clone(), Some(mask.clone()), &LoraCtx::default());
        let err = rel_masked(got, want, &mask);
        assert!(err <= 1e-4, "{case}: logits rel err {err}");

        let want_loss = exp.read("loss").unwrap().data[0];
        for head_only in [true, false] {
            let loss = model
                .loss(ids.clone(), Some(mask.clone()), labels.clone(), LossOptions { head_only_on_labels: head_only }, &LoraCtx::default())
                .into_scalar();
            assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0), "{case}: loss {loss} vs {want_loss}");
        }

        // Left-padded prompts with explicit positions, then greedy generation.
        let (pids, pmask) = (int2(&exp, "gen_prompt_ids"), int2(&exp, "gen_prompt_mask"));
        let want: Tensor<B, 3> = exp.read("left_logits_pos").unwrap().to_tensor("l", &Default::default()).unwrap();
        let got = model.forward_with_positions(pids.clone(), Some(pmask.clone()), Some(int2(&exp, "left_position_ids")), &LoraCtx::default());
        let err = rel_masked(got, want, &pmask);
        assert!(err <= 1e-4, "{case}: left-padded logits rel err {err}");

        let (ps, pv) = ints(&exp, "gen_prompt_ids");
        let (_, mv) = ints(&exp, "gen_prompt_mask");
        let prompts: Vec<Vec<u32>> = (0..ps[0])
            .map(|r| (0..ps[1]).filter(|&i| mv[r * ps[1] + i] == 1).map(|i| pv[r * ps[1] + i] as u32).collect())
            .collect();
        let cfg = GenerationConfig { max_new_tokens: 8, ..Default::default() };
        let mut streamed = vec![Vec::new(); prompts.len()];
        let out = model.generate(&prompts, &cfg, &LoraCtx::default(), &mut |r, t| streamed[r].push(t)).unwrap();
        let (gs, gv) = ints(&exp, "gen_greedy_ids");
        for r in 0..gs[0] {
            let want: Vec<u32> = gv[r * gs[1] + ps[1]..(r + 1) * gs[1]].iter().map(|&t| t as u32).collect();
            assert_eq!(out[r], want, "{case}: greedy tokens of row {r}");
            assert_eq!(streamed[r], want, "{case}: streamed tokens of row {r}");
        }
    }
}

#[test]
fn config_fields_are_read() {
    let cfg = LlamaConfig::from_hf_file(&fixture("tied_gqa_llama3").join("config.json")).unwrap();
    assert!(cfg.tie_word_embeddings);
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 16));
    assert!(matches!(cfg.rope, RopeKind::Llama3 { original_max: 32, .. }));
    let cfg = LlamaConfig::from_hf_file(&fixture("untied_mha").join("config.json")).unwrap();
    assert_eq!(cfg.eos_token_ids, vec![2, 3]);
    assert_eq!(cfg.rope, RopeKind::Default);
}

fn tiny_on_disk(name: &str) -> (LlamaForCausalLM<B>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("llama-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = LlamaConfig::tiny(50);
    cfg.tie_word_embeddings = false;
    let model = LlamaForCausalLM::<B>::random(&cfg, &Default::default());
    model.save_pretrained(&dir, SaveDtype::F32).unwrap();
    (model, dir)
}

#[test]
fn save_load_round_trip_and_cached_generation() {
    let (model, dir) = tiny_on_disk("roundtrip");
    let loaded = load(&dir).unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3, 7, 2], [2, 3]), &Default::default());
    let a = model.forward(ids.clone(), None, &LoraCtx::default());
    let b = loaded.forward(ids, None, &LoraCtx::default());
    assert_eq!((a - b).abs().max().into_scalar(), 0.0);

    // KV-cache greedy = greedy by full recomputation; batched left-padded = one by one.
    let prompts = vec![vec![3u32, 4, 5, 6], vec![7u32, 8]];
    let cfg = GenerationConfig { max_new_tokens: 6, ..Default::default() };
    let batched = model.generate(&prompts, &cfg, &LoraCtx::default(), &mut |_, _| {}).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let single = model.generate(std::slice::from_ref(p), &cfg, &LoraCtx::default(), &mut |_, _| {}).unwrap();
        assert_eq!(batched[r], single[0], "row {r}");
        let mut seq: Vec<u32> = p.clone();
        for _ in 0..6 {
            let n = seq.len();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(seq.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]), &Default::default());
            let logits: Vec<f32> = model.forward(ids, None, &LoraCtx::default()).slice([0..1, n - 1..n, 0..50]).into_data().to_vec().unwrap();
            let best = (0..50).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
            seq.push(best as u32);
        }
        assert_eq!(single[0], seq[p.len()..].to_vec(), "cached vs recomputed, row {r}");
    }
    // Stop ids end a row; sampling with a seed is reproducible.
    let stop = batched[0][1];
    let cfg_stop = GenerationConfig { max_new_tokens: 6, stop_ids: vec![stop], ..Default::default() };
    let out = model.generate(&prompts[..1], &cfg_stop, &LoraCtx::default(), &mut |_, _| {}).unwrap();
    assert_eq!(out[0].last(), Some(&stop));
    assert!(out[0].len() <= 2);
    let samp = GenerationConfig { max_new_tokens: 5, do_sample: true, temperature: 0.8, top_k: 10, top_p: 0.9, seed: 7, ..Default::default() };
    let s1 = model.generate(&prompts, &samp, &LoraCtx::default(), &mut |_, _| {}).unwrap();
    let s2 = model.generate(&prompts, &samp, &LoraCtx::default(), &mut |_, _| {}).unwrap();
    assert_eq!(s1, s2);
}

#[test]
fn frozen_weights_get_no_gradient() {
    type AD = Autodiff<B>;
    let cfg = LlamaConfig::tiny(30);
    let model = LlamaForCausalLM::<AD>::random(&cfg, &Default::default());
    let ids = Tensor::<AD, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &Default::default());
    let loss = model.loss(ids.clone(), None, ids, LossOptions::default(), &LoraCtx::default());
    let grads = loss.backward();
    assert!(model.model.embed_tokens.weight.val().grad(&grads).is_none());
    assert!(model.model.layers[0].self_attn.q_proj.weight.val().grad(&grads).is_none());
    assert!(model.model.norm.weight.val().grad(&grads).is_none());
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_culprit() {
    let (_, dir) = tiny_on_disk("bad");
    let cfg_path = dir.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();

    // Missing config field.
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("hidden_size"), "{e}");

    // Not a Llama.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(matches!(e, Error::Architecture { .. }) && e.to_string().contains("MistralForCausalLM"), "{e}");

    // Unsupported rope scaling.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(e.to_string().contains("yarn"), "{e}");
    std::fs::write(&cfg_path, &original).unwrap();

    // A mis-shaped tensor: a config that claims a wider MLP.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["intermediate_size"] = serde_json::json!(170);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(matches!(e, Error::TensorShape { .. }) && e.to_string().contains("model.layers.0.mlp.gate_proj.weight"), "{e}");
    // A missing tensor: a config with one layer more.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }) && e.to_string().contains("model.layers.2."), "{e}");
    std::fs::write(&cfg_path, &original).unwrap();

    // Missing tokenizer.
    let files = llama::resolve(&ModelSource::Local(dir.clone())).unwrap();
    let e = llama::load_tokenizer(&files).unwrap_err();
    assert!(matches!(e, Error::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"), "{e}");

    // Truncated safetensors.
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    // Unreachable Hub: offline with an empty cache.
    let cache = std::env::temp_dir().join(format!("llama-test-{}-emptycache", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    // SAFETY: this test binary's other tests do not read these variables.
    unsafe {
        std::env::set_var("HF_HOME", &cache);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let e = llama::resolve(&ModelSource::parse("no-such-org/no-such-model")).unwrap_err();
    assert!(matches!(e, Error::Hub { .. }) && e.to_string().contains("no-such-org/no-such-model"), "{e}");
    // Bad generation input.
    let (model, _) = tiny_on_disk("gen");
    let e = model.generate(&[vec![]], &GenerationConfig::default(), &LoraCtx::default(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Generation(_)));
    let e = model.generate(&[vec![999]], &GenerationConfig::default(), &LoraCtx::default(), &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("999"));
}

