//! The fused linear on Burn's fusion backend (feature `fusion`, i.e. `burn::backend::Cuda` built
//! with fusion): each op is a fusion custom operation that runs the raw cubecl op on its inputs.

use std::marker::PhantomData;

use burn::tensor::Shape;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::attention::{AttentionOps, FusedAttention, KeptProbs, Layout};
use super::autodiff::FusedLinear;
use super::backend::{FusedOps, Prim};
use super::cross_entropy::{CrossEntropyOps, FusedCrossEntropy, IntPrim};
use super::kernels::{LowRankGrads, LowRankInputs, LowRankNeeds, LowRankSaved};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

fn empty_ir<R: FusionRuntime>(like: &FusionTensor<R>, shape: [usize; 2]) -> TensorIr {
    empty_like_ir(like, Shape::new(shape), like.dtype)
}

/// A fusion custom operation: `run` fetches the op's inputs from the handle container, runs the
/// raw cubecl op and registers its outputs (see [`floats`] and [`put`]).
struct Custom<B, F> {
    desc: CustomOpIr,
    run: F,
    _b: PhantomData<fn() -> B>,
}

impl<B, F> std::fmt::Debug for Custom<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custom").field("desc", &self.desc).finish()
    }
}

impl<B, F> Operation<B::FusionRuntime> for Custom<B, F>
where
    B: FusionBackend,
    F: Fn(&CustomOpIr, &mut Handles<B>) + Send + Sync,
{
    fn execute(&self, h: &mut Handles<B>) {
        (self.run)(&self.desc, h)
    }
}

