//! Which GEMMs causal attention in row blocks runs ([`causal_attention`](mod@crate::causal_attention)): pure index
//! arithmetic, so that a CPU test can run the plan and compare it with dense attention.
//!
//! One group (a KV head of one sequence) has `s` positions, `rep` query heads per KV head and
//! head size `d`: `Q`, `Out`, `dOut`, `dQ` are `[m, d]` with `m = s * rep` rows position-major
//! (row `i * rep + h`), `K`, `V`, `dK`, `dV` are `[s, d]`, and the probabilities `P` and the
//! score gradient `G` (`dP`, then `dS` in place) are `[m, s]`. The positions are cut into
//! blocks of `block`; row block `b` (rows `b * block * rep..`) sees keys `..(b + 1) * block` at
//! most (causality), so only that part of its scores is computed, and for key block `b` only
//! the rows from row block `b` on have scores:
//! - forward: `P[Rb, ..kb] = scale Q[Rb] K[..kb]^T`, the softmax, `Out[Rb] = P[Rb, ..kb] V[..kb]`;
//! - backward: `dV[Kb] = P[R>=b, Kb]^T dOut[R>=b]`, `G[Rb, ..kb] = dOut[Rb] V[..kb]^T`, the
//!   softmax's backward, `dQ[Rb] = G[Rb, ..kb] K[..kb]`, `dK[Kb] = G[R>=b, Kb]^T Q[R>=b]`.
//!
//! Each output row is written by exactly one GEMM (no accumulation: one rounding, as the dense
//! GEMMs), and no GEMM reads a score that was not computed. With `b` blocks the scores cost
//! `(b + 1) / 2b` of the dense ones (3/4 at two blocks).

/// A buffer of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    /// Queries `[m, d]`.
    Q,
    /// Keys `[s, d]`.
    K,
    /// Values `[s, d]`.
    V,
    /// Probabilities `[m, s]` (scaled scores before the softmax).
    P,
    /// Score gradient `[m, s]`: `dP`, then `dS` after the softmax's backward.
    G,
    /// Output `[m, d]`.
    Out,
    /// Output gradient `[m, d]`.
    DOut,
    /// Query gradient `[m, d]`.
    DQ,
    /// Key gradient `[s, d]`.
    DK,
    /// Value gradient `[s, d]`.
    DV,
}

/// Rows `row0..row0 + rows` and columns `col0..col0 + cols` of one group's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// The buffer.
    pub buf: Buf,
    /// First row.
    pub row0: usize,
    /// Rows.
    pub rows: usize,
    /// First column.
    pub col0: usize,
    /// Columns.
    pub cols: usize,
}

/// `out = alpha op(a) op(b)` in every group (`op` a transpose where `ta` / `tb`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Left operand as stored.
    pub a: View,
    /// Use `a` transposed.
    pub ta: bool,
    /// Right operand as stored.
    pub b: View,
    /// Use `b` transposed.
    pub tb: bool,
    /// Output.
    pub out: View,
    /// Scale of the product.
    pub alpha: f32,
}

/// The row blocks of one shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Positions (= keys).
    pub s: usize,
    /// Query rows per position.
    pub rep: usize,
    /// Head size.
    pub d: usize,
    /// Positions per block (the last block may be shorter).
    pub block: usize,
}

impl Plan {
    /// `blocks` blocks (at least one) of a multiple of 8 positions each where `s` allows (so
    /// that a block's keys are whole vectors of the softmax's widest loads).
    pub fn new(s: usize, rep: usize, d: usize, blocks: usize) -> Self {
        let block = s.div_ceil(blocks.max(1)).next_multiple_of(8).min(s).max(1);
        Plan { s, rep, d, block }
    }

    /// Blocks.
    pub fn blocks(&self) -> usize {
        self.s.div_ceil(self.block)
    }

    /// Rows of each group (`s * rep`).
    pub fn m(&self) -> usize {
        self.s * self.rep
    }

    /// `(first position, positions)` of block `b`.
    fn span(&self, b: usize) -> (usize, usize) {
        let p0 = b * self.block;
        (p0, self.block.min(self.s - p0))
    }

    /// Rows of row block `b` (all query heads of its positions).
    fn rows(&self, buf: Buf, b: usize, cols: usize) -> View {
        let (p0, n) = self.span(b);
        view(buf, p0 * self.rep, n * self.rep, 0, cols)
    }

    /// Rows from row block `b` to the end.
    fn rows_from(&self, buf: Buf, b: usize, col0: usize, cols: usize) -> View {
        let r0 = self.span(b).0 * self.rep;
        view(buf, r0, self.m() - r0, col0, cols)
    }

