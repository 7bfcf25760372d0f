//! What a model implements to get the LoRA family ([`LoraModel`]), and what is computed over
//! all of its layers at once (aLoRA's per-row offsets).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;

use crate::discover::refuse_replication;
use crate::error::Result;
use crate::layer::LoraLinear;
use crate::routing::{invocation_offset, LoraCtx};
use crate::tokens::TrainableTokens;

/// A model whose linear layers are [`LoraLinear`]s, listed by their Hugging Face module path
/// (`model.layers.0.self_attn.q_proj`). This is all a model implements to get the LoRA family.
///
/// Derive it: `#[derive(Module, Debug, LoraModel)]` on the model and on every struct on the
/// way to its layers finds each [`LoraLinear`] and [`TrainableTokens`] field by the path Burn
/// records for it (field names joined by `.`, a `Vec` element's index, nothing for an
/// `Option`; other fields are skipped), so no path is typed by hand. Field attributes:
/// `#[lora(head)]` (the field's linears are heads, see [`LoraModel::head_linears`]),
/// `#[lora(skip)]`; Burn's `#[module(skip)]` fields are skipped too. The struct attribute
/// `#[lora_model(hooks)]` takes [`LoraModel::replicate_layers`], [`LoraModel::vocab_size`] and
/// [`LoraModel::supports_alora`] from the model's [`crate::LoraModelHooks`] impl.
///
/// ```
/// use burn::module::Module;
/// use burn::tensor::backend::Backend;
/// use peft_lora::{LoraLinear, LoraModel};
///
/// #[derive(Module, Debug, LoraModel)]
/// struct Encoder<B: Backend> {
///     fc1: LoraLinear<B>,
///     fc2: LoraLinear<B>,
/// }
///
/// #[derive(Module, Debug, LoraModel)]
/// struct Classifier<B: Backend> {
///     encoder: Encoder<B>,
///     #[lora(head)]
///     head: LoraLinear<B>,
/// }
///
/// let device = Default::default();
/// let lin = |i, o| LoraLinear::<burn::backend::NdArray>::random(i, o, true, &device);
/// let m = Classifier { encoder: Encoder { fc1: lin(4, 8), fc2: lin(8, 8) }, head: lin(8, 2) };
/// let paths: Vec<String> = m.lora_linears().into_iter().map(|(p, _)| p).collect();
/// assert_eq!(paths, ["encoder.fc1", "encoder.fc2"]);
/// assert_eq!(m.head_linears()[0].0, "head");
/// ```
///
/// Implemented by hand, the output head must not be listed in [`LoraModel::lora_linears`]
/// (PEFT's `"all-linear"` never adapts it): list it in [`LoraModel::head_linears`] so that
/// `modules_to_save` can train it.
pub trait LoraModel<B: Backend> {
    /// Every adaptable linear with its dotted module path, in a stable order.
    fn lora_linears(&self) -> Vec<(String, &LoraLinear<B>)>;
    /// The same, mutably.
    fn lora_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)>;

    /// Linear layers that are never LoRA targets but that `modules_to_save` can name, with
    /// their module paths: an output head (PEFT's `"all-linear"` never adapts it). None by
    /// default.
    fn head_linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        Vec::new()
    }

    /// The same, mutably.
    fn head_linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        Vec::new()
    }

    /// Embedding tables whose rows can train (`trainable_token_indices`), with their module
    /// paths; the input embedding first (a plain list of ids targets it). `modules_to_save`
    /// can name them too (the whole table trains). None by default.
    fn token_tables(&self) -> Vec<(String, &TrainableTokens<B>)> {
        Vec::new()
    }

    /// The same, mutably.
    fn token_tables_mut(&mut self) -> Vec<(String, &mut TrainableTokens<B>)> {
        Vec::new()
    }

    /// Rebuilds the decoder stack from `[start, end)` ranges of its layers
    /// (`layer_replication`; see [`crate::layer_map`]), sharing the frozen weights of copies and
    /// renumbering the layer paths. Called before any adapter exists. The default refuses.
    fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> Result<()> {
        Err(refuse_replication(ranges))
    }

    /// Whether the model computes aLoRA offsets (PEFT's `alora_offsets`, from its token ids with
    /// [`alora_offsets`]) and passes them to its layers through
    /// [`LoraLinear::forward_ctx`]. An aLoRA adapter (`alora_invocation_tokens`) is refused by a
    /// model that does not (the default): with a plain [`LoraLinear::forward`] it would never
    /// run.
    fn supports_alora(&self) -> bool {
        false
    }

    /// Size of the token vocabulary, when the model has one: aLoRA invocation token ids are
    /// checked against it when an adapter is added or loaded.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// The invocation sequence of the aLoRA adapter each of `batch` rows runs in this call, as
/// PEFT resolves it: the row's adapter in `ctx.row_adapters`, else the first active aLoRA
/// adapter. `None` when no row runs an aLoRA adapter (then there is nothing to compute).
pub fn alora_row_invocations<B: Backend, M: LoraModel<B>>(
    model: &M,
    ctx: &LoraCtx,
    batch: usize,
) -> Option<Vec<Option<Vec<u32>>>> {
    let mut by_name: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut active: Option<Vec<u32>> = None;
    for (_, layer) in model.lora_linears() {
        if layer.state.disabled {
            continue;
        }
        for a in &layer.adapters {
            if let Some(inv) = &a.meta.alora_invocation_tokens {
                by_name
                    .entry(a.meta.name.clone())
                    .or_insert_with(|| inv.clone());
            }
        }
        if active.is_none() {
            active = layer
                .state
                .active
                .iter()
                .find_map(|n| layer.adapter(n)?.meta.alora_invocation_tokens.clone());
        }
    }
    if by_name.is_empty() {
        return None;
    }
    let rows: Vec<Option<Vec<u32>>> = match &ctx.row_adapters {
        None => vec![active; batch],
        Some(rows) => rows
            .iter()
            .map(|r| r.as_ref().and_then(|n| by_name.get(n).cloned()))
            .collect(),
    };
    rows.iter().any(Option::is_some).then_some(rows)
}

/// PEFT's `calculate_alora_offsets` for the token ids `rows` of one call (padding included):
/// per row the offset of its adapter's invocation, `None` where the row has no aLoRA adapter
/// or no invocation. The whole result is `None` when no row runs an aLoRA adapter.
pub fn alora_offsets<B: Backend, M: LoraModel<B>, T: Copy + Into<i64>>(
    model: &M,
    ctx: &LoraCtx,
    rows: &[&[T]],
) -> Option<Vec<Option<usize>>> {
    let inv = alora_row_invocations(model, ctx, rows.len())?;
    Some(
        rows.iter()
            .zip(inv)
            .map(|(row, inv)| inv.and_then(|i| invocation_offset(row, &i)))
            .collect(),
    )
}
