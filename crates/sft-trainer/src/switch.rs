//! On/off switches read from the environment.

/// The switch `name`: `Some(true)` for `1` / `true` / `on` / `yes`, `Some(false)` for `0` /
/// `false` / `off` / `no` (any case, surrounding spaces ignored), `None` when unset or empty; any
/// other value is reported (naming the variable and the values it takes) and counts as unset.
pub(crate) fn env_switch(name: &str) -> Option<bool> {
    let value = std::env::var(name).ok()?;
    let read = switch_value(&value);
    if read.is_none() && !value.trim().is_empty() {
        eprintln!(
            "sft-trainer: {name}={value:?} is not an on/off value (1/0, true/false, on/off, \
             yes/no); the default applies"
        );
    }
    read
}

/// A switch's value, `None` when it is none of the accepted spellings.
fn switch_value(value: &str) -> Option<bool> {
    let v = value.trim().to_ascii_lowercase();
    if ["1", "true", "on", "yes"].contains(&v.as_str()) {
        Some(true)
    } else if ["0", "false", "off", "no"].contains(&v.as_str()) {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::switch_value;

    #[test]
    fn the_usual_spellings_of_on_and_off_are_read() {
        assert_eq!(switch_value(" On"), Some(true));
        assert_eq!(switch_value("YES"), Some(true));
        assert_eq!(switch_value("false"), Some(false));
        assert_eq!(switch_value("0"), Some(false));
        assert_eq!(switch_value("2"), None);
        assert_eq!(switch_value(""), None);
    }
}
