//! API keys to tenants, per-tenant token buckets, and the tenant's cache salt.
//!
//! The salt keys every embedding-cache entry of the tenant; it is derived here from the tenant
//! id and never taken from the client, so one tenant cannot probe (by timing) or reuse another's
//! cached embeddings.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Tenant id (from the key table; `public` without keys).
    pub id: String,
    /// Embedding-cache salt of the tenant.
    pub salt: Vec<u8>,
}

impl Tenant {
    fn new(id: &str) -> Self {
        let salt = blake3::derive_key("dsvl 2026 tenant cache salt v1", id.as_bytes()).to_vec();
        Self { id: id.to_string(), salt }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No key or an unknown key while keys are configured.
    Unauthenticated,
    /// Over quota; retry after this many seconds.
    Quota {
        /// What ran out.
        what: &'static str,
        /// Seconds until enough tokens are back.
        retry_after: f64,
    },
}

/// Per-minute quotas of one tenant (0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: u32,
    /// Images per minute.
    pub ipm: u32,
    /// Tokens (prompt + requested output) per minute.
    pub tpm: u32,
}

impl Limits {
    /// Parses `--tenant-quotas`: `tenant:rpm=N:ipm=N:tpm=N` entries separated by commas; a
    /// limit left out keeps the default.
    ///
    /// # Errors
    /// A malformed entry.
    pub fn parse_overrides(
        spec: &str,
        defaults: Limits,
    ) -> Result<HashMap<String, Limits>, String> {
        let mut out = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let mut parts = entry.split(':');
            let tenant =
                parts.next().filter(|t| !t.is_empty()).ok_or("an entry without a tenant")?;
            let mut l = defaults;
            for p in parts {
                let (k, v) =
                    p.split_once('=').ok_or_else(|| format!("`{p}`: expected name=value"))?;
                let v: u32 = v.parse().map_err(|_| format!("`{p}`: not a count"))?;
                match k {
                    "rpm" => l.rpm = v,
                    "ipm" => l.ipm = v,
                    "tpm" => l.tpm = v,
                    _ => return Err(format!("`{k}`: expected rpm, ipm or tpm")),
                }
            }
            out.insert(tenant.to_string(), l);
        }
        Ok(out)
    }
}

/// A token bucket refilled continuously at `rate` per second up to `capacity`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Keys, tenants and quotas.
pub struct Tenancy {
    keys: RwLock<HashMap<String, Tenant>>,
    /// Whether an empty key table lets everyone in as `public` (`--allow-unauthenticated`).
    open: bool,
    public: Tenant,
    /// Capacity per minute of requests, images and tokens (prompt + max new); 0 disables.
    defaults: Limits,
    /// Tenants with their own limits.
    overrides: HashMap<String, Limits>,
    buckets: Mutex<HashMap<(String, &'static str), Bucket>>,
    /// Requests in flight per tenant, and the cap (0: none).
    running: Mutex<HashMap<String, usize>>,
    max_concurrency: usize,
}

impl Tenancy {
    /// From a key → tenant table. An empty table refuses everyone unless `open`, when
    /// everyone is the `public` tenant.
    pub fn new(keys: &HashMap<String, String>, open: bool, rpm: u32, ipm: u32, tpm: u32) -> Self {
        Self {
            keys: RwLock::new(Self::table(keys)),
            open,
            public: Tenant::new("public"),
            defaults: Limits { rpm, ipm, tpm },
            overrides: HashMap::new(),
            buckets: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            max_concurrency: 0,
        }
    }

    /// Gives some tenants their own limits.
    pub fn with_tenant_limits(mut self, overrides: HashMap<String, Limits>) -> Self {
        self.overrides = overrides;
        self
    }

    /// The quotas of `tenant`.
    pub fn limits_of(&self, tenant: &str) -> Limits {
        self.overrides.get(tenant).copied().unwrap_or(self.defaults)
    }

    /// Caps each tenant's requests in flight (0: no cap).
    pub fn with_max_concurrency(mut self, max: usize) -> Self {
        self.max_concurrency = max;
        self
    }

