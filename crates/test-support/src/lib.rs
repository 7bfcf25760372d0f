//! Dev-only helpers shared by the workspace's tests (never a normal dependency of a crate).
//!
//! One home for what the test files used to copy: error measures between a result and its
//! reference ([`max_abs_diff`], [`max_rel`], [`masked`], and the [`host`] versions on plain
//! slices), the committed fixtures folder ([`fixtures_dir`]) and, with the `safetensors`
//! feature, readers for its safetensors files (module `st`), fresh temporary folders
//! ([`fresh_temp_dir`]), inputs a test cannot run without ([`required_env_path`]), and
//! transformers' sampling processors on the host ([`sampling`]).
//!
//! Every measure returns `f32`, whatever the backend's float element, so tests compare it with
//! plain literals.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor};

/// The smallest reference scale [`max_rel`] and [`host::max_rel`] divide by, so that an
/// all-zero reference gives a huge (failing) error rather than NaN.
pub const REL_FLOOR: f32 = 1e-12;

/// `max |a - b|` over all elements.
pub fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

/// `max |a - b| / max |b|`: the worst error relative to the reference `b`'s largest magnitude
/// (that magnitude floored at [`REL_FLOOR`]).
pub fn max_rel<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().elem::<f32>();
    max_abs_diff(a, b) / scale.max(REL_FLOOR)
}

/// `t` ([batch, seq, ..]) with the rows where `mask` ([batch, seq]) is 0 zeroed, e.g. logits of
/// padded query positions, which are implementation-defined. Compare two masked tensors with
/// [`max_rel`] to measure the error over the real positions only.
pub fn masked<B: Backend>(t: Tensor<B, 3>, mask: &Tensor<B, 2, Int>) -> Tensor<B, 3> {
    t * mask.clone().float().unsqueeze_dim::<3>(2)
}

pub mod check;
pub mod sampling;

/// The same measures on host values (row-major `f32` slices).
pub mod host {
    use super::REL_FLOOR;

    /// `max |v|` (0 for an empty slice).
    pub fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.abs()))
    }

    /// `max |a - b|`; panics when the lengths differ.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "compared slices differ in length");
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// `max |a - b| / max |b|` (the scale floored at [`REL_FLOOR`]); panics when the lengths
    /// differ.
    pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        max_abs_diff(a, b) / max_abs(b).max(REL_FLOOR)
    }

    /// Frobenius norm of `a - b`, accumulated in f64; panics when the lengths differ.
    pub fn fro_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len(), "compared slices differ in length");
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }
}

/// The workspace's committed `fixtures/` folder (made by `scripts/make_fixtures.py` and the
/// other `scripts/fixtures_*.py`).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A fresh, empty folder `<temp>/<prefix>-<pid>-<name>` for one test (removed first if a
/// previous run left it).
pub fn fresh_temp_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The path that environment variable `var` names, for a test that cannot run without it
/// (mark such a test `#[ignore = "needs VAR (...)"]`). Panics with a message naming `var` and
/// `what` it should hold when it is unset, empty, or names nothing on disk: a test whose input is
/// missing fails rather than passing without checking anything.
pub fn required_env_path(var: &str, what: &str) -> PathBuf {
    let value = std::env::var_os(var).filter(|v| !v.is_empty());
    let Some(value) = value else {
        panic!("{var} is not set: this test needs it to name {what}");
    };
    let path = PathBuf::from(value);
    assert!(
        path.exists(),
        "{var}={} names nothing on disk: it should name {what}",
        path.display()
    );
    path
}

/// Readers for the committed safetensors fixtures (feature `safetensors`), through
/// `peft_lora::SafetensorsFile`. Tensors are made on the backend's default device. Each reader
/// panics naming the file and the tensor when it is missing or has another dtype or rank.
#[cfg(feature = "safetensors")]
pub mod st {
    use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
    pub use peft_lora::SafetensorsFile;

    /// Opens a fixture file.
    pub fn open(path: &std::path::Path) -> SafetensorsFile {
        SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Tensor `name` as host f32 values: `(shape, row-major values)`.
    pub fn f32s(st: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = st
            .read(name)
            .unwrap_or_else(|e| panic!("{}: fixture tensor {name}: {e}", st.path().display()));
        (t.shape, t.data)
    }

    /// Integer tensor `name` as host i64 values: `(shape, row-major values)`.
    pub fn i64s(st: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<i64>) {
        st.read_i64(name)
            .unwrap_or_else(|e| panic!("{}: fixture tensor {name}: {e}", st.path().display()))
    }

    /// Tensor `name` as a float tensor of rank `D`.
    pub fn float<B: Backend, const D: usize>(st: &SafetensorsFile, name: &str) -> Tensor<B, D> {
        st.read(name)
            .and_then(|t| t.to_tensor(name, &Default::default()))
            .unwrap_or_else(|e| panic!("{}: fixture tensor {name}: {e}", st.path().display()))
    }

    /// Integer tensor `name` as an int tensor of rank `D`.
    pub fn int<B: Backend, const D: usize>(st: &SafetensorsFile, name: &str) -> Tensor<B, D, Int> {
        let (shape, v) = i64s(st, name);
        assert_eq!(
            shape.len(),
            D,
            "{}: fixture tensor {name} has shape {shape:?}, expected rank {D}",
            st.path().display()
        );
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }
}
