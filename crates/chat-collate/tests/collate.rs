//! Collation, datasets and bad input, with the demo tokenizer (always) and the real Llama 3
//! tokenizer (ignored tests: run them with `-- --ignored` and `LLAMA3_TOKENIZER_DIR` naming its
//! directory or its tokenizer.json; they fail when it is unset or wrong).

use std::path::PathBuf;

use burn::backend::NdArray;
use chat_collate::hub::HubOptions;
use chat_collate::news2stock::{self, NewsRow, StockAnswer};
use chat_collate::*;
use tokenizers::Tokenizer;

type B = NdArray;

fn fixtures() -> PathBuf {
    test_support::fixtures_dir().join("collate")
}

fn tmp_dir(name: &str) -> PathBuf {
    test_support::fresh_temp_dir("chat-collate", name)
}

fn sample_rows() -> Vec<NewsRow> {
    news2stock::load_sample().unwrap()
}

fn multi_turn() -> Conversation {
    Conversation::new(vec![
        Message::system("간결하게 답하세요."),
        Message::user("한빛전자 공급 계약 규모는?"),
        Message::assistant("  3천억원입니다.  "),
        Message::user("계약 기간은?"),
        Message::assistant("2년입니다."),
        Message::user("고마워요"),
        Message::assistant("{\"ok\": true}"),
    ])
}

