//! Parity with transformers on the reference fixtures (`scripts/make_fixtures.py`), generation,
//! save/load, gradients, and every bad input the issue lists.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use llama::{
    Error, GenerationConfig, HubOptions, LlamaConfig, LlamaForCausalLM, LossOptions, ModelSource,
    RopeKind, SaveDtype,
};
use peft_lora::SafetensorsFile;
use peft_lora::{LoraConfig, LoraCtx, LoraModel, PeftModel};
use test_support::st::{float, i64s, int};
use test_support::{fresh_temp_dir, masked, max_abs_diff, max_rel};

type B = NdArray<f32>;

fn dev() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn fixtures_dir() -> PathBuf {
    test_support::fixtures_dir().join("llama")
}

/// A fresh, empty temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    fresh_temp_dir("llama-test", name)
}

fn load(dir: &Path) -> llama::Result<LlamaForCausalLM<B>> {
    let files = llama::resolve(&ModelSource::Local(dir.to_path_buf()))?;
    LlamaForCausalLM::load(&files, &dev())
}

fn ids2(v: &[i64], b: usize, s: usize) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, s]), &dev())
}

/// Max |a - b| / max |b| over the query positions where `mask` is 1 (all when `None`).
fn rel_err(a: Tensor<B, 3>, b: Tensor<B, 3>, mask: Option<&Tensor<B, 2, Int>>) -> f32 {
    match mask {
        Some(m) => max_rel(masked(a, m), masked(b, m)),
        None => max_rel(a, b),
    }
}

fn ctx() -> LoraCtx {
    LoraCtx::default()
}

#[test]
fn fixtures_match_transformers() {
    let root = fixtures_dir();
    let cases: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("expected.safetensors").is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    // The fixtures are committed: their absence is a broken checkout, not a reason to skip.
    assert!(
        cases.len() >= 3,
        "reference fixtures missing under {} (found {cases:?})",
        root.display()
    );
    for dir in cases {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = load(&dir).unwrap_or_else(|e| panic!("{case}: {e}"));
        let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();

        if exp.contains("inv_freq") {
            let want = exp.read("inv_freq").unwrap().data;
            let worst = want
                .iter()
                .zip(&model.inv_freq)
                .map(|(a, b)| ((a - b) / a).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{case}: inv_freq rel err {worst}");
        }

        // Training inputs, row 1 right-padded: logits and loss.
        let (ids, mask, labels) = (
            int::<B, 2>(&exp, "input_ids"),
            int::<B, 2>(&exp, "attention_mask"),
            int::<B, 2>(&exp, "labels"),
        );
        let got = model.forward(ids.clone(), Some(mask.clone()), &ctx());
        let err = rel_err(got.clone(), float(&exp, "logits"), Some(&mask));
        assert!(err <= 1e-4, "{case}: logits rel err {err}");
        // Right padding leaves every query a real key to attend to: padded rows match too.
        let err = rel_err(got, float(&exp, "logits"), None);
        assert!(
            err <= 1e-4,
            "{case}: logits (padded positions included) rel err {err}"
        );

        let want_loss = exp.read("loss").unwrap().data[0];
        for head_only_on_labels in [true, false] {
            let out = model.forward_loss(
                ids.clone(),
                Some(mask.clone()),
                labels.clone(),
                LossOptions {
                    head_only_on_labels,
                },
                &ctx(),
            );
            let loss = out.loss.into_scalar();
            assert!(
                (loss - want_loss).abs() <= 1e-5,
                "{case}: loss {loss} vs {want_loss} (head only: {head_only_on_labels})"
            );
            assert_eq!(out.logits.is_some(), !head_only_on_labels);
        }

        // Left-padded prompts: the plain forward (positions 0..seq) and explicit positions.
        let (pids, pmask) = (
            int::<B, 2>(&exp, "gen_prompt_ids"),
            int::<B, 2>(&exp, "gen_prompt_mask"),
        );
        let pos = llama::position_ids_from_mask(pmask.clone());
        let want_pos = int::<B, 2>(&exp, "left_position_ids");
        assert_eq!(
            pos.to_data().to_vec::<i64>().unwrap(),
            want_pos.to_data().to_vec::<i64>().unwrap()
        );
        if exp.contains("left_logits") {
            let got = model.forward(pids.clone(), Some(pmask.clone()), &ctx());
            let err = rel_err(got, float(&exp, "left_logits"), Some(&pmask));
            assert!(err <= 1e-4, "{case}: left-padded logits rel err {err}");
        }
        let got =
            model.forward_with_positions(pids.clone(), Some(pmask.clone()), Some(want_pos), &ctx());
        let err = rel_err(got, float(&exp, "left_logits_pos"), Some(&pmask));
        assert!(
            err <= 1e-4,
            "{case}: left-padded logits with position ids rel err {err}"
        );

        // Greedy generation, batched and left-padded (eos disabled in the reference).
        let (ps, pv) = i64s(&exp, "gen_prompt_ids");
        let (_, mv) = i64s(&exp, "gen_prompt_mask");
        let prompts: Vec<Vec<u32>> = (0..ps[0])
            .map(|r| {
                (0..ps[1])
                    .filter(|&i| mv[r * ps[1] + i] == 1)
                    .map(|i| pv[r * ps[1] + i] as u32)
                    .collect()
            })
            .collect();
        let (gs, gv) = i64s(&exp, "gen_greedy_ids");
        let new = gs[1] - ps[1];
        let cfg = GenerationConfig::greedy(new, vec![]);
        let mut streamed = vec![Vec::new(); prompts.len()];
        let out = model
            .generate(&prompts, &cfg, &ctx(), &mut |r, t| streamed[r].push(t))
            .unwrap();
        for r in 0..gs[0] {
            let want: Vec<u32> = gv[r * gs[1] + ps[1]..(r + 1) * gs[1]]
                .iter()
                .map(|&t| t as u32)
                .collect();
            assert_eq!(out[r], want, "{case}: greedy tokens of row {r}");
            assert_eq!(streamed[r], want, "{case}: streamed tokens of row {r}");
        }

        // The logits of each generation step, recomputed without a cache from the full sequence.
        if exp.contains("gen_logits") {
            let full = int::<B, 2>(&exp, "gen_greedy_ids");
            let fmask: Tensor<B, 2, Int> =
                Tensor::cat(vec![pmask.clone(), Tensor::ones([gs[0], new], &dev())], 1);
            let pos = llama::position_ids_from_mask(fmask.clone());
            let logits = model.forward_with_positions(full, Some(fmask), Some(pos), &ctx());
            let v = model.config.vocab_size;
            let steps = logits.slice([0..gs[0], ps[1] - 1..gs[1] - 1, 0..v]);
            let err = rel_err(steps, float(&exp, "gen_logits"), None);
            assert!(err <= 1e-4, "{case}: generation-step logits rel err {err}");
        }
        eprintln!("{case}: matches transformers");
    }
}

#[test]
fn fixture_configs_are_read() {
    let root = fixtures_dir();
    let tied = root.join("tied_gqa_llama3/config.json");
    let untied = root.join("untied_mha/config.json");
    // The fixtures are committed: their absence is a broken checkout, not a reason to skip.
    assert!(
        tied.is_file() && untied.is_file(),
        "reference fixtures missing under {}",
        root.display()
    );
    let cfg = LlamaConfig::from_hf_file(&tied).unwrap();
    assert!(cfg.tie_word_embeddings);
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 16));
    assert!(matches!(
        cfg.rope,
        RopeKind::Llama3 {
            original_max: 32,
            ..
        }
    ));
    let cfg = LlamaConfig::from_hf_file(&untied).unwrap();
    assert_eq!(cfg.eos_token_ids, vec![2, 3]);
    assert_eq!(cfg.rope, RopeKind::Default);
}

