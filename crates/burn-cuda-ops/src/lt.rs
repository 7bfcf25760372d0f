//! cuBLASLt, loaded at run time: one row-major GEMM entry point with cached plans.
//!
//! Only the dozen functions the fused linear needs are bound, by hand, with the enum values of
//! `cublasLt.h` (they are stable across CUDA 11.x-13.x). The library is found the way cudarc
//! finds the rest of CUDA (`libcublasLt.so*` on the loader path, e.g. `LD_LIBRARY_PATH`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

type Status = i32;
type RawHandle = *mut c_void;
type Stream = *mut c_void;

/// `cublasLtMatmulAlgo_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Algo {
    data: [u64; 8],
}

/// `cublasLtMatmulHeuristicResult_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Heuristic {
    algo: Algo,
    workspace_size: usize,
    state: Status,
    waves_count: f32,
    reserved: [i32; 4],
}

// Enum values from cublasLt.h / library_types.h.
const COMPUTE_32F: i32 = 68;
const R_32F: i32 = 0;
const DESC_TRANSA: i32 = 3;
const DESC_TRANSB: i32 = 4;
const DESC_EPILOGUE: i32 = 7;
const DESC_BIAS_POINTER: i32 = 8;
const EPILOGUE_BIAS: u32 = 4;
const PREF_MAX_WORKSPACE: i32 = 1;
const PREF_ALIGN_A: i32 = 5;
const LAYOUT_BATCH_COUNT: i32 = 5;
const LAYOUT_STRIDED_BATCH_OFFSET: i32 = 6;
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// Element types the GEMMs support (`cudaDataType_t` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// bfloat16 (`CUDA_R_16BF`).
    Bf16 = 14,
    /// float16 (`CUDA_R_16F`).
    F16 = 2,
    /// float32 (`CUDA_R_32F`).
    F32 = 0,
}

struct Api {
    _lib: libloading::Library,
    create: unsafe extern "C" fn(*mut RawHandle) -> Status,
    desc_create: unsafe extern "C" fn(*mut *mut c_void, i32, i32) -> Status,
    desc_set: unsafe extern "C" fn(*mut c_void, i32, *const c_void, usize) -> Status,
    layout_create: unsafe extern "C" fn(*mut *mut c_void, i32, u64, u64, i64) -> Status,
    layout_set: unsafe extern "C" fn(*mut c_void, i32, *const c_void, usize) -> Status,
    pref_create: unsafe extern "C" fn(*mut *mut c_void) -> Status,
    pref_set: unsafe extern "C" fn(*mut c_void, i32, *const c_void, usize) -> Status,
    pref_destroy: unsafe extern "C" fn(*mut c_void) -> Status,
    #[allow(clippy::type_complexity)]
    heuristic: unsafe extern "C" fn(
        RawHandle,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        i32,
        *mut Heuristic,
        *mut i32,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    matmul: unsafe extern "C" fn(
        RawHandle,
        *mut c_void,
        *const c_void,
        *const c_void,
        *mut c_void,
        *const c_void,
        *mut c_void,
        *const c_void,
        *const c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *const Algo,
        *mut c_void,
        usize,
        Stream,
    ) -> Status,
}

// SAFETY: the struct holds a loaded library and plain C function pointers.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

fn candidates() -> Vec<String> {
    let mut names = vec![
        "libcublasLt.so".to_string(),
        "libcublasLt.so.13".to_string(),
        "libcublasLt.so.12".to_string(),
        "libcublasLt.so.11".to_string(),
    ];
    for n in cudarc::get_lib_name_candidates("cublasLt") {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn load() -> Result<Api, String> {
    let mut last = String::new();
    for name in candidates() {
        // SAFETY: loading a shared library runs its initialisers; cuBLASLt's are benign.
        match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => return bind(lib).map_err(|e| format!("{name}: {e}")),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "libcublasLt not found on the loader path (LD_LIBRARY_PATH) ({last})"
    ))
}

fn bind(lib: libloading::Library) -> Result<Api, libloading::Error> {
    // SAFETY: the signatures match cublasLt.h.
    unsafe {
        Ok(Api {
            create: *lib.get(b"cublasLtCreate\0")?,
            desc_create: *lib.get(b"cublasLtMatmulDescCreate\0")?,
            desc_set: *lib.get(b"cublasLtMatmulDescSetAttribute\0")?,
            layout_create: *lib.get(b"cublasLtMatrixLayoutCreate\0")?,
            layout_set: *lib.get(b"cublasLtMatrixLayoutSetAttribute\0")?,
            pref_create: *lib.get(b"cublasLtMatmulPreferenceCreate\0")?,
            pref_set: *lib.get(b"cublasLtMatmulPreferenceSetAttribute\0")?,
            pref_destroy: *lib.get(b"cublasLtMatmulPreferenceDestroy\0")?,
            heuristic: *lib.get(b"cublasLtMatmulAlgoGetHeuristic\0")?,
            matmul: *lib.get(b"cublasLtMatmul\0")?,
            _lib: lib,
        })
    }
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether libcublasLt can be loaded (checked once).
pub fn available() -> Result<(), String> {
    api().map(|_| ())
}

fn check(status: Status, what: &str) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!("{what} failed with cublasStatus {status}"))
    }
}

