//! Uploads against a fake Hub on 127.0.0.1 (tests/common), and downloads back through hf-hub.

mod common;

use std::path::Path;

use common::{dead_endpoint, sha256_hex, FakeHub, Fault};
use hub_push::{read_folder, FileSource, FolderOptions, HubClient, HubError, Step, UploadMode};

const TOKEN: &str = "hf_fake_write_token";
const REPO: &str = "tester/llama-lora";

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn client(hub: &FakeHub) -> HubClient {
    HubClient::new(&hub.endpoint, Some(TOKEN.to_string()))
}

/// A PEFT-like output folder: 3 MB binary, small JSON, README, plus a hidden file and a subfolder
/// that a default folder upload leaves out.
fn adapter_folder(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let weights = noise(3 * 1024 * 1024, 7);
    let config = br#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#.to_vec();
    let readme = b"---\nlibrary_name: peft\n---\n# LoRA adapter\n".to_vec();
    std::fs::write(dir.join("adapter_model.bin"), &weights).unwrap();
    std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
    std::fs::write(dir.join("README.md"), &readme).unwrap();
    std::fs::write(dir.join(".secret"), b"not for upload").unwrap();
    std::fs::create_dir(dir.join("checkpoint-1")).unwrap();
    std::fs::write(dir.join("checkpoint-1/optimizer.pt"), b"not for upload").unwrap();
    (weights, config, readme)
}