/// A random tiny untied model saved to a fresh folder.
fn tiny_on_disk(name: &str) -> (LlamaForCausalLM<B>, PathBuf) {
    let dir = temp_dir(name);
    let mut cfg = LlamaConfig::tiny(50);
    cfg.tie_word_embeddings = false;
    cfg.eos_token_ids = vec![2];
    let model = LlamaForCausalLM::<B>::random(&cfg, &dev());
    model.save_pretrained(&dir, SaveDtype::F32).unwrap();
    (model, dir)
}

#[test]
fn save_load_round_trips_single_and_sharded() {
    let (model, dir) = tiny_on_disk("roundtrip");
    let loaded = load(&dir).unwrap();
    assert_eq!(loaded.config.torch_dtype.as_deref(), Some("float32"));
    assert_eq!(
        loaded.config,
        LlamaConfig {
            torch_dtype: Some("float32".into()),
            ..model.config.clone()
        }
    );
    let ids = ids2(&[1, 5, 9, 3, 7, 2], 2, 3);
    let a = model.forward(ids.clone(), None, &ctx());
    assert_eq!(
        max_abs_diff(a.clone(), loaded.forward(ids.clone(), None, &ctx())),
        0.0
    );

    // bf16 shards + index: loads, matches to bf16 precision, and bf16 -> bf16 is exact.
    let sharded = temp_dir("sharded");
    model
        .save_pretrained_sharded(&sharded, SaveDtype::Bf16, 40_000)
        .unwrap();
    assert!(sharded.join("model.safetensors.index.json").is_file());
    let files = llama::resolve(&ModelSource::Local(sharded.clone())).unwrap();
    assert!(files.weights.len() > 2, "{:?}", files.weights);
    let bf = LlamaForCausalLM::<B>::load(&files, &dev()).unwrap();
    let b = bf.forward(ids.clone(), None, &ctx());
    assert!(rel_err(b.clone(), a, None) < 0.05);
    let again = temp_dir("sharded-again");
    bf.save_pretrained(&again, SaveDtype::Bf16).unwrap();
    assert!(!again.join("model.safetensors.index.json").exists());
    assert_eq!(
        max_abs_diff(load(&again).unwrap().forward(ids, None, &ctx()), b),
        0.0
    );

    // Tied embeddings: no lm_head.weight on disk, and it loads back the same.
    let tied_dir = temp_dir("tied");
    let tied = LlamaForCausalLM::<B>::random(&LlamaConfig::tiny(40), &dev());
    tied.save_pretrained(&tied_dir, SaveDtype::F32).unwrap();
    let st = SafetensorsFile::open(&tied_dir.join("model.safetensors")).unwrap();
    assert!(!st.contains("lm_head.weight"));
    assert_eq!(
        st.shapes()["model.layers.0.self_attn.k_proj.weight"],
        vec![32, 64]
    );
    let back = load(&tied_dir).unwrap();
    let ids = ids2(&[1, 2, 3], 1, 3);
    assert_eq!(
        max_abs_diff(
            tied.forward(ids.clone(), None, &ctx()),
            back.forward(ids, None, &ctx())
        ),
        0.0
    );
}

/// Greedy continuation by full recomputation, no cache.
fn greedy_recompute(model: &LlamaForCausalLM<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let v = model.config.vocab_size;
    let mut seq: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let len = seq.len();
        let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let logits =
            model
                .forward(ids2(&ids, 1, len), None, &ctx())
                .slice([0..1, len - 1..len, 0..v]);
        let row: Vec<f32> = logits.into_data().to_vec().unwrap();
        let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        seq.push(best as u32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn a_reserved_cache_keeps_its_shapes_and_gives_the_full_forwards_logits() {
    let model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(50), &dev(), 12);
    let v = model.config.vocab_size;
    let prompts = vec![vec![3u32, 4, 5, 6, 9], vec![7u32, 8, 2, 1, 4]];
    let fed: Vec<[u32; 2]> = (0..7).map(|i| [10 + i, 30 + i]).collect();
    let mut reserved = model.prefill(&prompts, 0, &ctx()).unwrap();
    reserved.reserve(fed.len());
    let mut growing = model.prefill(&prompts, 0, &ctx()).unwrap();
    let shapes = |s: &llama::GenState<B>| (s.cache[0].k.dims(), s.mask.dims());
    let before = shapes(&reserved);
    assert_eq!(before.0[2], prompts[0].len() + fed.len());
    let mut seqs = prompts.clone();
    for step in &fed {
        let chunk: Vec<Vec<u32>> = step.iter().map(|&t| vec![t]).collect();
        model.extend(&mut reserved, &chunk, &ctx()).unwrap();
        model.extend(&mut growing, &chunk, &ctx()).unwrap();
        assert_eq!(shapes(&reserved), before, "a reserved cache changed shape");
        for (s, t) in seqs.iter_mut().zip(step) {
            s.push(*t);
        }
        // The cached step = the last position of a forward over the whole rows, no cache.
        let n = seqs[0].len();
        let ids: Vec<i64> = seqs.iter().flatten().map(|&t| t as i64).collect();
        let full = model
            .forward(ids2(&ids, 2, n), None, &ctx())
            .slice([0..2, n - 1..n, 0..v])
            .reshape([2, v]);
        let got = model.next_logits(&reserved).unwrap();
        assert!(max_rel(got.clone(), full) < 1e-5, "step {n}");
        let grown = model.next_logits(&growing).unwrap();
        assert!(
            max_abs_diff(got, grown) < 1e-6,
            "reserved vs growing, step {n}"
        );
    }
    // The unreserved state grew by half its capacity at least, not one position at a time.
    assert!(growing.capacity() >= seqs[0].len());
    assert!(growing.capacity() < seqs[0].len() + 6);
    assert_eq!(reserved.cached(), seqs[0].len());
}

#[test]
fn generation_cache_padding_stops_and_sampling() {
    let model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(50), &dev(), 11);
    let prompts = vec![vec![3u32, 4, 5, 6, 9], vec![7u32, 8], vec![1u32]];
    let cfg = GenerationConfig::greedy(6, vec![]);
    let batched = model
        .generate(&prompts, &cfg, &ctx(), &mut |_, _| {})
        .unwrap();
    for (r, p) in prompts.iter().enumerate() {
        // Left-padded batch = one by one; KV cache = recomputation.
        let single = model
            .generate(std::slice::from_ref(p), &cfg, &ctx(), &mut |_, _| {})
            .unwrap();
        assert_eq!(batched[r], single[0], "batched vs single, row {r}");
        assert_eq!(
            single[0],
            greedy_recompute(&model, p, 6),
            "cached vs recomputed, row {r}"
        );
    }

    // A stop id ends its row (and only that row); min_new_tokens suppresses it.
    let stop = batched[0][1];
    let out = model
        .generate(
            &prompts,
            &GenerationConfig::greedy(6, vec![stop]),
            &ctx(),
            &mut |_, _| {},
        )
        .unwrap();
    for r in 0..prompts.len() {
        let cut = batched[r]
            .iter()
            .position(|&t| t == stop)
            .map_or(6, |i| i + 1);
        assert_eq!(out[r], batched[r][..cut].to_vec(), "row {r}");
    }
    let cfg_min = GenerationConfig {
        min_new_tokens: 4,
        ..GenerationConfig::greedy(4, vec![stop])
    };
    let out = model
        .generate(&prompts[..1], &cfg_min, &ctx(), &mut |_, _| {})
        .unwrap();
    assert_eq!(out[0].len(), 4);
    assert!(!out[0].contains(&stop));

    // Sampling: reproducible with a seed, top_k = 1 is greedy.
    let samp = GenerationConfig {
        max_new_tokens: 5,
        do_sample: true,
        temperature: 0.8,
        top_k: 10,
        top_p: 0.9,
        seed: 7,
        ..Default::default()
    };
    let s1 = model
        .generate(&prompts, &samp, &ctx(), &mut |_, _| {})
        .unwrap();
    assert_eq!(
        s1,
        model
            .generate(&prompts, &samp, &ctx(), &mut |_, _| {})
            .unwrap()
    );
    let k1 = GenerationConfig {
        top_k: 1,
        max_new_tokens: 6,
        ..samp
    };
    assert_eq!(
        model
            .generate(&prompts, &k1, &ctx(), &mut |_, _| {})
            .unwrap(),
        batched
    );
}

