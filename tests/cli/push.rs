//! `news2stock push` and `train --push-to-hub` against hub-push's fake Hub on 127.0.0.1: the
//! files arrive byte-identical in one commit with a model card whose metadata parses, the token
//! is sent, and a folder that is not an adapter, a missing or wrong token, a missing branch and
//! a dead endpoint are clear errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hub_push::fake_hub::{dead_endpoint, FakeHub};
use hub_push::HubClient;

use super::{path, run, temp, tiny_hf_model, Cpu};
use crate::cli::DEFAULT_DATASET;
use crate::model_card::front_matter;
use crate::push::{self, PushRequest};

const TOKEN: &str = "hf_news2stock_test_token";

/// The one fake Hub that `HF_ENDPOINT` / `HF_TOKEN` point at for the whole test process (set
/// once, before any command reads them; tests use distinct repositories).
fn env_hub() -> &'static FakeHub {
    static HUB: OnceLock<FakeHub> = OnceLock::new();
    HUB.get_or_init(|| {
        let hub = FakeHub::start(TOKEN);
        std::env::set_var("HF_ENDPOINT", &hub.endpoint);
        std::env::set_var("HF_TOKEN", TOKEN);
        hub
    })
}

/// Every file the push should carry arrived with the bytes on disk; returns the card.
fn check_pushed(hub: &FakeHub, repo: &str, dir: &Path, files: &[&str]) -> String {
    for f in files {
        let want = std::fs::read(dir.join(f)).unwrap();
        let got = hub
            .file(repo, "main", f)
            .unwrap_or_else(|| panic!("{f} not in {repo}"));
        assert!(
            got == want,
            "{f}: {} bytes arrived, {} on disk",
            got.len(),
            want.len()
        );
    }
    let card = hub.file(repo, "main", "README.md").expect("a model card");
    String::from_utf8(card).expect("utf-8 card")
}

