//! The fused linear on Burn's fusion backend (feature `fusion`, i.e. `burn::backend::Cuda` built
//! with fusion): each op is a fusion custom operation that runs the raw cubecl op on its inputs.

use std::marker::PhantomData;

use burn::tensor::Shape;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::autodiff::FusedLinear;
use super::backend::{FusedOps, Prim};
use super::kernels::{LoraGrads, LoraInputs, LoraNeeds, LoraSaved};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

fn empty_ir<R: FusionRuntime>(like: &FusionTensor<R>, shape: [usize; 2]) -> TensorIr {
    TensorIr::uninit(
        like.client.create_empty_handle(),
        Shape::new(shape),
        like.dtype,
    )
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