#[test]
fn a_token_choice_outside_the_vocabulary_is_an_error() {
    // Non-finite logits (a NaN norm weight): sampling finds no token and says so, rather than
    // feed an id the embedding does not have.
    let mut model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(50), &dev(), 3);
    let h = model.config.hidden_size;
    model.model.norm.weight = burn::module::Param::from_tensor(Tensor::full([h], f32::NAN, &dev()))
        .set_require_grad(false);
    let cfg = GenerationConfig {
        max_new_tokens: 3,
        do_sample: true,
        ..Default::default()
    };
    let err = model
        .generate(&[vec![1u32, 2, 3]], &cfg, &ctx(), &mut |_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn loss_semantics_and_frozen_weights_get_no_gradient() {
    type AD = Autodiff<B>;
    let mut cfg = LlamaConfig::tiny(30);
    cfg.tie_word_embeddings = false;
    let model = LlamaForCausalLM::<AD>::random_seeded(&cfg, &Default::default(), 3);
    let mut peft = PeftModel::new(model);
    peft.add_adapter("default", &LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]))
        .unwrap();
    let m = &peft.model;
    let d = Default::default();
    let ids = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(vec![1i64, 5, 9, 3, 4, 6, 2, 0], [2, 4]),
        &d,
    );
    let mask = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 0], [2, 4]),
        &d,
    );
    let labels = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(vec![-100i64, 5, 9, 3, -100, 6, 2, -100], [2, 4]),
        &d,
    );

    // The loss equals the mean NLL over labelled tokens computed from the logits by hand.
    let full = m.forward_loss(
        ids.clone(),
        Some(mask.clone()),
        labels.clone(),
        LossOptions {
            head_only_on_labels: false,
        },
        &ctx(),
    );
    assert_eq!(full.n_tokens, 5);
    let logits: Vec<f32> = full.logits.unwrap().into_data().to_vec().unwrap();
    let lab = [-100i64, 5, 9, 3, -100, 6, 2, -100];
    let mut nll = 0.0f64;
    for r in 0..2 {
        for t in 0..3 {
            let target = lab[r * 4 + t + 1];
            if target == -100 {
                continue;
            }
            let row = &logits[(r * 4 + t) * 30..(r * 4 + t + 1) * 30];
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[target as usize] as f64;
        }
    }
    let want = (nll / 5.0) as f32;
    let got_full = full.loss.into_scalar();
    assert!((got_full - want).abs() < 1e-5, "{got_full} vs {want}");

    let out = m.forward_loss(
        ids.clone(),
        Some(mask.clone()),
        labels,
        LossOptions::default(),
        &ctx(),
    );
    assert!(out.logits.is_none());
    let loss = out.loss;
    assert!((loss.clone().into_scalar() - want).abs() < 1e-5);
    let grads = loss.backward();
    let layer = &m.model.layers[0];
    assert!(m.model.embed_tokens.weight.val().grad(&grads).is_none());
    assert!(m
        .lm_head
        .as_ref()
        .unwrap()
        .weight
        .val()
        .grad(&grads)
        .is_none());
    assert!(m.model.norm.weight.val().grad(&grads).is_none());
    assert!(layer.input_layernorm.weight.val().grad(&grads).is_none());
    assert!(layer.self_attn.q_proj.weight.val().grad(&grads).is_none());
    assert!(layer.mlp.down_proj.weight.val().grad(&grads).is_none());
    let b_grad = layer.self_attn.q_proj.adapters[0]
        .lora_b
        .val()
        .grad(&grads)
        .expect("lora_B has a gradient");
    assert!(b_grad.abs().max().into_scalar() > 0.0);
    assert!(layer.self_attn.v_proj.adapters[0]
        .lora_a
        .val()
        .grad(&grads)
        .is_some());
    assert_eq!(m.lora_linears().len(), 14);
    assert_eq!(m.lora_linears()[6].0, "model.layers.0.mlp.down_proj");

    // Nothing labelled: loss 0 (transformers: NaN), and backward still runs.
    let none = Tensor::<AD, 2, Int>::from_data(TensorData::new(vec![-100i64; 8], [2, 4]), &d);
    let out = m.forward_loss(ids, Some(mask), none, LossOptions::default(), &ctx());
    assert_eq!((out.n_tokens, out.loss.clone().into_scalar()), (0, 0.0));
    let _ = out.loss.backward();
}

#[test]
fn mixed_adapter_batches_route_rows() {
    let model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(30), &dev(), 5);
    let mut peft = PeftModel::new(model);
    peft.add_adapter("a", &LoraConfig::new(4, 8.0, &["q_proj", "down_proj"]))
        .unwrap();
    // Make the adapter matter: B starts at zero.
    for (_, l) in peft.model.lora_linears_mut() {
        if let Some(a) = l.adapters.first_mut() {
            a.lora_b = burn::module::Param::from_tensor(a.lora_b.val().ones_like() * 0.1);
        }
    }
    let ids = ids2(&[1, 5, 9, 3, 4, 6, 2, 7], 2, 4);
    let with = peft.model.forward(ids.clone(), None, &ctx());
    let routed = LoraCtx {
        row_adapters: Some(vec![Some("a".into()), None]),
        ..Default::default()
    };
    let mixed = peft.model.forward(ids.clone(), None, &routed);
    peft.set_adapters_disabled(true).unwrap();
    let base = peft.model.forward(ids, None, &ctx());
    let row = |t: &Tensor<B, 3>, r: usize| t.clone().slice([r..r + 1, 0..4, 0..30]);
    assert!(max_abs_diff(row(&with, 0), row(&base, 0)) > 1e-4);
    assert!(max_abs_diff(row(&mixed, 0), row(&with, 0)) < 1e-5);
    assert!(max_abs_diff(row(&mixed, 1), row(&base, 1)) < 1e-5);
}

