//! Step 1 of an upload: ask the Hub, per file, whether it goes inline ("regular") or through Git
//! LFS, and whether it is ignored (`.gitignore` on the Hub side).

use std::collections::HashMap;

use base64::Engine;
use serde_json::{json, Value};

use crate::client::HubClient;
use crate::error::{HubError, Result, Step};
use crate::files::PreparedFile;

/// Files per preupload request (the Hub's limit, as huggingface_hub uses).
const PREUPLOAD_CHUNK: usize = 256;

/// How the Hub wants a file's content sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UploadMode {
    /// Inline, base64, in the commit call.
    Regular,
    /// Through Git LFS: batch request, `PUT` of the bytes, then a pointer in the commit.
    Lfs,
}

/// The Hub's answer for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preupload {
    pub mode: UploadMode,
    pub should_ignore: bool,
}

/// `POST {endpoint}/api/models/{repo_id}/preupload/{revision}` for every file, in chunks; the
/// answers come back in the order of `files`. `revision` must be URL-encoded already.
pub(crate) fn fetch_upload_modes(
    client: &HubClient,
    repo_id: &str,
    revision: &str,
    files: &[PreparedFile<'_>],
) -> Result<Vec<Preupload>> {
    let url = format!(
        "{}/api/models/{repo_id}/preupload/{revision}",
        client.endpoint()
    );
    let mut answers: HashMap<String, Preupload> = HashMap::new();
    for chunk in files.chunks(PREUPLOAD_CHUNK) {
        let payload = json!({
            "files": chunk.iter().map(|f| json!({
                "path": f.path,
                "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample),
                "size": f.size,
            })).collect::<Vec<_>>(),
        });
        let reply = client.post_json(Step::Preupload, &url, &payload, false)?;
        parse_reply(&url, &reply, &mut answers)?;
    }
    files
        .iter()
        .map(|f| {
            let mut answer = answers
                .get(f.path)
                .copied()
                .ok_or_else(|| invalid(&url, format!("no entry for `{}`", f.path)))?;
            // Empty files cannot go through LFS (storage rejects empty PUTs): huggingface_hub
            // commits them inline whatever the Hub says.
            if f.size == 0 {
                answer.mode = UploadMode::Regular;
            }
            Ok(answer)
        })
        .collect()
}

fn parse_reply(url: &str, reply: &Value, answers: &mut HashMap<String, Preupload>) -> Result<()> {
    let entries = reply
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(url, format!("no `files` array in {reply}")))?;
    for entry in entries {
        let path = entry
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(url, format!("entry without a `path`: {entry}")))?;
        let mode = match entry.get("uploadMode").and_then(Value::as_str) {
            Some("lfs") => UploadMode::Lfs,
            Some("regular") => UploadMode::Regular,
            other => {
                return Err(invalid(url, format!("`uploadMode` {other:?} for `{path}`")));
            }
        };
        let should_ignore = entry
            .get("shouldIgnore")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        answers.insert(
            path.to_string(),
            Preupload {
                mode,
                should_ignore,
            },
        );
    }
    Ok(())
}

fn invalid(url: &str, detail: String) -> HubError {
    HubError::InvalidResponse {
        step: Step::Preupload,
        url: url.to_string(),
        expected: r#"{"files": [{"path", "uploadMode": "lfs"|"regular", "shouldIgnore"}]} with an entry per file"#,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes_and_rejects_unknown_ones() {
        let mut answers = HashMap::new();
        let reply = json!({"files": [
            {"path": "a", "uploadMode": "lfs", "shouldIgnore": false},
            {"path": "b", "uploadMode": "regular", "shouldIgnore": true},
            {"path": "c", "uploadMode": "regular"},
        ]});
        parse_reply("u", &reply, &mut answers).unwrap();
        assert_eq!(
            answers["a"],
            Preupload {
                mode: UploadMode::Lfs,
                should_ignore: false
            }
        );
        assert_eq!(
            answers["b"],
            Preupload {
                mode: UploadMode::Regular,
                should_ignore: true
            }
        );
        assert!(!answers["c"].should_ignore);
        let bad = json!({"files": [{"path": "x", "uploadMode": "xet"}]});
        let err = parse_reply("u", &bad, &mut answers).unwrap_err();
        assert_eq!(err.step(), Some(Step::Preupload));
        assert!(parse_reply("u", &json!({"nope": 1}), &mut answers).is_err());
    }
}
