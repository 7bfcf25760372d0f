//! The watchdog over the rendezvous connections: a crashed or silent rank is reported on every
//! rank, naming it; a clean shutdown reports nothing.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use data_parallel::{
    free_port, rendezvous, Failure, FailureKind, Rendezvous, RendezvousOptions, Watchdog, World,
};

/// Rendezvous of `n` ranks on threads, each with its own options.
fn meet(n: usize, opts: impl Fn(usize) -> RendezvousOptions) -> Vec<Rendezvous> {
    let port = free_port().unwrap();
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let o = opts(r);
            thread::spawn(move || rendezvous(&World::localhost(r, n, port), || vec![1; 128], &o))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

fn fast() -> RendezvousOptions {
    RendezvousOptions {
        connect_timeout: Duration::from_secs(20),
        heartbeat: Duration::from_millis(50),
        peer_timeout: Duration::from_secs(10),
    }
}

/// Watchdogs whose failures arrive on one channel as (observing rank, failure).
fn watch_all(rvs: Vec<Rendezvous>) -> (Vec<Watchdog>, Receiver<(usize, Failure)>) {
    let (tx, rx) = mpsc::channel();
    let dogs = rvs
        .into_iter()
        .map(|rv| {
            let rank = rv.world().rank;
            let tx: Sender<(usize, Failure)> = tx.clone();
            rv.into_watchdog(move |f| {
                let _ = tx.send((rank, f.clone()));
            })
        })
        .collect();
    (dogs, rx)
}

/// The failures seen within `within`, sorted by observing rank.
fn collect(
    rx: &Receiver<(usize, Failure)>,
    count: usize,
    within: Duration,
) -> Vec<(usize, Failure)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(x) => got.push(x),
            Err(_) => panic!("only {got:?} of {count} failures within {within:?}"),
        }
    }
    got.sort_by_key(|(r, _)| *r);
    got
}

#[test]
fn a_crashed_worker_is_reported_on_rank_0_and_the_other_worker() {
    let (mut dogs, rx) = watch_all(meet(3, |_| fast()));
    thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    // Rank 1 "crashes": its connections close without a goodbye.
    drop(dogs.remove(1));
    let got = collect(&rx, 2, Duration::from_secs(5));
    assert!(start.elapsed() < Duration::from_secs(5));
    let exited = Failure {
        rank: 1,
        kind: FailureKind::Exited,
        seen_by: 0,
    };
    assert_eq!(got, vec![(0, exited.clone()), (2, exited.clone())]);
    assert_eq!(
        exited.to_string(),
        "rank 1 exited (its connection to rank 0 closed)"
    );
    assert_eq!(dogs[0].failure(), Some(exited.clone()));
    assert_eq!(dogs[1].failure(), Some(exited));
    for d in dogs {
        d.shutdown();
    }
    thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "on_failure fires once per rank");
}

#[test]
fn a_dropped_rendezvous_is_reported_like_a_crash() {
    let mut rvs = meet(3, |_| fast());
    drop(rvs.remove(2));
    let (dogs, rx) = watch_all(rvs);
    let got = collect(&rx, 2, Duration::from_secs(5));
    let exited = Failure {
        rank: 2,
        kind: FailureKind::Exited,
        seen_by: 0,
    };
    assert_eq!(got, vec![(0, exited.clone()), (1, exited)]);
    for d in dogs {
        d.shutdown();
    }
}

#[test]
fn a_crashed_rank_0_is_reported_on_every_worker() {
    let (mut dogs, rx) = watch_all(meet(3, |_| fast()));
    drop(dogs.remove(0));
    let got = collect(&rx, 2, Duration::from_secs(5));
    assert_eq!(
        got[0],
        (
            1,
            Failure {
                rank: 0,
                kind: FailureKind::Exited,
                seen_by: 1
            }
        )
    );
    assert_eq!(
        got[1],
        (
            2,
            Failure {
                rank: 0,
                kind: FailureKind::Exited,
                seen_by: 2
            }
        )
    );
    for d in dogs {
        d.shutdown();
    }
}

#[test]
fn a_silent_worker_is_reported_as_silent() {
    let opts = |r: usize| {
        if r == 0 {
            RendezvousOptions {
                heartbeat: Duration::from_millis(100),
                peer_timeout: Duration::from_secs(1),
                ..fast()
            }
        } else {
            // Rank 1 heartbeats once at start, then not for a minute: silent from rank 0's view.
            RendezvousOptions {
                heartbeat: Duration::from_secs(60),
                peer_timeout: Duration::from_secs(120),
                ..fast()
            }
        }
    };
    let (dogs, rx) = watch_all(meet(2, opts));
    let start = Instant::now();
    let got = collect(&rx, 2, Duration::from_secs(10));
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "not before the peer timeout"
    );
    let silent = Failure {
        rank: 1,
        kind: FailureKind::Silent { secs: 1 },
        seen_by: 0,
    };
    // Rank 0 tells the silent rank too: if it is alive after all, it learns it was given up.
    assert_eq!(got, vec![(0, silent.clone()), (1, silent.clone())]);
    assert_eq!(silent.to_string(), "rank 1 sent nothing to rank 0 for 1 s");
    for d in dogs {
        d.shutdown();
    }
}

#[test]
fn a_clean_shutdown_of_every_rank_reports_nothing() {
    // All at once, workers first, rank 0 first: in no order is a goodbye a failure.
    for order in [[0usize, 1, 2], [1, 2, 0], [0, 2, 1]] {
        let (dogs, rx) = watch_all(meet(3, |_| RendezvousOptions {
            peer_timeout: Duration::from_secs(3),
            ..fast()
        }));
        thread::sleep(Duration::from_millis(300));
        let mut dogs: Vec<Option<Watchdog>> = dogs.into_iter().map(Some).collect();
        let mut joins = Vec::new();
        for (i, r) in order.iter().enumerate() {
            let d = dogs[*r].take().unwrap();
            assert_eq!(d.failure(), None);
            // The first rank leaves alone; the others a little later, together.
            if i == 0 {
                d.shutdown();
                thread::sleep(Duration::from_millis(500));
            } else {
                joins.push(thread::spawn(move || d.shutdown()));
            }
        }
        for j in joins {
            j.join().unwrap();
        }
        // Longer than the peer timeout: nobody reports a silence after the goodbyes either.
        thread::sleep(Duration::from_millis(3500));
        assert!(
            rx.try_recv().is_err(),
            "order {order:?}: {:?}",
            rx.try_recv()
        );
    }
}
