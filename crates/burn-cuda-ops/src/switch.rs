//! Process-wide on/off switches for the fused ops, each read from an environment variable on
//! first use (`1` / `true` / `on` / `yes` or `0` / `false` / `off` / `no`; unset: on, or off for
//! the opt-in ones; any other value is reported once and leaves the default) and settable from
//! code, so that one binary can measure an op on and off.

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
                let on = std::env::var(self.env)
                    .ok()
                    .and_then(|v| parse(self.env, &v, self.default_on))
                    .unwrap_or(self.default_on);
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

/// A switch value: `Some(on)`, or `None` (after a message naming the variable and the values it
/// takes) for anything else; an empty value counts as unset.
fn parse(env: &str, value: &str, default_on: bool) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        "" => None,
        _ => {
            eprintln!(
                "burn-cuda-ops: {env}={value:?} is not an on/off value (1/0, true/false, on/off, \
                 yes/no); it stays {}",
                if default_on { "on" } else { "off" }
            );
            None
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
/// The cross-entropy's log-sum-exp and gradient as one kernel each ([`super::lse`]), else
/// Burn's reductions and elementwise passes (`PEFT_LORA_LSE_KERNEL`).
pub(crate) static LSE_KERNEL: Switch = Switch::new("PEFT_LORA_LSE_KERNEL");
/// The residual add fused with the next RMSNorm in inference ([`super::add_rms_norm`]), else
/// Burn's add and the RMSNorm kernel (`PEFT_LORA_ADD_NORM`).
pub(crate) static ADD_NORM: Switch = Switch::new("PEFT_LORA_ADD_NORM");
/// The low-rank term on a block of rows by offset ([`super::low_rank_linear_rows`]) in
/// inference, else the caller's masked input (`PEFT_LORA_ROW_BLOCK`; on since the session 19
/// lease: the side-by-side pass 0.750x against 0.755x with the mask, fewer launches).
pub(crate) static ROW_BLOCK: Switch = Switch::new("PEFT_LORA_ROW_BLOCK");
/// Linears that read one input as one queued task with one packed output
/// ([`super::shared_input_linear`]) in inference, else one op per linear
/// (`PEFT_LORA_SHARED_INPUT=1`; opt-in: mixed on an H100, +7% at batch 1 and -2-4% at batch
/// 64).
pub(crate) static SHARED_INPUT: Switch = Switch::opt_in("PEFT_LORA_SHARED_INPUT");
/// RoPE of a cached step's queries and keys with the cache writes as one kernel
/// ([`super::rope_append`]), else two RoPE kernels and two `slice_assign`
/// (`PEFT_LORA_ROPE_APPEND`).
pub(crate) static ROPE_APPEND: Switch = Switch::new("PEFT_LORA_ROPE_APPEND");
/// [`super::start_read`] queues its copy at once (`PEFT_LORA_QUEUED_READ`; on since the session
/// 19 lease: +5% at batch 1, +2% at batch 64, the same ids): off, it gives the tensor back and
/// the caller reads it the usual way.
pub(crate) static QUEUED_READ: Switch = Switch::new("PEFT_LORA_QUEUED_READ");
/// Greedy decoding's token choice as one kernel per batch ([`super::argmax`]), else Burn's
/// `argmax` (`PEFT_LORA_ARGMAX_KERNEL`).
pub(crate) static ARGMAX: Switch = Switch::new("PEFT_LORA_ARGMAX_KERNEL");
/// DoRA's norm kernels ([`crate::dora_norm`]) (`PEFT_LORA_DORA_NORM`).
pub(crate) static DORA_NORM: Switch = Switch::new("PEFT_LORA_DORA_NORM");
/// Sampling's token choice as one kernel ([`crate::sample`]) (`PEFT_LORA_SAMPLE_KERNEL`).
pub(crate) static SAMPLE: Switch = Switch::new("PEFT_LORA_SAMPLE_KERNEL");
/// The split-key attention of a decode step ([`super::attention_decode`]), else the GEMM path
/// (`PEFT_LORA_DECODE_ATTENTION=1`; opt-in: slower than the GEMM path on an H100, -1.5% at
/// batch 1 and -33% at batch 64).
pub(crate) static DECODE_ATTENTION: Switch = Switch::opt_in("PEFT_LORA_DECODE_ATTENTION");
/// The gradient norm and clip factor kept on the device ([`super::grad_scale`]), else read
/// before the optimizer's updates are queued (`PEFT_LORA_DEVICE_CLIP`).
pub(crate) static DEVICE_CLIP: Switch = Switch::new("PEFT_LORA_DEVICE_CLIP");
/// Kernels launched without cubecl's bounds checks ([`super::cube_util::launch`];
/// `PEFT_LORA_UNCHECKED_KERNELS=1`; opt-in: no gain measured on an H100).
pub(crate) static UNCHECKED: Switch = Switch::opt_in("PEFT_LORA_UNCHECKED_KERNELS");
/// A checkpointed layer's recomputation keeps its attention probabilities for the backward
/// ([`crate::attention::keeping_probs`]), else the backward recomputes them
/// (`PEFT_LORA_KEEP_PROBS`; on since session 21's H100 lease: q,v r8 with checkpointing
/// +3.4% tokens/s, +64 MiB nvidia-smi peak).
pub(crate) static KEEP_PROBS: Switch = Switch::new("PEFT_LORA_KEEP_PROBS");
/// The attention output's heads merged into the token-major layout by one kernel each way
/// ([`crate::heads`]), else Burn's copy of the transposed view (`PEFT_LORA_MERGE_HEADS=1`;
/// opt-in: no gain measured on an H100, 10,146 against 10,201 tok/s without it on q,v).
pub(crate) static MERGE_HEADS: Switch = Switch::opt_in("PEFT_LORA_MERGE_HEADS");
/// A checkpointed layer's backward started from a seeded root ([`crate::seeded_root`]): no
/// product with the output gradient, and no forward of a last projection that trains nothing
/// (`PEFT_LORA_SEEDED_BACKWARD`; on since session 22's H100 lease: q,v r8 with checkpointing
/// +6.8-7.1% tokens/s, -32 MiB nvidia-smi peak, the same losses).
pub(crate) static SEEDED_BACKWARD: Switch = Switch::new("PEFT_LORA_SEEDED_BACKWARD");
/// With [`SEEDED_BACKWARD`]: a checkpointed layer's last projection is skipped also when one
/// plain LoRA adapter trains it, its gradients computed from the output gradient
/// (`PEFT_LORA_SEEDED_ADAPTERS=1`; opt-in until a GPU has measured it). Read by peft-lora
/// ([`crate::seeded_adapters_enabled`]).
pub(crate) static SEEDED_ADAPTERS: Switch = Switch::opt_in("PEFT_LORA_SEEDED_ADAPTERS");
/// The optimizer's sums of squares as one launch per run of up to 32 tensors of one dtype
/// (`crate::adamw::sums_of_squares`) and its f32-master updates as one per run of up to 8
/// (`crate::adamw_update_master_many`), else one launch per tensor
/// (`PEFT_LORA_MULTI_TENSOR=1`; opt-in until a GPU has measured it).
pub(crate) static MULTI_TENSOR: Switch = Switch::opt_in("PEFT_LORA_MULTI_TENSOR");
/// Causal attention in row blocks ([`crate::causal_attention`]), for queries laid out
/// position-major (`PEFT_LORA_CAUSAL_ATTENTION=1`; opt-in until a GPU has measured it).
pub(crate) static CAUSAL_ATTENTION: Switch = Switch::opt_in("PEFT_LORA_CAUSAL_ATTENTION");
/// Checkpointed activations parked in pinned host memory (`PEFT_LORA_OFFLOAD`).
pub(crate) static OFFLOAD: Switch = Switch::new("PEFT_LORA_OFFLOAD");
/// Fused ops queued on cubecl's device thread without waiting (`PEFT_LORA_ASYNC_SUBMIT`).
pub(crate) static ASYNC_SUBMIT: Switch = Switch::new("PEFT_LORA_ASYNC_SUBMIT");

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn switch_values_are_read_as_users_write_them() {
        for v in ["1", "true", "ON", " yes "] {
            assert_eq!(parse("X", v, false), Some(true), "{v}");
        }
        for v in ["0", "false", "Off", "no"] {
            assert_eq!(parse("X", v, true), Some(false), "{v}");
        }
        // Unknown and empty values leave the default (the caller's `unwrap_or`).
        assert_eq!(parse("X", "maybe", true), None);
        assert_eq!(parse("X", "", false), None);
    }
}