fn collator(cfg: CollatorConfig) -> ChatCollator {
    ChatCollator::new(demo_tokenizer(), cfg).unwrap()
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

/// Every labelled run decodes to an answer (trimmed) plus `<|eot_id|>`.
fn assert_runs_are_answers(tok: &Tokenizer, enc: &Encoded, answers: &[&str]) {
    let runs: Vec<String> = enc.label_runs().iter().map(|r| decode(tok, r)).collect();
    let want: Vec<String> = answers
        .iter()
        .map(|a| format!("{}<|eot_id|>", a.trim()))
        .collect();
    assert_eq!(runs, want);
}

// ---------------------------------------------------------------- demo tokenizer

#[test]
fn demo_tokenizer_is_small_deterministic_and_round_trips_korean() {
    let tok = demo_tokenizer();
    assert!(tok.get_vocab_size(true) <= DEMO_VOCAB_SIZE);
    assert_eq!(
        SpecialIds::from_tokenizer(&tok).unwrap(),
        demo_special_ids()
    );
    let rows = sample_rows();
    let again = train_byte_level_bpe(
        std::iter::once("system user assistant".to_string()).chain(
            rows.iter()
                .flat_map(|r| [r.system.clone(), r.user.clone(), r.assistant.clone()]),
        ),
        DEMO_VOCAB_SIZE,
    )
    .unwrap();
    assert_eq!(again.get_vocab(true), tok.get_vocab(true));
    let text = "코스피가 1% 하락했다. 새 문장 🙂 without training data: ñ";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(decode(&tok, enc.get_ids()), text);
    // Typical samples fit the CPU demo's ~400-token budget.
    let c = collator(CollatorConfig::llama3(4096));
    let lens: Vec<usize> = rows
        .iter()
        .map(|r| {
            c.encode(&news2stock::to_conversation(r))
                .unwrap()
                .unwrap()
                .len()
        })
        .collect();
    let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    assert!(mean < 400.0, "mean {mean}");
    assert!(*lens.iter().max().unwrap() < 450, "{lens:?}");
}

// ---------------------------------------------------------------- collation

#[test]
fn llama3_labels_cover_each_answer_and_its_eot() {
    let c = collator(CollatorConfig::llama3(1024));
    let tok = c.tokenizer().clone();
    let ids = demo_special_ids();
    let conv = multi_turn();
    let enc = c.encode(&conv).unwrap().unwrap();
    assert_eq!(enc.input_ids[0], ids.begin_of_text);
    assert_eq!(
        enc.input_ids
            .iter()
            .filter(|&&t| t == ids.begin_of_text)
            .count(),
        1
    );
    assert_eq!(enc.labels.len(), enc.input_ids.len());
    assert_runs_are_answers(
        &tok,
        &enc,
        &["3천억원입니다.", "2년입니다.", "{\"ok\": true}"],
    );
    // The ids are the rendered text, and every non-label is -100.
    let text = c.render(&conv).unwrap().text;
    assert_eq!(decode(&tok, &enc.input_ids), text);
    assert!(
        text.contains("<|start_header_id|>assistant<|end_header_id|>\n\n3천억원입니다.<|eot_id|>")
    );
    for (&id, &l) in enc.input_ids.iter().zip(&enc.labels) {
        assert!(l == IGNORE_INDEX || l == i64::from(id));
    }
    // First turn only, as the tutorial does.
    let first = collator(CollatorConfig {
        label_all_assistant_turns: false,
        ..CollatorConfig::llama3(1024)
    });
    assert_runs_are_answers(
        &tok,
        &first.encode(&conv).unwrap().unwrap(),
        &["3천억원입니다."],
    );
}

#[test]
fn news2stock_sample_labels_decode_to_the_json_answer() {
    let c = collator(CollatorConfig::llama3(1024));
    let tok = c.tokenizer().clone();
    for row in sample_rows().iter().take(10) {
        let enc = c
            .encode(&news2stock::to_conversation(row))
            .unwrap()
            .unwrap();
        assert_runs_are_answers(&tok, &enc, &[&row.assistant]);
    }
    let row = &sample_rows()[0];
    assert!(row
        .assistant
        .starts_with("{\"stock_related\": true, \"summary\": "));
    assert_eq!(row.answer.as_ref().unwrap().to_json(), row.assistant);
}

#[test]
fn builtin_llama3_equals_meta_jinja_template() {
    let builtin = collator(CollatorConfig::llama3(1024));
    let jinja = collator(CollatorConfig {
        format: ChatFormat::Jinja(JinjaTemplate::llama3()),
        ..CollatorConfig::llama3(1024)
    });
    for conv in [multi_turn(), news2stock::to_conversation(&sample_rows()[3])] {
        assert_eq!(builtin.render(&conv).unwrap(), jinja.render(&conv).unwrap());
        assert_eq!(builtin.encode(&conv).unwrap(), jinja.encode(&conv).unwrap());
        let prompt = &conv.messages[..conv.messages.len() - 1];
        for gen in [false, true] {
            assert_eq!(
                builtin.render_prompt(prompt, gen).unwrap(),
                jinja.render_prompt(prompt, gen).unwrap()
            );
        }
        assert_eq!(
            builtin.prompt_ids(prompt).unwrap(),
            jinja.prompt_ids(prompt).unwrap()
        );
    }
}

#[test]
fn jinja_templates_that_are_not_prefix_stable_still_label_answers() {
    // Llama 3.1 style: a system preamble with a date, and a trailer only without a prompt.
    let template = "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ strftime_now('%d %b %Y') }}<|eot_id|>{% endif %}\n{% for m in messages %}\n<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>\n{% endfor %}\n{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% else %}<|end_of_text|>{% endif %}";
    let t = JinjaTemplate {
        template: template.into(),
        ..JinjaTemplate::llama3()
    };
    let c = collator(CollatorConfig {
        format: ChatFormat::Jinja(t),
        ..CollatorConfig::llama3(1024)
    });
    let mut conv = multi_turn();
    conv.messages.remove(0);
    let r = c.render(&conv).unwrap();
    assert!(
        r.text.ends_with("<|eot_id|>\n<|end_of_text|>"),
        "{}",
        r.text
    );
    let enc = c.encode(&conv).unwrap().unwrap();
    assert_runs_are_answers(
        c.tokenizer(),
        &enc,
        &["3천억원입니다.", "2년입니다.", "{\"ok\": true}"],
    );
    // A template that raises is an error, not a panic.
    let bad = JinjaTemplate {
        template: "{{ raise_exception('Conversation roles must alternate') }}".into(),
        ..JinjaTemplate::llama3()
    };
    let c = collator(CollatorConfig {
        format: ChatFormat::Jinja(bad),
        ..CollatorConfig::llama3(64)
    });
    assert!(matches!(c.encode(&conv), Err(Error::Template(m)) if m.contains("alternate")));
}

#[test]
fn no_double_bos_when_the_template_repeats_it() {
    let t = JinjaTemplate {
        template: format!("{{{{ bos_token }}}}{LLAMA3_CHAT_TEMPLATE}"),
        ..JinjaTemplate::llama3()
    };
    let c = collator(CollatorConfig {
        format: ChatFormat::Jinja(t),
        ..CollatorConfig::llama3(1024)
    });
    let bos = demo_special_ids().begin_of_text;
    let enc = c.encode(&multi_turn()).unwrap().unwrap();
    assert_eq!(enc.input_ids.iter().filter(|&&t| t == bos).count(), 1);
    let prompt = c.prompt_ids(&multi_turn().messages[..2]).unwrap();
    assert_eq!(prompt.iter().filter(|&&t| t == bos).count(), 1);
}

#[test]
fn chat_format_comes_from_tokenizer_config() {
    let dir = tmp_dir("tokcfg");
    assert_eq!(
        ChatFormat::from_tokenizer_config(&dir).unwrap(),
        ChatFormat::Llama3
    );
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": false},
        "eos_token": "<|eot_id|>",
        "pad_token": "!",
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3_CHAT_TEMPLATE}],
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let ChatFormat::Jinja(t) = ChatFormat::from_tokenizer_config(&dir).unwrap() else {
        panic!("expected a Jinja template");
    };
    assert_eq!(t.template, LLAMA3_CHAT_TEMPLATE);
    assert_eq!(
        (t.bos_token.as_str(), t.eos_token.as_str()),
        (BEGIN_OF_TEXT, EOT)
    );
    assert_eq!(t.extra_tokens["pad_token"], "!");
    std::fs::write(dir.join("tokenizer_config.json"), "{\"chat_template\": 3}").unwrap();
    let err = ChatFormat::from_tokenizer_config(dir.join("tokenizer_config.json")).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn collator_config_round_trips_through_json() {
    let cfg = CollatorConfig {
        format: ChatFormat::Jinja(JinjaTemplate::llama3()),
        ..CollatorConfig::tutorial(512)
    };
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<CollatorConfig>(&json).unwrap(), cfg);
}