    /// Keys `..end of block b` of a `[s, d]` buffer.
    fn keys_to(&self, buf: Buf, b: usize) -> View {
        let (p0, n) = self.span(b);
        view(buf, 0, p0 + n, 0, self.d)
    }

    /// Key block `b` of a `[s, d]` buffer.
    fn key_block(&self, buf: Buf, b: usize) -> View {
        let (p0, n) = self.span(b);
        view(buf, p0, n, 0, self.d)
    }

    /// The computed scores of row block `b`: its rows, keys `..end of block b`.
    fn scores(&self, buf: Buf, b: usize) -> View {
        let (p0, n) = self.span(b);
        let mut v = self.rows(buf, b, 0);
        v.cols = p0 + n;
        v
    }

    /// Key block `b`'s columns of the rows from row block `b` on.
    fn score_columns(&self, buf: Buf, b: usize) -> View {
        let (p0, n) = self.span(b);
        self.rows_from(buf, b, p0, n)
    }

    /// `P[Rb, ..kb] = scale Q[Rb] K[..kb]^T`.
    pub fn scores_forward(&self, scale: f32) -> Vec<Gemm> {
        (0..self.blocks())
            .map(|b| Gemm {
                a: self.rows(Buf::Q, b, self.d),
                ta: false,
                b: self.keys_to(Buf::K, b),
                tb: true,
                out: self.scores(Buf::P, b),
                alpha: scale,
            })
            .collect()
    }

    /// `Out[Rb] = P[Rb, ..kb] V[..kb]`.
    pub fn output(&self) -> Vec<Gemm> {
        (0..self.blocks())
            .map(|b| Gemm {
                a: self.scores(Buf::P, b),
                ta: false,
                b: self.keys_to(Buf::V, b),
                tb: false,
                out: self.rows(Buf::Out, b, self.d),
                alpha: 1.0,
            })
            .collect()
    }

    /// `dV[Kb] = P[R>=b, Kb]^T dOut[R>=b]`, then `G[Rb, ..kb] = dOut[Rb] V[..kb]^T` (both read
    /// the probabilities and the output gradient, before the softmax's backward).
    pub fn value_and_prob_grads(&self) -> Vec<Gemm> {
        let dv = (0..self.blocks()).map(|b| Gemm {
            a: self.score_columns(Buf::P, b),
            ta: true,
            b: self.rows_from(Buf::DOut, b, 0, self.d),
            tb: false,
            out: self.key_block(Buf::DV, b),
            alpha: 1.0,
        });
        let dp = (0..self.blocks()).map(|b| Gemm {
            a: self.rows(Buf::DOut, b, self.d),
            ta: false,
            b: self.keys_to(Buf::V, b),
            tb: true,
            out: self.scores(Buf::G, b),
            alpha: 1.0,
        });
        dv.chain(dp).collect()
    }

    /// `dQ[Rb] = G[Rb, ..kb] K[..kb]` and `dK[Kb] = G[R>=b, Kb]^T Q[R>=b]` (after the softmax's
    /// backward).
    pub fn query_and_key_grads(&self) -> Vec<Gemm> {
        let dq = (0..self.blocks()).map(|b| Gemm {
            a: self.scores(Buf::G, b),
            ta: false,
            b: self.keys_to(Buf::K, b),
            tb: false,
            out: self.rows(Buf::DQ, b, self.d),
            alpha: 1.0,
        });
        let dk = (0..self.blocks()).map(|b| Gemm {
            a: self.score_columns(Buf::G, b),
            ta: true,
            b: self.rows_from(Buf::Q, b, 0, self.d),
            tb: false,
            out: self.key_block(Buf::DK, b),
            alpha: 1.0,
        });
        dq.chain(dk).collect()
    }

    /// The keys row `r` of a group has scores for: its block's end.
    pub fn row_keys(&self, r: usize) -> usize {
        let b = r / self.rep / self.block;
        let (p0, n) = self.span(b);
        p0 + n
    }

    /// `[rows, cols]` of a buffer of one group.
    pub fn dims(&self, buf: Buf) -> [usize; 2] {
        match buf {
            Buf::Q | Buf::Out | Buf::DOut | Buf::DQ => [self.m(), self.d],
            Buf::K | Buf::V | Buf::DK | Buf::DV => [self.s, self.d],
            Buf::P | Buf::G => [self.m(), self.s],
        }
    }
}

fn view(buf: Buf, row0: usize, rows: usize, col0: usize, cols: usize) -> View {
    View {
        buf,
        row0,
        rows,
        col0,
        cols,
    }
}

#[cfg(test)]
mod tests {
    use super::{Buf, Gemm, Plan, View};
    use std::collections::HashMap;