    /// Counts a request of `tenant` in flight, or refuses when the tenant is at its cap;
    /// [`Self::leave`] undoes it.
    pub fn enter(&self, tenant: &str) -> bool {
        let mut running = self.running.lock().expect("running lock poisoned. This is a bug.");
        let n = running.entry(tenant.to_string()).or_default();
        if self.max_concurrency > 0 && *n >= self.max_concurrency {
            return false;
        }
        *n += 1;
        true
    }

    /// A request of `tenant` ended.
    pub fn leave(&self, tenant: &str) {
        let mut running = self.running.lock().expect("running lock poisoned. This is a bug.");
        if let Some(n) = running.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(tenant);
            }
        }
    }

    fn table(keys: &HashMap<String, String>) -> HashMap<String, Tenant> {
        keys.iter().map(|(k, t)| (k.clone(), Tenant::new(t))).collect()
    }

    /// Replaces the key table (a rotated keys file); requests in flight keep their tenant.
    pub fn replace_keys(&self, keys: &HashMap<String, String>) {
        *self.keys.write().expect("keys lock poisoned. This is a bug.") = Self::table(keys);
    }

    /// Resolves an `Authorization` header value (`Bearer <key>`).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Tenant, Refusal> {
        let keys = self.keys.read().expect("keys lock poisoned. This is a bug.");
        if keys.is_empty() {
            return if self.open { Ok(self.public.clone()) } else { Err(Refusal::Unauthenticated) };
        }
        let key = authorization
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
            .map(str::trim);
        key.and_then(|k| keys.get(k)).cloned().ok_or(Refusal::Unauthenticated)
    }

    fn take(
        &self,
        tenant: &str,
        what: &'static str,
        per_minute: u32,
        amount: f64,
    ) -> Result<(), Refusal> {
        if per_minute == 0 || amount == 0.0 {
            return Ok(());
        }
        let capacity = f64::from(per_minute);
        let rate = capacity / 60.0;
        let mut buckets = self.buckets.lock().expect("bucket lock poisoned. This is a bug.");
        let b = buckets
            .entry((tenant.to_string(), what))
            .or_insert(Bucket { tokens: capacity, last: Instant::now() });
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(capacity);
        b.last = now;
        if b.tokens >= amount {
            b.tokens -= amount;
            Ok(())
        } else {
            Err(Refusal::Quota { what, retry_after: (amount - b.tokens) / rate })
        }
    }

    /// Charges one request, `images` images and `tokens` tokens to the tenant, or refuses
    /// with a retry hint (charging nothing).
    pub fn admit(&self, tenant: &Tenant, images: usize, tokens: usize) -> Result<(), Refusal> {
        let l = self.limits_of(&tenant.id);
        self.take(&tenant.id, "requests", l.rpm, 1.0)?;
        if let Err(e) = self.take(&tenant.id, "images", l.ipm, images as f64) {
            // Give the request token back: nothing was served.
            let _ = self.refund(&tenant.id, "requests", l.rpm, 1.0);
            return Err(e);
        }
        if let Err(e) = self.take(&tenant.id, "tokens", l.tpm, tokens as f64) {
            let _ = self.refund(&tenant.id, "requests", l.rpm, 1.0);
            let _ = self.refund(&tenant.id, "images", l.ipm, images as f64);
            return Err(e);
        }
        Ok(())
    }

    /// Gives `tokens` back to the tenant's local token bucket (charged, not generated).
    pub fn credit(&self, tenant: &str, tokens: usize) {
        let tpm = self.limits_of(tenant).tpm;
        let _ = self.refund(tenant, "tokens", tpm, tokens as f64);
    }

    fn refund(&self, tenant: &str, what: &'static str, per_minute: u32, amount: f64) -> Option<()> {
        let mut buckets = self.buckets.lock().ok()?;
        let b = buckets.get_mut(&(tenant.to_string(), what))?;
        b.tokens = (b.tokens + amount).min(f64::from(per_minute));
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_with_distinct_salts() {
        let keys = HashMap::from([
            ("k1".to_string(), "acme".to_string()),
            ("k2".to_string(), "globex".to_string()),
        ]);
        let t = Tenancy::new(&keys, true, 0, 0, 0);
        let a = t.authenticate(Some("Bearer k1")).unwrap();
        let b = t.authenticate(Some("Bearer k2")).unwrap();
        assert_eq!(a.id, "acme");
        assert_ne!(a.salt, b.salt);
        assert_eq!(t.authenticate(Some("Bearer nope")), Err(Refusal::Unauthenticated));
        assert_eq!(t.authenticate(None), Err(Refusal::Unauthenticated));
        let open = Tenancy::new(&HashMap::new(), true, 0, 0, 0);
        assert_eq!(open.authenticate(None).unwrap().id, "public");
        // Keys configured: the flag does not open anything; rotated keys apply at once.
        assert_eq!(t.authenticate(None), Err(Refusal::Unauthenticated));
        t.replace_keys(&HashMap::from([("k3".to_string(), "acme".to_string())]));
        assert_eq!(t.authenticate(Some("Bearer k3")).unwrap(), a);
        assert_eq!(t.authenticate(Some("Bearer k1")), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn concurrency_is_capped_per_tenant() {
        let t = Tenancy::new(&HashMap::new(), true, 0, 0, 0).with_max_concurrency(2);
        assert!(t.enter("acme") && t.enter("acme"));
        assert!(!t.enter("acme"), "a third request in flight is refused");
        assert!(t.enter("globex"), "other tenants are not affected");
        t.leave("acme");
        assert!(t.enter("acme"));
    }

    #[test]
    fn an_empty_table_is_closed_unless_opened() {
        let closed = Tenancy::new(&HashMap::new(), false, 0, 0, 0);
        assert_eq!(closed.authenticate(None), Err(Refusal::Unauthenticated));
        assert_eq!(closed.authenticate(Some("Bearer anything")), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn buckets_refuse_with_a_retry_hint() {
        let t = Tenancy::new(&HashMap::new(), true, 2, 3, 0);
        let p = t.authenticate(None).unwrap();
        assert!(t.admit(&p, 1, 10).is_ok());
        assert!(t.admit(&p, 2, 10).is_ok());
        match t.admit(&p, 0, 10) {
            Err(Refusal::Quota { what: "requests", retry_after }) => {
                assert!(retry_after > 0.0 && retry_after <= 30.0)
            }
            other => panic!("{other:?}"),
        }
        let t = Tenancy::new(&HashMap::new(), true, 100, 3, 0);
        assert!(t.admit(&p, 3, 0).is_ok());
        assert!(matches!(t.admit(&p, 1, 0), Err(Refusal::Quota { what: "images", .. })));
        // A refused request charges nothing: the request and image tokens come back.
        let t = Tenancy::new(&HashMap::new(), true, 100, 100, 50);
        assert!(t.admit(&p, 1, 40).is_ok());
        assert!(matches!(t.admit(&p, 1, 40), Err(Refusal::Quota { what: "tokens", .. })));
        assert!(t.admit(&p, 1, 10).is_ok());
        // Output charged but not generated comes back.
        t.credit("public", 40);
        assert!(t.admit(&p, 1, 40).is_ok());
    }

    #[test]
    fn tenants_can_have_their_own_limits() {
        let defaults = Limits { rpm: 60, ipm: 10, tpm: 1000 };
        let o = Limits::parse_overrides("acme:rpm=600:tpm=0, globex:ipm=1", defaults).unwrap();
        assert_eq!(o["acme"], Limits { rpm: 600, ipm: 10, tpm: 0 });
        assert_eq!(o["globex"], Limits { rpm: 60, ipm: 1, tpm: 1000 });
        for bad in ["acme:rpm", "acme:rpm=x", ":rpm=1", "acme:qps=1"] {
            assert!(Limits::parse_overrides(bad, defaults).is_err(), "{bad}");
        }
        let t = Tenancy::new(&HashMap::new(), true, 60, 10, 1000).with_tenant_limits(o);
        assert_eq!(t.limits_of("acme").rpm, 600);
        assert_eq!(t.limits_of("initech"), defaults);
        let p = t.authenticate(None).unwrap();
        let g = Tenant { id: "globex".into(), ..p };
        assert!(t.admit(&g, 1, 0).is_ok());
        assert!(matches!(t.admit(&g, 1, 0), Err(Refusal::Quota { what: "images", .. })));
    }
}
