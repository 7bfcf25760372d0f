//! GPU time of work enqueued on one CUDA stream, from a pair of CUDA events (no host time in it).

use cudarc::driver::result::event;
use cudarc::driver::sys::{CUevent, CUevent_flags, CUstream};

/// Times `f` (which enqueues work on `stream`) `iters` times after one untimed call: the mean
/// GPU milliseconds per call. Blocks the calling thread until the stream reaches the end.
pub(crate) fn time_on_stream(
    stream: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let start = event::create(CUevent_flags::CU_EVENT_DEFAULT)
        .map_err(|e| format!("cuEventCreate: {e:?}"))?;
    let stop = match event::create(CUevent_flags::CU_EVENT_DEFAULT) {
        Ok(e) => e,
        Err(e) => {
            // SAFETY: created above and not used since.
            unsafe { event::destroy(start) }.ok();
            return Err(format!("cuEventCreate: {e:?}"));
        }
    };
    let result = timed(stream, iters, start, stop, &mut f);
    // SAFETY: both events were created above; destroying one still pending is allowed.
    unsafe {
        event::destroy(start).ok();
        event::destroy(stop).ok();
    }
    result
}

fn timed(
    stream: usize,
    iters: usize,
    start: CUevent,
    stop: CUevent,
    f: &mut impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    fn err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String {
        move |e| format!("{what}: {e:?}")
    }
    f()?;
    // SAFETY: live events and a live stream of the current context.
    unsafe {
        event::record(start, stream as CUstream).map_err(err("cuEventRecord"))?;
        for _ in 0..iters {
            f()?;
        }
        event::record(stop, stream as CUstream).map_err(err("cuEventRecord"))?;
        event::synchronize(stop).map_err(err("cuEventSynchronize"))?;
        let ms = event::elapsed(start, stop).map_err(err("cuEventElapsedTime"))?;
        Ok(ms as f64 / iters.max(1) as f64)
    }
}
