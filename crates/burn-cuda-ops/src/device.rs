//! Running cuBLASLt work in order with cubecl's own CUDA stream.
//!
//! cubecl executes every task of a device on one runner thread, in submission order, and each
//! caller thread has its own CUDA stream there. A fused op submits one task to that thread
//! ([`enqueue`]: queued like Burn's own launches, not waited for; [`run`] when a value must come
//! back): it resolves the device pointers of its tensors (which also makes their stream wait for
//! any other stream that wrote them), then enqueues its GEMMs on the caller's cubecl stream. Every
//! kernel submitted before runs before the GEMMs, every kernel submitted after runs after them,
//! and a buffer freed afterwards is only reused by later work on the same stream: the ordering is
//! the stream's, with no host synchronisation.
//!
//! cubecl 0.10 does not expose its `CUstream`; it is read once per stream from the server's
//! `Debug` output (the `sys` field of the stream) and checked with `cuStreamQuery`. When that
//! fails the op falls back to [`Ordering::HostSync`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering as AtomicOrdering};
use std::sync::{Mutex, OnceLock};

use cubecl_common::device::Device;
use cubecl_common::device_handle::DeviceHandle;
use cubecl_common::stream_id::StreamId;
use cubecl_cuda::{CudaDevice, CudaRuntime};
use cubecl_runtime::runtime::Runtime;
use cubecl_runtime::server::{ComputeServer, Handle};

use super::lt;

type Server = <CudaRuntime as Runtime>::Server;

/// How the GEMMs of a fused op are ordered against Burn's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// On cubecl's stream of the calling thread (default): ordered by the stream itself.
    Stream,
    /// On a private stream, with a device-wide synchronisation before and a stream
    /// synchronisation after (slow, always correct; the fallback).
    HostSync,
    /// On a private stream with no synchronisation at all. Wrong on purpose: it exists so that the
    /// ordering test can show it catches a race. Never use it otherwise.
    #[doc(hidden)]
    UnorderedForTests,
}

static ORDERING: AtomicU8 = AtomicU8::new(0);
static ON_CUBECL_STREAM: AtomicBool = AtomicBool::new(false);

/// Whether the last fused op ran on cubecl's own stream (false after a fallback to host
/// synchronisation, or before any op).
pub fn cubecl_stream_used() -> bool {
    ON_CUBECL_STREAM.load(AtomicOrdering::SeqCst)
}

/// Sets how fused ops order their GEMMs (process-wide).
pub fn set_ordering(ordering: Ordering) {
    let v = match ordering {
        Ordering::Stream => 0,
        Ordering::HostSync => 1,
        Ordering::UnorderedForTests => 2,
    };
    ORDERING.store(v, AtomicOrdering::SeqCst);
}

/// The current ordering mode.
pub fn ordering() -> Ordering {
    match ORDERING.load(AtomicOrdering::SeqCst) {
        0 => Ordering::Stream,
        1 => Ordering::HostSync,
        _ => Ordering::UnorderedForTests,
    }
}

const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Default)]
struct DeviceState {
    handle: Option<usize>,
    /// cubecl's streams by pool index (`None`: not created yet or not parsed).
    streams: Vec<Option<usize>>,
    /// Workspace per stream pointer.
    workspaces: HashMap<usize, u64>,
    private_stream: Option<usize>,
    /// Side stream per main stream.
    sides: HashMap<usize, lt::Side>,
    warned: bool,
}

static STATES: OnceLock<Mutex<HashMap<u16, DeviceState>>> = OnceLock::new();

/// Parses the `CUstream` of every stream of cubecl's pool from the server's `Debug` text:
/// `streams: StreamPool { streams: [Some(StreamWrapper { stream: Stream { sys: 0x.., ..}), None, ..]`.
fn parse_streams(text: &str) -> Option<Vec<Option<usize>>> {
    let start =
        text.find("streams: StreamPool { streams: [")? + "streams: StreamPool { streams: [".len();
    let bytes = text.as_bytes();
    let mut items = Vec::new();
    let (mut depth, mut item_start, mut in_str, mut esc) = (0i32, start, false, false);
    let mut i = start;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    if depth == 0 {
                        items.push(&text[item_start..i]);
                        break;
                    }
                    depth -= 1;
                }
                b',' if depth == 0 => {
                    items.push(&text[item_start..i]);
                    item_start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    let parsed = items
        .iter()
        .map(|item| {
            let item = item.trim();
            if !item.starts_with("Some(") {
                return None;
            }
            let pos = item.find("sys: 0x")? + "sys: 0x".len();
            let hex: String = item[pos..]
                .chars()
                .take_while(|c| c.is_ascii_hexdigit())
                .collect();
            usize::from_str_radix(&hex, 16).ok()
        })
        .collect::<Vec<_>>();
    (!parsed.is_empty()).then_some(parsed)
}

