//! The `news2stock` example's command line, tested through its own modules: each subcommand's
//! flags, the aliases of the old names, `--config` and `--demo` as sources of defaults, the
//! dataset and model errors, a CPU run on a local Hugging Face-format model and JSONL, and
//! `push` against hub-push's fake Hub (`cli/push.rs`).
#![allow(dead_code)]

#[path = "../examples/news2stock/app.rs"]
mod app;
#[path = "../examples/news2stock/cli.rs"]
mod cli;
#[path = "../examples/news2stock/evaluate.rs"]
mod evaluate;
#[path = "../examples/news2stock/job.rs"]
mod job;
#[path = "../examples/news2stock/launch.rs"]
mod launch;
#[path = "../examples/news2stock/load.rs"]
mod load;
#[path = "../examples/news2stock/metrics.rs"]
mod metrics;
#[path = "../examples/news2stock/model_card.rs"]
mod model_card;
#[path = "../examples/news2stock/push.rs"]
mod push;
#[path = "../examples/news2stock/settings.rs"]
mod settings;

#[path = "cli/push.rs"]
mod push_tests;

use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::CommandFactory;

use cli::{Cli, Command, LrSchedulerType, Optim, DEMO_DATASET, DEMO_MODEL};
use settings::Settings;

type Cpu = burn::backend::NdArray<f32>;

