//! Row-level loading shared by the dataset readers: JSONL parsing, field checks that name
//! file/row/field, the bad-row policy and its report. Also the generic `{"messages": [...]}`
//! chat JSONL reader.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result, RowIssue, RowLocation};
use crate::message::{Conversation, Message};

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRowPolicy {
    /// Stop with an error naming the file, row and field.
    #[default]
    Error,
    /// Leave the row out and list it in [`LoadReport::skipped`].
    Skip,
}

/// What a load did: rows read, rows kept, and every row left out with the reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Files (or in-memory source names) read, in order.
    pub sources: Vec<String>,
    /// Rows read (blank JSONL lines are not rows).
    pub rows_read: usize,
    /// Rows returned.
    pub rows_loaded: usize,
    /// Rows left out under [`BadRowPolicy::Skip`].
    pub skipped: Vec<RowIssue>,
}

impl LoadReport {
    /// Adds another file's report to this one.
    pub fn merge(&mut self, other: LoadReport) {
        self.sources.extend(other.sources);
        self.rows_read += other.rows_read;
        self.rows_loaded += other.rows_loaded;
        self.skipped.extend(other.skipped);
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows read, {} loaded, {} skipped",
            self.sources.join(", "),
            self.rows_read,
            self.rows_loaded,
            self.skipped.len()
        )?;
        for issue in &self.skipped {
            write!(f, "\n  skipped {issue}")?;
        }
        Ok(())
    }
}

/// The position of the row being parsed, to build [`RowIssue`]s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowCtx<'a> {
    pub file: &'a str,
    pub location: RowLocation,
}

impl RowCtx<'_> {
    pub(crate) fn issue(&self, field: &str, message: impl Into<String>) -> RowIssue {
        RowIssue {
            file: self.file.to_string(),
            location: self.location,
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The object's `key`, or an issue naming `path`.
    pub(crate) fn field<'v>(
        &self,
        obj: &'v Map<String, Value>,
        key: &str,
        path: &str,
    ) -> std::result::Result<&'v Value, RowIssue> {
        obj.get(key)
            .ok_or_else(|| self.issue(path, "missing field"))
    }

    /// `v` as a string, or an issue naming `path` and the type found.
    pub(crate) fn string(&self, v: &Value, path: &str) -> std::result::Result<String, RowIssue> {
        match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.issue(
                path,
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    }
}

/// A JSON type name for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The non-blank lines of a JSONL text, parsed, with their 1-based line numbers.
pub(crate) fn jsonl_rows(
    text: &str,
) -> impl Iterator<Item = (RowLocation, std::result::Result<Value, String>)> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let parsed =
                serde_json::from_str::<Value>(line).map_err(|e| format!("invalid JSON: {e}"));
            (RowLocation::Line(i + 1), parsed)
        })
}

/// Reads a whole text file, naming it on failure.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // A UTF-8 byte-order mark (some editors write one) is not part of the first row.
    let bytes = bytes
        .strip_prefix(b"\xEF\xBB\xBF")
        .map(<[u8]>::to_vec)
        .unwrap_or(bytes);
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}")),
        )
    })
}

/// Parses every row with `parse` under `policy`.
pub(crate) fn collect_rows<T>(
    source: &str,
    rows: impl Iterator<Item = (RowLocation, std::result::Result<Value, String>)>,
    policy: BadRowPolicy,
    parse: impl Fn(&Map<String, Value>, &RowCtx<'_>) -> std::result::Result<T, RowIssue>,
) -> Result<(Vec<T>, LoadReport)> {
    let mut out = Vec::new();
    let mut report = LoadReport {
        sources: vec![source.to_string()],
        ..LoadReport::default()
    };
    for (location, value) in rows {
        report.rows_read += 1;
        let ctx = RowCtx {
            file: source,
            location,
        };
        let parsed = match value {
            Err(message) => Err(ctx.issue("", message)),
            Ok(Value::Object(obj)) => parse(&obj, &ctx),
            Ok(other) => Err(ctx.issue(
                "",
                format!("expected a JSON object, found {}", type_name(&other)),
            )),
        };
        match (parsed, policy) {
            (Ok(row), _) => out.push(row),
            (Err(issue), BadRowPolicy::Error) => return Err(Error::Row(issue)),
            (Err(issue), BadRowPolicy::Skip) => report.skipped.push(issue),
        }
    }
    report.rows_loaded = out.len();
    Ok((out, report))
}

/// Loads a JSONL file of `{"messages": [{"role": ..., "content": ...}, ...]}` rows.
pub fn load_chat_jsonl(path: impl AsRef<Path>) -> Result<(Vec<Conversation>, LoadReport)> {
    load_chat_jsonl_with(path, BadRowPolicy::Error)
}

/// [`load_chat_jsonl`] with a bad-row policy.
pub fn load_chat_jsonl_with(
    path: impl AsRef<Path>,
    policy: BadRowPolicy,
) -> Result<(Vec<Conversation>, LoadReport)> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let source = path.display().to_string();
    collect_rows(&source, jsonl_rows(&text), policy, parse_chat_row)
}

fn parse_chat_row(
    obj: &Map<String, Value>,
    ctx: &RowCtx<'_>,
) -> std::result::Result<Conversation, RowIssue> {
    let list = match ctx.field(obj, "messages", "messages")? {
        Value::Array(list) if !list.is_empty() => list,
        Value::Array(_) => return Err(ctx.issue("messages", "empty list")),
        other => {
            return Err(ctx.issue(
                "messages",
                format!("expected a list, found {}", type_name(other)),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(ctx.issue(&path, format!("expected an object, found {}", type_name(m))));
        };
        let role_path = format!("{path}.role");
        let content_path = format!("{path}.content");
        let role = ctx.string(ctx.field(m, "role", &role_path)?, &role_path)?;
        let content = ctx.string(ctx.field(m, "content", &content_path)?, &content_path)?;
        if role.trim().is_empty() {
            return Err(ctx.issue(&role_path, "empty role"));
        }
        let msg = Message::new(role, content);
        if msg.is_assistant() && msg.content.trim().is_empty() {
            return Err(ctx.issue(&content_path, "empty assistant answer"));
        }
        messages.push(msg);
    }
    Ok(Conversation::new(messages))
}
