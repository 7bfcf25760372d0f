//! Which process this is among how many, as torchrun (and [`crate::launch`]) tell it through
//! the environment.

use crate::error::{Error, Result};

/// `MASTER_ADDR` when unset.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// `MASTER_PORT` when unset (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's place in a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// Processes in the job (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank among the processes of this node; picks the GPU (`LOCAL_RANK`).
    pub local_rank: usize,
    /// Processes on this node (`LOCAL_WORLD_SIZE`).
    pub local_world_size: usize,
    /// Host of rank 0's rendezvous (`MASTER_ADDR`).
    pub master_addr: String,
    /// Port of rank 0's rendezvous (`MASTER_PORT`).
    pub master_port: u16,
}

impl World {
    /// The world of one process: rank 0 of 1.
    pub fn single() -> Self {
        Self::localhost(0, 1, DEFAULT_MASTER_PORT)
    }

    /// Rank `rank` of `world_size` processes on this host, meeting at `127.0.0.1:master_port`
    /// (tests and single-node jobs started without the environment).
    pub fn localhost(rank: usize, world_size: usize, master_port: u16) -> Self {
        Self {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: DEFAULT_MASTER_ADDR.to_string(),
            master_port,
        }
    }

    /// Whether this is rank 0 (the one that logs, evaluates and saves).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// `master_addr:master_port`, the rendezvous address.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Reads torchrun's variables from the process environment; `Ok(None)` when neither
    /// `RANK` nor `WORLD_SIZE` is set (a single process). See [`World::from_vars`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads torchrun's variables through `get`: `RANK`, `WORLD_SIZE` (both or neither),
    /// `LOCAL_RANK` (default `RANK`), `LOCAL_WORLD_SIZE` (default `WORLD_SIZE`), `MASTER_ADDR`
    /// (default 127.0.0.1), `MASTER_PORT` (default 29500). `Ok(None)` when neither `RANK` nor
    /// `WORLD_SIZE` is set.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let (rank_s, world_s) = match (get("RANK"), get("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(value), None) => {
                return Err(Error::EnvIncomplete {
                    set: "RANK",
                    value,
                    missing: "WORLD_SIZE",
                })
            }
            (None, Some(value)) => {
                return Err(Error::EnvIncomplete {
                    set: "WORLD_SIZE",
                    value,
                    missing: "RANK",
                })
            }
            (Some(r), Some(w)) => (r, w),
        };
        let world_size = parse_count("WORLD_SIZE", &world_s)?;
        let rank = parse_index("RANK", &rank_s, "WORLD_SIZE", world_size)?;

        let local_world_size = match get("LOCAL_WORLD_SIZE") {
            Some(v) => {
                let n = parse_count("LOCAL_WORLD_SIZE", &v)?;
                if n > world_size {
                    return Err(Error::EnvValue {
                        var: "LOCAL_WORLD_SIZE",
                        value: v,
                        expected: format!("at most WORLD_SIZE = {world_size}"),
                    });
                }
                n
            }
            None => world_size,
        };
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => parse_index("LOCAL_RANK", &v, "LOCAL_WORLD_SIZE", local_world_size)?,
            None if rank < local_world_size => rank,
            None => {
                return Err(Error::EnvValue {
                    var: "LOCAL_RANK",
                    value: format!("unset (defaults to RANK = {rank})"),
                    expected: format!(
                        "a value below LOCAL_WORLD_SIZE = {local_world_size}; set LOCAL_RANK on multi-node jobs"
                    ),
                })
            }
        };

        let master_addr = match get("MASTER_ADDR") {
            Some(v) if v.trim().is_empty() => {
                return Err(Error::EnvValue {
                    var: "MASTER_ADDR",
                    value: v,
                    expected: "the host name or IP address of rank 0".into(),
                })
            }
            Some(v) => v.trim().to_string(),
            None => DEFAULT_MASTER_ADDR.to_string(),
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(Error::EnvValue {
                        var: "MASTER_PORT",
                        value: v,
                        expected: "a TCP port in 1..=65535".into(),
                    })
                }
            },
            None => DEFAULT_MASTER_PORT,
        };

        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }
}

