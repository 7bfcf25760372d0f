//! Process-wide on/off switches for the fused ops, each read from an environment variable on
//! first use (on unless the variable is `0`; opt-in switches: off unless it is `1`) and settable
//! from code, so that one binary can measure an op on and off.

use std::sync::atomic::{AtomicU8, Ordering};

/// One switch: `env` gives the default, [`Switch::set`] overrides it.
pub(crate) struct Switch {
    env: &'static str,
    /// The state when the variable is unset.
    default_on: bool,
    /// 0: not read yet, 1: on, 2: off.
    state: AtomicU8,
}

impl Switch {
    /// A switch read from `env` on first use.
    pub(crate) const fn new(env: &'static str) -> Self {
        Switch {
            env,
            default_on: true,
            state: AtomicU8::new(0),
        }
    }

    /// An opt-in switch: on only when `env` is `1`.
    pub(crate) const fn opt_in(env: &'static str) -> Self {
        Switch {
            env,
            default_on: false,
            state: AtomicU8::new(0),
        }
    }

    /// Turns the switch on or off (overrides the environment).
    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::SeqCst);
    }

    /// Whether the switch is on.
    pub(crate) fn on(&self) -> bool {
        match self.state.load(Ordering::SeqCst) {
            0 => {
                let on = match std::env::var(self.env) {
                    Ok(v) if self.default_on => v != "0",
                    Ok(v) => v == "1",
                    Err(_) => self.default_on,
                };
                // A concurrent `set` wins over the environment.
                let _ = self.state.compare_exchange(
                    0,
                    if on { 1 } else { 2 },
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                self.state.load(Ordering::SeqCst) == 1
            }
            v => v == 1,
        }
    }
}

/// The fused linear and everything else (`PEFT_LORA_FUSED`).
pub(crate) static FUSED: Switch = Switch::new("PEFT_LORA_FUSED");
/// Attention, head + cross-entropy and RMSNorm ops (`PEFT_LORA_FUSED_ATTENTION`).
pub(crate) static STEP_OPS: Switch = Switch::new("PEFT_LORA_FUSED_ATTENTION");
/// SwiGLU, RoPE and dropout kernels (`PEFT_LORA_ELEMENTWISE_KERNELS`).
pub(crate) static ELEMENTWISE: Switch = Switch::new("PEFT_LORA_ELEMENTWISE_KERNELS");
/// The one-kernel AdamW update and sum of squares (`PEFT_LORA_FUSED_ADAMW`).
pub(crate) static ADAMW: Switch = Switch::new("PEFT_LORA_FUSED_ADAMW");
/// The attention's softmax kernels, else Burn's composed softmax (`PEFT_LORA_SOFTMAX_KERNEL`).
pub(crate) static SOFTMAX: Switch = Switch::new("PEFT_LORA_SOFTMAX_KERNEL");
/// Fused ops queued on cubecl's device thread without waiting (`PEFT_LORA_ASYNC_SUBMIT`).
pub(crate) static ASYNC_SUBMIT: Switch = Switch::new("PEFT_LORA_ASYNC_SUBMIT");
