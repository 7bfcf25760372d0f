//! The collectives the trainer needs, independent of how they are carried out (NCCL on GPUs,
//! threads in tests, nothing for one process).

use crate::error::{Error, Result};

/// Collective operations over the ranks of a world.
///
/// Every rank must call the same collectives in the same order with buffers of the same length;
/// a call returns once every rank has made it.
pub trait Communicator: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;

    /// Ranks in the world.
    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank with the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// Replaces `buf` on every rank with `root`'s `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// The world of one process: rank 0 of 1, where every collective is the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root("broadcast", root, 1)
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// `Err` unless `root` is a rank of a world of `world_size`.
pub(crate) fn check_root(op: &'static str, root: usize, world_size: usize) -> Result<()> {
    if root < world_size {
        Ok(())
    } else {
        Err(Error::RootOutOfRange {
            op,
            root,
            world_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_is_identity_and_checks_the_root() {
        let mut buf = [1.0, -2.5];
        Solo.all_reduce_sum(&mut buf).unwrap();
        Solo.broadcast(&mut buf, 0).unwrap();
        Solo.barrier().unwrap();
        assert_eq!(buf, [1.0, -2.5]);
        assert_eq!((Solo.rank(), Solo.world_size()), (0, 1));
        let e = Solo.broadcast(&mut buf, 1).unwrap_err();
        assert!(
            matches!(
                e,
                Error::RootOutOfRange {
                    root: 1,
                    world_size: 1,
                    ..
                }
            ),
            "{e}"
        );
    }
}
