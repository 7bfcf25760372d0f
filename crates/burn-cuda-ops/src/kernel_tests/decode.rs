//! The decode-step attention kernels ([`crate::attention_decode`]: runs of keys, then their
//! combine): `softmax(scale q k^T + mask) v` for a few query rows per KV group, against the same attention computed in f64 over only the
//! keys each query row may see.
//!
//! The cases cover batch > 1, several KV heads with GQA groups of 1 to 8 query heads (the rows
//! of a group are its `rep` heads times the new tokens, as the llama attention folds them), one
//! and two new tokens (causal among themselves), per-sequence masks (`[batch, 1, s, t]`, with
//! left padding) and one mask broadcast over the batch (`[1, 1, s, t]`), a cache capacity `t`
//! that is not a multiple of the 8 planes nor of the kernel's 64-key run (and several runs),
//! fewer keys than planes, and every vector width. The cache's unfilled tail (from each
//! sequence's length on) holds garbage that must not reach the result: `1e30` in K and V under
//! a `-inf` mask, and under the llama's finite mask (`-1e9`, `llama::attention::MASKED`) `1e30`
//! in V and keys up to `1e4` in K (the llama's cache holds zeros there: an additive finite mask
//! cannot hide keys whose scores come near it, on this path as on the GEMM one).
//!
//! **The plane width.** The kernel takes its plane (warp) width from `CUBE_DIM_X`: each of the
//! `CUBE_DIM_X` units of a plane owns one vector of `d / CUBE_DIM_X` elements of a row, and the
//! dot products and row statistics are plane sums and maxima. The host launches `[32 x 8]`
//! cubes for NVIDIA's 32-wide warps, so `d = 32 x vector`; lavapipe's subgroups are 8 wide
//! (its SIMD width on AVX2), where a 32-wide "plane" would be four subgroups and the plane sums
//! partial. So these tests launch `[plane x 8]` cubes with the device's plane width and
//! `d = plane x vector`: the same kernel code and vector widths 1, 2, 4, 8 (with lavapipe's 8,
//! head sizes 8 to 64). Lavapipe's 32 KiB of shared memory (48 KiB on CUDA) bounds the rows
//! per group at the widest vectors: the kernel sizes its partial rows for 32 lanes whatever the
//! plane width.

use cubecl::prelude::*;

use super::{assert_close, client, f32_type, input, launch_in, output, read_output, values};
use super::{Rt, MODES};
use crate::attention_decode::{decode_combine_kernel, decode_split_kernel, CHUNK, MAX_ROWS};
use crate::cube_util::grid;

/// Planes per cube, as the host launches (`attention_decode::WARPS`).
const WARPS: u32 = 8;
/// The lanes the kernel's partial-row shared memory is sized for (`attention_decode::PLANE`).
const KERNEL_PLANE: usize = 32;
/// What the unfilled tail of the cache holds in V (and in K under a `-inf` mask).
const GARBAGE: f32 = 1.0e30;
/// The llama's additive mask value (`llama::attention::MASKED`).
const MASKED: f32 = -1.0e9;

/// One launch: `batch` sequences of `nkv` KV heads with `rep` query heads each and `s` new
/// tokens, over a cache of capacity `t` whose sequence `b` holds `lens[b]` positions (the new
/// tokens last) after `pads[b]` positions of left padding.
struct Case {
    batch: usize,
    nkv: usize,
    rep: usize,
    s: usize,
    /// Vector width: head size `plane x vector`.
    vector: usize,
    t: usize,
    lens: Vec<usize>,
    pads: Vec<usize>,
    /// One mask row set per sequence (`[batch, 1, s, t]`), else one for all (`[1, 1, s, t]`:
    /// then every sequence has the same length and padding).
    per_sequence: bool,
    /// The mask's value on hidden keys: `-inf` or [`MASKED`].
    hidden: f32,
    /// NaNs between the mask's rows (its row stride `t + mask_gap`), as Burn pitches rows of
    /// odd widths: a read outside the row spoils the result.
    mask_gap: usize,
}

impl Case {
    /// Whether query `si` of sequence `b` sees key `j`: past the padding, up to its position.
    fn sees(&self, b: usize, si: usize, j: usize) -> bool {
        let past = self.lens[b] - self.s;
        j >= self.pads[b] && j <= past + si
    }

