//! The SwiGLU gate `silu(gate) * up` as one cubecl kernel each way, with transformers' rounding
//! points (`act_fn(gate_proj(x)) * up_proj(x)` in the model's dtype, each op computed in f32):
//! - forward: `a = dtype(g sigmoid(g))`, `y = dtype(a u)`;
//! - backward: `du = dtype(dy a)`, `dg = dtype(dtype(dy u) s (1 + g (1 - s)))` with
//!   `s = sigmoid(g)`, as torch's `silu_backward`. Keeps `gate` and `up` only; the backward
//!   writes its gradients over `gate` and `dy` where nothing else holds them.
//!
//! Each unit handles a vector of up to 8 elements (one 16-byte bf16 load per input).
//!
//! Burn 0.21's composed `silu` computes the sigmoid as `exp(-log(1 + exp(-x)))` in f32: seven
//! kernels forward, each a pass over the `[tokens, intermediate]` activations, and several more
//! backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl_cuda::CudaRuntime;

use super::backend::Prim;
use super::cube_util::{elem_grid, elem_index, launch, vector_size, THREADS};
use super::kernels::{empty_as, start_vector, Raw};

/// One unit per vector of `N` elements (8 where the size allows: 16-byte bf16 loads). The
/// inputs are rows of `cols` vectors, `ld_gate` and `ld_up` vectors apart (the column blocks of
/// one packed gate/up projection are read in place; a dense input is one row); the output is
/// dense.
#[cube(launch, launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu_forward_kernel<E: Float, N: Size>(
    gate: &Tensor<Vector<E, N>>,
    up: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    len: u32,
    cols: u32,
    ld_gate: u32,
    ld_up: u32,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= len as usize {
        terminate!();
    }
    let (row, col) = (i / cols as usize, i % cols as usize);
    let one = Vector::new(f32::new(1.0));
    let g = Vector::<f32, N>::cast_from(gate[row * ld_gate as usize + col]);
    // (`zero - g`: CUDA has no unary minus on cubecl's vector types.)
    let zero = Vector::new(f32::new(0.0));
    let act = Vector::<E, N>::cast_from(g / (one + (zero - g).exp()));
    let u = Vector::<f32, N>::cast_from(up[row * ld_up as usize + col]);
    out[i] = Vector::cast_from(Vector::<f32, N>::cast_from(act) * u);
}

#[cube(launch, launch_unchecked)]
pub(crate) fn swiglu_backward_kernel<E: Float, N: Size>(
    dy: &Tensor<Vector<E, N>>,
    gate: &Tensor<Vector<E, N>>,
    up: &Tensor<Vector<E, N>>,
    dgate: &mut Tensor<Vector<E, N>>,
    dup: &mut Tensor<Vector<E, N>>,
    len: u32,
    #[define(E)] _dtype: StorageType,
) {
    let i = elem_index();
    if i >= len as usize {
        terminate!();
    }
    // Every load before any store: `dgate` may alias `gate` and `dup` alias `dy`.
    let g = Vector::<f32, N>::cast_from(gate[i]);
    let d = Vector::<f32, N>::cast_from(dy[i]);
    let u = Vector::<f32, N>::cast_from(up[i]);
    let one = Vector::new(f32::new(1.0));
    let zero = Vector::new(f32::new(0.0));
    let s = one / (one + (zero - g).exp());
    let act = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(g * s));
    let da = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(d * u));
    dup[i] = Vector::cast_from(d * act);
    dgate[i] = Vector::cast_from(da * s * (one + g * (one - s)));
}

