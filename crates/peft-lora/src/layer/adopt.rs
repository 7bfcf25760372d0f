//! Adopting Burn's own linear layer: [`LoraLinear`] from a [`burn::nn::Linear`], and
//! [`LoraLinearConfig`], the [`burn::nn::LinearConfig`] of a [`LoraLinear`].

use burn::config::Config;
use burn::module::Initializer;
use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::tensor::backend::Backend;

use super::LoraLinear;

/// A frozen [`LoraLinear`] with the same weight (Burn layout `[d_input, d_output]`, as
/// `nn::Linear` keeps it) and bias: before any adapter, its forward is the `Linear`'s.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::nn::LinearConfig;
/// use peft_lora::LoraLinear;
///
/// let device = Default::default();
/// let linear = LinearConfig::new(16, 8).init::<NdArray>(&device);
/// let layer: LoraLinear<NdArray> = linear.into();
/// assert_eq!((layer.d_in(), layer.d_out()), (16, 8));
/// ```
impl<B: Backend> From<Linear<B>> for LoraLinear<B> {
    fn from(linear: Linear<B>) -> Self {
        // `val()` is `[d_input, d_output]` for either `LinearLayout` (a `Col` layout is
        // transposed back when its parameter is initialised or loaded).
        LoraLinear::from_weight(linear.weight.val(), linear.bias.map(|b| b.val()))
    }
}

/// Configuration of a [`LoraLinear`], as [`LinearConfig`] configures a Burn `Linear`: the
/// same fields, defaults and initialisation, so swapping `LinearConfig` for `LoraLinearConfig`
/// in a model's config changes nothing else. The layer starts frozen and without adapters;
/// [`crate::PeftModel::add_adapter`] adds them.
///
/// ```
/// use burn::backend::NdArray;
/// use peft_lora::{LoraLinear, LoraLinearConfig};
///
/// let device = Default::default();
/// let layer: LoraLinear<NdArray> = LoraLinearConfig::new(16, 8).with_bias(false).init(&device);
/// assert!(layer.bias.is_none());
/// ```
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// Whether the frozen base has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// How the frozen base weight and bias are initialised (Burn's `Linear` default).
    #[config(
        default = "Initializer::KaimingUniform{gain: 1.0 / f64::sqrt(3.0), fan_out_only: false}"
    )]
    pub initializer: Initializer,
}

impl LoraLinearConfig {
    /// A frozen [`LoraLinear`] initialised as [`LinearConfig::init`] initialises a `Linear`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LoraLinear<B> {
        LinearConfig::new(self.d_input, self.d_output)
            .with_bias(self.bias)
            .with_initializer(self.initializer.clone())
            .with_layout(LinearLayout::Row)
            .init(device)
            .into()
    }
}

impl From<LinearConfig> for LoraLinearConfig {
    fn from(c: LinearConfig) -> Self {
        LoraLinearConfig {
            d_input: c.d_input,
            d_output: c.d_output,
            bias: c.bias,
            initializer: c.initializer,
        }
    }
}
