//! PEFT's tensor key names in adapter files: the module path under PEFT's wrapper, with the
//! adapter name removed.

/// Prefix PEFT puts before module paths.
pub const KEY_PREFIX: &str = "base_model.model.";
/// Suffix of a table's trainable token rows after its module path.
pub const TOKEN_DELTA_SUFFIX: &str = "token_adapter.trainable_tokens_delta";

/// The saved key of the trainable token rows of the table at `path`.
pub fn token_delta_key(path: &str) -> String {
    format!("{KEY_PREFIX}{path}.{TOKEN_DELTA_SUFFIX}")
}

/// The saved keys of a `modules_to_save` module at `path`: its weight and its bias
/// (`base_model.model.<path>.weight` / `.bias`, as PEFT's `get_peft_model_state_dict` writes
/// `modules_to_save.<adapter>.` away).
pub fn saved_module_keys(path: &str) -> (String, String) {
    (
        format!("{KEY_PREFIX}{path}.weight"),
        format!("{KEY_PREFIX}{path}.bias"),
    )
}
