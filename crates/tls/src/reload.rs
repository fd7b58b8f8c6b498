//! A TLS configuration rebuilt when its files change.
//!
//! cert-manager (and the kubelet, for Secret volumes) replace certificate files in place; a
//! service that read them once would serve an expired certificate until restarted. A
//! [`Reloading`] value polls the files' modification times and sizes and rebuilds the
//! configuration when they change. A rebuild that fails (a half-written file, a key that does
//! not match) keeps the previous configuration and is logged; the next change tries again.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::TlsError;

/// How often the files are checked.
pub const POLL: Duration = Duration::from_secs(2);

/// The current configuration built from a set of files.
#[derive(Debug)]
pub struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self { current: self.current.clone() }
    }
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the configuration now and, inside a tokio runtime, rebuilds it whenever one of
    /// `paths` changes (checked every `every`) for as long as a clone of the value lives.
    ///
    /// # Errors
    /// The first build fails.
    pub fn watch<F>(
        what: &'static str,
        paths: Vec<PathBuf>,
        every: Duration,
        build: F,
    ) -> Result<Self, TlsError>
    where
        F: Fn() -> Result<T, TlsError> + Send + 'static,
    {
        let mut last = stamp(&paths);
        let current = Arc::new(RwLock::new(Arc::new(build()?)));
        let weak = Arc::downgrade(&current);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(current) = weak.upgrade() else { return };
                    let now = stamp(&paths);
                    if now == last {
                        continue;
                    }
                    last = now;
                    match build() {
                        Ok(config) => {
                            *current.write().unwrap_or_else(|p| p.into_inner()) =
                                Arc::new(config);
                            tracing::info!(what, "TLS files changed: reloaded");
                            metrics::counter!("dsvl_tls_reloads_total", "outcome" => "ok")
                                .increment(1);
                        }
                        Err(e) => {
                            tracing::warn!(what, error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                            metrics::counter!("dsvl_tls_reloads_total", "outcome" => "error")
                                .increment(1);
                        }
                    }
                }
            });
        }
        Ok(Self { current })
    }

    /// A configuration that never changes.
    pub fn fixed(value: T) -> Self {
        Self { current: Arc::new(RwLock::new(Arc::new(value))) }
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("dsvl-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("value");
        std::fs::write(&file, "1").unwrap();
        let read = {
            let file = file.clone();
            move || {
                let s =
                    std::fs::read_to_string(&file).map_err(|e| TlsError::Other(e.to_string()))?;
                s.trim().parse::<u32>().map_err(|e| TlsError::Other(e.to_string()))
            }
        };
        let value =
            Reloading::watch("test", vec![file.clone()], Duration::from_millis(20), read).unwrap();
        assert_eq!(*value.current(), 1);
        let settle = || tokio::time::sleep(Duration::from_millis(200));
        std::fs::write(&file, "22").unwrap();
        settle().await;
        assert_eq!(*value.current(), 22, "reloaded");
        std::fs::write(&file, "not a number").unwrap();
        settle().await;
        assert_eq!(*value.current(), 22, "a broken file keeps the previous value");
        std::fs::write(&file, "333").unwrap();
        settle().await;
        assert_eq!(*value.current(), 333, "the next good change is taken");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