/// One GEMM operand: a row-major stored matrix `[rows, cols]` with row stride `ld` (elements),
/// used as is or transposed (`trans`).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// Device pointer.
    pub ptr: u64,
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// Row stride in elements (>= cols).
    pub ld: usize,
    /// The logical operand is the transpose of the stored matrix.
    pub trans: bool,
}

impl Operand {
    /// The logical shape `[rows, cols]` after the optional transpose.
    pub fn logical(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// A row-major output `[m, n]` with row stride `ld`.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// Device pointer.
    pub ptr: u64,
    /// Row stride in elements (>= n).
    pub ld: usize,
}

/// A strided batch: `count` GEMMs whose operands and outputs sit `stride_*` elements apart.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Batch {
    /// GEMMs in the batch.
    pub count: usize,
    /// Elements between consecutive `a` matrices.
    pub stride_a: usize,
    /// Elements between consecutive `b` matrices.
    pub stride_b: usize,
    /// Elements between consecutive outputs.
    pub stride_c: usize,
}

impl Batch {
    /// One GEMM.
    pub const ONE: Batch = Batch {
        count: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    handle: usize,
    dtype: Dtype,
    m: usize,
    n: usize,
    k: usize,
    a: (usize, usize, usize, bool),
    b: (usize, usize, usize, bool),
    ldc: usize,
    bias: bool,
    align: [u32; 4],
    batch: Batch,
}

struct Plan {
    desc: *mut c_void,
    a: *mut c_void,
    b: *mut c_void,
    c: *mut c_void,
    /// The algorithm every call uses: the heuristic's first, or the fastest when tuned.
    algo: Algo,
    /// The heuristic's candidates, best-ranked first (up to [`CANDIDATES`]).
    candidates: Vec<Algo>,
}

/// How many of cuBLASLt's heuristic candidates a plan keeps (and autotuning times).
const CANDIDATES: usize = 8;
/// Autotuning: rounds over the candidates, and timed calls per candidate and round.
const TUNE_ROUNDS: usize = 3;
const TUNE_CALLS: usize = 5;

/// Time the heuristic's candidates on the first call of each GEMM shape and keep the fastest
/// (`PEFT_LORA_GEMM_AUTOTUNE=1`; off by default): a one-off cost of up to ~100 ms per shape.
/// Measured on the H200 (26th/27th leases) it gave no gain on the fused LoRA linear or in 8B
/// training: the heuristic's first choice was the tuner's choice on the big GEMMs.
pub(crate) static AUTOTUNE: super::switch::Switch =
    super::switch::Switch::opt_in("PEFT_LORA_GEMM_AUTOTUNE");

// SAFETY: plans are only used under the PLANS mutex, on the device's thread.
unsafe impl Send for Plan {}

static PLANS: OnceLock<Mutex<HashMap<Key, Plan>>> = OnceLock::new();

/// The plan cache, locked.
fn plans() -> Result<std::sync::MutexGuard<'static, HashMap<Key, Plan>>, String> {
    PLANS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "cuBLASLt plan cache poisoned".to_string())
}

