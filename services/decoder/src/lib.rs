//! The decoder tier as a library: [`run`] serves `dsvl.internal.v1.Decoder` for one tensor-parallel group
//! until a shutdown future resolves; `main.rs` parses flags, sets up telemetry, and runs either
//! this (rank 0) or a worker rank ([`group::run_worker_process`]).
//!
//! Failure semantics: the group serves as a unit. If any rank dies or a
//! collective times out, every in-flight stream ends with UNAVAILABLE, health turns
//! NOT_SERVING, [`run`] returns an error (the process exits non-zero so the orchestrator
//! recreates the group) and the local worker ranks are killed on the way out.
#![deny(missing_docs)]

pub mod config;
mod embeddings;
pub mod error;
pub mod group;
mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsvl_cache::{RedisCache, RedisConfig};
use dsvl_engine::engine::spawn_engine;
use dsvl_proto::internal::decoder_server::DecoderServer;
use dsvl_telemetry::probes::{self, Watchdog};
use dsvl_telemetry::server::GrpcBase;
use tokio::net::TcpListener;

pub use config::{Args, DecoderConfig};
use service::DecoderService;

/// Why the decoder stopped.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    /// The TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(#[from] dsvl_tls::TlsError),
    /// The group could not start or failed while serving.
    #[error("decoder group: {0}")]
    Group(#[from] dsvl_models::ModelError),
    /// The cache could not be configured.
    #[error("cache: {0}")]
    Cache(#[from] dsvl_cache::CacheError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection setup failed.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// Serves the decoder group's gRPC API on `listener` until `shutdown` resolves (then drains:
/// NOT_SERVING, new requests UNAVAILABLE, in-flight streams finish within `config.drain`) or the
/// group fails (error).
///
/// Health (`grpc.health.v1`, `dsvl.internal.v1.Decoder` and `""`) is SERVING only once every rank has
/// joined, loaded its shard and run a warm-up step; `startup` and `liveness` serve the
/// Kubernetes probes ([`dsvl_telemetry::probes`]): liveness fails when one engine step runs
/// longer than `config.liveness_stall` or the group has failed.
pub async fn run(
    args: Args,
    config: DecoderConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DecoderError> {
    let GrpcBase { health, drain, router, internal } =
        GrpcBase::new::<DecoderServer<DecoderService>>(&[
            dsvl_proto::internal::FILE_DESCRIPTOR_SET,
        ])
        .await
        .map_err(|e| DecoderError::Reflection(e.to_string()))?;
    let watchdog = Watchdog::new("decoder-engine");
    let _liveness =
        probes::spawn_liveness(health.clone(), vec![watchdog.clone()], config.liveness_stall);

    let cache = match &config.redis {
        Some(url) => Some(Arc::new(RedisCache::new(RedisConfig {
            tls: config.redis_tls.clone(),
            ..RedisConfig::new(url.clone())
        })?)),
        None => None,
    };
    if cache.is_some() && config.secret.is_none() {
        tracing::warn!("--insecure: shared-cache embeddings are verified without the cluster secret; anyone who can write to Redis can forge them");
    }
    let ready = Arc::new(std::sync::OnceLock::new());
    let svc = DecoderService {
        ready: ready.clone(),
        cache,
        seal: dsvl_core::EmbeddingSeal::from_secret(config.secret.as_ref()),
        max_waiting: config.max_waiting,
        drain: drain.clone(),
    };
    let tls =
        config.tls.clone().map(|f| dsvl_tls::watch_server(f, &[dsvl_tls::ALPN_H2])).transpose()?;
    if tls.is_none() {
        tracing::warn!("--insecure: gRPC in plain text; callers are not authenticated");
    }
    let server = router
        .add_service(
            DecoderServer::new(svc)
                .max_decoding_message_size(config.max_message_bytes)
                .max_encoding_message_size(config.max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            dsvl_tls::connections(listener, tls, dsvl_tls::ConnectionLimits::INTERNAL),
            drain.stopped(),
        );
    let internal =
        dsvl_telemetry::server::serve_internal(internal, config.health_listen, drain.stopped());
    let server = async {
        tokio::try_join!(async { server.await.map_err(DecoderError::from) }, async {
            internal.await.map_err(|e| DecoderError::Reflection(e.to_string()))
        })
        .map(|_| ())
    };
    tokio::pin!(server);

    // The group starts on the engine thread (its communicator never leaves that thread).
    let (info_tx, info_rx) = std::sync::mpsc::channel();
    let (engine_args, engine_cfg) = (args.clone(), config.clone());
    let t = Instant::now();
    let mut starting = tokio::task::spawn_blocking(move || {
        spawn_engine(
            move || {
                let (runner, sched, workers, info) =
                    group::build_leader(&engine_args, &engine_cfg)?;
                let _ = info_tx.send((info, workers));
                Ok((runner, sched))
            },
            watchdog,
        )
    });
    tokio::pin!(shutdown);
    // Phase 1: the group starts (health NOT_SERVING, requests UNAVAILABLE).
    let (engine, join) = tokio::select! {
        r = &mut server => return r,
        () = &mut shutdown => return Ok(()),
        r = &mut starting => match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(DecoderError::Reflection(format!("engine start task: {e}"))),
        },
    };
    let (info, workers) = info_rx
        .recv()
        .map_err(|_| DecoderError::Reflection("engine started without model info".into()))?;
    tracing::info!(tp = info.tp, load_s = t.elapsed().as_secs_f64(), "decoder group ready");
    let _ = ready.set(service::Ready { engine, info });
    probes::set_ready::<DecoderServer<DecoderService>>(&health, true).await;
    probes::started(&health).await;
    let mut engine_done = tokio::task::spawn_blocking(move || {
        join.join().unwrap_or_else(|_| {
            Err(dsvl_models::ModelError::GroupFailed("engine thread panicked".into()))
        })
    });
    // Phase 2: serving, until shutdown or a group failure.
    let failure = tokio::select! {
        r = &mut server => return r,
        () = &mut shutdown => None,
        r = &mut engine_done => Some(match r {
            Ok(Ok(())) => dsvl_models::ModelError::GroupFailed("the engine stopped".into()),
            Ok(Err(e)) => e,
            Err(e) => dsvl_models::ModelError::GroupFailed(format!("engine thread: {e}")),
        }),
    };
    if let Some(e) = failure {
        probes::set_ready::<DecoderServer<DecoderService>>(&health, false).await;
        // The process is about to exit; liveness tells the same to anyone still asking.
        drop(_liveness);
        health.set_service_status(probes::LIVENESS, tonic_health::ServingStatus::NotServing).await;
        // Streams already ended with UNAVAILABLE; stop serving and let the process exit
        // non-zero. Dropping `workers` kills any rank still alive.
        drain.stop();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        drop(workers);
        return Err(e.into());
    }
    // The drain every service shares: refuse new work, wait for the streams in flight.
    if let Some(r) = drain
        .drain::<DecoderServer<DecoderService>, _, _>(&health, server.as_mut(), config.drain)
        .await
    {
        r?;
    }
    // The engine stops once idle and tells the workers to exit.
    if let Some(r) = ready.get() {
        r.engine.shutdown();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), engine_done).await;
    let mut workers = workers;
    workers.wait_or_kill(Duration::from_secs(5));
    Ok(())
}
