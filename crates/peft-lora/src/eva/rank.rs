//! EVA's rank budget: PEFT's `_get_rank_distribution`, and the equality test that lets layers
//! with identical inputs share one SVD.

use std::collections::{BTreeMap, HashMap};

use faer::Mat;

use super::Hook;

/// Exact equality of two captured inputs.
pub(super) fn same(a: &Mat<f32>, b: &Mat<f32>) -> bool {
    a.nrows() == b.nrows()
        && a.ncols() == b.ncols()
        && (0..a.nrows())
            .all(|i| (0..a.ncols()).all(|j| a[(i, j)].to_bits() == b[(i, j)].to_bits()))
}

/// PEFT's `_get_rank_distribution`: every layer's explained-variance ratios, sorted globally;
/// the top `budget` decide the ranks; a hook layer keeps the largest rank of its group.
pub(super) fn rank_distribution(
    hooks: &BTreeMap<String, Hook>,
    layer_hook: &[(String, String)],
    equal: &[(String, String)],
    budget: usize,
    max_components: &HashMap<String, usize>,
) -> HashMap<String, usize> {
    let mut entries: Vec<(usize, f32)> = Vec::new();
    for (i, (_, hook)) in layer_hook.iter().enumerate() {
        let evr = &hooks[hook].pca.explained_variance_ratio;
        for v in evr.iter().take(max_components[hook]) {
            entries.push((i, *v));
        }
    }
    // Stable: ties keep PEFT's enumeration order.
    entries.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut counts: HashMap<String, usize> =
        layer_hook.iter().map(|(l, _)| (l.clone(), 0)).collect();
    for (i, _) in entries.iter().take(budget) {
        *counts.get_mut(&layer_hook[*i].0).expect("layer") += 1;
    }
    for (k, k_hook) in equal {
        let (rank, rank_hook) = (counts[k], counts[k_hook]);
        if rank_hook >= rank {
            continue;
        }
        counts.insert(k_hook.clone(), rank);
        counts.insert(k.clone(), rank_hook);
    }
    counts
}
