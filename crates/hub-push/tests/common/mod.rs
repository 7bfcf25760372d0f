//! A fake Hugging Face Hub on 127.0.0.1 (random port): a small HTTP/1.1 server (one request per
//! connection, a thread per connection) implementing what an upload and an `hf-hub` 0.4 download
//! use: repo creation, preupload, the Git LFS batch API (basic and multipart transfers, verify),
//! the NDJSON commit, `resolve` downloads with `Range`, and the revision info API.
//!
//! Rules of this fake: a file is LFS when it is over 1 KB or a `.safetensors`; the user namespace
//! of the token is `tester`; LFS objects only count as stored once verified; every request is
//! logged; faults can be injected for the next request matching a method and path fragment.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const LFS_MEDIA: &str = "application/vnd.git-lfs+json";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// Path and query, as sent (still percent-encoded).
    pub target: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub body_len: usize,
}

/// A commit the fake accepted.
#[derive(Debug, Clone)]
pub struct CommitRecord {
    pub repo_id: String,
    pub revision: String,
    pub summary: String,
    /// `(key, path)` per operation line: `("file", ..)` or `("lfsFile", ..)`.
    pub entries: Vec<(String, String)>,
    pub oid: String,
}

#[derive(Debug, Clone, Default)]
pub struct Branch {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone, Default)]
pub struct Repo {
    pub private: bool,
    pub branches: BTreeMap<String, Branch>,
}

/// What to do instead of serving a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status, `X-Error-Code` (if any) and body.
    Reply {
        status: u16,
        error_code: Option<String>,
        body: String,
    },
    /// Read the request, then close the connection without answering.
    Drop,
}

#[derive(Debug, Clone)]
struct Injection {
    method: String,
    path_contains: String,
    fault: Fault,
}

/// Everything the fake knows; tests may read and tweak it through [`FakeHub::state`].
#[derive(Debug, Default)]
pub struct State {
    pub repos: BTreeMap<String, Repo>,
    /// Verified LFS objects, by oid.
    pub lfs: HashMap<String, Vec<u8>>,
    /// Uploaded but not yet verified LFS objects, by oid.
    pub uploaded: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, u64), Vec<u8>>,
    pub log: Vec<Logged>,
    pub commits: Vec<CommitRecord>,
    /// Hand out multipart uploads with this part size for objects larger than it.
    pub multipart_chunk: Option<u64>,
    /// Reject (per-object batch error) LFS objects larger than this.
    pub max_lfs_size: Option<u64>,
    /// Preupload says `shouldIgnore` for paths with one of these suffixes.
    pub ignored_suffixes: Vec<String>,
    injections: Vec<Injection>,
}