#[test]
fn truncation_policies() {
    let conv = news2stock::to_conversation(&sample_rows()[0]);
    let full = collator(CollatorConfig::llama3(4096))
        .encode(&conv)
        .unwrap()
        .unwrap();
    let max = full.len() - 5;
    let with = |truncation| {
        collator(CollatorConfig {
            truncation,
            ..CollatorConfig::llama3(max)
        })
    };
    let cut = with(TruncationPolicy::Truncate)
        .encode(&conv)
        .unwrap()
        .unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids, full.input_ids[..max]);
    assert_eq!(cut.labels, full.labels[..max]);
    assert_eq!(with(TruncationPolicy::Skip).encode(&conv).unwrap(), None);
    let err = with(TruncationPolicy::Error).encode(&conv).unwrap_err();
    assert!(
        matches!(err, Error::TooLong { len, max_length } if len == full.len() && max_length == max)
    );
    // Over a dataset: skips are counted, errors carry the sample index.
    let convs = vec![multi_turn(), conv.clone(), multi_turn()];
    let (samples, report) = with(TruncationPolicy::Skip).encode_all(&convs).unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(report.skipped_too_long, [(1, full.len())]);
    assert!(report.to_string().contains("1 skipped as too long"));
    let err = with(TruncationPolicy::Error)
        .encode_all(&convs)
        .unwrap_err();
    assert!(matches!(err, Error::Sample { index: 1, .. }), "{err}");
    // Truncation that leaves no label is a counted skip, not an empty sample.
    let tiny = collator(CollatorConfig {
        truncation: TruncationPolicy::Truncate,
        ..CollatorConfig::llama3(20)
    });
    let (samples, report) = tiny.encode_all(&[conv]).unwrap();
    assert!(samples.is_empty());
    assert_eq!(report.skipped_no_labels, [0]);
}

#[test]
fn bad_conversations_are_errors() {
    let c = collator(CollatorConfig::llama3(256));
    let empty_answer = Conversation::new(vec![Message::user("q"), Message::assistant("  ")]);
    assert!(matches!(
        c.encode(&empty_answer),
        Err(Error::EmptyAnswer { turn: 1 })
    ));
    let no_answer = Conversation::new(vec![Message::user("q")]);
    assert!(matches!(c.encode(&no_answer), Err(Error::NoAssistantTurn)));
    assert!(matches!(
        c.encode(&Conversation::default()),
        Err(Error::EmptyConversation)
    ));
    let err = c.encode_all(&[multi_turn(), empty_answer]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "sample 1: message 1 (assistant) has empty content"
    );
}

#[test]
fn parallel_encoding_matches_sequential() {
    let c = collator(CollatorConfig::llama3(360));
    let convs: Vec<Conversation> = sample_rows()
        .iter()
        .map(news2stock::to_conversation)
        .collect();
    let (a, ra) = c.encode_all(&convs).unwrap();
    let (b, rb) = c.encode_all_parallel(&convs, 3).unwrap();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    assert_eq!(ra.encoded + ra.skipped(), convs.len());
}

#[test]
fn generation_prompt_ends_with_the_assistant_header() {
    let c = collator(CollatorConfig::llama3(1024));
    let row = &sample_rows()[0];
    let ids = c.prompt_ids(&news2stock::prompt_messages(row)).unwrap();
    let text = decode(c.tokenizer(), &ids);
    assert!(text.starts_with(BEGIN_OF_TEXT));
    assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    assert!(!text.contains(&row.assistant));
}

