//! What both attention paths ([`crate::attention`]'s dense one and
//! [`causal_attention`](mod@crate::causal_attention)) share: the checked shapes of a call, dense
//! storage, and the chunks of KV groups whose scores one pass holds.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn_cubecl::kernel::into_contiguous;

use super::kernels::Raw;

/// The probabilities a forward kept for its backward ([`crate::attention::keeping_probs`]): each chunk of
/// groups as `(first group, groups, P [groups, m, t])`.
pub type KeptProbs<T> = Vec<(usize, usize, T)>;

/// The dims of a 3-D tensor, or an error naming `what`.
pub(crate) fn dims3(t: &Raw, what: &str) -> Result<[usize; 3], String> {
    let s = t.meta.shape();
    if s.num_dims() != 3 {
        return Err(format!("{what} must be 3-D, got {s:?}"));
    }
    Ok([s[0], s[1], s[2]])
}

/// Dense row-major storage (what the strided-batched GEMMs address).
pub(crate) fn dense(t: Raw, what: &str) -> Result<Raw, String> {
    let t = into_contiguous(t);
    let [_, r, c] = dims3(&t, what)?;
    let st = t.meta.strides();
    if (r > 1 && st[1] != c) || (c > 1 && st[2] != 1) {
        return Err(format!("{what}: strides {st:?} are not dense"));
    }
    Ok(t)
}

/// The scores of one chunk of groups hold at most this many elements by default (2^25: 64 MiB
/// in bf16, half of a Llama-8B layer's at batch 2 x 1024; smaller chunks save little more and
/// add GEMM and softmax launches to a step whose host queueing runs only ~15 ms ahead).
pub const DEFAULT_SCORE_CHUNK_ELEMS: usize = 1 << 25;

static SCORE_CHUNK_ELEMS: AtomicUsize = AtomicUsize::new(DEFAULT_SCORE_CHUNK_ELEMS);

/// Sets the most score elements one chunk of groups holds (process-wide; at least one group
/// per chunk whatever the limit, so `1` runs one group at a time). For tests and benchmarks.
pub fn set_score_chunk_elems(elems: usize) {
    SCORE_CHUNK_ELEMS.store(elems.max(1), Ordering::Relaxed);
}

/// The groups `g` split into chunks of `m x t` scores each under `times` the chunk limit
/// ([`set_score_chunk_elems`]): `(first group, groups)` pairs. (The dense path holds three
/// score-sized buffers at once in its backward, `times = 1`; the causal path's in-place softmax
/// two, `times = 2`.)
///
/// The step's memory pool keeps buffers by exact size, so the largest chunk's score-sized
/// buffers stay reserved all run: chunks keep that small at the price of a few more GEMM
/// launches.
pub(crate) fn group_chunks(g: usize, m: usize, t: usize, times: usize) -> Vec<(usize, usize)> {
    let limit = SCORE_CHUNK_ELEMS.load(Ordering::Relaxed);
    split_groups(g, m * t, limit.saturating_mul(times))
}

/// The chunks a backward runs: the forward's, with the probabilities it kept, or `fresh` ones
/// whose probabilities it recomputes (`None`).
pub(crate) fn backward_chunks<T>(
    kept: Option<KeptProbs<T>>,
    fresh: impl FnOnce() -> Vec<(usize, usize)>,
) -> Vec<(usize, usize, Option<T>)> {
    match kept {
        Some(kept) => kept
            .into_iter()
            .map(|(g0, n, p)| (g0, n, Some(p)))
            .collect(),
        None => fresh().into_iter().map(|(g0, n)| (g0, n, None)).collect(),
    }
}

/// `g` groups of `per_group` elements in the fewest chunks of at most `limit` elements (one
/// group per chunk at least), each chunk no larger than that count needs.
fn split_groups(g: usize, per_group: usize, limit: usize) -> Vec<(usize, usize)> {
    if g == 0 {
        return Vec::new();
    }
    let fit = (limit / per_group.max(1)).clamp(1, g);
    let per = g.div_ceil(g.div_ceil(fit));
    (0..g)
        .step_by(per)
        .map(|g0| (g0, per.min(g - g0)))
        .collect()
}

/// Checked shapes of one call: `(g, m, t, d)`.
pub(crate) fn shapes(
    q: &Raw,
    k: &Raw,
    v: &Raw,
    mask: &Raw,
) -> Result<(usize, usize, usize, usize), String> {
    let [g, m, d] = dims3(q, "q")?;
    let [gk, t, dk] = dims3(k, "k")?;
    let [gv, tv, dv] = dims3(v, "v")?;
    let ms = mask.meta.shape();
    let bad = || {
        format!(
            "shapes q {:?}, k {:?}, v {:?}, mask {:?} do not fit",
            [g, m, d],
            [gk, t, dk],
            [gv, tv, dv],
            ms
        )
    };
    if ms.num_dims() != 4 || gk != g || gv != g || tv != t || dk != d || dv != d {
        return Err(bad());
    }
    let (mb, s, mt) = (ms[0], ms[2], ms[3]);
    if ms[1] != 1 || mt != t || s == 0 || mb == 0 || (g * m) % (s * mb) != 0 {
        return Err(bad());
    }
    Ok((g, m, t, d))
}

#[cfg(test)]
mod tests {
    use super::split_groups;

    #[test]
    fn groups_split_into_the_fewest_chunks_under_the_limit() {
        // The 8B bench shape: 16 groups (batch 2 x 8 KV heads) of 4096 x 1024 scores.
        let per = 4096 * 1024;
        assert_eq!(split_groups(16, per, 1 << 25), vec![(0, 8), (8, 8)]);
        assert_eq!(
            split_groups(16, per, 1 << 24),
            vec![(0, 4), (4, 4), (8, 4), (12, 4)]
        );
        assert_eq!(split_groups(16, per, usize::MAX), vec![(0, 16)]);
        // A limit below one group still runs one group at a time.
        assert_eq!(split_groups(3, per, 1), vec![(0, 1), (1, 1), (2, 1)]);
        // 5 groups, 2 fit: three chunks, none larger than 2.
        assert_eq!(split_groups(5, 10, 20), vec![(0, 2), (2, 2), (4, 1)]);
        // 7 groups, 6 fit: two chunks of at most 4, not 6 + 1.
        assert_eq!(split_groups(7, 10, 60), vec![(0, 4), (4, 3)]);
        assert!(split_groups(0, per, 1 << 25).is_empty());
        // Every group exactly once, in order.
        for (g, lim) in [(13, 3), (16, 5), (1, 1), (9, 100)] {
            let mut next = 0;
            for (g0, n) in split_groups(g, 1, lim) {
                assert_eq!(g0, next);
                assert!(n >= 1 && n <= lim);
                next += n;
            }
            assert_eq!(next, g);
        }
    }
}
