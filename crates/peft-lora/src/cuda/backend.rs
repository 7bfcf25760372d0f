//! The fused linear as a backend extension, implemented by the raw cubecl CUDA backend (and,
//! with the `fusion` feature, by Burn's fusion backend on top of it: [`super::fusion`]).

use burn::tensor::backend::Backend;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;

use super::kernels::{self, LoraGrads, LoraInputs, LoraNeeds, LoraSaved};

/// A backend's float tensor primitive.
pub type Prim<B> = <B as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// Inner (non-autodiff) backends that run the fused linear ops. The autodiff backend builds its
/// forward and backward from these.
pub trait FusedOps: Backend {
    /// `y = x W (+ bias)`.
    fn fused_linear_forward(x: Prim<Self>, w: Prim<Self>, bias: Option<Prim<Self>>) -> Prim<Self>;
    /// `dx = dy W^T`.
    fn fused_linear_backward(dy: Prim<Self>, w: Prim<Self>) -> Prim<Self>;
    /// `(y, xa)`: `y = x W (+ bias) + s (xd A) B`, `xa = xd A`.
    fn fused_lora_forward(inp: LoraInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>);
    /// The gradients `needs` asks for, from the output gradient `dy`.
    fn fused_lora_backward(
        dy: Prim<Self>,
        saved: LoraSaved<Prim<Self>>,
        needs: LoraNeeds,
    ) -> LoraGrads<Prim<Self>>;
}

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("peft-lora fused CUDA op: {e}"))
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedOps
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_linear_forward(x: Prim<Self>, w: Prim<Self>, bias: Option<Prim<Self>>) -> Prim<Self> {
        ok(kernels::linear_forward(x, w, bias))
    }

    fn fused_linear_backward(dy: Prim<Self>, w: Prim<Self>) -> Prim<Self> {
        ok(kernels::linear_backward(dy, w))
    }

    fn fused_lora_forward(inp: LoraInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>) {
        ok(kernels::lora_forward(inp))
    }

    fn fused_lora_backward(
        dy: Prim<Self>,
        saved: LoraSaved<Prim<Self>>,
        needs: LoraNeeds,
    ) -> LoraGrads<Prim<Self>> {
        ok(kernels::lora_backward(dy, saved, needs))
    }
}
