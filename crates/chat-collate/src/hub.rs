//! Finding and fetching a Hub dataset's parquet files, with the Hugging Face conventions the
//! `hf-hub` crate lacks: `HF_TOKEN`, `HF_HUB_OFFLINE=1` (cache only), and falling back to the
//! cache when the Hub cannot be reached.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Where and how to reach the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// `$HF_HOME/hub`, default `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the cache's token file.
    pub token: Option<String>,
    /// `HF_ENDPOINT` when set.
    pub endpoint: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use the cache only.
    pub offline: bool,
}

impl HubOptions {
    /// Reads `HF_HOME`, `HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            cache_dir: cache.path().clone(),
            token: env("HF_TOKEN").or_else(|| cache.token()),
            endpoint: env("HF_ENDPOINT"),
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            }),
        }
    }
}

/// The parquet files of `split` among a repo's files: names ending in `.parquet` whose file
/// name starts with `{split}-` or `{split}.` or that sit in a `{split}/` folder; all parquet
/// files when none match. Sorted.
pub fn select_parquet_files(files: &[String], split: &str) -> Vec<String> {
    let parquet: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    let in_split = |f: &&&String| {
        let name = f.rsplit('/').next().unwrap_or(f);
        name.starts_with(&format!("{split}-"))
            || name.starts_with(&format!("{split}."))
            || f.split('/').any(|dir| dir == split)
    };
    let mut chosen: Vec<String> = parquet
        .iter()
        .filter(in_split)
        .map(|f| f.to_string())
        .collect();
    if chosen.is_empty() {
        chosen = parquet.into_iter().cloned().collect();
    }
    chosen.sort();
    chosen
}

/// Local paths of the parquet files of `split` in dataset `repo` at `revision` (default
/// `main`), downloading them unless offline; falls back to the cache when the Hub fails.
pub fn fetch_parquet_files(
    opts: &HubOptions,
    repo: &str,
    revision: Option<&str>,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let revision = revision.unwrap_or("main");
    if opts.offline {
        return cached_parquet_files(opts, repo, revision, split).ok_or_else(|| {
            Error::Hub(format!(
                "HF_HUB_OFFLINE is set and {} has no cached parquet files of {repo}@{revision}",
                opts.cache_dir.display()
            ))
        });
    }
    match fetch_online(opts, repo, revision, split) {
        Ok(paths) => Ok(paths),
        Err(online) => cached_parquet_files(opts, repo, revision, split).ok_or(online),
    }
}

fn fetch_online(
    opts: &HubOptions,
    repo: &str,
    revision: &str,
    split: &str,
) -> Result<Vec<PathBuf>> {
    let hub = |e: hf_hub::api::sync::ApiError| Error::Hub(format!("{repo}@{revision}: {e}"));
    let mut builder = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_progress(false)
        .with_token(opts.token.clone());
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().map_err(hub)?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Dataset,
        revision.to_string(),
    ));
    let info = api_repo.info().map_err(hub)?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen = select_parquet_files(&names, split);
    if chosen.is_empty() {
        return Err(Error::Hub(format!(
            "{repo}@{revision} has no parquet files"
        )));
    }
    chosen
        .iter()
        .map(|f| api_repo.get(f).map_err(hub))
        .collect()
}

/// The cached snapshot's parquet files of `split`, if the snapshot exists and has any.
fn cached_parquet_files(
    opts: &HubOptions,
    repo: &str,
    revision: &str,
    split: &str,
) -> Option<Vec<PathBuf>> {
    let root = opts
        .cache_dir
        .join(format!("datasets--{}", repo.replace('/', "--")));
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        std::fs::read_to_string(root.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = root.join("snapshots").join(commit);
    let mut names = Vec::new();
    list_files(&snapshot, "", &mut names);
    let chosen = select_parquet_files(&names, split);
    (!chosen.is_empty()).then(|| chosen.iter().map(|f| snapshot.join(f)).collect())
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            list_files(&path, &rel, out);
        } else {
            out.push(rel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_split_files_from_a_listing() {
        let files: Vec<String> = [
            "README.md",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            ".gitattributes",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            select_parquet_files(&files, "train"),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        let other = vec!["default/part.parquet".to_string()];
        assert_eq!(select_parquet_files(&other, "train"), other);
    }
}
