//! Where a model's files come from: a local folder (no network at all) or the Hugging Face Hub
//! through `hf-hub`, with the HF cache, a revision, `HF_TOKEN`, and `HF_HUB_OFFLINE=1`.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// A model location.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A folder with `config.json` and safetensors.
    Local(PathBuf),
    /// A Hub repo id and optional revision.
    Hub {
        /// e.g. `NCSOFT/Llama-VARCO-8B-Instruct`.
        repo: String,
        /// Branch, tag or commit (default `main`).
        revision: Option<String>,
    },
}

impl ModelSource {
    /// An existing folder is local; anything else is a Hub id (`org/name[@revision]`).
    pub fn parse(s: &str) -> Self {
        if Path::new(s).is_dir() {
            return ModelSource::Local(s.into());
        }
        match s.split_once('@') {
            Some((repo, rev)) => ModelSource::Hub {
                repo: repo.into(),
                revision: Some(rev.into()),
            },
            None => ModelSource::Hub {
                repo: s.into(),
                revision: None,
            },
        }
    }
}

/// The files of a checkpoint, resolved to local paths.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// One safetensors file, or every shard of `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if present.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only.
pub fn hub_offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes"))
}

/// A file fetcher over one repo: the cache when offline, the Hub API otherwise.
pub struct HubRepo {
    repo: String,
    revision: String,
    repo_type: RepoType,
}

impl HubRepo {
    /// A model or dataset repo.
    pub fn new(repo: &str, revision: Option<&str>, repo_type: RepoType) -> Self {
        HubRepo {
            repo: repo.into(),
            revision: revision.unwrap_or("main").into(),
            repo_type,
        }
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), self.repo_type, self.revision.clone())
    }

    /// A local path of `file`, downloading it unless offline.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        let err = |m: String| Error::Hub {
            repo: self.repo.clone(),
            file: file.into(),
            message: m,
        };
        let cache = Cache::from_env();
        if let Some(p) = cache.repo(self.hf_repo()).get(file) {
            return Ok(p);
        }
        if hub_offline() {
            return Err(err(format!(
                "HF_HUB_OFFLINE is set and the file is not in the cache {}",
                cache.path().display()
            )));
        }
        let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_token(token).with_progress(false);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder.build().map_err(|e| err(e.to_string()))?;
        api.repo(self.hf_repo())
            .get(file)
            .map_err(|e| err(format!("{e} (no network? set HF_HUB_OFFLINE=1 to use the cache, or pass a local folder)")))
    }

    /// The repo's file names (online only).
    pub fn list(&self) -> Result<Vec<String>> {
        if hub_offline() {
            return Err(Error::Hub {
                repo: self.repo.clone(),
                file: "<listing>".into(),
                message: "HF_HUB_OFFLINE is set: cannot list the repo".into(),
            });
        }
        let token = std::env::var("HF_TOKEN").ok().or_else(|| Cache::from_env().token());
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_token(token)
            .build()
            .map_err(|e| Error::Hub {
                repo: self.repo.clone(),
                file: "<listing>".into(),
                message: e.to_string(),
            })?;
        let info = api.repo(self.hf_repo()).info().map_err(|e| Error::Hub {
            repo: self.repo.clone(),
            file: "<listing>".into(),
            message: e.to_string(),
        })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::Io {
        path: index.into(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.into(),
        message: e.to_string(),
    })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
        path: index.into(),
        message: "field `weight_map` (tensor name -> shard file) is missing".into(),
    })?;
    let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Resolves the files of `source`.
pub fn resolve(source: &ModelSource) -> Result<ModelFiles> {
    match source {
        ModelSource::Local(dir) => {
            let config = dir.join("config.json");
            if !config.exists() {
                return Err(Error::Io {
                    path: config,
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "config.json not found in the model folder"),
                });
            }
            let index = dir.join("model.safetensors.index.json");
            let weights = if index.exists() {
                shard_names(&index)?.into_iter().map(|n| dir.join(n)).collect()
            } else {
                vec![dir.join("model.safetensors")]
            };
            let opt = |n: &str| Some(dir.join(n)).filter(|p| p.exists());
            Ok(ModelFiles {
                config,
                weights,
                tokenizer: opt("tokenizer.json"),
                tokenizer_config: opt("tokenizer_config.json"),
            })
        }
        ModelSource::Hub { repo, revision } => {
            let hub = HubRepo::new(repo, revision.as_deref(), RepoType::Model);
            let config = hub.get("config.json")?;
            let weights = match hub.get("model.safetensors.index.json") {
                Ok(index) => shard_names(&index)?
                    .iter()
                    .map(|n| hub.get(n))
                    .collect::<Result<Vec<_>>>()?,
                Err(_) => vec![hub.get("model.safetensors")?],
            };
            Ok(ModelFiles {
                config,
                weights,
                tokenizer: hub.get("tokenizer.json").ok(),
                tokenizer_config: hub.get("tokenizer_config.json").ok(),
            })
        }
    }
}

/// Loads `tokenizer.json`.
pub fn load_tokenizer(files: &ModelFiles) -> Result<tokenizers::Tokenizer> {
    let path = files.tokenizer.clone().ok_or_else(|| Error::Tokenizer {
        path: files.config.with_file_name("tokenizer.json"),
        message: "tokenizer.json not found beside the model".into(),
    })?;
    tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
        path,
        message: e.to_string(),
    })
}