    fn run(&self, client: &ComputeClient<Rt>, plane: usize) {
        let Case {
            batch,
            nkv,
            rep,
            s,
            vector,
            t,
            ..
        } = *self;
        let d = plane * vector;
        let (g, m) = (batch * nkv, rep * s);
        let mb = if self.per_sequence { batch } else { 1 };
        assert!(m <= MAX_ROWS && (1..=t).contains(&self.lens.iter().copied().max().unwrap()));
        if !self.per_sequence {
            assert!(self.lens.iter().all(|&l| l == self.lens[0]));
            assert!(self.pads.iter().all(|&p| p == self.pads[0]));
        }
        // The host's shared memory (`plan`): a run's scores and the planes' partial rows.
        let shared = 4 * (m * CHUNK + m + WARPS as usize * m * KERNEL_PLANE * vector);
        let limit = client.properties().hardware.max_shared_memory_size;
        assert!(
            shared <= limit,
            "case needs {shared} bytes of shared memory, the device has {limit}"
        );

        // q [g, m, d]; k, v [g, t, d] with the tail past each sequence's length garbage.
        let q = values(g * m * d, (t * 31 + d) as u64, 1.0);
        let mut k = values(g * t * d, (t * 31 + d + 1) as u64, 1.0);
        let mut v = values(g * t * d, (t * 31 + d + 2) as u64, 1.0);
        let k_tail = if self.hidden == f32::NEG_INFINITY {
            vec![GARBAGE; g * t * d]
        } else {
            values(g * t * d, 77, 1.0e4)
        };
        for gi in 0..g {
            let b = gi / nkv;
            for j in self.lens[b]..t {
                for e in 0..d {
                    let at = (gi * t + j) * d + e;
                    k[at] = k_tail[at];
                    v[at] = GARBAGE;
                }
            }
        }
        // mask [mb, 1, s, t] with rows `tp` apart: 0 where seen, `hidden` elsewhere, NaN between.
        let tp = t + self.mask_gap;
        let mut mask = vec![f32::NAN; mb * s * tp];
        for b in 0..mb {
            for si in 0..s {
                for j in 0..t {
                    let seen = self.sees(b, si, j);
                    mask[(b * s + si) * tp + j] = if seen { 0.0 } else { self.hidden };
                }
            }
        }

        // The reference: softmax over the seen keys only (the tail never read).
        let scale = 1.0 / (d as f64).sqrt();
        let mut want = vec![0.0f64; g * m * d];
        for b in 0..batch {
            for h in 0..nkv * rep {
                let gi = b * nkv + h / rep;
                for si in 0..s {
                    let r = (h % rep) * s + si;
                    let qrow = &q[(gi * m + r) * d..][..d];
                    let seen: Vec<usize> = (0..t).filter(|&j| self.sees(b, si, j)).collect();
                    let scores: Vec<f64> = seen
                        .iter()
                        .map(|&j| {
                            let krow = &k[(gi * t + j) * d..][..d];
                            let dot: f64 = (0..d).map(|e| qrow[e] as f64 * krow[e] as f64).sum();
                            dot * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    let out = &mut want[(gi * m + r) * d..][..d];
                    for (&j, p) in seen.iter().zip(&exps) {
                        for e in 0..d {
                            out[e] += p / sum * v[(gi * t + j) * d + e] as f64;
                        }
                    }
                }
            }
        }

        let (qb, kb, vb, maskb) = (
            input(client, &q),
            input(client, &k),
            input(client, &v),
            input(client, &mask),
        );
        let splits = t.div_ceil(CHUNK);
        for mode in MODES {
            let part = output(client, g * splits * m * d);
            let stats = output(client, g * splits * 2 * m);
            let out = output(client, g * m * d);
            launch_in!(
                mode,
                decode_split_kernel::<Rt>(
                    client,
                    grid(g * splits),
                    CubeDim::new_2d(plane as u32, WARPS),
                    vector,
                    qb.arg(&[g, m, d]),
                    kb.arg(&[g, t, d]),
                    vb.arg(&[g, t, d]),
                    maskb.arg_strided(&[mb, 1, s, t], &[s * tp, s * tp, tp, 1]),
                    part.arg(&[g, splits, m, d]),
                    stats.arg(&[g, splits, 2, m]),
                    g as u32,
                    t as u32,
                    s as u32,
                    (g * m / mb) as u32,
                    scale as f32,
                    m,
                    CHUNK,
                    f32_type(),
                )
            );
            launch_in!(
                mode,
                decode_combine_kernel::<Rt>(
                    client,
                    grid((g * m).div_ceil(4)),
                    CubeDim::new_2d(plane as u32, 4),
                    vector,
                    part.arg(&[g, splits, m, d]),
                    stats.arg(&[g, splits, 2, m]),
                    out.arg(&[g, m, d]),
                    (g * m) as u32,
                    splits as u32,
                    m,
                    f32_type(),
                )
            );
            let what = format!(
                "decode attention b{batch} kv{nkv} rep{rep} s{s} d{d} (width {vector}) t{t} \
                 lens {:?} pads {:?} mask {} {:?} gap {} {mode:?}",
                self.lens,
                self.pads,
                if self.per_sequence {
                    "per sequence"
                } else {
                    "broadcast"
                },
                self.hidden,
                self.mask_gap
            );
            let got = read_output(client, &out, &what);
            assert_close(&got, &want, 1e-5, 1e-4, &what);
        }
    }
}

/// The device's plane (subgroup) width, which the tests launch with (see the module doc).
fn plane_width(client: &ComputeClient<Rt>) -> usize {
    let hw = &client.properties().hardware;
    assert_eq!(
        hw.plane_size_min, hw.plane_size_max,
        "the kernel needs one known plane width"
    );
    let plane = hw.plane_size_max as usize;
    assert!(
        (1..=KERNEL_PLANE).contains(&plane),
        "plane width {plane}: the kernel's shared memory holds partial rows of 32 lanes"
    );
    plane
}

#[test]
fn decode_attention_matches_softmax_over_the_filled_prefix() {
    let client = client();
    let plane = plane_width(&client);
    let cases = [
        // Head size 64 at lavapipe's plane of 8 (width 8): two sequences of different lengths,
        // one left-padded, 2 KV heads of 3 query heads each; K and V tails 1e30 under -inf.
        Case {
            batch: 2,
            nkv: 2,
            rep: 3,
            s: 1,
            vector: 8,
            t: 200,
            lens: vec![150, 77],
            pads: vec![0, 5],
            per_sequence: true,
            hidden: f32::NEG_INFINITY,
            mask_gap: 24,
        },
        // Width 4: two new tokens (causal between them), three sequences, one full cache; the
        // llama's finite mask.
        Case {
            batch: 3,
            nkv: 2,
            rep: 2,
            s: 2,
            vector: 4,
            t: 130,
            lens: vec![130, 61, 100],
            pads: vec![0, 0, 3],
            per_sequence: true,
            hidden: MASKED,
            mask_gap: 10,
        },
        // Width 2: the most rows per group (8 query heads per KV head), one mask for the batch.
        Case {
            batch: 2,
            nkv: 3,
            rep: 8,
            s: 1,
            vector: 2,
            t: 97,
            lens: vec![50, 50],
            pads: vec![2, 2],
            per_sequence: false,
            hidden: MASKED,
            mask_gap: 7,
        },
        // Width 1: five runs of keys (the last one partial), 8 rows of 4 heads x 2 tokens.
        Case {
            batch: 2,
            nkv: 1,
            rep: 4,
            s: 2,
            vector: 1,
            t: 300,
            lens: vec![300, 257],
            pads: vec![0, 1],
            per_sequence: true,
            hidden: f32::NEG_INFINITY,
            mask_gap: 0,
        },
        // Fewer keys than planes, no GQA (one query head per KV head).
        Case {
            batch: 1,
            nkv: 2,
            rep: 1,
            s: 1,
            vector: 8,
            t: 5,
            lens: vec![3],
            pads: vec![0],
            per_sequence: true,
            hidden: f32::NEG_INFINITY,
            mask_gap: 0,
        },
        // Left padding over two whole runs of 64 keys: runs whose scores are all -inf (their
        // maximum floored, their sum 0) beside the runs that hold the sequence.
        Case {
            batch: 2,
            nkv: 2,
            rep: 4,
            s: 1,
            vector: 4,
            t: 256,
            lens: vec![200, 256],
            pads: vec![130, 3],
            per_sequence: true,
            hidden: f32::NEG_INFINITY,
            mask_gap: 5,
        },
        // The same under the llama's finite mask: the padded runs weigh exp(-1e9 - max) = 0.
        Case {
            batch: 2,
            nkv: 1,
            rep: 4,
            s: 1,
            vector: 2,
            t: 256,
            lens: vec![200, 190],
            pads: vec![130, 70],
            per_sequence: true,
            hidden: MASKED,
            mask_gap: 0,
        },
        // One key in all.
        Case {
            batch: 2,
            nkv: 1,
            rep: 2,
            s: 1,
            vector: 4,
            t: 1,
            lens: vec![1, 1],
            pads: vec![0, 0],
            per_sequence: true,
            hidden: MASKED,
            mask_gap: 0,
        },
    ];
    for case in &cases {
        case.run(&client, plane);
    }
}