#[test]
fn demo_train_infer_eval_and_push_through_the_command_line() {
    let hub = env_hub();
    let dir = temp("push-demo");
    let out = dir.join("demo");
    let o = path(&out);
    run(&[
        "train",
        "--demo",
        "--output-dir",
        o,
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--max-new-tokens",
        "4",
        "--eval-samples",
        "1",
        "--push-to-hub",
        "tester/demo-train",
    ])
    .unwrap();
    let news = dir.join("news.txt");
    std::fs::write(&news, "한빛전자가 북미 가전업체와 공급 계약을 맺었다.").unwrap();
    run(&[
        "infer",
        "--adapter",
        o,
        "--demo",
        "--input",
        path(&news),
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
    run(&[
        "eval",
        "--demo",
        "--adapter",
        o,
        "--eval-samples",
        "2",
        "--eval-batch-size",
        "1",
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
    // eval: one JSON line per sample with both sides, and the generation figures.
    let lines = std::fs::read_to_string(out.join("eval_samples.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert!(
            l["base"]["text"].is_string() && l["adapter"]["text"].is_string(),
            "{l}"
        );
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    assert_eq!(results["generation"]["rows"], 4);
    assert_eq!(results["generation"]["batch_rows"], 2);
    assert!(results["generation"]["new_tokens"].as_u64().unwrap() > 0);

    let files = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
    ];
    // train --push-to-hub pushed at the end of training.
    check_pushed(hub, "tester/demo-train", &out, &files);
    // push, as a user runs it (HF_ENDPOINT and HF_TOKEN from the environment).
    let before = hub.commits().len();
    run(&[
        "push",
        o,
        "--repo-id",
        "tester/news2stock-demo",
        "--private",
    ])
    .unwrap();
    let card = check_pushed(hub, "tester/news2stock-demo", &out, &files);
    let commits: Vec<_> = hub.commits().into_iter().skip(before).collect();
    assert_eq!(commits.len(), 1, "one commit");
    let mut committed: Vec<&str> = commits[0].entries.iter().map(|(_, p)| p.as_str()).collect();
    committed.sort();
    assert_eq!(
        committed,
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "loss.png",
            "metrics.jsonl"
        ]
    );
    assert!(hub.state().repos["tester/news2stock-demo"].private);
    let log = hub.log();
    assert!(log.iter().any(|r| r.target.contains("news2stock-demo")));
    for r in log
        .iter()
        .filter(|r| !r.target.starts_with("/__lfs/upload"))
    {
        assert_eq!(
            r.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}")),
            "{}",
            r.target
        );
    }

    let fm = front_matter::parse(&card);
    assert_eq!(front_matter::get(&fm, "library_name").unwrap(), ["peft"]);
    assert_eq!(
        front_matter::get(&fm, "pipeline_tag").unwrap(),
        ["text-generation"]
    );
    let tags = front_matter::get(&fm, "tags").unwrap();
    for t in ["peft", "lora", "sft"] {
        assert!(tags.iter().any(|x| x == t), "{t} in {tags:?}");
    }
    assert!(
        front_matter::get(&fm, "base_model").is_none(),
        "the demo's model is not on the Hub"
    );
    assert!(card.contains("| `r` | 16 |"), "{card}");
    assert!(card.contains("| `learning_rate` | 0.005 |"), "{card}");
    assert!(card.contains("final train loss:"), "{card}");
    assert!(
        card.contains("| adapter |") && card.contains("| base |"),
        "the eval table: {card}"
    );
}

/// A PEFT adapter of a tiny Llama whose base is named as a Hub model, with a saved run.
fn hub_adapter(dir: &Path) -> PathBuf {
    let model_dir = dir.join("base");
    tiny_hf_model(&model_dir);
    let files = llama::resolve(&llama::ModelSource::Local(model_dir)).unwrap();
    let model = llama::LlamaForCausalLM::<Cpu>::load(&files, &Default::default()).unwrap();
    let mut peft = peft_lora::PeftModel::new(model);
    let mut cfg = peft_lora::LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.base_model_name_or_path = Some("meta-llama/Llama-3.2-1B".into());
    cfg.task_type = Some("CAUSAL_LM".into());
    peft.add_adapter("default", &cfg).unwrap();
    let out = dir.join("adapter");
    peft.save_adapter(&out, "default").unwrap();
    let mut run = crate::settings::Settings::default();
    run.data.dataset = DEFAULT_DATASET.into();
    run.model.model = "meta-llama/Llama-3.2-1B".into();
    std::fs::write(
        out.join(crate::settings::SETTINGS_FILE),
        serde_json::to_string_pretty(&run).unwrap(),
    )
    .unwrap();
    out
}

fn request(repo: &str) -> PushRequest<'_> {
    PushRequest {
        repo_id: repo,
        private: false,
        revision: None,
        commit_message: "Upload LoRA adapter",
    }
}

#[test]
fn push_names_a_hub_base_model_and_dataset_in_the_card() {
    let hub = FakeHub::start(TOKEN);
    let dir = temp("push-hub-base");
    let adapter = hub_adapter(&dir);
    let client = HubClient::new(&hub.endpoint, Some(TOKEN.into()));
    let commit = push::push(&client, &adapter, &request("tester/llama-news")).unwrap();
    assert_eq!(
        commit.files.len(),
        3,
        "config, weights, card: {:?}",
        commit.files
    );
    let card = check_pushed(
        &hub,
        "tester/llama-news",
        &adapter,
        &["adapter_config.json", "adapter_model.safetensors"],
    );
    let fm = front_matter::parse(&card);
    assert_eq!(
        front_matter::get(&fm, "base_model").unwrap(),
        ["meta-llama/Llama-3.2-1B"]
    );
    assert_eq!(
        front_matter::get(&fm, "datasets").unwrap(),
        [DEFAULT_DATASET]
    );
    assert!(front_matter::get(&fm, "tags")
        .unwrap()
        .iter()
        .any(|t| t == "base_model:adapter:meta-llama/Llama-3.2-1B"));
    assert!(
        !card.contains("## Results"),
        "no metrics, no results section"
    );
}

#[test]
fn push_refuses_a_folder_that_is_not_an_adapter_before_any_request() {
    let hub = FakeHub::start(TOKEN);
    let client = HubClient::new(&hub.endpoint, Some(TOKEN.into()));
    let dir = temp("push-not-adapter");
    let good = hub_adapter(&dir);
    let weights = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read(good.join("adapter_config.json")).unwrap();
    let case = |name: &str, config: Option<&[u8]>, weights: Option<&[u8]>| -> String {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        if let Some(c) = config {
            std::fs::write(d.join("adapter_config.json"), c).unwrap();
        }
        if let Some(w) = weights {
            std::fs::write(d.join("adapter_model.safetensors"), w).unwrap();
        }
        format!(
            "{:#}",
            push::push(&client, &d, &request("tester/x")).unwrap_err()
        )
    };
    let e = case("empty", None, None);
    assert!(
        e.contains("not a PEFT adapter folder") && e.contains("adapter_config.json is missing"),
        "{e}"
    );
    let e = case("bad-config", Some(br#"{"r": "eight"}"#), Some(&weights));
    assert!(e.contains("is not a LoRA config"), "{e}");
    let e = case("no-weights", Some(&config), None);
    assert!(e.contains("adapter_model.safetensors is missing"), "{e}");
    let e = case("bad-weights", Some(&config), Some(b"not safetensors"));
    assert!(e.contains("does not open"), "{e}");
    let e = format!(
        "{:#}",
        push::push(&client, &dir.join("nope"), &request("tester/x")).unwrap_err()
    );
    assert!(e.contains("no such adapter folder"), "{e}");
    let e = format!(
        "{:#}",
        push::push(&client, &good, &request("not a repo")).unwrap_err()
    );
    assert!(e.contains("OWNER/NAME"), "{e}");
    assert!(hub.log().is_empty(), "no request was sent: {:?}", hub.log());
}

#[test]
fn push_errors_name_the_failure() {
    let hub = FakeHub::start(TOKEN);
    let dir = temp("push-errors");
    let adapter = hub_adapter(&dir);

    let no_token = HubClient::new(&hub.endpoint, None);
    let e = format!(
        "{:#}",
        push::push(&no_token, &adapter, &request("tester/x")).unwrap_err()
    );
    assert!(
        e.contains("no Hugging Face token") && e.contains("HF_TOKEN"),
        "{e}"
    );
    assert!(hub.log().is_empty());

    let wrong = HubClient::new(&hub.endpoint, Some("hf_wrong".into()));
    let e = format!(
        "{:#}",
        push::push(&wrong, &adapter, &request("tester/x")).unwrap_err()
    );
    assert!(
        e.contains("401") && e.contains("create repo") && e.contains("tester/x"),
        "{e}"
    );
    assert!(hub.commits().is_empty());

    let client = HubClient::new(&hub.endpoint, Some(TOKEN.into()));
    let mut req = request("tester/branch");
    req.revision = Some("dev");
    let e = format!("{:#}", push::push(&client, &adapter, &req).unwrap_err());
    assert!(e.contains("404"), "{e}");
    assert!(hub.commits().is_empty());

    let dead = HubClient::new(dead_endpoint(), Some(TOKEN.into()));
    let e = format!(
        "{:#}",
        push::push(&dead, &adapter, &request("tester/x")).unwrap_err()
    );
    assert!(e.contains("could not talk to"), "{e}");
}