    /// One group's buffers in f64, every element NaN until written (a read of a score the plan
    /// never computed spoils the result).
    struct Bufs {
        plan: Plan,
        data: HashMap<Buf, Vec<f64>>,
    }

    impl Bufs {
        fn new(plan: Plan) -> Self {
            let all = [
                Buf::Q,
                Buf::K,
                Buf::V,
                Buf::P,
                Buf::G,
                Buf::Out,
                Buf::DOut,
                Buf::DQ,
                Buf::DK,
                Buf::DV,
            ];
            let data = all
                .into_iter()
                .map(|b| {
                    let [r, c] = plan.dims(b);
                    (b, vec![f64::NAN; r * c])
                })
                .collect();
            Bufs { plan, data }
        }

        fn at(&self, v: &View, i: usize, j: usize, trans: bool) -> f64 {
            let (i, j) = if trans { (j, i) } else { (i, j) };
            assert!(i < v.rows && j < v.cols, "{v:?} read at {i}, {j}");
            let cols = self.plan.dims(v.buf)[1];
            self.data[&v.buf][(v.row0 + i) * cols + v.col0 + j]
        }

        /// Runs `g`, checking the shapes agree and the views lie inside their buffers.
        fn gemm(&mut self, g: &Gemm, written: &mut HashMap<Buf, Vec<u32>>) {
            let (m, k) = if g.ta {
                (g.a.cols, g.a.rows)
            } else {
                (g.a.rows, g.a.cols)
            };
            let (kb, n) = if g.tb {
                (g.b.cols, g.b.rows)
            } else {
                (g.b.rows, g.b.cols)
            };
            assert_eq!(k, kb, "{g:?}: inner dimensions");
            assert_eq!((g.out.rows, g.out.cols), (m, n), "{g:?}: output shape");
            for v in [&g.a, &g.b, &g.out] {
                let [r, c] = self.plan.dims(v.buf);
                assert!(
                    v.row0 + v.rows <= r && v.col0 + v.cols <= c,
                    "{v:?} outside"
                );
            }
            let cols = self.plan.dims(g.out.buf)[1];
            let mut out = Vec::with_capacity(m * n);
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k)
                        .map(|l| self.at(&g.a, i, l, g.ta) * self.at(&g.b, l, j, g.tb))
                        .sum();
                    out.push(g.alpha as f64 * s);
                }
            }
            let w = written.entry(g.out.buf).or_insert_with(|| {
                let [r, c] = self.plan.dims(g.out.buf);
                vec![0; r * c]
            });
            let dst = self.data.get_mut(&g.out.buf).expect("buffer");
            for i in 0..m {
                for j in 0..n {
                    let at = (g.out.row0 + i) * cols + g.out.col0 + j;
                    dst[at] = out[i * n + j];
                    w[at] += 1;
                }
            }
        }
    }

    /// Deterministic values in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    /// The additive mask of one sequence: causal, plus the first `pad` keys hidden from every
    /// position after them (left padding; positions `< pad` see themselves only, so that no row
    /// is fully masked).
    fn visible(i: usize, j: usize, pad: usize) -> bool {
        j <= i && (j >= pad || j == i)
    }

    /// Dense attention of one group in f64 (every key, masked ones at `exp(-inf) = 0`):
    /// `(out, dq, dk, dv)`.
    fn dense(
        p: &Plan,
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dout: &[f64],
        scale: f64,
        pad: usize,
    ) -> [Vec<f64>; 4] {
        let (m, s, d) = (p.m(), p.s, p.d);
        let mut out = vec![0.0; m * d];
        let mut dq = vec![0.0; m * d];
        let mut dk = vec![0.0; s * d];
        let mut dv = vec![0.0; s * d];
        for r in 0..m {
            let i = r / p.rep;
            let sc: Vec<f64> = (0..s)
                .map(|j| {
                    if visible(i, j, pad) {
                        scale * (0..d).map(|l| q[r * d + l] * k[j * d + l]).sum::<f64>()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            let pr: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
            let dp: Vec<f64> = (0..s)
                .map(|j| (0..d).map(|l| dout[r * d + l] * v[j * d + l]).sum())
                .collect();
            let dot: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..s {
                let ds = scale * pr[j] * (dp[j] - dot);
                for l in 0..d {
                    out[r * d + l] += pr[j] * v[j * d + l];
                    dv[j * d + l] += pr[j] * dout[r * d + l];
                    dq[r * d + l] += ds * k[j * d + l];
                    dk[j * d + l] += ds * q[r * d + l];
                }
            }
        }
        [out, dq, dk, dv]
    }

    /// Runs the plan of `(s, rep, d, blocks)` with the softmax on each row's computed keys and
    /// compares every output with dense attention; every output element written exactly once.
    fn check(s: usize, rep: usize, d: usize, blocks: usize, pad: usize) {
        let plan = Plan::new(s, rep, d, blocks);
        // A scale f32 holds exactly, as the GEMMs take it.
        let scale = (1.0 / (d as f64).sqrt()) as f32 as f64;
        let mut b = Bufs::new(plan);
        let m = plan.m();
        for (buf, seed) in [(Buf::Q, 1), (Buf::K, 2), (Buf::V, 3), (Buf::DOut, 4)] {
            let [r, c] = plan.dims(buf);
            b.data.insert(buf, values(r * c, seed));
        }
        let want = dense(
            &plan,
            &b.data[&Buf::Q],
            &b.data[&Buf::K],
            &b.data[&Buf::V],
            &b.data[&Buf::DOut],
            scale,
            pad,
        );
        let mut written = HashMap::new();
        for g in plan.scores_forward(scale as f32) {
            b.gemm(&g, &mut written);
        }
        // The softmax on each row's keys (as the kernel: the mask added, the rest untouched).
        let p = b.data.get_mut(&Buf::P).expect("P");
        for r in 0..m {
            let (i, len) = (r / rep, plan.row_keys(r));
            let row = &mut p[r * s..r * s + len];
            let x: Vec<f64> = (0..len)
                .map(|j| row[j] + if visible(i, j, pad) { 0.0 } else { -1e9 })
                .collect();
            assert!(
                x.iter().all(|v| v.is_finite()),
                "row {r}: an unwritten score"
            );
            let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = x.iter().map(|v| (v - mx).exp()).sum();
            for j in 0..len {
                row[j] = (x[j] - mx).exp() / z;
            }
        }
        for g in plan.output() {
            b.gemm(&g, &mut written);
        }
        for g in plan.value_and_prob_grads() {
            b.gemm(&g, &mut written);
        }
        let (pp, gg) = (b.data[&Buf::P].clone(), b.data.get_mut(&Buf::G).expect("G"));
        for r in 0..m {
            let len = plan.row_keys(r);
            let dot: f64 = (0..len).map(|j| pp[r * s + j] * gg[r * s + j]).sum();
            for j in 0..len {
                gg[r * s + j] = scale * pp[r * s + j] * (gg[r * s + j] - dot);
            }
        }
        for g in plan.query_and_key_grads() {
            b.gemm(&g, &mut written);
        }
        let what = format!("s {s} rep {rep} d {d} blocks {blocks} pad {pad}");
        for (buf, want) in [Buf::Out, Buf::DQ, Buf::DK, Buf::DV].into_iter().zip(&want) {
            let got = &b.data[&buf];
            assert!(
                written[&buf].iter().all(|n| *n == 1),
                "{what}: {buf:?} not written exactly once everywhere"
            );
            for (e, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12,
                    "{what}: {buf:?}[{e}] = {g}, want {w}"
                );
            }
        }
    }

    #[test]
    fn the_row_blocks_give_dense_causal_attention_and_its_gradients() {
        // One block (dense), two and three blocks of 8, GQA and none, a short last block,
        // left padding.
        check(16, 2, 4, 1, 0);
        check(16, 2, 4, 2, 0);
        check(24, 3, 3, 3, 2);
        check(20, 1, 5, 2, 3);
        check(19, 4, 2, 3, 0);
        // More blocks than multiples of 8 allow: blocks of 8.
        check(16, 2, 2, 5, 1);
        // Shorter than a vector: one block of all positions.
        check(5, 2, 3, 2, 1);
    }

    #[test]
    fn blocks_are_whole_vectors_and_cover_the_positions() {
        let p = Plan::new(1024, 4, 128, 2);
        assert_eq!((p.block, p.blocks()), (512, 2));
        let p = Plan::new(1024, 4, 128, 3);
        assert_eq!((p.block, p.blocks()), (344, 3));
        assert_eq!(p.row_keys(0), 344);
        assert_eq!(p.row_keys(344 * 4), 688);
        assert_eq!(p.row_keys(1024 * 4 - 1), 1024);
        let p = Plan::new(100, 1, 8, 0);
        assert_eq!((p.block, p.blocks()), (100, 1));
        // Scores computed at two blocks: 3/4 of the dense ones.
        let p = Plan::new(1024, 4, 128, 2);
        let cells: usize = p
            .scores_forward(1.0)
            .iter()
            .map(|g| g.out.rows * g.out.cols)
            .sum();
        assert_eq!(cells * 4, p.m() * p.s * 3);
    }
}
