//! EVA's input hooks: which layers record their inputs, and one batch run through the model.

use std::collections::HashMap;

use burn::tensor::backend::Backend;
use faer::Mat;

use crate::adapter::InputCapture;
use crate::error::{Error, Result};
use crate::model::LoraModel;

/// Installs (or removes) the input hooks on the layers of adapter `name`; while installed
/// the adapters are disabled (PEFT runs EVA under `disable_adapter()`). Returns each
/// layer's previous `disabled` flag.
pub(super) fn set_capture<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    name: &str,
    on: bool,
) -> Vec<bool> {
    let mut was = Vec::new();
    for (_, layer) in model.lora_linears_mut() {
        was.push(layer.state.disabled);
        if layer.adapter(name).is_some() {
            layer.state.capture = on.then(InputCapture::default);
            if on {
                layer.state.disabled = true;
            }
        }
    }
    was
}

/// Gives every layer back the `disabled` flag [`set_capture`] returned.
pub(super) fn restore_disabled<B: Backend, M: LoraModel<B>>(model: &mut M, was: Vec<bool>) {
    for ((_, layer), d) in model.lora_linears_mut().into_iter().zip(was) {
        layer.state.disabled = d;
    }
}

/// Runs one batch and returns the masked inputs of the `wanted` layers, `[tokens, in]`.
pub(super) fn capture_batch<B: Backend, M: LoraModel<B>, T>(
    model: &mut M,
    batch: &T,
    wanted: &[String],
    forward: &mut impl FnMut(&M, &T),
    mask: &mut impl FnMut(&T) -> Vec<bool>,
) -> Result<HashMap<String, Mat<f32>>> {
    forward(model, batch);
    let keep = mask(batch);
    let mut out = HashMap::new();
    for (path, layer) in model.lora_linears() {
        let Some(capture) = &layer.state.capture else {
            continue;
        };
        let seen = capture.take();
        if !wanted.contains(&path) {
            continue;
        }
        let Some(x) = seen.into_iter().last() else {
            return Err(Error::config(
                "eva",
                format!("the forward function never ran layer `{path}`"),
            ));
        };
        let (n, d) = (x.shape[0], x.shape[1]);
        if keep.len() != n {
            return Err(Error::config(
                "eva",
                format!(
                    "the token mask has {} entries but layer `{path}` saw {n} tokens",
                    keep.len()
                ),
            ));
        }
        let rows: Vec<usize> = (0..n).filter(|i| keep[*i]).collect();
        out.insert(
            path,
            Mat::from_fn(rows.len(), d, |i, j| x.data[rows[i] * d + j]),
        );
    }
    Ok(out)
}