/// `silu(gate) * up`, elementwise over tensors of one shape. Two-dimensional inputs whose rows
/// lie at a stride (column blocks of a wider tensor) are read in place; anything else is made
/// contiguous first.
pub fn forward(gate: Raw, up: Raw) -> Raw {
    let shape = gate.meta.shape().clone();
    let n = shape.num_elements();
    // A 2-D input as rows: its row stride (elements), and the widest vector its start allows.
    let rows_of = |t: &Raw| -> Option<(usize, usize)> {
        let (s, st) = (t.meta.shape(), t.meta.strides());
        if s.num_dims() != 2 || !(st[1] == 1 || s[1] == 1) {
            return None;
        }
        let ld = if s[0] == 1 { s[1] } else { st[0] };
        (ld >= s[1]).then_some((ld, start_vector(t)))
    };
    let (gate, up, rows, cols, ld_g, ld_u, align) = match (rows_of(&gate), rows_of(&up)) {
        (Some((lg, ag)), Some((lu, au))) if gate.meta.shape() == up.meta.shape() => {
            (gate, up, shape[0], shape[1], lg, lu, ag.min(au))
        }
        _ => (into_contiguous(gate), into_contiguous(up), 1, n, n, n, 8),
    };
    let v = vector_size(cols)
        .min(vector_size(ld_g))
        .min(vector_size(ld_u))
        .min(align);
    let out = empty_as(&gate, shape, gate.dtype);
    let dtype = gate.dtype;
    launch!(swiglu_forward_kernel::<CudaRuntime>(
        &gate.client.clone(),
        elem_grid(rows * cols / v),
        CubeDim::new_1d(THREADS),
        v,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (rows * cols / v) as u32,
        (cols / v) as u32,
        (ld_g / v) as u32,
        (ld_u / v) as u32,
        dtype.into(),
    ));
    out
}

/// A tensor whose buffer an output may take over: no other handle to it, dense.
fn reusable(t: &Raw) -> bool {
    t.can_mut() && t.is_contiguous() && t.is_contiguous_buffer()
}

/// `(dgate, dup)` from the output gradient and the two inputs.
///
/// `dgate` takes `gate`'s buffer and `dup` takes `dy`'s where nothing else holds them (as in
/// the training step's backward): two fewer `[tokens, intermediate]` buffers at the MLP's
/// backward, which the step's exact-size memory pool would otherwise keep reserved all run.
pub fn backward(dy: Raw, gate: Raw, up: Raw) -> (Raw, Raw) {
    let (dy, gate, up) = (
        into_contiguous(dy),
        into_contiguous(gate),
        into_contiguous(up),
    );
    let shape = gate.meta.shape().clone();
    let n = shape.num_elements();
    let v = vector_size(n);
    let dtype = gate.dtype;
    // An output over kernel input `pos` (0 dy, 1 gate, 2 up) when its buffer can be taken,
    // else a new buffer.
    let output = |t: &Raw, pos: usize| {
        if reusable(t) && t.meta.shape() == &shape && t.dtype == dtype {
            (t.clone(), t.as_tensor_alias(pos))
        } else {
            let fresh = empty_as(&gate, shape.clone(), dtype);
            (fresh.clone(), fresh.into_tensor_arg())
        }
    };
    let (dgate, dgate_arg) = output(&gate, 1);
    let (dup, dup_arg) = output(&dy, 0);
    launch!(swiglu_backward_kernel::<CudaRuntime>(
        &gate.client.clone(),
        elem_grid(n / v),
        CubeDim::new_1d(THREADS),
        v,
        dy.into_tensor_arg(),
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        dgate_arg,
        dup_arg,
        (n / v) as u32,
        dtype.into(),
    ));
    (dgate, dup)
}

/// Backends with the SwiGLU op (raw cubecl CUDA, with or without autodiff).
pub trait FusedSwiglu: Backend {
    /// `silu(gate) * up`.
    fn fused_swiglu(gate: Prim<Self>, up: Prim<Self>) -> Prim<Self>;
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> FusedSwiglu
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn fused_swiglu(gate: Raw, up: Raw) -> Raw {
        forward(gate, up)
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<CudaRuntime, F, I, BT>, 2> for SwigluBackward
{
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        type Cb<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;
        let [pg, pu] = ops.parents;
        let dy = grads.consume::<Cb<F, I, BT>>(&ops.node);
        let (g, u) = ops.state;
        let gate = ckpt.retrieve_node_output::<Raw>(g);
        let up = ckpt.retrieve_node_output::<Raw>(u);
        let (dg, du) = backward(dy, gate, up);
        if let Some(node) = pg {
            grads.register::<Cb<F, I, BT>>(node.id, dg);
        }
        if let Some(node) = pu {
            grads.register::<Cb<F, I, BT>>(node.id, du);
        }
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement, C: CheckpointStrategy> FusedSwiglu
    for Autodiff<CubeBackend<CudaRuntime, F, I, BT>, C>
{
    fn fused_swiglu(gate: Prim<Self>, up: Prim<Self>) -> Prim<Self> {
        match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let g = prep.checkpoint(&gate);
                let u = prep.checkpoint(&up);
                prep.finish((g, u), forward(gate.primitive, up.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(gate.primitive, up.primitive)),
        }
    }
}
