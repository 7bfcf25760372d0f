//! The error type: every variant names the step that failed and what was expected.

use std::fmt;
use std::path::PathBuf;

/// The step of a Hub operation an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// Reading the local files to upload (or listing a folder).
    ReadFiles,
    /// `POST {endpoint}/api/repos/create`.
    CreateRepo,
    /// `POST {endpoint}/api/models/{repo_id}/preupload/{revision}`: regular or LFS per file.
    Preupload,
    /// `POST {endpoint}/{repo_id}.git/info/lfs/objects/batch`: where to put LFS objects.
    LfsBatch,
    /// `PUT` of an LFS object's bytes (whole object, or one part of a multipart upload).
    LfsUpload,
    /// `POST` completing a multipart LFS upload.
    LfsComplete,
    /// `POST` to an LFS object's `verify` action.
    LfsVerify,
    /// `POST {endpoint}/api/models/{repo_id}/commit/{revision}`: the NDJSON commit.
    Commit,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ReadFiles => "reading local files",
            Step::CreateRepo => "create repo (POST /api/repos/create)",
            Step::Preupload => "preupload (POST /api/models/{repo}/preupload/{revision})",
            Step::LfsBatch => "LFS batch (POST /{repo}.git/info/lfs/objects/batch)",
            Step::LfsUpload => "LFS upload (PUT of the object bytes)",
            Step::LfsComplete => "LFS multipart completion (POST)",
            Step::LfsVerify => "LFS verify (POST)",
            Step::Commit => "commit (POST /api/models/{repo}/commit/{revision})",
        })
    }
}

/// Everything that can go wrong talking to the Hub. No variant is produced by a panic: malformed
/// or unexpected server replies become [`HubError::InvalidResponse`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// HTTP 401 or 403: the token is missing, wrong, or lacks write access.
    #[error(
        "{step}: the Hub refused the request (HTTP {status}) at {url}: {message}; expected a valid \
         token with write access to the repository ({})",
        token_hint(*.token_sent)
    )]
    Unauthorized {
        /// Step that failed.
        step: Step,
        /// 401 or 403.
        status: u16,
        /// URL requested.
        url: String,
        /// The server's error message (or a placeholder when it sent none).
        message: String,
        /// Whether an `Authorization` header was sent at all.
        token_sent: bool,
    },
    /// HTTP 404: the repository or the revision does not exist (or is not visible to the token).
    #[error(
        "{step}: not found (HTTP 404{}) at {url}: {message}; expected an existing repository and \
         revision (branch) the token can see",
        code_suffix(.code)
    )]
    NotFound {
        /// Step that failed.
        step: Step,
        /// URL requested.
        url: String,
        /// The server's error message (or a placeholder when it sent none).
        message: String,
        /// The Hub's `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, ...), if sent.
        code: Option<String>,
    },
    /// `create_repo` found the repository already there and `exist_ok` was false.
    #[error("{step}: repository `{repo_id}` already exists (HTTP 409); expected a new name, or exist_ok = true")]
    AlreadyExists {
        /// Step that failed ([`Step::CreateRepo`]).
        step: Step,
        /// The repository asked for.
        repo_id: String,
    },
    /// Any other non-success HTTP status.
    #[error(
        "{step}: the server answered HTTP {status} at {url}: {message}; expected a 2xx success"
    )]
    Http {
        /// Step that failed.
        step: Step,
        /// The HTTP status.
        status: u16,
        /// URL requested.
        url: String,
        /// The server's `error` message when the body is JSON, else the start of the body.
        message: String,
    },
    /// The server could not be reached, or dropped the connection before a full reply.
    #[error("{step}: could not talk to {endpoint} (request to {url}): {detail}; expected a reachable server")]
    Connection {
        /// Step that failed.
        step: Step,
        /// `scheme://host[:port]` of the URL requested.
        endpoint: String,
        /// URL requested.
        url: String,
        /// What the transport reported (connection refused, reset, timed out, ...).
        detail: String,
    },
    /// The server answered with success but the body is not what the protocol prescribes.
    #[error("{step}: unexpected reply from {url}: {detail}; expected {expected}")]
    InvalidResponse {
        /// Step that failed.
        step: Step,
        /// URL requested.
        url: String,
        /// What the protocol prescribes.
        expected: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The LFS batch endpoint rejected one object (per-object `error` in its reply).
    #[error("{step}: the LFS server rejected `{path}` (oid {oid}): error {code}: {message}; expected upload instructions")]
    LfsObject {
        /// Step that failed ([`Step::LfsBatch`]).
        step: Step,
        /// Path in the repository of the file.
        path: String,
        /// sha256 of the file, hex.
        oid: String,
        /// The error code the LFS server gave.
        code: i64,
        /// The error message the LFS server gave.
        message: String,
    },
    /// A local file or folder could not be read.
    #[error("{step}: {}: {source}", .path.display())]
    Io {
        /// Step that failed.
        step: Step,
        /// The local path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An argument was rejected before anything was sent.
    #[error("invalid argument `{argument}`: {problem}")]
    InvalidArgument {
        /// Which argument.
        argument: &'static str,
        /// What is wrong with it and what is expected.
        problem: String,
    },
}

fn token_hint(token_sent: bool) -> &'static str {
    if token_sent {
        "the token sent was rejected"
    } else {
        "no token was sent: set HF_TOKEN, log in with `hf auth login`, or pass one to HubClient::new"
    }
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(", {c}")).unwrap_or_default()
}

impl HubError {
    /// The step that failed, where the error comes from one ([`HubError::InvalidArgument`] does
    /// not).
    pub fn step(&self) -> Option<Step> {
        match self {
            HubError::Unauthorized { step, .. }
            | HubError::NotFound { step, .. }
            | HubError::AlreadyExists { step, .. }
            | HubError::Http { step, .. }
            | HubError::Connection { step, .. }
            | HubError::InvalidResponse { step, .. }
            | HubError::LfsObject { step, .. }
            | HubError::Io { step, .. } => Some(*step),
            HubError::InvalidArgument { .. } => None,
        }
    }

    /// The HTTP status the server answered, for the variants that come from one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HubError::Unauthorized { status, .. } | HubError::Http { status, .. } => Some(*status),
            HubError::NotFound { .. } => Some(404),
            HubError::AlreadyExists { .. } => Some(409),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = HubError> = std::result::Result<T, E>;
