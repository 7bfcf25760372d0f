//! The model card (`README.md`) pushed with an adapter: YAML metadata the Hub and PEFT read
//! (`base_model`, `library_name: peft`, `pipeline_tag`, `tags`, `datasets`), then the LoRA and
//! training settings, the final losses and the eval table, as PEFT's and TRL's cards do.

use std::fmt::Write;
use std::path::Path;

use serde_json::{Map, Value};

use crate::cli::{is_hub_id, DEMO_DATASET, DEMO_MODEL};

/// What a model card is made from: the files of an adapter folder.
#[derive(Debug, Clone, Copy)]
pub struct CardInputs<'a> {
    /// `OWNER/NAME` of the repository.
    pub repo_id: &'a str,
    /// `adapter_config.json`.
    pub adapter_config: &'a Map<String, Value>,
    /// The run's `job_settings.json`, when the folder has one.
    pub run_settings: Option<&'a Map<String, Value>>,
    /// The run's `metrics.jsonl`, when the folder has one.
    pub metrics_jsonl: Option<&'a str>,
    /// `eval_results.json`, when the folder has one.
    pub eval_results: Option<&'a Value>,
}

/// The last logged value of a loss: `(step, loss)`.
pub type LastLoss = Option<(u64, f64)>;

/// The last train loss and the last eval loss of a `metrics.jsonl` (lines that do not parse
/// are passed over: the card is a summary, not a validator).
pub fn final_losses(metrics_jsonl: &str) -> (LastLoss, LastLoss) {
    let (mut train, mut eval) = (None, None);
    for line in metrics_jsonl.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let step = entry.get("step").and_then(Value::as_u64).unwrap_or(0);
        if let Some(l) = entry.get("loss").and_then(Value::as_f64) {
            train = Some((step, l));
        }
        if let Some(l) = entry.get("eval_loss").and_then(Value::as_f64) {
            eval = Some((step, l));
        }
    }
    (train, eval)
}

/// A YAML scalar: JSON's string syntax is valid YAML (double-quoted style).
fn yaml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A Hub id usable as metadata (not a local path, not the demo's built-in names).
fn hub_ref(name: &str) -> Option<&str> {
    (is_hub_id(name) && name != DEMO_MODEL && name != DEMO_DATASET && !Path::new(name).exists())
        .then_some(name)
}

/// A setting's value for a table cell.
fn cell(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    text.replace('|', "\\|").replace('\n', " ")
}

const LORA_KEYS: &[&str] = &[
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "bias",
    "alora_invocation_tokens",
];

const TRAINING_KEYS: &[&str] = &[
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "weight_decay",
    "optim",
    "max_seq_length",
    "chat_format",
    "gradient_checkpointing",
    "load_in_4bit",
    "seed",
];

fn settings_table(out: &mut String, source: &Map<String, Value>, keys: &[&str]) {
    out.push_str("| setting | value |\n|---|---|\n");
    for key in keys {
        if let Some(v) = source.get(*key).filter(|v| !v.is_null()) {
            let _ = writeln!(out, "| `{key}` | {} |", cell(v));
        }
    }
}

fn eval_table(out: &mut String, eval: &Value) {
    let samples = eval.get("samples").and_then(Value::as_u64).unwrap_or(0);
    let dataset = eval.get("dataset").and_then(Value::as_str).unwrap_or("?");
    let _ = writeln!(
        out,
        "Generated answers on {samples} samples of the test split of `{dataset}`, scored against \
         the dataset's answers:\n"
    );
    out.push_str(
        "| model | JSON ok | stock_related accuracy | F1 positive stocks | F1 negative stocks |\n",
    );
    out.push_str("|---|---|---|---|---|\n");
    for row in eval
        .get("results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = |k: &str| row.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {} | {:.1}% | {:.1}% | {:.3} | {:.3} |",
            cell(row.get("model").unwrap_or(&Value::Null)),
            100.0 * f("json_ok"),
            100.0 * f("related_accuracy"),
            f("f1_positive"),
            f("f1_negative")
        );
    }
}