/// A small `tokenizer.json` (word level) with Llama 3's special tokens.
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = [
        "<unk>",
        "hello",
        "world",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
    .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

#[test]
fn tokenizer_and_stop_ids() {
    let (model, dir) = tiny_on_disk("tokenizer");
    write_tokenizer(&dir);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 4]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|end_of_text|>"}}"#,
    )
    .unwrap();
    let files = llama::resolve(&ModelSource::parse(dir.to_str().unwrap())).unwrap();
    let tok = llama::load_tokenizer(&files).unwrap();
    assert_eq!(tok.encode("hello world", false).unwrap().get_ids(), &[1, 2]);
    let stops = llama::stop_ids(&files, &model.config, Some(&tok)).unwrap();
    assert_eq!(stops, vec![2, 4, 5]);
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_culprit() {
    let (model, dir) = tiny_on_disk("bad");
    let cfg_path = dir.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        load(&dir).unwrap_err()
    };

    let e = edit(&|v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("hidden_size"),
        "{e}"
    );
    assert!(e.to_string().contains("config.json"), "{e}");

    let e = edit(&|v| v["architectures"] = serde_json::json!(["MistralForCausalLM"]));
    assert!(
        matches!(e, Error::Architecture { .. }) && e.to_string().contains("MistralForCausalLM"),
        "{e}"
    );

    let e = edit(&|v| v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("yarn"),
        "{e}"
    );

    // A mis-shaped tensor: the config claims a wider MLP than the file holds.
    let e = edit(&|v| v["intermediate_size"] = serde_json::json!(170));
    assert!(matches!(e, Error::TensorShape { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[170, 64]")
            && msg.contains("[160, 64]"),
        "{msg}"
    );

    // A missing tensor: one layer more than the file holds.
    let e = edit(&|v| v["num_hidden_layers"] = serde_json::json!(3));
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.2.") && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(&cfg_path, &original).unwrap();

    // Missing, then corrupt tokenizer.
    let files = llama::resolve(&ModelSource::Local(dir.clone())).unwrap();
    let e = llama::load_tokenizer(&files).unwrap_err();
    assert!(
        matches!(e, Error::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let files = llama::resolve(&ModelSource::Local(dir.clone())).unwrap();
    let e = llama::load_tokenizer(&files).unwrap_err();
    assert!(
        matches!(e, Error::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );

    // Truncated safetensors.
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(
        matches!(e, Error::Weights(_)) && e.to_string().contains("model.safetensors"),
        "{e}"
    );

    // A sharded index naming a shard that is not there.
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = load(&dir).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("model-00001-of-00002.safetensors"),
        "{e}"
    );
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    let e = load(&dir).unwrap_err();
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("weight_map"),
        "{e}"
    );

    // No config at all.
    let e = load(&temp_dir("empty")).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );

    // Bad generation input.
    let gen = |p: &[Vec<u32>], c: &GenerationConfig| {
        model.generate(p, c, &ctx(), &mut |_, _| {}).unwrap_err()
    };
    assert!(matches!(
        gen(&[vec![]], &GenerationConfig::default()),
        Error::Generation(_)
    ));
    assert!(gen(&[vec![999]], &GenerationConfig::default())
        .to_string()
        .contains("999"));
    let hot = GenerationConfig {
        do_sample: true,
        temperature: 0.0,
        ..Default::default()
    };
    assert!(gen(&[vec![1]], &hot).to_string().contains("temperature"));
}

#[test]
fn unreachable_hub_is_a_typed_error() {
    let repo = ModelSource::parse("no-such-org/no-such-model@v1");
    assert_eq!(
        repo,
        ModelSource::Hub {
            repo: "no-such-org/no-such-model".into(),
            revision: Some("v1".into())
        }
    );
    // Offline with an empty cache.
    let offline = HubOptions {
        cache_dir: temp_dir("empty-cache"),
        endpoint: "https://huggingface.co".into(),
        token: None,
        offline: true,
    };
    let e = llama::resolve_with(&repo, &offline).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Hub { .. })
            && msg.contains("no-such-org/no-such-model")
            && msg.contains("config.json"),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");

    // An endpoint where nothing listens.
    let dead = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        offline: false,
        ..offline.clone()
    };
    let e = llama::resolve_with(&repo, &dead).unwrap_err();
    assert!(
        matches!(e, Error::Hub { .. }) && e.to_string().contains("127.0.0.1:9"),
        "{e}"
    );

    // Offline with the files in the cache (the layout hf-hub and huggingface_hub write).
    let (model, src) = tiny_on_disk("cached");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = offline.cache_dir.join("models--my-org--tiny");
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    for source in ["my-org/tiny", &format!("my-org/tiny@{commit}")] {
        let files = llama::resolve_with(&ModelSource::parse(source), &offline).unwrap();
        assert_eq!(files.config, snap.join("config.json"), "{source}");
        assert!(files.tokenizer.is_none());
        let loaded = LlamaForCausalLM::<B>::load(&files, &dev()).unwrap();
        let ids = ids2(&[1, 2, 3], 1, 3);
        assert_eq!(
            max_abs_diff(
                loaded.forward(ids.clone(), None, &ctx()),
                model.forward(ids, None, &ctx())
            ),
            0.0
        );
    }
}

/// On a f64 backend the norm, RoPE tables, softmax and loss run in f32 and are cast back: this
/// exercises the mixed-precision path that bf16 backends take (a no-op on f32).
#[test]
fn mixed_precision_path_on_f64_backend() {
    type B64 = NdArray<f64>;
    let dir = fixtures_dir().join("tied_gqa_llama3");
    // The fixture is committed: its absence is a broken checkout, not a reason to skip.
    assert!(
        dir.join("expected.safetensors").is_file(),
        "reference fixture missing at {}",
        dir.display()
    );
    let d = Default::default();
    let files = llama::resolve(&ModelSource::Local(dir.clone())).unwrap();
    let model = LlamaForCausalLM::<B64>::load(&files, &d).unwrap();
    let exp = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let int = |name: &str| {
        let (s, v) = i64s(&exp, name);
        Tensor::<B64, 2, Int>::from_data(TensorData::new(v, [s[0], s[1]]), &d)
    };
    let (ids, mask) = (int("input_ids"), int("attention_mask"));
    let got: Vec<f64> = model
        .forward(ids.clone(), Some(mask.clone()), &ctx())
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap();
    let want = exp.read("logits").unwrap().data;
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0f64, f64::max)
        / scale;
    assert!(err <= 1e-4, "f64 logits rel err {err}");
    let loss: f64 = burn::tensor::ElementConversion::elem(
        model
            .loss(
                ids,
                Some(mask),
                int("labels"),
                LossOptions::default(),
                &ctx(),
            )
            .into_scalar(),
    );
    let want_loss = exp.read("loss").unwrap().data[0] as f64;
    assert!((loss - want_loss).abs() <= 1e-5, "{loss} vs {want_loss}");
    let out = model
        .generate(
            &[vec![1, 5, 7]],
            &GenerationConfig::greedy(3, vec![]),
            &ctx(),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(out[0].len(), 3);
}

