//! Step 2 of an upload: Git LFS objects. Ask the batch endpoint where each object goes, `PUT` the
//! bytes there (whole, or in parts when the server hands out a multipart upload), then call the
//! `verify` action when there is one. Objects the server already has come back without actions.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use crate::client::HubClient;
use crate::error::{HubError, Result, Step};
use crate::files::PreparedFile;

/// Objects per batch request.
const LFS_BATCH_CHUNK: usize = 256;

/// One action of a batch reply: where to send what, with which extra headers.
#[derive(Debug)]
struct Action {
    href: String,
    header: Vec<(String, String)>,
}

/// Uploads the LFS objects of `files` to `repo_id` for the branch `revision` (not URL-encoded),
/// skipping those the server already has. Files sharing content are uploaded once.
pub(crate) fn upload_objects(
    client: &HubClient,
    repo_id: &str,
    revision: &str,
    files: &[&PreparedFile<'_>],
) -> Result<()> {
    let mut seen = HashSet::new();
    let unique: Vec<&PreparedFile<'_>> = files
        .iter()
        .copied()
        .filter(|f| seen.insert(f.sha256))
        .collect();
    let url = format!("{}/{repo_id}.git/info/lfs/objects/batch", client.endpoint());
    for chunk in unique.chunks(LFS_BATCH_CHUNK) {
        let payload = json!({
            "operation": "upload",
            "transfers": ["basic"],
            "objects": chunk.iter().map(|f| json!({"oid": f.oid(), "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let reply = client.post_json(Step::LfsBatch, &url, &payload, true)?;
        let objects = reply
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                invalid(
                    Step::LfsBatch,
                    &url,
                    format!("no `objects` array in {reply}"),
                )
            })?;
        let mut by_oid: HashMap<&str, &Value> = HashMap::new();
        for object in objects {
            let oid = object.get("oid").and_then(Value::as_str);
            let size = object.get("size").and_then(Value::as_u64);
            match (oid, size) {
                (Some(oid), Some(_)) => by_oid.insert(oid, object),
                _ => {
                    return Err(invalid(
                        Step::LfsBatch,
                        &url,
                        format!("object without oid/size: {object}"),
                    ))
                }
            };
        }
        for file in chunk {
            let oid = file.oid();
            let object = by_oid.get(oid.as_str()).ok_or_else(|| {
                invalid(
                    Step::LfsBatch,
                    &url,
                    format!("no entry for object {oid} (`{}`)", file.path),
                )
            })?;
            upload_object(client, &url, file, object)?;
        }
    }
    Ok(())
}

fn upload_object(
    client: &HubClient,
    batch_url: &str,
    file: &PreparedFile<'_>,
    object: &Value,
) -> Result<()> {
    if let Some(error) = object.get("error").filter(|e| !e.is_null()) {
        return Err(HubError::LfsObject {
            step: Step::LfsBatch,
            path: file.path.to_string(),
            oid: file.oid(),
            code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string()),
        });
    }
    let actions = object.get("actions").filter(|a| !a.is_null());
    let Some(upload) = actions
        .and_then(|a| a.get("upload"))
        .filter(|u| !u.is_null())
    else {
        // No upload action: the server has this object already.
        return Ok(());
    };
    let upload = parse_action(batch_url, upload)?;
    let verify = match actions
        .and_then(|a| a.get("verify"))
        .filter(|v| !v.is_null())
    {
        Some(verify) => Some(parse_action(batch_url, verify)?),
        None => None,
    };

    match upload.header.iter().find(|(name, _)| name == "chunk_size") {
        Some((_, chunk_size)) => multipart_upload(client, batch_url, file, &upload, chunk_size)?,
        None => {
            let url = client.fix_endpoint_in_url(&upload.href);
            put(client, &url, file, 0, file.size, &upload.header)?;
        }
    }

    if let Some(verify) = verify {
        let url = client.fix_endpoint_in_url(&verify.href);
        let body = json!({"oid": file.oid(), "size": file.size});
        let response = client.post(Step::LfsVerify, &url, &body, true, &verify.header)?;
        drain(response);
    }
    Ok(())
}

/// The HF multipart transfer: header `chunk_size` plus one presigned URL per part under the keys
/// `"1"`, `"2"`, ...; each part's `ETag` goes into a completion `POST` to the action's `href`.
fn multipart_upload(
    client: &HubClient,
    batch_url: &str,
    file: &PreparedFile<'_>,
    upload: &Action,
    chunk_size: &str,
) -> Result<()> {
    let chunk_size: u64 = chunk_size
        .trim()
        .parse()
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| {
            invalid(
                Step::LfsBatch,
                batch_url,
                format!("chunk_size {chunk_size:?} is not a positive integer"),
            )
        })?;
    let mut parts: Vec<(u64, &str)> = upload
        .header
        .iter()
        .filter(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|(name, url)| Some((name.parse().ok()?, url.as_str())))
        .collect();
    parts.sort_by_key(|(number, _)| *number);
    let expected = file.size.div_ceil(chunk_size);
    if parts.len() as u64 != expected {
        return Err(invalid(
            Step::LfsBatch,
            batch_url,
            format!(
                "{} part URLs for {} bytes in chunks of {chunk_size} ({expected} parts)",
                parts.len(),
                file.size
            ),
        ));
    }
    let mut etags = Vec::with_capacity(parts.len());
    for (index, (_, part_url)) in parts.iter().enumerate() {
        let offset = index as u64 * chunk_size;
        let len = chunk_size.min(file.size - offset);
        let response = put(client, part_url, file, offset, len, &[])?;
        let etag = response
            .header("etag")
            .filter(|e| !e.is_empty())
            .map(str::to_string);
        drain(response);
        let etag = etag.ok_or_else(|| {
            invalid(
                Step::LfsUpload,
                part_url,
                format!("no ETag header for part {} of `{}`", index + 1, file.path),
            )
        })?;
        etags.push(json!({"partNumber": index + 1, "etag": etag}));
    }
    let url = client.fix_endpoint_in_url(&upload.href);
    let body = json!({"oid": file.oid(), "parts": etags});
    let response = client.post(Step::LfsComplete, &url, &body, true, &[])?;
    drain(response);
    Ok(())
}

/// `PUT`s `len` bytes of `file` from `offset` to `url` (the token only goes along when `url` is on
/// the endpoint's origin).
fn put(
    client: &HubClient,
    url: &str,
    file: &PreparedFile<'_>,
    offset: u64,
    len: u64,
    headers: &[(String, String)],
) -> Result<ureq::Response> {
    let mut request = client.request("PUT", url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    // An explicit length: storage backends (S3 presigned URLs) refuse chunked bodies.
    let request = request.set("Content-Length", &len.to_string());
    let body = file.reader(offset, len)?;
    client.check(Step::LfsUpload, url, request.send(body))
}

fn parse_action(batch_url: &str, action: &Value) -> Result<Action> {
    let href = action.get("href").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            Step::LfsBatch,
            batch_url,
            format!("action without an `href`: {action}"),
        )
    })?;
    let header = match action.get("header") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(name, value)| {
                let value = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (name.clone(), value)
            })
            .collect(),
        Some(other) => {
            return Err(invalid(
                Step::LfsBatch,
                batch_url,
                format!("action `header` is not an object: {other}"),
            ));
        }
    };
    Ok(Action {
        href: href.to_string(),
        header,
    })
}

/// Reads a reply body we do not need, so the connection can be reused.
fn drain(response: ureq::Response) {
    let _ = std::io::copy(&mut response.into_reader(), &mut std::io::sink());
}

fn invalid(step: Step, url: &str, detail: String) -> HubError {
    HubError::InvalidResponse {
        step,
        url: url.to_string(),
        expected: match step {
            Step::LfsBatch => {
                r#"{"objects": [{"oid", "size", "actions"?: {"upload": {"href", "header"?}, "verify"?}}]} with an entry per object"#
            }
            _ => "an ETag header on each part upload",
        },
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_with_and_without_headers() {
        let a = parse_action(
            "u",
            &json!({"href": "http://x/up", "header": {"k": "v", "chunk_size": 5}}),
        )
        .unwrap();
        assert_eq!(a.href, "http://x/up");
        assert!(a.header.contains(&("k".into(), "v".into())));
        assert!(a.header.contains(&("chunk_size".into(), "5".into())));
        assert!(parse_action("u", &json!({"href": "h"}))
            .unwrap()
            .header
            .is_empty());
        let err = parse_action("u", &json!({"header": {}})).unwrap_err();
        assert_eq!(err.step(), Some(Step::LfsBatch));
    }
}
