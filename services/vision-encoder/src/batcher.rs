//! Dynamic batching: a bounded queue feeds one model thread that owns the encoder.
//!
//! The thread takes the first waiting image, then keeps collecting until `max_batch` images or
//! `max_wait` has passed, drops jobs nobody waits for any more (the request was cancelled) or
//! whose deadline has passed, runs one forward pass, and answers each job. Decoding and
//! preprocessing happen before a job is queued, on tokio's blocking pool, so they overlap the
//! forward pass instead of delaying it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsvl_models::preprocess::Preprocessed;
use dsvl_models::vision::VisionEncoder;
use dsvl_parallel::tensor_bytes;
use dsvl_telemetry::probes::Watchdog;
use tokio::sync::oneshot;

/// Why a queued image was not encoded.
#[derive(Debug, Clone)]
pub enum JobError {
    /// Its deadline passed while it waited.
    DeadlineExceeded,
    /// The forward pass failed.
    Model(String),
}

/// One image waiting for the model.
pub struct Job {
    /// Preprocessed pixels.
    pub pixels: Preprocessed,
    /// Drop instead of encoding after this instant.
    pub deadline: Option<Instant>,
    /// Where the embedding bytes (row-major, little-endian, stored dtype) go.
    pub reply: oneshot::Sender<Result<Bytes, JobError>>,
}

/// Batching knobs.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Largest batch.
    pub max_batch: usize,
    /// How long to wait for a batch to fill.
    pub max_wait: Duration,
    /// Images that may be queued.
    pub capacity: usize,
}

/// What the model thread runs: one forward pass over a batch of preprocessed images, giving
/// `[batch, tokens, hidden]` embeddings. [`VisionEncoder`] in production; tests use fakes to
/// exercise batching, deadlines and cancellation without a model.
pub trait VisionModel: Send + 'static {
    /// Embeds `pixels` in one batch.
    ///
    /// # Errors
    /// The forward pass failed.
    fn embed(
        &self,
        pixels: &[&Preprocessed],
    ) -> Result<candle_core::Tensor, dsvl_models::ModelError>;
}

impl VisionModel for VisionEncoder {
    fn embed(
        &self,
        pixels: &[&Preprocessed],
    ) -> Result<candle_core::Tensor, dsvl_models::ModelError> {
        self.forward(&self.batch_pixels(pixels)?)
    }
}

/// Handle to the model thread. Dropping it closes the queue and joins the thread.
pub struct Batcher {
    tx: Option<SyncSender<Job>>,
    queued: Arc<AtomicUsize>,
    rate: Arc<Mutex<f64>>,
    thread: Option<JoinHandle<()>>,
    capacity: usize,
    /// A submit found the model thread gone.
    stopped: std::sync::atomic::AtomicBool,
}

