//! Mutual TLS end to end through tonic: a server from [`dsvl_tls::incoming`] answers clients
//! with a certificate from its authority and refuses the rest (no certificate, another
//! authority, plain text); when its files are replaced, new connections use the new ones.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dsvl_tls::dev_ca::LeafFiles;
use dsvl_tls::{
    client_config, connections, lazy_channel, server_config, server_name, ClientFiles,
    ConnectionLimits, DevCa, Reloading, ALPN_H2,
};
use tonic::transport::Endpoint;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsvl-mtls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn serve(files: &LeafFiles) -> (String, Reloading<rustls::ServerConfig>) {
    let server = files.server();
    let tls = Reloading::watch("server", server.paths(), Duration::from_millis(50), move || {
        server_config(&server, &[ALPN_H2])
    })
    .unwrap();
    let limits = ConnectionLimits { max_connections: 64, first_bytes: Duration::from_secs(2) };
    (serve_with(Some(tls.clone()), limits).await, tls)
}

/// A health server on a fresh port, TLS with `tls`; its address.
async fn serve_with(
    tls: Option<Reloading<rustls::ServerConfig>>,
    limits: ConnectionLimits,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let conns = connections(listener, tls, limits);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(conns)
            .await
            .unwrap()
    });
    addr
}

async fn check(addr: &str, client: Option<&ClientFiles>) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    let channel = match client {
        Some(files) => {
            let config = client_config(files, &[ALPN_H2]).map_err(|e| e.to_string())?;
            lazy_channel(endpoint, Reloading::fixed(config), server_name(addr).unwrap())
        }
        None => endpoint.connect_lazy(),
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn replace(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_of_the_authority_get_in_and_rotation_takes_effect() {
    // The server's and the client's files in directories of their own: rotating the server's
    // does not touch what the client trusts.
    let dir = temp_dir("rotate");
    let ca = DevCa::new("test CA").unwrap();
    let server = ca.write_leaf(&dir.join("server"), "server", &["127.0.0.1", "localhost"]).unwrap();
    let client = ca.write_leaf(&dir.join("client"), "client", &["client"]).unwrap();
    let (addr, _tls) = serve(&server).await;

    check(&addr, Some(&client.client())).await.expect("a client of the authority");
    let no_cert = ClientFiles { ca: client.ca.clone(), identity: None };
    assert!(check(&addr, Some(&no_cert)).await.is_err(), "no client certificate");
    assert!(check(&addr, None).await.is_err(), "plain text");
    let other = DevCa::new("other CA").unwrap();
    let stranger = other.write_leaf(&temp_dir("other"), "client", &["client"]).unwrap();
    let e = check(&addr, Some(&stranger.client())).await.expect_err("another authority");
    assert!(!e.is_empty());

    // The server's files now come from the other authority: new connections follow.
    let rotated = other.write_leaf(&temp_dir("rotated"), "server", &["127.0.0.1"]).unwrap();
    replace(&rotated.cert, &server.cert);
    replace(&rotated.key, &server.key);
    replace(&rotated.ca, &server.ca);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while check(&addr, Some(&stranger.client())).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the rotated files were not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old client fails on both counts: its certificate is from the old authority, and the
    // server's new certificate is not from the authority it trusts.
    assert!(check(&addr, Some(&client.client())).await.is_err(), "the old authority is gone");
    let trusts_old_only =
        ClientFiles { ca: client.ca.clone(), identity: stranger.client().identity };
    assert!(
        check(&addr, Some(&trusts_old_only)).await.is_err(),
        "the new server certificate was trusted"
    );
    for d in ["rotate", "other", "rotated"] {
        let _ = std::fs::remove_dir_all(temp_dir(d));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_up_others() {
    let dir = temp_dir("silent");
    let ca = DevCa::new("test CA").unwrap();
    let server = ca.write_leaf(&dir, "server", &["127.0.0.1"]).unwrap();
    let client = ca.write_leaf(&dir, "client", &["client"]).unwrap();
    let (addr, _tls) = serve(&server).await;
    let _silent: Vec<_> = (0..20).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let t = std::time::Instant::now();
    check(&addr, Some(&client.client())).await.expect("served beside silent connections");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_names_come_from_the_configured_host() {
    assert_eq!(
        format!("{:?}", server_name("dsvl-vision:50051").unwrap()),
        format!("{:?}", server_name("dsvl-vision").unwrap())
    );
    assert!(server_name("[::1]:50051").is_ok());
    assert!(server_name("127.0.0.1:1").is_ok());
    assert!(server_name("bad name:1").is_err());
}

/// Plain text too: at most `max_connections` are open, and one that sends nothing is closed
/// after `first_bytes`, so silent connections cannot keep the others out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_cut_and_the_count_is_bounded() {
    let limits = ConnectionLimits { max_connections: 3, first_bytes: Duration::from_millis(500) };
    let addr = serve_with(None, limits).await;
    // Two send nothing, one sends a byte of the HTTP/2 preface and stops.
    let mut silent: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    {
        use std::io::Write;
        silent[2].write_all(b"P").unwrap();
    }
    // All three slots are held: a real client waits in the backlog...
    let t = std::time::Instant::now();
    check(&addr, None).await.expect("served once a silent connection is cut");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "the client should wait for a slot, then get one: {waited:?}"
    );
    // ...and the silent ones were closed by the server.
    for mut s in silent {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(s.read(&mut buf), Ok(0)), "a silent connection is still open");
    }
}

/// `--tls-client-names`: of two clients with certificates from the same authority, only the
/// one valid for a listed name gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_names_narrow_who_may_call() {
    let dir = temp_dir("names");
    let ca = DevCa::new("test CA").unwrap();
    let server = ca.write_leaf(&dir.join("server"), "server", &["127.0.0.1"]).unwrap();
    let gateway = ca.write_leaf(&dir.join("gateway"), "gateway", &["dsvl-gateway"]).unwrap();
    let sibling = ca.write_leaf(&dir.join("sibling"), "sibling", &["dsvl-decoder"]).unwrap();
    let files =
        dsvl_tls::ServerFiles { client_names: vec!["dsvl-gateway".into()], ..server.server() };
    let config = server_config(&files, &[ALPN_H2]).unwrap();
    let limits = ConnectionLimits { max_connections: 64, first_bytes: Duration::from_secs(2) };
    let addr = serve_with(Some(Reloading::fixed(config)), limits).await;
    check(&addr, Some(&gateway.client())).await.expect("the named client");
    let e = check(&addr, Some(&sibling.client())).await.expect_err("same authority, other name");
    assert!(!e.is_empty());
    // Without names, the sibling is a client of the authority like any other.
    let (open, _tls) = serve(&server).await;
    check(&open, Some(&sibling.client())).await.expect("no names: any client of the authority");
    let bad = dsvl_tls::ServerFiles { client_names: vec!["not a name!".into()], ..server.server() };
    assert!(server_config(&bad, &[ALPN_H2]).is_err(), "an invalid client name is refused");
    let _ = std::fs::remove_dir_all(&dir);
}
