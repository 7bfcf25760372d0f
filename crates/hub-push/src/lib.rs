//! Uploading files to the Hugging Face Hub, as `huggingface_hub`'s `upload_folder` and PEFT's
//! `push_to_hub` do, over the Hub's HTTP API (no git):
//!
//! 1. **preupload** — `POST {endpoint}/api/models/{repo_id}/preupload/{revision}`: per file, "regular"
//!    (inline) or "lfs", and whether the repository ignores it;
//! 2. **Git LFS** — `POST {endpoint}/{repo_id}.git/info/lfs/objects/batch`, then a `PUT` of each
//!    object the server does not have yet (whole, or in parts when it hands out a multipart
//!    upload), then its `verify` action;
//! 3. **commit** — `POST {endpoint}/api/models/{repo_id}/commit/{revision}` with an NDJSON body:
//!    regular files inline (base64), LFS files as pointers (sha256 oid and size).
//!
//! ```no_run
//! use hub_push::{FolderOptions, HubClient};
//!
//! let hub = HubClient::from_env(); // HF_ENDPOINT, HF_TOKEN or the token file
//! hub.create_repo("me/my-lora", false, true)?;
//! let commit = hub.upload_folder(
//!     "me/my-lora",
//!     None, // "main"
//!     std::path::Path::new("out/adapter"),
//!     FolderOptions::default(),
//!     "Upload LoRA adapter",
//! )?;
//! println!("{}", commit.commit_url);
//! # Ok::<(), hub_push::HubError>(())
//! ```
//!
//! Errors ([`HubError`]) name the [`Step`] that failed and what was expected; server replies never
//! cause a panic. The HTTP client is `ureq` 2, the same stack `hf-hub` 0.4 uses.
#![warn(missing_docs)]

mod auth;
mod client;
mod commit;
mod error;
mod files;
mod lfs;
mod preupload;
mod upload;

pub use auth::{endpoint_from_env, token_from_env, token_path, DEFAULT_ENDPOINT};
pub use client::HubClient;
pub use commit::{CommitInfo, CommittedFile};
pub use error::{HubError, Result, Step};
pub use files::{read_folder, FileSource, FolderOptions};
pub use preupload::UploadMode;

/// The branch uploads go to when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// A fake Hub on 127.0.0.1 for tests of code that pushes (this crate's own test fake, shared):
/// repo creation, preupload, Git LFS batch + upload + verify, the NDJSON commit, downloads.
/// Test support only, behind the `fake-hub` feature.
#[cfg(feature = "fake-hub")]
#[allow(missing_docs)]
#[path = "../tests/common/mod.rs"]
pub mod fake_hub;