/// A cuBLASLt handle with its workspace, bound to one CUDA stream of one context.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// `cublasLtHandle_t`.
    pub handle: usize,
    /// The CUDA stream every GEMM is enqueued on.
    pub stream: usize,
    /// Device workspace pointer.
    pub workspace: u64,
    /// Workspace size in bytes.
    pub workspace_bytes: usize,
    /// A second stream for work that may overlap the main stream's (see
    /// [`super::device::fork`]); `None` when everything must stay on `stream`.
    pub side: Option<Side>,
}

/// A side stream with its own workspace and the two events that fork it from and join it back
/// to the main stream.
#[derive(Clone, Copy, Debug)]
pub struct Side {
    /// The side `CUstream`.
    pub stream: usize,
    /// Its cuBLASLt workspace.
    pub workspace: u64,
    /// Recorded on the main stream, waited for by the side stream.
    pub fork: usize,
    /// Recorded on the side stream, waited for by the main stream.
    pub join: usize,
}

/// Creates a cuBLASLt handle (the CUDA context must be current on this thread).
pub fn create_handle() -> Result<usize, String> {
    let api = api()?;
    let mut h: RawHandle = std::ptr::null_mut();
    // SAFETY: FFI call with a valid out pointer.
    check(unsafe { (api.create)(&mut h) }, "cublasLtCreate")?;
    Ok(h as usize)
}

fn alignment(ptr: u64) -> u32 {
    let mut a = 256u32;
    while a > 1 && !ptr.is_multiple_of(a as u64) {
        a /= 2;
    }
    a
}

pub(crate) fn elem_bytes(dtype: Dtype) -> u64 {
    match dtype {
        Dtype::F32 => 4,
        _ => 2,
    }
}

