//! Step 3 of an upload: the commit. One NDJSON body: a header line (summary, description), then a
//! `file` line per regular file (base64 content) and an `lfsFile` line per LFS file (sha256 oid
//! and size of the object uploaded before).

use base64::Engine;
use serde_json::{json, Value};

use crate::client::{read_json, HubClient};
use crate::error::{HubError, Result, Step};
use crate::files::PreparedFile;
use crate::preupload::UploadMode;

/// What a successful commit produced. Only built from a success reply of the commit call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// URL of the commit on the Hub (`commitUrl` of the reply).
    pub commit_url: String,
    /// Id (git sha) of the new commit (`commitOid` of the reply).
    pub commit_oid: String,
    /// The commit message (summary) sent.
    pub commit_message: String,
    /// The files the commit contains, in the order given.
    pub files: Vec<CommittedFile>,
    /// Paths the Hub said to ignore (its `.gitignore`), left out of the commit.
    pub ignored: Vec<String>,
}

/// One file of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedFile {
    /// Path in the repository.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether it went inline or through LFS.
    pub mode: UploadMode,
    /// sha256 of the content, lowercase hex (the LFS oid for LFS files).
    pub sha256: String,
}

/// The NDJSON body of the commit call.
pub(crate) fn ndjson_body(
    message: &str,
    files: &[(&PreparedFile<'_>, UploadMode)],
) -> Result<Vec<u8>> {
    let mut lines =
        vec![json!({"key": "header", "value": {"summary": message, "description": ""}})];
    for (file, mode) in files {
        lines.push(match mode {
            UploadMode::Regular => json!({"key": "file", "value": {
                "content": base64::engine::general_purpose::STANDARD.encode(file.read_all()?),
                "path": file.path,
                "encoding": "base64",
            }}),
            UploadMode::Lfs => json!({"key": "lfsFile", "value": {
                "path": file.path,
                "algo": "sha256",
                "oid": file.oid(),
                "size": file.size,
            }}),
        });
    }
    let mut body = Vec::new();
    for line in lines {
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    Ok(body)
}

/// `POST {endpoint}/api/models/{repo_id}/commit/{revision}` (`revision` URL-encoded already);
/// returns `(commitUrl, commitOid)` of the success reply.
pub(crate) fn send_commit(
    client: &HubClient,
    repo_id: &str,
    revision: &str,
    body: &[u8],
) -> Result<(String, String)> {
    let url = format!(
        "{}/api/models/{repo_id}/commit/{revision}",
        client.endpoint()
    );
    let outcome = client
        .request("POST", &url)
        .set("Content-Type", "application/x-ndjson")
        .set("Accept", "application/json")
        .send_bytes(body);
    let response = client.check(Step::Commit, &url, outcome)?;
    let reply = read_json(Step::Commit, &url, response)?;
    let field = |name: &str| reply.get(name).and_then(Value::as_str).map(str::to_string);
    match (field("commitUrl"), field("commitOid")) {
        (Some(commit_url), Some(commit_oid)) => Ok((commit_url, commit_oid)),
        _ => Err(HubError::InvalidResponse {
            step: Step::Commit,
            url,
            expected: r#"{"commitUrl": string, "commitOid": string}"#,
            detail: format!("reply {reply}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::FileSource;

    #[test]
    fn ndjson_lines() {
        let (a, b) = (FileSource::from("hello"), FileSource::from(vec![1u8; 2000]));
        let pa = PreparedFile::prepare("a.txt", &a).unwrap();
        let pb = PreparedFile::prepare("w/b.bin", &b).unwrap();
        let body =
            ndjson_body("msg", &[(&pa, UploadMode::Regular), (&pb, UploadMode::Lfs)]).unwrap();
        let text = String::from_utf8(body).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(text.ends_with('\n'));
        assert_eq!(
            lines[0],
            json!({"key": "header", "value": {"summary": "msg", "description": ""}})
        );
        assert_eq!(
            lines[1],
            json!({"key": "file", "value": {"content": "aGVsbG8=", "path": "a.txt", "encoding": "base64"}})
        );
        assert_eq!(
            lines[2],
            json!({"key": "lfsFile", "value": {"path": "w/b.bin", "algo": "sha256", "oid": pb.oid(), "size": 2000}})
        );
    }
}