/// The running fake; stops when dropped.
pub struct FakeHub {
    pub endpoint: String,
    pub token: String,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Starts a fake accepting `token`.
    pub fn start(token: &str) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let endpoint = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Ctx {
            endpoint: endpoint.clone(),
            token: token.to_string(),
            state: state.clone(),
        });
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop_flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let ctx = ctx.clone();
                std::thread::spawn(move || handle_connection(stream, &ctx));
            }
        });
        FakeHub {
            endpoint,
            token: token.to_string(),
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The next request with `method` whose path contains `path_contains` gets `fault`.
    pub fn inject(&self, method: &str, path_contains: &str, fault: Fault) {
        self.state().injections.push(Injection {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            fault,
        });
    }

    /// Creates a repository directly (owner `tester` or any namespace), with an empty `main`.
    pub fn add_repo(&self, repo_id: &str, private: bool) {
        let mut repo = Repo {
            private,
            ..Repo::default()
        };
        repo.branches.insert(
            "main".into(),
            Branch {
                commit: fake_oid(repo_id.as_bytes()),
                ..Branch::default()
            },
        );
        self.state().repos.insert(repo_id.to_string(), repo);
    }

    /// Creates `branch` in `repo_id` as a copy of `main`.
    pub fn add_branch(&self, repo_id: &str, branch: &str) {
        let mut state = self.state();
        let repo = state.repos.get_mut(repo_id).expect("repo exists");
        let main = repo.branches["main"].clone();
        repo.branches.insert(branch.to_string(), main);
    }

    /// Content of a committed file.
    pub fn file(&self, repo_id: &str, branch: &str, path: &str) -> Option<Vec<u8>> {
        self.state()
            .repos
            .get(repo_id)?
            .branches
            .get(branch)?
            .files
            .get(path)
            .cloned()
    }

    pub fn head(&self, repo_id: &str, branch: &str) -> Option<String> {
        Some(
            self.state()
                .repos
                .get(repo_id)?
                .branches
                .get(branch)?
                .commit
                .clone(),
        )
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state().log.clone()
    }

    pub fn commits(&self) -> Vec<CommitRecord> {
        self.state().commits.clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
pub fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fake_oid(seed: &[u8]) -> String {
    sha256_hex(seed)[..40].to_string()
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

struct Ctx {
    endpoint: String,
    token: String,
    state: Arc<Mutex<State>>,
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }
    fn error(status: u16, code: Option<&str>, message: &str) -> Response {
        let mut r = Response::json(status, json!({ "error": message }));
        if let Some(code) = code {
            r.headers.push(("X-Error-Code".into(), code.into()));
            r.headers.push(("X-Error-Message".into(), message.into()));
        }
        r
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

fn handle_connection(stream: TcpStream, ctx: &Ctx) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let Some(request) = read_request(&mut reader) else {
        return;
    };
    let injected = {
        let mut state = ctx.state.lock().unwrap();
        state.log.push(Logged {
            method: request.method.clone(),
            target: request.target.clone(),
            authorization: request.header("authorization").map(str::to_string),
            content_type: request.header("content-type").map(str::to_string),
            accept: request.header("accept").map(str::to_string),
            body_len: request.body.len(),
        });
        let position = state
            .injections
            .iter()
            .position(|i| i.method == request.method && request.path().contains(&i.path_contains));
        position.map(|p| state.injections.remove(p).fault)
    };
    let response = match injected {
        Some(Fault::Drop) => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        Some(Fault::Reply {
            status,
            error_code,
            body,
        }) => {
            let mut r = Response {
                status,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: body.into_bytes(),
            };
            if let Some(code) = error_code {
                r.headers.push(("X-Error-Code".into(), code));
            }
            r
        }
        None => route(ctx, &request),
    };
    let _ = write_response(stream, &request, response);
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().ok()?;
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    }
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

fn write_response(
    mut stream: TcpStream,
    request: &Request,
    response: Response,
) -> std::io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    if request.method != "HEAD" {
        stream.write_all(&response.body)?;
    }
    stream.flush()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The Hub

fn route(ctx: &Ctx, req: &Request) -> Response {
    let segments: Vec<&str> = req.path().trim_start_matches('/').split('/').collect();
    let authorized = req.header("authorization") == Some(&format!("Bearer {}", ctx.token));
    let needs_auth = || Response::error(401, None, "Invalid credentials in Authorization header");
    let mut state = ctx.state.lock().unwrap();
    match (req.method.as_str(), segments.as_slice()) {
        ("POST", ["api", "repos", "create"]) => {
            if !authorized {
                return needs_auth();
            }
            create_repo(ctx, &mut state, req)
        }
        ("POST", ["api", "models", ns, name, "preupload", rev]) => {
            if !authorized {
                return needs_auth();
            }
            let repo_id = format!("{ns}/{name}");
            if let Err(r) = branch_of(&state, &repo_id, &percent_decode(rev)) {
                return r;
            }
            preupload(&state, req)
        }
        ("POST", [ns, name_git, "info", "lfs", "objects", "batch"])
            if name_git.ends_with(".git") =>
        {
            if !authorized {
                return needs_auth();
            }
            let repo_id = format!("{ns}/{}", name_git.trim_end_matches(".git"));
            lfs_batch(ctx, &state, req, &repo_id)
        }
        ("PUT", ["__lfs", "upload", oid]) => lfs_put(&mut state, req, oid),
        ("PUT", ["__lfs", "part", oid, n]) => {
            let Ok(n) = n.parse::<u64>() else {
                return Response::error(400, None, "bad part number");
            };
            let etag = format!("\"part-{n}-{}\"", &sha256_hex(&req.body)[..12]);
            state.parts.insert((oid.to_string(), n), req.body.clone());
            Response::json(200, json!({})).header("ETag", etag)
        }
        ("POST", ["__lfs", "complete", oid]) => lfs_complete(&mut state, req, oid),
        ("POST", ["__lfs", "verify", oid]) => {
            if !authorized {
                return needs_auth();
            }
            lfs_verify(&mut state, req, oid)
        }
        ("POST", ["api", "models", ns, name, "commit", rev]) => {
            if !authorized {
                return needs_auth();
            }
            commit(
                ctx,
                &mut state,
                req,
                &format!("{ns}/{name}"),
                &percent_decode(rev),
            )
        }
        ("GET", ["api", "models", ns, name, "revision", rev]) => {
            let repo_id = format!("{ns}/{name}");
            if state.repos.get(&repo_id).is_some_and(|r| r.private) && !authorized {
                return needs_auth();
            }
            match branch_of(&state, &repo_id, &percent_decode(rev)) {
                Ok(branch) => Response::json(
                    200,
                    json!({
                        "id": repo_id,
                        "sha": branch.commit,
                        "siblings": branch.files.keys().map(|p| json!({"rfilename": p})).collect::<Vec<_>>(),
                    }),
                ),
                Err(r) => r,
            }
        }
        ("GET" | "HEAD", [ns, name, "resolve", rev, rest @ ..]) if !rest.is_empty() => {
            let repo_id = format!("{ns}/{name}");
            if state.repos.get(&repo_id).is_some_and(|r| r.private) && !authorized {
                return needs_auth();
            }
            let path = rest
                .iter()
                .map(|s| percent_decode(s))
                .collect::<Vec<_>>()
                .join("/");
            resolve(&state, req, &repo_id, &percent_decode(rev), &path)
        }
        _ => Response::error(
            404,
            None,
            &format!("no route for {} {}", req.method, req.path()),
        ),
    }
}

fn branch_of<'s>(state: &'s State, repo_id: &str, rev: &str) -> Result<&'s Branch, Response> {
    let repo = state.repos.get(repo_id).ok_or_else(|| {
        Response::error(
            404,
            Some("RepoNotFound"),
            &format!("Repository {repo_id} not found"),
        )
    })?;
    repo.branches
        .get(rev)
        .or_else(|| repo.branches.values().find(|b| b.commit == rev))
        .ok_or_else(|| {
            Response::error(
                404,
                Some("RevisionNotFound"),
                &format!("Invalid rev id: {rev}"),
            )
        })
}

fn create_repo(ctx: &Ctx, state: &mut State, req: &Request) -> Response {
    let Some(body) = req.json() else {
        return Response::error(400, None, "body is not JSON");
    };
    let Some(name) = body.get("name").and_then(Value::as_str) else {
        return Response::error(400, None, "missing name");
    };
    if body.get("type").and_then(Value::as_str).unwrap_or("model") != "model" {
        return Response::error(400, None, "only model repos in this fake");
    }
    let namespace = body
        .get("organization")
        .and_then(Value::as_str)
        .unwrap_or("tester");
    let repo_id = format!("{namespace}/{name}");
    let url = format!("{}/{repo_id}", ctx.endpoint);
    if state.repos.contains_key(&repo_id) {
        return Response::json(
            409,
            json!({"error": "You already created this model repo", "url": url}),
        );
    }
    let mut repo = Repo {
        private: body
            .get("private")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ..Repo::default()
    };
    repo.branches.insert(
        "main".into(),
        Branch {
            commit: fake_oid(repo_id.as_bytes()),
            ..Branch::default()
        },
    );
    state.repos.insert(repo_id.clone(), repo);
    Response::json(200, json!({"url": url, "name": repo_id}))
}

fn preupload(state: &State, req: &Request) -> Response {
    let Some(files) = req
        .json()
        .and_then(|b| b.get("files").and_then(Value::as_array).cloned())
    else {
        return Response::error(400, None, "expected {\"files\": [...]}");
    };
    let mut answers = Vec::new();
    for f in files {
        let (Some(path), Some(size), Some(sample)) = (
            f.get("path").and_then(Value::as_str),
            f.get("size").and_then(Value::as_u64),
            f.get("sample").and_then(Value::as_str),
        ) else {
            return Response::error(400, None, &format!("bad file entry {f}"));
        };
        match B64.decode(sample) {
            Ok(s) if s.len() as u64 == size.min(512) => {}
            _ => {
                return Response::error(
                    400,
                    None,
                    &format!("sample of {path} is not base64 of the first 512 bytes"),
                )
            }
        }
        let lfs = size > 1024 || path.ends_with(".safetensors");
        let ignore = state
            .ignored_suffixes
            .iter()
            .any(|s| path.ends_with(s.as_str()));
        answers.push(json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": ignore}));
    }
    Response::json(200, json!({ "files": answers }))
}

fn lfs_batch(ctx: &Ctx, state: &State, req: &Request, repo_id: &str) -> Response {
    if req.header("accept") != Some(LFS_MEDIA) || req.header("content-type") != Some(LFS_MEDIA) {
        return Response::error(415, None, "expected git-lfs+json Accept and Content-Type");
    }
    let Some(body) = req.json() else {
        return Response::error(400, None, "body is not JSON");
    };
    let revision = body
        .pointer("/ref/name")
        .and_then(Value::as_str)
        .unwrap_or("main");
    if let Err(r) = branch_of(state, repo_id, revision) {
        return r;
    }
    let transfers_ok = body
        .get("transfers")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|x| x == "basic"));
    if body.get("operation") != Some(&json!("upload"))
        || !transfers_ok
        || body.get("hash_algo") != Some(&json!("sha256"))
    {
        return Response::error(
            400,
            None,
            "expected operation upload, transfers [basic], hash_algo sha256",
        );
    }
    let Some(objects) = body.get("objects").and_then(Value::as_array) else {
        return Response::error(400, None, "no objects");
    };
    let mut out = Vec::new();
    for object in objects {
        let (Some(oid), Some(size)) = (
            object.get("oid").and_then(Value::as_str),
            object.get("size").and_then(Value::as_u64),
        ) else {
            return Response::error(400, None, "object without oid/size");
        };
        if state.max_lfs_size.is_some_and(|max| size > max) {
            out.push(json!({"oid": oid, "size": size, "error": {"code": 422, "message": "Object too large"}}));
        } else if state.lfs.get(oid).is_some_and(|b| b.len() as u64 == size) {
            out.push(json!({"oid": oid, "size": size, "authenticated": true}));
        } else {
            let e = &ctx.endpoint;
            let verify = json!({"href": format!("{e}/__lfs/verify/{oid}")});
            let upload = match state.multipart_chunk {
                Some(chunk) if size > chunk => {
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), json!(chunk.to_string()));
                    for n in 1..=size.div_ceil(chunk) {
                        header.insert(n.to_string(), json!(format!("{e}/__lfs/part/{oid}/{n}")));
                    }
                    json!({"href": format!("{e}/__lfs/complete/{oid}"), "header": header})
                }
                _ => json!({
                    "href": format!("{e}/__lfs/upload/{oid}"),
                    "header": {"X-Fake-Ticket": &oid[..16.min(oid.len())]},
                }),
            };
            out.push(json!({"oid": oid, "size": size, "authenticated": true, "actions": {"upload": upload, "verify": verify}}));
        }
    }
    Response::json(
        200,
        json!({"transfer": "basic", "objects": out, "hash_algo": "sha256"}),
    )
}

