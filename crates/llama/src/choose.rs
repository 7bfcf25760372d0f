//! Choosing the next token on the device: greedy (argmax) or a draw after transformers' logits
//! processors (temperature, then top-k, then top-p), with stop ids suppressed for rows that have
//! not reached `min_new_tokens`. Only the chosen ids leave the device.
//!
//! With CUDA the whole choice is one kernel (`burn_cuda_ops::sample_rows`, behind its switch);
//! the composed path below is what other backends run, and it is the kernel's reference.
//!
//! Nothing here sorts (burn 0.21 sorts on the host) or scans (its cumulative sum is quadratic in
//! the row length on CUDA): top-k and top-p find their threshold by bisection on the value, each
//! step a comparison and a row sum over `[batch, vocab]`, and the draw inverts the CDF of the
//! kept tokens (in vocabulary order) at one uniform number per row, by bisection on the index.
//! The uniforms come from the host's seeded generator, so a seed gives the same tokens whatever
//! else uses the backend's random generator. A token tied with the threshold value is kept, as
//! transformers' top-k keeps it.
//!
//! Sampling runs in f32 whatever the model's dtype: every tensor it makes is created in f32 (a
//! tensor made without a dtype takes the device's default, bf16 for a bf16 model, whose bisection
//! brackets and probability masses are too coarse), and the draw bisects on integer indices.

use burn::tensor::{
    activation, backend::Backend, Bool, DType, FloatDType, Int, Tensor, TensorData,
};

use crate::gen_config::GenerationConfig;

/// Bisection steps: enough to bring a bracket of width 1e4 below the spacing of f32 values
/// near 1e-6 (2^-43 * 1e4 ~ 1e-9), so the threshold is the value itself, not a neighbour.
const BISECT_STEPS: usize = 44;

/// The next token of each row, `[batch]`, from `logits` `[batch, vocab]` (any float dtype).
///
/// `suppress[r]` marks the rows whose stop ids are excluded (their `min_new_tokens` not
/// reached). `uniform[r]` in `[0, 1)` is row `r`'s draw (sampling only).
pub(crate) fn choose<B: Backend>(
    logits: Tensor<B, 2>,
    cfg: &GenerationConfig,
    suppress: &[bool],
    uniform: &[f32],
) -> Tensor<B, 1, Int> {
    let [b, vocab] = logits.dims();
    let device = logits.device();
    // The model's dtype until sampling: greedy's argmax and the suppression's -inf are exact in
    // it (a cast of the whole `[batch, vocab]` logits would be one more pass each step).
    let mut z = logits;
    if suppress.iter().any(|s| *s) {
        let rows =
            Tensor::<B, 2, Bool>::from_data(TensorData::new(suppress.to_vec(), [b, 1]), &device);
        for &id in &cfg.stop_ids {
            let id = id as usize;
            if id < vocab {
                let col = z.clone().slice([0..b, id..id + 1]);
                let col = col.mask_fill(rows.clone(), f32::NEG_INFINITY);
                z = z.slice_assign([0..b, id..id + 1], col);
            }
        }
    }
    if !cfg.do_sample {
        return match crate::ops::argmax_rows(&z) {
            Some(ids) => ids,
            None => z.argmax(1).reshape([b]),
        };
    }
    let u = TensorData::new(uniform.to_vec(), [b]);
    let u = Tensor::<B, 1>::from_data(u, (&device, DType::F32));
    if let Some(ids) = crate::ops::sample_rows(&z, &u, cfg) {
        return ids;
    }
    let z = z.cast(FloatDType::F32);
    let z = filter(z / cfg.temperature, cfg.top_k, cfg.top_p);
    draw(activation::softmax(z, 1), u.reshape([b, 1])).reshape([b])
}

/// Per row of `p` `[batch, vocab]` (f32, zeros for dropped tokens), the token where the
/// cumulative mass in vocabulary order first exceeds `u * total`, `[batch, 1]`: a draw from
/// `p / total`. `u` `[batch, 1]` f32.
fn draw<B: Backend>(p: Tensor<B, 2>, u: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    let [b, vocab] = p.dims();
    let device = p.device();
    let index = Tensor::<B, 1, Int>::arange(0..vocab as i64, &device)
        .reshape([1, vocab])
        .expand([b, vocab]);
    // The mass of tokens 0..=j, one masked row sum (the same sum for every j, so a dropped
    // token, whose p is 0, never adds to it).
    let mass_to = |j: Tensor<B, 2, Int>| {
        let out = index.clone().greater(j.expand([b, vocab]));
        p.clone().mask_fill(out, 0.0).sum_dim(1)
    };
    let total = mass_to(Tensor::full([b, 1], vocab as i64, &device));
    let target = total * u.clamp(0.0, 1.0 - 1.0 / (1 << 20) as f64);
    // mass(0..=lo) <= target < mass(0..=hi); the answer is hi once they are adjacent.
    let mut lo = Tensor::<B, 2, Int>::full([b, 1], -1, &device);
    let mut hi = Tensor::<B, 2, Int>::full([b, 1], vocab as i64 - 1, &device);
    let steps = usize::BITS - vocab.leading_zeros();
    for _ in 0..steps {
        // lo < mid < hi while they are two or more apart (hi - lo > 0: no negative division).
        let mid = lo.clone() + (hi.clone() - lo.clone()).div_scalar(2);
        let below = mass_to(mid.clone()).lower_equal(target.clone());
        lo = lo.mask_where(below.clone(), mid.clone());
        hi = mid.mask_where(below, hi);
    }
    hi
}