fn matches(args: &[&str]) -> clap::ArgMatches {
    Cli::command()
        .try_get_matches_from(std::iter::once("news2stock").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn parse_err(args: &[&str]) -> clap::Error {
    Cli::command()
        .try_get_matches_from(std::iter::once("news2stock").chain(args.iter().copied()))
        .expect_err("refused")
}

/// The command and its resolved settings (no model is loaded).
fn resolve(args: &[&str]) -> anyhow::Result<(Command, Settings)> {
    let (command, _, resolved) = app::resolve(&matches(args))?;
    Ok((command, resolved.expect("a job command").settings))
}

fn settings(args: &[&str]) -> Settings {
    resolve(args)
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"))
        .1
}

/// Runs a command line as the binary does.
fn run(args: &[&str]) -> anyhow::Result<()> {
    app::run(&matches(args))
}

fn temp(name: &str) -> PathBuf {
    test_support::fresh_temp_dir("news2stock-cli", name)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The first `n` rows of the bundled sample as a JSONL file.
fn sample_jsonl(dir: &Path, n: usize) -> PathBuf {
    // The copy compiled into chat-collate: independent of where that crate was built.
    let lines: Vec<&str> = chat_collate::news2stock::SAMPLE_JSONL
        .lines()
        .take(n)
        .collect();
    let file = dir.join("news.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

fn help_of(sub: &str) -> String {
    Cli::command()
        .find_subcommand_mut(sub)
        .expect("subcommand")
        .render_long_help()
        .to_string()
}

#[test]
fn each_subcommand_takes_its_own_flags() {
    let m = matches(&[
        "infer",
        "--adapter",
        "runs/demo",
        "--demo",
        "--input",
        "news.txt",
    ]);
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&m).unwrap();
    assert!(cli.global.demo, "--demo after the subcommand");
    let Some(Command::Infer(a)) = cli.command else {
        panic!("infer")
    };
    assert_eq!(a.input.as_deref(), Some(Path::new("news.txt")));
    assert_eq!(a.adapter.adapter.as_deref(), Some(Path::new("runs/demo")));

    for (args, flag) in [
        (&["infer", "--lora-r", "8"][..], "--lora-r"),
        (&["infer", "--learning-rate", "1e-4"][..], "--learning-rate"),
        (
            &["eval", "--num-train-epochs", "1"][..],
            "--num-train-epochs",
        ),
        (&["merge", "--dataset", "x.jsonl"][..], "--dataset"),
        (&["train", "--input", "news.txt"][..], "--input"),
        (
            &["push", "runs/demo", "--repo-id", "me/x", "--lora-r", "8"][..],
            "--lora-r",
        ),
        (&["--lora-r", "8", "train"][..], "--lora-r"),
    ] {
        let e = parse_err(args);
        assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{args:?}");
        assert!(e.to_string().contains(flag), "{args:?}: {e}");
    }
    let e = parse_err(&["--lora-r", "8", "train"]);
    let hint = app::parse_error_hint(&e).expect("a hint");
    assert!(
        hint.contains("after the subcommand") && hint.contains("train"),
        "{hint}"
    );
    let e = parse_err(&["bench-train", "--steps", "2"]);
    assert!(app::parse_error_hint(&e)
        .unwrap()
        .contains("news2stock-dev"));

    let infer = help_of("infer");
    for own in [
        "--adapter",
        "--input",
        "--model",
        "--max-new-tokens",
        "--chat-format",
        "--demo",
    ] {
        assert!(infer.contains(own), "infer --help lists {own}");
    }
    for other in [
        "--learning-rate",
        "--lora-r",
        "--dataset",
        "--output-dir",
        "--push-to-hub",
        "--resume",
    ] {
        assert!(!infer.contains(other), "infer --help lists {other}");
    }
    let train = help_of("train");
    for own in [
        "--learning-rate",
        "--num-train-epochs",
        "--per-device-train-batch-size",
        "--gradient-accumulation-steps",
        "--lora-r",
        "--lora-alpha",
        "--lora-dropout",
        "--target-modules",
        "--max-grad-norm",
        "--warmup-ratio",
        "--lr-scheduler-type",
        "--logging-steps",
        "--save-steps",
        "--output-dir",
        "--gradient-checkpointing",
        "--seed",
        "--max-seq-length",
        "--resume",
        "--push-to-hub",
    ] {
        assert!(train.contains(own), "train --help lists {own}");
    }
    assert!(!train.contains("--input") && !train.contains("--adapter "));
    let push = help_of("push");
    assert!(push.contains("--repo-id") && !push.contains("--config") && !push.contains("--lora-r"));
    let top = Cli::command().render_long_help().to_string();
    assert!(!top.contains("--learning-rate") && top.contains("--demo"));
}

#[test]
fn old_names_are_aliases_of_the_hf_names() {
    let old = settings(&[
        "train",
        "--lr",
        "2e-4",
        "--epochs",
        "5",
        "--batch-size",
        "4",
        "--grad-accum",
        "8",
        "--lr-scheduler",
        "cosine",
        "--max-length",
        "256",
        "--optimizer",
        "loraplus",
        "--loraplus-ratio",
        "8",
        "--model-name-or-path",
        "x/y",
    ]);
    let new = settings(&[
        "train",
        "--learning-rate",
        "2e-4",
        "--num-train-epochs",
        "5",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "8",
        "--lr-scheduler-type",
        "cosine",
        "--max-seq-length",
        "256",
        "--optim",
        "loraplus",
        "--loraplus-lr-ratio",
        "8",
        "--model",
        "x/y",
    ]);
    assert_eq!(
        serde_json::to_value(&old).unwrap(),
        serde_json::to_value(&new).unwrap()
    );
    let t = &new.training;
    assert_eq!((t.learning_rate, t.num_train_epochs), (2e-4, 5.0));
    assert_eq!(
        (t.per_device_train_batch_size, t.gradient_accumulation_steps),
        (4, 8)
    );
    assert_eq!(
        (t.lr_scheduler_type, t.optim),
        (LrSchedulerType::Cosine, Optim::Loraplus)
    );
    assert_eq!(new.data.max_seq_length, 256);

    // Choices are enums: HF's spellings parse, anything else is refused by clap.
    let s = settings(&[
        "train",
        "--model",
        "x/y",
        "--lr-scheduler-type",
        "constant_with_warmup",
        "--optim",
        "adamw_torch",
    ]);
    assert_eq!(
        s.training.lr_scheduler_type,
        LrSchedulerType::ConstantWithWarmup
    );
    assert_eq!(s.training.optim, Optim::Adamw);
    assert_eq!(
        parse_err(&["train", "--lr-scheduler-type", "warmup"]).kind(),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        parse_err(&["train", "--chat-format", "chatml"]).kind(),
        ErrorKind::InvalidValue
    );
    assert_eq!(
        parse_err(&["train", "--init-lora-weights", "magic"]).kind(),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        parse_err(&["merge", "--dtype", "f16"]).kind(),
        ErrorKind::InvalidValue
    );
}

#[test]
fn config_file_fills_settings_and_flags_win() {
    let dir = temp("config");
    let file = dir.join("run.json");
    std::fs::write(
        &file,
        r#"{"lr": 0.5, "lora_r": 4, "num_train_epochs": 2, "max-seq-length": 128, "model": "x/y"}"#,
    )
    .unwrap();
    let s = settings(&["train", "--config", path(&file), "--lora-r", "16"]);
    assert_eq!(s.training.learning_rate, 0.5, "an old name in the file");
    assert_eq!(s.lora.lora_r, 16, "the flag wins over the file");
    assert_eq!(
        (s.training.num_train_epochs, s.data.max_seq_length),
        (2.0, 128)
    );
    // --config before the subcommand (no subcommand: train).
    let s = settings(&["--config", path(&file)]);
    assert_eq!(s.lora.lora_r, 4);

    std::fs::write(&file, r#"{"lora_rank": 4}"#).unwrap();
    let e = resolve(&["train", "--config", path(&file)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown setting `lora_rank`"), "{e}");
    std::fs::write(&file, r#"{"lora_r": "four"}"#).unwrap();
    let e = format!(
        "{:#}",
        resolve(&["train", "--config", path(&file)]).unwrap_err()
    );
    assert!(e.contains("`lora_r`") && e.contains("run.json"), "{e}");
    std::fs::write(&file, r#"{"lr_scheduler_type": "warmup"}"#).unwrap();
    let e = format!(
        "{:#}",
        resolve(&["train", "--config", path(&file)]).unwrap_err()
    );
    assert!(e.contains("lr_scheduler_type"), "{e}");
    let e = resolve(&["eval", "--demo", "--eval-batch-size", "0"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--eval-batch-size 0"), "{e}");
}

#[test]
fn demo_supplies_defaults_and_uses_what_is_given() {
    for args in [&["--demo"][..], &["train", "--demo"], &["--demo", "train"]] {
        let (command, s) = resolve(args).unwrap();
        assert!(matches!(command, Command::Train(_)), "{args:?}");
        assert!(s.demo && s.on_cpu);
        assert_eq!(
            (s.model.model.as_str(), s.data.dataset.as_str()),
            (DEMO_MODEL, DEMO_DATASET)
        );
        assert_eq!(s.training.output_dir, Path::new("runs/demo"));
        assert_eq!((s.training.learning_rate, s.lora.lora_r), (5e-3, 16));
    }
    // --model / --dataset given with --demo are used, not dropped.
    let s = settings(&[
        "train",
        "--demo",
        "--dataset",
        "my.jsonl",
        "--model",
        "models/tiny",
        "--lora-r",
        "4",
    ]);
    assert_eq!(
        (s.data.dataset.as_str(), s.model.model.as_str()),
        ("my.jsonl", "models/tiny")
    );
    assert_eq!((s.lora.lora_r, s.training.learning_rate), (4, 5e-3));
    // A config file wins over the demo's defaults.
    let dir = temp("demo-config");
    let file = dir.join("run.json");
    std::fs::write(&file, r#"{"learning_rate": 1e-3}"#).unwrap();
    assert_eq!(
        settings(&["--demo", "--config", path(&file)])
            .training
            .learning_rate,
        1e-3
    );
    // ... and so the dataset named with --demo is read: a missing file is an error.
    let e = run(&[
        "train",
        "--demo",
        "--dataset",
        path(&dir.join("nope.jsonl")),
        "--output-dir",
        path(&dir.join("out")),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("nope.jsonl") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn eval_infer_merge_take_the_adapters_run() {
    let dir = temp("saved-run");
    std::fs::write(
        dir.join(settings::SETTINGS_FILE),
        r#"{"demo": true, "model": "NCSOFT/Llama-VARCO-8B-Instruct", "seed": 7, "chat_format": "tutorial", "max_length": 300, "lora_r": 64}"#,
    )
    .unwrap();
    let s = settings(&["infer", "--adapter", path(&dir), "--input", "x.txt"]);
    assert_eq!(
        s.model.model, DEMO_MODEL,
        "a demo run saved before the demo model had a name"
    );
    assert_eq!((s.training.seed, s.data.max_seq_length), (7, 300));
    assert_eq!(s.template.chat_format, cli::ChatFormat::Tutorial);
    assert_eq!(s.on_cpu, !cfg!(feature = "cuda"));
    let s = settings(&[
        "eval",
        "--adapter",
        path(&dir),
        "--model",
        "x/y",
        "--chat-format",
        "llama3",
    ]);
    assert_eq!(s.model.model, "x/y", "a flag wins over the saved run");
    assert_eq!(s.template.chat_format, cli::ChatFormat::Llama3);

    // A Python PEFT adapter: the base model comes from adapter_config.json.
    let py = temp("py-adapter");
    std::fs::write(
        py.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "base_model_name_or_path": "org/base"}"#,
    )
    .unwrap();
    assert_eq!(
        settings(&["merge", "--adapter", path(&py)]).model.model,
        "org/base"
    );
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cpu_build_refuses_only_the_tutorials_default_model() {
    for args in [&[][..], &["train"], &["train", "--dataset", "x.jsonl"]] {
        let e = resolve(args).unwrap_err().to_string();
        assert!(
            e.contains("no GPU backend") && e.contains("--demo"),
            "{args:?}: {e}"
        );
    }
    let s = settings(&["train", "--model", cli::DEFAULT_MODEL]);
    assert!(s.on_cpu, "an explicit model runs on the CPU build");
}

#[test]
fn launch_flags_are_checked_before_any_process_starts() {
    for (args, want) in [
        (&["--nproc-per-node", "0"][..], "--nproc-per-node 0"),
        (&["--nnodes", "0"][..], "--nnodes 0"),
        (&["--nnodes", "2", "--node-rank", "2"][..], "--node-rank 2"),
    ] {
        let mut all = vec!["train", "--demo"];
        all.extend(args);
        let e = run(&all).unwrap_err().to_string();
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // The settings saved with a run do not carry the launch (a resume may use other hosts).
    let s = settings(&["train", "--demo", "--nproc-per-node", "2"]);
    let saved = serde_json::to_string(&s).unwrap();
    assert!(!saved.contains("nproc"), "{saved}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cpu_build_refuses_several_processes_naming_the_cuda_build() {
    let e = run(&["train", "--demo", "--nproc-per-node", "2"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--nproc-per-node 2") && e.contains("--features cuda"),
        "{e}"
    );
}

#[test]
fn malformed_rows_stop_with_file_line_and_field() {
    let dir = temp("bad-rows");
    let good = sample_jsonl(&dir, 3);
    let mut text = std::fs::read_to_string(&good).unwrap();
    text.push_str("{\"system\": \"s\", \"user\": \"u\"}\n");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, &text).unwrap();
    let e = format!("{:#}", load::load_dataset(path(&bad)).unwrap_err());
    assert!(
        e.contains("bad.jsonl") && e.contains("line 4") && e.contains("assistant"),
        "{e}"
    );

    std::fs::write(&bad, text.replacen("{\"system\"", "{\"system\" 1", 1)).unwrap();
    let e = format!("{:#}", load::load_dataset(path(&bad)).unwrap_err());
    assert!(e.contains("line 1"), "{e}");

    // Through the command line, with --demo's model and settings.
    let e = format!(
        "{:#}",
        run(&[
            "train",
            "--demo",
            "--dataset",
            path(&bad),
            "--output-dir",
            path(&dir.join("out"))
        ])
        .unwrap_err()
    );
    assert!(e.contains("line 1") && e.contains("--dataset"), "{e}");
    assert!(load::load_dataset(path(&good)).unwrap().len() == 3);
}

#[test]
fn unknown_model_folders_are_clear_errors() {
    let dir = temp("models");
    let e = load::model_source(path(&dir.join("nope")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such folder"), "{e}");
    let e = load::model_source("./models/tiny").unwrap_err().to_string();
    assert!(e.contains("no such folder"), "{e}");
    assert!(load::model_source("org/name@v1").is_ok());
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let data = sample_jsonl(&dir, 5);
    let e = format!(
        "{:#}",
        run(&[
            "train",
            "--model",
            path(&dir.join("empty")),
            "--dataset",
            path(&data),
            "--output-dir",
            path(&dir.join("out"))
        ])
        .unwrap_err()
    );
    assert!(
        e.contains("not a Hugging Face model folder") && e.contains("config.json"),
        "{e}"
    );
}

/// A tiny Llama in Hugging Face format (config.json, model.safetensors, tokenizer.json) over the
/// project's demo tokenizer.
pub fn tiny_hf_model(dir: &Path) {
    let tokenizer = chat_collate::demo_tokenizer();
    let cfg = llama::LlamaConfig::tiny(tokenizer.get_vocab_size(true));
    let model = llama::LlamaForCausalLM::<Cpu>::random_seeded(&cfg, &Default::default(), 3);
    model.save_pretrained(dir, llama::SaveDtype::F32).unwrap();
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
}

#[test]
fn cpu_build_trains_a_local_model_on_a_local_jsonl() {
    let dir = temp("local-train");
    let model = dir.join("tiny-llama");
    tiny_hf_model(&model);
    let data = sample_jsonl(&dir, 10);
    let out = dir.join("out");
    run(&[
        "train",
        "--model",
        path(&model),
        "--dataset",
        path(&data),
        "--output-dir",
        path(&out),
        "--max-steps",
        "2",
        "--max-seq-length",
        "512",
        "--per-device-train-batch-size",
        "2",
        "--gradient-accumulation-steps",
        "1",
        "--lora-r",
        "4",
        "--gradient-checkpointing",
        "false",
        "--logging-steps",
        "1",
        "--save-steps",
        "0",
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        settings::SETTINGS_FILE,
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(settings::SETTINGS_FILE)).unwrap())
            .unwrap();
    assert_eq!(saved["model"], path(&model));
    assert_eq!(saved["dataset"], path(&data));
    // infer finds the base model through the adapter's run.
    let news = dir.join("news.txt");
    std::fs::write(&news, "한빛전자가 대규모 공급 계약을 맺었다.").unwrap();
    run(&[
        "infer",
        "--adapter",
        path(&out),
        "--input",
        path(&news),
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
}