fn lfs_put(state: &mut State, req: &Request, oid: &str) -> Response {
    if req.header("x-fake-ticket") != Some(&oid[..16.min(oid.len())]) {
        return Response::error(400, None, "the upload action's header map was not sent");
    }
    if sha256_hex(&req.body) != oid {
        return Response::error(400, None, "content does not hash to the oid");
    }
    state.uploaded.insert(oid.to_string(), req.body.clone());
    Response::json(200, json!({}))
}

fn lfs_complete(state: &mut State, req: &Request, oid: &str) -> Response {
    if req.header("content-type") != Some(LFS_MEDIA) {
        return Response::error(415, None, "expected git-lfs+json");
    }
    let Some(parts) = req
        .json()
        .and_then(|b| b.get("parts").and_then(Value::as_array).cloned())
    else {
        return Response::error(400, None, "no parts");
    };
    let mut content = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let n = i as u64 + 1;
        let Some(bytes) = state.parts.get(&(oid.to_string(), n)) else {
            return Response::error(400, None, &format!("part {n} missing"));
        };
        let etag = format!("\"part-{n}-{}\"", &sha256_hex(bytes)[..12]);
        if part.get("partNumber") != Some(&json!(n)) || part.get("etag") != Some(&json!(etag)) {
            return Response::error(
                400,
                None,
                &format!("part {n}: wrong partNumber/etag {part}"),
            );
        }
        content.extend_from_slice(bytes);
    }
    if sha256_hex(&content) != oid {
        return Response::error(400, None, "assembled parts do not hash to the oid");
    }
    state.uploaded.insert(oid.to_string(), content);
    Response::json(200, json!({"success": true}))
}