/// A count of processes: an integer of at least 1.
fn parse_count(var: &'static str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Error::EnvValue {
            var,
            value: value.to_string(),
            expected: "an integer of at least 1".into(),
        }),
    }
}

/// An index into a count named `bound_var` whose value is `bound`.
fn parse_index(var: &'static str, value: &str, bound_var: &str, bound: usize) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(i) if i < bound => Ok(i),
        _ => Err(Error::EnvValue {
            var,
            value: value.to_string(),
            expected: format!("an integer in 0..{bound} (below {bound_var} = {bound})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn err_of(pairs: &[(&str, &str)]) -> Error {
        match World::from_vars(vars(pairs)) {
            Err(e) => e,
            Ok(w) => panic!("expected an error for {pairs:?}, got {w:?}"),
        }
    }

    #[test]
    fn no_variables_is_single_process() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_and_defaults() {
        let w = World::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "4")]))
            .unwrap()
            .unwrap();
        assert_eq!(w, World::localhost(2, 4, 29500));
        assert!(!w.is_main());

        let w = World::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0.cluster"),
            ("MASTER_PORT", "12345"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            w,
            World {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "node0.cluster".into(),
                master_port: 12345,
            }
        );
        assert_eq!(w.master(), "node0.cluster:12345");
        assert!(World::single().is_main());
    }

    #[test]
    fn one_of_rank_and_world_size_is_an_error_naming_both() {
        let e = err_of(&[("RANK", "0")]);
        assert!(matches!(
            e,
            Error::EnvIncomplete {
                set: "RANK",
                missing: "WORLD_SIZE",
                ..
            }
        ));
        assert!(e.to_string().contains("RANK=\"0\"") && e.to_string().contains("WORLD_SIZE"));
        let e = err_of(&[("WORLD_SIZE", "2")]);
        assert!(matches!(
            e,
            Error::EnvIncomplete {
                set: "WORLD_SIZE",
                missing: "RANK",
                ..
            }
        ));
    }

    #[test]
    fn bad_values_name_the_variable_value_and_expectation() {
        // (variables, the variable named in the error, a piece of its value)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK", "x"),
            (&[("RANK", "-1"), ("WORLD_SIZE", "2")], "RANK", "-1"),
            (&[("RANK", "0"), ("WORLD_SIZE", "two")], "WORLD_SIZE", "two"),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE", "0"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK", "2"),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "4"),
                    ("LOCAL_RANK", "2"),
                    ("LOCAL_WORLD_SIZE", "2"),
                ],
                "LOCAL_RANK",
                "2",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_WORLD_SIZE", "3"),
                ],
                "LOCAL_WORLD_SIZE",
                "3",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_WORLD_SIZE", "0"),
                ],
                "LOCAL_WORLD_SIZE",
                "0",
            ),
            (
                &[
                    ("RANK", "3"),
                    ("WORLD_SIZE", "4"),
                    ("LOCAL_WORLD_SIZE", "2"),
                ],
                "LOCAL_RANK",
                "unset",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")],
                "MASTER_PORT",
                "70000",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "0")],
                "MASTER_PORT",
                "0",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", " ")],
                "MASTER_ADDR",
                " ",
            ),
        ];
        for (pairs, var, value) in cases {
            let e = err_of(pairs);
            match &e {
                Error::EnvValue {
                    var: v,
                    value: val,
                    expected,
                } => {
                    assert_eq!(v, var, "{pairs:?}");
                    assert!(val.contains(value), "{pairs:?}: value {val:?}");
                    assert!(!expected.is_empty());
                }
                other => panic!("{pairs:?}: expected EnvValue, got {other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(var) && msg.contains("expected"), "{msg}");
        }
    }
}