fn stream_is_valid(stream: usize) -> bool {
    // SAFETY: querying a stream handle; an invalid one returns an error code, not UB, for handles
    // that were real streams of this context (which is what the parse yields).
    let r = unsafe { cudarc::driver::sys::cuStreamQuery(stream as cudarc::driver::sys::CUstream) };
    matches!(
        r,
        cudarc::driver::sys::CUresult::CUDA_SUCCESS
            | cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY
    )
}

/// The cubecl stream of `sid` on this server, if it can be found.
fn cubecl_stream(server: &Server, state: &mut DeviceState, sid: StreamId) -> Option<usize> {
    let lookup = |streams: &Vec<Option<usize>>| {
        // The pool has max_streams regular streams plus one special (garbage collection) stream.
        let regular = streams.len().checked_sub(1).filter(|n| *n > 0)?;
        streams[(sid.value as usize) % regular]
    };
    if let Some(s) = lookup(&state.streams) {
        return Some(s);
    }
    state.streams = parse_streams(&format!("{server:?}"))?;
    lookup(&state.streams).filter(|s| stream_is_valid(*s))
}

fn workspace(state: &mut DeviceState, stream: usize) -> Result<u64, String> {
    if let Some(w) = state.workspaces.get(&stream) {
        return Ok(*w);
    }
    // SAFETY: a plain device allocation in the current (primary) context; kept for the process.
    let w = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
        .map_err(|e| format!("cuMemAlloc of the cuBLASLt workspace: {e:?}"))?;
    state.workspaces.insert(stream, w);
    Ok(w)
}

fn side_for(state: &mut DeviceState, main: usize) -> Result<lt::Side, String> {
    if let Some(s) = state.sides.get(&main) {
        return Ok(*s);
    }
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::CUevent_flags;
    let side = stream::create(stream::StreamKind::NonBlocking)
        .map_err(|e| format!("cuStreamCreate: {e:?}"))? as usize;
    let ev = || {
        event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(|e| e as usize)
            .map_err(|e| format!("cuEventCreate: {e:?}"))
    };
    let s = lt::Side {
        stream: side,
        workspace: workspace(state, side)?,
        fork: ev()?,
        join: ev()?,
    };
    state.sides.insert(main, s);
    Ok(s)
}

