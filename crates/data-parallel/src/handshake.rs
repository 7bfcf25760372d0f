//! What rank 0 checks of each worker that joins the rendezvous.

use std::fmt;

/// The rendezvous protocol's version, bumped whenever a frame changes.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Why rank 0 turned a worker away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMismatch {
    /// The worker speaks another version of the rendezvous protocol.
    Version {
        /// Rank 0's version.
        expected: u32,
        /// The worker's version.
        got: u32,
    },
    /// The worker was launched with another `WORLD_SIZE`.
    WorldSize {
        /// Rank 0's world size.
        expected: usize,
        /// The worker's world size.
        got: usize,
    },
    /// The worker's rank is already taken (by rank 0 itself or an earlier worker).
    DuplicateRank {
        /// The rank claimed twice.
        rank: usize,
    },
    /// The worker's rank is not below the world size.
    RankOutOfRange {
        /// The rank claimed.
        rank: usize,
        /// Rank 0's world size.
        world_size: usize,
    },
}

impl fmt::Display for HandshakeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HandshakeMismatch::Version { expected, got } => write!(
                f,
                "the worker speaks rendezvous protocol version {got} but rank 0 speaks {expected}; run the same build everywhere"
            ),
            HandshakeMismatch::WorldSize { expected, got } => write!(
                f,
                "the worker has WORLD_SIZE={got} but rank 0 has WORLD_SIZE={expected}; every rank must be launched with the same world size"
            ),
            HandshakeMismatch::DuplicateRank { rank } => write!(
                f,
                "RANK={rank} is claimed by another process already; every rank must be unique"
            ),
            HandshakeMismatch::RankOutOfRange { rank, world_size } => write!(
                f,
                "RANK={rank} is out of range: expected 0..{world_size} (below WORLD_SIZE)"
            ),
        }
    }
}

/// Checks a worker's hello against rank 0's world and the ranks already joined.
pub(crate) fn check_hello(
    version: u32,
    world_size: usize,
    rank: usize,
    expected_world_size: usize,
    joined: &[bool],
) -> Result<(), HandshakeMismatch> {
    if version != PROTOCOL_VERSION {
        return Err(HandshakeMismatch::Version {
            expected: PROTOCOL_VERSION,
            got: version,
        });
    }
    if world_size != expected_world_size {
        return Err(HandshakeMismatch::WorldSize {
            expected: expected_world_size,
            got: world_size,
        });
    }
    if rank >= expected_world_size {
        return Err(HandshakeMismatch::RankOutOfRange {
            rank,
            world_size: expected_world_size,
        });
    }
    if rank == 0 || joined.get(rank).copied().unwrap_or(false) {
        return Err(HandshakeMismatch::DuplicateRank { rank });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mismatch_is_named_in_order_of_checks() {
        let joined = [true, true, false];
        let v = PROTOCOL_VERSION;
        assert_eq!(check_hello(v, 3, 2, 3, &joined), Ok(()));
        assert_eq!(
            check_hello(v + 1, 2, 9, 3, &joined),
            Err(HandshakeMismatch::Version {
                expected: v,
                got: v + 1
            })
        );
        assert_eq!(
            check_hello(v, 2, 9, 3, &joined),
            Err(HandshakeMismatch::WorldSize {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            check_hello(v, 3, 3, 3, &joined),
            Err(HandshakeMismatch::RankOutOfRange {
                rank: 3,
                world_size: 3
            })
        );
        for taken in [0, 1] {
            assert_eq!(
                check_hello(v, 3, taken, 3, &joined),
                Err(HandshakeMismatch::DuplicateRank { rank: taken })
            );
        }
        let msg = HandshakeMismatch::WorldSize {
            expected: 3,
            got: 2,
        }
        .to_string();
        assert!(
            msg.contains("WORLD_SIZE=2") && msg.contains("WORLD_SIZE=3"),
            "{msg}"
        );
    }
}
