//! Turns a dead or hung peer process into a prompt, named failure instead of a collective that
//! waits forever.
//!
//! The watchdog keeps the rendezvous connections: rank 0 watches every worker, each worker
//! watches rank 0. A thread sends a heartbeat to every peer each `heartbeat`; one thread per
//! peer reads. A connection that closes without a goodbye is a rank that exited; a peer that
//! sends nothing for `peer_timeout` is silent. Rank 0 forwards each failure to the workers, so
//! every rank learns which rank failed. Heartbeats come from their own thread: they show that
//! the process and the network are alive, not that training progresses.

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::failure::{Failure, FailureKind};
use crate::frame::{read_frame, write_frame, Frame, ReadError};
use crate::rendezvous::{Link, Rendezvous};

/// How long [`Watchdog::shutdown`] waits for peers to acknowledge its goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The failure callback.
type OnFailure = Box<dyn Fn(&Failure) + Send + Sync>;

/// Watches the other ranks over the rendezvous connections; see the module docs.
///
/// End it with [`Watchdog::shutdown`]: dropping it closes the connections without a goodbye,
/// which the peers report as this rank having exited (that is how a crash looks to them).
pub struct Watchdog {
    inner: Arc<Inner>,
    heartbeat: Option<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
}

struct Peer {
    link: Link,
    /// Serialises the frames written to `link.stream` (heartbeats, goodbyes, aborts).
    write: Mutex<()>,
    /// The peer said goodbye: its closing connection is no failure.
    done: AtomicBool,
}

impl Peer {
    fn send(&self, frame: &Frame) -> std::io::Result<()> {
        let _guard = lock(&self.write);
        write_frame(&self.link.stream, frame)
    }
}

struct Inner {
    rank: usize,
    peers: Vec<Peer>,
    heartbeat: Duration,
    peer_timeout: Duration,
    failure: Mutex<Option<Failure>>,
    on_failure: OnFailure,
    /// Set by shutdown or drop: failures seen from now on are this rank's own doing.
    stopping: AtomicBool,
    stop: Mutex<bool>,
    stop_changed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Rendezvous {
    /// Starts watching the peers; `on_failure` runs once, on a watchdog thread, for the first
    /// failure this rank learns of (its own observation, or rank 0's forwarded one).
    ///
    /// On rank 0 the failure is forwarded to the workers before `on_failure` runs, so an
    /// `on_failure` that exits the process still lets every rank know which rank failed.
    /// `on_failure` must not call [`Watchdog::shutdown`] (it runs on a thread shutdown joins).
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn into_watchdog(self, on_failure: impl Fn(&Failure) + Send + Sync + 'static) -> Watchdog {
        let inner = Arc::new(Inner {
            rank: self.world.rank,
            peers: self
                .links
                .into_iter()
                .map(|link| Peer {
                    link,
                    write: Mutex::new(()),
                    done: AtomicBool::new(false),
                })
                .collect(),
            heartbeat: self.opts.heartbeat,
            peer_timeout: self.opts.peer_timeout,
            failure: Mutex::new(None),
            on_failure: Box::new(on_failure),
            stopping: AtomicBool::new(false),
            stop: Mutex::new(false),
            stop_changed: Condvar::new(),
        });
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name)
                .spawn(f)
                .expect("the OS could not start a watchdog thread")
        };
        let heartbeat = (!inner.peers.is_empty()).then(|| {
            let inner = Arc::clone(&inner);
            spawn(
                format!("dp-heartbeat-{}", inner.rank),
                Box::new(move || beat(&inner)),
            )
        });
        let readers = (0..inner.peers.len())
            .map(|i| {
                let inner2 = Arc::clone(&inner);
                let name = format!("dp-watch-{}-{}", inner.rank, inner.peers[i].link.rank);
                spawn(name, Box::new(move || watch(&inner2, i)))
            })
            .collect();
        Watchdog {
            inner,
            heartbeat,
            readers,
        }
    }
}

/// The heartbeat thread: a heartbeat to every peer now and every `heartbeat` until stopped.
fn beat(inner: &Inner) {
    loop {
        for peer in inner
            .peers
            .iter()
            .filter(|p| !p.done.load(Ordering::SeqCst))
        {
            // A failed write is the reader's to report (the connection closed or the peer hangs).
            let _ = peer.send(&Frame::Heartbeat);
        }
        let stop = lock(&inner.stop);
        let (stop, _) = inner
            .stop_changed
            .wait_timeout_while(stop, inner.heartbeat, |stop| !*stop)
            .unwrap_or_else(PoisonError::into_inner);
        if *stop {
            return;
        }
    }
}

