//! Rendezvous over 127.0.0.1 between threads: the payload reaches every rank; bad peers are
//! typed errors on both sides.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use data_parallel::{
    free_port, rendezvous, Error, HandshakeMismatch, Rendezvous, RendezvousOptions, World,
};

fn opts() -> RendezvousOptions {
    RendezvousOptions {
        connect_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn spawn_rank(
    world: World,
    opts: RendezvousOptions,
) -> JoinHandle<data_parallel::Result<Rendezvous>> {
    thread::spawn(move || {
        rendezvous(
            &world,
            || {
                assert_eq!(world.rank, 0, "the payload is made on rank 0 only");
                (0u8..128).rev().collect()
            },
            &opts,
        )
    })
}

#[test]
fn three_ranks_get_rank_0s_payload() {
    let port = free_port().unwrap();
    // Workers first: they retry until rank 0 listens.
    let workers: Vec<_> = (1..3)
        .map(|r| spawn_rank(World::localhost(r, 3, port), opts()))
        .collect();
    thread::sleep(Duration::from_millis(200));
    let root = spawn_rank(World::localhost(0, 3, port), opts());
    let expected: Vec<u8> = (0u8..128).rev().collect();
    let root = root.join().unwrap().unwrap();
    assert_eq!(root.payload(), &expected[..]);
    assert!(root.world().is_main());
    for (r, w) in workers.into_iter().enumerate() {
        let w = w.join().unwrap().unwrap();
        assert_eq!(w.payload(), &expected[..]);
        assert_eq!(w.world().rank, r + 1);
    }
}

#[test]
fn a_world_of_one_needs_no_network() {
    let rv = rendezvous(&World::single(), || vec![7; 128], &opts()).unwrap();
    assert_eq!(rv.payload(), &[7; 128][..]);
}

#[test]
fn a_different_world_size_is_rejected_on_both_sides() {
    let port = free_port().unwrap();
    let root = spawn_rank(World::localhost(0, 3, port), opts());
    let worker = spawn_rank(World::localhost(1, 2, port), opts());
    let mismatch = HandshakeMismatch::WorldSize {
        expected: 3,
        got: 2,
    };
    match root.join().unwrap() {
        Err(Error::Handshake { peer, mismatch: m }) => {
            assert_eq!(m, mismatch);
            assert!(peer.contains("rank 1"), "{peer}");
        }
        other => panic!("rank 0: expected a handshake error, got {other:?}"),
    }
    match worker.join().unwrap() {
        Err(e @ Error::Rejected { .. }) => {
            assert!(matches!(&e, Error::Rejected { mismatch: m, .. } if *m == mismatch));
            let msg = e.to_string();
            assert!(
                msg.contains("WORLD_SIZE=2") && msg.contains("WORLD_SIZE=3"),
                "{msg}"
            );
        }
        other => panic!("worker: expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_duplicate_rank_is_rejected_and_the_joined_worker_told_why() {
    let port = free_port().unwrap();
    let root = spawn_rank(World::localhost(0, 3, port), opts());
    let a = spawn_rank(World::localhost(1, 3, port), opts());
    let b = spawn_rank(World::localhost(1, 3, port), opts());
    let dup = HandshakeMismatch::DuplicateRank { rank: 1 };
    match root.join().unwrap() {
        Err(Error::Handshake { mismatch, .. }) => assert_eq!(mismatch, dup),
        other => panic!("rank 0: expected a handshake error, got {other:?}"),
    }
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let (rejected, aborted) = match (a, b) {
        (Err(x @ Error::Rejected { .. }), Err(y)) | (Err(y), Err(x @ Error::Rejected { .. })) => {
            (x, y)
        }
        other => panic!("expected one worker rejected, got {other:?}"),
    };
    assert!(
        matches!(rejected, Error::Rejected { mismatch, .. } if mismatch == dup),
        "{rejected}"
    );
    match aborted {
        Error::Aborted { reason, .. } => assert!(reason.contains("RANK=1"), "{reason}"),
        other => panic!("the first worker: expected an abort, got {other}"),
    }
}

#[test]
fn an_out_of_range_rank_is_rejected() {
    let port = free_port().unwrap();
    let root = spawn_rank(World::localhost(0, 2, port), opts());
    let mut bad = World::localhost(1, 2, port);
    bad.rank = 5;
    // `rendezvous` refuses a rank >= world_size locally, so speak the protocol by hand.
    let hello = {
        let mut body = vec![1u8];
        body.extend_from_slice(b"PEFT-DP\0");
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&2u64.to_be_bytes());
        body.extend_from_slice(&(bad.rank as u64).to_be_bytes());
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend(body);
        f
    };
    let mut s = connect_retrying(port);
    s.write_all(&hello).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(reply[4], 3, "a reject frame");
    match root.join().unwrap() {
        Err(Error::Handshake { mismatch, .. }) => {
            assert_eq!(
                mismatch,
                HandshakeMismatch::RankOutOfRange {
                    rank: 5,
                    world_size: 2
                }
            )
        }
        other => panic!("rank 0: expected a handshake error, got {other:?}"),
    }
    let e = rendezvous(&bad, Vec::new, &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Options {
                field: "world.rank",
                ..
            }
        ),
        "{e}"
    );
}

fn connect_retrying(port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("rank 0 never listened: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_malformed_hello_is_an_error_naming_the_peer() {
    let port = free_port().unwrap();
    let root = spawn_rank(World::localhost(0, 2, port), opts());
    let mut s = connect_retrying(port);
    let local = s.local_addr().unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    match root.join().unwrap() {
        Err(Error::Frame { peer, detail }) => {
            assert!(peer.contains(&local.to_string()), "{peer}");
            assert!(detail.contains("bytes"), "{detail}");
        }
        other => panic!("expected a malformed-frame error, got {other:?}"),
    }
}

#[test]
fn a_malformed_reply_from_rank_0_is_an_error_naming_rank_0() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 4 + 1 + 8 + 4 + 16];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&[0, 0, 0, 3, 42, 0, 0]).unwrap();
        thread::sleep(Duration::from_millis(500));
    });
    let e = rendezvous(&World::localhost(1, 2, port), Vec::new, &opts()).unwrap_err();
    fake.join().unwrap();
    match e {
        Error::Frame { peer, detail } => {
            assert!(
                peer.contains("rank 0") && peer.contains(&port.to_string()),
                "{peer}"
            );
            assert!(detail.contains("tag 42"), "{detail}");
        }
        other => panic!("expected a malformed-frame error, got {other}"),
    }
}

#[test]
fn timeouts_name_the_address_and_the_time_waited() {
    let port = free_port().unwrap();
    let short = RendezvousOptions {
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let start = Instant::now();
    let e = rendezvous(&World::localhost(2, 3, port), Vec::new, &short).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(15));
    match &e {
        Error::Connect { addr, elapsed, .. } => {
            assert_eq!(addr, &format!("127.0.0.1:{port}"));
            assert!(*elapsed >= Duration::from_millis(500));
        }
        other => panic!("expected a connect error, got {other}"),
    }

    let e = rendezvous(&World::localhost(0, 3, port), Vec::new, &short).unwrap_err();
    match e {
        Error::JoinTimeout {
            joined: 0,
            expected: 2,
            missing,
            addr,
            ..
        } => {
            assert_eq!(missing, vec![1, 2]);
            assert!(addr.contains(&port.to_string()), "{addr}");
        }
        other => panic!("expected a join timeout, got {other}"),
    }
}
