//! Self-attention as transformers' eager `LlamaAttention`: GQA, RoPE, an additive mask
//! (causal AND key padding), softmax in f32, and a KV cache for generation.

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Bool, DType, FloatDType, Int, Tensor};
use peft_lora::{LoraCtx, LoraLinear, LoraModel};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope;
use crate::weights::VarBuilder;

/// Added to the scores of masked keys. Finite, so a query row whose keys are all masked (a
/// padding position) gets a uniform distribution instead of NaN.
pub const MASKED: f32 = -1e9;

/// Cached keys (after RoPE) and values of one layer, in buffers of `capacity` positions
/// written in place.
///
/// A generation that reserves its length up front ([`crate::GenState::reserve`]; `generate`
/// does) allocates the buffers once: no decode step changes a tensor's shape or copies the
/// cache, and attention reads the whole buffer with the unfilled positions masked (they hold
/// zeros, never garbage, so a masked score times a value stays 0).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Keys `[batch, kv_heads, capacity, head_dim]`; positions from `len` on are zeros.
    pub k: Tensor<B, 4>,
    /// Values, laid out as `k`.
    pub v: Tensor<B, 4>,
    /// Positions filled.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache with room for `capacity` positions.
    pub fn zeros(
        [batch, kv_heads, capacity, head_dim]: [usize; 4],
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let z = || Tensor::zeros([batch, kv_heads, capacity, head_dim], (device, dtype));
        KvCache {
            k: z(),
            v: z(),
            len: 0,
        }
    }

    /// Positions the buffers hold.
    pub fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The filled keys `[batch, kv_heads, len, head_dim]`.
    pub fn keys(&self) -> Tensor<B, 4> {
        filled(&self.k, self.len)
    }

    /// The filled values `[batch, kv_heads, len, head_dim]`.
    pub fn values(&self) -> Tensor<B, 4> {
        filled(&self.v, self.len)
    }

    /// Room for at least `extra` more positions, exactly `len + extra` when it grows (one copy
    /// of the cache).
    pub fn reserve_exact(&mut self, extra: usize) {
        let need = self.len + extra;
        let cap = self.capacity();
        if need > cap {
            let grow = |t: &Tensor<B, 4>| {
                let [b, h, _, d] = t.dims();
                let z = Tensor::zeros([b, h, need - cap, d], (&t.device(), t.dtype()));
                Tensor::cat(vec![t.clone(), z], 2)
            };
            self.k = grow(&self.k);
            self.v = grow(&self.v);
        }
    }

    /// Room for at least `extra` more positions, growing as [`grown_capacity`] says.
    pub fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.capacity() {
            self.reserve_exact(grown_capacity(self.capacity(), need) - self.len);
        }
    }

    /// Writes `k`, `v` (`[batch, kv_heads, n, head_dim]`) at positions `len..len + n`, in place
    /// when the buffers are not shared. Needs the room ([`Self::reserve`]).
    fn append(self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let [b, h, n, d] = k.dims();
        let at = [0..b, 0..h, self.len..self.len + n, 0..d];
        assert!(
            self.len + n <= self.capacity(),
            "KV cache of capacity {} cannot take {n} more positions after {}; reserve first",
            self.capacity(),
            self.len
        );
        KvCache {
            k: self.k.slice_assign(at.clone(), k),
            v: self.v.slice_assign(at, v),
            len: self.len + n,
        }
    }
}

/// The capacity a cache of `cap` positions grows to when it needs `need`: half again at least,
/// so a cache fed token by token without a reservation is copied O(log n) times.
pub(crate) fn grown_capacity(cap: usize, need: usize) -> usize {
    need.max(cap + cap / 2)
}

/// Positions `0..len` of a cache buffer.
fn filled<B: Backend>(t: &Tensor<B, 4>, len: usize) -> Tensor<B, 4> {
    let [b, h, _, d] = t.dims();
    t.clone().slice([0..b, 0..h, 0..len, 0..d])
}

