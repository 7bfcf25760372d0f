//! The news2stock dataset (`capybaraOh/naver-economy-news2stock`): Korean economic news
//! (`user`), an instruction (`system`) and a JSON verdict on the listed stocks it affects
//! (`assistant`). Loads local parquet/JSONL or the Hub repo, renders a struct `assistant` as
//! JSON in the schema's field order, and splits like the tutorial or by a seeded shuffle.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result, RowIssue};
use crate::hub::{fetch_parquet_files, HubOptions};
use crate::load::{
    collect_rows, jsonl_rows, read_text, type_name, BadRowPolicy, LoadReport, RowCtx,
};
use crate::message::{Conversation, Message};

/// The dataset's Hub repo id.
pub const HUB_REPO: &str = "capybaraOh/naver-economy-news2stock";

/// The bundled synthetic sample (51 rows, fictional companies; see `data/README.md`).
pub const SAMPLE_JSONL: &str = include_str!("../data/news2stock_sample.jsonl");

/// The answer's fields, in the schema's order (the order they are rendered in).
pub const ANSWER_FIELDS: [&str; 8] = [
    "stock_related",
    "summary",
    "positive_stocks",
    "positive_keywords",
    "positive_reasons",
    "negative_stocks",
    "negative_keywords",
    "negative_reasons",
];

/// The structured answer; field order = schema order = rendering order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StockAnswer {
    /// Whether the news concerns listed stocks.
    pub stock_related: bool,
    /// One or two sentences summarising the news.
    pub summary: String,
    /// Stocks affected positively.
    pub positive_stocks: Vec<String>,
    /// Keywords of the positive effect.
    pub positive_keywords: Vec<String>,
    /// Why (empty when none).
    pub positive_reasons: String,
    /// Stocks affected negatively.
    pub negative_stocks: Vec<String>,
    /// Keywords of the negative effect.
    pub negative_keywords: Vec<String>,
    /// Why (empty when none).
    pub negative_reasons: String,
}

impl StockAnswer {
    /// The answer as the model should write it: `json.dumps(answer, ensure_ascii=False)`.
    pub fn to_json(&self) -> String {
        crate::pyjson::dumps(self, None)
    }
}

/// One dataset row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewsRow {
    /// The instruction.
    pub system: String,
    /// The news article.
    pub user: String,
    /// The answer text the model learns: a struct rendered by [`StockAnswer::to_json`], or
    /// the row's JSON string as stored.
    pub assistant: String,
    /// The answer parsed into the schema, when it fits it.
    pub answer: Option<StockAnswer>,
}

impl NewsRow {
    /// A row from a structured answer.
    pub fn new(system: impl Into<String>, user: impl Into<String>, answer: StockAnswer) -> Self {
        Self {
            system: system.into(),
            user: user.into(),
            assistant: answer.to_json(),
            answer: Some(answer),
        }
    }
}

/// The row as a chat: system (left out when blank), user, assistant.
pub fn to_conversation(row: &NewsRow) -> Conversation {
    let mut messages = Vec::with_capacity(3);
    if !row.system.trim().is_empty() {
        messages.push(Message::system(row.system.clone()));
    }
    messages.push(Message::user(row.user.clone()));
    messages.push(Message::assistant(row.assistant.clone()));
    Conversation::new(messages)
}

/// The generation prompt of a row: its system and user messages, without the answer.
pub fn prompt_messages(row: &NewsRow) -> Vec<Message> {
    let mut conv = to_conversation(row);
    conv.messages.pop();
    conv.messages
}

/// Loads a JSONL file of rows; a malformed row is an error naming file, line and field.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<(Vec<NewsRow>, LoadReport)> {
    load_jsonl_with(path, BadRowPolicy::Error)
}

/// [`load_jsonl`] with a bad-row policy.
pub fn load_jsonl_with(
    path: impl AsRef<Path>,
    policy: BadRowPolicy,
) -> Result<(Vec<NewsRow>, LoadReport)> {
    let path = path.as_ref();
    let text = read_text(path)?;
    parse_jsonl_str(&text, &path.display().to_string(), policy)
}

/// Parses JSONL text already in memory; `source` names it in errors.
pub fn parse_jsonl_str(
    text: &str,
    source: &str,
    policy: BadRowPolicy,
) -> Result<(Vec<NewsRow>, LoadReport)> {
    collect_rows(source, jsonl_rows(text), policy, parse_row)
}

/// Loads a parquet file (`assistant` as a struct or a JSON string); a corrupt file is
/// [`Error::Parquet`], a malformed row an error naming file, row and field.
pub fn load_parquet(path: impl AsRef<Path>) -> Result<(Vec<NewsRow>, LoadReport)> {
    load_parquet_with(path, BadRowPolicy::Error)
}

/// [`load_parquet`] with a bad-row policy.
pub fn load_parquet_with(
    path: impl AsRef<Path>,
    policy: BadRowPolicy,
) -> Result<(Vec<NewsRow>, LoadReport)> {
    let path = path.as_ref();
    let rows = crate::parquet_io::read_rows(path)?;
    collect_rows(
        &path.display().to_string(),
        rows.into_iter(),
        policy,
        parse_row,
    )
}

/// Loads a local file, choosing the reader by extension (`.parquet`, else JSONL).
pub fn load_file(
    path: impl AsRef<Path>,
    policy: BadRowPolicy,
) -> Result<(Vec<NewsRow>, LoadReport)> {
    let path = path.as_ref();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        load_parquet_with(path, policy)
    } else {
        load_jsonl_with(path, policy)
    }
}