#[test]
fn load_in_4bit_keeps_decoder_linears_in_nf4_and_saves_them_dequantized() {
    let files = llama::resolve(&ModelSource::Local(fixtures_dir().join("untied_mha"))).unwrap();
    let q = LlamaForCausalLM::<B>::load_in_4bit(&files, &dev()).unwrap();
    let mut dense = LlamaForCausalLM::<B>::load(&files, &dev()).unwrap();
    assert!(dense.lora_linears().iter().all(|(_, l)| !l.is_nf4()));
    dense.quantize_nf4().unwrap();
    // Quantized while reading == quantized after loading, layer by layer; lm_head stays dense.
    for ((p, a), (_, b)) in q.lora_linears().iter().zip(dense.lora_linears()) {
        let (a, b) = (a.nf4.as_ref().unwrap(), b.nf4.as_ref().unwrap());
        assert_eq!(a.to_host(), b.to_host(), "{p}");
    }
    assert!(q.lm_head.is_some());
    // Written dequantized, the checkpoint reloads densely to the same logits.
    let dir = temp_dir("nf4-save");
    q.save_pretrained(&dir, SaveDtype::F32).unwrap();
    let reloaded =
        LlamaForCausalLM::<B>::load(&llama::resolve(&ModelSource::Local(dir)).unwrap(), &dev())
            .unwrap();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 42, 7], [1, 5]), &dev());
    let a = q.forward(ids.clone(), None, &LoraCtx::default());
    let b = reloaded.forward(ids.clone(), None, &LoraCtx::default());
    let diff: f32 = (a.clone() - b).abs().max().into_scalar();
    assert!(
        diff <= 1e-5,
        "NF4 model vs its dequantized checkpoint: {diff}"
    );
    let full = LlamaForCausalLM::<B>::load(&files, &dev()).unwrap();
    let c = full.logits(ids, None);
    let diff: f32 = (a - c).abs().max().into_scalar();
    assert!(
        diff > 1e-4,
        "the NF4 base should differ from the full-precision one"
    );
}

/// RSS of this process in bytes (Linux).
fn rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
#[ignore = "quantizes one Llama-3-8B decoder layer (0.9 GB of f32 on the way); run with --ignored --nocapture"]
fn nf4_memory_of_the_8b_shape() {
    let cfg = LlamaConfig::llama3_8b();
    let before = rss_bytes();
    let t = std::time::Instant::now();
    let mut layer = Vec::new();
    for (d_in, d_out) in cfg.decoder_linear_shapes() {
        let mut lin = peft_lora::LoraLinear::<B>::random(d_in, d_out, false, &dev());
        lin.quantize_nf4("layer").unwrap();
        layer.push(lin);
    }
    let secs = t.elapsed().as_secs_f64();
    let after = rss_bytes();
    let held: usize = layer
        .iter()
        .map(|l| l.nf4.as_ref().unwrap().storage_bytes())
        .sum();
    let linear: usize = cfg.decoder_linear_shapes().iter().map(|(i, o)| i * o).sum();
    let other = cfg.num_params() - cfg.num_layers * linear;
    let total = cfg.num_layers * held + 2 * other;
    assert_eq!(total, cfg.nf4_weight_bytes(2));
    let gb = |b: usize| b as f64 / 1e9;
    eprintln!(
        "8B decoder layer in NF4: {held} B held on the device ({:.1} s to make and quantize); x{} layers = {:.3} GB; + bf16 embeddings/head/norms {:.3} GB = {:.3} GB (bf16 model: {:.3} GB)",
        secs,
        cfg.num_layers,
        gb(cfg.num_layers * held),
        gb(2 * other),
        gb(total),
        gb(2 * cfg.num_params())
    );
    if let (Some(b), Some(a)) = (before, after) {
        eprintln!(
            "process RSS grew by {:.1} MB for one layer (NF4 held: {:.1} MB; dense f32 would be {:.1} MB)",
            (a as f64 - b as f64) / 1e6,
            held as f64 / 1e6,
            4.0 * linear as f64 / 1e6
        );
    }
}

