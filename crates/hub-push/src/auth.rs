//! Endpoint and token from the environment, resolved the way huggingface_hub does.
//!
//! - endpoint: `HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`];
//! - token: `HF_TOKEN`, else the legacy `HUGGING_FACE_HUB_TOKEN`, else the token file: `HF_TOKEN_PATH`,
//!   else `$HF_HOME/token`, else `$XDG_CACHE_HOME/huggingface/token`, else
//!   `~/.cache/huggingface/token` (what `hf auth login` writes).

use std::path::PathBuf;

use crate::client::HubClient;

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The endpoint from `HF_ENDPOINT` (trailing `/` dropped), else [`DEFAULT_ENDPOINT`].
pub fn endpoint_from_env() -> String {
    endpoint_with(env_var)
}

/// The token from `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN`, else from the token file
/// ([`token_path`]); blank values count as none.
pub fn token_from_env() -> Option<String> {
    token_with(env_var, |path| std::fs::read_to_string(path).ok())
}

/// Where huggingface_hub keeps the token: `HF_TOKEN_PATH`, else `$HF_HOME/token`, else
/// `$XDG_CACHE_HOME/huggingface/token`, else `~/.cache/huggingface/token`. `None` only when no
/// home folder is known.
pub fn token_path() -> Option<PathBuf> {
    token_path_with(env_var)
}

impl HubClient {
    /// A client configured from the environment: [`endpoint_from_env`] and [`token_from_env`].
    pub fn from_env() -> Self {
        HubClient::new(endpoint_from_env(), token_from_env())
    }
}

fn non_blank(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn endpoint_with(env: impl Fn(&str) -> Option<String>) -> String {
    non_blank(env("HF_ENDPOINT"))
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

fn token_path_with(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = non_blank(env("HF_TOKEN_PATH")) {
        return Some(expand_home(&path, &env));
    }
    let hf_home = match non_blank(env("HF_HOME")) {
        Some(home) => expand_home(&home, &env),
        None => {
            let cache = match non_blank(env("XDG_CACHE_HOME")) {
                Some(cache) => expand_home(&cache, &env),
                None => home_dir(&env)?.join(".cache"),
            };
            cache.join("huggingface")
        }
    };
    Some(hf_home.join("token"))
}

fn token_with(
    env: impl Fn(&str) -> Option<String>,
    read: impl Fn(&PathBuf) -> Option<String>,
) -> Option<String> {
    non_blank(env("HF_TOKEN"))
        .or_else(|| non_blank(env("HUGGING_FACE_HUB_TOKEN")))
        .or_else(|| non_blank(read(&token_path_with(&env)?)))
}

fn home_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    non_blank(env("HOME"))
        .or_else(|| non_blank(env("USERPROFILE")))
        .map(PathBuf::from)
}

fn expand_home(path: &str, env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => match home_dir(env) {
            Some(home) => home.join(rest),
            None => PathBuf::from(path),
        },
        None => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn endpoint_default_and_override() {
        assert_eq!(endpoint_with(env_of(&[])), DEFAULT_ENDPOINT);
        assert_eq!(
            endpoint_with(env_of(&[("HF_ENDPOINT", "")])),
            DEFAULT_ENDPOINT
        );
        assert_eq!(
            endpoint_with(env_of(&[("HF_ENDPOINT", "http://mirror:1/")])),
            "http://mirror:1"
        );
    }

    #[test]
    fn token_path_precedence() {
        let home = [("HOME", "/home/u")];
        assert_eq!(
            token_path_with(env_of(&home)),
            Some(PathBuf::from("/home/u/.cache/huggingface/token"))
        );
        assert_eq!(
            token_path_with(env_of(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")])),
            Some(PathBuf::from("/xdg/huggingface/token"))
        );
        assert_eq!(
            token_path_with(env_of(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")])),
            Some(PathBuf::from("/home/u/hf/token"))
        );
        assert_eq!(
            token_path_with(env_of(&[("HF_HOME", "/hf"), ("HF_TOKEN_PATH", "/t/tok")])),
            Some(PathBuf::from("/t/tok"))
        );
        assert_eq!(token_path_with(env_of(&[])), None);
    }

    #[test]
    fn token_precedence() {
        let file =
            |p: &PathBuf| (p == &PathBuf::from("/hf/token")).then(|| "file-tok\n".to_string());
        let env = [("HF_HOME", "/hf")];
        assert_eq!(token_with(env_of(&env), file), Some("file-tok".into()));
        let env = [("HF_HOME", "/hf"), ("HUGGING_FACE_HUB_TOKEN", "legacy")];
        assert_eq!(token_with(env_of(&env), file), Some("legacy".into()));
        let env = [
            ("HF_HOME", "/hf"),
            ("HUGGING_FACE_HUB_TOKEN", "legacy"),
            ("HF_TOKEN", " t "),
        ];
        assert_eq!(token_with(env_of(&env), file), Some("t".into()));
        let env = [("HF_HOME", "/elsewhere"), ("HF_TOKEN", "  ")];
        assert_eq!(token_with(env_of(&env), file), None);
    }
}
