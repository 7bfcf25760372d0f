//! The HTTP client: endpoint, token, how requests are sent and how failures become [`HubError`]s,
//! and repository creation.

use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{HubError, Result, Step};

/// Media type of Git LFS batch API bodies.
pub(crate) const LFS_MEDIA_TYPE: &str = "application/vnd.git-lfs+json";

const USER_AGENT: &str = concat!("hub-push/", env!("CARGO_PKG_VERSION"), "; rust");

/// How many bytes of an error body are quoted in an error message at most.
const MAX_QUOTED_BODY: usize = 300;

/// A client of one Hugging Face Hub endpoint, with an optional access token.
///
/// The token goes, as `Authorization: Bearer {token}`, on every request to the endpoint's origin
/// (scheme, host and port), and on no request to another host (presigned storage URLs).
#[derive(Clone)]
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl fmt::Debug for HubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubClient {
    /// A client of `endpoint` (such as `https://huggingface.co`; a trailing `/` is dropped) using
    /// `token` (an empty or blank token counts as none).
    pub fn new(endpoint: impl Into<String>, token: Option<String>) -> Self {
        let endpoint = endpoint.into().trim().trim_end_matches('/').to_string();
        let token = token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .try_proxy_from_env(true)
            .user_agent(USER_AGENT)
            .build();
        Self {
            endpoint,
            token,
            agent,
        }
    }

    /// The endpoint, without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether a token is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Creates the model repository `repo_id` (`namespace/name`, or `name` for the token's own
    /// namespace) with `POST {endpoint}/api/repos/create`, and returns its URL
    /// (`{endpoint}/{repo_id}`).
    ///
    /// When the repository exists already (HTTP 409) this is fine with `exist_ok`, and
    /// [`HubError::AlreadyExists`] otherwise.
    pub fn create_repo(&self, repo_id: &str, private: bool, exist_ok: bool) -> Result<String> {
        validate_repo_id(repo_id)?;
        let (organization, name) = match repo_id.split_once('/') {
            Some((org, name)) => (Some(org), name),
            None => (None, repo_id),
        };
        let url = format!("{}/api/repos/create", self.endpoint);
        let body = json!({
            "name": name,
            "organization": organization,
            "private": private,
            "type": "model",
        });
        let fallback_url = format!("{}/{}", self.endpoint, repo_id);
        match self.post_json(Step::CreateRepo, &url, &body, false) {
            Ok(reply) => Ok(reply
                .get("url")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(fallback_url)),
            Err(HubError::Http { status: 409, .. }) if exist_ok => Ok(fallback_url),
            Err(HubError::Http { status: 409, .. }) => Err(HubError::AlreadyExists {
                step: Step::CreateRepo,
                repo_id: repo_id.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The token to send to `url`: only to the endpoint's own origin.
    fn token_for(&self, url: &str) -> Option<&str> {
        self.token
            .as_deref()
            .filter(|_| origin(url) == origin(&self.endpoint))
    }

    /// A request to `url`, with the token when `url` is on the endpoint's origin.
    pub(crate) fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match self.token_for(url) {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// A URL handed out by the server (LFS actions) with `https://huggingface.co` swapped for the
    /// configured endpoint, as huggingface_hub does for mirrors.
    pub(crate) fn fix_endpoint_in_url(&self, href: &str) -> String {
        const HF: &str = "https://huggingface.co";
        match href.strip_prefix(HF) {
            Some(rest) if self.endpoint != HF && (rest.is_empty() || rest.starts_with('/')) => {
                format!("{}{rest}", self.endpoint)
            }
            _ => href.to_string(),
        }
    }

    /// Turns the outcome of a request into the response on 2xx, or the matching [`HubError`].
    pub(crate) fn check(
        &self,
        step: Step,
        url: &str,
        outcome: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response> {
        match outcome {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => {
                Err(self.status_error(step, url, status, response))
            }
            Err(ureq::Error::Transport(transport)) => Err(HubError::Connection {
                step,
                endpoint: origin(url).to_string(),
                url: url.to_string(),
                detail: transport.to_string(),
            }),
        }
    }

    fn status_error(
        &self,
        step: Step,
        url: &str,
        status: u16,
        response: ureq::Response,
    ) -> HubError {
        let code = response.header("x-error-code").map(str::to_string);
        let header_message = response.header("x-error-message").map(str::to_string);
        let body = response.into_string().unwrap_or_default();
        let message = error_message(&body, header_message);
        let url = url.to_string();
        match status {
            401 | 403 => HubError::Unauthorized {
                step,
                status,
                token_sent: self.token_for(&url).is_some(),
                url,
                message,
            },
            404 => HubError::NotFound {
                step,
                url,
                message,
                code,
            },
            _ => HubError::Http {
                step,
                status,
                url,
                message,
            },
        }
    }

    /// POSTs `body` as JSON (with the Git LFS media types when `lfs`) and parses the JSON reply.
    pub(crate) fn post_json(
        &self,
        step: Step,
        url: &str,
        body: &Value,
        lfs: bool,
    ) -> Result<Value> {
        let response = self.post(step, url, body, lfs, &[])?;
        read_json(step, url, response)
    }

    /// POSTs `body` as JSON (with the Git LFS media types when `lfs`) plus `headers`, and returns
    /// the success reply unread.
    pub(crate) fn post(
        &self,
        step: Step,
        url: &str,
        body: &Value,
        lfs: bool,
        headers: &[(String, String)],
    ) -> Result<ureq::Response> {
        let media_type = if lfs {
            LFS_MEDIA_TYPE
        } else {
            "application/json"
        };
        let mut request = self
            .request("POST", url)
            .set("Content-Type", media_type)
            .set("Accept", media_type);
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let outcome = request.send_bytes(body.to_string().as_bytes());
        self.check(step, url, outcome)
    }
}

/// Reads a success reply as JSON.
pub(crate) fn read_json(step: Step, url: &str, response: ureq::Response) -> Result<Value> {
    let text = response.into_string().map_err(|e| HubError::Connection {
        step,
        endpoint: origin(url).to_string(),
        url: url.to_string(),
        detail: format!("reading the reply failed: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| HubError::InvalidResponse {
        step,
        url: url.to_string(),
        expected: "a JSON body",
        detail: format!("{e} in {}", quote_body(&text)),
    })
}

/// The server's message in an error reply: the JSON `error` (or `message`, or `errors`), else the
/// `X-Error-Message` header, else the start of the body.
fn error_message(body: &str, header_message: Option<String>) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(body) {
        for key in ["error", "message"] {
            if let Some(Value::String(s)) = map.get(key) {
                return s.clone();
            }
        }
        if let Some(Value::Array(errors)) = map.get("errors") {
            let parts: Vec<String> = errors
                .iter()
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            if !parts.is_empty() {
                return parts.join("; ");
            }
        }
    }
    if let Some(message) = header_message.filter(|m| !m.is_empty()) {
        return message;
    }
    if body.trim().is_empty() {
        "(empty body)".to_string()
    } else {
        quote_body(body)
    }
}

fn quote_body(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{:?}...", &body[..cut]),
        None => format!("{body:?}"),
    }
}

/// `scheme://authority` of a URL (the whole string when it has no path).
pub(crate) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find(['/', '?', '#']) {
        Some(end) => &url[..after_scheme + end],
        None => url,
    }
}

/// `name` or `namespace/name`, no blanks, no empty or dot segments.
pub(crate) fn validate_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && !p.chars().any(|c| c.is_whitespace() || c == '\\')
        });
    if ok {
        Ok(())
    } else {
        Err(HubError::InvalidArgument {
            argument: "repo_id",
            problem: format!("{repo_id:?}; expected \"name\" or \"namespace/name\""),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_of_urls() {
        assert_eq!(
            origin("https://huggingface.co/api/x"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:80"), "http://127.0.0.1:80");
        assert_eq!(origin("http://h:1?q=/"), "http://h:1");
    }

    #[test]
    fn token_only_to_the_endpoint_origin() {
        let c = HubClient::new("http://127.0.0.1:9/", Some(" tok \n".into()));
        assert_eq!(c.endpoint(), "http://127.0.0.1:9");
        assert_eq!(c.token_for("http://127.0.0.1:9/api/x"), Some("tok"));
        assert_eq!(c.token_for("http://127.0.0.1:10/api/x"), None);
        assert_eq!(c.token_for("https://s3.amazonaws.com/bucket"), None);
        assert!(!format!("{c:?}").contains("tok\""));
        assert!(!HubClient::new("http://x", Some("  ".into())).has_token());
    }

    #[test]
    fn mirror_urls_are_rewritten() {
        let c = HubClient::new("http://mirror:8080", None);
        assert_eq!(
            c.fix_endpoint_in_url("https://huggingface.co/a/b.git/info/lfs/objects/verify"),
            "http://mirror:8080/a/b.git/info/lfs/objects/verify"
        );
        assert_eq!(
            c.fix_endpoint_in_url("https://s3.example/x"),
            "https://s3.example/x"
        );
        assert_eq!(
            c.fix_endpoint_in_url("https://huggingface.com/x"),
            "https://huggingface.com/x"
        );
    }

    #[test]
    fn error_messages_from_bodies() {
        assert_eq!(
            error_message(r#"{"error":"Invalid rev id: x"}"#, None),
            "Invalid rev id: x"
        );
        assert_eq!(error_message(r#"{"errors":["a","b"]}"#, None), "a; b");
        assert_eq!(error_message("", Some("from header".into())), "from header");
        assert_eq!(error_message("", None), "(empty body)");
        assert_eq!(
            error_message("<html>oops</html>", None),
            "\"<html>oops</html>\""
        );
        assert!(error_message(&"x".repeat(1000), None).ends_with("..."));
    }
}
