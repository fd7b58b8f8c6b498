//! Image bombs against the real `dsvl-vision` binary, with its peak memory measured (the
//! kernel's high-water mark of resident memory, `VmHWM`): a real 16384 x 16384 PNG (about
//! 1 MB on the wire, 768 MiB of RGB once decoded) is refused from its header under the default
//! pixel budget, several at once included, without the service's memory growing by more than
//! a few MiB per request; and where the budget is raised on purpose, decodes run one at a time
//! (`--max-concurrent-decodes 1`), so three concurrent bombs cost what one does, not three
//! times that, also when their callers go away mid-decode.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsvl_proto::internal::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::internal::{EncodeRequest, ImageInput};
use dsvl_testkit::{free_port, ServiceProcess};
use tonic::transport::Channel;

const SIDE: u32 = 16_384;

/// A complete, valid 16384 x 16384 black RGB PNG.
fn bomb() -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let pixels = vec![0u8; SIDE as usize * SIDE as usize * 3];
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::NoFilter)
        .write_image(&pixels, SIDE, SIDE, image::ExtendedColorType::Rgb8)
        .expect("encode the PNG");
    png
}

/// Peak resident memory of `pid` so far, in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("VmHWM")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kib << 10)
}

struct Vision {
    proc: ServiceProcess,
    channel: Channel,
}

impl Vision {
    async fn start(extra: &[&str]) -> Result<Self> {
        let grpc = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--listen".to_string(), grpc.clone(), "--insecure".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Under a 4 GiB data limit: a bound that breaks kills the service, not the machine.
        let proc =
            ServiceProcess::spawn_limited(env!("CARGO_BIN_EXE_dsvl-vision"), &args, 4 << 30)?;
        let channel = Channel::from_shared(format!("http://{grpc}"))?.connect_lazy();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let req = tonic_health::pb::HealthCheckRequest {
                service: "dsvl.internal.v1.VisionEncoder".into(),
            };
            if health.check(req).await.is_ok_and(|r| r.into_inner().status == 1) {
                return Ok(Self { proc, channel });
            }
            if Instant::now() > deadline {
                bail!("dsvl-vision never became SERVING");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `n` requests of one image each at once; each image's outcome (`Ok`, the image
    /// error's code, or the gRPC status code).
    async fn encode_concurrently(&self, png: &[u8], n: usize) -> Result<Vec<String>> {
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut client =
                VisionEncoderClient::new(self.channel.clone()).max_encoding_message_size(64 << 20);
            let request = EncodeRequest {
                images: vec![ImageInput {
                    data: png.to_vec().into(),
                    client_digest: String::new(),
                }],
                cache_salt: format!("bomb-{i}").into_bytes().into(),
                return_inline: false,
            };
            tasks.push(tokio::spawn(async move {
                match client.encode(request).await {
                    Ok(r) => match r.into_inner().results.first().and_then(|x| x.result.clone()) {
                        Some(dsvl_proto::internal::encode_result::Result::Error(e)) => {
                            format!("{:?}", e.code())
                        }
                        Some(_) => "Ok".to_string(),
                        None => "no result".to_string(),
                    },
                    Err(s) => format!("status {:?}", s.code()),
                }
            }));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await?);
        }
        Ok(codes)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_16384_square_png_is_refused_or_decoded_one_at_a_time() -> Result<()> {
    let png = bomb();
    assert!(png.len() < 4 << 20, "the bomb is small on the wire: {} bytes", png.len());

    // Default pixel budget (Pillow's 89.5 Mpx): refused from the header, fast, four at once.
    let vision = Vision::start(&[]).await?;
    let before = peak_rss(vision.proc.pid())?;
    let t = Instant::now();
    let codes = vision.encode_concurrently(&png, 4).await?;
    let took = t.elapsed();
    assert!(codes.iter().all(|c| c == "InvalidImage"), "{codes:?}");
    assert!(took < Duration::from_secs(2), "refusals took {took:?}");
    let grew = peak_rss(vision.proc.pid())?.saturating_sub(before);
    // Four requests of ~1 MB each and their buffers; one decoded bomb would be 768 MiB.
    assert!(grew < 64 << 20, "peak memory grew by {} MiB while refusing", grew >> 20);
    drop(vision);

    // A raised budget, one decode at a time: measure one bomb alone, then three at once.
    let budget = (u64::from(SIDE) * u64::from(SIDE)).to_string();
    let flags = ["--max-image-pixels", &budget, "--max-concurrent-decodes", "1"];
    let vision = Vision::start(&flags).await?;
    let base = peak_rss(vision.proc.pid())?;
    assert_eq!(vision.encode_concurrently(&png, 1).await?, ["Ok"]);
    let one = peak_rss(vision.proc.pid())?.saturating_sub(base);
    assert!(one > 512 << 20, "one decoded bomb should cost at least its pixels: {} MiB", one >> 20);
    let codes = vision.encode_concurrently(&png, 3).await?;
    assert!(codes.iter().all(|c| c == "Ok"), "{codes:?}");
    let three = peak_rss(vision.proc.pid())?.saturating_sub(base);
    eprintln!("peak growth: one bomb {} MiB, three at once {} MiB", one >> 20, three >> 20);
    assert!(
        three < one + one / 2,
        "three concurrent decodes took {} MiB, one alone {} MiB: decodes are not bounded",
        three >> 20,
        one >> 20
    );
    drop(vision);

    // Callers that go away mid-decode do not free their slot early: three bombs, each
    // cancelled while being decoded or waiting, then one more request that waits for a slot
    // behind whatever is still decoding; the peak is still one image.
    let vision = Vision::start(&flags).await?;
    let base = peak_rss(vision.proc.pid())?;
    let mut cancelled = Vec::new();
    for _ in 0..3 {
        let (png, v) = (png.clone(), vision.channel.clone());
        cancelled.push(tokio::spawn(async move {
            let mut client = VisionEncoderClient::new(v).max_encoding_message_size(64 << 20);
            let request = EncodeRequest {
                images: vec![ImageInput { data: png.into(), client_digest: String::new() }],
                cache_salt: format!("cancelled-{}", rand_salt()).into_bytes().into(),
                return_inline: false,
            };
            let _ = client.encode(request).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for task in &cancelled {
        task.abort();
    }
    assert_eq!(vision.encode_concurrently(&png, 1).await?, ["Ok"]);
    let after_cancel = peak_rss(vision.proc.pid())?.saturating_sub(base);
    eprintln!("peak growth with cancelled callers: {} MiB", after_cancel >> 20);
    assert!(
        after_cancel < one + one / 2,
        "cancelled callers let decodes run at once: {} MiB (one image: {} MiB)",
        after_cancel >> 20,
        one >> 20
    );
    Ok(())
}

/// A salt no other request of this test uses.
fn rand_salt() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
