//! Rank 0 hands a payload (NCCL's unique id) to every rank over TCP at `MASTER_ADDR:MASTER_PORT`,
//! the way torchrun's store does, so the same code runs on one host or many.
//!
//! Rank 0 listens and accepts `world_size - 1` workers; each worker connects (retrying until
//! `connect_timeout`, since ranks start at different times) and says hello: magic, protocol
//! version, world size, rank. Rank 0 rejects a worker whose world size differs or whose rank
//! is taken or out of range (and then aborts the whole rendezvous, telling the workers that had
//! joined why). Once all joined, rank 0 sends each the payload. The connections stay open for
//! the [`crate::Watchdog`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame, Frame, ReadError, MAX_FRAME};
use crate::handshake::{check_hello, PROTOCOL_VERSION};
use crate::options::RendezvousOptions;
use crate::world::World;

/// How long rank 0 retries binding its port (a previous run's socket may linger briefly).
const BIND_RETRY: Duration = Duration::from_secs(5);
/// How long rank 0 waits for a connected worker's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Rank 0's payload limit (what a frame carries, less the frame's own fields).
const MAX_PAYLOAD: usize = MAX_FRAME - 16;

/// A finished rendezvous: rank 0's payload and the open connections (rank 0: one per worker; a
/// worker: one to rank 0).
///
/// Turn it into a [`crate::Watchdog`] with [`Rendezvous::into_watchdog`] right away: peers
/// that see no heartbeat for `peer_timeout` declare this rank failed. Dropping it closes the
/// connections, which rank 0 and the workers' watchdogs report as this rank having exited.
#[derive(Debug)]
pub struct Rendezvous {
    pub(crate) world: World,
    payload: Vec<u8>,
    pub(crate) links: Vec<Link>,
    pub(crate) opts: RendezvousOptions,
}

/// An open connection to a peer rank.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) rank: usize,
    pub(crate) addr: SocketAddr,
    pub(crate) stream: TcpStream,
}

impl Link {
    /// "rank 2 (10.0.0.3:51234)", for messages.
    pub(crate) fn name(&self) -> String {
        format!("rank {} ({})", self.rank, self.addr)
    }
}

impl Rendezvous {
    /// Rank 0's payload, on every rank.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// This process's world.
    pub fn world(&self) -> &World {
        &self.world
    }
}

/// Meets the other ranks at `world.master_addr:world.master_port` and returns rank 0's
/// payload on every rank; `payload` is called on rank 0 only.
///
/// Rank 0 listens on the port (on `MASTER_ADDR` itself when it is a loopback address, else on
/// every interface, as torchrun's store does) and waits up to `opts.connect_timeout` for every
/// worker; workers retry connecting for as long. A world of one returns at once.
pub fn rendezvous(
    world: &World,
    payload: impl FnOnce() -> Vec<u8>,
    opts: &RendezvousOptions,
) -> Result<Rendezvous> {
    opts.validate()?;
    if world.world_size == 0 || world.rank >= world.world_size {
        return Err(Error::Options {
            field: "world.rank",
            value: format!("{} of world_size {}", world.rank, world.world_size),
            expected: "a rank below a world size of at least 1",
        });
    }
    let (payload, links) = if world.rank == 0 {
        let payload = payload();
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let links = host(world, &payload, opts)?;
        (payload, links)
    } else {
        join(world, opts)?
    };
    for link in &links {
        let timeouts = link
            .stream
            .set_read_timeout(Some(opts.peer_timeout))
            .and_then(|()| link.stream.set_write_timeout(Some(write_timeout(opts))));
        timeouts.map_err(|source| Error::PeerIo {
            peer: link.name(),
            doing: "setting the watchdog's socket timeouts",
            source,
        })?;
    }
    Ok(Rendezvous {
        world: world.clone(),
        payload,
        links,
        opts: *opts,
    })
}