/// The additive attention mask, f32: 0 where query `i` may see key `j`, [`MASKED`] elsewhere.
///
/// Query `i` sits at absolute step `past + i`; it sees keys `j <= past + i` whose
/// `attention_mask` (1 = token, 0 = padding) is 1. The mask spans `keys` positions (`past +
/// seq`, or a cache's whole capacity, whose positions after `past + seq` the causal part masks);
/// `attention_mask` covers `past + seq` of them or all `keys`.
///
/// # Shapes
/// Returns `[batch, 1, seq, keys]` (`[1, 1, seq, keys]` without `attention_mask`).
pub fn additive_mask<B: Backend>(
    attention_mask: Option<&Tensor<B, 2, Int>>,
    seq: usize,
    past: usize,
    keys: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = keys;
    assert!(
        t >= past + seq,
        "a mask over {t} keys cannot cover past + seq = {}",
        past + seq
    );
    let causal = Tensor::<B, 2, Bool>::tril_mask([seq, t], past as i64, device);
    let mask = Tensor::<B, 2>::zeros([seq, t], (device, DType::F32))
        .mask_fill(causal, MASKED)
        .reshape([1, 1, seq, t]);
    match attention_mask {
        None => mask,
        Some(am) => {
            let [b, mt] = am.dims();
            assert!(
                mt == t || mt == past + seq,
                "attention_mask covers {mt} positions; past + seq = {}, keys = {t}",
                past + seq
            );
            let mut am = am.clone();
            if mt < t {
                // Positions after past + seq are masked by causality; any value does.
                am = Tensor::cat(vec![am, Tensor::ones([b, t - mt], device)], 1);
            }
            let pad = am.equal_elem(0);
            let pad = Tensor::<B, 2>::zeros([b, t], (device, DType::F32))
                .mask_fill(pad, MASKED)
                .reshape([b, 1, 1, t]);
            mask + pad
        }
    }
}

/// Self-attention with grouped KV heads (`model.layers.N.self_attn`).
#[derive(Module, Debug, LoraModel)]
pub struct Attention<B: Backend> {
    /// Query projection `[hidden, heads * head_dim]`.
    pub q_proj: LoraLinear<B>,
    /// Key projection `[hidden, kv_heads * head_dim]`.
    pub k_proj: LoraLinear<B>,
    /// Value projection `[hidden, kv_heads * head_dim]`.
    pub v_proj: LoraLinear<B>,
    /// Output projection `[heads * head_dim, hidden]`.
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

/// A projection from the checkpoint (`name.weight` `[out, in]`, optional `name.bias`), in NF4
/// when `vb` says so ([`VarBuilder::with_nf4`]).
pub fn load_linear<B: Backend>(
    vb: &VarBuilder<'_, B>,
    d_in: usize,
    d_out: usize,
    bias: bool,
) -> Result<LoraLinear<B>> {
    let b = if bias {
        Some(vb.get("bias", [d_out])?)
    } else {
        None
    };
    if vb.nf4() {
        let q = vb.linear_weight_nf4(d_in, d_out)?;
        return Ok(LoraLinear::from_nf4(&q, b, vb.device()));
    }
    let w = vb.linear_weight(d_in, d_out)?;
    Ok(LoraLinear::from_weight(w, b))
}

/// A projection with N(0, 0.02) weights (transformers' `initializer_range`) and zero bias.
pub fn random_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> LoraLinear<B> {
    let w = Tensor::random(
        [d_in, d_out],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        device,
    );
    LoraLinear::from_weight(w, bias.then(|| Tensor::zeros([d_out], device)))
}

impl<B: Backend> Attention<B> {
    /// From a checkpoint (`vb` at `model.layers.N.self_attn`).
    pub fn load(vb: &VarBuilder<'_, B>, c: &LlamaConfig) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut a = Attention {
            q_proj: load_linear(&vb.pp("q_proj"), h, q, c.attention_bias)?,
            k_proj: load_linear(&vb.pp("k_proj"), h, kv, c.attention_bias)?,
            v_proj: load_linear(&vb.pp("v_proj"), h, kv, c.attention_bias)?,
            o_proj: load_linear(&vb.pp("o_proj"), q, h, c.attention_bias)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        if !vb.nf4() {
            a.pack_qkv()?;
        }
        Ok(a)
    }

