//! The optimizer kernels of [`crate::adamw`]: the AdamW update (`adamw_kernel`), its f32-master
//! form (`adamw_master_kernel`), and the on-device gradient-norm clipping of
//! `PEFT_LORA_DEVICE_CLIP` (`sum_squares_kernel`, then `grad_scale_kernel`).
//!
//! - AdamW, both kernels: every element against `torch.optim.AdamW`'s rule computed in f64
//!   (decoupled decay `p (1 - lr wd)`, then `lr m_hat / (sqrt(v_hat) + eps)` with bias-corrected
//!   moments, the gradient times the device's `scale[0]`), at sizes 1, 255, 257, 10,007 and
//!   300,000, for a first step from zero moments and a later one, and clip factors 1, 0.37 and
//!   0 (0 still decays the parameter and the moments); once at 65,535 x 256 + 257 elements,
//!   where `elem_grid` needs a second row of cubes. The master kernel's copy in the gradient's
//!   dtype (f32 here) equals its master exactly. A negative scale (a non-finite norm) leaves
//!   parameter and moments bit for bit as they were. No kernel writes to its inputs.
//! - `sum_squares_kernel`: every per-cube partial against the elements its grid-stride loop
//!   covers, with the host's cube count (`sums_of_squares`: 16 elements a thread, at most 1,024
//!   cubes; 4,198,401 elements reach the clamp, so threads take 17) and with fewer cubes than
//!   that (many strides a thread), several tensors into one partials buffer at their bases.
//! - `grad_scale_kernel`: the norm and clip factor (`max_norm / (norm + 1e-6)` above
//!   `max_norm`, else 1; no `max_norm` is +inf) over 1 to 1,000 partials (more than its 256
//!   threads: its strided loop), and -1 for a NaN or infinite norm.
//! - The host's chain end to end: several gradients' partials, `grad_scale_kernel`, then the
//!   update reading the factor from the device, clipping and not, against the host rule of
//!   `peft-lora`'s optimizer (global norm, `max / (norm + 1e-6)` when above).

use cubecl::prelude::*;

use super::{
    assert_close, client, f32_type, input, launch_in, output, read_in_place, read_output, values,
    Buf, Rt, MODES,
};
use crate::adamw::{
    adamw_kernel, adamw_master_kernel, adamw_master_many_kernel, grad_scale_kernel,
    sum_squares_kernel, sum_squares_many_kernel, AdamWStep, HyperLaunch,
};
use crate::cube_util::{elem_grid, THREADS};

/// Sizes of the elementwise updates: one element, either side of a cube, a prime, a large one.
const SIZES: [usize; 5] = [1, 255, 257, 10_007, 300_000];

/// The step's scalars as the kernels take them, built as `AdamWStep::hyper` builds them for
/// CUDA (`decay = 1 - lr * weight_decay` in f32).
fn hyper(s: &AdamWStep) -> HyperLaunch<Rt> {
    HyperLaunch::new(
        s.betas.0,
        s.betas.1,
        s.lr,
        1.0 - s.lr * s.weight_decay,
        s.eps,
        s.bias_corrections.0,
        s.bias_corrections.1,
    )
}

/// Step `t` (from 1) with PyTorch's default betas and eps, as `peft-lora`'s optimizer fills
/// `AdamWStep` (bias corrections `1 - beta^t` in f32).
fn step_at(t: i32, lr: f32, weight_decay: f32) -> AdamWStep {
    let betas = (0.9f32, 0.999f32);
    AdamWStep {
        betas,
        lr,
        weight_decay,
        eps: 1e-8,
        bias_corrections: (1.0 - betas.0.powi(t), 1.0 - betas.1.powi(t)),
    }
}

/// `torch.optim.AdamW`'s step of one element in f64: `(p, m, v)` after it, for gradient `g`
/// times `clip`; a negative `clip` changes nothing. The bias corrections are `1 - beta^t` of
/// the f32 betas, in f64.
fn adamw_want(s: &AdamWStep, t: i32, p: f64, g: f64, m: f64, v: f64, clip: f64) -> [f64; 3] {
    if clip < 0.0 {
        return [p, m, v];
    }
    let (b1, b2) = (s.betas.0 as f64, s.betas.1 as f64);
    let (lr, wd, eps) = (s.lr as f64, s.weight_decay as f64, s.eps as f64);
    let g = g * clip;
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let m_hat = m / (1.0 - b1.powi(t));
    let v_hat = v / (1.0 - b2.powi(t));
    // Decoupled decay: on the parameter, not through the gradient.
    let p = p * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps);
    [p, m, v]
}