impl Batcher {
    /// Starts the model thread with `encoder`.
    /// `watchdog` sees each batch (the `liveness` probe).
    pub fn start(encoder: impl VisionModel, cfg: BatcherConfig, watchdog: Arc<Watchdog>) -> Self {
        let (tx, rx) = sync_channel::<Job>(cfg.capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let rate = Arc::new(Mutex::new(0.0));
        let (q, r) = (queued.clone(), rate.clone());
        let thread = std::thread::Builder::new()
            .name("vision-model".into())
            .spawn(move || model_loop(encoder, rx, cfg, q, r, &watchdog))
            .expect("cannot start the model thread");
        Self {
            tx: Some(tx),
            queued,
            rate,
            thread: Some(thread),
            capacity: cfg.capacity,
            stopped: Default::default(),
        }
    }

    /// Queues a job; gives it back when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let tx = self.tx.as_ref().expect("batcher is running");
        self.queued.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => {
                metrics::gauge!("dsvl_vision_queue_depth").set(self.queued() as f64);
                Ok(())
            }
            Err(TrySendError::Full(job)) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(job)
            }
            Err(TrySendError::Disconnected(job)) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.stopped.store(true, Ordering::SeqCst);
                Err(job)
            }
        }
    }

    /// Whether a job submitted now would be refused (checked before decoding an image, so a
    /// full queue does not cost a decode).
    pub fn is_full(&self) -> bool {
        self.queued() >= self.capacity
    }

    /// Whether the model thread has ended (it panicked; at shutdown the batcher is dropped).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) || self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Images waiting for the model.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Recent throughput while busy, images per second.
    pub fn images_per_second(&self) -> f64 {
        *self.rate.lock().expect("rate lock poisoned. This is a bug.")
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn model_loop(
    encoder: impl VisionModel,
    rx: std::sync::mpsc::Receiver<Job>,
    cfg: BatcherConfig,
    queued: Arc<AtomicUsize>,
    rate: Arc<Mutex<f64>>,
    watchdog: &Watchdog,
) {
    // A panic anywhere below (a model bug) leaves the watchdog dead: liveness goes NOT_SERVING
    // and the orchestrator restarts the process.
    let _alive = watchdog.guard_thread();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let fill_until = Instant::now() + cfg.max_wait;
        while jobs.len() < cfg.max_batch {
            let now = Instant::now();
            if now >= fill_until {
                break;
            }
            match rx.recv_timeout(fill_until - now) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        queued.fetch_sub(jobs.len(), Ordering::SeqCst);
        metrics::gauge!("dsvl_vision_queue_depth").set(queued.load(Ordering::SeqCst) as f64);
        let now = Instant::now();
        jobs.retain(|j| {
            if j.reply.is_closed() {
                metrics::counter!("dsvl_vision_jobs_dropped_total", "reason" => "cancelled")
                    .increment(1);
                return false;
            }
            true
        });
        let (live, expired): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| j.deadline.is_none_or(|d| d > now));
        for j in expired {
            metrics::counter!("dsvl_vision_jobs_dropped_total", "reason" => "deadline")
                .increment(1);
            let _ = j.reply.send(Err(JobError::DeadlineExceeded));
        }
        if live.is_empty() {
            continue;
        }
        let t = Instant::now();
        metrics::gauge!("dsvl_vision_model_busy").set(1.0);
        let busy = watchdog.busy();
        if dsvl_core::failpoint::hit(dsvl_core::failpoint::VISION_MODEL_PANIC) {
            panic!("fail-point {}", dsvl_core::failpoint::VISION_MODEL_PANIC);
        }
        let result = encode_batch(&encoder, &live);
        drop(busy);
        metrics::gauge!("dsvl_vision_model_busy").set(0.0);
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!("dsvl_vision_batch_size").record(live.len() as f64);
        metrics::histogram!("dsvl_vision_encode_duration_seconds").record(secs);
        match result {
            Ok(payloads) => {
                metrics::counter!("dsvl_vision_images_encoded_total").increment(live.len() as u64);
                let r = live.len() as f64 / secs.max(1e-9);
                let mut avg = rate.lock().expect("rate lock poisoned. This is a bug.");
                *avg = if *avg == 0.0 { r } else { 0.8 * *avg + 0.2 * r };
                metrics::gauge!("dsvl_vision_images_per_second").set(*avg);
                for (j, p) in live.into_iter().zip(payloads) {
                    let _ = j.reply.send(Ok(p));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "vision forward pass failed");
                for j in live {
                    let _ = j.reply.send(Err(JobError::Model(e.to_string())));
                }
            }
        }
    }
}

/// One forward pass; each image's embedding as little-endian bytes in the working dtype (the
/// workspace's one tensor codec, `dsvl_parallel::tensor_bytes`).
fn encode_batch(
    encoder: &impl VisionModel,
    jobs: &[Job],
) -> Result<Vec<Bytes>, dsvl_models::ModelError> {
    let refs: Vec<&Preprocessed> = jobs.iter().map(|j| &j.pixels).collect();
    let emb = encoder.embed(&refs)?.to_device(&candle_core::Device::Cpu)?;
    if tensor_bytes::embedding_dtype(emb.dtype()).is_none() {
        return Err(dsvl_models::ModelError::unsupported(format!(
            "embedding dtype {:?}",
            emb.dtype()
        )));
    }
    (0..jobs.len()).map(|i| Ok(Bytes::from(tensor_bytes::to_le_bytes(&emb.get(i)?)?))).collect()
}

#[cfg(test)]
mod tests {
    //! The model thread against a fake model: batching up to `max_batch`, answers in job order,
    //! expired and cancelled jobs dropped before the forward pass, a full queue refused, and a
    //! model error reaching every job of its batch.

    use std::sync::Mutex;

    use candle_core::{Device, Tensor};
    use dsvl_models::preprocess::Geometry;

    use super::*;

    /// Embeds each image as 2 x 3 copies of its first pixel value; records the batch sizes.
    struct FakeModel {
        batches: Arc<Mutex<Vec<usize>>>,
        delay: Duration,
        fail: bool,
    }