#[test]
fn folder_push_arrives_byte_identical_and_downloads_through_hf_hub() {
    let hub = FakeHub::start(TOKEN);
    let hub_client = client(&hub);
    let dir = tempfile::tempdir().unwrap();
    let (weights, config, readme) = adapter_folder(dir.path());

    let url = hub_client.create_repo(REPO, true, false).unwrap();
    assert_eq!(url, format!("{}/{REPO}", hub.endpoint));
    assert_eq!(
        hub_client.create_repo(REPO, true, true).unwrap(),
        url,
        "exist_ok accepts the 409"
    );
    let err = hub_client.create_repo(REPO, true, false).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::AlreadyExists {
                step: Step::CreateRepo,
                ..
            }
        ),
        "{err}"
    );

    let commit = hub_client
        .upload_folder(
            REPO,
            None,
            dir.path(),
            FolderOptions::default(),
            "Upload LoRA adapter",
        )
        .unwrap();

    // What the commit reports.
    let reported: Vec<(&str, UploadMode)> = commit
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.mode))
        .collect();
    assert_eq!(
        reported,
        [
            ("README.md", UploadMode::Regular),
            ("adapter_config.json", UploadMode::Regular),
            ("adapter_model.bin", UploadMode::Lfs),
        ]
    );
    assert_eq!(commit.files[2].sha256, sha256_hex(&weights));
    assert_eq!(commit.files[2].size, weights.len() as u64);
    assert!(commit.ignored.is_empty());
    assert_eq!(Some(commit.commit_oid.clone()), hub.head(REPO, "main"));
    assert_eq!(
        commit.commit_url,
        format!("{}/{REPO}/commit/{}", hub.endpoint, commit.commit_oid)
    );

    // What the Hub stored: byte-identical, nothing hidden, no subfolder.
    assert_eq!(
        hub.file(REPO, "main", "adapter_model.bin").unwrap(),
        weights
    );
    assert_eq!(
        hub.file(REPO, "main", "adapter_config.json").unwrap(),
        config
    );
    assert_eq!(hub.file(REPO, "main", "README.md").unwrap(), readme);
    assert_eq!(hub.file(REPO, "main", ".secret"), None);
    assert_eq!(hub.file(REPO, "main", "checkpoint-1/optimizer.pt"), None);

    // The protocol: the LFS file went batch -> PUT -> verify, the small ones inline.
    let commits = hub.commits();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].summary, "Upload LoRA adapter");
    let mut entries = commits[0].entries.clone();
    entries.sort();
    assert_eq!(
        entries,
        [
            ("file".to_string(), "README.md".to_string()),
            ("file".to_string(), "adapter_config.json".to_string()),
            ("lfsFile".to_string(), "adapter_model.bin".to_string()),
        ]
    );
    let log = hub.log();
    let oid = sha256_hex(&weights);
    let calls: Vec<String> = log
        .iter()
        .map(|l| format!("{} {}", l.method, l.target))
        .collect();
    let expected = [
        format!("POST /api/models/{REPO}/preupload/main"),
        format!("POST /{REPO}.git/info/lfs/objects/batch"),
        format!("PUT /__lfs/upload/{oid}"),
        format!("POST /__lfs/verify/{oid}"),
        format!("POST /api/models/{REPO}/commit/main"),
    ];
    let upload_calls: Vec<&String> = calls
        .iter()
        .filter(|c| !c.contains("/api/repos/create"))
        .collect();
    assert_eq!(
        upload_calls,
        expected.iter().collect::<Vec<_>>(),
        "calls in order"
    );
    let put = log.iter().find(|l| l.method == "PUT").unwrap();
    assert_eq!(put.body_len, weights.len(), "the 3 MB went in the PUT");
    let commit_call = log.iter().find(|l| l.target.contains("/commit/")).unwrap();
    assert!(
        commit_call.body_len < 10_000,
        "LFS content is not inlined in the commit"
    );
    assert_eq!(
        commit_call.content_type.as_deref(),
        Some("application/x-ndjson")
    );
    let batch = log
        .iter()
        .find(|l| l.target.ends_with("/objects/batch"))
        .unwrap();
    assert_eq!(
        batch.accept.as_deref(),
        Some("application/vnd.git-lfs+json")
    );
    assert_eq!(
        batch.content_type.as_deref(),
        Some("application/vnd.git-lfs+json")
    );
    // The token went on every call (they are all on the endpoint's host).
    for l in &log {
        assert_eq!(
            l.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}")),
            "{} {}",
            l.method,
            l.target
        );
    }

    // Download the same repo through hf-hub 0.4's sync API.
    let cache = tempfile::tempdir().unwrap();
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_endpoint(hub.endpoint.clone())
        .with_cache_dir(cache.path().to_path_buf())
        .with_token(Some(TOKEN.to_string()))
        .with_progress(false)
        .build()
        .unwrap();
    let repo = api.model(REPO.to_string());
    let info = repo.info().unwrap();
    assert_eq!(info.sha, commit.commit_oid);
    let mut names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["README.md", "adapter_config.json", "adapter_model.bin"]
    );
    for (name, bytes) in [
        ("adapter_model.bin", &weights),
        ("adapter_config.json", &config),
        ("README.md", &readme),
    ] {
        let local = repo.get(name).unwrap();
        assert_eq!(
            &std::fs::read(&local).unwrap(),
            bytes,
            "{name} through hf-hub"
        );
    }
    let downloads = hub
        .log()
        .into_iter()
        .filter(|l| l.target.contains("/resolve/"))
        .count();
    assert!(
        downloads >= 6,
        "hf-hub made its metadata + range requests ({downloads})"
    );
}

#[test]
fn known_lfs_objects_are_not_sent_again_and_branches_with_slashes_work() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    let hub_client = client(&hub);
    let weights = noise(5000, 3);
    hub_client
        .upload_files(
            REPO,
            None,
            &[("a.safetensors", FileSource::from(weights.clone()))],
            "first",
        )
        .unwrap();
    let puts_before = hub.log().iter().filter(|l| l.method == "PUT").count();
    assert_eq!(puts_before, 1);

    // Same bytes under two more names, on a branch whose name needs URL-encoding, plus a tiny
    // .safetensors (LFS by name, not by size) and an empty file (always inline).
    hub.add_branch(REPO, "dev/exp 1");
    let tiny = b"tiny".to_vec();
    let files = vec![
        ("copy1.bin".to_string(), FileSource::from(weights.clone())),
        (
            "nested/copy2.bin".to_string(),
            FileSource::from(weights.clone()),
        ),
        (
            "small.safetensors".to_string(),
            FileSource::from(tiny.clone()),
        ),
        ("empty.txt".to_string(), FileSource::from(Vec::new())),
    ];
    let commit = hub_client
        .upload_files(REPO, Some("dev/exp 1"), &files, "second")
        .unwrap();
    let modes: Vec<UploadMode> = commit.files.iter().map(|f| f.mode).collect();
    assert_eq!(
        modes,
        [
            UploadMode::Lfs,
            UploadMode::Lfs,
            UploadMode::Lfs,
            UploadMode::Regular
        ]
    );
    let puts: Vec<String> = hub
        .log()
        .iter()
        .filter(|l| l.method == "PUT")
        .map(|l| l.target.clone())
        .collect();
    assert_eq!(puts.len(), 2, "only the new tiny object is PUT: {puts:?}");
    assert!(puts[1].ends_with(&sha256_hex(&tiny)));
    assert!(hub
        .log()
        .iter()
        .any(|l| l.target == format!("/api/models/{REPO}/commit/dev%2Fexp%201")));
    assert_eq!(hub.file(REPO, "dev/exp 1", "copy1.bin").unwrap(), weights);
    assert_eq!(
        hub.file(REPO, "dev/exp 1", "nested/copy2.bin").unwrap(),
        weights
    );
    assert_eq!(
        hub.file(REPO, "dev/exp 1", "small.safetensors").unwrap(),
        tiny
    );
    assert_eq!(hub.file(REPO, "dev/exp 1", "empty.txt").unwrap(), b"");
    assert_eq!(hub.file(REPO, "main", "copy1.bin"), None, "main untouched");
}