// ---------------------------------------------------------------- tutorial parity

#[derive(serde::Deserialize)]
struct Expected {
    messages: Vec<Message>,
    input_ids: Vec<u32>,
    labels: Vec<i64>,
}

fn check_tutorial_fixture(tok: Tokenizer, key: &str) {
    let path = fixtures().join("tutorial_expected.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max_length = doc["max_length"].as_u64().unwrap() as usize;
    let c = ChatCollator::new(tok, CollatorConfig::tutorial(max_length)).unwrap();
    let rows = sample_rows();
    let cases = doc[key].as_array().unwrap();
    assert!(cases.len() >= 8);
    for (i, case) in cases.iter().enumerate() {
        let e: Expected = serde_json::from_value(case.clone()).unwrap();
        if let Some(row) = case.get("sample_row").and_then(|v| v.as_u64()) {
            // The Python side built the same messages from the same row.
            assert_eq!(
                news2stock::to_conversation(&rows[row as usize]).messages,
                e.messages
            );
        }
        let enc = c.encode(&Conversation::new(e.messages)).unwrap().unwrap();
        assert_eq!(
            enc.input_ids, e.input_ids,
            "{key} case {i}: ids (regenerate with scripts/collate_reference.py)"
        );
        assert_eq!(enc.labels, e.labels, "{key} case {i}: labels");
    }
}

#[test]
fn tutorial_mode_matches_python_reference_with_demo_tokenizer() {
    check_tutorial_fixture(demo_tokenizer(), "demo");
}

/// Regenerates `fixtures/collate/demo_tokenizer.json`, which the Python reference reads.
#[test]
#[ignore = "writes a fixture; run when the demo tokenizer changes"]
fn write_demo_tokenizer_fixture() {
    std::fs::create_dir_all(fixtures()).unwrap();
    demo_tokenizer()
        .save(fixtures().join("demo_tokenizer.json"), false)
        .unwrap();
}

// ---------------------------------------------------------------- padding, packing, batches

#[test]
fn padding_and_burn_tensors() {
    let c = collator(CollatorConfig::llama3(1024));
    let a = c.encode(&multi_turn()).unwrap().unwrap();
    let b = c
        .encode(&news2stock::to_conversation(&sample_rows()[1]))
        .unwrap()
        .unwrap();
    let pad = demo_special_ids().pad();
    let cfg = PadConfig {
        pad_to_multiple_of: Some(8),
        ..PadConfig::right(pad)
    };
    let batch = pad_batch(&[&a, &b], &cfg);
    let seq = a.len().max(b.len()).div_ceil(8) * 8;
    assert_eq!((batch.batch_size, batch.seq_len), (2, seq));
    assert_eq!(batch.input_ids[a.len()], i64::from(pad));
    assert_eq!(batch.labels[a.len()], IGNORE_INDEX);
    assert_eq!(batch.n_tokens(), a.len() + b.len());
    let device = Default::default();
    let t: TrainBatch<B> = ChatBatcher { pad: cfg }.collate(&[a.clone(), b.clone()], &device);
    assert_eq!(t.input_ids.dims(), [2, seq]);
    assert_eq!(t.labels.dims(), [2, seq]);
    let mask: Vec<i64> = t
        .attention_mask
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(mask, batch.attention_mask);
    let labels: Vec<i64> = t.labels.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(labels, batch.labels);
    // Generation: left padding puts every prompt's end in the last column.
    let p = pad_prompts(&[vec![0, 7, 8], vec![0, 9]], pad);
    assert_eq!(p.input_ids, [0, 7, 8, i64::from(pad), 0, 9]);
    assert_eq!(p.attention_mask, [1, 1, 1, 0, 1, 1]);
}

#[test]
fn packing_keeps_samples_apart() {
    let c = collator(CollatorConfig::llama3(1024));
    let convs: Vec<Conversation> = sample_rows()[..6]
        .iter()
        .map(news2stock::to_conversation)
        .collect();
    let (samples, _) = c.encode_all(&convs).unwrap();
    let packed = pack(&samples, 1024);
    assert!(packed.len() < samples.len());
    assert_eq!(
        packed.iter().map(Encoded::len).sum::<usize>(),
        samples.iter().map(Encoded::len).sum::<usize>()
    );
    assert_eq!(
        packed.iter().map(Encoded::n_label_tokens).sum::<usize>(),
        samples.iter().map(Encoded::n_label_tokens).sum::<usize>()
    );
    let batch = pad_batch(&packed, &PadConfig::right(demo_special_ids().pad()));
    let first = packed[0].segment_lengths[0];
    assert!(packed[0].segment_lengths.len() >= 2);
    // Positions restart and attention stops at the boundary.
    assert_eq!(batch.position_ids[first], 0);
    assert_eq!(batch.segment_ids[first - 1], 1);
    assert_eq!(batch.segment_ids[first], 2);
    assert!(batch.may_attend(0, first - 1, 0));
    assert!(!batch.may_attend(0, first, first - 1));
    assert!(!batch.may_attend(0, 0, 1));
    let small = pad_batch(&packed[..1], &PadConfig::right(0));
    let m = small.attention_mask_4d::<B>(&Default::default());
    assert_eq!(m.dims(), [1, 1, small.seq_len, small.seq_len]);
}

#[test]
fn bucketing_cuts_padding_on_the_sample() {
    let c = collator(CollatorConfig::llama3(1024));
    let convs: Vec<Conversation> = sample_rows()
        .iter()
        .map(news2stock::to_conversation)
        .collect();
    let (samples, _) = c.encode_all(&convs).unwrap();
    let lengths: Vec<usize> = samples.iter().map(Encoded::len).collect();
    let plain = shuffled_batches(lengths.len(), 4, 7, 0);
    let bucketed = bucketed_batches(&lengths, 4, 8, 7, 0);
    assert!(padding_fraction(&lengths, &bucketed) < padding_fraction(&lengths, &plain));
    assert_eq!(bucketed, bucketed_batches(&lengths, 4, 8, 7, 0));
}

// ---------------------------------------------------------------- datasets

#[test]
fn bundled_sample_shape() {
    let rows = sample_rows();
    assert!((45..=60).contains(&rows.len()));
    assert!(std::fs::metadata(news2stock::sample_path()).unwrap().len() < 100_000);
    let unrelated = rows
        .iter()
        .filter(|r| !r.answer.as_ref().unwrap().stock_related)
        .count();
    assert!(unrelated >= 3);
    for r in &rows {
        let chars = r.user.chars().count();
        assert!((150..=400).contains(&chars), "{chars}");
        assert!(r.user.starts_with("[가상뉴스]"));
    }
    let (from_file, report) = news2stock::load_jsonl(news2stock::sample_path()).unwrap();
    assert_eq!(from_file, rows);
    assert_eq!(
        (report.rows_read, report.rows_loaded),
        (rows.len(), rows.len())
    );
}

#[test]
fn splits() {
    let rows: Vec<usize> = (0..51).collect();
    let (train, test) = news2stock::tutorial_split(&rows);
    assert_eq!(test, (0..10).collect::<Vec<_>>());
    assert_eq!(train, (10..51).collect::<Vec<_>>());
    let (a_train, a_test) = news2stock::shuffle_split(&rows, 0.2, 42).unwrap();
    let (b_train, b_test) = news2stock::shuffle_split(&rows, 0.2, 42).unwrap();
    assert_eq!((&a_train, &a_test), (&b_train, &b_test));
    assert_eq!(a_test.len(), 10);
    let mut all = [a_train, a_test].concat();
    all.sort();
    assert_eq!(all, rows);
    assert_ne!(news2stock::shuffle_split(&rows, 0.2, 43).unwrap().1, b_test);
    assert!(news2stock::shuffle_split(&rows, 1.5, 0).is_err());
}

#[test]
fn parquet_round_trip_struct_and_string() {
    let rows = sample_rows();
    let dir = tmp_dir("parquet");
    for (name, column) in [
        ("s.parquet", AssistantColumn::Struct),
        ("j.parquet", AssistantColumn::JsonString),
    ] {
        let path = dir.join(name);
        write_news_parquet(&rows, &path, column).unwrap();
        let (back, report) = news2stock::load_parquet(&path).unwrap();
        assert_eq!(back, rows);
        assert_eq!(report.rows_loaded, rows.len());
        assert_eq!(
            news2stock::load_file(&path, BadRowPolicy::Error).unwrap().0,
            rows
        );
    }
}

#[test]
fn parquet_written_by_pyarrow_struct_with_list_null_and_json_string() {
    let rows = sample_rows();
    for name in ["news2stock_struct.parquet", "news2stock_string.parquet"] {
        let (back, _) = news2stock::load_parquet(fixtures().join(name)).unwrap();
        assert!(!back.is_empty());
        for r in &back {
            let orig = rows.iter().find(|o| o.user == r.user).unwrap();
            assert_eq!(r.answer, orig.answer, "{name}");
            assert_eq!(
                news2stock::to_conversation(r),
                news2stock::to_conversation(orig)
            );
        }
    }
}

#[test]
fn hub_loader_lists_the_cache_when_offline() {
    let cache = tmp_dir("hf-cache");
    let repo_dir = cache.join("datasets--capybaraOh--naver-economy-news2stock");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo_dir.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let rows = sample_rows();
    write_news_parquet(
        &rows[..20],
        snap.join("train-00000-of-00002.parquet"),
        AssistantColumn::Struct,
    )
    .unwrap();
    write_news_parquet(
        &rows[20..],
        snap.join("train-00001-of-00002.parquet"),
        AssistantColumn::Struct,
    )
    .unwrap();
    std::fs::write(snap.join("README.md"), "not parquet").unwrap();
    let opts = HubOptions {
        cache_dir: cache.clone(),
        token: None,
        endpoint: None,
        offline: true,
    };
    let (back, report) = news2stock::load_hub_with(
        &opts,
        news2stock::HUB_REPO,
        None,
        "train",
        BadRowPolicy::Error,
    )
    .unwrap();
    assert_eq!(back, rows);
    assert_eq!(report.sources.len(), 2);
    let missing =
        news2stock::load_hub_with(&opts, "someone/else", None, "train", BadRowPolicy::Error);
    assert!(matches!(missing, Err(Error::Hub(m)) if m.contains("HF_HUB_OFFLINE")));
}

#[test]
fn generic_chat_jsonl() {
    let dir = tmp_dir("chat");
    let path = dir.join("chat.jsonl");
    let good = serde_json::json!({"messages": multi_turn().messages});
    std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
    let (convs, report) = load_chat_jsonl(&path).unwrap();
    assert_eq!(convs, [multi_turn(), multi_turn()]);
    assert_eq!(report.rows_read, 2);
}

// ---------------------------------------------------------------- bad input

fn row_error(result: Result<impl std::fmt::Debug>) -> RowIssue {
    match result {
        Err(Error::Row(issue)) => issue,
        other => panic!("expected a row error, got {other:?}"),
    }
}

#[test]
fn bad_rows_name_file_row_and_field() {
    let dir = tmp_dir("bad");
    let good = serde_json::to_string(&serde_json::json!({
        "system": "s", "user": "기사", "assistant": {"stock_related": false, "summary": "요약",
        "positive_stocks": [], "positive_keywords": [], "positive_reasons": "",
        "negative_stocks": [], "negative_keywords": null, "negative_reasons": ""}
    }))
    .unwrap();
    let cases = [
        // A row missing a field.
        (
            good.replace("\"summary\":\"요약\",", ""),
            "assistant.summary",
            "missing field",
        ),
        (
            good.replace("\"system\":\"s\",", ""),
            "system",
            "missing field",
        ),
        // Non-string content.
        (
            good.replace("\"user\":\"기사\"", "\"user\":5"),
            "user",
            "expected a string, found a number",
        ),
        (
            good.replace("\"positive_stocks\":[]", "\"positive_stocks\":[1]"),
            "assistant.positive_stocks[0]",
            "expected a string",
        ),
        // An empty assistant answer.
        (
            r#"{"system": "s", "user": "기사", "assistant": "  "}"#.to_string(),
            "assistant",
            "empty assistant answer",
        ),
        (
            r#"{"system": "s", "user": "기사", "assistant": 3}"#.to_string(),
            "assistant",
            "struct or a JSON string",
        ),
        (
            good.replace("\"summary\"", "\"extra\":1,\"summary\""),
            "assistant.extra",
            "unexpected field",
        ),
        ("{not json".to_string(), "", "invalid JSON"),
    ];
    for (i, (line, field, message)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.jsonl"));
        std::fs::write(&path, format!("{good}\n{line}\n")).unwrap();
        let issue = row_error(news2stock::load_jsonl(&path));
        assert_eq!(issue.location, RowLocation::Line(2), "case {i}");
        assert_eq!(issue.field, *field, "case {i}");
        assert!(
            issue.message.contains(message),
            "case {i}: {}",
            issue.message
        );
        let shown = Error::Row(issue).to_string();
        assert!(shown.contains(&format!("case{i}.jsonl: line 2")), "{shown}");
        // Or skipped, counted and listed.
        let (rows, report) = news2stock::load_jsonl_with(&path, BadRowPolicy::Skip).unwrap();
        assert_eq!(
            (rows.len(), report.rows_read, report.skipped.len()),
            (1, 2, 1)
        );
        assert!(report.to_string().contains("1 skipped"));
    }
    // Generic chat rows: missing field, non-string content, empty answer.
    let chat_cases = [
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}"#,
            "messages[1].content",
            "missing field",
        ),
        (
            r#"{"messages": [{"role": "user", "content": ["q"]}]}"#,
            "messages[0].content",
            "expected a string, found a list",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}"#,
            "messages[1].content",
            "empty assistant answer",
        ),
        (r#"{"conversation": []}"#, "messages", "missing field"),
    ];
    for (i, (line, field, message)) in chat_cases.iter().enumerate() {
        let path = dir.join(format!("chat{i}.jsonl"));
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let issue = row_error(load_chat_jsonl(&path));
        assert_eq!(
            (issue.location, issue.field.as_str()),
            (RowLocation::Line(1), *field)
        );
        assert!(issue.message.contains(message), "{}", issue.message);
        let (convs, report) = load_chat_jsonl_with(&path, BadRowPolicy::Skip).unwrap();
        assert_eq!((convs.len(), report.skipped.len()), (0, 1));
    }
}