/// Loads the `train` split of a Hub dataset repo (e.g. [`HUB_REPO`]) at `revision`
/// (default `main`): lists the repo's parquet files and reads them in name order. Honours
/// `HF_TOKEN`, `HF_HOME` and `HF_HUB_OFFLINE`.
pub fn load_hub(repo: &str, revision: Option<&str>) -> Result<(Vec<NewsRow>, LoadReport)> {
    load_hub_with(
        &HubOptions::from_env(),
        repo,
        revision,
        "train",
        BadRowPolicy::Error,
    )
}

/// [`load_hub`] with explicit options, split and bad-row policy.
pub fn load_hub_with(
    opts: &HubOptions,
    repo: &str,
    revision: Option<&str>,
    split: &str,
    policy: BadRowPolicy,
) -> Result<(Vec<NewsRow>, LoadReport)> {
    let files = fetch_parquet_files(opts, repo, revision, split)?;
    let mut rows = Vec::new();
    let mut report = LoadReport::default();
    for f in files {
        let (r, rep) = load_parquet_with(&f, policy)?;
        rows.extend(r);
        report.merge(rep);
    }
    Ok((rows, report))
}

/// Path of the bundled sample inside this crate's source tree.
pub fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/news2stock_sample.jsonl")
}

/// The bundled sample, parsed from the copy compiled into the binary.
pub fn load_sample() -> Result<Vec<NewsRow>> {
    parse_jsonl_str(SAMPLE_JSONL, "news2stock_sample.jsonl", BadRowPolicy::Error).map(|(r, _)| r)
}

/// The tutorial's split: the first 20% (rounded down) is the test set, the rest trains.
/// Returns `(train, test)`.
pub fn tutorial_split<T: Clone>(rows: &[T]) -> (Vec<T>, Vec<T>) {
    let n_test = rows.len() / 5;
    (rows[n_test..].to_vec(), rows[..n_test].to_vec())
}

/// A seeded shuffle, then `floor(len * test_fraction)` rows as test. Returns `(train, test)`.
pub fn shuffle_split<T: Clone>(
    rows: &[T],
    test_fraction: f64,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if !(0.0..=1.0).contains(&test_fraction) {
        return Err(Error::InvalidArgument(format!(
            "test_fraction must be in [0, 1], got {test_fraction}"
        )));
    }
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_test = (rows.len() as f64 * test_fraction).floor() as usize;
    let pick = |ids: &[usize]| ids.iter().map(|&i| rows[i].clone()).collect::<Vec<T>>();
    Ok((pick(&idx[n_test..]), pick(&idx[..n_test])))
}

fn parse_row(obj: &Map<String, Value>, ctx: &RowCtx<'_>) -> std::result::Result<NewsRow, RowIssue> {
    let system = ctx.string(ctx.field(obj, "system", "system")?, "system")?;
    let user = ctx.string(ctx.field(obj, "user", "user")?, "user")?;
    if user.trim().is_empty() {
        return Err(ctx.issue("user", "empty article"));
    }
    let (assistant, answer) = match ctx.field(obj, "assistant", "assistant")? {
        Value::Object(a) => {
            let answer = parse_answer(a, ctx)?;
            (answer.to_json(), Some(answer))
        }
        Value::String(s) => {
            let answer = serde_json::from_str::<StockAnswer>(s).ok();
            (s.clone(), answer)
        }
        other => {
            return Err(ctx.issue(
                "assistant",
                format!(
                    "expected a struct or a JSON string, found {}",
                    type_name(other)
                ),
            ))
        }
    };
    if assistant.trim().is_empty() {
        return Err(ctx.issue("assistant", "empty assistant answer"));
    }
    Ok(NewsRow {
        system,
        user,
        assistant,
        answer,
    })
}

/// Strict struct parsing: all eight fields, right types; `null` lists and reasons read as
/// empty (parquet columns are nullable, and `list<null>` columns hold only empty lists).
fn parse_answer(
    a: &Map<String, Value>,
    ctx: &RowCtx<'_>,
) -> std::result::Result<StockAnswer, RowIssue> {
    if let Some(extra) = a.keys().find(|k| !ANSWER_FIELDS.contains(&k.as_str())) {
        return Err(ctx.issue(
            &format!("assistant.{extra}"),
            "unexpected field (not in the news2stock schema)",
        ));
    }
    let get = |k: &str| ctx.field(a, k, &format!("assistant.{k}"));
    let path = |k: &str| format!("assistant.{k}");
    let string_or_empty = |k: &str| -> std::result::Result<String, RowIssue> {
        match get(k)? {
            Value::Null => Ok(String::new()),
            v => ctx.string(v, &path(k)),
        }
    };
    let list = |k: &str| -> std::result::Result<Vec<String>, RowIssue> {
        match get(k)? {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| ctx.string(v, &format!("assistant.{k}[{i}]")))
                .collect(),
            other => Err(ctx.issue(
                &path(k),
                format!("expected a list of strings, found {}", type_name(other)),
            )),
        }
    };
    let stock_related = match get("stock_related")? {
        Value::Bool(b) => *b,
        other => {
            return Err(ctx.issue(
                "assistant.stock_related",
                format!("expected a boolean, found {}", type_name(other)),
            ))
        }
    };
    let summary = ctx.string(get("summary")?, "assistant.summary")?;
    Ok(StockAnswer {
        stock_related,
        summary,
        positive_stocks: list("positive_stocks")?,
        positive_keywords: list("positive_keywords")?,
        positive_reasons: string_or_empty("positive_reasons")?,
        negative_stocks: list("negative_stocks")?,
        negative_keywords: list("negative_keywords")?,
        negative_reasons: string_or_empty("negative_reasons")?,
    })
}
