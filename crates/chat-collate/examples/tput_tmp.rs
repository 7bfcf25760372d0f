use chat_collate::*;
fn main() {
    let dir = std::env::var("LLAMA3_TOKENIZER_DIR").unwrap();
    let tok = tokenizers::Tokenizer::from_file(format!("{dir}/tokenizer.json")).unwrap();
    let rows = news2stock::load_sample().unwrap();
    let convs: Vec<Conversation> = rows.iter().map(news2stock::to_conversation).collect();
    for (name, cfg) in [("llama3", CollatorConfig::llama3(2048)), ("tutorial", CollatorConfig::tutorial(2048)), ("jinja", CollatorConfig { format: ChatFormat::Jinja(JinjaTemplate::llama3()), ..CollatorConfig::llama3(2048) })] {
        let c = ChatCollator::new(tok.clone(), cfg).unwrap();
        let t = std::time::Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < 2.0 { for conv in &convs { c.encode(conv).unwrap(); n += 1; } }
        println!("{name}: {:.0} samples/s", n as f64 / t.elapsed().as_secs_f64());
    }
}
