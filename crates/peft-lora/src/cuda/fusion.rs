//! The fused linear on Burn's fusion backend (feature `fusion`, i.e. `burn::backend::Cuda` built
//! with fusion): each op is a fusion custom operation that runs the raw cubecl op on its inputs.

use std::marker::PhantomData;

use burn::tensor::Shape;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::attention::{AttentionOps, FusedAttention};
use super::autodiff::FusedLinear;
use super::backend::{FusedOps, Prim};
use super::cross_entropy::{CrossEntropyOps, FusedCrossEntropy, IntPrim};
use super::kernels::{LoraGrads, LoraInputs, LoraNeeds, LoraSaved};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

fn empty_ir<R: FusionRuntime>(like: &FusionTensor<R>, shape: [usize; 2]) -> TensorIr {
    empty_like_ir(like, Shape::new(shape), like.dtype)
}

fn register<B: FusionBackend, O: Operation<B::FusionRuntime> + 'static>(
    id: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: Vec<TensorIr>,
    make: impl FnOnce(CustomOpIr) -> O,
) -> Vec<FusionTensor<B::FusionRuntime>> {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(id, &irs, &outputs);
    client.register(streams, OperationIr::Custom(desc.clone()), make(desc))
}

#[derive(Debug)]
struct LinearFwd<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for LinearFwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let x = h.get_float_tensor::<B>(&i[0]);
        let w = h.get_float_tensor::<B>(&i[1]);
        let bias = i.get(2).map(|t| h.get_float_tensor::<B>(t));
        let y = B::fused_linear_forward(x, w, bias);
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
    }
}

#[derive(Debug)]
struct LinearBwd<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for LinearBwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let dy = h.get_float_tensor::<B>(&i[0]);
        let w = h.get_float_tensor::<B>(&i[1]);
        let dx = B::fused_linear_backward(dy, w);
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, dx);
    }
}

#[derive(Debug)]
struct LoraFwd<B> {
    desc: CustomOpIr,
    has_xd: bool,
    has_bias: bool,
    scale: f32,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for LoraFwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let mut it = self.desc.inputs.iter();
        let mut next = || h.get_float_tensor::<B>(it.next().expect("input"));
        let x = next();
        let xd = self.has_xd.then(&mut next);
        let w = next();
        let bias = self.has_bias.then(&mut next);
        let (a, b) = (next(), next());
        let (y, xa) = B::fused_lora_forward(LoraInputs {
            x,
            xd,
            w,
            bias,
            a,
            b,
            scale: self.scale,
        });
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
        h.register_float_tensor::<B>(&self.desc.outputs[1].id, xa);
    }
}

#[derive(Debug)]
struct LoraBwd<B> {
    desc: CustomOpIr,
    has_xd: bool,
    has_xa: bool,
    needs: LoraNeeds,
    scale: f32,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for LoraBwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let mut it = self.desc.inputs.iter();
        let mut next = || h.get_float_tensor::<B>(it.next().expect("input"));
        let dy = next();
        let xd = self.has_xd.then(&mut next);
        let xa = self.has_xa.then(&mut next);
        let (w, a, b) = (next(), next(), next());
        let saved = LoraSaved {
            xd,
            xa,
            w,
            a,
            b,
            scale: self.scale,
        };
        let g = B::fused_lora_backward(dy, saved, self.needs);
        let mut outs = self.desc.outputs.iter();
        for t in [g.dx, g.dxd, g.da, g.db].into_iter().flatten() {
            let ir = outs.next().expect("output");
            h.register_float_tensor::<B>(&ir.id, t);
        }
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
        register::<B, _>("peft_lora_linear_fwd", inputs, vec![out], |desc| {
            LinearFwd::<B> {
                desc,
                _b: PhantomData,
            }
        })
        .remove(0)
    }

    fn fused_linear_backward(dy: Prim<Self>, w: Prim<Self>) -> Prim<Self> {
        let out = empty_ir(&dy, [dims(&dy)[0], dims(&w)[0]]);
        register::<B, _>("peft_lora_linear_bwd", vec![dy, w], vec![out], |desc| {
            LinearBwd::<B> {
                desc,
                _b: PhantomData,
            }
        })
        .remove(0)
    }

    fn fused_lora_forward(inp: LoraInputs<Prim<Self>>) -> (Prim<Self>, Prim<Self>) {
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
        let mut out = register::<B, _>("peft_lora_fwd", inputs, vec![y, xa], |desc| LoraFwd::<B> {
            desc,
            has_xd,
            has_bias,
            scale,
            _b: PhantomData,
        });
        let xa = out.pop().expect("xa");
        let y = out.pop().expect("y");
        (y, xa)
    }

    fn fused_lora_backward(
        dy: Prim<Self>,
        saved: LoraSaved<Prim<Self>>,
        needs: LoraNeeds,
    ) -> LoraGrads<Prim<Self>> {
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
        let mut out = register::<B, _>("peft_lora_bwd", inputs, outputs, |desc| LoraBwd::<B> {
            desc,
            has_xd,
            has_xa,
            needs,
            scale,
            _b: PhantomData,
        })
        .into_iter();
        LoraGrads {
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

    fn lora_linear(inp: LoraInputs<Prim<Self>>) -> Prim<Self> {
        Self::fused_lora_forward(inp).0
    }
}

fn empty_like_ir<R: FusionRuntime>(
    like: &FusionTensor<R>,
    shape: Shape,
    dtype: burn::tensor::DType,
) -> TensorIr {
    TensorIr::uninit(like.client.create_empty_handle(), shape, dtype)
}

#[derive(Debug)]
struct AttnFwd<B> {
    desc: CustomOpIr,
    scale: f32,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + AttentionOps> Operation<B::FusionRuntime> for AttnFwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let [q, k, v, m] = [0, 1, 2, 3].map(|n| h.get_float_tensor::<B>(&i[n]));
        let out = B::attention_forward(q, k, v, m, self.scale);
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, out);
    }
}

