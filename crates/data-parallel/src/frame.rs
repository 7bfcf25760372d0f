//! The wire format of the rendezvous and watchdog connections: length-prefixed frames.
//!
//! A frame is a big-endian `u32` body length followed by the body, whose first byte says what
//! it is. Integers are big-endian `u64` (`u32` for the protocol version); byte strings are a
//! `u32` length and the bytes. Anything else is a malformed frame.

use std::io::{self, Read, Write};

use crate::failure::{Failure, FailureKind};
use crate::handshake::HandshakeMismatch;

/// The first bytes of a worker's hello: this protocol, not some other client.
pub(crate) const MAGIC: [u8; 8] = *b"PEFT-DP\0";
/// The largest frame body accepted (the payload is NCCL's 128-byte unique id).
pub(crate) const MAX_FRAME: usize = 1 << 20;

/// One message between rank 0 and a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Worker to rank 0, first: who it is.
    Hello {
        version: u32,
        world_size: usize,
        rank: usize,
    },
    /// Rank 0 to a worker: the rendezvous succeeded; rank 0's payload.
    Welcome { payload: Vec<u8> },
    /// Rank 0 to a worker it turns away.
    Reject(HandshakeMismatch),
    /// Rank 0 to the workers that had joined, when the rendezvous fails for another reason.
    Aborted { reason: String },
    /// Either way, every `heartbeat`: the sender is alive.
    Heartbeat,
    /// Either way: the sender shuts down cleanly; its closing connection is no failure.
    Goodbye,
    /// Rank 0 to the workers: a rank failed.
    Abort(Failure),
}

impl Frame {
    /// What the frame is, for error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Reject(_) => "reject",
            Frame::Aborted { .. } => "aborted",
            Frame::Heartbeat => "heartbeat",
            Frame::Goodbye => "goodbye",
            Frame::Abort(_) => "abort",
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        match self {
            Frame::Hello {
                version,
                world_size,
                rank,
            } => {
                b.push(1);
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&version.to_be_bytes());
                put_u64(&mut b, *world_size);
                put_u64(&mut b, *rank);
            }
            Frame::Welcome { payload } => {
                b.push(2);
                put_bytes(&mut b, payload);
            }
            Frame::Reject(m) => {
                b.push(3);
                match *m {
                    HandshakeMismatch::Version { expected, got } => {
                        b.push(1);
                        put_u64(&mut b, expected as usize);
                        put_u64(&mut b, got as usize);
                    }
                    HandshakeMismatch::WorldSize { expected, got } => {
                        b.push(2);
                        put_u64(&mut b, expected);
                        put_u64(&mut b, got);
                    }
                    HandshakeMismatch::DuplicateRank { rank } => {
                        b.push(3);
                        put_u64(&mut b, rank);
                    }
                    HandshakeMismatch::RankOutOfRange { rank, world_size } => {
                        b.push(4);
                        put_u64(&mut b, rank);
                        put_u64(&mut b, world_size);
                    }
                }
            }
            Frame::Aborted { reason } => {
                b.push(4);
                put_bytes(&mut b, reason.as_bytes());
            }
            Frame::Heartbeat => b.push(5),
            Frame::Goodbye => b.push(6),
            Frame::Abort(f) => {
                b.push(7);
                put_u64(&mut b, f.rank);
                put_u64(&mut b, f.seen_by);
                match &f.kind {
                    FailureKind::Exited => b.push(1),
                    FailureKind::Silent { secs } => {
                        b.push(2);
                        b.extend_from_slice(&secs.to_be_bytes());
                    }
                    FailureKind::Garbled { detail } => {
                        b.push(3);
                        put_bytes(&mut b, detail.as_bytes());
                    }
                }
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn decode(body: &[u8]) -> Result<Frame, String> {
        let mut c = Cursor { bytes: body };
        let frame = match c.u8("the frame tag")? {
            1 => {
                let magic = c.take(MAGIC.len(), "the magic")?;
                if magic != MAGIC {
                    return Err(format!(
                        "the hello starts with {magic:?}, expected {MAGIC:?}: not a data-parallel rendezvous peer"
                    ));
                }
                let version = u32::from_be_bytes(c.array("the protocol version")?);
                Frame::Hello {
                    version,
                    world_size: c.usize("the world size")?,
                    rank: c.usize("the rank")?,
                }
            }
            2 => Frame::Welcome {
                payload: c.bytes("the payload")?.to_vec(),
            },
            3 => Frame::Reject(match c.u8("the mismatch tag")? {
                1 => HandshakeMismatch::Version {
                    expected: c.u32_in_u64("the expected version")?,
                    got: c.u32_in_u64("the worker's version")?,
                },
                2 => HandshakeMismatch::WorldSize {
                    expected: c.usize("the expected world size")?,
                    got: c.usize("the worker's world size")?,
                },
                3 => HandshakeMismatch::DuplicateRank {
                    rank: c.usize("the rank")?,
                },
                4 => HandshakeMismatch::RankOutOfRange {
                    rank: c.usize("the rank")?,
                    world_size: c.usize("the world size")?,
                },
                t => return Err(format!("unknown mismatch tag {t}, expected 1..=4")),
            }),
            4 => Frame::Aborted {
                reason: c.string("the reason")?,
            },
            5 => Frame::Heartbeat,
            6 => Frame::Goodbye,
            7 => {
                let rank = c.usize("the failed rank")?;
                let seen_by = c.usize("the watching rank")?;
                let kind = match c.u8("the failure tag")? {
                    1 => FailureKind::Exited,
                    2 => FailureKind::Silent {
                        secs: u64::from_be_bytes(c.array("the seconds")?),
                    },
                    3 => FailureKind::Garbled {
                        detail: c.string("the detail")?,
                    },
                    t => return Err(format!("unknown failure tag {t}, expected 1..=3")),
                };
                Frame::Abort(Failure {
                    rank,
                    kind,
                    seen_by,
                })
            }
            t => return Err(format!("unknown frame tag {t}, expected 1..=7")),
        };
        if !c.bytes.is_empty() {
            return Err(format!(
                "{} trailing bytes after a {} frame",
                c.bytes.len(),
                frame.name()
            ));
        }
        Ok(frame)
    }
}

fn put_u64(b: &mut Vec<u8>, v: usize) {
    b.extend_from_slice(&(v as u64).to_be_bytes());
}

fn put_bytes(b: &mut Vec<u8>, bytes: &[u8]) {
    // Callers keep every string and payload far below MAX_FRAME, so the length fits a u32.
    b.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    b.extend_from_slice(bytes);
}

/// Reads a frame body field by field, naming the field that is cut short.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "the frame ends inside {what} ({} of {n} bytes)",
                self.bytes.len()
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn usize(&mut self, what: &str) -> Result<usize, String> {
        let v = u64::from_be_bytes(self.array(what)?);
        usize::try_from(v).map_err(|_| format!("{what} {v} does not fit this machine's usize"))
    }

