//! A frozen base weight kept in NF4 on the device (QLoRA): 4-bit codes plus f32 block scales,
//! dequantized on the fly in the forward, as bitsandbytes' `Linear4bit` does.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{
    backend::Backend, get_device_settings, DType, ElementConversion, Int, Tensor, TensorData,
};

use crate::nf4::{Nf4Tensor, NF4_CODE};

/// An NF4 weight on the device. Memory: `ceil(n / 2)` bytes of codes (a `u8` int tensor) and
/// `4 * ceil(n / blocksize)` bytes of absmax; the dense weight is never kept.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// Packed codes as stored by bitsandbytes (row-major over PyTorch's `[out, in]`, two per
    /// byte, high nibble first), dtype `u8`, `[ceil(n / 2)]`.
    pub packed: Param<Tensor<B, 1, Int>>,
    /// One f32 scale per block, `[ceil(n / blocksize)]`.
    pub absmax: Param<Tensor<B, 1>>,
    /// Input features.
    #[module(skip)]
    pub d_in: usize,
    /// Output features.
    #[module(skip)]
    pub d_out: usize,
    /// Values per absmax block.
    #[module(skip)]
    pub blocksize: usize,
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads a host NF4 matrix of shape `[out, in]`.
    pub fn from_host(q: &Nf4Tensor, device: &B::Device) -> Self {
        let packed = Tensor::<B, 1, Int>::from_data(
            TensorData::new(q.packed.clone(), [q.packed.len()]),
            (device, DType::U8),
        );
        let absmax = Tensor::<B, 1>::from_data(
            TensorData::new(q.absmax.clone(), [q.absmax.len()]),
            (device, DType::F32),
        );
        Nf4Weight {
            packed: Param::initialized(ParamId::new(), packed),
            absmax: Param::from_tensor(absmax).set_require_grad(false),
            d_in: q.shape[1],
            d_out: q.shape[0],
            blocksize: q.blocksize,
        }
    }

    /// Reads the codes and scales back to the host.
    pub fn to_host(&self) -> Nf4Tensor {
        let packed = self.packed.val().into_data();
        let packed = match packed.to_vec::<u8>() {
            Ok(v) => v,
            // A backend that widened the codes: narrow them again (every value is < 256).
            Err(_) => packed
                .convert::<i64>()
                .to_vec::<i64>()
                .expect("int tensor data")
                .into_iter()
                .map(|v| v as u8)
                .collect(),
        };
        let absmax = self
            .absmax
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("float tensor data");
        Nf4Tensor {
            shape: [self.d_out, self.d_in],
            blocksize: self.blocksize,
            packed,
            absmax,
        }
    }

    /// The dense weight in Burn layout `[in, out]`, f32: `NF4_CODE[code] * absmax`.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let device = self.absmax.device();
        let n = self.d_in * self.d_out;
        let bytes = self.packed.val();
        let len = bytes.dims()[0];
        let int_dtype = get_device_settings::<B>(&device).int_dtype;
        let bytes = bytes.cast(int_dtype);
        let hi = bytes.clone().bitwise_right_shift_scalar(4.elem());
        let lo = bytes.bitwise_and_scalar(15.elem());
        // [len, 2] row-major interleaves hi, lo: value 2i is the high nibble of byte i.
        let mut idx: Tensor<B, 1, Int> = Tensor::stack::<2>(vec![hi, lo], 1).reshape([2 * len]);
        if 2 * len != n {
            idx = idx.slice(0..n);
        }
        let code = Tensor::<B, 1>::from_data(
            TensorData::new(NF4_CODE.to_vec(), [NF4_CODE.len()]),
            (&device, DType::F32),
        );
        let values = code.select(0, idx);
        let absmax = self.absmax.val();
        let nb = absmax.dims()[0];
        let bs = self.blocksize;
        let dense = if n == nb * bs {
            (values.reshape([nb, bs]) * absmax.unsqueeze_dim::<2>(1))
                .reshape([self.d_out, self.d_in])
        } else {
            let scale = absmax
                .unsqueeze_dim::<2>(1)
                .repeat_dim(1, bs)
                .reshape([nb * bs])
                .slice(0..n);
            (values * scale).reshape([self.d_out, self.d_in])
        };
        dense.transpose()
    }

    /// Bytes held on the device (codes + absmax), from the tensors' dtypes and lengths.
    pub fn storage_bytes(&self) -> usize {
        let (p, a) = (self.packed.val(), self.absmax.val());
        p.dtype().size() * p.dims()[0] + a.dtype().size() * a.dims()[0]
    }
}

/// Quantizes a Burn-layout `[in, out]` weight in PyTorch's `[out, in]` order (bitsandbytes'
/// blocks run along the input features of each output row).
pub(crate) fn quantize_burn<B: Backend>(w: Tensor<B, 2>) -> Nf4Tensor {
    let [d_in, d_out] = w.dims();
    let host = w
        .transpose()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor data");
    Nf4Tensor::quantize(&host, [d_out, d_in])
}