/// Parameter, gradient and moments of `n` elements: zero moments (a first step) or moments as
/// a run of steps leaves them (`v` at least about `m^2`, as an average of `g^2` is at least the
/// square of the average of `g`). A few gradients are 0 or tiny (next to eps).
struct State {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl State {
    fn new(n: usize, seed: u64, fresh: bool) -> Self {
        let p = values(n, seed, 1.0);
        let mut g = values(n, seed + 1, 1.0);
        for (k, x) in [0.0f32, 3e-8, -1e-7].into_iter().enumerate() {
            if let Some(gk) = g.get_mut(k * 97) {
                *gk = x;
            }
        }
        let (m, v) = if fresh {
            (vec![0.0; n], vec![0.0; n])
        } else {
            let m = values(n, seed + 2, 0.1);
            let u = values(n, seed + 3, 0.03);
            let v = m.iter().zip(&u).map(|(m, u)| m * m + u * u).collect();
            (m, v)
        };
        State { p, g, m, v }
    }

    /// The f64 update of every element: `[p, m, v]` vectors.
    fn want(&self, s: &AdamWStep, t: i32, clip: f32) -> [Vec<f64>; 3] {
        let mut out = [vec![], vec![], vec![]];
        for i in 0..self.p.len() {
            let [p, m, v] = adamw_want(
                s,
                t,
                self.p[i] as f64,
                self.g[i] as f64,
                self.m[i] as f64,
                self.v[i] as f64,
                clip as f64,
            );
            out[0].push(p);
            out[1].push(m);
            out[2].push(v);
        }
        out
    }
}

/// Device buffers of a [`State`].
struct Inputs {
    p: Buf,
    g: Buf,
    m: Buf,
    v: Buf,
}

impl Inputs {
    fn new(client: &ComputeClient<Rt>, st: &State) -> Self {
        Inputs {
            p: input(client, &st.p),
            g: input(client, &st.g),
            m: input(client, &st.m),
            v: input(client, &st.v),
        }
    }