#[test]
fn bad_parquet_rows_and_corrupt_files() {
    let dir = tmp_dir("badpq");
    // Written by pyarrow: a null summary in row 1, and a struct without `summary`.
    for (name, row, message) in [
        (
            "news2stock_null_summary.parquet",
            1,
            "expected a string, found null",
        ),
        ("news2stock_no_summary.parquet", 0, "missing field"),
    ] {
        let issue = row_error(news2stock::load_parquet(fixtures().join(name)));
        assert_eq!(issue.location, RowLocation::Row(row), "{name}");
        assert_eq!(issue.field, "assistant.summary", "{name}");
        assert!(issue.message.contains(message), "{name}: {}", issue.message);
        assert!(issue.file.ends_with(name));
        let (rows, report) =
            news2stock::load_parquet_with(fixtures().join(name), BadRowPolicy::Skip).unwrap();
        assert_eq!(rows.len() + report.skipped.len(), report.rows_read);
        assert!(!report.skipped.is_empty());
    }
    // A corrupt file.
    let good = dir.join("good.parquet");
    write_news_parquet(&sample_rows()[..3], &good, AssistantColumn::Struct).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n - 12..n - 8].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
    let corrupt = dir.join("corrupt.parquet");
    std::fs::write(&corrupt, &bytes).unwrap();
    let truncated = dir.join("truncated.parquet");
    std::fs::write(&truncated, &std::fs::read(&good).unwrap()[..100]).unwrap();
    for path in [corrupt, truncated] {
        match news2stock::load_parquet(&path) {
            Err(Error::Parquet { path: p, message }) => {
                assert_eq!(p, path);
                assert!(!message.is_empty());
            }
            other => panic!("expected a parquet error, got {other:?}"),
        }
    }
    assert!(matches!(
        news2stock::load_parquet(dir.join("absent.parquet")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn answers_render_in_schema_order() {
    let a = StockAnswer {
        stock_related: true,
        summary: "요약".into(),
        positive_stocks: vec!["가온중공업".into()],
        ..StockAnswer::default()
    };
    assert_eq!(
        a.to_json(),
        "{\"stock_related\": true, \"summary\": \"요약\", \"positive_stocks\": [\"가온중공업\"], \"positive_keywords\": [], \"positive_reasons\": \"\", \"negative_stocks\": [], \"negative_keywords\": [], \"negative_reasons\": \"\"}"
    );
}

// ---------------------------------------------------------------- real Llama 3 tokenizer (opt-in)

// These tests are ignored by default and fail when run without the tokenizer; `.ci/run` runs
// them (`-- --ignored llama3`) when ../shared/fixtures/llama3-tokenizer exists.

/// The real Llama 3 tokenizer that `LLAMA3_TOKENIZER_DIR` names (its folder or its
/// tokenizer.json); panics when the variable is unset or names no loadable tokenizer.
fn llama3_tokenizer() -> Tokenizer {
    let p = test_support::required_env_path(
        "LLAMA3_TOKENIZER_DIR",
        "the real Llama 3 tokenizer (a folder with tokenizer.json, or the file itself), \
         e.g. ../shared/fixtures/llama3-tokenizer",
    );
    let file = if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p
    };
    Tokenizer::from_file(&file).unwrap_or_else(|e| {
        panic!(
            "LLAMA3_TOKENIZER_DIR: {} is not a loadable Llama 3 tokenizer: {e}",
            file.display()
        )
    })
}

#[test]
#[ignore = "needs LLAMA3_TOKENIZER_DIR (the real Llama 3 tokenizer, ../shared/fixtures/llama3-tokenizer)"]
fn llama3_special_ids_and_korean_round_trip() {
    let tok = llama3_tokenizer();
    let ids = SpecialIds::from_tokenizer(&tok).unwrap();
    assert_eq!(
        (
            ids.begin_of_text,
            ids.end_of_text,
            ids.start_header,
            ids.end_header,
            ids.eot
        ),
        (128000, 128001, 128006, 128007, 128009)
    );
    for row in sample_rows() {
        for text in [&row.user, &row.assistant, &row.system] {
            let enc = tok.encode(text.as_str(), false).unwrap();
            assert_eq!(&decode(&tok, enc.get_ids()), text);
        }
    }
}

#[test]
#[ignore = "needs LLAMA3_TOKENIZER_DIR (the real Llama 3 tokenizer, ../shared/fixtures/llama3-tokenizer)"]
fn llama3_labels_are_exactly_the_answers() {
    let tok = llama3_tokenizer();
    let c = ChatCollator::new(tok.clone(), CollatorConfig::llama3(2048)).unwrap();
    let enc = c.encode(&multi_turn()).unwrap().unwrap();
    assert_eq!(enc.input_ids[0], 128000);
    assert_eq!(enc.input_ids.iter().filter(|&&t| t == 128000).count(), 1);
    assert_runs_are_answers(
        &tok,
        &enc,
        &["3천억원입니다.", "2년입니다.", "{\"ok\": true}"],
    );
    for run in enc.label_runs() {
        assert_eq!(run.last(), Some(&128009));
    }
    for row in sample_rows() {
        let enc = c
            .encode(&news2stock::to_conversation(&row))
            .unwrap()
            .unwrap();
        assert_runs_are_answers(&tok, &enc, &[&row.assistant]);
    }
    let jinja = ChatCollator::new(
        tok,
        CollatorConfig {
            format: ChatFormat::Jinja(JinjaTemplate::llama3()),
            ..CollatorConfig::llama3(2048)
        },
    )
    .unwrap();
    assert_eq!(
        jinja.encode(&multi_turn()).unwrap(),
        c.encode(&multi_turn()).unwrap()
    );
}

#[test]
#[ignore = "needs LLAMA3_TOKENIZER_DIR (the real Llama 3 tokenizer, ../shared/fixtures/llama3-tokenizer)"]
fn tutorial_mode_matches_python_reference_with_llama3() {
    let tok = llama3_tokenizer();
    check_tutorial_fixture(tok, "llama3");
}

// ---------------------------------------------------------------- Burn data loader (feature)

#[cfg(feature = "dataloader")]
#[test]
fn burn_data_loader_shuffles_by_seed_with_workers() {
    let c = collator(CollatorConfig::llama3(1024));
    let convs: Vec<Conversation> = sample_rows()[..10]
        .iter()
        .map(news2stock::to_conversation)
        .collect();
    let (samples, _) = c.encode_all(&convs).unwrap();
    let batcher = ChatBatcher::new(demo_special_ids().pad());
    // Per batch, the unpadded rows it holds.
    let batches = |workers: usize| -> Vec<Vec<Vec<i64>>> {
        let cfg = LoaderConfig {
            batch_size: 4,
            shuffle_seed: Some(3),
            num_workers: workers,
        };
        let loader = data_loader::<B>(samples.clone(), batcher, cfg);
        loader
            .iter()
            .map(|b| {
                let [n, s] = b.input_ids.dims();
                let ids: Vec<i64> = b.input_ids.into_data().convert::<i64>().to_vec().unwrap();
                let mask: Vec<i64> = b
                    .attention_mask
                    .into_data()
                    .convert::<i64>()
                    .to_vec()
                    .unwrap();
                (0..n)
                    .map(|r| {
                        (0..s)
                            .filter(|&j| mask[r * s + j] == 1)
                            .map(|j| ids[r * s + j])
                            .collect()
                    })
                    .collect()
            })
            .collect()
    };
    let a = batches(0);
    assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
    assert!(a == batches(0), "same seed, same batches");
    let all = |b: Vec<Vec<Vec<i64>>>| {
        let mut rows: Vec<Vec<i64>> = b.into_iter().flatten().collect();
        rows.sort();
        rows
    };
    let mut want: Vec<Vec<i64>> = samples
        .iter()
        .map(|s| s.input_ids.iter().map(|&t| i64::from(t)).collect())
        .collect();
    want.sort();
    assert!(all(a) == want, "every sample exactly once");
    assert!(
        all(batches(2)) == want,
        "every sample exactly once with workers"
    );
}