/// `z` (f32, temperature applied) with the tokens outside top-k and top-p set to -inf.
pub(crate) fn filter<B: Backend>(z: Tensor<B, 2>, top_k: usize, top_p: f64) -> Tensor<B, 2> {
    let [_, vocab] = z.dims();
    let mut z = z;
    if top_k > 0 && top_k < vocab {
        let t = kth_largest(&z, top_k).expand(z.dims());
        z = z.clone().mask_fill(z.lower(t), f32::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let p = activation::softmax(z.clone(), 1);
        let t = mass_threshold(&p, top_p).expand(p.dims());
        z = z.mask_fill(p.lower(t), f32::NEG_INFINITY);
    }
    z
}

/// Per row, the `k`-th largest value of `z` `[batch, vocab]` (ties counted), `[batch, 1]`.
/// -inf entries count as absent.
fn kth_largest<B: Backend>(z: &Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let finite = z.clone().is_inf().bool_not();
    // Bracket: count(z >= lo) >= k (lo = the smallest finite value); count(z >= hi) < k.
    let lo = z
        .clone()
        .mask_fill(finite.clone().bool_not(), f32::INFINITY)
        .min_dim(1);
    let hi = z.clone().max_dim(1) + 1.0;
    bisect(lo, hi, |mid| {
        z.clone()
            .greater_equal(mid.expand(z.dims()))
            .int()
            .sum_dim(1)
            .greater_equal_elem(k as i64)
    })
}

/// Per row, the largest `t` with `sum(p where p >= t) >= top_p`, `[batch, 1]`: the tokens kept
/// are those whose higher-ranked tokens hold less than `top_p` of the mass (transformers'
/// top-p, ties at the threshold kept).
fn mass_threshold<B: Backend>(p: &Tensor<B, 2>, top_p: f64) -> Tensor<B, 2> {
    let [b, _] = p.dims();
    let lo = Tensor::<B, 2>::zeros([b, 1], (&p.device(), p.dtype()));
    let hi = p.clone().max_dim(1) * (1.0 + 1e-6) + 1e-30;
    bisect(lo, hi, |mid| {
        let above = p.clone().greater_equal(mid.expand(p.dims()));
        p.clone()
            .mask_fill(above.bool_not(), 0.0)
            .sum_dim(1)
            .greater_equal_elem(top_p)
    })
}

/// Shrinks the bracket `[lo, hi)` (`[batch, 1]` each) where `holds(t)` is true at `lo` and false
/// at `hi`; returns `lo`, the largest value found for which it holds.
fn bisect<B: Backend>(
    mut lo: Tensor<B, 2>,
    mut hi: Tensor<B, 2>,
    holds: impl Fn(Tensor<B, 2>) -> Tensor<B, 2, Bool>,
) -> Tensor<B, 2> {
    for _ in 0..BISECT_STEPS {
        let mid = (lo.clone() + hi.clone()) * 0.5;
        let ok = holds(mid.clone());
        lo = lo.mask_where(ok.clone(), mid.clone());
        hi = mid.mask_where(ok, hi);
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use rand::{Rng, SeedableRng};

    type B = NdArray<f32>;

    /// transformers' processors on the host, the reference (vocabulary order).
    fn reference(logits: &[f32], t: f32, top_k: usize, top_p: f64) -> Vec<(usize, f64)> {
        test_support::sampling::kept(logits, t, top_k, top_p)
    }

    fn rows(n: usize, vocab: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * vocab)
            .map(|_| rng.random::<f32>() * 8.0 - 4.0)
            .collect()
    }

    fn tensor(v: &[f32], b: usize, vocab: usize) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [b, vocab]), &Default::default())
    }

    #[test]
    fn kept_sets_equal_the_reference_processors() {
        let (b, vocab) = (6, 300);
        let logits = rows(b, vocab, 3);
        for (t, k, p) in [
            (1.0, 20, 1.0),
            (0.7, 0, 0.9),
            (1.3, 50, 0.5),
            (0.5, 7, 0.95),
            (1.0, 1, 1.0),
        ] {
            let z = filter(tensor(&logits, b, vocab) / t as f64, k, p);
            let z: Vec<f32> = z.into_data().into_vec().unwrap();
            for r in 0..b {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let want: Vec<usize> = reference(row, t, k, p).iter().map(|x| x.0).collect();
                let got: Vec<usize> = (0..vocab)
                    .filter(|&i| z[r * vocab + i] > f32::NEG_INFINITY)
                    .collect();
                assert_eq!(got, want, "row {r}, temperature {t}, top_k {k}, top_p {p}");
            }
        }
    }

    #[test]
    fn draws_follow_the_kept_distribution() {
        // One row repeated: each column of the batch is an independent draw.
        let vocab = 40;
        let row = rows(1, vocab, 11);
        let n = 40_000;
        let many: Vec<f32> = row.iter().cycle().take(n * vocab).copied().collect();
        let cfg = GenerationConfig {
            do_sample: true,
            temperature: 0.9,
            top_k: 12,
            top_p: 0.8,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let u: Vec<f32> = (0..n).map(|_| rng.random()).collect();
        let ids: Vec<i64> = choose(tensor(&many, n, vocab), &cfg, &vec![false; n], &u)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap();
        let want = reference(&row, 0.9, 12, 0.8);
        let mut count = vec![0usize; vocab];
        ids.iter().for_each(|&i| count[i as usize] += 1);
        for (i, c) in count.iter().enumerate() {
            let p = want.iter().find(|k| k.0 == i).map_or(0.0, |k| k.1);
            let f = *c as f64 / n as f64;
            // Five standard deviations of a binomial frequency.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (f - p).abs() <= 5.0 * sd + 1e-12,
                "token {i}: drawn {f:.4}, expected {p:.4}"
            );
        }
    }

    #[test]
    fn sampling_runs_in_f32_on_a_bf16_device() {
        // A bf16 model's device makes bf16 tensors by default, too coarse for the bisections
        // (on the GPU every draw came out as -1). Burn's Flex CPU backend with bf16 as its
        // default float: every tensor sampling makes must still be f32, so the draws equal
        // those of an f32 backend on the same (bf16-exact) logits.
        use burn::backend::flex::{Flex, FlexDevice};
        let device = FlexDevice;
        // (Once per process; the first call on this device locks the settings.)
        let _ = burn::tensor::set_default_dtypes::<Flex>(&device, DType::BF16, DType::I32);
        let (b, vocab) = (4, 300);
        let logits: Vec<f32> = rows(b, vocab, 9)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect();
        let cfg = GenerationConfig {
            do_sample: true,
            temperature: 0.6,
            top_k: 50,
            top_p: 0.9,
            ..Default::default()
        };
        let u = [0.05, 0.5, 0.9, 0.999];
        let f32_ids: Vec<i64> = choose(tensor(&logits, b, vocab), &cfg, &[false; 4], &u)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        let on_bf16 =
            Tensor::<Flex, 2>::from_data(TensorData::new(logits.clone(), [b, vocab]), &device);
        assert_eq!(
            on_bf16.dtype(),
            DType::BF16,
            "the Flex device's default float"
        );
        let bf16_ids: Vec<i64> = choose(on_bf16, &cfg, &[false; 4], &u)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(bf16_ids, f32_ids);
        for (r, id) in f32_ids.iter().enumerate() {
            let kept = reference(&logits[r * vocab..(r + 1) * vocab], 0.6, 50, 0.9);
            assert!(
                kept.iter().any(|k| k.0 as i64 == *id),
                "row {r}: {id} is not a kept token"
            );
        }
    }

    #[test]
    fn the_draw_is_the_token_whose_cumulative_mass_passes_u() {
        let p = tensor(&[0.0, 0.25, 0.0, 0.5, 0.25, 0.0], 1, 6);
        let at = |u: f32| -> i64 {
            let u = Tensor::from_data(TensorData::new(vec![u], [1, 1]), &Default::default());
            draw(p.clone(), u)
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>()
                .unwrap()[0]
        };
        assert_eq!(
            [at(0.0), at(0.24), at(0.26), at(0.74), at(0.76), at(1.0)],
            [1, 1, 3, 3, 4, 4]
        );
    }

    #[test]
    fn greedy_skips_suppressed_stop_ids_and_a_draw_reads_the_cdf() {
        let logits = tensor(&[0.0, 5.0, 4.0, 1.0, 0.0, 5.0, 4.0, 1.0], 2, 4);
        let cfg = GenerationConfig {
            stop_ids: vec![1, 9],
            ..Default::default()
        };
        let ids = |c: &GenerationConfig, s: &[bool], u: &[f32]| -> Vec<i64> {
            choose(logits.clone(), c, s, u)
                .into_data()
                .convert::<i64>()
                .into_vec()
                .unwrap()
        };
        assert_eq!(ids(&cfg, &[true, false], &[]), vec![2, 1]);
        // The draw inverts the CDF in vocabulary order: with top_k = 2 the kept tokens are 1
        // and 2 (p = 0.731, 0.269); u below 0.731 gives 1, above gives 2. Suppressed: only 2.
        let samp = GenerationConfig {
            do_sample: true,
            top_k: 2,
            ..cfg
        };
        assert_eq!(ids(&samp, &[false, false], &[0.7, 0.75]), vec![1, 2]);
        assert_eq!(ids(&samp, &[true, false], &[0.0, 0.0]), vec![2, 1]);
    }
}