    /// Panics when the kernel wrote to an input (or past one).
    fn unchanged(&self, client: &ComputeClient<Rt>, st: &State, what: &str) {
        for (buf, data, name) in [
            (&self.p, &st.p, "p"),
            (&self.g, &st.g, "g"),
            (&self.m, &st.m, "m"),
            (&self.v, &st.v, "v"),
        ] {
            let got = read_in_place(client, buf, &format!("{what} input {name}"));
            assert!(
                got.iter()
                    .zip(data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: input {name} changed"
            );
        }
    }
}

/// `adamw_kernel` on `ins` with the gradient's scale in `scale` (one element): `[p, m, v]`.
fn run_adamw(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    ins: &Inputs,
    scale: &Buf,
    s: &AdamWStep,
    what: &str,
) -> [Vec<f32>; 3] {
    let n = ins.p.len;
    let (p, m, v) = (output(client, n), output(client, n), output(client, n));
    launch_in!(
        mode,
        adamw_kernel::<Rt>(
            client,
            elem_grid(n),
            CubeDim::new_1d(THREADS),
            ins.p.flat(),
            ins.g.flat(),
            ins.m.flat(),
            ins.v.flat(),
            p.flat(),
            m.flat(),
            v.flat(),
            scale.arg(&[1]),
            n as u32,
            hyper(s),
            f32_type(),
        )
    );
    [
        read_output(client, &p, &format!("{what} p")),
        read_output(client, &m, &format!("{what} m")),
        read_output(client, &v, &format!("{what} v")),
    ]
}

/// `adamw_master_kernel` on `ins` (master, f32 gradient, moments): `[master, m, v, low]`.
fn run_adamw_master(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    ins: &Inputs,
    scale: &Buf,
    s: &AdamWStep,
    what: &str,
) -> [Vec<f32>; 4] {
    let n = ins.p.len;
    let (p, m, v, low) = (
        output(client, n),
        output(client, n),
        output(client, n),
        output(client, n),
    );
    launch_in!(
        mode,
        adamw_master_kernel::<Rt>(
            client,
            elem_grid(n),
            CubeDim::new_1d(THREADS),
            ins.p.flat(),
            ins.g.flat(),
            ins.m.flat(),
            ins.v.flat(),
            p.flat(),
            m.flat(),
            v.flat(),
            low.flat(),
            scale.arg(&[1]),
            n as u32,
            hyper(s),
            f32_type(),
        )
    );
    [
        read_output(client, &p, &format!("{what} master")),
        read_output(client, &m, &format!("{what} m")),
        read_output(client, &v, &format!("{what} v")),
        read_output(client, &low, &format!("{what} low")),
    ]
}

/// Compares an update with the f64 rule. The parameter to atol 1e-6 (values about 1; the step
/// is `lr` times a ratio near 1); the moments relative to their own scale (m about 0.1, v about
/// 1e-3, whose atol 1e-6 would hide any error).
fn check_update(got: &[Vec<f32>], want: &[Vec<f64>; 3], what: &str) {
    assert_close(&got[0], &want[0], 1e-6, 1e-5, &format!("{what} p"));
    assert_close(&got[1], &want[1], 1e-8, 1e-5, &format!("{what} m"));
    assert_close(&got[2], &want[2], 1e-10, 1e-5, &format!("{what} v"));
}

/// The steps the update tests take: a first step from zero moments (`t = 1`: the bias
/// corrections 0.1 and 0.001 at their largest) and a later one with weight decay off.
fn cases() -> [(i32, AdamWStep, bool); 2] {
    [
        (1, step_at(1, 1e-2, 0.1), true),
        (7, step_at(7, 3e-3, 0.0), false),
    ]
}

#[test]
fn adamw_matches_torch_rule_at_every_size_and_clip_factor() {
    let client = client();
    for n in SIZES {
        for (t, s, fresh) in cases() {
            let st = State::new(n, n as u64 + t as u64, fresh);
            let ins = Inputs::new(&client, &st);
            for clip in [1.0f32, 0.37, 0.0] {
                let want = st.want(&s, t, clip);
                let scale = input(&client, &[clip]);
                for mode in MODES {
                    let what = format!("adamw n={n} t={t} clip {clip} {mode:?}");
                    let got = run_adamw(&client, mode, &ins, &scale, &s, &what);
                    check_update(&got, &want, &what);
                }
            }
            ins.unchanged(&client, &st, &format!("adamw n={n} t={t}"));
        }
    }
}

#[test]
fn adamw_covers_a_grid_split_over_two_dimensions() {
    // `elem_grid` puts at most 65,535 cubes on x; 65,535 x 256 + 257 elements take a second
    // row of cubes (the last one partly past `n`).
    let client = client();
    let n = 65_535 * THREADS as usize + 257;
    let (t, s) = (2, step_at(2, 1e-2, 0.1));
    let st = State::new(n, 4242, false);
    let want = st.want(&s, t, 0.5);
    let ins = Inputs::new(&client, &st);
    let scale = input(&client, &[0.5]);
    for mode in MODES {
        let what = format!("adamw n={n} (2-D grid) {mode:?}");
        let got = run_adamw(&client, mode, &ins, &scale, &s, &what);
        check_update(&got, &want, &what);
    }
}

#[test]
fn adamw_master_matches_torch_rule_and_rounds_the_master() {
    let client = client();
    for n in SIZES {
        for (t, s, fresh) in cases() {
            let st = State::new(n, 1000 + n as u64 + t as u64, fresh);
            let ins = Inputs::new(&client, &st);
            for clip in [1.0f32, 0.37, 0.0] {
                let want = st.want(&s, t, clip);
                let scale = input(&client, &[clip]);
                for mode in MODES {
                    let what = format!("adamw master n={n} t={t} clip {clip} {mode:?}");
                    let got = run_adamw_master(&client, mode, &ins, &scale, &s, &what);
                    check_update(&got, &want, &what);
                    // The gradient's dtype is f32 here: the rounded copy is the master itself.
                    assert!(
                        got[3]
                            .iter()
                            .zip(&got[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: the low copy differs from the master"
                    );
                }
            }
            ins.unchanged(&client, &st, &format!("adamw master n={n} t={t}"));
        }
    }
}

/// `adamw_master_many_kernel` over all of `ins` in one launch (each tensor on
/// `ceil(n / THREADS)` cubes after the previous ones): `[master, m, v, low]` per tensor.
fn run_adamw_master_many(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    ins: &[Inputs],
    scale: &Buf,
    s: &AdamWStep,
) -> Vec<[Buf; 4]> {
    let outs: Vec<[Buf; 4]> = ins
        .iter()
        .map(|i| std::array::from_fn(|_| output(client, i.p.len)))
        .collect();
    let (mut p, mut g, mut m, mut v) = (
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
    );
    let (mut po, mut mo, mut vo, mut lo) = (
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
        SequenceArg::new(),
    );
    let mut starts = SequenceArg::<Rt, u32>::new();
    let mut cube = 0u32;
    for (i, o) in ins.iter().zip(&outs) {
        starts.push(cube);
        cube += i.p.len.div_ceil(THREADS as usize) as u32;
        p.push(i.p.flat());
        g.push(i.g.flat());
        m.push(i.m.flat());
        v.push(i.v.flat());
        po.push(o[0].flat());
        mo.push(o[1].flat());
        vo.push(o[2].flat());
        lo.push(o[3].flat());
    }
    starts.push(cube);
    launch_in!(
        mode,
        adamw_master_many_kernel::<Rt>(
            client,
            CubeCount::Static(cube, 1, 1),
            CubeDim::new_1d(THREADS),
            p,
            g,
            m,
            v,
            po,
            mo,
            vo,
            lo,
            starts,
            scale.arg(&[1]),
            hyper(s),
            f32_type(),
        )
    );
    outs
}

/// One launch over several tensors of different sizes gives each the per-tensor kernel's
/// results bit for bit, and leaves the inputs as they were. (Three tensors a launch: lavapipe
/// allows 32 storage buffers per kernel, and each tensor takes eight.)
#[test]
fn adamw_master_many_equals_the_per_tensor_kernel() {
    let client = client();
    for ((t, s, fresh), sizes) in cases()
        .into_iter()
        .zip([[257usize, 1, 10_007], [255, 300_000, 1]])
    {
        let states: Vec<State> = sizes
            .iter()
            .map(|&n| State::new(n, 3000 + n as u64 + t as u64, fresh))
            .collect();
        let ins: Vec<Inputs> = states.iter().map(|st| Inputs::new(&client, st)).collect();
        for clip in [1.0f32, 0.37, -1.0] {
            let scale = input(&client, &[clip]);
            for mode in MODES {
                let outs = run_adamw_master_many(&client, mode, &ins, &scale, &s);
                for (k, (i, o)) in ins.iter().zip(&outs).enumerate() {
                    let what = format!("adamw master many t={t} clip {clip} tensor {k} {mode:?}");
                    let want = run_adamw_master(&client, mode, i, &scale, &s, &what);
                    for (j, name) in ["master", "m", "v", "low"].iter().enumerate() {
                        let got = read_output(&client, &o[j], &format!("{what} {name}"));
                        assert!(
                            got.iter()
                                .zip(&want[j])
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{what}: {name} differs from the per-tensor kernel"
                        );
                    }
                }
            }
        }
        for (k, (i, st)) in ins.iter().zip(&states).enumerate() {
            i.unchanged(&client, st, &format!("adamw master many t={t} tensor {k}"));
        }
    }
}

#[test]
fn adamw_with_a_negative_scale_changes_nothing() {
    let client = client();
    let s = step_at(3, 1e-2, 0.1);
    for n in [1usize, 257, 10_007] {
        let st = State::new(n, 77 + n as u64, false);
        let ins = Inputs::new(&client, &st);
        let same = |got: &[f32], want: &[f32], what: &str| {
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i} changed");
            }
        };
        let scale = input(&client, &[-1.0]);
        for mode in MODES {
            let what = format!("adamw n={n} scale -1 {mode:?}");
            let got = run_adamw(&client, mode, &ins, &scale, &s, &what);
            same(&got[0], &st.p, &format!("{what} p"));
            same(&got[1], &st.m, &format!("{what} m"));
            same(&got[2], &st.v, &format!("{what} v"));
            let what = format!("adamw master n={n} scale -1 {mode:?}");
            let got = run_adamw_master(&client, mode, &ins, &scale, &s, &what);
            same(&got[0], &st.p, &format!("{what} master"));
            same(&got[1], &st.m, &format!("{what} m"));
            same(&got[2], &st.v, &format!("{what} v"));
            same(&got[3], &st.p, &format!("{what} low"));
        }
    }
}

/// Cubes `sums_of_squares` launches for a tensor of `n` elements (its `square_cubes`: 16
/// elements a thread, 1 to 1,024 cubes).
fn square_cubes(n: usize) -> usize {
    n.div_ceil(THREADS as usize * 16).clamp(1, 1024)
}

/// The partial sums of squares `sum_squares_kernel` writes for `t` over `cubes` cubes, in f64:
/// cube `c` takes `c * THREADS + tid`, then every `cubes * THREADS` after it.
fn partials_want(t: &[f32], cubes: usize) -> Vec<f64> {
    let threads = THREADS as usize;
    let mut out = vec![0.0f64; cubes];
    for (j, x) in t.iter().enumerate() {
        out[(j % (cubes * threads)) / threads] += (*x as f64) * (*x as f64);
    }
    out
}

/// `sum_squares_kernel` over each of `ts` (device buffers and cube counts) into one partials
/// buffer, each at the base after the previous one's cubes, as `sums_of_squares` chains them.
fn run_sum_squares(client: &ComputeClient<Rt>, mode: super::Mode, ts: &[(&Buf, usize)]) -> Buf {
    let out = output(client, ts.iter().map(|(_, c)| c).sum());
    let mut base = 0;
    for (t, cubes) in ts {
        launch_in!(
            mode,
            sum_squares_kernel::<Rt>(
                client,
                CubeCount::Static(*cubes as u32, 1, 1),
                CubeDim::new_1d(THREADS),
                t.flat(),
                out.flat(),
                t.len as u32,
                base as u32,
                THREADS,
                f32_type(),
            )
        );
        base += cubes;
    }
    out
}

#[test]
fn sum_squares_writes_every_cubes_partial() {
    let client = client();
    // With the host's cube count, and with fewer cubes (each thread many strides). 4,198,401
    // elements ask 1,026 cubes, clamped to 1,024.
    let cases: [(usize, usize); 10] = [
        (1, square_cubes(1)),
        (255, square_cubes(255)),
        (257, square_cubes(257)),
        (10_007, square_cubes(10_007)),
        (300_000, square_cubes(300_000)),
        (4_198_401, square_cubes(4_198_401)),
        (10_007, 1),
        (300_000, 7),
        (257, 3),
        (4_198_401, 100),
    ];
    for (n, cubes) in cases {
        let t = values(n, 5 + n as u64, 1.0);
        let tb = input(&client, &t);
        let want = partials_want(&t, cubes);
        for mode in MODES {
            let what = format!("sum_squares n={n} cubes {cubes} {mode:?}");
            let out = run_sum_squares(&client, mode, &[(&tb, cubes)]);
            let got = read_output(&client, &out, &what);
            // Positive terms: the f32 sums (16 a thread, then a tree) are close to exact.
            assert_close(&got, &want, 1e-6, 1e-5, &what);
        }
    }
    assert_eq!(square_cubes(4_198_401), 1024);
}

/// One tensor of each of [`SIZES`], the `k`-th drawn from seed `seed + k` at scale
/// `scale + k`.
fn sized_values(seed: u64, scale: f32) -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| values(n, seed + k as u64, scale + k as f32))
        .collect()
}

