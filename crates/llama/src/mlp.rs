//! The SwiGLU MLP of a decoder layer (`model.layers.N.mlp`).

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Tensor};
use peft_lora::{LoraCtx, LoraLinear, LoraModel};

use crate::attention::{load_linear, random_linear};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::weights::VarBuilder;

/// `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Module, Debug, LoraModel)]
pub struct Mlp<B: Backend> {
    /// Gate projection `[hidden, intermediate]`.
    pub gate_proj: LoraLinear<B>,
    /// Up projection `[hidden, intermediate]`.
    pub up_proj: LoraLinear<B>,
    /// Down projection `[intermediate, hidden]`.
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// From a checkpoint (`vb` at `model.layers.N.mlp`).
    pub fn load(vb: &VarBuilder<'_, B>, c: &LlamaConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut m = Mlp {
            gate_proj: load_linear(&vb.pp("gate_proj"), h, i, c.mlp_bias)?,
            up_proj: load_linear(&vb.pp("up_proj"), h, i, c.mlp_bias)?,
            down_proj: load_linear(&vb.pp("down_proj"), i, h, c.mlp_bias)?,
        };
        if !vb.nf4() {
            m.pack_gate_up()?;
        }
        Ok(m)
    }

    /// With the shared-input op on (`PEFT_LORA_SHARED_INPUT=1`), lays the gate and up weights
    /// side by side in one buffer ([`LoraLinear::pack_shared_input`]): one GEMM for both, whose
    /// output's two column blocks the SwiGLU kernel reads in place.
    fn pack_gate_up(&mut self) -> Result<()> {
        if crate::ops::shared_input_enabled() {
            LoraLinear::pack_shared_input(&mut [&mut self.gate_proj, &mut self.up_proj])?;
        }
        Ok(())
    }

    /// Random weights.
    pub fn random(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut m = Mlp {
            gate_proj: random_linear(h, i, c.mlp_bias, device),
            up_proj: random_linear(h, i, c.mlp_bias, device),
            down_proj: random_linear(i, h, c.mlp_bias, device),
        };
        m.pack_gate_up()
            .expect("gate and up are built with one input width and dtype");
        m
    }

    /// # Shapes
    /// `[batch, seq, hidden]` -> the same.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LoraCtx) -> Tensor<B, 3> {
        self.down_proj.forward_ctx(self.down_input(x, ctx), ctx)
    }

    /// `silu(gate_proj(x)) * up_proj(x)`, the input of `down_proj`.
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` -> `[batch, seq, intermediate]`.
    pub(crate) fn down_input(&self, x: Tensor<B, 3>, ctx: &LoraCtx) -> Tensor<B, 3> {
        // One op over the shared input where it runs (else the two projections).
        let [gate, up]: [Tensor<B, 3>; 2] =
            LoraLinear::forward_shared(&[&self.gate_proj, &self.up_proj], x, ctx)
                .try_into()
                .expect("two projections give two outputs");
        // On CUDA: one kernel each way (`crate::ops::swiglu`).
        crate::ops::swiglu(&gate, &up).unwrap_or_else(|| activation::silu(gate) * up)
    }
}