#[test]
fn multipart_lfs_uploads_are_split_and_completed() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    hub.state().multipart_chunk = Some(1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let weights = noise(3 * 1024 * 1024 + 17, 11);
    let local = dir.path().join("model.safetensors");
    std::fs::write(&local, &weights).unwrap();
    let commit = client(&hub)
        .upload_files(
            REPO,
            None,
            &[("model.safetensors", FileSource::from(local))],
            "multipart",
        )
        .unwrap();
    assert_eq!(commit.files[0].mode, UploadMode::Lfs);
    assert_eq!(
        hub.file(REPO, "main", "model.safetensors").unwrap(),
        weights
    );
    let log = hub.log();
    let parts: Vec<usize> = log
        .iter()
        .filter(|l| l.target.contains("/__lfs/part/"))
        .map(|l| l.body_len)
        .collect();
    assert_eq!(parts, [1 << 20, 1 << 20, 1 << 20, 17]);
    assert!(log.iter().any(|l| l.target.contains("/__lfs/complete/")));
}

#[test]
fn ignored_files_are_left_out_and_reported() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    hub.state().ignored_suffixes.push(".tmp".into());
    let files = [
        ("keep.json", FileSource::from("{}")),
        ("scratch.tmp", FileSource::from("x")),
    ];
    let commit = client(&hub)
        .upload_files(REPO, None, &files, "with ignore")
        .unwrap();
    assert_eq!(commit.ignored, ["scratch.tmp"]);
    assert_eq!(commit.files.len(), 1);
    assert_eq!(hub.file(REPO, "main", "scratch.tmp"), None);
    assert_eq!(hub.file(REPO, "main", "keep.json").unwrap(), b"{}");
}

#[test]
fn missing_or_wrong_token_gives_unauthorized_naming_the_step() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    let files = [("a.txt", FileSource::from("hello"))];

    let anonymous = HubClient::new(&hub.endpoint, None);
    let err = anonymous
        .create_repo("tester/new", false, false)
        .unwrap_err();
    match &err {
        HubError::Unauthorized {
            step: Step::CreateRepo,
            status: 401,
            token_sent: false,
            message,
            ..
        } => {
            assert!(message.contains("Invalid credentials"), "{message}");
        }
        other => panic!("expected Unauthorized at create repo, got {other:?}"),
    }
    assert!(err.to_string().contains("create repo"), "{err}");
    assert!(err.to_string().contains("no token was sent"), "{err}");
    let err = anonymous
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Unauthorized {
                step: Step::Preupload,
                token_sent: false,
                ..
            }
        ),
        "{err}"
    );

    let wrong = HubClient::new(&hub.endpoint, Some("hf_wrong".into()));
    let err = wrong.upload_files(REPO, None, &files, "msg").unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Unauthorized {
                step: Step::Preupload,
                status: 401,
                token_sent: true,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.step(), Some(Step::Preupload));
    assert!(err.to_string().contains("preupload"), "{err}");

    // A token rejected only at the commit (e.g. read-only): the commit step is named.
    hub.inject(
        "POST",
        "/commit/",
        Fault::Reply {
            status: 403,
            error_code: None,
            body: r#"{"error":"You don't have the rights to create a commit"}"#.into(),
        },
    );
    let err = client(&hub)
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    match &err {
        HubError::Unauthorized {
            step: Step::Commit,
            status: 403,
            message,
            ..
        } => {
            assert!(message.contains("rights"), "{message}")
        }
        other => panic!("expected Unauthorized at commit, got {other:?}"),
    }
    assert!(hub.commits().is_empty());
    assert_eq!(hub.file(REPO, "main", "a.txt"), None);
}

