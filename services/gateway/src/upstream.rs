//! Upstream replicas of one tier: endpoints from flags, host names re-resolved periodically
//! (each address of a Kubernetes headless service is a replica), lazily connected channels,
//! health and load polled in the background, a circuit breaker per replica, and the two
//! routing policies: rendezvous hashing (vision, so an image keeps landing where it is cached)
//! and least outstanding work (decoder).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dsvl_cache::{BreakerConfig, CircuitBreaker};
use dsvl_proto::internal::decoder_client::DecoderClient;
use dsvl_proto::internal::LoadResponse;
use dsvl_tls::Reloading;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::prefix_route::PrefixRecord;

/// Which tier a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Vision encoders (health via grpc.health.v1).
    Vision,
    /// Decoder groups (health and load via `Load`).
    Decoder,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Self::Vision => "vision",
            Self::Decoder => "decoder",
        }
    }
}

/// One replica.
pub struct Replica {
    /// Resolved `ip:port`.
    pub addr: String,
    /// Lazily connected channel.
    pub channel: Channel,
    /// Fails fast after repeated errors.
    pub breaker: CircuitBreaker,
    /// Requests this gateway has in flight there.
    pub inflight: AtomicUsize,
    /// Last health verdict.
    pub healthy: AtomicBool,
    /// Last `Load` report (decoders).
    pub load: Mutex<Option<LoadResponse>>,
    /// The prompts' block hashes this gateway sent here (decoders, prefix-aware routing).
    pub prefix: Mutex<PrefixRecord>,
}

impl Replica {
    /// A replica at `addr`, resolved from `target`; over TLS the server's certificate is
    /// verified for `target`'s host.
    fn new(
        addr: String,
        target: &str,
        tls: Option<&Reloading<rustls::ClientConfig>>,
    ) -> Option<Self> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20));
        let channel = match tls {
            Some(tls) => match dsvl_tls::server_name(target) {
                Ok(name) => dsvl_tls::lazy_channel(endpoint, tls.clone(), name),
                Err(e) => {
                    tracing::warn!(%target, error = %e, "cannot verify this upstream over TLS");
                    return None;
                }
            },
            None => endpoint.connect_lazy(),
        };
        Some(Self {
            addr,
            channel,
            breaker: CircuitBreaker::new(BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(5),
            }),
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            load: Mutex::new(None),
            prefix: Mutex::new(PrefixRecord::default()),
        })
    }

    /// Whether requests may go here now.
    pub fn usable(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && self.breaker.allow_peek()
    }
}

/// Counts a request in flight while alive.
pub struct InflightGuard(Arc<Replica>);

impl InflightGuard {
    /// Marks a request to `r`.
    pub fn new(r: Arc<Replica>) -> Self {
        r.inflight.fetch_add(1, Ordering::SeqCst);
        Self(r)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The replicas of one tier.
pub struct Pool {
    tier: Tier,
    targets: Vec<String>,
    /// Mutual TLS to the replicas (`None`: plain text).
    tls: Option<Reloading<rustls::ClientConfig>>,
    replicas: RwLock<Vec<Arc<Replica>>>,
}

impl Pool {
    /// A pool over `targets` (`host:port`); call [`Pool::refresh`] to populate it.
    pub fn new(tier: Tier, targets: Vec<String>) -> Arc<Self> {
        Self::with_tls(tier, targets, None)
    }

    /// [`Self::new`], speaking TLS with `tls` when given.
    pub fn with_tls(
        tier: Tier,
        targets: Vec<String>,
        tls: Option<Reloading<rustls::ClientConfig>>,
    ) -> Arc<Self> {
        Arc::new(Self { tier, targets, tls, replicas: RwLock::new(Vec::new()) })
    }

    /// A pool over fixed resolved addresses, without DNS or health polling (benchmarks and
    /// tests of the routing policies). Needs a tokio runtime (channels connect lazily).
    pub fn from_addresses(tier: Tier, addrs: &[String]) -> Arc<Self> {
        let replicas =
            addrs.iter().filter_map(|a| Replica::new(a.clone(), a, None).map(Arc::new)).collect();
        Arc::new(Self { tier, targets: addrs.to_vec(), tls: None, replicas: RwLock::new(replicas) })
    }

    /// Whether any endpoint is configured.
    pub fn is_configured(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Current replicas.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("pool lock poisoned. This is a bug.").clone()
    }

    /// Re-resolves the targets, keeps known replicas, adds new addresses, drops vanished ones,
    /// then checks health (and load) of each.
    pub async fn refresh(&self) {
        let mut addrs = Vec::new();
        for t in &self.targets {
            match tokio::net::lookup_host(t.as_str()).await {
                Ok(found) => addrs.extend(found.map(|a| (a.to_string(), t.as_str()))),
                Err(e) => {
                    tracing::warn!(tier = self.tier.name(), target = %t, error = %e, "cannot resolve upstream")
                }
            }
        }
        addrs.sort();
        addrs.dedup_by(|a, b| a.0 == b.0);
        let current: HashMap<String, Arc<Replica>> =
            self.replicas().into_iter().map(|r| (r.addr.clone(), r)).collect();
        let next: Vec<Arc<Replica>> = addrs
            .into_iter()
            .filter_map(|(a, target)| {
                current
                    .get(&a)
                    .cloned()
                    .or_else(|| Replica::new(a, target, self.tls.as_ref()).map(Arc::new))
            })
            .collect();
        *self.replicas.write().expect("pool lock poisoned. This is a bug.") = next.clone();
        for r in next {
            let ok = match self.tier {
                Tier::Vision => {
                    let mut client = HealthClient::new(r.channel.clone());
                    let check = client.check(HealthCheckRequest {
                        service: "dsvl.internal.v1.VisionEncoder".into(),
                    });
                    matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Ok(resp)) if resp.get_ref().status == 1)
                }
                Tier::Decoder => {
                    let mut client = DecoderClient::new(r.channel.clone());
                    let load = client.load(dsvl_proto::internal::LoadRequest {});
                    match tokio::time::timeout(Duration::from_secs(2), load).await {
                        Ok(Ok(resp)) => {
                            let l = resp.into_inner();
                            let ready = l.ready;
                            *r.load.lock().expect("load lock poisoned. This is a bug.") = Some(l);
                            ready
                        }
                        _ => false,
                    }
                }
            };
            r.healthy.store(ok, Ordering::SeqCst);
        }
        metrics::gauge!("dsvl_gateway_healthy_upstreams", "tier" => self.tier.name())
            .set(self.replicas().iter().filter(|r| r.healthy.load(Ordering::SeqCst)).count() as f64);
    }

