//! NF4, bitsandbytes' 4-bit NormalFloat format (QLoRA), on the host.
//!
//! A matrix is flattened row-major in PyTorch layout `[out, in]` and cut into blocks of 64
//! values. Each block stores its absolute maximum (`absmax`, f32) and, per value, the index of the
//! nearest of 16 code values ([`NF4_CODE`]) to `value / absmax`; two 4-bit indices share a byte,
//! the first in the high nibble. Dequantization is `NF4_CODE[index] * absmax`. This is bitsandbytes'
//! `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=False)` bit for bit (the
//! nearest-code rule is its `bucketize` over the midpoints between codes, ties going to the lower
//! code). bitsandbytes' optional double quantization of the absmax values
//! (`compress_statistics=True`, 8-bit absmax in blocks of 256) is not implemented: PEFT's LoftQ
//! does not use it, and it saves only 0.37 bits per weight.

/// The 16 NF4 code values (bitsandbytes' `get_4bit_type("nf4")`), sorted.
#[allow(clippy::excessive_precision)] // the digits bitsandbytes lists; each rounds to its f32
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' default block size for 4-bit quantization (and PEFT's LoftQ's).
pub const NF4_BLOCKSIZE: usize = 64;

/// A matrix quantized to NF4: packed 4-bit codes plus one f32 absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// The shape in PyTorch layout, `[out, in]` for a linear weight.
    pub shape: [usize; 2],
    /// Values per absmax block.
    pub blocksize: usize,
    /// Two codes per byte, the earlier value in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// One scale per block, `ceil(n / blocksize)` values.
    pub absmax: Vec<f32>,
}

/// The 15 decision boundaries between consecutive code values, as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The code index of a value already scaled into `[-1, 1]`: the number of midpoints below it
/// (`torch.bucketize(x, midpoints, right=False)`).
fn code_index(x: f32, mids: &[f32; 15]) -> u8 {
    mids.iter().filter(|m| **m < x).count() as u8
}

impl Nf4Tensor {
    /// Quantizes a row-major matrix of `shape` (PyTorch layout) with blocks of 64.
    ///
    /// # Panics
    /// If `data.len()` is not `shape[0] * shape[1]` (a programmer error).
    pub fn quantize(data: &[f32], shape: [usize; 2]) -> Self {
        Self::quantize_blocks(data, shape, NF4_BLOCKSIZE)
    }

    /// [`Self::quantize`] with another block size (bitsandbytes allows 32..4096).
    ///
    /// # Panics
    /// If `data.len()` is not `shape[0] * shape[1]` or `blocksize` is 0.
    pub fn quantize_blocks(data: &[f32], shape: [usize; 2], blocksize: usize) -> Self {
        assert_eq!(
            data.len(),
            shape[0] * shape[1],
            "NF4: data does not fit the shape"
        );
        assert!(blocksize > 0, "NF4: block size must be positive");
        let mids = midpoints();
        let n = data.len();
        let mut codes = Vec::with_capacity(n + 1);
        let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
        for block in data.chunks(blocksize) {
            let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            absmax.push(am);
            let am = am.max(1e-38);
            if block.len() == blocksize {
                // bitsandbytes multiplies full blocks by the reciprocal ...
                let inv = 1.0 / am;
                codes.extend(
                    block
                        .iter()
                        .map(|v| code_index((v * inv).clamp(-1.0, 1.0), &mids)),
                );
            } else {
                // ... and divides the tail block.
                codes.extend(
                    block
                        .iter()
                        .map(|v| code_index((v / am).clamp(-1.0, 1.0), &mids)),
                );
            }
        }
        if codes.len() % 2 == 1 {
            // bitsandbytes pads an odd count with a scaled 0.0 (code 7), not with code 0.
            codes.push(code_index(0.0, &mids));
        }
        let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        Nf4Tensor {
            shape,
            blocksize,
            packed,
            absmax,
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// The code index (0..16) of value `i` (row-major).
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The dequantized matrix, row-major in [`Self::shape`]: `NF4_CODE[code] * absmax` in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.numel())
            .map(|i| NF4_CODE[self.code(i) as usize] * self.absmax[i / self.blocksize])
            .collect()
    }

    /// Bytes this tensor occupies: packed codes plus f32 absmax values.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }

    /// Bytes a `numel`-value matrix takes in NF4 with `blocksize` (codes + f32 absmax).
    pub fn storage_bytes_for(numel: usize, blocksize: usize) -> usize {
        numel.div_ceil(2) + 4 * numel.div_ceil(blocksize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_values_round_trip_exactly() {
        let mut data: Vec<f32> = NF4_CODE.iter().map(|c| c * 0.5).collect();
        data.resize(64, 0.0);
        let q = Nf4Tensor::quantize(&data, [1, 64]);
        assert_eq!(q.absmax, vec![0.5]);
        assert_eq!(q.dequantize(), data);
        assert_eq!(q.storage_bytes(), 32 + 4);
    }
}
