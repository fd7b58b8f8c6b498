//! In-process single flight: the first caller for a key runs the computation; concurrent
//! callers for the same key wait for its result instead of computing it again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// Deduplicates concurrent computations by key.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { inflight: Mutex::new(HashMap::new()) }
    }
}

/// Removes the in-flight entry even if the leader's future is dropped (cancelled), so waiters
/// then retry instead of waiting forever.
struct Cleanup<'a, K: Eq + Hash, V> {
    map: &'a Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
    key: Option<K>,
}

impl<K: Eq + Hash, V> Drop for Cleanup<'_, K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.map.lock().expect("single-flight lock poisoned. This is a bug.").remove(&k);
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// A new, empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `compute` unless a computation for `key` is already in flight, in which case its
    /// result is awaited. Returns the value and whether this call ran the computation. If the
    /// running computation is cancelled, waiters retry (one of them becomes the new leader).
    pub async fn run<F, Fut>(&self, key: K, compute: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let mut compute = Some(compute);
        loop {
            // Decide under the lock, act after releasing it (the guard must not live across an await).
            let role = {
                let mut map =
                    self.inflight.lock().expect("single-flight lock poisoned. This is a bug.");
                match map.get(&key) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(key.clone(), rx);
                        Ok(tx)
                    }
                }
            };
            match role {
                Ok(tx) => {
                    let _cleanup = Cleanup { map: &self.inflight, key: Some(key.clone()) };
                    let f = compute.take().expect("the leader runs the computation once");
                    let value = f().await;
                    let _ = tx.send(Some(value.clone()));
                    return (value, true);
                }
                Err(mut rx) => loop {
                    if let Some(v) = rx.borrow_and_update().clone() {
                        return (v, false);
                    }
                    if rx.changed().await.is_err() {
                        // The leader went away without a value: try again (maybe as leader).
                        if let Some(v) = rx.borrow().clone() {
                            return (v, false);
                        }
                        break;
                    }
                },
            }
        }
    }

    /// Keys currently being computed.
    pub fn inflight(&self) -> usize {
        self.inflight.lock().expect("single-flight lock poisoned. This is a bug.").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_computation() {
        let sf = Arc::new(SingleFlight::<String, u32>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (sf, runs) = (sf.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                sf.run("k".to_string(), || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, led) = t.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(led);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(sf.inflight(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_over() {
        let sf = Arc::new(SingleFlight::<u8, u8>::new());
        let sf2 = sf.clone();
        let leader = tokio::spawn(async move {
            sf2.run(1, || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                1
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sf3 = sf.clone();
        let waiter = tokio::spawn(async move { sf3.run(1, || async { 2 }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let (v, led) = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap();
        assert_eq!((v, led), (2, true));
    }
}
