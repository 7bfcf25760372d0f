//! A backward started from given gradients: [`seeded_root`] builds a `[1]` root whose backward
//! hands each tensor `t` of a list its gradient `g` as it is, the gradients `sum_i <t_i, g_i>`
//! would give, without computing that product or reducing it. A checkpointed layer's backward
//! starts so from its output gradient, and from its last frozen projection's input when that
//! projection trains nothing: its output is then never needed, so it is never computed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Tensor, TensorMetadata};

use super::backend::Prim;
use super::{prim, tensor};

/// Backends that build a seeded root (Burn's autodiff over any backend).
pub trait SeedOps: Backend {
    /// A `[1]` value whose backward passes its incoming gradient on to `prev` (the root built so
    /// far, when given) and hands `t` the gradient `g`. Its value is meaningless (zero, or
    /// `prev`'s).
    fn seed_grad(prev: Option<Prim<Self>>, t: Prim<Self>, g: Prim<Self>) -> Prim<Self>;
}

#[derive(Debug)]
struct SeedBackward;

impl<B: Backend> Backward<B, 2> for SeedBackward {
    /// `g`, when `t` needs a gradient.
    type State = Option<B::FloatTensorPrimitive>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [prev, t] = ops.parents;
        let dz = grads.consume::<B>(&ops.node);
        if let Some(node) = prev {
            grads.register::<B>(node.id, dz);
        }
        if let (Some(node), Some(g)) = (t, ops.state) {
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> SeedOps for Autodiff<B, C> {
    fn seed_grad(prev: Option<Prim<Self>>, t: Prim<Self>, g: Prim<Self>) -> Prim<Self> {
        let prev = prev.unwrap_or_else(|| {
            let p = &t.primitive;
            <Self as FloatTensorOps<Self>>::float_zeros(
                [1].into(),
                &B::float_device(p),
                p.dtype().into(),
            )
        });
        let keep_g = t.is_tracked().then_some(g.primitive);
        match SeedBackward
            .prepare::<C>([prev.node.clone(), t.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(keep_g, prev.primitive),
            OpsKind::UnTracked(prep) => prep.finish(prev.primitive),
        }
    }
}

/// The root built on the autodiff backend `T` from primitive pairs ([`crate::seeded_root`]
/// dispatches here).
pub(crate) fn seeded_prims<T: SeedOps>(pairs: Vec<(Prim<T>, Prim<T>)>) -> Prim<T> {
    pairs
        .into_iter()
        .fold(None, |root, (t, g)| Some(T::seed_grad(root, t, g)))
        .expect("seeded_prims: at least one pair (checked by the caller)")
}

/// [`crate::seeded_root`] on any autodiff backend `T`, with no switch or backend check (the
/// CPU tests run it on `Autodiff<NdArray>`).
///
/// # Panics
/// When `pairs` is empty.
pub fn seeded_root_on<T: SeedOps, const D: usize>(
    pairs: Vec<(Tensor<T, D>, Tensor<T, D>)>,
) -> Tensor<T, 1> {
    assert!(!pairs.is_empty(), "seeded_root_on: no pairs");
    let pairs = pairs.into_iter().map(|(t, g)| (prim(t), prim(g))).collect();
    tensor(seeded_prims::<T>(pairs))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tensor};

    use super::seeded_root_on;

    type B = Autodiff<NdArray<f32>>;

    /// Gradients of `x` and `w` through two tensors built from them, from the seeded root and
    /// from the composed `sum <t, g>`: the same values, and each pair's gradient reaches `x`.
    #[test]
    fn a_seeded_root_hands_each_tensor_its_gradient() {
        let dev = Default::default();
        let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &dev).require_grad();
        let w = Tensor::<B, 2>::random([4, 5], Distribution::Default, &dev).require_grad();
        let g1 = Tensor::<B, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &dev);
        let g2 = Tensor::<B, 2>::random([3, 4], Distribution::Normal(0.0, 1.0), &dev);
        let pairs = || {
            let y = x.clone().matmul(w.clone());
            let z = x.clone().exp() * x.clone();
            vec![(y, g1.clone()), (z, g2.clone())]
        };
        let seeded = seeded_root_on(pairs()).backward();
        let composed = pairs()
            .into_iter()
            .map(|(t, g)| (t * g).sum())
            .reduce(|a, b| a + b)
            .unwrap()
            .backward();
        for (name, t) in [("x", &x), ("w", &w)] {
            let grad_of = |grads| t.grad(grads).unwrap().into_data().to_vec::<f32>().unwrap();
            let (got, want) = (grad_of(&seeded), grad_of(&composed));
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{name}: {a} vs {b}"
                );
            }
        }
        // One pair alone: `w` gets `x^T g1`, and the second pair's term is absent from `x`.
        let y = x.clone().matmul(w.clone());
        let only = seeded_root_on(vec![(y, g1.clone())]).backward();
        let want = x.clone().inner().transpose().matmul(g1.clone().inner());
        let got = w.grad(&only).unwrap();
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff <= 1e-5, "{diff}");
    }
}
