//! Image-URL fetching against real local HTTP and HTTPS servers: the allow-list, ports and user
//! information refused before any connection; internal addresses refused after resolution in
//! every spelling (loopback by name, case and trailing dot, IPv6, decimal); redirects, size and
//! time bounds; concurrent fetches; TLS with an extra certificate authority.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use clap::Parser;
use dsvl_gateway::config::GatewayConfig;
use dsvl_gateway::error::GatewayError;
use dsvl_gateway::fetch::{ImageFetcher, RemoteImage};

fn config(extra: &[&str]) -> GatewayConfig {
    let mut args =
        vec!["dsvl-gateway", "--decoder", "127.0.0.1:1", "--allow-unauthenticated", "--insecure"];
    args.extend_from_slice(extra);
    GatewayConfig::try_from(&dsvl_gateway::Args::parse_from(args)).unwrap()
}

/// A server counting the requests it answers.
fn app(hits: Arc<AtomicUsize>) -> Router {
    let counted = move |body: Vec<u8>| {
        let hits = hits.clone();
        move || {
            hits.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            async move { body }
        }
    };
    Router::new()
        .route("/img", get(counted(vec![7u8; 1000])))
        .route("/big", get(counted(vec![1u8; 3 << 20])))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                vec![9u8; 100]
            }),
        )
        .route("/stall", get(|| async { std::future::pending::<Vec<u8>>().await }))
        .route(
            "/chunked",
            // No Content-Length: only the streaming bound can stop it.
            get(|| async {
                let chunks = (0..48).map(|_| Ok::<_, std::io::Error>(vec![2u8; 64 << 10]));
                axum::body::Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .route(
            "/redirect",
            get(|| async { (axum::http::StatusCode::FOUND, [("location", "/img")], "") }),
        )
}

async fn http_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(hits.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (addr, hits)
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn refused(r: Result<impl std::fmt::Debug, GatewayError>, why: &str) {
    match r {
        Err(GatewayError::InvalidArgument(m)) => assert!(m.contains(why), "{m:?} lacks {why:?}"),
        other => panic!("expected a refusal containing {why:?}, got {other:?}"),
    }
}

#[test]
fn urls_are_refused_before_any_connection() {
    let c = config(&["--image-url-allow", "images.example.com,*.cdn.example"]);
    let parse = |u: &str| RemoteImage::parse(u, &c);
    refused(parse("http://images.example.com@127.0.0.1/x.png"), "user information");
    refused(parse("http://user:pw@images.example.com/x.png"), "user information");
    refused(parse("http://images.example.com:6379/"), "port");
    refused(parse("https://images.example.com:22/x.png"), "port");
    refused(parse("http://images.example.com.evil.com/x.png"), "allow-list");
    refused(parse("http://cdn.example/x.png"), "allow-list");
    refused(parse("http://127.0.0.1/x.png"), "allow-list");
    refused(parse("ftp://images.example.com/x.png"), "http(s)");
    refused(parse("file:///etc/passwd"), "");
    refused(parse(&format!("http://images.example.com/{}", "a".repeat(9000))), "bytes");
    let ok = parse("HTTPS://Images.Example.COM./cat.png?size=2").unwrap();
    assert_eq!((ok.host.as_str(), ok.port, ok.https), ("images.example.com", 443, true));
    assert_eq!(parse("http://a.b.cdn.example/x").unwrap().port, 80);
    let none = config(&[]);
    refused(RemoteImage::parse("http://images.example.com/x.png", &none), "data: URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_in_every_spelling() {
    let (addr, hits) = http_server().await;
    let port = addr.port().to_string();
    let c = config(&[
        "--image-url-allow",
        "127.0.0.1,localhost,::1,2130706433",
        "--image-url-ports",
        &port,
    ]);
    let fetcher = ImageFetcher::new(&c).unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/img"),
        format!("http://LocalHost.:{port}/img"),
        format!("http://[::1]:{port}/img"),
        format!("http://2130706433:{port}/img"),
        format!("https://localhost:{port}/img"),
    ] {
        let image = RemoteImage::parse(&url, &c).unwrap();
        let got = fetcher.fetch(&image, later()).await;
        assert!(
            matches!(&got, Err(GatewayError::InvalidArgument(m)) if m.contains("internal") || m.contains("resolve")),
            "{url}: {got:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "an internal address was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_fetches_are_bounded_in_size_time_and_redirects() {
    let (addr, hits) = http_server().await;
    let port = addr.port().to_string();
    let c = config(&[
        "--image-url-allow",
        "localhost,127.0.0.1",
        "--image-url-allow-internal",
        "--image-url-ports",
        &port,
        "--image-url-timeout-secs",
        "1",
        "--max-image-mib",
        "1",
    ]);
    let fetcher = ImageFetcher::new(&c).unwrap();
    let image =
        |path: &str| RemoteImage::parse(&format!("http://LOCALHOST.:{port}{path}"), &c).unwrap();
    assert_eq!(fetcher.fetch(&image("/img"), later()).await.unwrap().len(), 1000);
    refused(fetcher.fetch(&image("/redirect"), later()).await, "redirects are not followed");
    refused(fetcher.fetch(&image("/big"), later()).await, "limit");
    refused(fetcher.fetch(&image("/chunked"), later()).await, "limit");
    let t = Instant::now();
    refused(fetcher.fetch(&image("/stall"), later()).await, "longer than 1 s");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let soon = Instant::now() + Duration::from_millis(300);
    let e = fetcher.fetch(&image("/stall"), soon).await.unwrap_err();
    assert!(matches!(e, GatewayError::DeadlineExceeded(_)), "{e:?}");
    // Four slow images at once take about as long as one.
    let t = Instant::now();
    let four = vec![image("/slow"); 4];
    let got = fetcher.fetch_all(&four, later()).await.unwrap();
    assert_eq!(got.len(), 4);
    assert!(t.elapsed() < Duration::from_millis(1500), "not concurrent: {:?}", t.elapsed());
    assert_eq!(hits.load(Ordering::SeqCst), 2, "/img once and /big once");
}

/// A CA and a `localhost` server certificate signed by it.
fn pki() -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), server)
}

async fn https_server(tls: rustls::ServerConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let router = app(Arc::new(AtomicUsize::new(0)));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_fetched_with_the_given_certificate_authority() {
    let (ca_pem, server) = pki();
    let addr = https_server(server).await;
    let dir = std::env::temp_dir().join(format!("dsvl-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let port = addr.port().to_string();
    let common = [
        "--image-url-allow",
        "localhost",
        "--image-url-allow-internal",
        "--image-url-ports",
        &port,
    ];
    let url = format!("https://localhost:{port}/img");

    let mut with_ca = common.to_vec();
    with_ca.extend(["--image-url-ca-file", ca_file.to_str().unwrap()]);
    let c = config(&with_ca);
    let got =
        ImageFetcher::new(&c).unwrap().fetch(&RemoteImage::parse(&url, &c).unwrap(), later()).await;
    assert_eq!(got.unwrap().len(), 1000);

    // Without the CA the server is not trusted.
    let c = config(&common);
    let got =
        ImageFetcher::new(&c).unwrap().fetch(&RemoteImage::parse(&url, &c).unwrap(), later()).await;
    refused(got, "TLS");

    // Plain http to the TLS port is not an image either.
    let c = config(&with_ca);
    let plain = format!("http://localhost:{port}/img");
    assert!(ImageFetcher::new(&c)
        .unwrap()
        .fetch(&RemoteImage::parse(&plain, &c).unwrap(), later())
        .await
        .is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