fn make_plan(ctx: &Ctx, key: &Key) -> Result<Plan, String> {
    let api = api()?;
    let null = std::ptr::null_mut;
    let (mut desc, mut la, mut lb, mut lc, mut pref) = (null(), null(), null(), null(), null());
    let dt = key.dtype as i32;
    // SAFETY: FFI calls with valid out pointers and attribute buffers of the documented types.
    unsafe {
        check(
            (api.desc_create)(&mut desc, COMPUTE_32F, R_32F),
            "cublasLtMatmulDescCreate",
        )?;
        // Lt's A is our B, Lt's B is our A (row-major C = A B is column-major C^T = B^T A^T).
        let ta: i32 = if key.b.3 { OP_T } else { OP_N };
        let tb: i32 = if key.a.3 { OP_T } else { OP_N };
        let set = |attr: i32, v: *const c_void, size: usize| {
            check(
                (api.desc_set)(desc, attr, v, size),
                "cublasLtMatmulDescSetAttribute",
            )
        };
        set(DESC_TRANSA, &ta as *const i32 as *const c_void, 4)?;
        set(DESC_TRANSB, &tb as *const i32 as *const c_void, 4)?;
        if key.bias {
            set(
                DESC_EPILOGUE,
                &EPILOGUE_BIAS as *const u32 as *const c_void,
                4,
            )?;
        }
        let (b_rows, b_cols, b_ld, _) = key.b;
        let (a_rows, a_cols, a_ld, _) = key.a;
        check(
            (api.layout_create)(&mut la, dt, b_cols as u64, b_rows as u64, b_ld as i64),
            "cublasLtMatrixLayoutCreate(A)",
        )?;
        check(
            (api.layout_create)(&mut lb, dt, a_cols as u64, a_rows as u64, a_ld as i64),
            "cublasLtMatrixLayoutCreate(B)",
        )?;
        check(
            (api.layout_create)(&mut lc, dt, key.n as u64, key.m as u64, key.ldc as i64),
            "cublasLtMatrixLayoutCreate(C)",
        )?;
        if key.batch.count > 1 {
            let count = key.batch.count as i32;
            // Lt's A/B/C: our B, our A, C.
            let strides = [key.batch.stride_b, key.batch.stride_a, key.batch.stride_c];
            for (layout, stride) in [la, lb, lc].into_iter().zip(strides) {
                let stride = stride as i64;
                check(
                    (api.layout_set)(
                        layout,
                        LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    ),
                    "cublasLtMatrixLayoutSetAttribute(batch count)",
                )?;
                check(
                    (api.layout_set)(
                        layout,
                        LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        8,
                    ),
                    "cublasLtMatrixLayoutSetAttribute(batch stride)",
                )?;
            }
        }
        check(
            (api.pref_create)(&mut pref),
            "cublasLtMatmulPreferenceCreate",
        )?;
        let ws = ctx.workspace_bytes as u64;
        check(
            (api.pref_set)(
                pref,
                PREF_MAX_WORKSPACE,
                &ws as *const u64 as *const c_void,
                8,
            ),
            "cublasLtMatmulPreferenceSetAttribute",
        )?;
        // Lt's A/B/C/D alignments: our B, our A, C, C.
        let align = [key.align[1], key.align[0], key.align[2], key.align[3]];
        for (i, al) in align.iter().enumerate() {
            check(
                (api.pref_set)(
                    pref,
                    PREF_ALIGN_A + i as i32,
                    al as *const u32 as *const c_void,
                    4,
                ),
                "cublasLtMatmulPreferenceSetAttribute(alignment)",
            )?;
        }
        let mut result = [Heuristic::default(); CANDIDATES];
        let mut count = 0i32;
        let status = (api.heuristic)(
            ctx.handle as RawHandle,
            desc,
            la,
            lb,
            lc,
            lc,
            pref,
            CANDIDATES as i32,
            result.as_mut_ptr(),
            &mut count,
        );
        (api.pref_destroy)(pref);
        check(status, "cublasLtMatmulAlgoGetHeuristic")?;
        let candidates: Vec<Algo> = result[..count.max(0) as usize]
            .iter()
            .filter(|h| h.state == 0)
            .map(|h| h.algo)
            .collect();
        let Some(&algo) = candidates.first() else {
            return Err(format!("cuBLASLt has no algorithm for {key:?}"));
        };
        Ok(Plan {
            desc,
            a: la,
            b: lb,
            c: lc,
            algo,
            candidates,
        })
    }
}

/// Row-major `c[m, n] = alpha * op(a)[m, k] op(b)[k, n] + beta * c (+ bias[n])`, enqueued on
/// `ctx.stream`. Accumulation in f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    ctx: &Ctx,
    dtype: Dtype,
    a: Operand,
    b: Operand,
    c: Output,
    alpha: f32,
    beta: f32,
    bias: Option<u64>,
) -> Result<(), String> {
    gemm_batched(ctx, dtype, a, b, c, alpha, beta, bias, Batch::ONE)
}

