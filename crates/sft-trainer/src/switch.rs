//! On/off switches read from the environment (`1` / `true` / `on`, `0` / `false` / `off`).

/// The switch `name`: `Some(true)` for `1` / `true` / `on`, `Some(false)` for `0` / `false` /
/// `off` (surrounding spaces ignored), `None` when unset or anything else.
pub(crate) fn env_switch(name: &str) -> Option<bool> {
    match std::env::var(name).ok()?.trim() {
        "1" | "true" | "on" => Some(true),
        "0" | "false" | "off" => Some(false),
        _ => None,
    }
}