#[test]
fn missing_repo_or_revision_gives_not_found_naming_the_step() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    let hub_client = client(&hub);
    let files = [
        ("w.bin", FileSource::from(noise(4096, 5))),
        ("a.txt", FileSource::from("a")),
    ];

    let err = hub_client
        .upload_files(REPO, Some("no-such-branch"), &files, "msg")
        .unwrap_err();
    match &err {
        HubError::NotFound {
            step: Step::Preupload,
            code,
            message,
            ..
        } => {
            assert_eq!(code.as_deref(), Some("RevisionNotFound"));
            assert!(message.contains("no-such-branch"), "{message}");
        }
        other => panic!("expected NotFound at preupload, got {other:?}"),
    }
    assert_eq!(err.status(), Some(404));

    let err = hub_client
        .upload_files("tester/nope", None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(&err, HubError::NotFound { step: Step::Preupload, code: Some(c), .. } if c == "RepoNotFound"),
        "{err}"
    );

    // The branch disappears between the LFS upload and the commit: the commit's 404 is reported,
    // no CommitInfo, nothing committed.
    hub.inject(
        "POST",
        "/commit/",
        Fault::Reply {
            status: 404,
            error_code: Some("RevisionNotFound".into()),
            body: r#"{"error":"Invalid rev id: main"}"#.into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    match &err {
        HubError::NotFound {
            step: Step::Commit,
            code,
            message,
            ..
        } => {
            assert_eq!(code.as_deref(), Some("RevisionNotFound"));
            assert_eq!(message, "Invalid rev id: main");
        }
        other => panic!("expected NotFound at commit, got {other:?}"),
    }
    assert!(err.to_string().starts_with("commit"), "{err}");
    assert!(hub.commits().is_empty());
    assert_eq!(hub.file(REPO, "main", "a.txt"), None);
}

#[test]
fn connection_refused_names_endpoint_and_step() {
    let endpoint = dead_endpoint();
    let hub_client = HubClient::new(&endpoint, Some(TOKEN.into()));
    let err = hub_client.create_repo(REPO, false, true).unwrap_err();
    match &err {
        HubError::Connection {
            step: Step::CreateRepo,
            endpoint: e,
            ..
        } => assert_eq!(e, &endpoint),
        other => panic!("expected Connection at create repo, got {other:?}"),
    }
    assert!(err.to_string().contains(&endpoint), "{err}");
    assert!(err.to_string().contains("create repo"), "{err}");

    let err = hub_client
        .upload_files(REPO, None, &[("a.txt", FileSource::from("a"))], "msg")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HubError::Connection {
                step: Step::Preupload,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&endpoint), "{err}");
}

#[test]
fn dropped_connection_at_commit_reports_no_commit() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    hub.inject("POST", "/commit/", Fault::Drop);
    let weights = noise(2048, 9);
    let files = [("w.bin", FileSource::from(weights.clone()))];
    let err = client(&hub)
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HubError::Connection {
                step: Step::Commit,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&hub.endpoint), "{err}");
    assert!(hub.commits().is_empty());
    // The object did reach LFS storage; a retry commits without sending it again.
    assert!(hub.state().lfs.contains_key(&sha256_hex(&weights)));
    let commit = client(&hub)
        .upload_files(REPO, None, &files, "retry")
        .unwrap();
    assert_eq!(hub.log().iter().filter(|l| l.method == "PUT").count(), 1);
    assert_eq!(Some(commit.commit_oid), hub.head(REPO, "main"));
    assert_eq!(hub.file(REPO, "main", "w.bin").unwrap(), weights);
}

