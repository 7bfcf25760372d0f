//! aLoRA (activated LoRA): which positions of each row an aLoRA adapter acts on.
//!
//! PEFT's semantics (`calculate_alora_offsets`, `ALoraLinearVariant.forward`, 0.21):
//! - a row's *offset* is `seq_len - start` of the **last full** occurrence of the invocation
//!   sequence in its token ids (padding included, as PEFT counts it), so the invocation tokens
//!   themselves get the adapter; a row without the sequence has no offset and runs as the base
//!   model (PEFT does so silently; here too, see [`offsets_for`] to check beforehand);
//! - in a call over `T` new tokens, the last `min(offset, T)` positions of the row get the
//!   adapter. With a KV cache the offsets of the prompt are reused for every decode step
//!   (`T = 1`), so every generated token of a row that found its invocation is adapted;
//! - without offsets at all an aLoRA adapter contributes nothing.
//!
//! The model computes the offsets from its `input_ids` (the Llama crate does it in its forward
//! and in generation) and passes them in [`LoraCtx::alora_offsets`].

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;

use crate::layer::LoraCtx;
use crate::model::LoraModel;

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
pub fn positions(offsets: Option<&[Option<usize>]>, batch: usize, seq: usize) -> Vec<usize> {
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

/// The invocation sequence of the aLoRA adapter each of `batch` rows runs in this call, as
/// PEFT resolves it: the row's adapter in `ctx.row_adapters`, else the first active aLoRA
/// adapter. `None` when no row runs an aLoRA adapter (then there is nothing to compute).
pub fn row_invocations<B: Backend, M: LoraModel<B>>(
    model: &M,
    ctx: &LoraCtx,
    batch: usize,
) -> Option<Vec<Option<Vec<u32>>>> {
    let mut by_name: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut active: Option<Vec<u32>> = None;
    for (_, layer) in model.lora_linears() {
        if layer.state.disabled {
            continue;
        }
        for a in &layer.adapters {
            if let Some(inv) = &a.meta.alora_invocation_tokens {
                by_name
                    .entry(a.meta.name.clone())
                    .or_insert_with(|| inv.clone());
            }
        }
        if active.is_none() {
            active = layer
                .state
                .active
                .iter()
                .find_map(|n| layer.adapter(n)?.meta.alora_invocation_tokens.clone());
        }
    }
    if by_name.is_empty() {
        return None;
    }
    let rows: Vec<Option<Vec<u32>>> = match &ctx.row_adapters {
        None => vec![active; batch],
        Some(rows) => rows
            .iter()
            .map(|r| r.as_ref().and_then(|n| by_name.get(n).cloned()))
            .collect(),
    };
    rows.iter().any(Option::is_some).then_some(rows)
}

/// PEFT's `calculate_alora_offsets` for the token ids `rows` of one call (padding included):
/// per row the offset of its adapter's invocation, `None` where the row has no aLoRA adapter
/// or no invocation. The whole result is `None` when no row runs an aLoRA adapter.
pub fn offsets_for<B: Backend, M: LoraModel<B>, T: Copy + Into<i64>>(
    model: &M,
    ctx: &LoraCtx,
    rows: &[&[T]],
) -> Option<Vec<Option<usize>>> {
    let inv = row_invocations(model, ctx, rows.len())?;
    Some(
        rows.iter()
            .zip(inv)
            .map(|(row, inv)| inv.and_then(|i| invocation_offset(row, &i)))
            .collect(),
    )
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
        let p = positions(Some(&[Some(2), None, Some(9)]), 3, 4);
        assert_eq!(p, vec![2, 3, 8, 9, 10, 11]);
        assert!(positions(None, 3, 4).is_empty());
        // Decode step (seq 1): every row with an offset.
        assert_eq!(positions(Some(&[Some(3), None]), 2, 1), vec![0]);
    }
}
