//! Rotary position embeddings in HF's "rotate_half" layout, with llama3 frequency scaling
//! (transformers' `_compute_llama3_parameters`).

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::config::{LlamaConfig, RopeKind};

/// The inverse frequencies `[head_dim / 2]`, computed in f32 as transformers does.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let plain: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
    match cfg.rope {
        RopeKind::Default => plain,
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let (factor, lf, hf) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
            let orig = original_max as f32;
            let low_wl = orig / lf;
            let high_wl = orig / hf;
            plain
                .into_iter()
                .map(|inv| {
                    let wavelen = 2.0 * std::f32::consts::PI / inv;
                    let scaled = if wavelen > low_wl { inv / factor } else { inv };
                    let smooth = (orig / wavelen - lf) / (hf - lf);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = !(wavelen < high_wl) && !(wavelen > low_wl);
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos`, `sin` of shape `[batch, 1, seq, head_dim]` for integer positions `[batch, seq]`.
pub fn cos_sin<B: Backend>(inv_freq: &[f32], positions: Tensor<B, 2, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, s] = positions.dims();
    let half = inv_freq.len();
    let device = positions.device();
    let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device).reshape([1, 1, half]);
    let pos = positions.float().reshape([b, s, 1]);
    let freqs = pos * inv; // [b, s, half]
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2); // [b, s, head_dim]
    (emb.clone().cos().unsqueeze_dim(1), emb.sin().unsqueeze_dim(1))
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, head_dim]`.
pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
