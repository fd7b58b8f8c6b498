//! Assembling a group: the leader listens, workers connect and introduce themselves, the leader
//! answers with the group layout (and, for NCCL, the unique id). The connections then stay open
//! as the control channel (step plans) and, for the TCP backend, carry the collectives.
//!
//! Where the leader is and which rank this process has is the caller's business (a
//! [`GroupSpec`]); `dsvl-decoder` fills it from its flags, which fall back to the Kubernetes
//! LeaderWorkerSet environment (`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`),
//! so there is one code path for both.

use std::io::{BufReader, BufWriter, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::frame::Message;
use crate::CommError;

/// Version of the control protocol; ranks with different versions refuse to form a group.
pub const PROTOCOL_VERSION: u32 = 1;

/// Who this process is in its group and how to reach the leader.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Ranks in the group (the tensor-parallel degree).
    pub world_size: usize,
    /// This process's rank; 0 leads.
    pub rank: usize,
    /// `host:port` the leader listens on for rendezvous.
    pub leader_addr: String,
    /// How long the leader waits for all workers, and workers for the leader.
    pub rendezvous_timeout: Duration,
    /// Deadline for any single collective or reply once the group runs.
    pub collective_timeout: Duration,
    /// Must be identical on every rank (model fingerprint, dtype, ...); a mismatch is refused.
    pub tag: String,
}

/// One open connection to a peer rank.
pub struct Link {
    peer: usize,
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<BufWriter<TcpStream>>,
}

