//! Op selection: burn-cuda-ops' fused CUDA ops where the `cuda` feature is on and they cover the
//! backend and the tensors, else `None` (or `false`) so the caller composes Burn tensor ops. The
//! layer code reaches burn-cuda-ops only through here.

#[cfg(feature = "cuda")]
pub(crate) use burn_cuda_ops::{
    col_scale, dora_norm, dropout, frozen_linear, low_rank_linear, low_rank_linear_rows,
    seeded_adapters_enabled, shared_input_enabled, shared_input_linear, supported, SharedLinear,
};

#[cfg(not(feature = "cuda"))]
pub(crate) use off::{
    col_scale, dora_norm, dropout, frozen_linear, low_rank_linear, low_rank_linear_rows,
    seeded_adapters_enabled, shared_input_enabled, shared_input_linear, supported, SharedLinear,
};

/// The same signatures without the `cuda` feature: nothing is fused.
#[cfg(not(feature = "cuda"))]
mod off {
    use burn::tensor::{backend::Backend, Tensor};

    /// Whether `B` is a backend the fused ops run on: never without the `cuda` feature.
    #[allow(clippy::extra_unused_type_parameters)]
    pub(crate) fn supported<B: Backend>() -> bool {
        false
    }

    /// `x W (+ bias)` as one fused op: never without the `cuda` feature.
    pub(crate) fn frozen_linear<B: Backend>(
        _x: &Tensor<B, 2>,
        _w: &Tensor<B, 2>,
        _bias: Option<&Tensor<B, 1>>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// `x W (+ bias) + s (xd A) B` as one fused op: never without the `cuda` feature.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn low_rank_linear<B: Backend>(
        _x: &Tensor<B, 2>,
        _xd: Option<&Tensor<B, 2>>,
        _w: &Tensor<B, 2>,
        _bias: Option<&Tensor<B, 1>>,
        _a: &Tensor<B, 2>,
        _b: &Tensor<B, 2>,
        _scale: f64,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// `x W (+ bias)` with `+ s (x A) B` on a block of rows: never without the `cuda` feature.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn low_rank_linear_rows<B: Backend>(
        _x: &Tensor<B, 2>,
        _w: &Tensor<B, 2>,
        _bias: Option<&Tensor<B, 1>>,
        _a: &Tensor<B, 2>,
        _b: &Tensor<B, 2>,
        _scale: f64,
        _rows: std::ops::Range<usize>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// One linear of a shared-input group (the `cuda` feature's type, unused without it).
    #[allow(dead_code)]
    pub(crate) struct SharedLinear<'a, B: Backend> {
        pub w: &'a Tensor<B, 2>,
        pub bias: Option<&'a Tensor<B, 1>>,
        pub low_rank: Option<(&'a Tensor<B, 2>, &'a Tensor<B, 2>, f64)>,
        pub rows: Option<std::ops::Range<usize>>,
    }

    /// Linears over one input as one op: never without the `cuda` feature.
    pub(crate) fn shared_input_linear<B: Backend>(
        _x: &Tensor<B, 2>,
        _parts: &[SharedLinear<'_, B>],
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// Whether the shared-input op is on: never without the `cuda` feature.
    pub(crate) fn shared_input_enabled() -> bool {
        false
    }

    /// Whether [`crate::LoraLinear::backward_seeds`] seeds an adapted layer: always without the
    /// `cuda` feature (the switch governs the CUDA path only).
    pub(crate) fn seeded_adapters_enabled() -> bool {
        true
    }

    /// `y * g` (`g`: `[1, out]`) with a GEMM-reduced backward: never without the `cuda` feature.
    pub(crate) fn col_scale<B: Backend>(
        _y: &Tensor<B, 2>,
        _g: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// DoRA's column norms from `W`, `A^T W`, `A^T A` and `B` in two kernels: never without the
    /// `cuda` feature.
    pub(crate) fn dora_norm<B: Backend>(
        _w: &Tensor<B, 2>,
        _aw: &Tensor<B, 2>,
        _gram: &Tensor<B, 2>,
        _b: &Tensor<B, 2>,
        _s: f64,
    ) -> Option<Tensor<B, 1>> {
        None
    }

    /// Hashed-mask dropout as one kernel: never without the `cuda` feature (`seed` is not called).
    pub(crate) fn dropout<B: Backend>(
        _x: &Tensor<B, 2>,
        _p: f64,
        _seed: impl FnOnce() -> u64,
    ) -> Option<Tensor<B, 2>> {
        None
    }
}