/// Registers the custom op `id` on `inputs` with `outputs` (uninitialised), executed by `run`.
fn register<B: FusionBackend>(
    id: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: Vec<TensorIr>,
    run: impl Fn(&CustomOpIr, &mut Handles<B>) + Send + Sync + 'static,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(id, &irs, &outputs);
    let op = Custom::<B, _> {
        desc: desc.clone(),
        run,
        _b: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// The float inputs of `desc`, from the first, in order.
fn floats<B: FusionBackend>(desc: &CustomOpIr, h: &mut Handles<B>) -> Vec<B::FloatTensorPrimitive> {
    desc.inputs
        .iter()
        .map(|t| h.get_float_tensor::<B>(t))
        .collect()
}

/// Registers `results` as the outputs of `desc`, in order.
fn put<B: FusionBackend>(
    desc: &CustomOpIr,
    h: &mut Handles<B>,
    results: impl IntoIterator<Item = B::FloatTensorPrimitive>,
) {
    for (ir, t) in desc.outputs.iter().zip(results) {
        h.register_float_tensor::<B>(&ir.id, t);
    }
}

fn dims<R: FusionRuntime>(t: &FusionTensor<R>) -> [usize; 2] {
    [t.shape[0], t.shape[1]]
}

impl<B: FusionBackend + FusedOps> FusedOps for Fusion<B> {
    fn fused_linear_forward(x: Prim<Self>, w: Prim<Self>, bias: Option<Prim<Self>>) -> Prim<Self> {
        let out = empty_ir(&x, [dims(&x)[0], dims(&w)[1]]);
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        register::<B>("cuda_ops_linear_fwd", inputs, vec![out], |d, h| {
            let mut i = floats::<B>(d, h).into_iter();
            let (x, w) = (i.next().expect("x"), i.next().expect("w"));
            put::<B>(d, h, [B::fused_linear_forward(x, w, i.next())]);
        })
        .remove(0)
    }

    fn fused_linear_backward(dy: Prim<Self>, w: Prim<Self>) -> Prim<Self> {
        let out = empty_ir(&dy, [dims(&dy)[0], dims(&w)[0]]);
        register::<B>("cuda_ops_linear_bwd", vec![dy, w], vec![out], |d, h| {
            let mut i = floats::<B>(d, h).into_iter();
            let (dy, w) = (i.next().expect("dy"), i.next().expect("w"));
            put::<B>(d, h, [B::fused_linear_backward(dy, w)]);
        })
        .remove(0)
    }

    fn fused_low_rank_forward(inp: LowRankInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>) {
        let n = dims(&inp.x)[0];
        let y = empty_ir(&inp.x, [n, dims(&inp.w)[1]]);
        let xa = empty_ir(&inp.x, [n, dims(&inp.a)[1]]);
        let (has_xd, has_bias) = (inp.xd.is_some(), inp.bias.is_some());
        let mut inputs = vec![inp.x];
        inputs.extend(inp.xd);
        inputs.push(inp.w);
        inputs.extend(inp.bias);
        inputs.push(inp.a);
        inputs.push(inp.b);
        let scale = inp.scale;
        let mut out = register::<B>("cuda_ops_fwd", inputs, vec![y, xa], move |d, h| {
            let mut i = floats::<B>(d, h).into_iter();
            let mut next = || i.next().expect("input");
            let x = next();
            let xd = has_xd.then(&mut next);
            let w = next();
            let bias = has_bias.then(&mut next);
            let (a, b) = (next(), next());
            let inputs = LowRankInputs {
                x,
                xd,
                w,
                bias,
                a,
                b,
                scale,
            };
            let (y, xa) = B::fused_low_rank_forward(inputs);
            put::<B>(d, h, [y, xa]);
        });
        let xa = out.pop().expect("xa");
        let y = out.pop().expect("y");
        (y, xa)
    }

    fn fused_low_rank_backward(
        dy: Prim<Self>,
        saved: LowRankSaved<Prim<Self>>,
        needs: LowRankNeeds,
    ) -> LowRankGrads<Prim<Self>> {
        let [n, d_out] = dims(&dy);
        let [d_in, r] = dims(&saved.a);
        let need_dxd = needs.split && needs.dxd;
        let mut outputs = Vec::new();
        for (want, shape) in [
            (needs.dx, [n, d_in]),
            (need_dxd, [n, d_in]),
            (needs.da, [d_in, r]),
            (needs.db, [r, d_out]),
        ] {
            if want {
                outputs.push(empty_ir(&dy, shape));
            }
        }
        let (has_xd, has_xa) = (saved.xd.is_some(), saved.xa.is_some());
        let mut inputs = vec![dy];
        inputs.extend(saved.xd);
        inputs.extend(saved.xa);
        inputs.extend([saved.w, saved.a, saved.b]);
        let scale = saved.scale;
        let mut out = register::<B>("cuda_ops_bwd", inputs, outputs, move |d, h| {
            let mut i = floats::<B>(d, h).into_iter();
            let mut next = || i.next().expect("input");
            let dy = next();
            let xd = has_xd.then(&mut next);
            let xa = has_xa.then(&mut next);
            let (w, a, b) = (next(), next(), next());
            let saved = LowRankSaved {
                xd,
                xa,
                w,
                a,
                b,
                scale,
            };
            let g = B::fused_low_rank_backward(dy, saved, needs);
            put::<B>(d, h, [g.dx, g.dxd, g.da, g.db].into_iter().flatten());
        })
        .into_iter();
        LowRankGrads {
            dx: needs.dx.then(|| out.next().expect("dx")),
            dxd: need_dxd.then(|| out.next().expect("dxd")),
            da: needs.da.then(|| out.next().expect("da")),
            db: needs.db.then(|| out.next().expect("db")),
        }
    }
}

impl<B: FusionBackend + FusedOps> FusedLinear for Fusion<B> {
    fn frozen_linear(x: Prim<Self>, w: Prim<Self>, bias: Option<Prim<Self>>) -> Prim<Self> {
        Self::fused_linear_forward(x, w, bias)
    }

    fn low_rank_linear(inp: LowRankInputs<Prim<Self>>) -> Prim<Self> {
        Self::fused_low_rank_forward(inp).0
    }
}

fn empty_like_ir<R: FusionRuntime>(
    like: &FusionTensor<R>,
    shape: Shape,
    dtype: burn::tensor::DType,
) -> TensorIr {
    TensorIr::uninit(like.client.create_empty_handle(), shape, dtype)
}

impl<B: FusionBackend + AttentionOps> AttentionOps for Fusion<B> {
    fn attention_forward(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
        layout: Layout,
    ) -> Prim<Self> {
        let out = empty_like_ir(&q, q.shape.clone(), q.dtype);
        let inputs = vec![q, k, v, mask];
        register::<B>("cuda_ops_attention_fwd", inputs, vec![out], move |d, h| {
            let [q, k, v, m]: [_; 4] = floats::<B>(d, h).try_into().expect("4 inputs");
            put::<B>(d, h, [B::attention_forward(q, k, v, m, scale, layout)]);
        })
        .remove(0)
    }

    /// (The forward keeps nothing under the fusion backend: the trait's default
    /// `attention_forward_keeping`. The backward recomputes.)
    fn attention_backward(
        dout: Prim<Self>,
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        _probs: Option<KeptProbs<Prim<Self>>>,
        scale: f32,
        layout: Layout,
    ) -> [Prim<Self>; 3] {
        let outs = [&q, &k, &v].map(|t| empty_like_ir(t, t.shape.clone(), t.dtype));
        let inputs = vec![dout, q, k, v, mask];
        let mut g = register::<B>(
            "cuda_ops_attention_bwd",
            inputs,
            outs.to_vec(),
            move |d, h| {
                let [dout, q, k, v, m]: [_; 5] = floats::<B>(d, h).try_into().expect("5 inputs");
                put::<B>(
                    d,
                    h,
                    B::attention_backward(dout, q, k, v, m, None, scale, layout),
                );
            },
        )
        .into_iter();
        [(); 3].map(|_| g.next().expect("attention gradient"))
    }
}

impl<B: FusionBackend + AttentionOps> FusedAttention for Fusion<B> {
    fn fused_attention(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
        layout: Layout,
    ) -> Prim<Self> {
        Self::attention_forward(q, k, v, mask, scale, layout)
    }
}

impl<B: FusionBackend + CrossEntropyOps> CrossEntropyOps for Fusion<B> {
    fn ce_forward(
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
    ) -> (Prim<Self>, Prim<Self>) {
        use burn::tensor::DType;
        let n = h.shape[0];
        let loss = empty_like_ir(&h, Shape::new([1]), DType::F32);
        let lse = empty_like_ir(&h, Shape::new([n]), DType::F32);
        let inputs = vec![h, w, targets];
        let mut out = register::<B>("cuda_ops_ce_fwd", inputs, vec![loss, lse], |d, h| {
            let i = &d.inputs;
            let hid = h.get_float_tensor::<B>(&i[0]);
            let w = h.get_float_tensor::<B>(&i[1]);
            let t = h.get_int_tensor::<B>(&i[2]);
            let (loss, lse) = B::ce_forward(hid, w, t);
            put::<B>(d, h, [loss, lse]);
        });
        let lse = out.pop().expect("lse");
        (out.pop().expect("loss"), lse)
    }

    fn ce_backward(
        d: Prim<Self>,
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
        lse: Prim<Self>,
    ) -> Prim<Self> {
        let dh = empty_like_ir(&h, h.shape.clone(), h.dtype);
        let inputs = vec![d, h, w, targets, lse];
        register::<B>("cuda_ops_ce_bwd", inputs, vec![dh], |desc, h| {
            let i = &desc.inputs;
            let [d, hid, w] = [0, 1, 2].map(|n| h.get_float_tensor::<B>(&i[n]));
            let t = h.get_int_tensor::<B>(&i[3]);
            let lse = h.get_float_tensor::<B>(&i[4]);
            put::<B>(desc, h, [B::ce_backward(d, hid, w, t, lse)]);
        })
        .remove(0)
    }
}

impl<B: FusionBackend + CrossEntropyOps> FusedCrossEntropy for Fusion<B> {
    fn fused_linear_cross_entropy(
        h: Prim<Self>,
        w: Prim<Self>,
        targets: IntPrim<Self>,
    ) -> Prim<Self> {
        Self::ce_forward(h, w, targets).0
    }
}
