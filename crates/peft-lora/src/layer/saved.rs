//! A [`LoraLinear`] as a `modules_to_save` module: its whole base (weight and bias) trains as a
//! copy per adapter.

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor};

use super::LoraLinear;
use crate::saved::{SaveableModule, SavedCopies};

impl<B: Backend> SaveableModule<B> for LoraLinear<B> {
    fn saved(&self) -> &SavedCopies<B> {
        &self.saved
    }

    fn saved_mut(&mut self) -> &mut SavedCopies<B> {
        &mut self.saved
    }

    fn original(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        (self.base_weight(), self.bias.as_ref().map(|b| b.val()))
    }

    fn transposed_in_file(&self) -> bool {
        true
    }

    fn replace_original(&mut self, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) {
        self.set_base_weight(weight);
        self.bias = bias.map(|b| Param::from_tensor(b.detach()).set_require_grad(false));
    }
}