#[derive(Debug)]
struct AttnBwd<B> {
    desc: CustomOpIr,
    scale: f32,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + AttentionOps> Operation<B::FusionRuntime> for AttnBwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let [dout, q, k, v, m] = [0, 1, 2, 3, 4].map(|n| h.get_float_tensor::<B>(&i[n]));
        let grads = B::attention_backward(dout, q, k, v, m, self.scale);
        for (ir, g) in self.desc.outputs.iter().zip(grads) {
            h.register_float_tensor::<B>(&ir.id, g);
        }
    }
}

impl<B: FusionBackend + AttentionOps> AttentionOps for Fusion<B> {
    fn attention_forward(
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> Prim<Self> {
        let out = empty_like_ir(&q, q.shape.clone(), q.dtype);
        register::<B, _>(
            "peft_lora_attention_fwd",
            vec![q, k, v, mask],
            vec![out],
            |desc| AttnFwd::<B> {
                desc,
                scale,
                _b: PhantomData,
            },
        )
        .remove(0)
    }

    fn attention_backward(
        dout: Prim<Self>,
        q: Prim<Self>,
        k: Prim<Self>,
        v: Prim<Self>,
        mask: Prim<Self>,
        scale: f32,
    ) -> [Prim<Self>; 3] {
        let outs = [&q, &k, &v].map(|t| empty_like_ir(t, t.shape.clone(), t.dtype));
        let inputs = vec![dout, q, k, v, mask];
        let mut g = register::<B, _>("peft_lora_attention_bwd", inputs, outs.to_vec(), |desc| {
            AttnBwd::<B> {
                desc,
                scale,
                _b: PhantomData,
            }
        })
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
    ) -> Prim<Self> {
        Self::attention_forward(q, k, v, mask, scale)
    }
}

#[derive(Debug)]
struct CeFwd<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + CrossEntropyOps> Operation<B::FusionRuntime> for CeFwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let hid = h.get_float_tensor::<B>(&i[0]);
        let w = h.get_float_tensor::<B>(&i[1]);
        let t = h.get_int_tensor::<B>(&i[2]);
        let (loss, lse) = B::ce_forward(hid, w, t);
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, loss);
        h.register_float_tensor::<B>(&self.desc.outputs[1].id, lse);
    }
}

#[derive(Debug)]
struct CeBwd<B> {
    desc: CustomOpIr,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + CrossEntropyOps> Operation<B::FusionRuntime> for CeBwd<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let i = &self.desc.inputs;
        let d = h.get_float_tensor::<B>(&i[0]);
        let hid = h.get_float_tensor::<B>(&i[1]);
        let w = h.get_float_tensor::<B>(&i[2]);
        let t = h.get_int_tensor::<B>(&i[3]);
        let lse = h.get_float_tensor::<B>(&i[4]);
        let dh = B::ce_backward(d, hid, w, t, lse);
        h.register_float_tensor::<B>(&self.desc.outputs[0].id, dh);
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
        let mut out = register::<B, _>(
            "peft_lora_ce_fwd",
            vec![h, w, targets],
            vec![loss, lse],
            |desc| CeFwd::<B> {
                desc,
                _b: PhantomData,
            },
        );
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
        register::<B, _>(
            "peft_lora_ce_bwd",
            vec![d, h, w, targets, lse],
            vec![dh],
            |desc| CeBwd::<B> {
                desc,
                _b: PhantomData,
            },
        )
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