/// How long a write to a peer may block (a hung peer's full receive buffer).
fn write_timeout(opts: &RendezvousOptions) -> Duration {
    opts.peer_timeout.min(Duration::from_secs(10))
}

/// The error for a failed read from `peer` while `doing` something.
fn read_error(peer: String, doing: &'static str, e: ReadError) -> Error {
    match e {
        ReadError::Closed => Error::PeerIo {
            peer,
            doing,
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed"),
        },
        ReadError::Io(source) => Error::PeerIo {
            peer,
            doing,
            source,
        },
        ReadError::Malformed(detail) => Error::Frame { peer, detail },
    }
}

/// Rank 0: accepts every worker, checks its hello, then sends everyone the payload.
fn host(world: &World, payload: &[u8], opts: &RendezvousOptions) -> Result<Vec<Link>> {
    if world.world_size == 1 {
        return Ok(Vec::new());
    }
    let listener = bind(world, opts)?;
    let mut joined: Vec<Option<Link>> = (0..world.world_size).map(|_| None).collect();
    let result = accept_all(world, opts, &listener, &mut joined);
    let mut links: Vec<Link> = joined.into_iter().flatten().collect();
    let result = result.and_then(|()| {
        for link in &links {
            let welcome = Frame::Welcome {
                payload: payload.to_vec(),
            };
            write_frame(&link.stream, &welcome).map_err(|source| Error::PeerIo {
                peer: link.name(),
                doing: "sending the payload",
                source,
            })?;
        }
        Ok(())
    });
    if let Err(e) = result {
        let aborted = Frame::Aborted {
            reason: e.to_string(),
        };
        for link in &links {
            // Best effort: the workers learn why instead of seeing a bare closed connection.
            let _ = write_frame(&link.stream, &aborted);
        }
        return Err(e);
    }
    links.sort_by_key(|l| l.rank);
    Ok(links)
}

