//! `news2stock`: fine-tune NCSOFT/Llama-VARCO-8B-Instruct on Korean economic news with LoRA,
//! evaluate it, run it, merge it and push it to the Hub: `news2stock train | eval | infer |
//! merge | push`. `--demo` runs the same pipeline on a tiny model, on CPU. The developer tools
//! (benchmarks) are the separate `news2stock-dev` example.

mod app;
mod cli;
mod evaluate;
mod job;
mod launch;
mod load;
mod metrics;
mod model_card;
mod push;
mod settings;

use clap::CommandFactory;

fn main() {
    let matches = match cli::Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            if let Some(hint) = app::parse_error_hint(&e) {
                eprintln!("\ntip: {hint}");
            }
            std::process::exit(e.exit_code());
        }
    };
    if let Err(e) = app::run(&matches) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