#[test]
fn sum_squares_chains_tensors_at_their_bases() {
    let client = client();
    let ts = sized_values(40, 0.5);
    let bufs: Vec<Buf> = ts.iter().map(|t| input(&client, t)).collect();
    let cubes: Vec<usize> = ts.iter().map(|t| square_cubes(t.len())).collect();
    let want: Vec<f64> = ts
        .iter()
        .zip(&cubes)
        .flat_map(|(t, &c)| partials_want(t, c))
        .collect();
    let args: Vec<(&Buf, usize)> = bufs.iter().zip(cubes.iter().copied()).collect();
    for mode in MODES {
        let what = format!("sum_squares of {} tensors {mode:?}", ts.len());
        let out = run_sum_squares(&client, mode, &args);
        let got = read_output(&client, &out, &what);
        assert_close(&got, &want, 1e-6, 1e-5, &what);
    }
}

/// `sum_squares_many_kernel` over all of `ts` (device buffers and cube counts) in one launch:
/// tensor `i` on the cubes after the previous tensors' ones.
fn run_sum_squares_many(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    ts: &[(&Buf, usize)],
) -> Buf {
    let total: usize = ts.iter().map(|(_, c)| c).sum();
    let out = output(client, total);
    let mut starts = SequenceArg::<Rt, u32>::new();
    let mut tensors = SequenceArg::new();
    let mut base = 0u32;
    for (t, cubes) in ts {
        starts.push(base);
        tensors.push(t.flat());
        base += *cubes as u32;
    }
    starts.push(base);
    launch_in!(
        mode,
        sum_squares_many_kernel::<Rt>(
            client,
            CubeCount::Static(total as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            tensors,
            starts,
            out.flat(),
            0,
            THREADS,
            f32_type(),
        )
    );
    out
}

/// One launch over many tensors writes the partials the per-tensor launches write, at the same
/// places: one tensor alone, the sizes of the per-tensor test with the host's cube counts, and
/// with fewer cubes than those (many strides a thread).
#[test]
fn sum_squares_many_writes_the_per_tensor_partials() {
    let client = client();
    let ts = sized_values(60, 0.25);
    let bufs: Vec<Buf> = ts.iter().map(|t| input(&client, t)).collect();
    let host: Vec<usize> = ts.iter().map(|t| square_cubes(t.len())).collect();
    let few: Vec<usize> = host
        .iter()
        .enumerate()
        .map(|(k, c)| (*c).min(k + 1))
        .collect();
    for cubes in [host, few] {
        let want: Vec<f64> = ts
            .iter()
            .zip(&cubes)
            .flat_map(|(t, &c)| partials_want(t, c))
            .collect();
        let args: Vec<(&Buf, usize)> = bufs.iter().zip(cubes.iter().copied()).collect();
        for mode in MODES {
            let what = format!("sum_squares_many cubes {cubes:?} {mode:?}");
            let got = read_output(&client, &run_sum_squares_many(&client, mode, &args), &what);
            assert_close(&got, &want, 1e-6, 1e-5, &what);
            let one = format!("{what}, the first tensor alone");
            let got = read_output(
                &client,
                &run_sum_squares_many(&client, mode, &args[..1]),
                &one,
            );
            assert_close(&got, &partials_want(&ts[0], cubes[0]), 1e-6, 1e-5, &one);
        }
    }
}

/// `grad_scale_kernel` on `partials` (a device buffer): `(norm, scale)`.
fn run_grad_scale(
    client: &ComputeClient<Rt>,
    mode: super::Mode,
    partials: &Buf,
    max_norm: Option<f32>,
) -> (Buf, Buf) {
    let (norm, scale) = (output(client, 1), output(client, 1));
    launch_in!(
        mode,
        grad_scale_kernel::<Rt>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(THREADS),
            partials.flat(),
            norm.flat(),
            scale.flat(),
            partials.len as u32,
            max_norm.unwrap_or(f32::INFINITY),
            THREADS,
        )
    );
    (norm, scale)
}

