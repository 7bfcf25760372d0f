//! Collation throughput: samples/s of rendering + tokenising + labelling news2stock rows, with
//! the project's demo tokenizer and, when `LLAMA3_TOKENIZER_DIR` points at a folder with the
//! real Llama 3 `tokenizer.json`, with that one.

use std::time::Instant;

use chat_collate::news2stock;
use chat_collate::{ChatCollator, CollatorConfig};

fn bench(name: &str, tok: tokenizers::Tokenizer) {
    let rows = news2stock::load_sample().expect("bundled sample");
    let convs: Vec<_> = rows.iter().map(news2stock::to_conversation).collect();
    for (fmt, cfg) in [
        ("llama3", CollatorConfig::llama3(4096)),
        ("tutorial", CollatorConfig::tutorial(4096)),
    ] {
        let c = ChatCollator::new(tok.clone(), cfg).expect("collator");
        let _ = c.encode_all(&convs).expect("warm-up");
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            let _ = c.encode_all(&convs).expect("encode");
        }
        let per_s = (reps * convs.len()) as f64 / t.elapsed().as_secs_f64();
        println!("collate {name} tokenizer, {fmt} format, 1 thread: {per_s:.0} samples/s");
    }
}

fn main() {
    bench("demo", chat_collate::demo_tokenizer());
    if let Ok(dir) = std::env::var("LLAMA3_TOKENIZER_DIR") {
        match tokenizers::Tokenizer::from_file(std::path::Path::new(&dir).join("tokenizer.json")) {
            Ok(t) => bench("llama3", t),
            Err(e) => eprintln!("LLAMA3_TOKENIZER_DIR={dir}: {e}"),
        }
    }
}