/// [`gemm`] for each of `batch.count` matrix triples, `stride_*` elements apart from the
/// first, as one cuBLASLt call.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    ctx: &Ctx,
    dtype: Dtype,
    a: Operand,
    b: Operand,
    c: Output,
    alpha: f32,
    beta: f32,
    bias: Option<u64>,
    batch: Batch,
) -> Result<(), String> {
    let Some(key) = key_for(ctx, dtype, &a, &b, &c, bias.is_some(), batch)? else {
        return Ok(());
    };
    let api = api()?;
    let mut plans = plans()?;
    let plan = match plans.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut plan = make_plan(ctx, &key)?;
            if AUTOTUNE.on() && plan.candidates.len() > 1 {
                plan.algo = tune(ctx, &key, &plan, &a, &b, alpha, beta, bias);
            }
            e.insert(plan)
        }
    };
    let plan = &*plan;
    // SAFETY: the pointers are live device allocations of the described shapes (the caller holds
    // their handles) and the plan matches them.
    unsafe {
        launch(
            api, ctx, plan, &plan.algo, a.ptr, b.ptr, c.ptr, alpha, beta, bias,
        )
    }
}

/// One `cublasLtMatmul` of `plan` with `algo`, in place on `c` (C = D).
///
/// # Safety
/// The pointers must be live device allocations of the shapes the plan describes.
#[allow(clippy::too_many_arguments)]
unsafe fn launch(
    api: &Api,
    ctx: &Ctx,
    plan: &Plan,
    algo: &Algo,
    a: u64,
    b: u64,
    c: u64,
    alpha: f32,
    beta: f32,
    bias: Option<u64>,
) -> Result<(), String> {
    // SAFETY: per this function's contract; alpha/beta are host f32 as the scale type says.
    unsafe {
        if let Some(bias) = bias {
            check(
                (api.desc_set)(
                    plan.desc,
                    DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    8,
                ),
                "cublasLtMatmulDescSetAttribute(bias)",
            )?;
        }
        check(
            (api.matmul)(
                ctx.handle as RawHandle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                plan.a,
                a as *const c_void,
                plan.b,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                algo,
                ctx.workspace as *mut c_void,
                ctx.workspace_bytes,
                ctx.stream as Stream,
            ),
            "cublasLtMatmul",
        )
    }
}

/// The plan key of a GEMM call, checked; `None` when there is nothing to compute.
fn key_for(
    ctx: &Ctx,
    dtype: Dtype,
    a: &Operand,
    b: &Operand,
    c: &Output,
    bias: bool,
    batch: Batch,
) -> Result<Option<Key>, String> {
    let (m, k) = a.logical();
    let (kb, n) = b.logical();
    if k != kb {
        return Err(format!("gemm inner dimensions differ: {k} vs {kb}"));
    }
    if m == 0 || n == 0 || batch.count == 0 {
        return Ok(None);
    }
    if k == 0 {
        // Nothing to multiply: only beta * c matters, which callers never rely on here.
        return Err("gemm with k = 0".into());
    }
    let eb = elem_bytes(dtype);
    // Every matrix of the batch must meet the alignment the plan is made for.
    let align = |ptr: u64, ld: usize, stride: usize| {
        let a = alignment(ptr).min(alignment(ld as u64 * eb));
        if batch.count > 1 {
            a.min(alignment(stride as u64 * eb))
        } else {
            a
        }
    };
    let c_align = align(c.ptr, c.ld, batch.stride_c);
    Ok(Some(Key {
        handle: ctx.handle,
        dtype,
        m,
        n,
        k,
        a: (a.rows, a.cols, a.ld, a.trans),
        b: (b.rows, b.cols, b.ld, b.trans),
        ldc: c.ld,
        bias,
        align: [
            align(a.ptr, a.ld, batch.stride_a),
            align(b.ptr, b.ld, batch.stride_b),
            c_align,
            c_align,
        ],
        batch,
    }))
}

/// Bytes from the first to the last element of a (batched) output.
fn output_bytes(key: &Key) -> usize {
    let last = (key.batch.count - 1) * key.batch.stride_c + (key.m - 1) * key.ldc + key.n;
    last * elem_bytes(key.dtype) as usize
}