impl Link {
    fn new(stream: TcpStream, peer: usize) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
        let writer = BufWriter::with_capacity(1 << 20, stream);
        Ok(Self { peer, reader: Mutex::new(reader), writer: Mutex::new(writer) })
    }

    /// The rank at the other end.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// Sends a message.
    pub fn send(&self, msg: &Message, op: &'static str) -> Result<(), CommError> {
        let mut w = self.writer.lock().expect("link writer poisoned. This is a bug.");
        msg.write_to(&mut *w).map_err(|e| self.io_error(e, op, None))
    }

    /// Receives a message, waiting at most `timeout` (forever when `None`).
    pub fn recv(&self, op: &'static str, timeout: Option<Duration>) -> Result<Message, CommError> {
        let mut r = self.reader.lock().expect("link reader poisoned. This is a bug.");
        r.get_ref().set_read_timeout(timeout).map_err(|e| self.io_error(e, op, timeout))?;
        let msg = Message::read_from(&mut *r).map_err(|e| self.io_error(e, op, timeout))?;
        if msg.kind() == "error" {
            let reason = msg.header.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown");
            return Err(CommError::Protocol(format!("rank {} reported: {reason}", self.peer)));
        }
        Ok(msg)
    }

    /// Receives a message whose `kind` must be `kind`.
    pub fn expect(
        &self,
        kind: &str,
        op: &'static str,
        timeout: Option<Duration>,
    ) -> Result<Message, CommError> {
        let msg = self.recv(op, timeout)?;
        if msg.kind() != kind {
            return Err(CommError::Protocol(format!(
                "rank {} sent `{}` during {op}, expected `{kind}`",
                self.peer,
                msg.kind()
            )));
        }
        Ok(msg)
    }

    fn io_error(
        &self,
        e: std::io::Error,
        op: &'static str,
        timeout: Option<Duration>,
    ) -> CommError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout {
                rank: self.peer,
                seconds: timeout.map_or(0.0, |t| t.as_secs_f64()),
                op,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted => CommError::Disconnected { rank: self.peer, op },
            _ => CommError::Io { rank: self.peer, op, source: e },
        }
    }

    /// Whether the peer has closed the connection or sent something unsolicited (a worker only
    /// speaks when asked, except to report a fatal error). Non-blocking.
    pub fn peer_gone(&self) -> bool {
        let r = self.reader.lock().expect("link reader poisoned. This is a bug.");
        if !r.buffer().is_empty() {
            return true;
        }
        let s = r.get_ref();
        if s.set_nonblocking(true).is_err() {
            return true;
        }
        let mut b = [0u8; 1];
        let gone = !matches!(s.peek(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
        let _ = s.set_nonblocking(false);
        gone
    }

    /// Closes both directions; the peer sees EOF.
    pub fn shutdown(&self) {
        let r = self.reader.lock().expect("link reader poisoned. This is a bug.");
        let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// The links of this rank: the leader holds one per worker, a worker one to the leader.
pub enum LinkSet {
    /// A group of one.
    Single,
    /// Rank 0: `workers[i]` is rank `i + 1`.
    Leader {
        /// Links in rank order.
        workers: Vec<Link>,
    },
    /// Rank > 0.
    Worker {
        /// This rank.
        rank: usize,
        /// Ranks in the group.
        world_size: usize,
        /// The link to rank 0.
        leader: Link,
    },
}

impl LinkSet {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        match self {
            Self::Single | Self::Leader { .. } => 0,
            Self::Worker { rank, .. } => *rank,
        }
    }

    /// Group size.
    pub fn world_size(&self) -> usize {
        match self {
            Self::Single => 1,
            Self::Leader { workers } => workers.len() + 1,
            Self::Worker { world_size, .. } => *world_size,
        }
    }

    /// Leader: the first worker rank whose link is gone, if any.
    pub fn dead_peer(&self) -> Option<usize> {
        match self {
            Self::Leader { workers } => workers.iter().find(|w| w.peer_gone()).map(Link::peer),
            _ => None,
        }
    }

    /// Closes every link (workers see EOF and exit).
    pub fn shutdown(&self) {
        match self {
            Self::Single => {}
            Self::Leader { workers } => workers.iter().for_each(Link::shutdown),
            Self::Worker { leader, .. } => leader.shutdown(),
        }
    }
}

/// Leader side: waits on `listener` until ranks `1..world_size` have joined, validates each
/// hello against `spec`, and answers with a welcome carrying `extra` (e.g. the NCCL id).
///
/// # Errors
/// [`CommError::Rendezvous`] on timeout, duplicate ranks, or a mismatched version, world size
/// or tag (the offending worker is told why before it is dropped).
pub fn lead(
    listener: &TcpListener,
    spec: &GroupSpec,
    extra: serde_json::Value,
) -> Result<LinkSet, CommError> {
    if spec.world_size == 1 {
        return Ok(LinkSet::Single);
    }
    let deadline = Instant::now() + spec.rendezvous_timeout;
    listener.set_nonblocking(true).map_err(|e| CommError::Rendezvous(format!("listener: {e}")))?;
    let mut joined: Vec<Option<Link>> = (1..spec.world_size).map(|_| None).collect();
    while joined.iter().any(Option::is_none) {
        let missing: Vec<usize> =
            joined.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(i, _)| i + 1).collect();
        let now = Instant::now();
        if now >= deadline {
            return Err(CommError::Rendezvous(format!(
                "ranks {missing:?} did not join within {:.0}s",
                spec.rendezvous_timeout.as_secs_f64()
            )));
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(CommError::Rendezvous(format!("accept: {e}"))),
        };
        stream.set_nonblocking(false).map_err(|e| CommError::Rendezvous(e.to_string()))?;
        let link =
            Link::new(stream, usize::MAX).map_err(|e| CommError::Rendezvous(e.to_string()))?;
        let hello = match link.expect("hello", "rendezvous", Some(deadline - now)) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "dropping a connection that did not say hello");
                continue;
            }
        };
        let h = &hello.header;
        let rank = h["rank"].as_u64().unwrap_or(0) as usize;
        let problem = if h["version"].as_u64() != Some(u64::from(PROTOCOL_VERSION)) {
            Some(format!("protocol version {} (leader speaks {PROTOCOL_VERSION})", h["version"]))
        } else if h["world_size"].as_u64() != Some(spec.world_size as u64) {
            Some(format!("world size {} (leader has {})", h["world_size"], spec.world_size))
        } else if h["tag"].as_str() != Some(spec.tag.as_str()) {
            Some(format!(
                "group tag {} (leader has {:?}): different model or settings",
                h["tag"], spec.tag
            ))
        } else if rank == 0 || rank >= spec.world_size {
            Some(format!("rank {rank} outside 1..{}", spec.world_size))
        } else if joined[rank - 1].is_some() {
            Some(format!("rank {rank} joined twice"))
        } else {
            None
        };
        if let Some(reason) = problem {
            let _ =
                link.send(&Message::new(json!({"kind": "error", "reason": reason})), "rendezvous");
            return Err(CommError::Rendezvous(reason));
        }
        let link = Link { peer: rank, ..link };
        link.send(
            &Message::new(
                json!({"kind": "welcome", "world_size": spec.world_size, "extra": extra}),
            ),
            "rendezvous",
        )?;
        tracing::info!(rank, "rank joined the group");
        joined[rank - 1] = Some(link);
    }
    Ok(LinkSet::Leader { workers: joined.into_iter().map(|l| l.expect("all joined")).collect() })
}

/// Worker side: connects to the leader (retrying until the rendezvous timeout, since the
/// leader may start later), says hello, and returns the link and the welcome's `extra`.
pub fn join(spec: &GroupSpec) -> Result<(LinkSet, serde_json::Value), CommError> {
    let deadline = Instant::now() + spec.rendezvous_timeout;
    let stream = loop {
        let addrs: Vec<_> = match spec.leader_addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(), // DNS may not be ready yet under Kubernetes
        };
        if let Some(s) =
            addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
        {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(CommError::Rendezvous(format!(
                "leader {} unreachable for {:.0}s",
                spec.leader_addr,
                spec.rendezvous_timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let link = Link::new(stream, 0).map_err(|e| CommError::Rendezvous(e.to_string()))?;
    let hello = json!({"kind": "hello", "version": PROTOCOL_VERSION, "rank": spec.rank, "world_size": spec.world_size, "tag": spec.tag});
    link.send(&Message::new(hello), "rendezvous")?;
    let welcome = link.expect(
        "welcome",
        "rendezvous",
        Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))),
    )?;
    let extra = welcome.header["extra"].clone();
    link.writer
        .lock()
        .expect("fresh link")
        .flush()
        .map_err(|e| CommError::Rendezvous(e.to_string()))?;
    Ok((LinkSet::Worker { rank: spec.rank, world_size: spec.world_size, leader: link }, extra))
}