    fn u32_in_u64(&mut self, what: &str) -> Result<u32, String> {
        let v = u64::from_be_bytes(self.array(what)?);
        u32::try_from(v).map_err(|_| format!("{what} {v} is not a u32"))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = u32::from_be_bytes(self.array(what)?) as usize;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.bytes(what)?).into_owned())
    }
}

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection (before or inside a frame).
    Closed,
    /// Reading failed (reset, timed out, ...).
    Io(io::Error),
    /// The bytes are not a frame.
    Malformed(String),
}

impl ReadError {
    /// Whether the read timed out (no byte within the socket's read timeout).
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, ReadError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Reads one frame.
pub(crate) fn read_frame(mut r: impl Read) -> Result<Frame, ReadError> {
    let mut len = [0u8; 4];
    read_all(&mut r, &mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ReadError::Malformed(format!(
            "a frame of {len} bytes, expected 1..={MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    read_all(&mut r, &mut body)?;
    Frame::decode(&body).map_err(ReadError::Malformed)
}

fn read_all(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ReadError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::Closed,
        _ => ReadError::Io(e),
    })
}

/// Writes one frame with a single `write_all`.
pub(crate) fn write_frame(mut w: impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::PROTOCOL_VERSION;

    fn round_trip(frame: Frame) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &frame).unwrap();
        assert_eq!(read_frame(&wire[..]).unwrap(), frame);
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Hello {
            version: PROTOCOL_VERSION,
            world_size: 8,
            rank: 7,
        });
        round_trip(Frame::Welcome {
            payload: (0..128).collect(),
        });
        round_trip(Frame::Reject(HandshakeMismatch::Version {
            expected: 1,
            got: 9,
        }));
        round_trip(Frame::Reject(HandshakeMismatch::WorldSize {
            expected: 3,
            got: 2,
        }));
        round_trip(Frame::Reject(HandshakeMismatch::DuplicateRank { rank: 1 }));
        round_trip(Frame::Reject(HandshakeMismatch::RankOutOfRange {
            rank: 5,
            world_size: 3,
        }));
        round_trip(Frame::Aborted {
            reason: "rank 2 is late".into(),
        });
        round_trip(Frame::Heartbeat);
        round_trip(Frame::Goodbye);
        for kind in [
            FailureKind::Exited,
            FailureKind::Silent { secs: 120 },
            FailureKind::Garbled {
                detail: "junk".into(),
            },
        ] {
            round_trip(Frame::Abort(Failure {
                rank: 3,
                kind,
                seen_by: 0,
            }));
        }
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 0],
            &[0, 0, 0, 1, 99],
            &[0, 0, 0, 2, 5, 0],
            &[
                0, 0, 0, 9, 1, b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'1',
            ],
            &[0, 0, 0, 5, 2, 0, 0, 0, 200],
            &[0, 0, 0, 2, 7, 0],
        ];
        for bytes in cases {
            match read_frame(*bytes) {
                Err(ReadError::Malformed(detail)) => assert!(!detail.is_empty()),
                other => panic!("{bytes:?}: expected a malformed frame, got {other:?}"),
            }
        }
        assert!(matches!(read_frame(&[][..]), Err(ReadError::Closed)));
        assert!(matches!(
            read_frame(&[0, 0, 0, 9, 5][..]),
            Err(ReadError::Closed)
        ));
    }
}
