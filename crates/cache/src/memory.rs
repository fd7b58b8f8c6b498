//! In-process LRU bounded in bytes. Expired entries are dropped when read.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use lru::LruCache;

use crate::{CacheError, EmbeddingCache};

struct Entry {
    value: Bytes,
    expires: Instant,
}

struct Inner {
    lru: LruCache<String, Entry>,
    bytes: usize,
}

/// An LRU cache holding at most `capacity_bytes` of values (keys not counted).
pub struct MemoryCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl MemoryCache {
    /// An empty cache of `capacity_bytes`.
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory cache lock poisoned. This is a bug.")
    }

    /// Bytes currently held.
    pub fn used_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get_now(&self, key: &str) -> Option<Bytes> {
        let mut s = self.lock();
        match s.lru.get(key) {
            Some(e) if e.expires > Instant::now() => Some(e.value.clone()),
            Some(_) => {
                if let Some(e) = s.lru.pop(key) {
                    s.bytes -= e.value.len();
                }
                None
            }
            None => None,
        }
    }

    fn put_now(&self, key: &str, value: Bytes, ttl: Duration) {
        if value.len() > self.capacity {
            return; // would evict everything and still not fit
        }
        let mut s = self.lock();
        let size = value.len();
        if let Some(old) =
            s.lru.put(key.to_string(), Entry { value, expires: Instant::now() + ttl })
        {
            s.bytes -= old.value.len();
        }
        s.bytes += size;
        while s.bytes > self.capacity {
            match s.lru.pop_lru() {
                Some((_, e)) => s.bytes -= e.value.len(),
                None => break,
            }
        }
    }
}

impl EmbeddingCache for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        Box::pin(async move { Ok(self.get_now(key)) })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            self.put_now(key, value, ttl);
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let c = MemoryCache::new(10);
        let ttl = Duration::from_secs(60);
        c.put_now("a", Bytes::from(vec![0; 4]), ttl);
        c.put_now("b", Bytes::from(vec![0; 4]), ttl);
        assert!(c.get_now("a").is_some()); // a is now most recent
        c.put_now("c", Bytes::from(vec![0; 4]), ttl); // 12 > 10: evict b
        assert!(c.get_now("b").is_none());
        assert!(c.get_now("a").is_some() && c.get_now("c").is_some());
        assert_eq!(c.used_bytes(), 8);
        c.put_now("huge", Bytes::from(vec![0; 11]), ttl);
        assert!(c.get_now("huge").is_none(), "larger than the whole cache: not stored");
    }

    #[test]
    fn expired_entries_are_misses() {
        let c = MemoryCache::new(100);
        c.put_now("a", Bytes::from_static(b"x"), Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.get_now("a").is_none());
        assert_eq!(c.used_bytes(), 0);
    }
}