    /// Vision: replicas in rendezvous-hash order for `digest` (highest score first), usable
    /// ones first. A replica much busier than the rest is moved behind the next one (load
    /// fallback), so one hot image cannot pin a whole replica.
    pub fn by_rendezvous(&self, digest: &str) -> Vec<Arc<Replica>> {
        let mut rs = self.replicas();
        rs.sort_by_cached_key(|r| {
            let score = blake3::hash(format!("{digest}|{}", r.addr).as_bytes());
            (!r.usable(), std::cmp::Reverse(*score.as_bytes()))
        });
        if rs.len() > 1 {
            let avg = rs.iter().map(|r| r.inflight.load(Ordering::SeqCst)).sum::<usize>() as f64
                / rs.len() as f64;
            if rs[0].inflight.load(Ordering::SeqCst) as f64 > 2.0 * avg + 8.0 && rs[1].usable() {
                rs.swap(0, 1);
            }
        }
        rs
    }

    /// Decoder: a group's outstanding work, in sequences: this gateway's requests in flight
    /// there plus the group's last reported waiting and running sequences.
    pub fn work(&self, r: &Replica) -> usize {
        let l = (*r.load.lock().expect("load lock poisoned. This is a bug.")).unwrap_or_default();
        r.inflight.load(Ordering::SeqCst) + (l.waiting + l.running) as usize
    }

    /// Decoder: usable replicas ordered by outstanding work ([`Self::work`]), then KV usage.
    pub fn by_least_work(&self) -> Vec<Arc<Replica>> {
        let mut rs: Vec<_> = self.replicas();
        rs.sort_by_key(|r| {
            let l =
                (*r.load.lock().expect("load lock poisoned. This is a bug.")).unwrap_or_default();
            let kv = (1000 * l.kv_blocks_used).checked_div(l.kv_blocks_total).unwrap_or(0);
            (!r.usable(), self.work(r), kv)
        });
        rs
    }
}

/// Refreshes `pools` every `period` until the process ends.
pub fn spawn_refresher(pools: Vec<Arc<Pool>>, period: Duration) {
    tokio::spawn(async move {
        loop {
            for p in &pools {
                p.refresh().await;
            }
            tokio::time::sleep(period).await;
        }
    });
}

/// A retry budget (like gRPC retry throttling / Envoy retry budgets): retries may add at most
/// `ratio` of the request volume, plus a small burst, so retries never amplify an outage.
pub struct RetryBudget {
    tokens: Mutex<f64>,
    ratio: f64,
    max: f64,
}

impl RetryBudget {
    /// `ratio` retries per request, at most `max` saved up.
    pub fn new(ratio: f64, max: f64) -> Self {
        Self { tokens: Mutex::new(max), ratio, max }
    }

    /// A request was made: earn `ratio`.
    pub fn deposit(&self) {
        let mut t = self.tokens.lock().expect("budget lock poisoned. This is a bug.");
        *t = (*t + self.ratio).min(self.max);
    }

    /// Whether a retry may be spent.
    pub fn withdraw(&self) -> bool {
        let mut t = self.tokens.lock().expect("budget lock poisoned. This is a bug.");
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            metrics::counter!("dsvl_gateway_retries_denied_total").increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rendezvous_order_is_stable_and_spreads() {
        let pool = Pool::new(Tier::Vision, vec![]);
        *pool.replicas.write().unwrap() = (0..4)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 9000 + i);
                Arc::new(Replica::new(addr.clone(), &addr, None).unwrap())
            })
            .collect();
        let first = |d: &str| pool.by_rendezvous(d)[0].addr.clone();
        assert_eq!(first("abc"), first("abc"));
        let spread: std::collections::HashSet<String> =
            (0..64).map(|i| first(&format!("img{i}"))).collect();
        assert!(spread.len() >= 3, "64 digests landed on {} replicas", spread.len());
        // Removing a replica only moves the digests that lived there.
        let before: Vec<String> = (0..64).map(|i| first(&format!("img{i}"))).collect();
        let gone = pool.replicas()[0].addr.clone();
        pool.replicas.write().unwrap().retain(|r| r.addr != gone);
        for (i, b) in before.iter().enumerate() {
            if *b != gone {
                assert_eq!(&first(&format!("img{i}")), b);
            }
        }
    }

    #[test]
    fn retry_budget_caps_retries() {
        let b = RetryBudget::new(0.2, 2.0);
        assert!(b.withdraw() && b.withdraw());
        assert!(!b.withdraw());
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