fn lfs_verify(state: &mut State, req: &Request, oid: &str) -> Response {
    let Some(body) = req.json() else {
        return Response::error(400, None, "body is not JSON");
    };
    let size = body.get("size").and_then(Value::as_u64);
    if body.get("oid").and_then(Value::as_str) != Some(oid) {
        return Response::error(400, None, "oid mismatch");
    }
    match state.uploaded.remove(oid) {
        Some(bytes) if Some(bytes.len() as u64) == size => {
            state.lfs.insert(oid.to_string(), bytes);
            Response::json(200, json!({"success": true}))
        }
        _ => Response::json(404, json!({"message": "object not uploaded"})),
    }
}

fn commit(ctx: &Ctx, state: &mut State, req: &Request, repo_id: &str, rev: &str) -> Response {
    if req.header("content-type") != Some("application/x-ndjson") {
        return Response::error(415, None, "expected application/x-ndjson");
    }
    let branch_name = match branch_of(state, repo_id, rev) {
        Ok(_) => rev.to_string(),
        Err(r) => return r,
    };
    let text = String::from_utf8_lossy(&req.body).into_owned();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Value = match lines.next().map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => return Response::error(400, None, "first line must be the JSON header"),
    };
    let summary = header
        .pointer("/value/summary")
        .and_then(Value::as_str)
        .unwrap_or("");
    if header.get("key") != Some(&json!("header")) || summary.is_empty() {
        return Response::error(400, None, "header line needs key=header and a summary");
    }
    let mut changes = Vec::new();
    let mut entries = Vec::new();
    for line in lines {
        let Ok(op) = serde_json::from_str::<Value>(line) else {
            return Response::error(400, None, "bad line");
        };
        let key = op.get("key").and_then(Value::as_str).unwrap_or("");
        let Some(path) = op.pointer("/value/path").and_then(Value::as_str) else {
            return Response::error(400, None, "operation without path");
        };
        let content = match key {
            "file" => {
                if op.pointer("/value/encoding") != Some(&json!("base64")) {
                    return Response::error(400, None, "encoding must be base64");
                }
                match op
                    .pointer("/value/content")
                    .and_then(Value::as_str)
                    .map(|c| B64.decode(c))
                {
                    Some(Ok(bytes)) => bytes,
                    _ => return Response::error(400, None, "content is not base64"),
                }
            }
            "lfsFile" => {
                let oid = op
                    .pointer("/value/oid")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let size = op.pointer("/value/size").and_then(Value::as_u64);
                if op.pointer("/value/algo") != Some(&json!("sha256")) {
                    return Response::error(400, None, "algo must be sha256");
                }
                match state.lfs.get(oid) {
                    Some(bytes) if Some(bytes.len() as u64) == size => bytes.clone(),
                    _ => {
                        return Response::error(
                            422,
                            None,
                            &format!("LFS object {oid} for {path} was never uploaded"),
                        )
                    }
                }
            }
            other => return Response::error(400, None, &format!("unknown key {other}")),
        };
        entries.push((key.to_string(), path.to_string()));
        changes.push((path.to_string(), content));
    }
    let repo = state.repos.get_mut(repo_id).unwrap();
    let branch = repo.branches.get_mut(&branch_name).unwrap();
    let oid = fake_oid(&[branch.commit.as_bytes(), &req.body].concat());
    branch.commit = oid.clone();
    branch.files.extend(changes);
    state.commits.push(CommitRecord {
        repo_id: repo_id.to_string(),
        revision: branch_name,
        summary: summary.to_string(),
        entries,
        oid: oid.clone(),
    });
    Response::json(
        200,
        json!({
            "success": true,
            "commitOid": oid,
            "commitUrl": format!("{}/{repo_id}/commit/{oid}", ctx.endpoint),
            "hookOutput": "",
            "pullRequestUrl": null,
        }),
    )
}

