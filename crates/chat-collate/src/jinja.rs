//! Jinja chat templates with Hugging Face semantics: `trim_blocks` and `lstrip_blocks` on,
//! loop controls, `raise_exception`, `strftime_now`, Python-style `tojson`, and the common
//! Python string and dict methods templates call (`.strip()`, `.startswith()`, `.items()`).

use std::collections::BTreeMap;
use std::ops::Range;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::template::{JinjaTemplate, Rendered};

const NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug)]
pub(crate) struct JinjaRenderer {
    env: Environment<'static>,
    tokens: BTreeMap<String, String>,
    eos_token: String,
}

impl JinjaRenderer {
    /// Compiles `t`; a syntax error is reported with the template's line.
    pub(crate) fn new(t: &JinjaTemplate) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(NAME, t.template.clone())
            .map_err(template_error)?;
        let mut tokens = t.extra_tokens.clone();
        tokens.insert("bos_token".into(), t.bos_token.clone());
        tokens.insert("eos_token".into(), t.eos_token.clone());
        Ok(Self {
            env,
            tokens,
            eos_token: t.eos_token.clone(),
        })
    }

    /// Renders `messages` (HF's `apply_chat_template(..., tokenize=False)`).
    pub(crate) fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let tpl = self.env.get_template(NAME).map_err(template_error)?;
        tpl.render(ctx).map_err(template_error)
    }

    /// Renders the whole conversation and locates every assistant answer in it.
    ///
    /// For assistant message `i`, the text that rendering `messages[..=i]` adds to rendering
    /// `messages[..i]` with a generation prompt is that turn (prefix-stable templates, the
    /// usual case). The span is the trimmed content found in that region plus the turn's
    /// closing token when one follows (`eos_token`, `<|eot_id|>`, `<|im_end|>`, ...), else the
    /// rest of the region up to trailing whitespace. When the template is not prefix-stable
    /// (it changes earlier text depending on later messages), the content is searched for
    /// after the previous answer instead, and only a closing token is added to it.
    pub(crate) fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered> {
        let text = self.render(messages, false)?;
        let mut label_spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate() {
            if !m.is_assistant() {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            let stable = upto.len() > prompt.len()
                && upto.starts_with(&prompt)
                && text.starts_with(&upto)
                && prompt.len() >= cursor;
            let region = if stable {
                prompt.len()..upto.len()
            } else {
                cursor..text.len()
            };
            let span = self.answer_span(&text, region, stable, i, &m.content)?;
            cursor = span.end;
            label_spans.push(span);
        }
        Ok(Rendered { text, label_spans })
    }

    fn answer_span(
        &self,
        text: &str,
        region: Range<usize>,
        stable: bool,
        turn: usize,
        content: &str,
    ) -> Result<Range<usize>> {
        let needle = content.trim();
        let Some(found) = text[region.clone()].find(needle) else {
            if stable {
                let end = region.start + text[region.clone()].trim_end().len();
                return Ok(region.start..end);
            }
            return Err(Error::Template(format!(
                "cannot find assistant message {turn} in the rendered text (the template \
                 changes or drops it)"
            )));
        };
        let start = region.start + found;
        let mut end = start + needle.len();
        let closer = std::iter::once(self.eos_token.as_str())
            .chain(TURN_CLOSERS)
            .filter(|c| !c.is_empty())
            .find(|c| text[end..region.end].starts_with(c));
        match closer {
            Some(c) => end += c.len(),
            None if stable => end += text[end..region.end].trim_end().len(),
            None => {}
        }
        Ok(start..end)
    }
}

/// Tokens that close a turn in common chat templates.
const TURN_CLOSERS: [&str; 6] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "</s>",
];

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    Error::Template(msg)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, not HTML-escaped.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; keys keep their order either way.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    Ok(Value::from_safe_string(crate::pyjson::dumps(&json, indent)))
}

fn unknown() -> minijinja::Error {
    minijinja::Error::from(ErrorKind::UnknownMethod)
}

fn arg_str(args: &[Value], i: usize) -> std::result::Result<Option<&str>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            minijinja::Error::new(ErrorKind::InvalidOperation, "expected a string argument")
        }),
    }
}

/// The Python methods chat templates use on strings and dicts.
fn python_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        let keys = || value.try_iter();
        return match method {
            "items" => Ok(Value::from(
                keys()?
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        Value::from(vec![k, v])
                    })
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(Value::from(keys()?.collect::<Vec<_>>())),
            "values" => Ok(Value::from(
                keys()?
                    .map(|k| value.get_item(&k).unwrap_or_default())
                    .collect::<Vec<_>>(),
            )),
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        };
    }
    Err(unknown())
}

fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    // The first argument as a string, for the methods that take one.
    let chars = match method {
        "startswith" | "endswith" | "join" => None,
        _ => arg_str(args, 0)?,
    };
    let strip = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    Ok(match method {
        "strip" => Value::from(s.trim_matches(strip)),
        "lstrip" => Value::from(s.trim_start_matches(strip)),
        "rstrip" => Value::from(s.trim_end_matches(strip)),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "title" => Value::from(title_case(s)),
        "capitalize" => {
            let mut c = s.chars();
            Value::from(match c.next() {
                Some(f) => f
                    .to_uppercase()
                    .chain(c.as_str().to_lowercase().chars())
                    .collect(),
                None => String::new(),
            })
        }
        "startswith" | "endswith" => {
            let test = |p: &str| {
                if method == "startswith" {
                    s.starts_with(p)
                } else {
                    s.ends_with(p)
                }
            };
            let arg = args.first().ok_or_else(unknown)?;
            Value::from(match arg.as_str() {
                Some(p) => test(p),
                None => arg.try_iter()?.any(|p| p.as_str().is_some_and(test)),
            })
        }
        "split" => {
            let maxsplit = args
                .get(1)
                .and_then(Value::as_i64)
                .filter(|n| *n >= 0)
                .map(|n| n as usize + 1);
            let parts: Vec<Value> = match (chars, maxsplit) {
                (None, _) => s.split_whitespace().map(Value::from).collect(),
                (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                (Some(sep), Some(n)) => s.splitn(n, sep).map(Value::from).collect(),
            };
            Value::from(parts)
        }
        "replace" => {
            let (from, to) = (chars.unwrap_or(""), arg_str(args, 1)?.unwrap_or(""));
            match args.get(2).and_then(Value::as_usize) {
                Some(n) => Value::from(s.replacen(from, to, n)),
                None => Value::from(s.replace(from, to)),
            }
        }
        "join" => {
            let items = args.first().ok_or_else(unknown)?.try_iter()?;
            Value::from(items.map(|v| v.to_string()).collect::<Vec<_>>().join(s))
        }
        "find" => Value::from(match s.find(chars.unwrap_or("")) {
            Some(b) => s[..b].chars().count() as i64,
            None => -1,
        }),
        "count" => Value::from(s.matches(chars.unwrap_or("")).count()),
        _ => return Err(unknown()),
    })
}

fn title_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_alpha = false;
    for c in s.chars() {
        if prev_alpha {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_alpha = c.is_alphabetic();
    }
    out
}

/// `strftime_now(fmt)` in UTC, for templates that print today's date (Llama 3.2). Supports
/// `%d %m %Y %y %b %B %H %M %S %%`; other directives are kept as written.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(fmt, secs)
}

fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (days, rem) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> String {
        let t = JinjaTemplate {
            template: src.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            extra_tokens: BTreeMap::new(),
        };
        JinjaRenderer::new(&t)
            .and_then(|r| r.render(&[Message::user("  Hi  ")], true))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn python_methods_and_filters() {
        assert_eq!(render("{{ messages[0].content.strip() }}|"), "Hi|");
        assert_eq!(render("{{ messages[0]['content'].lstrip() }}|"), "Hi  |");
        assert_eq!(render("{{ 'a,b,c'.split(',')[1] }}"), "b");
        assert_eq!(
            render("{{ messages[0].role.startswith(('x', 'us')) }}"),
            "True"
        );
        assert_eq!(render("{{ {'k': 'v'}.items() | list | length }}"), "1");
        assert_eq!(render("{{ {'k': '가'} | tojson }}"), "{\"k\": \"가\"}");
        assert_eq!(
            render(
                "{% for m in messages %}{% if loop.first %}{% break %}{% endif %}{% endfor %}ok"
            ),
            "ok"
        );
        assert_eq!(
            render("{{ bos_token }}{{ add_generation_prompt }}"),
            "<s>True"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = JinjaTemplate {
            template: "{{ raise_exception('roles must alternate') }}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
            extra_tokens: BTreeMap::new(),
        };
        let err = JinjaRenderer::new(&t)
            .and_then(|r| r.render(&[], false))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S", 1_722_085_509 - 86_400),
            "26 Jul 2024 13:05:09"
        );
        assert_eq!(strftime("%B %m %y %%", 0), "January 01 70 %");
    }
}