/// A context on the side stream that starts after everything enqueued on `ctx`'s stream so far;
/// `ctx` itself when there is no side stream. Pair with [`join`].
pub(crate) fn fork(ctx: &lt::Ctx) -> Result<lt::Ctx, String> {
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::{CUevent, CUevent_wait_flags, CUstream};
    let Some(side) = ctx.side else {
        return Ok(*ctx);
    };
    // SAFETY: events and streams created in this context and kept for the process.
    unsafe {
        event::record(side.fork as CUevent, ctx.stream as CUstream)
            .map_err(|e| format!("cuEventRecord: {e:?}"))?;
        stream::wait_event(
            side.stream as CUstream,
            side.fork as CUevent,
            CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .map_err(|e| format!("cuStreamWaitEvent: {e:?}"))?;
    }
    Ok(lt::Ctx {
        stream: side.stream,
        workspace: side.workspace,
        side: None,
        ..*ctx
    })
}

/// Makes `ctx`'s stream wait for everything enqueued on its side stream.
pub(crate) fn join(ctx: &lt::Ctx) -> Result<(), String> {
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::{CUevent, CUevent_wait_flags, CUstream};
    let Some(side) = ctx.side else {
        return Ok(());
    };
    // SAFETY: as in `fork`.
    unsafe {
        event::record(side.join as CUevent, side.stream as CUstream)
            .map_err(|e| format!("cuEventRecord: {e:?}"))?;
        stream::wait_event(
            ctx.stream as CUstream,
            side.join as CUevent,
            CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .map_err(|e| format!("cuStreamWaitEvent: {e:?}"))
    }
}

/// Runs `f` on the device's runner thread with the device pointers of `handles` (in order) and a
/// cuBLASLt context whose stream is ordered with Burn's kernels as [`ordering`] says, and waits
/// for it (`f` may return a value).
pub fn run<T: Send>(
    device: &CudaDevice,
    handles: Vec<Handle>,
    f: impl FnOnce(&lt::Ctx, &[u64]) -> Result<T, String> + Send,
) -> Result<T, String> {
    take_deferred()?;
    let id = device.to_id();
    let bindings: Vec<_> = handles.into_iter().map(|h| h.binding()).collect();
    let mode = ordering();
    let dh = DeviceHandle::<Server>::new(id);
    dh.submit_blocking(move |server: &mut Server| on_runner(server, id.index_id, mode, bindings, f))
        .map_err(|e| format!("cubecl device call: {e:?}"))?
}

/// [`run`] without waiting: the task is queued behind Burn's kernel launches, as they are, and
/// the caller goes on (`PEFT_LORA_ASYNC_SUBMIT=0` makes it wait, as [`run`]). An error inside
/// the task is kept and returned by the next fused op's call, which then panics as a failed op
/// does (much as CUDA reports an asynchronous error on a later call).
pub fn enqueue(
    device: &CudaDevice,
    handles: Vec<Handle>,
    f: impl FnOnce(&lt::Ctx, &[u64]) -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    if !super::switch::ASYNC_SUBMIT.on() {
        return run(device, handles, f);
    }
    take_deferred()?;
    let id = device.to_id();
    let bindings: Vec<_> = handles.into_iter().map(|h| h.binding()).collect();
    let mode = ordering();
    let dh = DeviceHandle::<Server>::new(id);
    dh.submit(move |server: &mut Server| {
        if let Err(e) = on_runner(server, id.index_id, mode, bindings, f) {
            if let Ok(mut slot) = DEFERRED.lock() {
                slot.get_or_insert(e);
            }
        }
    });
    Ok(())
}

/// The first error of a task queued by [`enqueue`], until a later call reports it.
static DEFERRED: Mutex<Option<String>> = Mutex::new(None);

fn take_deferred() -> Result<(), String> {
    let mut slot = DEFERRED
        .lock()
        .map_err(|_| "fused-op error slot poisoned".to_string())?;
    match slot.take() {
        Some(e) => Err(format!(
            "an earlier fused op failed on the device thread: {e}"
        )),
        None => Ok(()),
    }
}

/// The body of a fused-op task on the runner thread: resolves the bindings (ordering their
/// stream after any other that wrote them), picks the stream, runs `f`.
fn on_runner<T>(
    server: &mut Server,
    key: u16,
    mode: Ordering,
    bindings: Vec<cubecl_runtime::server::Binding>,
    f: impl FnOnce(&lt::Ctx, &[u64]) -> Result<T, String>,
) -> Result<T, String> {
    let sid = StreamId::current();
    let mut resources = Vec::with_capacity(bindings.len());
    for b in bindings {
        resources.push(
            server
                .get_resource(b, sid)
                .map_err(|e| format!("cubecl get_resource: {e:?}"))?,
        );
    }
    let ptrs: Vec<u64> = resources.iter().map(|r| r.resource().ptr).collect();
    let mut states = STATES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "fused-op device state poisoned".to_string())?;
    let state = states.entry(key).or_default();
    let handle = match state.handle {
        Some(h) => h,
        None => {
            let h = lt::create_handle()?;
            state.handle = Some(h);
            h
        }
    };
    let stream = match mode {
        Ordering::Stream => cubecl_stream(server, state, sid),
        _ => None,
    };
    ON_CUBECL_STREAM.store(stream.is_some(), AtomicOrdering::SeqCst);
    let (stream, host_sync) = match stream {
        Some(s) => (s, false),
        None => {
            if mode == Ordering::Stream && !state.warned {
                state.warned = true;
                eprintln!(
                    "burn-cuda-ops: cubecl's CUDA stream not found; fused ops synchronise the host instead"
                );
            }
            let s = match state.private_stream {
                Some(s) => s,
                None => {
                    let s = cudarc::driver::result::stream::create(
                        cudarc::driver::result::stream::StreamKind::NonBlocking,
                    )
                    .map_err(|e| format!("cuStreamCreate: {e:?}"))?
                        as usize;
                    state.private_stream = Some(s);
                    s
                }
            };
            (s, mode != Ordering::UnorderedForTests)
        }
    };
    // Overlap only where the stream orders everything; the fallbacks stay on one stream.
    let side = if host_sync || mode != Ordering::Stream {
        None
    } else {
        Some(side_for(state, stream)?)
    };
    let ctx = lt::Ctx {
        handle,
        stream,
        workspace: workspace(state, stream)?,
        workspace_bytes: WORKSPACE_BYTES,
        side,
    };
    drop(states);
    if host_sync {
        cudarc::driver::result::ctx::synchronize()
            .map_err(|e| format!("cuCtxSynchronize: {e:?}"))?;
    }
    let out = f(&ctx, &ptrs)?;
    if host_sync {
        // SAFETY: a stream created above, in this context.
        unsafe {
            cudarc::driver::result::stream::synchronize(stream as cudarc::driver::sys::CUstream)
        }
        .map_err(|e| format!("cuStreamSynchronize: {e:?}"))?;
    }
    drop(resources);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_streams;

    #[test]
    fn parses_the_stream_pool() {
        let text = "CudaServer { ctx: X, streams: MultiStream { streams: StreamPool { streams: [Some(StreamWrapper { stream: Stream { sys: 0x1a2b, memory: Foo { name: \"a ] b\", v: [1, 2] } }, cursor: 3, last_synced: {} }), None, Some(StreamWrapper { stream: Stream { sys: 0xff00, x: () }, cursor: 1 })], factory: F, max_streams: 2 } } }";
        assert_eq!(
            parse_streams(text),
            Some(vec![Some(0x1a2b), None, Some(0xff00)])
        );
    }
}
