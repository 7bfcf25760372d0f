//! The fused linear as a backend extension, implemented by the raw cubecl CUDA backend (and,
//! with the `fusion` feature, by Burn's fusion backend on top of it: [`super::fusion`]).

use burn::tensor::backend::Backend;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;

use super::kernels::{self, LowRankGrads, LowRankInputs, LowRankNeeds, LowRankSaved};

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
    fn fused_low_rank_forward(inp: LowRankInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>);
    /// The gradients `needs` asks for, from the output gradient `dy`.
    fn fused_low_rank_backward(
        dy: Prim<Self>,
        saved: LowRankSaved<Prim<Self>>,
        needs: LowRankNeeds,
    ) -> LowRankGrads<Prim<Self>>;
}

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("burn-cuda-ops op: {e}"))
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

    fn fused_low_rank_forward(inp: LowRankInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>) {
        ok(kernels::low_rank_forward(inp))
    }

    fn fused_low_rank_backward(
        dy: Prim<Self>,
        saved: LowRankSaved<Prim<Self>>,
        needs: LowRankNeeds,
    ) -> LowRankGrads<Prim<Self>> {
        ok(kernels::low_rank_backward(dy, saved, needs))
    }
}