#[test]
fn layer_replication_and_trainable_tokens_on_llama() {
    let base = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(50), &dev(), 12);
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.layer_replication = Some(vec![[0, 3]]);
    let err = PeftModel::new(base.clone())
        .add_adapter("default", &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer_replication") && err.contains("[0, 3]") && err.contains("2 layers"),
        "{err}"
    );

    cfg.layer_replication = Some(vec![[1, 2], [0, 2]]);
    cfg.trainable_token_indices = Some(serde_json::json!([4, 7, 49]));
    let mut peft = PeftModel::new(base.clone());
    let adapted = peft.add_adapter("default", &cfg).unwrap();
    assert_eq!(peft.model.model.layers.len(), 3);
    assert_eq!(peft.model.config.num_layers, 3);
    assert!(adapted.contains(&"model.layers.2.self_attn.v_proj".to_string()));
    assert_eq!(
        peft.model.model.layers[0].self_attn.q_proj.weight.id,
        peft.model.model.layers[2].self_attn.q_proj.weight.id
    );
    // Random adapters and rows; the KV cache (one slot per new layer) equals recomputation.
    for (_, l) in peft.model.lora_linears_mut() {
        for a in &mut l.adapters {
            let (shape, d) = (a.lora_b.shape(), a.lora_b.device());
            a.lora_b = burn::module::Param::from_tensor(Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, 0.5),
                &d,
            ));
        }
    }
    for (_, t) in peft.model.token_tables_mut() {
        for a in &mut t.adapters {
            let (shape, d) = (a.delta.shape(), a.delta.device());
            a.delta = burn::module::Param::from_tensor(Tensor::random(
                shape,
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &d,
            ));
        }
    }
    let prompt = vec![3u32, 7, 7, 9, 49];
    let out = peft
        .model
        .generate(
            std::slice::from_ref(&prompt),
            &GenerationConfig::greedy(5, vec![]),
            &ctx(),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(out[0], greedy_recompute(&peft.model, &prompt, 5));

    // The tied head follows the embedding's rows; the untied head does not.
    let hidden = Tensor::<B, 2>::random(
        [3, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev(),
    );
    let rows = peft.model.model.embed_tokens.adapters[0].delta.val();
    let logits = peft.model.lm_head(hidden.clone());
    let want = hidden.clone().matmul(rows.transpose());
    let got = logits.select(
        1,
        Tensor::from_data(TensorData::new(vec![4i64, 7, 49], [3]), &dev()),
    );
    assert!((got - want).abs().max().into_scalar() < 1e-5);

    let mut untied_cfg = LlamaConfig::tiny(50);
    untied_cfg.tie_word_embeddings = false;
    let untied = LlamaForCausalLM::<B>::random_seeded(&untied_cfg, &dev(), 13);
    let head_before = untied.lm_head(hidden.clone());
    let mut peft = PeftModel::new(untied);
    let mut tok = LoraConfig::new(4, 8.0, &["q_proj"]);
    tok.trainable_token_indices = Some(serde_json::json!({"embed_tokens": [4]}));
    peft.add_adapter("default", &tok).unwrap();
    assert_eq!(peft.model.model.embed_tokens.adapters[0].indices, vec![4]);
    assert_eq!(
        (peft.model.lm_head(hidden) - head_before)
            .abs()
            .max()
            .into_scalar(),
        0.0
    );
    tok.trainable_token_indices = Some(serde_json::json!({"lm_head": [4]}));
    let err = peft.add_adapter("b", &tok).unwrap_err().to_string();
    assert!(
        err.contains("`lm_head`") && err.contains("model.embed_tokens"),
        "{err}"
    );
}

/// Draws every adapter's B from N(0, std), so that the adapters change the output.
fn randomize_lora_b<Bk: burn::tensor::backend::Backend>(m: &mut LlamaForCausalLM<Bk>, std: f64) {
    for (_, l) in m.lora_linears_mut() {
        for a in &mut l.adapters {
            let b = a.lora_b.val();
            a.lora_b = burn::module::Param::from_tensor(
                b.random_like(burn::tensor::Distribution::Normal(0.0, std)),
            );
        }
    }
}

/// A tiny random Llama with an aLoRA adapter on every projection (B non-zero).
fn alora_model(vocab: usize, invocation: &[u32]) -> PeftModel<B, LlamaForCausalLM<B>> {
    let model = LlamaForCausalLM::<B>::random_seeded(&LlamaConfig::tiny(vocab), &dev(), 21);
    alora_on(model, invocation)
}

fn alora_on(model: LlamaForCausalLM<B>, invocation: &[u32]) -> PeftModel<B, LlamaForCausalLM<B>> {
    let mut peft = PeftModel::new(model);
    let mut cfg = LoraConfig::new(
        4,
        8.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    cfg.alora_invocation_tokens = Some(invocation.to_vec());
    peft.add_adapter("default", &cfg).unwrap();
    randomize_lora_b(&mut peft.model, 0.2);
    peft
}

#[test]
fn alora_generation_reuses_a_base_prefix_cache_and_checks_it() {
    let inv = [7u32, 8];
    let peft = alora_model(40, &inv);
    let m = &peft.model;
    let alora = ctx();
    let base = LoraCtx {
        row_adapters: Some(vec![None]),
        ..Default::default()
    };
    let prefix = vec![1u32, 3, 9, 12, 5, 22, 30, 17];
    let full: Vec<u32> = prefix.iter().chain(&inv).copied().collect();
    let more = [11u32, 13];

    // The prefix has no invocation: with the adapter active it is computed by the base, so its
    // cache is the base's, bit for bit.
    let as_base = m.prefill(std::slice::from_ref(&prefix), 0, &base).unwrap();
    let as_alora = m.prefill(std::slice::from_ref(&prefix), 0, &alora).unwrap();
    for (a, b) in as_base.cache.iter().zip(&as_alora.cache) {
        assert_eq!(max_abs_diff(a.k.clone(), b.k.clone()), 0.0);
        assert_eq!(max_abs_diff(a.v.clone(), b.v.clone()), 0.0);
    }
    assert_eq!(as_alora.alora_start, vec![None]);

    // Base prefix cache + invocation + more tokens = one full aLoRA forward.
    let mut st = as_base.clone();
    m.extend(&mut st, &[inv.to_vec()], &alora).unwrap();
    assert_eq!(st.alora_start, vec![Some(prefix.len())]);
    m.extend(&mut st, &[more.to_vec()], &alora).unwrap();
    let all: Vec<i64> = full.iter().chain(&more).map(|&t| t as i64).collect();
    let n = all.len();
    let logits = m.forward(ids2(&all, 1, n), None, &alora);
    let last = logits
        .clone()
        .slice([0..1, n - 1..n, 0..40])
        .reshape([1, 40]);
    let err = max_abs_diff(m.next_logits(&st).unwrap(), last.clone());
    assert!(err < 1e-5, "reused prefix vs full aLoRA forward: {err}");
    peft_disabled_differs(&peft, &all, last);

    // Generation: reuse gives the tokens of a full aLoRA generate.
    let greedy = GenerationConfig::greedy(5, vec![]);
    let want = m
        .generate(std::slice::from_ref(&full), &greedy, &alora, &mut |_, _| {})
        .unwrap();
    let mut st = as_base.clone();
    m.extend(&mut st, &[inv.to_vec()], &alora).unwrap();
    let got = m.decode(&mut st, &greedy, &alora, &mut |_, _| {}).unwrap();
    assert_eq!(got, want);
    // A prompt without the invocation generates what the base generates.
    let plain = m
        .generate(
            std::slice::from_ref(&prefix),
            &greedy,
            &alora,
            &mut |_, _| {},
        )
        .unwrap();
    let based = m
        .generate(
            std::slice::from_ref(&prefix),
            &greedy,
            &base,
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(plain, based);

    // Inconsistent reuse is an error naming the row: the cache has the adapter from the first
    // invocation, and a second one moves the start.
    let mut st = m.prefill(std::slice::from_ref(&full), 0, &alora).unwrap();
    let err = m.extend(&mut st, &[inv.to_vec()], &alora).unwrap_err();
    assert!(err.to_string().contains("row 0"), "{err}");
    // A base cache that covers the invocation cannot serve the adapter.
    let mut st = m.prefill(std::slice::from_ref(&full), 0, &base).unwrap();
    let err = m.extend(&mut st, &[vec![4]], &alora).unwrap_err();
    assert!(err.to_string().contains("cannot be reused"), "{err}");
    // Chunks of different lengths, out-of-vocabulary ids.
    let mut st = m
        .prefill(&[prefix.clone(), full.clone()], 0, &alora)
        .unwrap();
    assert!(m.extend(&mut st, &[vec![1], vec![1, 2]], &alora).is_err());
    assert!(m.extend(&mut st, &[vec![1], vec![99]], &alora).is_err());
    let wrong = LoraCtx {
        alora_offsets: Some(vec![Some(1)]),
        ..Default::default()
    };
    let err = m.extend(&mut st, &[vec![1], vec![2]], &wrong).unwrap_err();
    assert!(err.to_string().contains("alora_offsets"), "{err}");
    // A decode that stopped keeps its last tokens pending; extend feeds them first.
    let stop = GenerationConfig::greedy(3, vec![want[0][0]]);
    let mut st = m.prefill(std::slice::from_ref(&full), 0, &alora).unwrap();
    let out = m.decode(&mut st, &stop, &alora, &mut |_, _| {}).unwrap();
    assert_eq!(out, vec![vec![want[0][0]]]);
    assert_eq!(st.pending(), Some(&[want[0][0]][..]));
    assert!(m.next_logits(&st).is_err());
    m.extend(&mut st, &[vec![5]], &alora).unwrap();
    assert_eq!(st.tokens[0].len(), full.len() + 2);

    // Invocation ids outside the vocabulary are refused when the adapter is added.
    let mut other = PeftModel::new(LlamaForCausalLM::<B>::random(
        &LlamaConfig::tiny(40),
        &dev(),
    ));
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj"]);
    cfg.alora_invocation_tokens = Some(vec![7, 40]);
    let err = other.add_adapter("x", &cfg).unwrap_err();
    assert!(
        err.to_string().contains("alora_invocation_tokens") && err.to_string().contains("40"),
        "{err}"
    );
}

/// The adapter matters after the invocation (else the reuse check above proves nothing).
fn peft_disabled_differs(
    peft: &PeftModel<B, LlamaForCausalLM<B>>,
    all: &[i64],
    last: Tensor<B, 2>,
) {
    let mut p = PeftModel::new(peft.model.clone());
    p.set_adapters_disabled(true).unwrap();
    let n = all.len();
    let v = p.model.config.vocab_size;
    let base = p
        .model
        .forward(ids2(all, 1, n), None, &ctx())
        .slice([0..1, n - 1..n, 0..v])
        .reshape([1, v]);
    assert!(max_abs_diff(base, last) > 1e-3);
}

/// aLoRA turn after a long shared context: prefill everything with the adapter (what plain
/// LoRA must do) vs reuse the base model's cache of the context and compute only the
/// invocation. `cargo test -p llama --release --test llama bench_alora -- --ignored --nocapture`
/// (sizes: ALORA_BENCH_CTX, default 1024 tokens; ALORA_BENCH_NEW, default 16).
#[test]
#[ignore]
fn bench_alora_kv_reuse() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (ctx_len, new) = (env("ALORA_BENCH_CTX", 1024), env("ALORA_BENCH_NEW", 16));
    let cfg = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        max_position_embeddings: 8192,
        ..LlamaConfig::tiny(2048)
    };
    let inv = [2000u32, 2001, 2002, 2003];
    let peft = alora_on(LlamaForCausalLM::<B>::random_seeded(&cfg, &dev(), 3), &inv);
    let m = &peft.model;
    let context: Vec<u32> = (0..ctx_len).map(|i| (i * 37 % 1990) as u32 + 1).collect();
    let full: Vec<u32> = context.iter().chain(&inv).copied().collect();
    let base = LoraCtx {
        row_adapters: Some(vec![None]),
        ..Default::default()
    };
    let greedy = GenerationConfig::greedy(new, vec![]);
    // The base has already read the context (e.g. while writing its own answer).
    let t = std::time::Instant::now();
    let base_state = m.prefill(std::slice::from_ref(&context), 0, &base).unwrap();
    let base_prefill = t.elapsed().as_secs_f64();
    let mut runs = (Vec::new(), Vec::new());
    let mut toks = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut st = m.prefill(std::slice::from_ref(&full), 0, &ctx()).unwrap();
        toks.0 = m.decode(&mut st, &greedy, &ctx(), &mut |_, _| {}).unwrap();
        runs.0.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let mut st = base_state.clone();
        m.extend(&mut st, &[inv.to_vec()], &ctx()).unwrap();
        toks.1 = m.decode(&mut st, &greedy, &ctx(), &mut |_, _| {}).unwrap();
        runs.1.push(t.elapsed().as_secs_f64());
    }
    assert_eq!(toks.0, toks.1, "reuse changed the generated tokens");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (full_s, reuse_s) = (median(&mut runs.0), median(&mut runs.1));
    println!(
        "aLoRA turn, context {ctx_len} + invocation {} tokens, {new} new tokens (hidden 256, 4 layers, NdArray CPU):\n  \
         without reuse (prefill {} tokens with the adapter + decode): {full_s:.3} s = {:.1} new tokens/s\n  \
         with the base prefix cache reused (prefill {} tokens + decode): {reuse_s:.3} s = {:.1} new tokens/s ({:.1}x)\n  \
         (the base's own prefill of the context, done once and shared: {base_prefill:.3} s)",
        inv.len(),
        full.len(),
        new as f64 / full_s,
        inv.len(),
        new as f64 / reuse_s,
        full_s / reuse_s
    );
}

