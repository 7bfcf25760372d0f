//! Chat formats: the built-in Llama 3 format, the tutorial's hand-built variant, and the
//! tokenizer's own Jinja `chat_template`. Rendering returns the text together with the byte
//! ranges that are trained on, so labels come from offsets rather than token-pattern search.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::special::{BEGIN_OF_TEXT, END_HEADER, EOT, START_HEADER};

/// Meta's Llama 3 Instruct `chat_template` (the one in Meta-Llama-3-8B-Instruct's
/// `tokenizer_config.json`); [`ChatFormat::Llama3`] renders exactly what this renders.
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// How conversations are turned into text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatFormat {
    /// Built-in Llama 3: `<|begin_of_text|>`, then per message
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content.trim()}<|eot_id|>`.
    Llama3,
    /// The tutorial's hand-built string: like Llama 3 but a single `\n` after the header.
    /// Use with `label_all_assistant_turns: false` to reproduce its labels.
    Tutorial,
    /// A Jinja `chat_template` rendered with Hugging Face semantics.
    Jinja(JinjaTemplate),
}

impl ChatFormat {
    /// The tokenizer's own template when `tokenizer_config.json` (or `chat_template.jinja`)
    /// has one, the built-in Llama 3 format otherwise. `path` is the model directory or the
    /// `tokenizer_config.json` file itself; a directory without either file gives `Llama3`.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self> {
        Ok(match JinjaTemplate::from_tokenizer_config(path)? {
            Some(t) => ChatFormat::Jinja(t),
            None => ChatFormat::Llama3,
        })
    }
}

/// A Jinja chat template and the special-token strings it is rendered with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JinjaTemplate {
    /// The template source (`chat_template` of `tokenizer_config.json`).
    pub template: String,
    /// Passed as `bos_token` (Llama 3: `<|begin_of_text|>`).
    pub bos_token: String,
    /// Passed as `eos_token` (Llama 3 Instruct: `<|eot_id|>`); also closes an answer when the
    /// template is not prefix-stable (see [`crate::ChatCollator::render`]).
    pub eos_token: String,
    /// Other variables the template may read (`pad_token`, `unk_token`, ...).
    #[serde(default)]
    pub extra_tokens: BTreeMap<String, String>,
}

impl JinjaTemplate {
    /// Meta's Llama 3 template with Llama 3 Instruct's tokens.
    pub fn llama3() -> Self {
        Self {
            template: LLAMA3_CHAT_TEMPLATE.to_string(),
            bos_token: BEGIN_OF_TEXT.to_string(),
            eos_token: EOT.to_string(),
            extra_tokens: BTreeMap::new(),
        }
    }

    /// Reads the template and the special-token strings of a Hugging Face tokenizer; `None`
    /// when there is no template. `path`: a model directory or its `tokenizer_config.json`.
    /// A `chat_template.jinja` file next to the config takes precedence, as in transformers.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let (dir, config_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer_config.json"))
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, path.to_path_buf())
        };
        let config: serde_json::Map<String, Value> = if config_path.exists() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Config {
                path: config_path.clone(),
                message: format!("not a JSON object: {e}"),
            })?
        } else {
            serde_json::Map::new()
        };
        let bad = |message: String| Error::Config {
            path: config_path.clone(),
            message,
        };
        let jinja_file = dir.join("chat_template.jinja");
        let template = if jinja_file.is_file() {
            Some(std::fs::read_to_string(&jinja_file).map_err(|e| Error::io(&jinja_file, e))?)
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // Several named templates: transformers uses the one called "default".
                Some(Value::Array(list)) => {
                    Some(named_default_template(list).ok_or_else(|| {
                        bad("`chat_template` is a list without a \"default\" entry".into())
                    })?)
                }
                Some(other) => {
                    return Err(bad(format!(
                        "`chat_template` must be a string or a list, found {other}"
                    )))
                }
            }
        };
        let Some(template) = template else {
            return Ok(None);
        };
        let token = |name: &str| -> Result<Option<String>> {
            match config.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // An AddedToken dict: {"content": "<s>", "lstrip": false, ...}.
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad(format!("`{name}` has no string `content`"))),
                },
                Some(other) => Err(bad(format!("`{name}` must be a string, found {other}"))),
            }
        };
        let mut extra_tokens = BTreeMap::new();
        for name in [
            "pad_token",
            "unk_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ] {
            if let Some(t) = token(name)? {
                extra_tokens.insert(name.to_string(), t);
            }
        }
        Ok(Some(Self {
            template,
            bos_token: token("bos_token")?.unwrap_or_default(),
            eos_token: token("eos_token")?.unwrap_or_default(),
            extra_tokens,
        }))
    }
}

fn named_default_template(list: &[Value]) -> Option<String> {
    list.iter().find_map(|entry| {
        let name = entry.get("name")?.as_str()?;
        (name == "default").then(|| entry.get("template")?.as_str().map(str::to_string))?
    })
}

/// Rendered conversation text plus the byte ranges whose tokens keep their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The full text, tokenised without adding special tokens.
    pub text: String,
    /// Sorted, disjoint byte ranges of `text`: assistant content and its closing token.
    pub label_spans: Vec<Range<usize>>,
}

/// Renders a built-in format. `first_answer_only` keeps only the first assistant span.
pub(crate) fn render_builtin(
    messages: &[Message],
    tutorial: bool,
    add_generation_prompt: bool,
    first_answer_only: bool,
) -> Rendered {
    let newline = if tutorial { "\n" } else { "\n\n" };
    let cap = messages.iter().map(|m| m.content.len() + 64).sum::<usize>() + 64;
    let mut text = String::with_capacity(cap);
    let mut label_spans = Vec::new();
    text.push_str(BEGIN_OF_TEXT);
    for m in messages {
        text.push_str(START_HEADER);
        text.push_str(&m.role);
        text.push_str(END_HEADER);
        text.push_str(newline);
        let start = text.len();
        text.push_str(m.content.trim());
        text.push_str(EOT);
        if m.is_assistant() && (!first_answer_only || label_spans.is_empty()) {
            label_spans.push(start..text.len());
        }
    }
    if add_generation_prompt {
        text.push_str(START_HEADER);
        text.push_str(crate::message::ASSISTANT);
        text.push_str(END_HEADER);
        text.push_str(newline);
    }
    Rendered { text, label_spans }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_spans_cover_answer_and_eot() {
        let msgs = vec![
            Message::user(" hi "),
            Message::assistant(" yes "),
            Message::user("again"),
            Message::assistant("no"),
        ];
        let r = render_builtin(&msgs, false, false, false);
        let spans: Vec<&str> = r.label_spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, ["yes<|eot_id|>", "no<|eot_id|>"]);
        let t = render_builtin(&msgs, true, false, true);
        assert!(t.text.contains("<|end_header_id|>\nhi<|eot_id|>"));
        assert_eq!(t.label_spans.len(), 1);
    }
}