    /// With the shared-input op on (`PEFT_LORA_SHARED_INPUT=1`), lays the q, k and v weights
    /// side by side in one buffer ([`LoraLinear::pack_shared_input`]), so the three projections
    /// are one GEMM. Done layer by layer as the model is built: the separate buffers it frees
    /// are the sizes the next layer allocates.
    fn pack_qkv(&mut self) -> Result<()> {
        if crate::ops::shared_input_enabled() {
            LoraLinear::pack_shared_input(&mut [
                &mut self.q_proj,
                &mut self.k_proj,
                &mut self.v_proj,
            ])?;
        }
        Ok(())
    }

    /// Random weights.
    pub fn random(c: &LlamaConfig, device: &B::Device) -> Self {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut a = Attention {
            q_proj: random_linear(h, q, c.attention_bias, device),
            k_proj: random_linear(h, kv, c.attention_bias, device),
            v_proj: random_linear(h, kv, c.attention_bias, device),
            o_proj: random_linear(q, h, c.attention_bias, device),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        a.pack_qkv()
            .expect("q, k and v are built with one input width and dtype");
        a
    }

    /// Attention over the new tokens `x` and the keys/values of `cache`, which it returns with
    /// the new ones written in (in place when the buffers are not shared).
    ///
    /// An empty cache (`len == 0`, or none) attends over the new tokens only; otherwise the
    /// whole buffer is read, its unfilled positions masked by causality, so every decode step
    /// of a reserved cache has the same shapes.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos, sin: `[batch, 1, seq, head_dim]`
    /// - mask: additive f32 `[batch or 1, 1, seq, keys]` ([`additive_mask`]) where `keys` is
    ///   `seq` for an empty cache and the cache's capacity otherwise; without a cache it must
    ///   hide every key after its query's position, as [`additive_mask`]'s does (the opt-in
    ///   causal attention, `PEFT_LORA_CAUSAL_ATTENTION=1` on CUDA, computes no score there)
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
        cache: Option<KvCache<B>>,
        ctx: &LoraCtx,
    ) -> (Tensor<B, 3>, Option<KvCache<B>>) {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, s, n * hd] -> [b, n, s, hd]
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        // RoPE fused with the split into heads: one kernel each way on CUDA.
        let rotary = |t: Tensor<B, 3>, n: usize| {
            if let Some(r) = crate::ops::rope(&t, n, cos, sin) {
                return r;
            }
            rope::apply(heads(t, n), cos, sin)
        };
        // One op over the shared input where it runs (else the three projections).
        let [q, k, v]: [Tensor<B, 3>; 3] =
            LoraLinear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x, ctx)
                .try_into()
                .expect("three projections give three outputs");
        let (q, k, v, next) = match cache {
            None => {
                let (k, v) = (rotary(k, nkv), heads(v, nkv));
                // Without a cache the mask is causal over the new tokens: on CUDA (opt-in) the
                // attention in causal row blocks, over queries laid out for it.
                if let Some(out) = self.causal(&q, &k, &v, cos, sin, mask) {
                    return (self.o_proj.forward_ctx(out, ctx), None);
                }
                (rotary(q, nh), k, v, None)
            }
            Some(c) if c.len == 0 => {
                let (k, v) = (rotary(k, nkv), heads(v, nkv));
                (rotary(q, nh), k.clone(), v.clone(), Some(c.append(k, v)))
            }
            Some(KvCache { k: kc, v: vc, len }) => {
                // On CUDA inference: RoPE of q and k and the two cache writes as one kernel.
                let (q, c) = match crate::ops::rope_append(&q, &k, &v, cos, sin, kc, vc, len) {
                    Ok((q, k, v)) => (q, KvCache { k, v, len: len + s }),
                    Err((k_buf, v_buf)) => {
                        let c = KvCache {
                            k: k_buf,
                            v: v_buf,
                            len,
                        };
                        (rotary(q, nh), c.append(rotary(k, nkv), heads(v, nkv)))
                    }
                };
                (q, c.k.clone(), c.v.clone(), Some(c))
            }
        };
        let t = k.dims()[2];
        // GQA without copying K/V: the `rep` query heads of KV head g are heads g*rep..(g+1)*rep
        // (transformers' repeat_kv), so fold them into the query-length axis.
        let rep = nh / nkv;
        let q = q.reshape([b, nkv, rep * s, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        // On CUDA: one op with cuBLASLt GEMMs and a recomputing backward (no [s, t] kept).
        let fused = crate::ops::attention(&q, &k, &v, mask, scale);
        let out = fused.unwrap_or_else(|| {
            let scores = q.matmul(k.swap_dims(2, 3)) * scale; // [b, nkv, rep*s, t]
            let scores = scores.reshape([b, nh, s, t]);
            let dtype = scores.dtype();
            let probs =
                activation::softmax(scores.cast(FloatDType::F32) + mask.clone(), 3).cast(dtype);
            probs.reshape([b, nkv, rep * s, t]).matmul(v) // [b, nkv, rep*s, hd]
        });
        // [b, nh, s, hd] -> [b, s, nh * hd]. With one new token (a decode step) the two layouts
        // hold the same order, so the reshape is free; the transposed view would be copied.
        let out = if s == 1 {
            out.reshape([b, 1, nh * hd])
        } else {
            let out = out.reshape([b, nh, s, hd]);
            // On CUDA (opt-in): one kernel each way instead of Burn's copy of the view.
            crate::ops::merge_heads(&out)
                .unwrap_or_else(|| out.swap_dims(1, 2).reshape([b, s, nh * hd]))
        };
        (self.o_proj.forward_ctx(out, ctx), next)
    }

    /// Causal attention in row blocks (burn-cuda-ops' `causal_attention`, opt-in): the
    /// queries `q [b, s, heads * head_dim]` rotated into the position-major layout it reads,
    /// `k`, `v` `[b, kv_heads, s, head_dim]`, `mask` causal `[b or 1, 1, s, s]`; the heads merged
    /// back to `[b, s, heads * head_dim]`. `None` where the op does not run.
    fn causal(
        &self,
        q: &Tensor<B, 3>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4>,
    ) -> Option<Tensor<B, 3>> {
        if !crate::ops::causal_attention_enabled() {
            return None;
        }
        let [b, s, _] = q.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = nh / nkv;
        let q = crate::ops::rope_grouped(q, nh, rep, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // [b, nkv, s * rep, hd] position-major: the KV head's `rep` query heads side by side,
        // so [b, nkv, s, rep * hd] -> [b, s, nkv, rep * hd] is the token-major layout.
        let out =
            crate::ops::causal_attention(&q, k, v, mask, scale)?.reshape([b, nkv, s, rep * hd]);
        Some(
            crate::ops::merge_heads(&out)
                .unwrap_or_else(|| out.swap_dims(1, 2).reshape([b, s, nh * hd])),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    fn mask_values(am: &[i64], b: usize, seq: usize, past: usize, keys: usize) -> Vec<f32> {
        let dev = Default::default();
        let w = am.len() / b;
        let am = Tensor::<B, 2, Int>::from_data(TensorData::new(am.to_vec(), [b, w]), &dev);
        additive_mask(Some(&am), seq, past, keys, &dev)
            .into_data()
            .into_vec()
            .unwrap()
    }

    #[test]
    fn a_mask_over_a_cache_masks_padding_the_future_and_the_unfilled_room() {
        // Row 0 has one left pad; 3 cached positions, 2 new tokens, a cache of 7.
        let (b, seq, past, keys) = (2, 2, 3, 7);
        let narrow = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let wide = [0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0];
        let m = mask_values(&narrow, b, seq, past, keys);
        let seen = |v: &[f32]| v.iter().map(|x| *x == 0.0).collect::<Vec<_>>();
        let w = mask_values(&wide, b, seq, past, keys);
        assert_eq!(seen(&m), seen(&w), "the room's mask values do not matter");
        assert!(m.iter().chain(&w).all(|x| *x == 0.0 || *x <= MASKED));
        let visible = |r: usize, i: usize| -> Vec<usize> {
            (0..keys)
                .filter(|&j| m[(r * seq + i) * keys + j] == 0.0)
                .collect()
        };
        assert_eq!(visible(0, 0), vec![1, 2, 3]);
        assert_eq!(visible(0, 1), vec![1, 2, 3, 4]);
        assert_eq!(visible(1, 1), vec![0, 1, 2, 3, 4]);
    }
}