/// Binds rank 0's port, retrying briefly.
fn bind(world: &World, opts: &RendezvousOptions) -> Result<TcpListener> {
    let addr = listen_addr(world);
    let start = Instant::now();
    let retry_for = BIND_RETRY.min(opts.connect_timeout);
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                return listener
                    .set_nonblocking(true)
                    .map(|()| listener)
                    .map_err(|source| Error::Bind {
                        addr: addr.to_string(),
                        elapsed: start.elapsed(),
                        source,
                    })
            }
            Err(source) if start.elapsed() >= retry_for => {
                return Err(Error::Bind {
                    addr: addr.to_string(),
                    elapsed: start.elapsed(),
                    source,
                })
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `MASTER_ADDR` itself when it resolves to a loopback address (a single-host job stays off
/// the network), else the wildcard address of its family (`MASTER_ADDR` names rank 0's host
/// as the others reach it, which need not be an address of one of its interfaces).
fn listen_addr(world: &World) -> SocketAddr {
    let resolved: Vec<SocketAddr> = (world.master_addr.as_str(), world.master_port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if let Some(a) = resolved.iter().find(|a| a.ip().is_loopback()) {
        return *a;
    }
    let ip = match resolved.first() {
        Some(a) if a.is_ipv6() => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, world.master_port)
}

/// Accepts workers into `joined` until every rank joined or the connect timeout passes.
fn accept_all(
    world: &World,
    opts: &RendezvousOptions,
    listener: &TcpListener,
    joined: &mut [Option<Link>],
) -> Result<()> {
    let start = Instant::now();
    let expected = world.world_size - 1;
    let mut count = 0;
    while count < expected {
        match listener.accept() {
            Ok((stream, addr)) => {
                let deadline = start + opts.connect_timeout;
                let link = admit(world, stream, addr, deadline, joined)?;
                let rank = link.rank;
                joined[rank] = Some(link);
                count += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() >= opts.connect_timeout {
                    let addr = listener
                        .local_addr()
                        .map_or_else(|_| world.master(), |a| a.to_string());
                    return Err(Error::JoinTimeout {
                        addr,
                        joined: count,
                        expected,
                        elapsed: start.elapsed(),
                        missing: (1..world.world_size)
                            .filter(|&r| joined[r].is_none())
                            .collect(),
                    });
                }
                thread::sleep(Duration::from_millis(10));
            }
            // A connection that was reset before accept, or a signal: try again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) => {}
            Err(source) => {
                return Err(Error::PeerIo {
                    peer: "a connecting worker".into(),
                    doing: "accepting workers",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Reads a worker's hello and checks it; a rejected worker is told why.
fn admit(
    world: &World,
    stream: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
    joined: &[Option<Link>],
) -> Result<Link> {
    let peer = format!("the worker at {addr}");
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(100), HELLO_TIMEOUT);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(wait)));
    setup.map_err(|source| Error::PeerIo {
        peer: peer.clone(),
        doing: "setting up its connection",
        source,
    })?;
    let (version, world_size, rank) = match read_frame(&stream) {
        Ok(Frame::Hello {
            version,
            world_size,
            rank,
        }) => (version, world_size, rank),
        Ok(other) => {
            return Err(Error::Frame {
                peer,
                detail: format!("expected a hello, got a {} frame", other.name()),
            })
        }
        Err(e) => return Err(read_error(peer, "reading its hello", e)),
    };
    let taken: Vec<bool> = joined.iter().map(Option::is_some).collect();
    if let Err(mismatch) = check_hello(version, world_size, rank, world.world_size, &taken) {
        // Best effort: the worker's own error then names the mismatch.
        let _ = write_frame(&stream, &Frame::Reject(mismatch));
        return Err(Error::Handshake {
            peer: format!("the worker at {addr} claiming rank {rank}"),
            mismatch,
        });
    }
    Ok(Link { rank, addr, stream })
}

/// A worker: reaches rank 0, says hello and waits for the payload.
fn join(world: &World, opts: &RendezvousOptions) -> Result<(Vec<u8>, Vec<Link>)> {
    let master = world.master();
    let stream = connect(&master, opts.connect_timeout)?;
    let peer = format!("rank 0 ({master})");
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        world_size: world.world_size,
        rank: world.rank,
    };
    // Rank 0 answers once the last worker joined, which may take up to its connect timeout.
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(opts.connect_timeout)))
        .and_then(|()| write_frame(&stream, &hello));
    setup.map_err(|source| Error::PeerIo {
        peer: peer.clone(),
        doing: "sending the hello",
        source,
    })?;
    let payload = match read_frame(&stream) {
        Ok(Frame::Welcome { payload }) => payload,
        Ok(Frame::Reject(mismatch)) => {
            return Err(Error::Rejected {
                addr: master,
                mismatch,
            })
        }
        Ok(Frame::Aborted { reason }) => {
            return Err(Error::Aborted {
                addr: master,
                reason,
            })
        }
        Ok(other) => {
            return Err(Error::Frame {
                peer,
                detail: format!("expected the payload, got a {} frame", other.name()),
            })
        }
        Err(e) => return Err(read_error(peer, "waiting for rank 0's payload", e)),
    };
    let addr = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), world.master_port));
    Ok((
        payload,
        vec![Link {
            rank: 0,
            addr,
            stream,
        }],
    ))
}

/// Connects to `addr`, retrying (with backoff up to 1 s) until `timeout`.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let err = match try_connect(
            addr,
            left.clamp(Duration::from_millis(10), Duration::from_secs(5)),
        ) {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            return Err(Error::Connect {
                addr: addr.to_string(),
                elapsed: start.elapsed(),
                source: err,
            });
        }
        thread::sleep(backoff.min(timeout.saturating_sub(start.elapsed())));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One attempt at every address `addr` resolves to (resolution is retried too: rank 0's host
/// may not be in DNS yet).
fn try_connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}
