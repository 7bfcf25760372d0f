//! Scores of generated answers against the dataset's answers: JSON-parse rate, stock_related
//! accuracy, and F1 of the positive and negative stock sets.

use std::collections::BTreeSet;

use serde_json::Value;

/// Accumulated scores over an evaluation set.
#[derive(Debug, Default, Clone)]
pub struct Scores {
    /// Samples seen.
    pub n: usize,
    /// Outputs that parsed as a JSON object.
    pub parsed: usize,
    /// Correct `stock_related` among parsed outputs.
    pub related_correct: usize,
    /// (true positives, predicted, actual) for positive stocks.
    pub pos: (usize, usize, usize),
    /// (true positives, predicted, actual) for negative stocks.
    pub neg: (usize, usize, usize),
}

/// The first JSON object in `text` (models often wrap it in prose or code fences).
pub fn parse_answer(text: &str) -> Option<Value> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    if end < start {
        return None;
    }
    serde_json::from_str::<Value>(&text[start..=end])
        .ok()
        .filter(Value::is_object)
}

fn stocks(v: &Value, field: &str) -> BTreeSet<String> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl Scores {
    /// Scores one generated output against the reference answer (a JSON object).
    pub fn add(&mut self, generated: &str, reference: &Value) {
        self.n += 1;
        let truth_pos = stocks(reference, "positive_stocks");
        let truth_neg = stocks(reference, "negative_stocks");
        self.pos.2 += truth_pos.len();
        self.neg.2 += truth_neg.len();
        let Some(pred) = parse_answer(generated) else {
            return;
        };
        self.parsed += 1;
        if pred.get("stock_related").and_then(Value::as_bool)
            == reference.get("stock_related").and_then(Value::as_bool)
        {
            self.related_correct += 1;
        }
        let (pp, pn) = (
            stocks(&pred, "positive_stocks"),
            stocks(&pred, "negative_stocks"),
        );
        self.pos.0 += pp.intersection(&truth_pos).count();
        self.pos.1 += pp.len();
        self.neg.0 += pn.intersection(&truth_neg).count();
        self.neg.1 += pn.len();
    }

    /// F1 from (tp, predicted, actual); 1.0 when both sets are empty throughout.
    pub fn f1((tp, pred, actual): (usize, usize, usize)) -> f64 {
        if pred == 0 && actual == 0 {
            return 1.0;
        }
        let p = if pred == 0 {
            0.0
        } else {
            tp as f64 / pred as f64
        };
        let r = if actual == 0 {
            0.0
        } else {
            tp as f64 / actual as f64
        };
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// One row of the comparison table.
    pub fn row(&self, name: &str) -> String {
        let n = self.n.max(1) as f64;
        format!(
            "| {name:<8} | {:>5.1}% | {:>5.1}% | {:>6.3} | {:>6.3} |",
            100.0 * self.parsed as f64 / n,
            100.0 * self.related_correct as f64 / n,
            Self::f1(self.pos),
            Self::f1(self.neg)
        )
    }

    /// The figures of [`Scores::row`] as JSON (`eval_results.json`): fractions in [0, 1].
    pub fn to_json(&self, name: &str) -> Value {
        let n = self.n.max(1) as f64;
        serde_json::json!({
            "model": name,
            "json_ok": self.parsed as f64 / n,
            "related_accuracy": self.related_correct as f64 / n,
            "f1_positive": Self::f1(self.pos),
            "f1_negative": Self::f1(self.neg),
        })
    }

    /// The table header.
    pub fn header() -> &'static str {
        "| model    | JSON ok | related acc | F1 pos | F1 neg |\n|----------|--------|--------|--------|--------|"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores() {
        let reference = serde_json::json!({"stock_related": true, "positive_stocks": ["A", "B"], "negative_stocks": []});
        let mut s = Scores::default();
        s.add("here: {\"stock_related\": true, \"positive_stocks\": [\"A\"], \"negative_stocks\": []}", &reference);
        s.add("not json", &reference);
        assert_eq!((s.n, s.parsed, s.related_correct), (2, 1, 1));
        assert!((Scores::f1(s.pos) - 2.0 * 1.0 * 0.25 / 1.25).abs() < 1e-12);
    }
}