/// The fastest of `plan`'s candidates on this call's operands, each timed on the GPU writing a
/// scratch output (the real one may hold the `beta` term). Any failure keeps the heuristic's
/// first choice: tuning only ever chooses between algorithms that compute the same product.
#[allow(clippy::too_many_arguments)]
fn tune(
    ctx: &Ctx,
    key: &Key,
    plan: &Plan,
    a: &Operand,
    b: &Operand,
    alpha: f32,
    beta: f32,
    bias: Option<u64>,
) -> Algo {
    let Ok(api) = api() else {
        return plan.algo;
    };
    let bytes = output_bytes(key);
    // SAFETY: a plain device allocation, freed below after the timing has synchronised.
    let Ok(scratch) = (unsafe { cudarc::driver::result::malloc_sync(bytes) }) else {
        return plan.algo;
    };
    // Round-robin over the candidates, best of `TUNE_ROUNDS` rounds each: a clock ramp or a
    // burst of other work then weighs on every candidate alike (one pass of 3 calls chose an
    // algorithm 8% slower than the best in the 26th lease).
    let mut times = vec![f64::INFINITY; plan.candidates.len()];
    for _ in 0..TUNE_ROUNDS {
        let round = time_candidates(
            api, ctx, plan, a.ptr, b.ptr, scratch, alpha, beta, bias, TUNE_CALLS,
        );
        for (t, ms) in times.iter_mut().zip(round) {
            *t = ms.map_or(*t, |ms| t.min(ms));
        }
    }
    let best =
        times
            .iter()
            .zip(&plan.candidates)
            .fold((f64::INFINITY, plan.algo), |best, (&t, &algo)| {
                if t < best.0 {
                    (t, algo)
                } else {
                    best
                }
            });
    // SAFETY: allocated above; the timing synchronised on the stream's last use of it (and a
    // failed launch enqueued nothing), and cuMemFree waits for the device anyway.
    unsafe { cudarc::driver::result::free_sync(scratch) }.ok();
    best.1
}

/// GPU milliseconds per call of each of `plan`'s candidates (`calls` calls each, writing `c` in
/// place), in order; `None` where a launch failed. Shared by [`tune`] and [`candidate_times`].
#[allow(clippy::too_many_arguments)]
fn time_candidates(
    api: &Api,
    ctx: &Ctx,
    plan: &Plan,
    a: u64,
    b: u64,
    c: u64,
    alpha: f32,
    beta: f32,
    bias: Option<u64>,
    calls: usize,
) -> Vec<Option<f64>> {
    plan.candidates
        .iter()
        .map(|algo| {
            // SAFETY: the caller's live operands and output, the plan made for them.
            let run = || unsafe { launch(api, ctx, plan, algo, a, b, c, alpha, beta, bias) };
            super::gpu_timer::time_on_stream(ctx.stream, calls, run).ok()
        })
        .collect()
}

/// GPU milliseconds per call of each of the heuristic's candidates for this GEMM (writing `c`
/// in place, `iters` calls each), and the index of the one the plan uses. For benchmarks.
#[allow(clippy::too_many_arguments)]
pub fn candidate_times(
    ctx: &Ctx,
    dtype: Dtype,
    a: Operand,
    b: Operand,
    c: Output,
    alpha: f32,
    beta: f32,
    iters: usize,
) -> Result<(Vec<f64>, usize), String> {
    gemm(ctx, dtype, a, b, c, alpha, beta, None)?;
    let key =
        key_for(ctx, dtype, &a, &b, &c, false, Batch::ONE)?.ok_or("candidate_times: empty GEMM")?;
    let api = api()?;
    let plans = plans()?;
    let plan = plans.get(&key).ok_or("candidate_times: no plan")?;
    let times = time_candidates(
        api, ctx, plan, a.ptr, b.ptr, c.ptr, alpha, beta, None, iters,
    )
    .into_iter()
    .map(|ms| ms.unwrap_or(f64::NAN))
    .collect();
    let chosen = plan
        .candidates
        .iter()
        .position(|x| x.data == plan.algo.data)
        .unwrap_or(0);
    Ok((times, chosen))
}
