//! Examples and benches live beside this crate.
