//! Tensors on the host: what is read from and written to files, and what the host-side linear
//! algebra starts from.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::{Error, Result};

/// One tensor converted to f32 on the host.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Moves it to a Burn tensor of rank `D` (checking the rank).
    pub fn to_tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        if self.shape.len() != D {
            return Err(Error::Shape {
                name: name.into(),
                expected: vec![0; D],
                found: self.shape.clone(),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        ))
    }
}

/// A Burn tensor's values on the host.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    HostTensor { shape, data }
}
