//! Timeouts of the rendezvous and of the watchdog that keeps its connections.

use std::time::Duration;

use crate::error::{Error, Result};

/// The variable that overrides [`RendezvousOptions::peer_timeout`], in seconds.
pub const PEER_TIMEOUT_VAR: &str = "PEFT_DP_TIMEOUT_S";

/// Timeouts of [`crate::rendezvous`] and of the [`crate::Watchdog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RendezvousOptions {
    /// How long workers retry reaching rank 0, and rank 0 waits for every worker (default
    /// 300 s, torchrun's rendezvous timeout: ranks start at different times, e.g. after loading
    /// a model).
    pub connect_timeout: Duration,
    /// How often the watchdog tells its peers it is alive (default 1 s).
    pub heartbeat: Duration,
    /// How long a peer may send nothing before the watchdog declares it failed (default 120 s;
    /// `PEFT_DP_TIMEOUT_S` in [`RendezvousOptions::from_env`]). Must exceed `heartbeat`.
    pub peer_timeout: Duration,
}

impl Default for RendezvousOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(120),
        }
    }
}

impl RendezvousOptions {
    /// The defaults, with `peer_timeout` from `PEFT_DP_TIMEOUT_S` when it is set.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`RendezvousOptions::from_env`] reading variables through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut opts = Self::default();
        if let Some(value) = get(PEER_TIMEOUT_VAR) {
            let secs = value.trim().parse::<f64>().ok();
            match secs.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
                Some(d) if d > opts.heartbeat => opts.peer_timeout = d,
                _ => {
                    return Err(Error::EnvValue {
                        var: PEER_TIMEOUT_VAR,
                        value,
                        expected: format!(
                            "a number of seconds above the heartbeat interval ({} s)",
                            opts.heartbeat.as_secs_f64()
                        ),
                    })
                }
            }
        }
        Ok(opts)
    }

    /// `Err` naming the first option the rendezvous or the watchdog cannot work with.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: Duration, expected| {
            Err(Error::Options {
                field,
                value: format!("{value:?}"),
                expected,
            })
        };
        if self.connect_timeout.is_zero() {
            return bad(
                "connect_timeout",
                self.connect_timeout,
                "a positive duration",
            );
        }
        if self.heartbeat.is_zero() {
            return bad("heartbeat", self.heartbeat, "a positive duration");
        }
        if self.peer_timeout <= self.heartbeat {
            return bad(
                "peer_timeout",
                self.peer_timeout,
                "a duration above heartbeat, or every peer would look silent",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_peer_timeout_and_bad_values_name_the_variable() {
        let opts = RendezvousOptions::from_vars(|_| None).unwrap();
        assert_eq!(opts, RendezvousOptions::default());
        assert_eq!(opts.peer_timeout, Duration::from_secs(120));

        let opts = RendezvousOptions::from_vars(|n| (n == PEER_TIMEOUT_VAR).then(|| "30".into()));
        assert_eq!(opts.unwrap().peer_timeout, Duration::from_secs(30));

        for bad in ["abc", "-5", "0", "0.5", "inf", "NaN"] {
            let e = RendezvousOptions::from_vars(|_| Some(bad.into())).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::EnvValue {
                        var: PEER_TIMEOUT_VAR,
                        ..
                    }
                ),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn validate_rejects_a_peer_timeout_below_the_heartbeat() {
        RendezvousOptions::default().validate().unwrap();
        let opts = RendezvousOptions {
            peer_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let e = opts.validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Options {
                    field: "peer_timeout",
                    ..
                }
            ),
            "{e}"
        );
    }
}