/// The card: YAML front matter, then Markdown.
pub fn model_card(inputs: &CardInputs<'_>) -> String {
    let run = inputs.run_settings;
    let run_str = |k: &str| run.and_then(|r| r.get(k)).and_then(Value::as_str);
    let base = inputs
        .adapter_config
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .filter(|b| !b.is_empty())
        .or_else(|| run_str("model"));
    let base_ref = base.and_then(hub_ref);
    let dataset = run_str("dataset");
    let dataset_ref = dataset.and_then(hub_ref);

    let mut out = String::from("---\n");
    if let Some(b) = base_ref {
        let _ = writeln!(out, "base_model: {}", yaml_str(b));
    }
    out.push_str("library_name: peft\npipeline_tag: text-generation\n");
    out.push_str("tags:\n");
    if let Some(b) = base_ref {
        let _ = writeln!(out, "- {}", yaml_str(&format!("base_model:adapter:{b}")));
    }
    for tag in ["peft", "lora", "sft", "burn", "news2stock"] {
        let _ = writeln!(out, "- {tag}");
    }
    if let Some(d) = dataset_ref {
        let _ = writeln!(out, "datasets:\n- {}", yaml_str(d));
    }
    out.push_str("language:\n- ko\n---\n\n");

    let _ = writeln!(out, "# {}\n", inputs.repo_id);
    let base_text = match (base, base_ref) {
        (Some(_), Some(b)) => format!("[{b}](https://huggingface.co/{b})"),
        (Some(DEMO_MODEL), None) => "the news2stock demo's tiny random Llama".into(),
        (Some(b), None) => format!("`{b}` (a local model)"),
        (None, _) => "an unnamed base model".into(),
    };
    let data_text = match (dataset, dataset_ref) {
        (_, Some(d)) => format!("[{d}](https://huggingface.co/datasets/{d})"),
        (Some(DEMO_DATASET), None) => "the bundled synthetic news2stock sample".into(),
        (Some(d), None) => format!("`{d}` (a local file)"),
        (None, None) => "an unrecorded dataset".into(),
    };
    let _ = writeln!(
        out,
        "A LoRA adapter for {base_text}, fine-tuned (supervised, assistant-only loss) on \
         {data_text} with the `news2stock` example of burn-peft (Burn, Rust): given a Korean \
         economic news article, it answers with a JSON summary and the stocks it affects \
         positively and negatively.\n"
    );
    out.push_str("## Usage\n\nWith PEFT (Python):\n\n```python\n");
    out.push_str("from peft import AutoPeftModelForCausalLM\n");
    let _ = writeln!(
        out,
        "model = AutoPeftModelForCausalLM.from_pretrained({})",
        yaml_str(inputs.repo_id)
    );
    out.push_str("```\n\nWith burn-peft: `news2stock infer --adapter DIR --input news.txt` on a download of this repository.\n\n");

    out.push_str("## LoRA settings\n\n");
    settings_table(&mut out, inputs.adapter_config, LORA_KEYS);
    if let Some(r) = run {
        out.push_str("\n## Training settings\n\n");
        settings_table(&mut out, r, TRAINING_KEYS);
    }

    let (train_loss, eval_loss) = inputs.metrics_jsonl.map(final_losses).unwrap_or_default();
    if train_loss.is_some() || eval_loss.is_some() || inputs.eval_results.is_some() {
        out.push_str("\n## Results\n\n");
    }
    if let Some((step, l)) = train_loss {
        let _ = writeln!(out, "- final train loss: {l:.4} (step {step})");
    }
    if let Some((step, l)) = eval_loss {
        let _ = writeln!(out, "- final eval loss: {l:.4} (step {step})");
    }
    if let Some(eval) = inputs.eval_results {
        out.push('\n');
        eval_table(&mut out, eval);
    }
    out.push_str("\n## Framework\n\n- PEFT adapter format (`adapter_config.json`, `adapter_model.safetensors`)\n");
    let _ = writeln!(
        out,
        "- trained with burn-peft {} on Burn 0.21",
        env!("CARGO_PKG_VERSION")
    );
    out
}

/// Tests' reader of a card's YAML front matter (the subset `model_card` writes), shared by this
/// module's tests and the push tests, which include this file.
#[cfg(test)]
pub mod front_matter {
    /// The front matter of a card as `(key, values)`: `key: scalar` or `key:` followed by `- item`
    /// lines; double-quoted scalars parsed back through JSON (their syntax is JSON's).
    pub fn parse(card: &str) -> Vec<(String, Vec<String>)> {
        let body = card
            .strip_prefix("---\n")
            .expect("front matter opens the card");
        let (yaml, _) = body.split_once("\n---\n").expect("front matter is closed");
        let scalar = |s: &str| -> String {
            if s.starts_with('"') {
                serde_json::from_str(s).expect("a double-quoted YAML scalar")
            } else {
                assert!(
                    !s.contains(": ") && !s.starts_with(['[', '{', '\'']),
                    "plain scalar {s:?}"
                );
                s.to_string()
            }
        };
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for line in yaml.lines() {
            if let Some(item) = line.strip_prefix("- ") {
                out.last_mut()
                    .expect("a list under a key")
                    .1
                    .push(scalar(item));
            } else {
                let (k, v) = line.split_once(':').expect("key: value");
                assert!(
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "key {k:?}"
                );
                let v = v.trim();
                out.push((
                    k.into(),
                    if v.is_empty() {
                        vec![]
                    } else {
                        vec![scalar(v)]
                    },
                ));
            }
        }
        out
    }

