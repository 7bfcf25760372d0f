#!/usr/bin/env python3
"""Reference outputs for crates/chat-collate, written to fixtures/collate/.

1. tutorial_expected.json: the tutorial's collator, reconstructed. Per sample it builds
   "<|begin_of_text|>" + "<|start_header_id|>{role}<|end_header_id|>\n{content.strip()}<|eot_id|>"
   for every message, tokenises it with add_special_tokens=False (truncating to max_length), and
   labels only the FIRST assistant turn: it searches the token pattern of
   "<|start_header_id|>assistant<|end_header_id|>\n" and labels from there up to and including
   the next <|eot_id|>; everything else is -100. Done with the real Llama 3 tokenizer ("llama3")
   and the crate's demo tokenizer ("demo", read from fixtures/collate/demo_tokenizer.json, which
   `cargo test -p chat-collate -- --ignored write_demo_tokenizer_fixture` writes).
   The Rust side must produce the same ids and labels from byte offsets.
2. Parquet files written by pyarrow, as the Hub copies of the dataset are: assistant as a struct
   (negative_keywords typed list<null>), as a JSON string, and two bad files.

Messages come from the bundled sample (crates/chat-collate/data/news2stock_sample.jsonl):
system, user, assistant = json.dumps(assistant, ensure_ascii=False); plus hand-written
multi-turn chats.

Usage: pip install tokenizers pyarrow; python3 scripts/collate_reference.py
       [--llama3 ../shared/fixtures/llama3-tokenizer/tokenizer.json]
"""

import argparse
import json
import pathlib

from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "crates/chat-collate/data/news2stock_sample.jsonl"
OUT = ROOT / "fixtures/collate"
MAX_LENGTH = 2048
N_SAMPLE_ROWS = 8

MULTI_TURN = [
    [
        {"role": "system", "content": "간결하게 답하세요."},
        {"role": "user", "content": "한빛전자 공급 계약 규모는?"},
        {"role": "assistant", "content": "  3천억원입니다.  "},
        {"role": "user", "content": "계약 기간은?"},
        {"role": "assistant", "content": "2년입니다."},
    ],
    [
        {"role": "user", "content": "  Summarise: KOSPI fell 1% on foreign selling.\n"},
        {"role": "assistant", "content": "{\"stock_related\": false, \"summary\": \"KOSPI fell.\"}"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]


def row_messages(row):
    assistant = row["assistant"]
    if not isinstance(assistant, str):
        assistant = json.dumps(assistant, ensure_ascii=False)
    return [
        {"role": "system", "content": row["system"]},
        {"role": "user", "content": row["user"]},
        {"role": "assistant", "content": assistant},
    ]


def tutorial_collate(tokenizer, messages, max_length):
    """The tutorial's per-sample logic (before padding)."""
    text = "<|begin_of_text|>"
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n{m['content'].strip()}<|eot_id|>"
    input_ids = tokenizer.encode(text, add_special_tokens=False).ids[:max_length]
    labels = [-100] * len(input_ids)
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n", add_special_tokens=False).ids
    eot = tokenizer.encode("<|eot_id|>", add_special_tokens=False).ids
    i = 0
    while i <= len(input_ids) - len(header):
        if input_ids[i : i + len(header)] == header:
            start = i + len(header)
            end = start
            while end <= len(input_ids) - len(eot):
                if input_ids[end : end + len(eot)] == eot:
                    break
                end += 1
            for j in range(start, min(end + len(eot), len(input_ids))):
                labels[j] = input_ids[j]
            break  # only the first assistant turn
        i += 1
    return input_ids, labels


def cases(tokenizer, rows):
    out = []
    for k, row in enumerate(rows[:N_SAMPLE_ROWS]):
        msgs = row_messages(row)
        ids, labels = tutorial_collate(tokenizer, msgs, MAX_LENGTH)
        out.append({"sample_row": k, "messages": msgs, "input_ids": ids, "labels": labels})
    for msgs in MULTI_TURN:
        ids, labels = tutorial_collate(tokenizer, msgs, MAX_LENGTH)
        out.append({"messages": msgs, "input_ids": ids, "labels": labels})
    return out


def write_parquet(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    string_list = pa.list_(pa.string())
    struct = pa.struct(
        [
            ("stock_related", pa.bool_()),
            ("summary", pa.string()),
            ("positive_stocks", string_list),
            ("positive_keywords", string_list),
            ("positive_reasons", pa.string()),
            ("negative_stocks", string_list),
            ("negative_keywords", pa.list_(pa.null())),  # always empty in this file
            ("negative_reasons", pa.string()),
        ]
    )
    positive = [r for r in rows if not r["assistant"]["negative_keywords"]][:6]
    table = pa.table(
        {
            "system": [r["system"] for r in positive],
            "user": [r["user"] for r in positive],
            "assistant": pa.array([r["assistant"] for r in positive], type=struct),
        }
    )
    pq.write_table(table, OUT / "news2stock_struct.parquet", compression="snappy")

    mixed = rows[:6]
    table = pa.table(
        {
            "system": [r["system"] for r in mixed],
            "user": [r["user"] for r in mixed],
            "assistant": [json.dumps(r["assistant"], ensure_ascii=False) for r in mixed],
        }
    )
    pq.write_table(table, OUT / "news2stock_string.parquet", compression="snappy")

    # Bad: row 1's summary is null.
    bad = [dict(r["assistant"]) for r in positive[:3]]
    bad[1]["summary"] = None
    table = pa.table(
        {
            "system": [r["system"] for r in positive[:3]],
            "user": [r["user"] for r in positive[:3]],
            "assistant": pa.array(bad, type=struct),
        }
    )
    pq.write_table(table, OUT / "news2stock_null_summary.parquet", compression="snappy")

    # Bad: the struct has no summary field at all.
    no_summary = pa.struct([f for f in struct if f.name != "summary"])
    table = pa.table(
        {
            "system": [r["system"] for r in positive[:2]],
            "user": [r["user"] for r in positive[:2]],
            "assistant": pa.array(
                [{k: v for k, v in r["assistant"].items() if k != "summary"} for r in positive[:2]],
                type=no_summary,
            ),
        }
    )
    pq.write_table(table, OUT / "news2stock_no_summary.parquet", compression="snappy")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama3", default=str(ROOT.parent / "shared/fixtures/llama3-tokenizer/tokenizer.json"))
    ap.add_argument("--demo", default=str(OUT / "demo_tokenizer.json"))
    ap.add_argument("--no-parquet", action="store_true")
    args = ap.parse_args()

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "about": "Expected output of the tutorial's collator; written by scripts/collate_reference.py",
        "max_length": MAX_LENGTH,
        "llama3": cases(Tokenizer.from_file(args.llama3), rows),
        "demo": cases(Tokenizer.from_file(args.demo), rows),
    }
    (OUT / "tutorial_expected.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    if not args.no_parquet:
        write_parquet(rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
