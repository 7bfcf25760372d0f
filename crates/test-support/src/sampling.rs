//! transformers' sampling processors on the host, in f64: the reference that the token choice
//! (Burn ops in llama, the CUDA kernel in burn-cuda-ops) is checked against.

/// The tokens transformers keeps from `logits` (one row) after temperature `t`, top-k (`0`: off;
/// ties with the `k`-th value kept) and top-p over the renormalised rest (`1.0`: off; tokens
/// tied with the last one top-p keeps are kept too), with their renormalised probabilities, in
/// vocabulary order. `-inf` logits are never kept.
pub fn kept(logits: &[f32], t: f32, top_k: usize, top_p: f64) -> Vec<(usize, f64)> {
    let z: Vec<f64> = logits.iter().map(|l| (*l / t) as f64).collect();
    let mut idx: Vec<usize> = (0..z.len()).filter(|&i| z[i] > f64::NEG_INFINITY).collect();
    idx.sort_by(|a, b| z[*b].total_cmp(&z[*a]));
    if top_k > 0 && top_k < idx.len() {
        let kth = z[idx[top_k - 1]];
        idx.retain(|&i| z[i] >= kth);
    }
    let max = z[idx[0]];
    let e: Vec<f64> = idx.iter().map(|&i| (z[i] - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut kept: Vec<(usize, f64)> = Vec::new();
    let mut above = 0.0;
    for (&i, e) in idx.iter().zip(&e) {
        // Past top_p, only ties with the last kept token's value (kept whole: transformers'
        // unstable sort keeps an arbitrary part of a tie group, this library all of it).
        let tie = kept.last().is_some_and(|&(j, _)| z[j] == z[i]);
        if above >= top_p && !kept.is_empty() && !tie {
            break;
        }
        kept.push((i, e / sum));
        above += e / sum;
    }
    let s: f64 = kept.iter().map(|k| k.1).sum();
    let mut kept: Vec<(usize, f64)> = kept.into_iter().map(|(i, p)| (i, p / s)).collect();
    kept.sort_by_key(|k| k.0);
    kept
}

/// Where token `id` lies on the cumulative distribution of `kept` (vocabulary order):
/// `(mass before it, mass through it)`, or `None` when it is not kept. A draw at uniform `u`
/// is right when `u` falls inside that span.
pub fn span(kept: &[(usize, f64)], id: usize) -> Option<(f64, f64)> {
    let at = kept.iter().position(|k| k.0 == id)?;
    let before: f64 = kept[..at].iter().map(|k| k.1).sum();
    Some((before, before + kept[at].1))
}
