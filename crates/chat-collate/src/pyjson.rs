//! JSON text as Python's `json.dumps(x, ensure_ascii=False)` writes it (`", "` and `": "`
//! separators, non-ASCII kept), so answers and `tojson` match what the Python side produced.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter, Serializer};

/// `json.dumps(value, ensure_ascii=False)` (or with `indent=n` when `indent` is set).
pub fn dumps<T: Serialize + ?Sized>(value: &T, indent: Option<usize>) -> String {
    let mut out = Vec::new();
    let result = match indent {
        None => value.serialize(&mut Serializer::with_formatter(&mut out, PythonFormatter)),
        Some(n) => {
            let pad = vec![b' '; n];
            value.serialize(&mut Serializer::with_formatter(
                &mut out,
                PrettyFormatter::with_indent(&pad),
            ))
        }
    };
    // Serialising plain data into a Vec cannot fail; map keys are strings by construction.
    debug_assert!(result.is_ok());
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json's compact output with Python's default separators.
struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_separators_and_keeps_non_ascii() {
        let v = serde_json::json!({"b": [1, "가\n"], "a": {"x": true, "y": null}, "e": []});
        assert_eq!(
            dumps(&v, None),
            r#"{"b": [1, "가\n"], "a": {"x": true, "y": null}, "e": []}"#
        );
        assert_eq!(dumps(&v["e"], Some(2)), "[]");
        assert_eq!(
            dumps(&v["a"], Some(2)),
            "{\n  \"x\": true,\n  \"y\": null\n}"
        );
    }
}
