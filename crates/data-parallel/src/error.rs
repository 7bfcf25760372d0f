//! The crate's error type: every variant names the thing that is wrong (a variable, a rank, a
//! peer address, a child process) and what was expected of it.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::handshake::HandshakeMismatch;

/// Errors of world discovery, collectives, rendezvous and the launcher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One of `RANK` / `WORLD_SIZE` is set and the other is not.
    #[error("environment variable {set}={value:?} is set but {missing} is not; a multi-process launch (torchrun, `launch`) sets both")]
    EnvIncomplete {
        /// The variable that is set.
        set: &'static str,
        /// Its value.
        value: String,
        /// The variable that is missing.
        missing: &'static str,
    },
    /// An environment variable has a value that does not parse or is out of range.
    #[error("environment variable {var}={value:?} is invalid: expected {expected}")]
    EnvValue {
        /// The variable.
        var: &'static str,
        /// Its value, as read (or as defaulted, said so).
        value: String,
        /// What it should have been.
        expected: String,
    },
    /// An option has a value the rendezvous or the watchdog cannot work with.
    #[error("option {field} = {value} is invalid: expected {expected}")]
    Options {
        /// The option.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// Two ranks passed buffers of different lengths to the same collective.
    #[error("{op}: rank {rank} passed {len} elements but rank {other_rank} passed {other_len}; every rank must pass a buffer of the same length")]
    LengthMismatch {
        /// The collective.
        op: &'static str,
        /// One rank.
        rank: usize,
        /// Its buffer length.
        len: usize,
        /// A rank that disagrees.
        other_rank: usize,
        /// That rank's buffer length.
        other_len: usize,
    },
    /// Two ranks entered different collectives at the same point of their sequence.
    #[error("collective mismatch: rank {rank} called {op} while rank {other_rank} called {other_op}; every rank must call the same collectives in the same order")]
    OpMismatch {
        /// One rank.
        rank: usize,
        /// The collective it called.
        op: &'static str,
        /// A rank that disagrees.
        other_rank: usize,
        /// The collective that rank called.
        other_op: &'static str,
    },
    /// Two ranks named different roots for the same broadcast.
    #[error("broadcast: rank {rank} named root {root} but rank {other_rank} named root {other_root}; every rank must name the same root")]
    RootMismatch {
        /// One rank.
        rank: usize,
        /// The root it named.
        root: usize,
        /// A rank that disagrees.
        other_rank: usize,
        /// The root that rank named.
        other_root: usize,
    },
    /// A broadcast named a root outside the world.
    #[error("{op}: root {root} is out of range: expected a rank in 0..{world_size}")]
    RootOutOfRange {
        /// The collective.
        op: &'static str,
        /// The root named.
        root: usize,
        /// Ranks in the world.
        world_size: usize,
    },
    /// A rank left the world (its handle was dropped) while the others needed it for a collective.
    #[error("{op} on rank {rank}: rank {gone} left the world (its handle was dropped, its thread ended or panicked)")]
    RankGone {
        /// The collective.
        op: &'static str,
        /// The rank reporting.
        rank: usize,
        /// The rank that left.
        gone: usize,
    },
    /// Rank 0 could not listen on the rendezvous address.
    #[error("rendezvous: rank 0 could not listen on {addr} (tried for {elapsed:.1?}): {source}")]
    Bind {
        /// The address (`MASTER_ADDR:MASTER_PORT`, or the wildcard address bound for it).
        addr: String,
        /// How long binding was retried.
        elapsed: Duration,
        /// The last error.
        source: io::Error,
    },
    /// A worker could not reach rank 0 before `connect_timeout`.
    #[error("rendezvous: could not reach rank 0 at {addr} within {elapsed:.1?} (connect_timeout): {source}")]
    Connect {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// How long connecting was retried.
        elapsed: Duration,
        /// The last error.
        source: io::Error,
    },
    /// Not every worker joined rank 0 before `connect_timeout`.
    #[error("rendezvous: only {joined} of {expected} workers joined rank 0 at {addr} within {elapsed:.1?} (connect_timeout); missing ranks {missing:?}")]
    JoinTimeout {
        /// The address rank 0 listened on.
        addr: String,
        /// Workers that joined.
        joined: usize,
        /// Workers expected (`world_size - 1`).
        expected: usize,
        /// How long rank 0 waited.
        elapsed: Duration,
        /// Ranks that never joined.
        missing: Vec<usize>,
    },
    /// Rank 0 turned a worker away (seen on rank 0).
    #[error("rendezvous: rank 0 rejected {peer}: {mismatch}")]
    Handshake {
        /// The worker: its claimed rank and address.
        peer: String,
        /// What did not match.
        mismatch: HandshakeMismatch,
    },
    /// Rank 0 turned this process away (seen on the worker).
    #[error("rendezvous: rank 0 at {addr} rejected this process: {mismatch}")]
    Rejected {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// What did not match.
        mismatch: HandshakeMismatch,
    },
    /// Rank 0 gave up the rendezvous because of another peer (seen on the workers that had joined).
    #[error("rendezvous: rank 0 at {addr} aborted the rendezvous: {reason}")]
    Aborted {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// Rank 0's own error.
        reason: String,
    },
    /// A peer sent bytes that are not a frame of this protocol.
    #[error("rendezvous: malformed frame from {peer}: {detail}")]
    Frame {
        /// The peer: rank (when known) and address.
        peer: String,
        /// What is wrong with the bytes.
        detail: String,
    },
    /// Reading from or writing to a peer failed (closed, reset, timed out).
    #[error("rendezvous: connection to {peer} failed while {doing}: {source}")]
    PeerIo {
        /// The peer: rank (when known) and address.
        peer: String,
        /// What this process was doing.
        doing: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// Rank 0's payload does not fit one frame.
    #[error("rendezvous: rank 0's payload has {len} bytes, more than the {max} a frame carries")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The frame limit.
        max: usize,
    },
    /// A launch spec field is out of range.
    #[error("launch: {field} = {value} is invalid: expected {expected}")]
    LaunchSpec {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it should have been.
        expected: String,
    },
    /// A child process could not be started.
    #[error("launch: could not start rank {rank} ({program}): {source}")]
    Spawn {
        /// The rank the child was to be.
        rank: usize,
        /// The program.
        program: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The status of a child process could not be read.
    #[error("launch: could not wait for rank {rank}: {source}")]
    Wait {
        /// The child's rank.
        rank: usize,
        /// The underlying error.
        source: io::Error,
    },
    /// A child process exited unsuccessfully; the others were stopped.
    #[error("launch: rank {rank} (local rank {local_rank}) failed with {status}; the other ranks of this node were stopped")]
    ChildFailed {
        /// The child's global rank.
        rank: usize,
        /// The child's rank on this node.
        local_rank: usize,
        /// How it ended.
        status: ExitStatus,
    },
    /// No free local port could be found.
    #[error("could not bind 127.0.0.1:0 to find a free port: {source}")]
    FreePort {
        /// The underlying error.
        source: io::Error,
    },
    /// The `libnccl.so` symlink (or its directory) could not be made.
    #[error("could not link {link} -> {target} so that `libnccl.so` resolves: {source}")]
    NcclLink {
        /// The symlink path.
        link: PathBuf,
        /// What it should point to.
        target: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// NCCL or the CUDA driver failed (feature `nccl`): the call and NCCL's error.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