/// Two rows of six tokens, the second right-padded: ids, attention mask and labels (prompt and
/// padding at -100), for the checkpointed-backward tests.
fn padded_pair() -> [Tensor<Autodiff<B>, 2, Int>; 3] {
    let t =
        |v: Vec<i64>| Tensor::<Autodiff<B>, 2, Int>::from_data(TensorData::new(v, [2, 6]), &dev());
    [
        t(vec![1, 3, 7, 9, 12, 5, 4, 7, 7, 2, 0, 0]),
        t(vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
        t(vec![-100, -100, 7, 9, 12, 5, -100, 7, 7, 2, -100, -100]),
    ]
}

type AdGrads = <Autodiff<B> as burn::tensor::backend::AutodiffBackend>::Gradients;

/// Adds every adapter tensor's gradient in `g` (LoRA A/B, trainable token rows) into `acc`, by
/// parameter path (absent gradients add nothing).
fn add_adapter_grads(
    m: &LlamaForCausalLM<Autodiff<B>>,
    g: &AdGrads,
    acc: &mut std::collections::BTreeMap<String, Vec<f32>>,
) {
    let mut put = |name: String, t: Option<Tensor<B, 2>>| {
        if let Some(t) = t {
            let v = t.into_data().to_vec::<f32>().unwrap();
            let e = acc.entry(name).or_insert_with(|| vec![0.0; v.len()]);
            e.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
    };
    for (path, l) in m.lora_linears() {
        for a in &l.adapters {
            put(format!("{path}.lora_A"), a.lora_a.val().grad(g));
            put(format!("{path}.lora_B"), a.lora_b.val().grad(g));
        }
    }
    for (path, t) in m.token_tables() {
        for a in &t.adapters {
            put(format!("{path}.delta"), a.delta.val().grad(g));
        }
    }
}

/// Per-layer checkpointing: the same loss and the same gradients as one plain backward (every
/// LoRA A/B of every layer and the trainable token rows), on a padded batch with GQA.
#[test]
fn per_layer_checkpointing_gives_the_plain_loss_and_gradients() {
    type Ad = Autodiff<B>;
    let base = LlamaForCausalLM::<Ad>::random_seeded(&LlamaConfig::tiny(50), &dev(), 31);
    let mut peft = PeftModel::new(base);
    let mut cfg = LoraConfig::new(
        4,
        8.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    cfg.trainable_token_indices = Some(serde_json::json!([3, 7, 9]));
    peft.add_adapter("default", &cfg).unwrap();
    randomize_lora_b(&mut peft.model, 0.2);
    let m = &peft.model;
    let [ids, mask, labels] = padded_pair();
    let plain = m.loss(
        ids.clone(),
        Some(mask.clone()),
        labels.clone(),
        LossOptions::default(),
        &LoraCtx::default(),
    );
    let want_loss: f32 = plain.clone().into_scalar();
    let mut want = std::collections::BTreeMap::new();
    add_adapter_grads(m, &(plain * 0.5).backward(), &mut want);
    let (mut got, mut parts) = (std::collections::BTreeMap::new(), 0);
    let out = m.backward_checkpointed(
        ids,
        Some(mask),
        labels,
        LossOptions::default(),
        &LoraCtx::default(),
        0.5,
        |g| {
            parts += 1;
            add_adapter_grads(m, g, &mut got);
        },
    );
    // head + 2 layers + the embedding (it has trainable rows)
    assert_eq!(parts, 4);
    let got_loss: f32 = out.loss.into_scalar();
    assert!(
        (got_loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
        "{got_loss} vs {want_loss}"
    );
    assert_eq!(want.len(), 2 * 7 * 2 + 1);
    assert_eq!(got.len(), want.len());
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert!(
            !w.is_empty() && w.iter().any(|x| *x != 0.0),
            "{name}: no gradient"
        );
        assert_eq!(w.len(), g.len(), "{name}");
        let scale = test_support::host::max_abs(w);
        let err = test_support::host::max_abs_diff(w, g);
        assert!(err <= 1e-5 * scale, "{name}: {err} (scale {scale})");
    }
}

/// `modules_to_save = ["lm_head", "embed_tokens"]`: the copies (not the frozen originals) get
/// gradients, through the composed head (the fused frozen-head ops would give the head none),
/// and per-layer checkpointing gives them the plain backward's gradients.
#[test]
fn modules_to_save_copies_train_with_and_without_checkpointing() {
    type Ad = Autodiff<B>;
    let mut lc = LlamaConfig::tiny(50);
    lc.tie_word_embeddings = false;
    let mut peft = PeftModel::new(LlamaForCausalLM::<Ad>::random_seeded(&lc, &dev(), 33));
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
    peft.add_adapter("default", &cfg).unwrap();
    let m = &peft.model;
    assert!(m.head_trains());
    let copies = |g: &AdGrads, acc: &mut std::collections::BTreeMap<String, Vec<f32>>| {
        let mut put = |name: String, t: Option<Tensor<B, 2>>| {
            if let Some(t) = t {
                let v = t.into_data().to_vec::<f32>().unwrap();
                let e = acc.entry(name).or_insert_with(|| vec![0.0; v.len()]);
                e.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
        };
        for (path, h) in m.head_linears() {
            assert!(
                h.weight.val().grad(g).is_none(),
                "{path}: the original trains"
            );
            put(path, h.saved.get("default").unwrap().weight.val().grad(g));
        }
        for (path, t) in m.token_tables() {
            assert!(
                t.weight.val().grad(g).is_none(),
                "{path}: the original trains"
            );
            put(path, t.saved.get("default").unwrap().weight.val().grad(g));
        }
    };
    let [ids, mask, labels] = padded_pair();
    let plain = m.loss(
        ids.clone(),
        Some(mask.clone()),
        labels.clone(),
        LossOptions::default(),
        &LoraCtx::default(),
    );
    let mut want = std::collections::BTreeMap::new();
    copies(&plain.backward(), &mut want);
    let mut got = std::collections::BTreeMap::new();
    m.backward_checkpointed(
        ids,
        Some(mask),
        labels,
        LossOptions::default(),
        &LoraCtx::default(),
        1.0,
        |g| copies(g, &mut got),
    );
    let names: Vec<&String> = want.keys().collect();
    assert_eq!(names, vec!["lm_head", "model.embed_tokens"]);
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert!(w.iter().any(|x| *x != 0.0), "{name}: no gradient");
        let err = test_support::host::max_abs_diff(w, g);
        let scale = test_support::host::max_abs(w);
        assert!(err <= 1e-5 * scale, "{name}: {err} (scale {scale})");
    }
}

/// With LoRA dropout, the unrecorded forward and the recomputation of each checkpointed layer
/// draw the same masks: the gradient equals the central difference of the loss the forward
/// returned (with the masks fixed by restarting the seed sequence), and another seed gives
/// another loss (dropout is on in the unrecorded forward).
#[test]
fn per_layer_checkpointing_keeps_dropout_masks_consistent() {
    // Burn's RNG and the seed sequence are process-wide and the other tests draw from them in
    // parallel: run the body alone, in a child process of this test binary.
    const CHILD: &str = "LLAMA_TEST_DROPOUT_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "per_layer_checkpointing_keeps_dropout_masks_consistent",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child run failed:\n{text}"
        );
        return;
    }
    type Ad = Autodiff<B>;
    let base = LlamaForCausalLM::<Ad>::random_seeded(&LlamaConfig::tiny(50), &dev(), 33);
    let mut peft = PeftModel::new(base);
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    cfg.lora_dropout = 0.5;
    peft.add_adapter("default", &cfg).unwrap();
    randomize_lora_b(&mut peft.model, 0.5);
    let t = |v: Vec<i64>| Tensor::<Ad, 2, Int>::from_data(TensorData::new(v, [2, 6]), &dev());
    let ids = t(vec![1, 3, 7, 9, 12, 5, 4, 7, 7, 2, 30, 31]);
    let labels = t(vec![-100, 3, 7, 9, 12, 5, -100, 7, 7, 2, 30, 31]);
    let a_of =
        |m: &LlamaForCausalLM<Ad>| m.model.layers[0].self_attn.q_proj.adapters[0].lora_a.val();
    let run = |m: &LlamaForCausalLM<Ad>, seed: u64| {
        llama::checkpoint::restart_seeds(seed);
        let a = a_of(m);
        let mut grad = None;
        let out = m.backward_checkpointed(
            ids.clone(),
            None,
            labels.clone(),
            LossOptions::default(),
            &LoraCtx::default(),
            1.0,
            |g| {
                if let Some(x) = a.grad(g) {
                    grad = Some(x.into_data().to_vec::<f32>().unwrap());
                }
            },
        );
        let loss: f32 = out.loss.into_scalar();
        (loss as f64, grad)
    };
    let (loss, grad) = run(&peft.model, 1000);
    let grad = grad.expect("layer 0 q_proj lora_A has a gradient");
    let (other, _) = run(&peft.model, 2000);
    assert!(
        (other - loss).abs() > 1e-4,
        "dropout off? {loss} vs {other}"
    );
    // The entry with the largest gradient, moved by +-eps with the same seeds.
    let (idx, g) = grad.iter().enumerate().fold((0, 0f32), |best, (i, v)| {
        if v.abs() > best.1.abs() {
            (i, *v)
        } else {
            best
        }
    });
    let eps = 1e-2f32;
    let shifted = |delta: f32| {
        let mut m = peft.model.clone();
        let a = &mut m.model.layers[0].self_attn.q_proj.adapters[0];
        let shape = a.lora_a.shape();
        let mut v = a.lora_a.val().into_data().to_vec::<f32>().unwrap();
        v[idx] += delta;
        a.lora_a = burn::module::Param::from_tensor(
            Tensor::<Ad, 2>::from_data(TensorData::new(v, shape), &dev()).require_grad(),
        );
        run(&m, 1000).0
    };
    let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
    assert!(
        (fd - g as f64).abs() <= 0.02 * (g as f64).abs() + 1e-4,
        "gradient {g} vs central difference {fd}"
    );
}