    /// The values of `key`, if the front matter has it.
    pub fn get<'a>(fm: &'a [(String, Vec<String>)], key: &str) -> Option<&'a [String]> {
        fm.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("object"),
        }
    }

    #[test]
    fn hub_base_model_and_dataset_go_into_the_metadata() {
        let cfg = obj(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 32.0,
            "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "NCSOFT/Llama-VARCO-8B-Instruct"}));
        let run = obj(
            json!({"dataset": "capybaraOh/naver-economy-news2stock", "learning_rate": 1e-4, "num_train_epochs": 3.0}),
        );
        let metrics = "{\"step\":10,\"loss\":1.5}\n{\"step\":20,\"loss\":1.25}\n{\"step\":20,\"eval_loss\":1.3}\n";
        let eval = json!({"dataset": "d", "samples": 3, "results": [
            {"model": "base", "json_ok": 0.0, "related_accuracy": 0.0, "f1_positive": 0.0, "f1_negative": 1.0},
            {"model": "adapter", "json_ok": 1.0, "related_accuracy": 0.5, "f1_positive": 0.25, "f1_negative": 1.0}]});
        let card = model_card(&CardInputs {
            repo_id: "me/news2stock-lora",
            adapter_config: &cfg,
            run_settings: Some(&run),
            metrics_jsonl: Some(metrics),
            eval_results: Some(&eval),
        });
        let fm = front_matter::parse(&card);
        assert_eq!(
            front_matter::get(&fm, "base_model").unwrap(),
            ["NCSOFT/Llama-VARCO-8B-Instruct"]
        );
        assert_eq!(front_matter::get(&fm, "library_name").unwrap(), ["peft"]);
        assert_eq!(
            front_matter::get(&fm, "pipeline_tag").unwrap(),
            ["text-generation"]
        );
        let tags = front_matter::get(&fm, "tags").unwrap();
        for t in [
            "base_model:adapter:NCSOFT/Llama-VARCO-8B-Instruct",
            "peft",
            "lora",
            "sft",
        ] {
            assert!(tags.iter().any(|x| x == t), "{t} in {tags:?}");
        }
        assert_eq!(
            front_matter::get(&fm, "datasets").unwrap(),
            ["capybaraOh/naver-economy-news2stock"]
        );
        assert!(card.contains("| `r` | 8 |"), "{card}");
        assert!(
            card.contains("| `target_modules` | q_proj, v_proj |"),
            "{card}"
        );
        assert!(card.contains("| `learning_rate` | 0.0001 |"), "{card}");
        assert!(
            card.contains("final train loss: 1.2500 (step 20)"),
            "{card}"
        );
        assert!(card.contains("final eval loss: 1.3000 (step 20)"), "{card}");
        assert!(
            card.contains("| adapter | 100.0% | 50.0% | 0.250 | 1.000 |"),
            "{card}"
        );
    }

    #[test]
    fn local_or_demo_names_stay_out_of_the_metadata() {
        let cfg = obj(json!({"r": 4, "base_model_name_or_path": DEMO_MODEL}));
        let run = obj(json!({"dataset": DEMO_DATASET}));
        let card = model_card(&CardInputs {
            repo_id: "me/demo",
            adapter_config: &cfg,
            run_settings: Some(&run),
            metrics_jsonl: None,
            eval_results: None,
        });
        let fm = front_matter::parse(&card);
        assert!(
            front_matter::get(&fm, "base_model").is_none()
                && front_matter::get(&fm, "datasets").is_none()
        );
        assert_eq!(front_matter::get(&fm, "library_name").unwrap(), ["peft"]);
        assert!(card.contains("tiny random Llama") && !card.contains("## Results"));
    }

    #[test]
    fn final_losses_takes_the_last_of_each() {
        let m = "{\"step\":1,\"loss\":3.0}\nnot json\n{\"step\":2,\"eval_loss\":2.5}\n{\"step\":3,\"loss\":2.0}\n";
        assert_eq!(final_losses(m), (Some((3, 2.0)), Some((2, 2.5))));
        assert_eq!(final_losses(""), (None, None));
    }

    #[test]
    fn quotes_and_pipes_are_escaped() {
        assert_eq!(yaml_str("a\"b"), "\"a\\\"b\"");
        assert_eq!(cell(&json!("x|y")), "x\\|y");
    }
}