/// The reader of peer `i`: heartbeats, goodbye, rank 0's aborts; a failure on close or silence.
fn watch(inner: &Inner, i: usize) {
    let peer = &inner.peers[i];
    let quiet = || inner.stopping.load(Ordering::SeqCst) || peer.done.load(Ordering::SeqCst);
    loop {
        let kind = match read_frame(&peer.link.stream) {
            Ok(Frame::Heartbeat) => continue,
            Ok(Frame::Goodbye) => {
                peer.done.store(true, Ordering::SeqCst);
                // Acknowledge: the peer waits for our side to close so that neither side closes
                // with unread data (which resets the connection).
                let _guard = lock(&peer.write);
                let _ = peer.link.stream.shutdown(Shutdown::Write);
                continue;
            }
            Ok(Frame::Abort(failure)) if inner.rank != 0 && peer.link.rank == 0 => {
                inner.fail(failure);
                continue;
            }
            Ok(other) => FailureKind::Garbled {
                detail: format!("an unexpected {} frame", other.name()),
            },
            Err(e) if e.is_timeout() => FailureKind::Silent {
                secs: inner.peer_timeout.as_secs()
                    + u64::from(inner.peer_timeout.subsec_nanos() > 0),
            },
            Err(ReadError::Malformed(detail)) => FailureKind::Garbled { detail },
            Err(ReadError::Closed | ReadError::Io(_)) => FailureKind::Exited,
        };
        if !quiet() {
            inner.fail(Failure {
                rank: peer.link.rank,
                kind,
                seen_by: inner.rank,
            });
        }
        return;
    }
}

impl Inner {
    /// Records the first failure; rank 0 forwards it to the workers; then `on_failure` runs.
    fn fail(&self, failure: Failure) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut slot = lock(&self.failure);
            if slot.is_some() {
                return;
            }
            *slot = Some(failure.clone());
        }
        if self.rank == 0 {
            let abort = Frame::Abort(failure.clone());
            let live = |p: &&Peer| !p.done.load(Ordering::SeqCst);
            for peer in self
                .peers
                .iter()
                .filter(live)
                .filter(|p| p.link.rank != failure.rank)
            {
                let _ = peer.send(&abort);
            }
            // A silent rank may still be alive (stopped, partitioned): tell it too, last, since
            // a write to it may block for the write timeout.
            if failure.kind != FailureKind::Exited {
                for peer in self
                    .peers
                    .iter()
                    .filter(live)
                    .filter(|p| p.link.rank == failure.rank)
                {
                    let _ = peer.send(&abort);
                }
            }
        }
        (self.on_failure)(&failure);
    }
}

impl Watchdog {
    /// The first failure this rank learned of, if any.
    pub fn failure(&self) -> Option<Failure> {
        lock(&self.inner.failure).clone()
    }

    /// Ends watching cleanly: says goodbye to every peer (so they do not report this rank's
    /// exit as a failure), waits briefly for them to acknowledge, and closes the connections.
    pub fn shutdown(mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.stop_heartbeat();
        for peer in &self.inner.peers {
            let _guard = lock(&peer.write);
            if !peer.done.load(Ordering::SeqCst) {
                let _ = write_frame(&peer.link.stream, &Frame::Goodbye);
            }
            let _ = peer.link.stream.shutdown(Shutdown::Write);
        }
        // Readers end when the peers close their side in answer to the goodbye.
        let deadline = Instant::now() + SHUTDOWN_GRACE.min(self.inner.peer_timeout);
        while Instant::now() < deadline && !self.readers.iter().all(JoinHandle::is_finished) {
            thread::sleep(Duration::from_millis(5));
        }
        self.close();
    }

    fn stop_heartbeat(&mut self) {
        *lock(&self.inner.stop) = true;
        self.inner.stop_changed.notify_all();
        if let Some(handle) = self.heartbeat.take() {
            join(handle);
        }
    }

    /// Closes every connection (waking the readers) and joins the readers.
    fn close(&mut self) {
        for peer in &self.inner.peers {
            let _ = peer.link.stream.shutdown(Shutdown::Both);
        }
        for handle in self.readers.drain(..) {
            join(handle);
        }
    }
}

/// Joins `handle` unless it is the calling thread (an `on_failure` that drops the watchdog).
fn join(handle: JoinHandle<()>) {
    if handle.thread().id() != thread::current().id() {
        // A panic in a watchdog thread can only come from `on_failure`; it already printed.
        let _ = handle.join();
    }
}

impl Drop for Watchdog {
    /// Stops the threads and closes the connections without a goodbye (peers see an exit).
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.stop_heartbeat();
        self.close();
    }
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("rank", &self.inner.rank)
            .field(
                "peers",
                &self
                    .inner
                    .peers
                    .iter()
                    .map(|p| p.link.rank)
                    .collect::<Vec<_>>(),
            )
            .field("failure", &self.failure())
            .finish()
    }
}
