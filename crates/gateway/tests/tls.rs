//! TLS termination with rustls: HTTP/1.1 and HTTP/2 chosen by ALPN, certificates made with rcgen.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use support::*;

fn client(cert: CertificateDer<'static>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_alpn_h2_and_http1() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = temp_dir("tls");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let yaml = config_yaml(
        &[("up", sim.url())],
        "  - { id: t, path: \"/api/v1/market/ticker/{s}\", methods: [GET], service: up, public: true }\n",
    )
    .replace(
        "  shutdown_grace: 5s\n",
        &format!(
            "  shutdown_grace: 5s\n  tls: {{ cert: \"{}\", key: \"{}\" }}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let der = ck.cert.der().clone();

    // HTTP/2 by ALPN.
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let tls = client(der.clone(), &[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/api/v1/market/ticker/TLS").body(Empty::<Bytes>::new()).unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("TLS"));
    let rec = sim.requests().pop().unwrap();
    assert_eq!(rec.headers["x-forwarded-proto"], "https");

    // HTTP/1.1 by ALPN.
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let tls =
        client(der.clone(), &[b"http/1.1"]).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/api/v1/market/ticker/ONE")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);

    // Plain text on the TLS port is refused, never proxied.
    let before = sim.hits();
    let plain = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(plain)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/api/v1/market/ticker/X").header("host", "x").body(Empty::<Bytes>::new()).unwrap();
    assert!(tx.send_request(req).await.is_err());
    assert_eq!(sim.hits(), before);
}

#[tokio::test]
async fn bad_tls_material_refuses_to_start() {
    let dir = temp_dir("badtls");
    std::fs::write(dir.join("cert.pem"), "not a cert").unwrap();
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin_listen: \"\", tls: {{ cert: \"{0}/cert.pem\", key: \"{0}/key.pem\" }} }}\nservices:\n  up: {{ instances: [\"http://127.0.0.1:9\"] }}\nroutes:\n  - {{ id: t, path: /t, methods: [GET], service: up, public: true }}\n",
        dir.display()
    );
    let cfg = b25_gateway::config::parse(&yaml, "t.yaml", &|_: &str| None).unwrap();
    let err = b25_gateway::server::start(cfg, "t.yaml").await.err().expect("must refuse");
    assert!(err.to_string().contains("TLS"), "{err}");
}
