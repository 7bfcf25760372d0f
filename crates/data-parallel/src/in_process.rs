//! A [`Communicator`] between threads of one process, for tests only.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::comm::{check_root, Communicator};
use crate::error::{Error, Result};

/// One rank of a world of threads: FOR TESTS ONLY.
///
/// The real collective is NCCL, one process per GPU. This exists so the trainer's data-parallel
/// semantics (sharding, gradient averaging, broadcast of the initial adapter) can be tested on
/// CPU with one thread per rank. [`InProcess::world`] makes one handle per rank; move each to
/// its own thread.
///
/// Sums are taken in rank order, `((r0 + r1) + r2) + ...`, so results are bit-reproducible.
/// Buffers of different lengths, different collectives or different broadcast roots at the same
/// step are errors on every rank. When a handle is dropped (its thread ended or panicked), the
/// ranks waiting for it, and every later collective, fail with [`Error::RankGone`] naming the
/// first rank that left.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world_size: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// A generation-counted rendezvous: each collective is one generation; the last rank to arrive
/// combines the contributions, publishes the outcome and opens the next generation.
#[derive(Debug)]
struct State {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Contribution>>,
    /// The outcome of generation `generation - 1`; it stays until every rank of that generation
    /// has read it, since the next generation cannot complete without them.
    outcome: Option<Arc<Outcome>>,
    /// Ranks whose handle was dropped, in the order they left; the first is the one to blame.
    left: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum,
    Broadcast { root: usize },
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

#[derive(Debug)]
struct Contribution {
    op: Op,
    data: Vec<f32>,
}

#[derive(Debug)]
enum Outcome {
    Data(Vec<f32>),
    Mismatch(Mismatch),
}

/// Why a generation's contributions do not form one collective (each rank builds its own
/// [`Error`] from it, since `Error` is not `Clone`).
#[derive(Debug, Clone, Copy)]
enum Mismatch {
    Op {
        op: Op,
        other_rank: usize,
        other_op: Op,
    },
    Root {
        root: usize,
        other_rank: usize,
        other_root: usize,
    },
    Len {
        op: Op,
        len: usize,
        other_rank: usize,
        other_len: usize,
    },
}

impl Mismatch {
    /// The error, seen from rank 0's contribution against `other_rank`'s.
    fn to_error(self) -> Error {
        match self {
            Mismatch::Op {
                op,
                other_rank,
                other_op,
            } => Error::OpMismatch {
                rank: 0,
                op: op.name(),
                other_rank,
                other_op: other_op.name(),
            },
            Mismatch::Root {
                root,
                other_rank,
                other_root,
            } => Error::RootMismatch {
                rank: 0,
                root,
                other_rank,
                other_root,
            },
            Mismatch::Len {
                op,
                len,
                other_rank,
                other_len,
            } => Error::LengthMismatch {
                op: op.name(),
                rank: 0,
                len,
                other_rank,
                other_len,
            },
        }
    }
}

impl InProcess {
    /// One handle per rank of a world of `world_size` threads (empty for 0).
    pub fn world(world_size: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world_size,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                slots: (0..world_size).map(|_| None).collect(),
                outcome: None,
                left: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| InProcess {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; a poisoned lock still holds consistent state.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn gone_error(&self, state: &State, op: Op) -> Option<Error> {
        state.left.first().map(|&gone| Error::RankGone {
            op: op.name(),
            rank: self.rank,
            gone,
        })
    }

    fn collective(&self, op: Op, buf: &mut [f32]) -> Result<()> {
        if let Op::Broadcast { root } = op {
            check_root("broadcast", root, self.shared.world_size)?;
        }
        let mut state = self.lock();
        if let Some(e) = self.gone_error(&state, op) {
            return Err(e);
        }
        let generation = state.generation;
        state.slots[self.rank] = Some(Contribution {
            op,
            data: buf.to_vec(),
        });
        state.arrived += 1;
        if state.arrived == self.shared.world_size {
            let contributions: Vec<Contribution> =
                state.slots.iter_mut().filter_map(Option::take).collect();
            state.outcome = Some(Arc::new(combine(contributions)));
            state.arrived = 0;
            state.generation += 1;
            self.shared.changed.notify_all();
        } else {
            while state.generation == generation {
                if let Some(e) = self.gone_error(&state, op) {
                    state.slots[self.rank] = None;
                    state.arrived -= 1;
                    return Err(e);
                }
                state = self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        let outcome = state.outcome.clone();
        drop(state);
        match outcome.as_deref() {
            Some(Outcome::Data(data)) => {
                if op != Op::Barrier {
                    buf.copy_from_slice(data);
                }
                Ok(())
            }
            Some(Outcome::Mismatch(m)) => Err(m.to_error()),
            None => unreachable!("a completed generation always publishes its outcome"),
        }
    }
}

/// Checks that the contributions (in rank order) form one collective and carries it out.
fn combine(contributions: Vec<Contribution>) -> Outcome {
    let Some(first) = contributions.first() else {
        return Outcome::Data(Vec::new());
    };
    for (other_rank, c) in contributions.iter().enumerate().skip(1) {
        let mismatch = if c.op.name() != first.op.name() {
            Some(Mismatch::Op {
                op: first.op,
                other_rank,
                other_op: c.op,
            })
        } else if let (Op::Broadcast { root }, Op::Broadcast { root: other_root }) =
            (first.op, c.op)
        {
            (root != other_root).then_some(Mismatch::Root {
                root,
                other_rank,
                other_root,
            })
        } else {
            None
        };
        let mismatch = mismatch.or_else(|| {
            (c.data.len() != first.data.len()).then_some(Mismatch::Len {
                op: first.op,
                len: first.data.len(),
                other_rank,
                other_len: c.data.len(),
            })
        });
        if let Some(m) = mismatch {
            return Outcome::Mismatch(m);
        }
    }
    match first.op {
        Op::Barrier => Outcome::Data(Vec::new()),
        Op::Broadcast { root } => Outcome::Data(contributions[root].data.clone()),
        Op::AllReduceSum => {
            let mut iter = contributions.into_iter();
            let mut sum = iter.next().map(|c| c.data).unwrap_or_default();
            for c in iter {
                for (s, x) in sum.iter_mut().zip(&c.data) {
                    *s += *x;
                }
            }
            Outcome::Data(sum)
        }
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.collective(Op::AllReduceSum, buf)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.collective(Op::Broadcast { root }, buf)
    }

    fn barrier(&self) -> Result<()> {
        self.collective(Op::Barrier, &mut [])
    }
}

impl Drop for InProcess {
    /// Marks this rank gone and wakes the ranks waiting for it.
    fn drop(&mut self) {
        let mut state = self.lock();
        state.left.push(self.rank);
        drop(state);
        self.shared.changed.notify_all();
    }
}
