//! Assembling a group: the leader listens, workers connect and introduce themselves, the leader
//! answers with the group layout (and, for NCCL, the unique id). The connections then stay open
//! as the control channel (step plans) and, for the TCP backend, carry the collectives.
//!
//! Where the leader is and which rank this process has is the caller's business (a
//! [`GroupSpec`]); `dsvl-decoder` fills it from its flags, which fall back to the Kubernetes
//! LeaderWorkerSet environment (`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`),
//! so there is one code path for both.
//!
//! With a [`GroupKey`] every joining connection must prove membership first ([`crate::auth`]);
//! until it has, its frames are held to [`FrameLimits::HANDSHAKE`], it gets a few seconds, and
//! it runs on its own thread, so a stranger that connects and stalls, floods, or talks nonsense
//! is dropped without delaying or aborting the group. Only members learn the welcome's
//! `extra` (the NCCL unique id).

use std::io::{BufReader, BufWriter, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::auth::{self, GroupKey};
use crate::frame::{FrameLimits, Message};
use crate::CommError;

/// Version of the control protocol; ranks with different versions refuse to form a group.
pub const PROTOCOL_VERSION: u32 = 2;

/// How long a connection may take to prove membership.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Unproven connections handled at once; more are closed at accept.
const MAX_PENDING_HANDSHAKES: usize = 64;

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
    /// The group's key; `None` runs the rendezvous unauthenticated (`--insecure`).
    pub key: Option<GroupKey>,
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
        self.recv_limited(op, timeout, FrameLimits::GROUP)
    }

    fn recv_limited(
        &self,
        op: &'static str,
        timeout: Option<Duration>,
        limits: FrameLimits,
    ) -> Result<Message, CommError> {
        let mut r = self.reader.lock().expect("link reader poisoned. This is a bug.");
        r.get_ref().set_read_timeout(timeout).map_err(|e| self.io_error(e, op, timeout))?;
        let msg =
            Message::read_limited(&mut *r, limits).map_err(|e| self.io_error(e, op, timeout))?;
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
        self.expect_limited(kind, op, timeout, FrameLimits::GROUP)
    }

    fn expect_limited(
        &self,
        kind: &str,
        op: &'static str,
        timeout: Option<Duration>,
        limits: FrameLimits,
    ) -> Result<Message, CommError> {
        let msg = self.recv_limited(op, timeout, limits)?;
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

/// Connections still handshaking, each with when it was accepted. A read timeout bounds each
/// read, not the whole handshake (a stranger could trickle a byte at a time), so the leader
/// shuts down any that run past [`HANDSHAKE_TIMEOUT`], and all of them when it returns.
#[derive(Default)]
struct Unproven(std::collections::HashMap<std::net::SocketAddr, (Instant, TcpStream)>);

impl Unproven {
    fn expire(&mut self) {
        for (accepted, s) in self.0.values() {
            if accepted.elapsed() > HANDSHAKE_TIMEOUT {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Unproven {
    fn drop(&mut self) {
        for (_, s) in self.0.values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A connection that said hello (and, with a key, proved membership).
struct Hello {
    link: Link,
    header: serde_json::Value,
    nonce_l: [u8; auth::NONCE_BYTES],
    nonce_w: Vec<u8>,
}

/// The fields of a hello that its proof covers.
fn hello_fields(h: &serde_json::Value) -> Vec<u8> {
    format!("{}|{}|{}|{}", h["version"], h["rank"], h["world_size"], h["tag"]).into_bytes()
}

/// Leader side of one connection: challenge, hello, proof. Runs on its own thread.
fn greet(stream: TcpStream, key: Option<&GroupKey>, timeout: Duration) -> Result<Hello, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _ = stream.set_write_timeout(Some(timeout));
    let link = Link::new(stream, usize::MAX).map_err(|e| e.to_string())?;
    let nonce_l = auth::nonce();
    let challenge = json!({"kind": "challenge", "version": PROTOCOL_VERSION, "nonce": auth::hex(&nonce_l), "authenticated": key.is_some()});
    link.send(&Message::new(challenge), "rendezvous").map_err(|e| e.to_string())?;
    let hello = link
        .expect_limited("hello", "rendezvous", Some(timeout), FrameLimits::HANDSHAKE)
        .map_err(|e| e.to_string())?;
    let h = hello.header;
    let nonce_w = h["nonce"].as_str().and_then(auth::unhex).unwrap_or_default();
    if let Some(key) = key {
        if nonce_w.len() != auth::NONCE_BYTES
            || !key.verify(h["proof"].as_str(), "hello", &[&nonce_l, &nonce_w, &hello_fields(&h)])
        {
            return Err("no valid proof of membership".into());
        }
    }
    Ok(Hello { link, header: h, nonce_l, nonce_w })
}

/// Leader side: waits on `listener` until ranks `1..world_size` have joined, validates each
/// hello against `spec`, and answers with a welcome carrying `extra` (e.g. the NCCL id),
/// sealed so that only members can read it.
///
/// Connections that do not prove membership are dropped and logged; the group does not notice.
///
/// # Errors
/// [`CommError::Rendezvous`] on timeout, duplicate ranks, or a member with a mismatched
/// version, world size or tag (it is told why before it is dropped).
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
    let (tx, rx) = mpsc::channel::<(std::net::SocketAddr, Result<Hello, String>)>();
    let mut pending = Unproven::default();
    let mut joined: Vec<Option<Link>> = (1..spec.world_size).map(|_| None).collect();
    while joined.iter().any(Option::is_none) {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = joined
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_none())
                .map(|(i, _)| i + 1)
                .collect();
            return Err(CommError::Rendezvous(format!(
                "ranks {missing:?} did not join within {:.0}s",
                spec.rendezvous_timeout.as_secs_f64()
            )));
        }
        pending.expire();
        match listener.accept() {
            Ok((_, peer)) if pending.0.len() >= MAX_PENDING_HANDSHAKES => {
                tracing::warn!(%peer, "rendezvous: too many unproven connections; closing this one");
            }
            Ok((stream, peer)) => {
                match stream.try_clone() {
                    Ok(watch) => pending.0.insert(peer, (Instant::now(), watch)),
                    Err(_) => continue,
                };
                let (tx, key) = (tx.clone(), spec.key.clone());
                let timeout = HANDSHAKE_TIMEOUT.min(deadline - now).max(Duration::from_millis(100));
                std::thread::spawn(move || {
                    let _ = tx.send((peer, greet(stream, key.as_ref(), timeout)));
                });
                continue;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(CommError::Rendezvous(format!("accept: {e}"))),
        }
        let (peer, hello) = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => r,
            Err(_) => continue,
        };
        pending.0.remove(&peer);
        let Hello { link, header: h, nonce_l, nonce_w } = match hello {
            Ok(h) => h,
            Err(reason) => {
                tracing::warn!(%peer, reason, "rendezvous: dropped a connection that did not join");
                continue;
            }
        };
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
        let _ = link.reader.lock().expect("fresh link").get_ref().set_write_timeout(None);
        let welcome = match &spec.key {
            None => json!({"kind": "welcome", "world_size": spec.world_size, "extra": extra}),
            Some(key) => {
                let plain =
                    serde_json::to_vec(&extra).map_err(|e| CommError::Rendezvous(e.to_string()))?;
                let sealed = key.xor_keystream(&nonce_l, &nonce_w, &plain);
                let fields = format!("{}|{rank}", spec.world_size).into_bytes();
                let proof = key.mac("welcome", &[&nonce_l, &nonce_w, &fields, &sealed]);
                json!({"kind": "welcome", "world_size": spec.world_size, "sealed_extra": auth::hex(&sealed), "proof": auth::hex(proof.as_bytes())})
            }
        };
        link.send(&Message::new(welcome), "rendezvous")?;
        tracing::info!(rank, %peer, authenticated = spec.key.is_some(), "rank joined the group");
        joined[rank - 1] = Some(link);
    }
    Ok(LinkSet::Leader { workers: joined.into_iter().map(|l| l.expect("all joined")).collect() })
}

/// Worker side: connects to the leader (retrying until the rendezvous timeout, since the
/// leader may start later), answers its challenge, checks the leader's proof, and returns the
/// link and the welcome's `extra`.
///
/// # Errors
/// [`CommError::Rendezvous`] when the leader is unreachable, refuses this rank, or (with a key)
/// cannot prove it holds the group's key.
pub fn join(spec: &GroupSpec) -> Result<(LinkSet, serde_json::Value), CommError> {
    let deadline = Instant::now() + spec.rendezvous_timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    // A leader busy with other connections may close ours before challenging it: try again.
    let (link, challenge) = loop {
        let stream = connect(spec, deadline)?;
        let link = Link::new(stream, 0).map_err(|e| CommError::Rendezvous(e.to_string()))?;
        match link.expect_limited("challenge", "rendezvous", Some(left()), FrameLimits::HANDSHAKE) {
            Ok(c) => break (link, c),
            Err(CommError::Disconnected { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    let nonce_l = challenge.header["nonce"].as_str().and_then(auth::unhex).unwrap_or_default();
    match (challenge.header["authenticated"].as_bool(), &spec.key) {
        (Some(true), None) => return Err(CommError::Rendezvous(format!("the leader at {} requires members to prove they hold the group key, and this rank has none (give every rank the same --cluster-secret-file)", spec.leader_addr))),
        (Some(false), Some(_)) => return Err(CommError::Rendezvous(format!("the leader at {} runs without a group key (--insecure) and cannot prove it is our leader; refusing to join", spec.leader_addr))),
        _ => {}
    }
    let nonce_w = auth::nonce();
    let mut hello = json!({"kind": "hello", "version": PROTOCOL_VERSION, "rank": spec.rank, "world_size": spec.world_size, "tag": spec.tag, "nonce": auth::hex(&nonce_w)});
    if let Some(key) = &spec.key {
        let proof = key.mac("hello", &[&nonce_l, &nonce_w, &hello_fields(&hello)]);
        hello["proof"] = auth::hex(proof.as_bytes()).into();
    }
    link.send(&Message::new(hello), "rendezvous")?;
    let welcome = link
        .expect_limited("welcome", "rendezvous", Some(left()), FrameLimits::WELCOME)
        .map_err(|e| match e {
            CommError::Disconnected { .. } if spec.key.is_some() => CommError::Rendezvous(format!(
                "the leader at {} dropped this rank after its proof of membership: the two do not hold the same group key (different cluster secrets), or it is not our leader",
                spec.leader_addr
            )),
            e => e,
        })?;
    let w = &welcome.header;
    let extra = match &spec.key {
        None => w["extra"].clone(),
        Some(key) => {
            let sealed = w["sealed_extra"].as_str().and_then(auth::unhex).unwrap_or_default();
            let fields = format!("{}|{}", spec.world_size, spec.rank).into_bytes();
            if !key.verify(w["proof"].as_str(), "welcome", &[&nonce_l, &nonce_w, &fields, &sealed])
            {
                return Err(CommError::Rendezvous(format!(
                    "the leader at {} did not prove it holds the group key (a different cluster secret, or not our leader)",
                    spec.leader_addr
                )));
            }
            serde_json::from_slice(&key.xor_keystream(&nonce_l, &nonce_w, &sealed))
                .map_err(|e| CommError::Rendezvous(format!("sealed welcome: {e}")))?
        }
    };
    link.writer
        .lock()
        .expect("fresh link")
        .flush()
        .map_err(|e| CommError::Rendezvous(e.to_string()))?;
    Ok((LinkSet::Worker { rank: spec.rank, world_size: spec.world_size, leader: link }, extra))
}

/// Connects to the leader, retrying until `deadline` (it may start later than this rank).
fn connect(spec: &GroupSpec, deadline: Instant) -> Result<TcpStream, CommError> {
    loop {
        let addrs: Vec<_> = match spec.leader_addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(), // DNS may not be ready yet under Kubernetes
        };
        if let Some(s) =
            addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
        {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(CommError::Rendezvous(format!(
                "leader {} unreachable for {:.0}s",
                spec.leader_addr,
                spec.rendezvous_timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