/// The clip factor of a gradient of norm `norm`: `max / (norm + 1e-6)` when the norm is above
/// `max`, else 1 (`peft-lora`'s host rule and `grad_scale`'s documented one).
fn clip_want(norm: f64, max_norm: Option<f32>) -> f64 {
    match max_norm {
        Some(max) if norm > max as f64 => max as f64 / (norm + 1e-6),
        _ => 1.0,
    }
}

#[test]
fn grad_scale_gives_the_norm_and_clip_factor() {
    let client = client();
    for n in [1usize, 80, 256, 257, 1000] {
        // Partial sums of squares: non-negative.
        let partials: Vec<f32> = values(n, 9 + n as u64, 3.0).iter().map(|x| x * x).collect();
        let norm = partials.iter().map(|x| *x as f64).sum::<f64>().sqrt();
        let pb = input(&client, &partials);
        for max_norm in [None, Some((norm * 2.0) as f32), Some((norm / 3.0) as f32)] {
            let want = clip_want(norm, max_norm);
            for mode in MODES {
                let what = format!("grad_scale {n} partials max {max_norm:?} {mode:?}");
                let (nb, sb) = run_grad_scale(&client, mode, &pb, max_norm);
                let got_norm = read_output(&client, &nb, &format!("{what} norm"));
                let got_scale = read_output(&client, &sb, &format!("{what} scale"));
                assert_close(&got_norm, &[norm], 1e-6, 1e-5, &format!("{what} norm"));
                assert_close(&got_scale, &[want], 1e-7, 1e-5, &format!("{what} scale"));
                if max_norm.is_none_or(|m| (m as f64) > norm) {
                    assert_eq!(got_scale[0], 1.0, "{what}: not clipped, scale exactly 1");
                }
            }
        }
    }
}

