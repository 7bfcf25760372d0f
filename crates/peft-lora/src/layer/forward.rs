//! The forward of [`LoraLinear`]: the fused path when one adapter (or none) is live and its
//! variant takes it, else the composed path through every live adapter's variant.

use burn::tensor::{backend::Backend, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::LoraLinear;
use crate::adapter::LoraAdapter;
use crate::dropout::{dropout, in_mode};
use crate::error::{Error, Result};
use crate::fused;
use crate::host::to_host;
use crate::routing::{LoraCtx, RowsOn};
use crate::variant::{variant_of, Base, LoraVariant};

impl<B: Backend> LoraLinear<B> {
    /// Forward with the active adapters on every row: the common case. Routing (per-row
    /// adapters, aLoRA offsets) goes through [`Self::forward_ctx`]; here an aLoRA adapter has no
    /// offsets and adds nothing, which is why [`crate::PeftModel`] refuses aLoRA adapters on a
    /// model whose [`crate::LoraModel::supports_alora`] is false.
    ///
    /// # Shapes
    /// - x: `[..., in]` -> `[..., out]`
    ///
    /// # Panics
    /// When the input's last dimension is not the layer's `in_features` (a programmer error),
    /// with a message naming the layer's path (when a [`crate::PeftModel`] has named it), its
    /// `in_features` and the input's width. [`Self::try_forward`] returns that as an error.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_ctx(x, &LoraCtx::default())
    }

    /// [`Self::forward`], with a wrong input width as [`Error::InputWidth`] instead of a panic.
    pub fn try_forward<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>> {
        self.check_input(&x.dims())?;
        Ok(self.forward(x))
    }

    /// [`Self::forward_ctx`], with a wrong input width as [`Error::InputWidth`] instead of a
    /// panic.
    pub fn try_forward_ctx<const D: usize>(
        &self,
        x: Tensor<B, D>,
        ctx: &LoraCtx,
    ) -> Result<Tensor<B, D>> {
        self.check_input(&x.dims())?;
        Ok(self.forward_ctx(x, ctx))
    }

    /// Refuses an input whose last dimension is not `in_features`.
    pub fn check_input(&self, dims: &[usize]) -> Result<()> {
        let found = dims.last().copied().unwrap_or(0);
        let in_features = self.d_in();
        if found != in_features {
            return Err(Error::InputWidth {
                module: self
                    .state
                    .module
                    .clone()
                    .unwrap_or_else(|| "<unnamed>".into()),
                in_features,
                found,
            });
        }
        Ok(())
    }

    /// Forward with per-call routing: `ctx.row_adapters[i]` names the adapter of batch row `i`
    /// (or `None` for the base), and `ctx.alora_offsets` selects the positions aLoRA adapters
    /// act on (see [`LoraCtx`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]` (or `[batch, in]`, one position per row) -> `[.., out]`
    ///
    /// # Panics
    /// As [`Self::forward`], on a wrong input width ([`Self::try_forward_ctx`] returns it).
    pub fn forward_ctx<const D: usize>(&self, x: Tensor<B, D>, ctx: &LoraCtx) -> Tensor<B, D> {
        in_mode(self.state.training, || self.forward_in_mode(x, ctx))
    }

    /// [`Self::forward_ctx`] in the layer's train / eval mode.
    fn forward_in_mode<const D: usize>(&self, x: Tensor<B, D>, ctx: &LoraCtx) -> Tensor<B, D> {
        let dims = x.dims();
        if let Err(e) = self.check_input(&dims) {
            panic!("{e}");
        }
        let d_in = dims[D - 1];
        let n: usize = dims[..D - 1].iter().product();
        let x2: Tensor<B, 2> = x.reshape([n, d_in]);
        if let Some(capture) = &self.state.capture {
            capture.push(to_host(x2.clone()));
        }
        let mut out_dims = dims;
        out_dims[D - 1] = self.d_out();
        let batch = if D >= 2 { dims[0] } else { 1 };
        if let Some(out) = self.forward_fused(&x2, batch, ctx) {
            return out.reshape(out_dims);
        }
        let weight = match (self.saved.live(), &self.nf4) {
            // A `modules_to_save` copy replaces the whole base and trains.
            (Some(copy), _) => copy.weight.val(),
            // Dequantized on the fly into the input's dtype; only the 4-bit codes stay resident.
            (None, Some(q)) => q.dequantize().cast(x2.dtype()),
            (None, None) => self.weight.val(),
        };
        let bias = self.live_bias();
        let base_out = match &bias {
            Some(b) => x2.clone().matmul(weight.clone()) + b.clone().unsqueeze_dim::<2>(0),
            None => x2.clone().matmul(weight.clone()),
        };
        let mut out = base_out.clone();
        if !self.state.disabled && !self.adapters.is_empty() {
            let base = Base {
                weight: &weight,
                bias: bias.as_ref(),
            };
            let seq = n / batch.max(1);
            for adapter in &self.adapters {
                let name = &adapter.meta.name;
                if self.state.merged.contains(name) {
                    continue;
                }
                // Which batch rows run this adapter (`None` = all).
                let rows_on = match ctx.rows_on(name, self.state.active.contains(name)) {
                    RowsOn::Skip => continue,
                    RowsOn::All => None,
                    RowsOn::Rows(on) => Some(on),
                };
                let variant = variant_of::<B>(adapter.meta.variant);
                out = match variant.positions(ctx, batch, seq) {
                    None => {
                        let xd = dropout(x2.clone(), adapter.meta.dropout);
                        let updated = variant.forward(adapter, &base, xd, &base_out, out.clone());
                        match rows_on {
                            None => updated,
                            Some(on) => {
                                let m = row_mask(&on, seq, &x2);
                                out.clone() + (updated - out) * m
                            }
                        }
                    }
                    Some(mut pos) => {
                        if let Some(on) = &rows_on {
                            pos.retain(|p| on[p / seq]);
                        }
                        self.forward_at(adapter, variant, &base, &x2, &base_out, out, &pos)
                    }
                };
            }
        }
        out.reshape(out_dims)
    }

    /// The fused path (burn-cuda-ops, feature `cuda`): the frozen op when no adapter is live,
    /// the single live adapter's [`LoraVariant::forward_fused`] when one is (under per-row
    /// routing, with the mask of its rows: the side-by-side base and adapter rows of one batch
    /// run as one fused op); `None` (the composed forward then runs) for an NF4 base, another
    /// backend, several live adapters, `lora_bias`, a live `modules_to_save` copy (the fused ops
    /// never compute the base's gradient), or a variant that declines. `batch` is the number of
    /// rows `x`'s `[n, in]` flattens (routing is per row).
    fn forward_fused(&self, x: &Tensor<B, 2>, batch: usize, ctx: &LoraCtx) -> Option<Tensor<B, 2>> {
        if self.nf4.is_some() || self.saved.live().is_some() || !fused::supported::<B>() {
            return None;
        }
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        let base = Base {
            weight: &weight,
            bias: bias.as_ref(),
        };
        let live = self.live_adapters(ctx);
        let (adapter, on) = match live.as_slice() {
            [] => return base.linear(x),
            [(one, on)] => (*one, on),
            _ => return None,
        };
        if adapter.lora_b_bias.is_some() {
            return None;
        }
        let variant = variant_of::<B>(adapter.meta.variant);
        let seq = x.dims()[0] / batch.max(1);
        let rows = match on {
            RowsOn::Rows(on) if !on.iter().all(|o| *o) => {
                // The adapter's rows as one block (base rows then adapter rows, as the
                // side-by-side evaluation lays them out): addressed by offset, no mask.
                if let Some(flat) = flat_block(on, seq) {
                    if let Some(y) = variant.forward_fused_rows(adapter, &base, x, flat) {
                        return Some(y);
                    }
                }
                Some(row_mask(on, seq, x))
            }
            _ => None,
        };
        variant.forward_fused(adapter, &base, x, rows.as_ref())
    }

    /// The adapters that act in this call and where, as the composed path decides it.
    pub(super) fn live_adapters(&self, ctx: &LoraCtx) -> Vec<(&LoraAdapter<B>, RowsOn)> {
        if self.state.disabled {
            return Vec::new();
        }
        self.adapters
            .iter()
            .filter(|a| !self.state.merged.contains(&a.meta.name))
            .filter_map(|a| {
                let active = self.state.active.contains(&a.meta.name);
                match ctx.rows_on(&a.meta.name, active) {
                    RowsOn::Skip => None,
                    on => Some((a, on)),
                }
            })
            .collect()
    }

    /// Adds `adapter`'s term at the flat positions `pos` of `out` only (aLoRA): the other rows
    /// stay exactly as they are, and the adapter is computed on the selected rows alone.
    #[allow(clippy::too_many_arguments)]
    fn forward_at(
        &self,
        adapter: &LoraAdapter<B>,
        variant: &dyn LoraVariant<B>,
        base: &Base<'_, B>,
        x2: &Tensor<B, 2>,
        base_out: &Tensor<B, 2>,
        out: Tensor<B, 2>,
        pos: &[usize],
    ) -> Tensor<B, 2> {
        let n = x2.dims()[0];
        if pos.is_empty() {
            return out;
        }
        if pos.len() == n {
            let xd = dropout(x2.clone(), adapter.meta.dropout);
            return variant.forward(adapter, base, xd, base_out, out);
        }
        let idx: Vec<i64> = pos.iter().map(|&p| p as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [pos.len()]), &x2.device());
        let xs = dropout(x2.clone().select(0, idx.clone()), adapter.meta.dropout);
        let bs = base_out.clone().select(0, idx.clone());
        // The variant adds its term to a zero result, so `out + term` is exact at those rows.
        let term = variant.forward(adapter, base, xs, &bs, bs.zeros_like());
        out.select_assign(0, idx, term, IndexingUpdateOp::Add)
    }
}

