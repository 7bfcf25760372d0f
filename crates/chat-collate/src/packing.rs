//! Packing short samples into rows of at most `max_length` tokens. Each packed row records
//! its segment lengths, from which [`crate::pad_batch`] derives restarting positions and
//! segment ids, so attention never crosses a sample boundary.

use crate::encoded::Encoded;

/// Packs `samples` first-fit-decreasing into rows of at most `max_length` tokens.
///
/// Deterministic: ties keep input order. A sample longer than `max_length` gets a row of its
/// own (apply the collator's length policy first). Labels are kept as they are: each sample
/// starts with its BOS, labelled -100, so no loss target spans two samples after the shift.
pub fn pack(samples: &[Encoded], max_length: usize) -> Vec<Encoded> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].len()));
    let mut rows: Vec<Encoded> = Vec::new();
    for i in order {
        let s = &samples[i];
        let slot = rows.iter().position(|r| r.len() + s.len() <= max_length);
        match slot {
            Some(r) => {
                let row = &mut rows[r];
                row.input_ids.extend_from_slice(&s.input_ids);
                row.labels.extend_from_slice(&s.labels);
                row.segment_lengths.extend(s.segments());
                row.truncated |= s.truncated;
            }
            None => {
                let mut row = s.clone();
                row.segment_lengths = s.segments();
                rows.push(row);
            }
        }
    }
    rows
}

/// Fraction of padding in `batches` of `lengths` (0 = none); to compare batching strategies.
pub fn padding_fraction(lengths: &[usize], batches: &[Vec<usize>]) -> f64 {
    let (mut real, mut total) = (0usize, 0usize);
    for b in batches {
        let longest = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        real += b.iter().map(|&i| lengths[i]).sum::<usize>();
        total += longest * b.len();
    }
    if total == 0 {
        0.0
    } else {
        1.0 - real as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_first_fit_decreasing() {
        let s = |n: usize| Encoded::new(vec![7; n], vec![-100; n]);
        let rows = pack(&[s(3), s(6), s(4), s(2)], 8);
        let segs: Vec<Vec<usize>> = rows.iter().map(|r| r.segment_lengths.clone()).collect();
        assert_eq!(segs, [vec![6, 2], vec![4, 3]]);
    }
}