/// `GET /{repo}/resolve/{rev}/{path}` as hf-hub 0.4's sync API reads it: `etag` (the blob name in
/// its cache), `x-repo-commit`, and `Range` requests answered with 206 and `Content-Range`.
fn resolve(state: &State, req: &Request, repo_id: &str, rev: &str, path: &str) -> Response {
    let branch = match branch_of(state, repo_id, rev) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(content) = branch.files.get(path) else {
        return Response::error(
            404,
            Some("EntryNotFound"),
            &format!("{path} does not exist on {rev}"),
        );
    };
    let size = content.len() as u64;
    let range = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| {
            let (start, end) = r.split_once('-')?;
            let start: u64 = start.parse().ok()?;
            let end: u64 = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                end.parse().ok()?
            };
            Some((start, end.min(size.saturating_sub(1))))
        });
    let base = |status, body: Vec<u8>| {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/octet-stream".into())],
            body,
        }
        .header("ETag", format!("\"{}\"", sha256_hex(content)))
        .header("X-Repo-Commit", branch.commit.clone())
        .header("Accept-Ranges", "bytes")
    };
    match range {
        Some((start, end)) if start < size && start <= end => {
            base(206, content[start as usize..=end as usize].to_vec())
                .header("Content-Range", format!("bytes {start}-{end}/{size}"))
        }
        Some(_) => Response::error(416, None, "range not satisfiable")
            .header("Content-Range", format!("bytes */{size}")),
        None => base(200, content.clone()),
    }
}