#[test]
fn server_errors_and_malformed_replies_name_the_step() {
    let hub = FakeHub::start(TOKEN);
    hub.add_repo(REPO, false);
    let hub_client = client(&hub);
    let files = [("w.bin", FileSource::from(noise(4096, 1)))];

    hub.inject(
        "POST",
        "/objects/batch",
        Fault::Reply {
            status: 500,
            error_code: None,
            body: r#"{"error":"LFS storage is on fire"}"#.into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    match &err {
        HubError::Http {
            step: Step::LfsBatch,
            status: 500,
            message,
            ..
        } => assert_eq!(message, "LFS storage is on fire"),
        other => panic!("expected Http at LFS batch, got {other:?}"),
    }

    hub.state().max_lfs_size = Some(1000);
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(&err, HubError::LfsObject { step: Step::LfsBatch, code: 422, path, .. } if path == "w.bin"),
        "{err}"
    );
    hub.state().max_lfs_size = None;

    hub.inject(
        "POST",
        "/commit/",
        Fault::Reply {
            status: 200,
            error_code: None,
            body: "<html>proxy page</html>".into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HubError::InvalidResponse {
                step: Step::Commit,
                ..
            }
        ),
        "{err}"
    );

    hub.inject(
        "POST",
        "/commit/",
        Fault::Reply {
            status: 200,
            error_code: None,
            body: r#"{"success":true}"#.into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HubError::InvalidResponse {
                step: Step::Commit,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("commitOid"), "{err}");

    hub.inject(
        "POST",
        "/preupload/",
        Fault::Reply {
            status: 200,
            error_code: None,
            body: r#"{"files":[]}"#.into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &files, "msg")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            HubError::InvalidResponse {
                step: Step::Preupload,
                ..
            }
        ),
        "{err}"
    );

    // New content (the object above is stored by now), so a PUT happens.
    let fresh = [("w.bin", FileSource::from(noise(4096, 2)))];
    hub.inject(
        "PUT",
        "/__lfs/upload/",
        Fault::Reply {
            status: 503,
            error_code: None,
            body: "Slow Down".into(),
        },
    );
    let err = hub_client
        .upload_files(REPO, None, &fresh, "msg")
        .unwrap_err();
    match &err {
        HubError::Http {
            step: Step::LfsUpload,
            status: 503,
            message,
            ..
        } => assert!(message.contains("Slow Down")),
        other => panic!("expected Http at LFS upload, got {other:?}"),
    }
    assert!(hub.commits().is_empty());
}

#[test]
fn read_folder_skips_hidden_and_subfolders_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    adapter_folder(dir.path());
    std::fs::create_dir(dir.path().join(".git")).unwrap();
    std::fs::write(dir.path().join(".git/HEAD"), b"ref").unwrap();
    let names = |options| -> Vec<String> {
        read_folder(dir.path(), options)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    };
    assert_eq!(
        names(FolderOptions::default()),
        ["README.md", "adapter_config.json", "adapter_model.bin"]
    );
    assert_eq!(
        names(FolderOptions {
            recursive: true,
            include_hidden: false
        }),
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.bin",
            "checkpoint-1/optimizer.pt"
        ]
    );
    assert_eq!(
        names(FolderOptions {
            recursive: true,
            include_hidden: true
        }),
        [
            ".secret",
            "README.md",
            "adapter_config.json",
            "adapter_model.bin",
            "checkpoint-1/optimizer.pt"
        ]
    );
    let (_, source) = &read_folder(dir.path(), FolderOptions::default()).unwrap()[0];
    assert_eq!(source, &FileSource::Path(dir.path().join("README.md")));

    let err = read_folder(&dir.path().join("missing"), FolderOptions::default()).unwrap_err();
    assert_eq!(err.step(), Some(Step::ReadFiles));
    let empty = tempfile::tempdir().unwrap();
    let err = HubClient::new("http://127.0.0.1:9", None)
        .upload_folder(REPO, None, empty.path(), FolderOptions::default(), "msg")
        .unwrap_err();
    assert!(
        matches!(
            err,
            HubError::InvalidArgument {
                argument: "folder",
                ..
            }
        ),
        "{err}"
    );
}
