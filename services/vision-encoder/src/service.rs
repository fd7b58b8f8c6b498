//! The `dsvl.internal.v1.VisionEncoder` gRPC service.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use dsvl_core::cache_key::{embedding_key, ImageDigest, KeyParts};
use dsvl_models::preprocess::PREPROCESS_VERSION;
use dsvl_proto::internal::encode_result::Result as ResultKind;
use dsvl_proto::internal::vision_encoder_server::VisionEncoder;
use dsvl_proto::internal::{
    DType, EmbeddingRef, EncodeRequest, EncodeResponse, EncodeResult, ImageErrorCode, InfoRequest,
    InfoResponse,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::encode::{Failure, Lookup, Outcome, Pipeline};
use crate::error::{image_error, request_failure, ServiceError};

/// State shared by all requests. The pipeline appears once the model is loaded and warm.
pub struct VisionService {
    pub(crate) pipeline: Arc<OnceLock<Arc<Pipeline>>>,
    pub(crate) max_images: usize,
    pub(crate) drain: Arc<dsvl_telemetry::server::Drain>,
}

impl VisionService {
    fn ready(&self) -> Result<Arc<Pipeline>, ServiceError> {
        if self.drain.is_draining() {
            return Err(ServiceError::Draining);
        }
        self.pipeline.get().cloned().ok_or(ServiceError::Loading)
    }
}

#[tonic::async_trait]
impl VisionEncoder for VisionService {
    // Per-image failures are whole `EncodeResult`s (large, built once per bad image).
    #[allow(clippy::result_large_err)]
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let _in_flight = self.drain.track();
        Ok(Response::new(self.encode_images(request).await?))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let p = self.ready()?;
        Ok(Response::new(InfoResponse {
            model_fingerprint: p.expected.fingerprint.clone(),
            tokens_per_image: p.expected.shape[0],
            hidden_size: p.expected.shape[1],
            dtype: DType::from(p.expected.dtype) as i32,
            queued_images: p.batcher.queued() as u64,
            images_per_second: p.batcher.images_per_second(),
            shared_cache: p.shared.is_some(),
        }))
    }
}

impl VisionService {
    // Per-image failures are whole `EncodeResult`s (large, built once per bad image).
    #[allow(clippy::result_large_err)]
    async fn encode_images(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<EncodeResponse, ServiceError> {
        let span = tracing::info_span!(
            "vision.encode",
            images = tracing::field::Empty,
            hits = tracing::field::Empty,
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty
        );
        dsvl_telemetry::extract_trace_context(request.metadata(), &span);
        dsvl_telemetry::record_request_id(request.metadata(), &span);
        let started = Instant::now();
        // Answer a little before the caller's deadline (network and tonic's own timer start
        // earlier), so the client gets DEADLINE_EXCEEDED from us rather than a bare cancel.
        let deadline = dsvl_telemetry::answer_by(request.metadata(), started)?;
        let pipeline = self.ready()?;
        let req = request.into_inner();
        if req.images.is_empty() {
            return Err(ServiceError::NoImages);
        }
        if req.images.len() > self.max_images {
            return Err(ServiceError::TooManyImages {
                count: req.images.len(),
                max: self.max_images,
            });
        }
        span.record("images", req.images.len());
        let shared = pipeline.shared.is_some();
        let salt = req.cache_salt;
        let return_inline = req.return_inline;
        // Per image: a key, or an error that fails that image alone.
        let prepared: Vec<Result<(String, Bytes), EncodeResult>> = req
            .images
            .into_iter()
            .map(|img| {
                let data = img.data;
                // One hash of the image in this process: it checks the caller's digest and
                // goes into the key.
                let digest = ImageDigest::of(&data);
                if !img.client_digest.is_empty()
                    && ImageDigest::from_hex(&img.client_digest) != Some(digest)
                {
                    return Err(image_error(
                        ImageErrorCode::InvalidImage,
                        "client_digest does not match the image bytes".into(),
                    ));
                }
                if data.len() > pipeline.preprocessor.limits().max_input_bytes {
                    return Err(image_error(
                        ImageErrorCode::InvalidImage,
                        format!(
                            "image is {} bytes, over the limit of {}",
                            data.len(),
                            pipeline.preprocessor.limits().max_input_bytes
                        ),
                    ));
                }
                let key = embedding_key(&KeyParts {
                    salt: &salt,
                    model_fingerprint: &pipeline.expected.fingerprint,
                    dtype: pipeline.expected.dtype.name(),
                    preprocess_version: PREPROCESS_VERSION,
                    image: &digest,
                });
                Ok((key, data))
            })
            .collect();
        let all = async {
            // Every key of the request in one lookup (one MGET to Redis for the local misses).
            let keys: Vec<&str> =
                prepared.iter().filter_map(|p| p.as_ref().ok().map(|(k, _)| k.as_str())).collect();
            let mut found = pipeline.lookup_many(&keys).await.into_iter();
            let jobs: Vec<_> = prepared
                .iter()
                .map(|p| {
                    let looked = p.as_ref().ok().and_then(|_| found.next());
                    let pipeline = pipeline.clone();
                    async move {
                        let (key, data) = match p {
                            Err(e) => return Ok(e.clone()),
                            Ok(kd) => kd.clone(),
                        };
                        let outcome = match looked {
                            Some(Lookup::Hit(stored)) => {
                                Ok(Outcome { stored, cache_hit: true, shared })
                            }
                            Some(Lookup::Miss { shared_ok }) => {
                                pipeline.embed_missed(key.clone(), data, deadline, shared_ok).await
                            }
                            None => Err(Failure::Internal(
                                "lookup returned too few results. This is a bug.".into(),
                            )),
                        };
                        match outcome {
                            Ok(Outcome { stored, cache_hit, shared: in_shared }) => {
                                // A reference only when the value is in the shared cache; otherwise
                                // (no Redis, or Redis failed for this image) the bytes travel inline.
                                let result = if shared && in_shared && !return_inline {
                                    let e = &stored.embedding;
                                    ResultKind::Ref(EmbeddingRef {
                                        key: key.clone(),
                                        shape: e.shape.clone(),
                                        dtype: DType::from(e.dtype) as i32,
                                        model_fingerprint: e.model_fingerprint.clone(),
                                        stored_bytes: stored.value.len() as u64,
                                    })
                                } else {
                                    ResultKind::Inline((&stored.embedding).into())
                                };
                                Ok(EncodeResult { result: Some(result), cache_hit, key })
                            }
                            Err(Failure::Image(msg)) => {
                                Ok(image_error(ImageErrorCode::InvalidImage, msg))
                            }
                            Err(other) => Err(other),
                        }
                    }
                })
                .collect();
            futures::future::join_all(jobs).await
        }
        .instrument(span.clone());
        let outcomes = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), all).await {
                Ok(o) => o,
                // Dropping the futures cancels their queued jobs: nothing is encoded for nobody.
                Err(_) => return Err(ServiceError::DeadlineExceeded),
            },
            None => all.await,
        };
        let mut results = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            results.push(match o {
                Ok(r) => r,
                Err(f) => request_failure(f)?,
            });
        }
        let hits = results.iter().filter(|r| r.cache_hit).count();
        span.record("hits", hits);
        let seconds = started.elapsed().as_secs_f64();
        metrics::histogram!("dsvl_vision_request_duration_seconds").record(seconds);
        // The access log line, with the caller's request id and trace ids in JSON logs.
        tracing::info!(parent: &span, images = results.len(), hits, seconds, "images encoded");
        Ok(EncodeResponse { results })
    }
}
