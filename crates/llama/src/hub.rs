//! Where a model's files come from: a local folder (no network at all) or the Hugging Face Hub
//! through `hf-hub`, with the HF cache, a revision, `HF_TOKEN`, and `HF_HUB_OFFLINE=1`.
//!
//! hf-hub 0.4 reads the token file but not `HF_TOKEN`, and has no offline switch; both are added
//! here through [`HubOptions`] (cache-only lookups go straight to
//! `<cache>/models--org--name/snapshots/<commit>/`).

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
    /// One safetensors file, or every shard named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if present.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json`, if present.
    pub generation_config: Option<PathBuf>,
}

/// How to reach the Hub: Python `huggingface_hub`'s environment, made explicit.
#[derive(Debug, Clone, PartialEq)]
pub struct HubOptions {
    /// The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// The endpoint (`$HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: String,
    /// Access token (`$HF_TOKEN`, else the `token` file beside the cache).
    pub token: Option<String>,
    /// Cache only, no network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubOptions {
    /// From the environment variables Python's `huggingface_hub` reads.
    pub fn from_env() -> Self {
        let hf_home = env_nonempty("HF_HOME").map(PathBuf::from).or_else(|| {
            env_nonempty("HOME")
                .or_else(|| env_nonempty("USERPROFILE"))
                .map(|h| Path::new(&h).join(".cache").join("huggingface"))
        });
        let hf_home = hf_home.unwrap_or_else(|| PathBuf::from(".cache/huggingface"));
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            let path = env_nonempty("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubOptions {
            cache_dir,
            endpoint: env_nonempty("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            offline: env_flag("HF_HUB_OFFLINE"),
        }
    }
}

/// A file fetcher over one repo: the cache when offline, the Hub API otherwise.
pub struct HubRepo {
    repo: String,
    revision: String,
    repo_type: RepoType,
    opts: HubOptions,
}

impl HubRepo {
    /// A model or dataset repo, with options from the environment.
    pub fn new(repo: &str, revision: Option<&str>, repo_type: RepoType) -> Self {
        Self::with_options(repo, revision, repo_type, HubOptions::from_env())
    }

    /// A repo with explicit options.
    pub fn with_options(
        repo: &str,
        revision: Option<&str>,
        repo_type: RepoType,
        opts: HubOptions,
    ) -> Self {
        HubRepo {
            repo: repo.into(),
            revision: revision.unwrap_or("main").into(),
            repo_type,
            opts,
        }
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), self.repo_type, self.revision.clone())
    }

    fn err(&self, file: &str, message: String) -> Error {
        Error::Hub {
            repo: self.repo.clone(),
            file: file.into(),
            message,
        }
    }

    /// The cached copy of `file`, if any: through `refs/<revision>`, or directly under
    /// `snapshots/<revision>/` when the revision is a commit hash.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        let cache = Cache::new(self.opts.cache_dir.clone());
        if let Some(p) = cache.repo(self.hf_repo()).get(file) {
            return Some(p);
        }
        let direct = self
            .opts
            .cache_dir
            .join(self.hf_repo().folder_name())
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        direct.is_file().then_some(direct)
    }

    /// A local path of `file`, downloading it unless offline.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        if self.opts.offline {
            return Err(self.err(
                file,
                format!(
                    "HF_HUB_OFFLINE is set and the file is not in the cache {} (revision {})",
                    self.opts.cache_dir.display(),
                    self.revision
                ),
            ));
        }
        let api = self.api(file)?;
        api.repo(self.hf_repo()).get(file).map_err(|e| {
            self.err(
                file,
                format!(
                    "{e} (endpoint {}; no network? set HF_HUB_OFFLINE=1 to use the cache, or pass a local folder)",
                    self.opts.endpoint
                ),
            )
        })
    }

    fn api(&self, file: &str) -> Result<hf_hub::api::sync::Api> {
        hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(self.opts.cache_dir.clone()))
            .with_endpoint(self.opts.endpoint.clone())
            .with_token(self.opts.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| self.err(file, e.to_string()))
    }

    /// The repo's file names (online only).
    pub fn list(&self) -> Result<Vec<String>> {
        const LISTING: &str = "<listing>";
        if self.opts.offline {
            return Err(self.err(
                LISTING,
                "HF_HUB_OFFLINE is set: cannot list the repo".into(),
            ));
        }
        let info = self
            .api(LISTING)?
            .repo(self.hf_repo())
            .info()
            .map_err(|e| self.err(LISTING, format!("{e} (endpoint {})", self.opts.endpoint)))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }
}

/// The shard file names of a `model.safetensors.index.json`, sorted, each once.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::Io {
        path: index.into(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.into(),
        message: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: index.into(),
            message: "field `weight_map` (tensor name -> shard file) is missing".into(),
        })?;
    let mut names = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Config {
            path: index.into(),
            message: format!("field `weight_map.{tensor}` must be a file name"),
        })?;
        names.push(file.to_string());
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Resolves the files of `source` (Hub options from the environment).
pub fn resolve(source: &ModelSource) -> Result<ModelFiles> {
    resolve_with(source, &HubOptions::from_env())
}

/// Resolves the files of `source` with explicit Hub options.
pub fn resolve_with(source: &ModelSource, opts: &HubOptions) -> Result<ModelFiles> {
    match source {
        ModelSource::Local(dir) => {
            let config = dir.join("config.json");
            if !config.is_file() {
                return Err(Error::Io {
                    path: config,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "config.json not found in the model folder",
                    ),
                });
            }
            let index = dir.join("model.safetensors.index.json");
            let weights = if index.is_file() {
                shard_names(&index)?
                    .into_iter()
                    .map(|n| dir.join(n))
                    .collect()
            } else {
                vec![dir.join("model.safetensors")]
            };
            let opt = |n: &str| Some(dir.join(n)).filter(|p| p.is_file());
            Ok(ModelFiles {
                config,
                weights,
                tokenizer: opt("tokenizer.json"),
                tokenizer_config: opt("tokenizer_config.json"),
                generation_config: opt("generation_config.json"),
            })
        }
        ModelSource::Hub { repo, revision } => {
            let hub =
                HubRepo::with_options(repo, revision.as_deref(), RepoType::Model, opts.clone());
            let config = hub.get("config.json")?;
            let weights = match hub.get("model.safetensors.index.json") {
                Ok(index) => shard_names(&index)?
                    .iter()
                    .map(|n| hub.get(n))
                    .collect::<Result<Vec<_>>>()?,
                Err(index_err) => vec![hub.get("model.safetensors").map_err(|e| {
                    hub.err(
                        "model.safetensors",
                        format!("{e}; and model.safetensors.index.json: {index_err}"),
                    )
                })?],
            };
            Ok(ModelFiles {
                config,
                weights,
                tokenizer: hub.get("tokenizer.json").ok(),
                tokenizer_config: hub.get("tokenizer_config.json").ok(),
                generation_config: hub.get("generation_config.json").ok(),
            })
        }
    }
}