/// The flat rows (`seq` a batch row) of the batch rows marked in `on` when those are one run,
/// else `None`.
pub(super) fn flat_block(on: &[bool], seq: usize) -> Option<std::ops::Range<usize>> {
    row_block(on).map(|b| b.start * seq..b.end * seq)
}

/// The batch rows marked in `on` when they are one run (`start..end`), else `None`.
fn row_block(on: &[bool]) -> Option<std::ops::Range<usize>> {
    let start = on.iter().position(|o| *o)?;
    let end = start + on[start..].iter().take_while(|o| **o).count();
    on[end..].iter().all(|o| !*o).then_some(start..end)
}

/// The `[batch * seq, 1]` mask (1 on the rows marked in `on`, each repeated for its `seq`
/// positions, 0 elsewhere) in `like`'s dtype and device.
fn row_mask<B: Backend>(on: &[bool], seq: usize, like: &Tensor<B, 2>) -> Tensor<B, 2> {
    let mask: Vec<f32> = on
        .iter()
        .flat_map(|o| std::iter::repeat_n(f32::from(u8::from(*o)), seq))
        .collect();
    Tensor::<B, 1>::from_floats(mask.as_slice(), &like.device())
        .cast(FloatDType::from(like.dtype()))
        .unsqueeze_dim::<2>(1)
}

#[cfg(test)]
mod tests {
    use super::row_block;

    #[test]
    fn a_row_block_is_one_run_of_marked_rows() {
        let t = true;
        let f = false;
        assert_eq!(row_block(&[f, f, t, t]), Some(2..4));
        assert_eq!(row_block(&[t, t, f]), Some(0..2));
        assert_eq!(row_block(&[f, t, f]), Some(1..2));
        assert_eq!(row_block(&[t, t, t]), Some(0..3));
        assert_eq!(row_block(&[t, f, t]), None);
        assert_eq!(row_block(&[f, t, f, t, t]), None);
        assert_eq!(row_block(&[f, f]), None);
        assert_eq!(row_block(&[]), None);
    }
}
