//! `push`: upload an adapter folder to the Hugging Face Hub with a generated model card, in one
//! commit, as PEFT's `push_to_hub` does; `train --push-to-hub` calls it after training. The
//! folder is checked before any request, and nothing is reported uploaded before the commit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hub_push::{CommitInfo, FileSource, HubClient};
use serde_json::{Map, Value};

use crate::cli::PushArgs;
use crate::evaluate::EVAL_RESULTS_FILE;
use crate::model_card::{model_card, CardInputs};
use crate::settings::SETTINGS_FILE;

/// The adapter config file of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Files uploaded beside the adapter when the folder has them.
const OPTIONAL_FILES: &[&str] = &["metrics.jsonl", "loss.png"];

/// What to push where.
#[derive(Debug, Clone)]
pub struct PushRequest<'a> {
    /// `OWNER/NAME`.
    pub repo_id: &'a str,
    /// Create the repository private.
    pub private: bool,
    /// Branch (default `main`).
    pub revision: Option<&'a str>,
    /// Commit message.
    pub commit_message: &'a str,
}

/// Refuses a repo id that is not `OWNER/NAME` (as the Hub spells them).
pub fn check_repo_id(repo_id: &str) -> Result<()> {
    let ok = repo_id.split_once('/').is_some_and(|(owner, name)| {
        [owner, name].iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['.', '-'])
                && !p.contains("..")
                && !p.contains("--")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    });
    if !ok {
        bail!("--repo-id {repo_id:?}: expected OWNER/NAME (letters, digits, -, _ and .)");
    }
    Ok(())
}

/// Refuses a folder that is not a PEFT adapter: `adapter_config.json` must parse as PEFT's
/// `LoraConfig` and `adapter_model.safetensors` must open. Returns the config as JSON (for the
/// model card).
pub fn check_adapter(dir: &Path) -> Result<Map<String, Value>> {
    if !dir.is_dir() {
        bail!("{}: no such adapter folder", dir.display());
    }
    let not_adapter = |what: String| {
        anyhow::anyhow!(
            "{}: not a PEFT adapter folder ({what}); expected {CONFIG_FILE} and {}, as `news2stock train` or PEFT's save_pretrained write them",
            dir.display(),
            peft_lora::WEIGHTS_FILE
        )
    };
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(not_adapter(format!("{CONFIG_FILE} is missing")));
    }
    peft_lora::LoraConfig::from_file(&config_path)
        .map_err(|e| not_adapter(format!("{CONFIG_FILE} is not a LoRA config: {e}")))?;
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let Value::Object(config) = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?
    else {
        return Err(not_adapter(format!("{CONFIG_FILE} is not a JSON object")));
    };
    let weights = dir.join(peft_lora::WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(not_adapter(format!(
            "{} is missing",
            peft_lora::WEIGHTS_FILE
        )));
    }
    peft_lora::SafetensorsFile::open(&weights)
        .map_err(|e| not_adapter(format!("{} does not open: {e}", peft_lora::WEIGHTS_FILE)))?;
    Ok(config)
}

/// Reads an optional JSON file of the adapter folder (absent: `None`).
fn optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(v))
}

/// The files of one push: the adapter, a generated `README.md`, and the metrics and loss plot
/// when present, as `(path in the repository, source)`.
pub fn files_to_push(
    dir: &Path,
    repo_id: &str,
    adapter_config: &Map<String, Value>,
) -> Result<Vec<(String, FileSource)>> {
    let run_settings = optional_json(&dir.join(SETTINGS_FILE))?;
    let eval_results = optional_json(&dir.join(EVAL_RESULTS_FILE))?;
    let metrics_path = dir.join("metrics.jsonl");
    let metrics = if metrics_path.is_file() {
        Some(
            std::fs::read_to_string(&metrics_path)
                .with_context(|| format!("reading {}", metrics_path.display()))?,
        )
    } else {
        None
    };
    let card = model_card(&CardInputs {
        repo_id,
        adapter_config,
        run_settings: run_settings.as_ref().and_then(Value::as_object),
        metrics_jsonl: metrics.as_deref(),
        eval_results: eval_results.as_ref(),
    });
    let mut files: Vec<(String, FileSource)> = vec![
        (CONFIG_FILE.into(), dir.join(CONFIG_FILE).into()),
        (
            peft_lora::WEIGHTS_FILE.into(),
            dir.join(peft_lora::WEIGHTS_FILE).into(),
        ),
        ("README.md".into(), FileSource::Bytes(card.into_bytes())),
    ];
    for name in OPTIONAL_FILES {
        let path: PathBuf = dir.join(name);
        if path.is_file() {
            files.push((name.to_string(), path.into()));
        }
    }
    Ok(files)
}

/// Refuses to start without a token (before any request, and before a long training run).
pub fn check_token(hub: &HubClient) -> Result<()> {
    if !hub.has_token() {
        bail!("no Hugging Face token: set HF_TOKEN (or log in with `hf auth login`) to a token with write access");
    }
    Ok(())
}

/// Checks the folder, creates the repository (an existing one is fine) and uploads the files
/// in one commit. Prints what was committed once the commit has succeeded.
pub fn push(hub: &HubClient, dir: &Path, req: &PushRequest<'_>) -> Result<CommitInfo> {
    let adapter_config = check_adapter(dir)?;
    check_repo_id(req.repo_id)?;
    check_token(hub)?;
    let files = files_to_push(dir, req.repo_id, &adapter_config)?;
    let what = || format!("pushing {} to {}", dir.display(), req.repo_id);
    hub.create_repo(req.repo_id, req.private, true)
        .with_context(what)?;
    let commit = hub
        .upload_files(req.repo_id, req.revision, &files, req.commit_message)
        .with_context(what)?;
    println!(
        "pushed {} files to {} ({}):",
        commit.files.len(),
        req.repo_id,
        commit.commit_url
    );
    for f in &commit.files {
        println!("  {} ({} bytes)", f.path, f.size);
    }
    Ok(commit)
}

/// `news2stock push`: the folder given (or `runs/demo` with --demo), through the Hub client
/// configured from the environment (HF_ENDPOINT, HF_TOKEN).
pub fn run(args: &PushArgs, demo: bool) -> Result<()> {
    let dir = match (&args.adapter_dir, demo) {
        (Some(d), _) => d.clone(),
        (None, true) => PathBuf::from("runs/demo"),
        (None, false) => bail!(
            "push: give the adapter folder (news2stock push ADAPTER_DIR --repo-id OWNER/NAME)"
        ),
    };
    let req = PushRequest {
        repo_id: &args.repo_id,
        private: args.private,
        revision: args.revision.as_deref(),
        commit_message: &args.commit_message,
    };
    push(&HubClient::from_env(), &dir, &req).map(|_| ())
}