#[test]
fn grad_scale_of_a_non_finite_norm_is_minus_one() {
    let client = client();
    let n = 10_007;
    for (bad, at) in [
        (f32::NAN, 0usize),
        (f32::INFINITY, 5_000),
        (f32::NEG_INFINITY, 10_006),
        // Finite, but its square overflows f32: the norm is infinite as PyTorch's f32 one.
        (3e19, 4_097),
    ] {
        let mut t = values(n, 11, 1.0);
        t[at] = bad;
        let tb = input(&client, &t);
        let ok = input(&client, &values(257, 12, 1.0));
        let cubes = [square_cubes(257), square_cubes(n)];
        for max_norm in [None, Some(1.0f32)] {
            for mode in MODES {
                let what = format!("grad_scale with {bad} at {at} max {max_norm:?} {mode:?}");
                let partials = run_sum_squares(&client, mode, &[(&ok, cubes[0]), (&tb, cubes[1])]);
                let (nb, sb) = run_grad_scale(&client, mode, &partials, max_norm);
                let got_norm = read_output(&client, &nb, &format!("{what} norm"))[0];
                let got_scale = read_output(&client, &sb, &format!("{what} scale"))[0];
                assert!(!got_norm.is_finite(), "{what}: norm {got_norm} is finite");
                assert_eq!(got_scale, -1.0, "{what}: scale");
            }
        }
    }
}

