//! The thread-backed communicator: exact, rank-ordered collectives and failures that name the
//! rank instead of hanging.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use data_parallel::{Communicator, Error, InProcess};

/// Runs `f` on one thread per rank; the results in rank order, or a panic after 60 s (a hang).
fn run_world<T: Send + 'static>(
    n: usize,
    f: impl Fn(InProcess) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for comm in InProcess::world(n) {
        let (f, tx) = (Arc::clone(&f), tx.clone());
        thread::spawn(move || {
            let rank = comm.rank();
            let out = f(comm);
            let _ = tx.send((rank, out));
        });
    }
    drop(tx);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (rank, v) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every rank finishes (no hang, no panic)");
        out[rank] = Some(v);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Rank `r`'s contribution at step `i`: magnitudes far apart so that summation order shows.
fn contribution(r: usize, i: usize) -> Vec<f32> {
    let big = [1.0e8_f32, 3.0, -1.0e8, 0.1];
    (0..7)
        .map(|j| {
            big[r % 4] * (1.0 + j as f32 * 0.37) + (i * 13 + j) as f32 * 0.01 * (r as f32 + 1.0)
        })
        .collect()
}

#[test]
fn four_ranks_fifty_rounds_of_every_collective_are_exact() {
    let n = 4;
    let arrivals = Arc::new(AtomicUsize::new(0));
    let arrivals2 = Arc::clone(&arrivals);
    let results = run_world(n, move |comm| -> Result<(), String> {
        let r = comm.rank();
        assert_eq!(comm.world_size(), n);
        for i in 0..50 {
            let mut buf = contribution(r, i);
            comm.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
            let expected: Vec<f32> = (0..7)
                .map(|j| {
                    let mut s = contribution(0, i)[j];
                    for q in 1..n {
                        s += contribution(q, i)[j];
                    }
                    s
                })
                .collect();
            // Bit-exact: the sum is taken in rank order on every rank.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            if bits(&buf) != bits(&expected) {
                return Err(format!("rank {r} step {i}: {buf:?} != {expected:?}"));
            }

            let root = i % n;
            let mut buf = contribution(r, i + 1000);
            comm.broadcast(&mut buf, root).map_err(|e| e.to_string())?;
            if buf != contribution(root, i + 1000) {
                return Err(format!(
                    "rank {r} step {i}: broadcast from {root} gave {buf:?}"
                ));
            }

            arrivals2.fetch_add(1, Ordering::SeqCst);
            comm.barrier().map_err(|e| e.to_string())?;
            let seen = arrivals2.load(Ordering::SeqCst);
            if seen < n * (i + 1) {
                return Err(format!(
                    "rank {r} left barrier {i} with only {seen} arrivals"
                ));
            }
            comm.barrier().map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    for (r, res) in results.into_iter().enumerate() {
        res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
    assert_eq!(arrivals.load(Ordering::SeqCst), 4 * 50);
}

#[test]
fn different_lengths_are_an_error_on_every_rank_naming_ranks_and_lengths() {
    let results = run_world(3, |comm| {
        let len = if comm.rank() == 2 { 5 } else { 4 };
        let mut buf = vec![1.0; len];
        comm.all_reduce_sum(&mut buf).err()
    });
    for e in results {
        let e = e.expect("a length mismatch is an error");
        assert!(
            matches!(
                e,
                Error::LengthMismatch {
                    rank: 0,
                    len: 4,
                    other_rank: 2,
                    other_len: 5,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("rank 2 passed 5") && msg.contains("rank 0 passed 4"),
            "{msg}"
        );
    }
}

#[test]
fn after_a_mismatch_the_next_collective_still_works() {
    let results = run_world(2, |comm| {
        let mut bad = vec![0.0; comm.rank() + 1];
        assert!(comm.all_reduce_sum(&mut bad).is_err());
        let mut good = vec![comm.rank() as f32 + 1.0];
        comm.all_reduce_sum(&mut good).unwrap();
        good[0]
    });
    assert_eq!(results, vec![3.0, 3.0]);
}

#[test]
fn different_collectives_or_roots_are_errors() {
    let results = run_world(2, |comm| {
        let mut buf = vec![1.0; 2];
        let op = if comm.rank() == 0 {
            comm.all_reduce_sum(&mut buf)
        } else {
            comm.broadcast(&mut buf, 0)
        };
        let root = comm.broadcast(&mut buf, comm.rank());
        let out_of_range = comm.broadcast(&mut buf, 7);
        (
            op.unwrap_err(),
            root.unwrap_err(),
            out_of_range.unwrap_err(),
        )
    });
    for (op, root, out_of_range) in results {
        assert!(
            matches!(
                op,
                Error::OpMismatch {
                    op: "all_reduce_sum",
                    other_rank: 1,
                    other_op: "broadcast",
                    ..
                }
            ),
            "{op}"
        );
        assert!(
            matches!(
                root,
                Error::RootMismatch {
                    root: 0,
                    other_rank: 1,
                    other_root: 1,
                    ..
                }
            ),
            "{root}"
        );
        assert!(
            matches!(
                out_of_range,
                Error::RootOutOfRange {
                    root: 7,
                    world_size: 2,
                    ..
                }
            ),
            "{out_of_range}"
        );
    }
}

#[test]
fn a_dropped_rank_makes_the_waiting_ranks_fail_naming_it() {
    let results = run_world(4, |comm| {
        let mut buf = vec![1.0; 3];
        comm.all_reduce_sum(&mut buf).unwrap();
        if comm.rank() == 2 {
            // Rank 2's thread ends (its handle drops) while the others enter the next collective.
            thread::sleep(Duration::from_millis(200));
            return None;
        }
        let waiting = comm.all_reduce_sum(&mut buf).unwrap_err();
        let later = comm.barrier().unwrap_err();
        Some((comm.rank(), waiting, later))
    });
    for (rank, waiting, later) in results.into_iter().flatten() {
        assert!(
            matches!(waiting, Error::RankGone { gone: 2, .. }),
            "{waiting}"
        );
        assert!(waiting.to_string().contains("rank 2 left"), "{waiting}");
        assert!(
            matches!(later, Error::RankGone { gone: 2, op: "barrier", rank: r, .. } if r == rank),
            "{later}"
        );
    }
}

#[test]
fn a_panicking_rank_makes_the_others_fail_naming_it() {
    let (tx, rx) = mpsc::channel();
    for comm in InProcess::world(3) {
        let tx = tx.clone();
        thread::spawn(move || {
            if comm.rank() == 1 {
                panic!("rank 1 crashes on purpose (this panic message is expected)");
            }
            let mut buf = vec![0.5; 2];
            let _ = tx.send(comm.all_reduce_sum(&mut buf));
        });
    }
    drop(tx);
    for _ in 0..2 {
        let e = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the surviving ranks return")
            .unwrap_err();
        assert!(matches!(e, Error::RankGone { gone: 1, .. }), "{e}");
    }
}