    impl VisionModel for FakeModel {
        fn embed(&self, pixels: &[&Preprocessed]) -> Result<Tensor, dsvl_models::ModelError> {
            self.batches.lock().unwrap().push(pixels.len());
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(dsvl_models::ModelError::InvalidInput("fake failure".into()));
            }
            let v: Vec<f32> = pixels.iter().flat_map(|p| [p.pixel_values[0]; 6]).collect();
            Ok(Tensor::from_vec(v, (pixels.len(), 2, 3), &Device::Cpu)?)
        }
    }

    fn image(v: f32) -> Preprocessed {
        let geometry = Geometry { original: (1, 1), resized: (1, 1), offset: (0, 0), side: 1 };
        Preprocessed { pixel_values: vec![v, 0.0, 0.0], geometry }
    }

    fn start(
        max_batch: usize,
        capacity: usize,
        delay_ms: u64,
        fail: bool,
    ) -> (Batcher, Arc<Mutex<Vec<usize>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let model =
            FakeModel { batches: batches.clone(), delay: Duration::from_millis(delay_ms), fail };
        let cfg = BatcherConfig { max_batch, max_wait: Duration::from_millis(50), capacity };
        (Batcher::start(model, cfg, Watchdog::new("test")), batches)
    }

    fn job(v: f32, deadline: Option<Instant>) -> (Job, oneshot::Receiver<Result<Bytes, JobError>>) {
        let (tx, rx) = oneshot::channel();
        (Job { pixels: image(v), deadline, reply: tx }, rx)
    }

    fn value_of(bytes: &Bytes) -> f32 {
        f32::from_le_bytes(bytes[..4].try_into().unwrap())
    }

    #[tokio::test]
    async fn batches_up_to_max_batch_and_answers_each_job() {
        let (b, batches) = start(4, 16, 0, false);
        let mut rxs = Vec::new();
        for i in 0..6 {
            let (j, rx) = job(i as f32, None);
            b.submit(j).map_err(|_| "queue full").unwrap();
            rxs.push(rx);
        }
        for (i, rx) in rxs.into_iter().enumerate() {
            let bytes = rx.await.unwrap().unwrap();
            assert_eq!(bytes.len(), 6 * 4, "one [2, 3] f32 embedding");
            assert_eq!(value_of(&bytes), i as f32, "job {i} got its own embedding");
        }
        let sizes = batches.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 6);
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert!(sizes.len() < 6, "no batching happened: {sizes:?}");
    }

    #[tokio::test]
    async fn expired_and_cancelled_jobs_are_never_encoded() {
        let (b, batches) = start(8, 16, 0, false);
        let (expired, rx_expired) = job(1.0, Some(Instant::now()));
        let (cancelled, rx_cancelled) = job(2.0, None);
        let (live, rx_live) = job(3.0, None);
        drop(rx_cancelled);
        for j in [expired, cancelled, live] {
            b.submit(j).map_err(|_| "queue full").unwrap();
        }
        assert!(matches!(rx_expired.await.unwrap(), Err(JobError::DeadlineExceeded)));
        assert_eq!(value_of(&rx_live.await.unwrap().unwrap()), 3.0);
        assert_eq!(batches.lock().unwrap().iter().sum::<usize>(), 1, "only the live job ran");
    }

    #[tokio::test]
    async fn a_full_queue_gives_the_job_back() {
        // The model thread is busy for 300 ms with the first job; the queue holds one more.
        // (The model thread took the first job once `queued` is back to 0.)
        let (b, _) = start(1, 1, 300, false);
        let (first, _rx1) = job(1.0, None);
        b.submit(first).map_err(|_| "queue full").unwrap();
        let t = Instant::now();
        while b.queued() > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "the model thread never took the job");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (second, _rx2) = job(2.0, None);
        b.submit(second).map_err(|_| "queue full").unwrap();
        let (third, _rx3) = job(3.0, None);
        assert!(b.submit(third).is_err(), "the third job found room in a queue of one");
    }

    #[tokio::test]
    async fn a_model_error_reaches_every_job_of_the_batch() {
        let (b, _) = start(4, 16, 0, true);
        let (j1, rx1) = job(1.0, None);
        let (j2, rx2) = job(2.0, None);
        b.submit(j1).map_err(|_| "queue full").unwrap();
        b.submit(j2).map_err(|_| "queue full").unwrap();
        for rx in [rx1, rx2] {
            match rx.await.unwrap() {
                Err(JobError::Model(m)) => assert!(m.contains("fake failure"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
