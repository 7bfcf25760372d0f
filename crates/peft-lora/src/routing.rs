//! Per-call routing: which batch rows run which adapter ([`LoraCtx`]), and which positions an
//! aLoRA (activated LoRA) adapter acts on.
//!
//! PEFT's aLoRA semantics (`calculate_alora_offsets`, `ALoraLinearVariant.forward`, 0.21):
//! - a row's *offset* is `seq_len - start` of the **last full** occurrence of the invocation
//!   sequence in its token ids (padding included, as PEFT counts it), so the invocation tokens
//!   themselves get the adapter; a row without the sequence has no offset and runs as the base
//!   model (PEFT does so silently; here too, see [`crate::alora_offsets`] to check beforehand);
//! - in a call over `T` new tokens, the last `min(offset, T)` positions of the row get the
//!   adapter. With a KV cache the offsets of the prompt are reused for every decode step
//!   (`T = 1`), so every generated token of a row that found its invocation is adapted;
//! - without offsets at all an aLoRA adapter contributes nothing.
//!
//! The model computes the offsets from its `input_ids` (the Llama crate does it in its forward
//! and in generation) and passes them in [`LoraCtx::alora_offsets`].

/// Per-call routing: mixed-adapter batches and aLoRA offsets.
#[derive(Debug, Clone, Default)]
pub struct LoraCtx {
    /// One entry per batch row: the adapter that row uses (`None` = the base model). When the
    /// whole field is `None`, every row uses the layer's active adapters.
    pub row_adapters: Option<Vec<Option<String>>>,
    /// aLoRA: one entry per batch row, the number of trailing positions of the row's input in
    /// this call that get an aLoRA adapter (clipped to the call's length; `None` = none, the row
    /// runs as the base). When the whole field is `None` aLoRA adapters act nowhere; models fill
    /// it from their token ids with [`crate::alora_offsets`] (PEFT's `alora_offsets`).
    /// Plain LoRA and DoRA adapters ignore it.
    pub alora_offsets: Option<Vec<Option<usize>>>,
}

/// The batch rows an adapter runs on in one call.
pub(crate) enum RowsOn {
    /// None: the adapter does not run.
    Skip,
    /// Every row.
    All,
    /// The rows marked `true`.
    Rows(Vec<bool>),
}

impl LoraCtx {
    /// The rows adapter `name` runs on: every row when it is `active` and the call does not
    /// route rows, else the rows routed to it.
    pub(crate) fn rows_on(&self, name: &str, active: bool) -> RowsOn {
        match &self.row_adapters {
            None if active => RowsOn::All,
            None => RowsOn::Skip,
            Some(rows) => {
                let on: Vec<bool> = rows.iter().map(|r| r.as_deref() == Some(name)).collect();
                if on.iter().any(|o| *o) {
                    RowsOn::Rows(on)
                } else {
                    RowsOn::Skip
                }
            }
        }
    }
}

/// Offset of the last full occurrence of `invocation` in `row`: `row.len() - start`, the number
/// of trailing positions that get the adapter, invocation included (`>= invocation.len()`).
/// `None` when the sequence does not occur (or `invocation` is empty).
pub fn invocation_offset<T: Copy + Into<i64>>(row: &[T], invocation: &[u32]) -> Option<usize> {
    let n = invocation.len();
    if n == 0 || n > row.len() {
        return None;
    }
    (0..=row.len() - n)
        .rev()
        .find(|&s| {
            row[s..s + n]
                .iter()
                .zip(invocation)
                .all(|(&t, &i)| t.into() == i64::from(i))
        })
        .map(|start| row.len() - start)
}

/// The flat positions (`row * seq + t`, ascending) that get an aLoRA adapter: the last
/// `min(offset, seq)` of each row; none without offsets.
///
/// # Panics
/// When `offsets` does not have one entry per batch row (a programming error of the caller).
pub fn alora_positions(offsets: Option<&[Option<usize>]>, batch: usize, seq: usize) -> Vec<usize> {
    let Some(offsets) = offsets else {
        return Vec::new();
    };
    assert_eq!(
        offsets.len(),
        batch,
        "LoraCtx::alora_offsets has {} entries for a batch of {batch} rows",
        offsets.len()
    );
    let mut out = Vec::new();
    for (r, o) in offsets.iter().enumerate() {
        let k = o.unwrap_or(0).min(seq);
        out.extend(r * seq + seq - k..(r + 1) * seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_full_occurrence_counts_and_includes_the_invocation() {
        let inv = [17u32, 42, 99];
        assert_eq!(invocation_offset(&[1u32, 17, 42, 99, 5, 6], &inv), Some(5));
        // Twice: the last one; a trailing partial match does not count.
        let row = [1i64, 17, 42, 99, 3, 17, 42, 99, 8, 17, 42];
        assert_eq!(invocation_offset(&row, &inv), Some(6));
        assert_eq!(invocation_offset(&[17u32, 42], &inv), None);
        assert_eq!(invocation_offset(&[5u32, 17, 42, 99], &inv), Some(3));
        assert_eq!(invocation_offset(&[5u32, 6], &[]), None);
        assert_eq!(invocation_offset(&[-1i64, 17], &[17]), Some(1));
    }

    #[test]
    fn positions_are_the_clipped_tails() {
        let p = alora_positions(Some(&[Some(2), None, Some(9)]), 3, 4);
        assert_eq!(p, vec![2, 3, 8, 9, 10, 11]);
        assert!(alora_positions(None, 3, 4).is_empty());
        // Decode step (seq 1): every row with an offset.
        assert_eq!(alora_positions(Some(&[Some(3), None]), 2, 1), vec![0]);
    }
}