#[test]
fn device_clip_chain_matches_the_host_rule() {
    let client = client();
    // The gradients of one step (several adapter tensors), as `grad_scale` and then the
    // updates see them.
    let sizes = [257usize, 10_007, 1, 300_000];
    let states: Vec<State> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| State::new(n, 300 + k as u64, k % 2 == 0))
        .collect();
    let norm = states
        .iter()
        .flat_map(|st| &st.g)
        .map(|g| (*g as f64) * (*g as f64))
        .sum::<f64>()
        .sqrt();
    let ins: Vec<Inputs> = states.iter().map(|st| Inputs::new(&client, st)).collect();
    let args: Vec<(&Buf, usize)> = ins.iter().map(|i| (&i.g, square_cubes(i.g.len))).collect();
    let (t, s) = (4, step_at(4, 2e-3, 0.01));
    for max_norm in [Some((norm / 5.0) as f32), Some((norm * 1.5) as f32), None] {
        let clip = clip_want(norm, max_norm);
        for mode in MODES {
            let what = format!("device clip max {max_norm:?} {mode:?}");
            let partials = run_sum_squares(&client, mode, &args);
            let (nb, sb) = run_grad_scale(&client, mode, &partials, max_norm);
            let got_norm = read_output(&client, &nb, &format!("{what} norm"));
            assert_close(&got_norm, &[norm], 1e-6, 1e-5, &format!("{what} norm"));
            let got_scale = read_output(&client, &sb, &format!("{what} scale"));
            assert_close(&got_scale, &[clip], 1e-7, 1e-5, &format!("{what} scale"));
            for (k, (st, i)) in states.iter().zip(&ins).enumerate() {
                // The device's factor: its f32 rounding (within the tolerance above) moves the
                // updates, so the expected values take the factor as the device computed it.
                let want = st.want(&s, t, got_scale[0]);
                let what_k = format!("{what} tensor {k} (n={})", st.p.len());
                let got = run_adamw(&client, mode, i, &sb, &s, &what_k);
                check_update(&got, &want, &what_k);
                let got = run_adamw_master(&client, mode, i, &sb, &s, &what_k);
                check_update(&got[..3], &want, &format!("{what_k} master"));
            }
        }
    }
}
