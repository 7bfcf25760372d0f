//! Uploading files in one commit: argument checks, then preupload, LFS, commit.

use std::collections::HashSet;
use std::path::Path;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::client::{validate_repo_id, HubClient};
use crate::commit::{ndjson_body, send_commit, CommitInfo, CommittedFile};
use crate::error::{HubError, Result};
use crate::files::{hex, read_folder, FileSource, FolderOptions, PreparedFile};
use crate::preupload::{fetch_upload_modes, UploadMode};
use crate::{lfs, DEFAULT_REVISION};

/// What `quote(revision, safe="")` leaves alone: letters, digits and `-._~`.
const REVISION_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl HubClient {
    /// Uploads `files` (`(path_in_repo, source)` pairs) to the model repository `repo_id` as one
    /// commit on `revision` (a branch; `None` means `"main"`), the way huggingface_hub's
    /// `create_commit` does:
    ///
    /// 1. preupload: the Hub says, per file, "regular" (inline) or "lfs", and which it ignores;
    /// 2. LFS files: batch request, `PUT` of the bytes unless the server has them, verify;
    /// 3. commit: NDJSON with regular files inline (base64) and LFS files as pointers.
    ///
    /// A [`CommitInfo`] comes back only when the commit call succeeded; any earlier failure
    /// returns the error of that step and commits nothing.
    pub fn upload_files<P: AsRef<str>>(
        &self,
        repo_id: &str,
        revision: Option<&str>,
        files: &[(P, FileSource)],
        commit_message: &str,
    ) -> Result<CommitInfo> {
        validate_repo_id(repo_id)?;
        if commit_message.trim().is_empty() {
            return Err(invalid(
                "commit_message",
                "empty; expected a commit summary".into(),
            ));
        }
        if files.is_empty() {
            return Err(invalid(
                "files",
                "empty; expected at least one file to commit".into(),
            ));
        }
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        if revision.is_empty() {
            return Err(invalid(
                "revision",
                "empty; expected a branch name such as \"main\"".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (path, _) in files {
            validate_path_in_repo(path.as_ref())?;
            if !seen.insert(path.as_ref()) {
                return Err(invalid(
                    "files",
                    format!("`{}` given twice; expected each path once", path.as_ref()),
                ));
            }
        }
        let quoted_revision = utf8_percent_encode(revision, REVISION_ESCAPES).to_string();

        let prepared = files
            .iter()
            .map(|(path, source)| PreparedFile::prepare(path.as_ref(), source))
            .collect::<Result<Vec<_>>>()?;
        let answers = fetch_upload_modes(self, repo_id, &quoted_revision, &prepared)?;

        let mut to_commit = Vec::new();
        let mut ignored = Vec::new();
        for (file, answer) in prepared.iter().zip(&answers) {
            if answer.should_ignore {
                ignored.push(file.path.to_string());
            } else {
                to_commit.push((file, answer.mode));
            }
        }
        let lfs_files: Vec<&PreparedFile<'_>> = to_commit
            .iter()
            .filter(|(_, mode)| *mode == UploadMode::Lfs)
            .map(|(f, _)| *f)
            .collect();
        lfs::upload_objects(self, repo_id, revision, &lfs_files)?;

        let body = ndjson_body(commit_message, &to_commit)?;
        let (commit_url, commit_oid) = send_commit(self, repo_id, &quoted_revision, &body)?;
        Ok(CommitInfo {
            commit_url,
            commit_oid,
            commit_message: commit_message.to_string(),
            files: to_commit
                .iter()
                .map(|(file, mode)| CommittedFile {
                    path: file.path.to_string(),
                    size: file.size,
                    mode: *mode,
                    sha256: hex(&file.sha256),
                })
                .collect(),
            ignored,
        })
    }

    /// [`read_folder`] then [`HubClient::upload_files`]: the files of `folder` (kept per
    /// `options`) as one commit, at the root of the repository.
    pub fn upload_folder(
        &self,
        repo_id: &str,
        revision: Option<&str>,
        folder: &Path,
        options: FolderOptions,
        commit_message: &str,
    ) -> Result<CommitInfo> {
        let files = read_folder(folder, options)?;
        if files.is_empty() {
            return Err(invalid(
                "folder",
                format!("{} has no files to upload (hidden files and subfolders count only when asked for)", folder.display()),
            ));
        }
        self.upload_files(repo_id, revision, &files, commit_message)
    }
}

/// A relative `/`-separated path without empty, `.` or `..` segments.
fn validate_path_in_repo(path: &str) -> Result<()> {
    let ok = !path.is_empty()
        && !path.contains('\\')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "path_in_repo",
            format!("{path:?}; expected a relative path with `/` separators and no empty, `.` or `..` parts"),
        ))
    }
}

fn invalid(argument: &'static str, problem: String) -> HubError {
    HubError::InvalidArgument { argument, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_is_quoted_like_python_quote_safe_empty() {
        let q = |r: &str| utf8_percent_encode(r, REVISION_ESCAPES).to_string();
        assert_eq!(q("main"), "main");
        assert_eq!(q("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(q("v1.0-rc_2~x"), "v1.0-rc_2~x");
        assert_eq!(q("a b"), "a%20b");
    }

    #[test]
    fn argument_checks() {
        assert!(validate_repo_id("user/model").is_ok());
        assert!(validate_repo_id("model").is_ok());
        for bad in ["", "a/b/c", "/a", "a/", "a b/c", "../x"] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_path_in_repo("adapter_config.json").is_ok());
        assert!(validate_path_in_repo("sub/dir/w.safetensors").is_ok());
        for bad in ["", "/abs", "a//b", "./a", "a/../b", "a\\b", "dir/"] {
            assert!(validate_path_in_repo(bad).is_err(), "{bad}");
        }
        let client = HubClient::new("http://127.0.0.1:9", None);
        let files = [("a", FileSource::from("x")), ("a", FileSource::from("y"))];
        let err = client.upload_files("u/m", None, &files, "msg").unwrap_err();
        assert!(
            matches!(
                err,
                HubError::InvalidArgument {
                    argument: "files",
                    ..
                }
            ),
            "{err}"
        );
        let err = client
            .upload_files("u/m", None, &files[..1], " ")
            .unwrap_err();
        assert!(
            matches!(
                err,
                HubError::InvalidArgument {
                    argument: "commit_message",
                    ..
                }
            ),
            "{err}"
        );
    }
}
