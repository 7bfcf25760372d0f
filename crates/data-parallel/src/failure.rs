//! What the watchdog reports when a peer process dies or goes silent.

use std::fmt;

/// A rank the watchdog declared failed, as seen by the rank watching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The rank that failed.
    pub rank: usize,
    /// How it failed.
    pub kind: FailureKind,
    /// The rank that noticed (rank 0 for a worker; the worker for rank 0); other ranks learn of
    /// the failure from rank 0 with this unchanged.
    pub seen_by: usize,
}

/// How a rank failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// Its connection closed without a goodbye: the process exited or crashed.
    Exited,
    /// No heartbeat arrived within the peer timeout: the process or its host hangs, or the
    /// network between them is down.
    Silent {
        /// The peer timeout, in whole seconds (rounded up).
        secs: u64,
    },
    /// It sent bytes that are not a frame of the watchdog protocol.
    Garbled {
        /// What was wrong with them.
        detail: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (rank, seen_by) = (self.rank, self.seen_by);
        match &self.kind {
            FailureKind::Exited => {
                write!(
                    f,
                    "rank {rank} exited (its connection to rank {seen_by} closed)"
                )
            }
            FailureKind::Silent { secs } => {
                write!(f, "rank {rank} sent nothing to rank {seen_by} for {secs} s")
            }
            FailureKind::Garbled { detail } => {
                write!(
                    f,
                    "rank {rank} sent rank {seen_by} a malformed frame: {detail}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_failed_rank_and_the_watcher() {
        let exited = Failure {
            rank: 3,
            kind: FailureKind::Exited,
            seen_by: 0,
        };
        assert_eq!(
            exited.to_string(),
            "rank 3 exited (its connection to rank 0 closed)"
        );
        let silent = Failure {
            rank: 3,
            kind: FailureKind::Silent { secs: 120 },
            seen_by: 0,
        };
        assert_eq!(
            silent.to_string(),
            "rank 3 sent nothing to rank 0 for 120 s"
        );
    }
}
