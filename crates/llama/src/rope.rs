//! Rotary position embeddings in HF's "rotate_half" layout (first half / second half of the
//! head dim), with llama3 frequency scaling (transformers' `_compute_llama3_parameters`).

use burn::tensor::{backend::Backend, DType, FloatDType, Int, Tensor, TensorData};

use crate::config::{LlamaConfig, RopeKind};

/// The inverse frequencies `[head_dim / 2]`, computed in f32 as transformers does.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let plain = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32));
    match cfg.rope {
        RopeKind::Default => plain.collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let (factor, lf, hf) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let orig = original_max as f32;
            let (low_wl, high_wl) = (orig / lf, orig / hf);
            plain
                .map(|inv| {
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    if wavelen > low_wl {
                        inv / factor
                    } else if wavelen < high_wl {
                        inv
                    } else {
                        let s = (orig / wavelen - lf) / (hf - lf);
                        (1.0 - s) * inv / factor + s * inv
                    }
                })
                .collect()
        }
    }
}

/// `cos`, `sin` `[batch, 1, seq, head_dim]` for integer positions `[batch, seq]`, computed in
/// f32 (positions in bf16 would be rounded) and returned in `dtype`.
pub fn cos_sin<B: Backend>(
    inv_freq: &[f32],
    positions: Tensor<B, 2, Int>,
    dtype: DType,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, s] = positions.dims();
    let half = inv_freq.len();
    let device = positions.device();
    let inv = Tensor::<B, 1>::from_data(
        TensorData::new(inv_freq.to_vec(), [half]),
        (&device, DType::F32),
    );
    let pos: Tensor<B, 3> = positions.cast(FloatDType::F32).reshape([b, s, 1]);
    let freqs = pos * inv.reshape([1, 1, half]); // [b, s, half]
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2); // [b, s, head_dim]
    let cos = emb.clone().cos().cast(dtype).unsqueeze_dim(1);
    let sin = emb.sin().cast(dtype).unsqueeze_dim(1);
    (cos, sin)
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, head_dim]`, where
/// `rotate_half([x1, x2]) = [-x2, x1]`.
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_bands() {
        let mut cfg = LlamaConfig::tiny(8);
        cfg.head_dim = 128;
        cfg.rope_theta = 500000.0;
        let plain = inv_freq(&cfg);
        cfg.rope = RopeKind::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max: 8192,
        };
        let scaled = inv_freq(&cfg);
        // High frequencies untouched, lowest divided by the factor, the band between smooth.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() <= 1e-12);
        for (s, p) in scaled.iter().zip(&plain) {
            assert!(*s <= *p && *s >= *p / 8.0 - 1e-12);
        }
    }
}
