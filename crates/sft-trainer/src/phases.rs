//! Where a training step's time goes, when `PEFT_TRAIN_PHASES=1`: per optimizer step, the host
//! time spent queueing the forward and backward (up to the last gradient handed over), the wall
//! time until the loss is read (the device done with them), and the optimizer's host and wall
//! time (the device synchronised after it). A step whose queueing time is close to its wall
//! time is bound by the host, not the device. Off by default: the extra synchronisation after
//! the optimizer costs a little overlap.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;

/// The environment switch.
pub const ENV: &str = "PEFT_TRAIN_PHASES";

/// Phase times of the current step (all zero and never printed when off).
#[derive(Debug)]
pub struct PhaseClock {
    on: bool,
    start: Instant,
    last_grads: Option<Instant>,
    queued: Duration,
    forward_backward: Duration,
}

impl PhaseClock {
    /// On when `PEFT_TRAIN_PHASES` is `1` / `true` / `on`.
    pub fn from_env() -> Self {
        Self {
            on: crate::switch::env_switch(ENV) == Some(true),
            start: Instant::now(),
            last_grads: None,
            queued: Duration::ZERO,
            forward_backward: Duration::ZERO,
        }
    }

    /// Whether the phases are timed (the trainer then reads each micro-batch's loss at once,
    /// so that "forward + backward" is the device's time).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// A micro-batch's forward and backward start being queued.
    pub fn micro_batch_start(&mut self) {
        if self.on {
            self.start = Instant::now();
            self.last_grads = None;
        }
    }

    /// A gradient container was handed to the accumulator (the last one ends the queueing).
    pub fn grads_handed(&mut self) {
        if self.on {
            self.last_grads = Some(Instant::now());
        }
    }

    /// The micro-batch's loss was read: the device has finished its forward and backward.
    pub fn micro_batch_done(&mut self) {
        if self.on {
            let end = Instant::now();
            self.queued += self.last_grads.unwrap_or(end) - self.start;
            self.forward_backward += end - self.start;
        }
    }

    /// Runs the optimizer step `f`, timing its host part and (synchronising) its device part,
    /// then prints the step's phases and starts the next step's.
    pub fn optimizer<B: Backend, R>(
        &mut self,
        step: u64,
        device: &B::Device,
        f: impl FnOnce() -> R,
    ) -> R {
        if !self.on {
            return f();
        }
        let t = Instant::now();
        let out = f();
        let host = t.elapsed();
        let _ = B::sync(device);
        let wall = t.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "phases step {step}: forward+backward queued in {:.1} ms, done in {:.1} ms; \
             optimizer queued in {:.1} ms, done in {:.1} ms",
            ms(self.queued),
            ms(self.forward_backward),
            ms(host),
            ms(wall)
        );
        self.queued = Duration::ZERO;
        self.forward_backward = Duration::ZERO;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn clock(on: bool) -> PhaseClock {
        PhaseClock {
            on,
            ..PhaseClock::from_env()
        }
    }

    #[test]
    fn queueing_time_ends_at_the_last_gradients_and_a_step_starts_from_zero() {
        let mut c = clock(true);
        for _ in 0..2 {
            c.micro_batch_start();
            std::thread::sleep(Duration::from_millis(5));
            c.grads_handed();
            std::thread::sleep(Duration::from_millis(20));
            c.micro_batch_done();
        }
        // Two micro-batches: each queued >= 5 ms, done >= 25 ms.
        assert!(c.queued >= Duration::from_millis(10), "{:?}", c.queued);
        assert!(c.forward_backward >= Duration::from_millis(50));
        assert!(c.queued + Duration::from_millis(40) <= c.forward_backward);
        let out = c.optimizer::<NdArray, _>(1, &Default::default(), || 7);
        assert_eq!(out, 7);
        assert_eq!(
            (c.queued, c.forward_backward),
            (Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn off_it_records_nothing() {
        let mut c = clock(false);
        c.micro_batch_start();
        c.grads_handed();
        c.micro_batch_done();
        assert_eq!(
            c.optimizer::<NdArray, _>(1, &Default::default(), || "x"),
            "x"
        );
        assert_eq!(
            (c.queued, c.forward_backward),
            (Duration::ZERO, Duration::ZERO)
        );
    }
}
