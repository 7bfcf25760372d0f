//! Base vs adapter on the test split, in one batched pass: every batch holds each prompt twice,
//! once routed to the base model and once to the adapter ([`LoraCtx::row_adapters`]), so one
//! read of the weights per step serves both sides of the comparison. Prompts are sorted by
//! length (longest first, so a batch too large for memory fails at once) to keep padding small.
//!
//! Writes `eval.md` (table and three examples), `eval_results.json` (scores and generation
//! figures) and `eval_samples.jsonl` (one line per test sample: both outputs and their parsed
//! fields).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use chat_collate::news2stock::{self, NewsRow};
use chat_collate::ChatCollator;
use llama::{GenerationConfig, LlamaForCausalLM};
use peft_lora::{LoraCtx, PeftModel};
use serde_json::{json, Value};

use crate::metrics::{parse_answer, Scores};
use crate::settings::Settings;

/// Where `eval` (and the demo's training) write the score table as JSON.
pub const EVAL_RESULTS_FILE: &str = "eval_results.json";
/// One JSON line per evaluated sample.
pub const EVAL_SAMPLES_FILE: &str = "eval_samples.jsonl";

/// The generated text of both sides, in the order of the prompts, and the generation figures.
struct SideBySide {
    base: Vec<String>,
    adapter: Vec<String>,
    new_tokens: usize,
    seconds: f64,
}

/// Generates every prompt with the base model and with `adapter`, `batch` prompts (2 x `batch`
/// rows) per call.
fn generate_side_by_side<B: Backend>(
    model: &LlamaForCausalLM<B>,
    adapter: &str,
    prompts: &[Vec<u32>],
    batch: usize,
    tok: &tokenizers::Tokenizer,
    gen: &GenerationConfig,
) -> Result<SideBySide> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    // Drawn on a terminal only (indicatif hides it otherwise).
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "eval {bar:40} {pos}/{len} samples [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    let (mut base, mut tuned) = (
        vec![String::new(); prompts.len()],
        vec![String::new(); prompts.len()],
    );
    let start = Instant::now();
    let mut new_tokens = 0usize;
    for chunk in order.chunks(batch.max(1)) {
        let k = chunk.len();
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .chain(chunk)
            .map(|&i| prompts[i].clone())
            .collect();
        let ctx = LoraCtx {
            row_adapters: Some(
                (0..2 * k)
                    .map(|r| (r >= k).then(|| adapter.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let out = model.generate(&rows, gen, &ctx, &mut |_, _| {
            new_tokens += 1;
        })?;
        for (r, ids) in out.iter().enumerate() {
            let text = tok.decode(ids, true).unwrap_or_default();
            let i = chunk[r % k];
            if r < k {
                base[i] = text;
            } else {
                tuned[i] = text;
            }
        }
        bar.inc(k as u64);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} generated tok/s", new_tokens as f64 / secs));
    }
    bar.finish_and_clear();
    Ok(SideBySide {
        base,
        adapter: tuned,
        new_tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The parsed fields of one output, for `eval_samples.jsonl`.
fn parsed_fields(text: &str) -> Value {
    match parse_answer(text) {
        Some(v) => json!({
            "text": text,
            "json_ok": true,
            "stock_related": v.get("stock_related").cloned().unwrap_or(Value::Null),
            "positive_stocks": v.get("positive_stocks").cloned().unwrap_or(Value::Null),
            "negative_stocks": v.get("negative_stocks").cloned().unwrap_or(Value::Null),
        }),
        None => json!({ "text": text, "json_ok": false }),
    }
}

/// Base vs the adapter `default` on the test split: a score table and three side-by-side
/// examples, printed and written to `out`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_model<B: Backend>(
    s: &Settings,
    peft: &mut PeftModel<B, LlamaForCausalLM<B>>,
    tok: &tokenizers::Tokenizer,
    stop_ids: &[u32],
    pad_id: u32,
    c: &ChatCollator,
    test: &[NewsRow],
    out: &Path,
) -> Result<()> {
    let n = if s.score.eval_samples == 0 {
        test.len()
    } else {
        s.score.eval_samples.min(test.len())
    };
    if n == 0 {
        bail!("the test split is empty: nothing to evaluate");
    }
    let rows = &test[..n];
    let prompts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| c.prompt_ids(&news2stock::prompt_messages(r)))
        .collect::<chat_collate::Result<_>>()?;
    let gen = GenerationConfig {
        max_new_tokens: s.generation.max_new_tokens,
        stop_ids: stop_ids.to_vec(),
        pad_id,
        ..Default::default()
    };
    peft.set_adapters_disabled(false)?;
    let batch = s.score.eval_batch_size;
    let side = generate_side_by_side(&peft.model, "default", &prompts, batch, tok, &gen)?;
    let (mut sb, mut st) = (Scores::default(), Scores::default());
    std::fs::create_dir_all(out)?;
    let mut lines = std::io::BufWriter::new(std::fs::File::create(out.join(EVAL_SAMPLES_FILE))?);
    for (i, r) in rows.iter().enumerate() {
        let reference = parse_answer(&r.assistant).unwrap_or(Value::Null);
        sb.add(&side.base[i], &reference);
        st.add(&side.adapter[i], &reference);
        let line = json!({
            "index": i,
            "prompt_tokens": prompts[i].len(),
            "reference": reference,
            "base": parsed_fields(&side.base[i]),
            "adapter": parsed_fields(&side.adapter[i]),
        });
        writeln!(lines, "{line}")?;
    }
    lines.flush()?;
    let tok_s = side.new_tokens as f64 / side.seconds.max(1e-9);
    let table = format!(
        "{}\n{}\n{}\n",
        Scores::header(),
        sb.row("base"),
        st.row("adapter")
    );
    println!(
        "evaluation on {n} test samples ({} generations in batches of {} rows, {} new tokens in {:.1} s, {tok_s:.0} tok/s):\n{table}",
        2 * n,
        2 * batch.min(n),
        side.new_tokens,
        side.seconds
    );
    let mut report = table.clone();
    for (i, r) in rows.iter().take(3).enumerate() {
        let ex = format!(
            "\n### example {}\nnews: {}\nreference: {}\nbase: {}\nadapter: {}\n",
            i + 1,
            r.user.chars().take(200).collect::<String>(),
            r.assistant,
            side.base[i],
            side.adapter[i]
        );
        println!("{ex}");
        report.push_str(&ex);
    }
    std::fs::write(out.join("eval.md"), report)?;
    let results = json!({
        "dataset": s.data.dataset,
        "split": "test (first 20%)",
        "samples": n,
        "results": [sb.to_json("base"), st.to_json("adapter")],
        "generation": {
            "rows": 2 * n,
            "batch_rows": 2 * batch.min(n),
            "new_tokens": side.new_tokens,
            "seconds": side.seconds,
            "tokens_per_s": tok_s,
        },
        "samples_file": EVAL_SAMPLES_FILE,
    });
    std::fs::write(
        out.join(EVAL_RESULTS_FILE),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(())
}
