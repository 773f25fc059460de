//! Security over real sockets with tokens made here: the role matrix over the shipped route
//! table, JWT attacks, JWKS rotation, path-bypass variants, spoofed principal headers,
//! smuggling shapes, CORS, request validation and limits.

mod support;

use b25_gateway::config;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Method;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

async fn shipped() -> (HashMap<&'static str, b25_sim::SimServer>, TestGateway) {
    let sims = start_sims().await;
    let env = shipped_env(&sims);
    let gw = TestGateway::start(&shipped_yaml(), &env).await;
    (sims, gw)
}

fn total_hits(sims: &HashMap<&'static str, b25_sim::SimServer>) -> u64 {
    sims.values().map(|s| s.hits()).sum()
}

fn concrete(template: &str) -> String {
    template.replace("{symbol}", "BTCUSDT").replace("{id}", "ord-1").replace("{key}", "k1")
}

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 1,
        "operator" => 2,
        "admin" => 3,
        _ => 0,
    }
}

/// Sends raw bytes and reads the whole answer until the server closes (or `WAIT`).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> (u16, String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.is_ok();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_matrix_over_every_shipped_route() {
    let (sims, gw) = shipped().await;
    let vars: HashMap<_, _> = shipped_env(&sims).into_iter().collect();
    let cfg = config::parse(&shipped_yaml(), "gateway.yaml", &|n: &str| vars.get(n).cloned()).unwrap();
    let viewer = bearer(&token(&["viewer"]));
    let operator = bearer(&token(&["operator"]));
    let admin = bearer(&token(&["admin"]));
    // (name, header, rank of the principal)
    type Cred<'a> = (&'a str, Option<(&'a str, &'a str)>, u8);
    let creds: [Cred; 5] = [
        ("none", None, 0),
        ("viewer", Some(("authorization", viewer.as_str())), 1),
        ("operator", Some(("authorization", operator.as_str())), 2),
        ("admin", Some(("authorization", admin.as_str())), 3),
        ("api-key(operator)", Some(("x-api-key", TEST_API_KEY)), 2),
    ];
    for route in &cfg.routes {
        let sim = &sims[route.service.as_str()];
        let method = Method::from_bytes(route.methods[0].as_bytes()).unwrap();
        let path = concrete(&route.path);
        let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            r#"{"symbol":"BTCUSDT","side":"buy","quantity":1,"price":10}"#
        } else {
            ""
        };
        let least = route.roles.iter().map(|r| rank(r)).min().unwrap();
        for (name, cred, have) in creds {
            // no-cache: every request must reach the upstream for the hit count to mean something.
            let mut headers = vec![("content-type", "application/json"), ("cache-control", "no-cache")];
            if let Some(c) = cred {
                headers.push(c);
            }
            let before = sim.hits();
            let r = send(gw.addr(), method.clone(), &path, &headers, body).await;
            let allowed = cred.is_some() && have >= least;
            let what = format!("{} {} as {name}: {} {}", route.id, path, r.status, String::from_utf8_lossy(&r.body));
            if cred.is_none() {
                r.assert_error(401, "unauthenticated");
                assert!(r.headers.contains_key("www-authenticate"), "{what}");
            } else if !allowed {
                r.assert_error(403, "forbidden");
            } else {
                assert!(r.status != 401 && r.status != 403, "{what}");
                assert_eq!(r.headers.get("x-sim-service").unwrap(), route.service.as_str(), "{what}");
            }
            assert_eq!(sim.hits(), before + u64::from(allowed), "upstream hits for {what}");
            if allowed {
                let rec = sim.requests().pop().unwrap();
                let want_method = if name.starts_with("api-key") { "api_key" } else { "jwt" };
                assert_eq!(rec.headers["x-auth-method"], want_method, "{what}");
                assert!(!rec.headers.contains_key("x-api-key"), "the API key must not reach the upstream");
            }
        }
    }
}

fn raw_token(header: serde_json::Value, claims: &serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(serde_json::to_vec(&header).unwrap()),
        B64.encode(serde_json::to_vec(claims).unwrap()),
        B64.encode(sig)
    )
}

fn hs256_with_header(header: jsonwebtoken::Header, secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_attacks_get_401_and_never_reach_upstream() {
    let (sims, gw) = shipped().await;
    // A server the jku/x5u headers point at: it must never be contacted.
    let jku_hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let jh = jku_hits.clone();
    let jku = upstream(move |_req| {
        jh.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { http::Response::new(full_body(r#"{"keys":[]}"#)) }
    })
    .await;
    let c = claims("attacker", &["admin"], json!({}));
    let good = token(&["viewer"]);
    let mut attacks: Vec<(&str, String)> = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        attacks.push(("alg none", raw_token(json!({"alg": alg, "typ": "JWT"}), &c, b"")));
    }
    attacks.push(("alg none with signature", raw_token(json!({"alg": "none"}), &c, b"sig")));
    attacks.push(("wrong secret", hs256("another-secret-0123456789-0123456789-xyz", &c)));
    attacks.push(("expired", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"exp": now() - 60})))));
    attacks.push(("nbf in future", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"nbf": now() + 600})))));
    attacks.push(("iat in future", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"iat": now() + 600})))));
    attacks.push(("missing exp", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"exp": null})))));
    attacks.push(("wrong iss", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"iss": "evil"})))));
    attacks.push(("missing iss", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"iss": null})))));
    attacks.push(("wrong aud", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"aud": "other"})))));
    attacks.push(("missing sub", hs256(TEST_SECRET, &claims("u", &["admin"], json!({"sub": null})))));
    attacks.push(("HS384 not allowed", {
        let h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384);
        hs256_with_header(h, TEST_SECRET.as_bytes(), &c)
    }));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.jku = Some(format!("http://{jku}/jwks.json"));
    attacks.push(("jku header", hs256_with_header(h, TEST_SECRET.as_bytes(), &c)));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.x5u = Some(format!("http://{jku}/cert.pem"));
    attacks.push(("x5u header", hs256_with_header(h, TEST_SECRET.as_bytes(), &c)));
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.crit = Some(vec!["b25-ext".into()]);
    attacks.push(("unknown crit", hs256_with_header(h, TEST_SECRET.as_bytes(), &c)));
    // Tampered payload: a viewer token with its payload swapped for an admin one.
    let parts: Vec<&str> = good.split('.').collect();
    let forged = B64.encode(serde_json::to_vec(&claims("user-viewer", &["admin"], json!({}))).unwrap());
    attacks.push(("tampered payload", format!("{}.{}.{}", parts[0], forged, parts[2])));
    attacks.push(("truncated", parts[..2].join(".")));
    attacks.push(("1 MB token", format!("{}.{}.{}", parts[0], "A".repeat(1 << 20), parts[2])));
    attacks.push(("garbage", "not-a-jwt".into()));

    for (name, t) in &attacks {
        let auth = bearer(t);
        let r = send(gw.addr(), Method::POST, "/api/v1/risk/emergency-stop", &[("authorization", &auth)], "").await;
        assert_eq!(r.status, 401, "{name}: {}", String::from_utf8_lossy(&r.body));
        r.assert_error(401, "invalid_credentials");
        assert!(r.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"), "{name}");
    }
    // Non-Bearer schemes are not tokens.
    let r = send(gw.addr(), Method::GET, "/api/v1/risk/status", &[("authorization", "Basic YTpi")], "").await;
    r.assert_error(401, "invalid_credentials");
    assert_eq!(total_hits(&sims), 0, "no attack reached an upstream");
    assert_eq!(jku_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the jku/x5u URL was fetched");
    // The real thing still works, and the failure reasons are in the metrics.
    let ok = send(gw.addr(), Method::GET, "/api/v1/risk/status", &[("authorization", &bearer(&good))], "").await;
    assert_eq!(ok.status, 200);
    let m = String::from_utf8_lossy(&get(gw.handle.admin_addr().unwrap(), "/metrics").await.body).to_string();
    for reason in ["alg_none", "expired", "bad_signature", "wrong_audience", "forbidden_header", "token_too_large"] {
        assert!(
            m.contains(&format!("b25_gateway_auth_failures_total{{method=\"jwt\",reason=\"{reason}\"}}")),
            "{reason}: {m}"
        );
    }
    assert!(m.contains("b25_gateway_auth_attempts_total{method=\"jwt\"}"));
}

/// A JWKS server whose document the test can change or take down.
struct Jwks {
    addr: std::net::SocketAddr,
    doc: Arc<Mutex<Option<String>>>,
    hits: Arc<std::sync::atomic::AtomicU64>,
}

async fn jwks_server(doc: String) -> Jwks {
    let doc = Arc::new(Mutex::new(Some(doc)));
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (d, h) = (doc.clone(), hits.clone());
    let addr = upstream(move |_req| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = d.lock().unwrap().clone();
        async move {
            match body {
                Some(b) => http::Response::new(full_body(b)),
                None => http::Response::builder().status(503).body(full_body("down")).unwrap(),
            }
        }
    })
    .await;
    Jwks { addr, doc, hits }
}

struct EcKey {
    kid: String,
    pair: rcgen::KeyPair,
}

impl EcKey {
    fn new(kid: &str) -> Self {
        Self { kid: kid.into(), pair: rcgen::KeyPair::generate().unwrap() }
    }
    fn jwk(&self) -> serde_json::Value {
        let raw = self.pair.public_key_raw();
        json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
               "kid": self.kid, "alg": "ES256", "use": "sig"})
    }
    fn sign(&self, sub: &str, kid: Option<&str>) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = kid.map(String::from);
        let c = json!({"sub": sub, "roles": ["viewer"], "iss": "jwks-issuer", "aud": "b25-gateway", "iat": now(), "exp": now() + 600});
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&h, &c, &key).unwrap()
    }
}

fn jwks_doc(keys: &[&EcKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

fn two_issuer_yaml(sim: &str, rsa_pub: &std::path::Path, jwks: std::net::SocketAddr) -> String {
    format!(
        r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0" }}
logging: {{ level: warn }}
auth:
  jwt:
    issuers:
      - {{ issuer: rs-issuer, audiences: [b25-gateway], algorithms: [RS256], public_key_file: "{}" }}
      - {{ issuer: jwks-issuer, audiences: [b25-gateway], algorithms: [ES256], jwks_url: "http://{jwks}/jwks.json", jwks_min_refresh: 0s }}
services:
  up: {{ instances: ["{sim}"], health_check: {{ enabled: false }} }}
routes:
  - {{ id: t, path: "/api/v1/market/ticker/{{s}}", methods: [GET], service: up, roles: [viewer] }}
"#,
        rsa_pub.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_issuer_refuses_hs256_signed_with_its_public_key_and_unknown_kids() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let dir = temp_dir("rsa");
    let pub_pem = dir.join("pub.pem");
    std::fs::write(&pub_pem, rsa.public_key_pem()).unwrap();
    let k1 = EcKey::new("k1");
    let jwks = jwks_server(jwks_doc(&[&k1])).await;
    let gw = TestGateway::start(&two_issuer_yaml(&sim.url(), &pub_pem, jwks.addr), &[]).await;
    let rs_claims = json!({"sub": "rs-user", "roles": ["viewer"], "iss": "rs-issuer", "aud": "b25-gateway", "iat": now(), "exp": now() + 600});
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &rs_claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(rsa.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let path = "/api/v1/market/ticker/X";
    let r = send(gw.addr(), Method::GET, path, &[("authorization", &bearer(&good))], "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The classic confusion: HS256 with the RSA public key (as text) for the HMAC secret.
    let pem = rsa.public_key_pem();
    for secret in [pem.as_bytes(), pem.trim().as_bytes()] {
        let forged = hs256_with_header(jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), secret, &rs_claims);
        let r = send(gw.addr(), Method::GET, path, &[("authorization", &bearer(&forged))], "").await;
        r.assert_error(401, "invalid_credentials");
    }
    // Unknown kid on the JWKS issuer.
    let stranger = EcKey::new("k-unknown");
    let r =
        send(gw.addr(), Method::GET, path, &[("authorization", &bearer(&stranger.sign("x", Some("k-unknown"))))], "")
            .await;
    r.assert_error(401, "invalid_credentials");
    // A known kid signed by another key.
    let r =
        send(gw.addr(), Method::GET, path, &[("authorization", &bearer(&stranger.sign("x", Some("k1"))))], "").await;
    r.assert_error(401, "invalid_credentials");
    assert_eq!(sim.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_without_restart_and_last_good_keys_when_down() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let rsa = rcgen::KeyPair::generate().unwrap();
    let dir = temp_dir("jwks");
    let pub_pem = dir.join("pub.pem");
    std::fs::write(&pub_pem, rsa.public_key_pem()).unwrap();
    let k1 = EcKey::new("k1");
    let k2 = EcKey::new("k2");
    let jwks = jwks_server(jwks_doc(&[&k1])).await;
    // The RS issuer's file holds an EC key here; RS256 cannot use it, so refuse to start.
    let cfg = config::parse(&two_issuer_yaml(&sim.url(), &pub_pem, jwks.addr), "t.yaml", &|_: &str| None).unwrap();
    assert!(b25_gateway::server::start(cfg, "t.yaml").await.is_err(), "an EC key cannot serve RS256");

    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    std::fs::write(&pub_pem, rsa.public_key_pem()).unwrap();
    let gw = TestGateway::start(&two_issuer_yaml(&sim.url(), &pub_pem, jwks.addr), &[]).await;
    let path = "/api/v1/market/ticker/X";
    let call = |t: String| {
        let addr = gw.addr();
        async move { send(addr, Method::GET, path, &[("authorization", &bearer(&t))], "").await.status }
    };
    assert_eq!(call(k1.sign("a", Some("k1"))).await, 200);
    assert_eq!(call(k2.sign("b", Some("k2"))).await, 401, "k2 is not published yet");
    // Rotation: k2 appears at the URL and is accepted without a restart.
    *jwks.doc.lock().unwrap() = Some(jwks_doc(&[&k1, &k2]));
    let before = jwks.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(k2.sign("c", Some("k2"))).await, 200);
    assert!(jwks.hits.load(std::sync::atomic::Ordering::SeqCst) > before, "refreshed on the unknown kid");
    // The JWKS server goes down: the last good keys keep working (fresh tokens, no cache).
    *jwks.doc.lock().unwrap() = None;
    assert_eq!(call(k3_unknown()).await, 401, "an unknown kid while down");
    assert_eq!(call(k1.sign("d", Some("k1"))).await, 200);
    assert_eq!(call(k2.sign("e", Some("k2"))).await, 200);
}

/// "A failed fetch keeps the last good keys" holds across a reload too: the new snapshot starts
/// from the running one's keys for the same URL instead of none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_the_jwks_url_is_down_keeps_the_last_good_keys() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let dir = temp_dir("jwks-reload");
    let pub_pem = dir.join("pub.pem");
    std::fs::write(&pub_pem, rsa.public_key_pem()).unwrap();
    let k1 = EcKey::new("k1");
    let jwks = jwks_server(jwks_doc(&[&k1])).await;
    let file = dir.join("gw.yaml");
    let yaml = two_issuer_yaml(&sim.url(), &pub_pem, jwks.addr);
    std::fs::write(&file, &yaml).unwrap();
    let h = b25_gateway::server::start(config::load(&file).unwrap(), &file.display().to_string()).await.unwrap();
    h.ready().await;
    let path = "/api/v1/market/ticker/X";
    let call = |t: String| {
        let addr = h.addr();
        async move { send(addr, Method::GET, path, &[("authorization", &bearer(&t))], "").await.status }
    };
    assert_eq!(call(k1.sign("a", Some("k1"))).await, 200);
    // The JWKS URL goes down; an unrelated change is reloaded meanwhile.
    *jwks.doc.lock().unwrap() = None;
    std::fs::write(&file, yaml.replace("logging: { level: warn }", "logging: { level: warn, access_log: false }"))
        .unwrap();
    h.reload().await.expect("the reload itself is fine");
    assert_eq!(call(k1.sign("b", Some("k1"))).await, 200, "the reload dropped the last good keys");
    assert_eq!(call(k3_unknown()).await, 401);
}

/// A JWKS document served over HTTPS with a self-signed certificate for `localhost`: the
/// address, the certificate (PEM) and the number of requests served (after a good handshake).
async fn https_jwks_server(doc: String) -> (std::net::SocketAddr, String, Arc<std::sync::atomic::AtomicU64>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, doc, h) = (acceptor.clone(), doc.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = full_body(doc.clone());
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, ck.cert.pem(), hits)
}

/// An `https://` JWKS URL is fetched with the certificate verified against `jwks_ca_file`
/// (chain and name): keys come only over a connection to the right, trusted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_is_verified_against_the_configured_ca() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let k1 = EcKey::new("k1");
    let (addr, cert_pem, hits) = https_jwks_server(jwks_doc(&[&k1])).await;
    let dir = temp_dir("jwks-https");
    std::fs::write(dir.join("ca.pem"), cert_pem).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("other.pem"), other.cert.pem()).unwrap();
    let yaml = |host: &str, ca: &str| {
        format!(
            r#"server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0" }}
logging: {{ level: warn }}
auth:
  jwt:
    issuers:
      - {{ issuer: jwks-issuer, audiences: [b25-gateway], algorithms: [ES256], jwks_url: "https://{host}:{port}/jwks.json", jwks_ca_file: "{ca}", jwks_min_refresh: 0s }}
services:
  up: {{ instances: ["{sim}"], health_check: {{ enabled: false }} }}
routes:
  - {{ id: t, path: "/api/v1/market/ticker/{{s}}", methods: [GET], service: up, roles: [viewer] }}
"#,
            port = addr.port(),
            ca = dir.join(ca).display(),
            sim = sim.url(),
        )
    };
    let path = "/api/v1/market/ticker/X";
    let status = |gw: std::net::SocketAddr, t: String| async move {
        send(gw, Method::GET, path, &[("authorization", &bearer(&t))], "").await.status
    };
    let trusted = TestGateway::start(&yaml("localhost", "ca.pem"), &[]).await;
    assert_eq!(status(trusted.addr(), k1.sign("a", Some("k1"))).await, 200, "keys fetched over verified https");
    let served = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(served >= 1);
    // Another CA, or the right CA but a name the certificate does not carry: no key is loaded,
    // and the JWKS server never answers a request over such a connection.
    for (host, ca) in [("localhost", "other.pem"), ("127.0.0.1", "ca.pem")] {
        let gw = TestGateway::start(&yaml(host, ca), &[]).await;
        assert_eq!(status(gw.addr(), k1.sign("b", Some("k1"))).await, 401, "{host} with {ca}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), served);
    assert_eq!(sim.hits(), 1);
}

fn k3_unknown() -> String {
    EcKey::new("k3").sign("z", Some("k3"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_bypass_variants_never_reach_an_admin_upstream_with_a_viewer_token() {
    let (sims, gw) = shipped().await;
    let viewer = bearer(&token(&["viewer"]));
    let variants = [
        "/api/v1/risk/../risk/emergency-stop",
        "/api/v1/risk/./emergency-stop",
        "/api/v1//risk/emergency-stop",
        "/api/v1/%72isk/emergency-stop",
        "/api/v1/risk/%65mergency-stop",
        "/api/v1/risk/emergency-stop;x",
        "/api/v1/risk/emergency-stop;/",
        "/api/v1/risk/%2e%2e/risk/emergency-stop",
        "/api/v1/risk/%2E%2E/risk/emergency-stop",
        "/api/v1/risk/.%2e/risk/emergency-stop",
        "/api/v1/risk%2femergency-stop",
        "/api/v1/risk%2Femergency-stop",
        "/api/v1/risk%5cemergency-stop",
        "/api/v1/risk\\emergency-stop",
        "/api/v1/risk/emergency-stop%00",
        "/api/v1/risk/emergency-stop/",
        "/API/V1/RISK/EMERGENCY-STOP",
        "/api/v1/market/../risk/emergency-stop",
        "//api/v1/risk/emergency-stop",
        "/api/v1/risk/emergency-stop?next=../../admin",
        "/api/v1/risk/emergency-stop%3Fx",
        "/api/v1/risk/emergency-stop%23",
        "http://127.0.0.1/api/v1/risk/emergency-stop",
    ];
    for v in variants {
        let req = format!(
            "POST {v} HTTP/1.1\r\nHost: gw\r\nAuthorization: {viewer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let (status, text, _) = raw(gw.addr(), req.as_bytes()).await;
        assert!(matches!(status, 400 | 403 | 404 | 405), "{v}: {status}\n{text}");
    }
    assert_eq!(sims["risk-manager"].hits(), 0, "a variant reached the risk manager");
    assert_eq!(total_hits(&sims), 0);
    // The canonical path with an admin token does reach it (the matrix above is not vacuous).
    let admin = bearer(&token(&["admin"]));
    let r = send(gw.addr(), Method::POST, "/api/v1/%72isk/emergency-stop", &[("authorization", &admin)], "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(sims["risk-manager"].requests().pop().unwrap().uri.path(), "/api/v1/risk/emergency-stop");
}

/// Escapes that are not UTF-8 once decoded (overlong `.` and `/`, an overlong NUL, a
/// surrogate, truncated and impossible bytes) are refused even on a public catch-all route:
/// forwarded as they are, a lenient upstream decoder would read `%c0%ae%c0%ae` as `..`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_that_are_not_utf8_get_400_and_never_reach_the_upstream() {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let routes = "  - { id: pub, path: \"/pub/{*rest}\", methods: [GET], service: up, public: true }\n";
    let gw = TestGateway::start(&config_yaml(&[("up", sim.url())], routes), &[]).await;
    for v in [
        "/pub/%c0%ae%c0%ae/admin",
        "/pub/%C0%AE%C0%AE/admin",
        "/pub/%e0%80%ae%e0%80%ae/admin",
        "/pub/a%c0%afadmin",
        "/pub/a%c0%80",
        "/pub/%ed%a0%80",
        "/pub/%e2%82",
        "/pub/%ff",
        "/pub/%80",
        "/pub/%f8%80%80%80%ae",
    ] {
        let req = format!("GET {v} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        let (status, text, _) = raw(gw.addr(), req.as_bytes()).await;
        assert_eq!(status, 400, "{v}\n{text}");
        assert!(text.contains("\"bad_request\"") && text.contains("UTF-8"), "{v}\n{text}");
    }
    assert_eq!(sim.hits(), 0, "a path that is not UTF-8 reached the upstream");
    // Raw (unencoded) UTF-8 in the target is no URI (RFC 3986 §2): 400, in the path or the
    // query, a right-to-left override included.
    for v in ["/pub/caf\u{e9}", "/pub/\u{202e}x", "/pub/x?q=caf\u{e9}"] {
        let req = format!("GET {v} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        let (status, text, _) = raw(gw.addr(), req.as_bytes()).await;
        assert_eq!(status, 400, "{v}\n{text}");
        assert!(text.contains("percent-encode"), "{v}\n{text}");
    }
    assert_eq!(sim.hits(), 0, "a raw non-ASCII target reached the upstream");
    // Percent-encoded UTF-8 is forwarded, kept encoded with upper-case hex (RFC 3986 §6.2.2.1:
    // one spelling per path; the simulator has no such path: its 404).
    send(gw.addr(), Method::GET, "/pub/caf%c3%a9", &[], "").await;
    assert_eq!(sim.hits(), 1);
    assert_eq!(sim.requests().pop().unwrap().uri.path(), "/pub/caf%C3%A9");
}

/// A `Host` that is not `host[:port]` gets 400 (RFC 9112 §3.2) and is never copied into
/// `X-Forwarded-Host` for an upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_host_headers_get_400_and_never_reach_the_upstream() {
    let (sims, gw) = shipped().await;
    let viewer = bearer(&token(&["viewer"]));
    let req = |host: &str| {
        format!(
            "GET /api/v1/market/ticker/BTCUSDT HTTP/1.1\r\nHost: {host}\r\nAuthorization: {viewer}\r\nConnection: close\r\n\r\n"
        )
    };
    for host in ["a b", "evil/../x", "u@evil.example", "gw:8o", "a:b:c", "[::1", "gw\\x", "gw?x", "gw#x"] {
        let (status, text, _) = raw(gw.addr(), req(host).as_bytes()).await;
        assert_eq!(status, 400, "{host:?}: {text}");
        assert!(text.contains("invalid Host header"), "{host:?}: {text}");
    }
    assert_eq!(total_hits(&sims), 0, "a malformed Host reached an upstream");
    for host in ["gw:8080", "[::1]:443", ""] {
        let (status, text, _) = raw(gw.addr(), req(host).as_bytes()).await;
        assert_eq!(status, 200, "{host:?}: {text}");
    }
    for r in sims["market-data"].requests() {
        let xfh = r.headers.get("x-forwarded-host").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        assert!(["gw:8080", "[::1]:443", ""].contains(&xfh.as_str()), "{xfh:?} forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_principal_headers_never_reach_the_upstream() {
    let (sims, gw) = shipped().await;
    let viewer = bearer(&token(&["viewer"]));
    let r = send(
        gw.addr(),
        Method::GET,
        "/api/v1/risk/status",
        &[
            ("authorization", &viewer),
            ("x-auth-subject", "admin"),
            ("x-auth-roles", "admin"),
            ("x-auth-method", "api_key"),
            ("X-Auth-Subject", "root"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = sims["risk-manager"].requests().pop().unwrap();
    assert_eq!(rec.headers.get_all("x-auth-subject").iter().collect::<Vec<_>>(), ["user-viewer"]);
    assert_eq!(rec.headers.get_all("x-auth-roles").iter().collect::<Vec<_>>(), ["viewer"]);
    assert_eq!(rec.headers.get_all("x-auth-method").iter().collect::<Vec<_>>(), ["jwt"]);
    // On a public route they are removed, not passed on.
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gw2 = TestGateway::start(
        &config_yaml(
            &[("up", sim.url())],
            "  - { id: p, path: \"/api/v1/market/symbols\", methods: [GET], service: up, public: true }\n",
        ),
        &[],
    )
    .await;
    send(
        gw2.addr(),
        Method::GET,
        "/api/v1/market/symbols",
        &[("x-auth-subject", "admin"), ("x-auth-roles", "admin")],
        "",
    )
    .await;
    let rec = sim.requests().pop().unwrap();
    assert!(!rec.headers.contains_key("x-auth-subject") && !rec.headers.contains_key("x-auth-roles"));
    // Underscore spellings, which CGI/WSGI-style upstreams read as the dashed header, are
    // dropped (nginx's default); so are the framing ones.
    let req = "GET /api/v1/market/symbols HTTP/1.1\r\nHost: gw\r\nX_Auth_Subject: admin\r\nx_auth_roles: admin\r\n\
               Content_Length: 40\r\nTransfer_Encoding: chunked\r\nX-Fine: yes\r\nConnection: close\r\n\r\n";
    let (status, text, _) = raw(gw2.addr(), req.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let rec = sim.requests().pop().unwrap();
    let names: Vec<&str> = rec.headers.keys().map(|n| n.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains('_')), "{names:?}");
    assert!(names.contains(&"x-fine"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_get_400_close_and_no_upstream_hit() {
    let (sims, gw) = shipped().await;
    let op = bearer(&token(&["operator"]));
    let head = |extra: &str| {
        format!(
            "POST /api/v1/orders HTTP/1.1\r\nHost: gw\r\nAuthorization: {op}\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    let cases = [
        (
            "CL+TE",
            head("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n")
                + "0\r\n\r\nGET /api/v1/risk/status HTTP/1.1\r\nHost: gw\r\n\r\n",
        ),
        ("TE+CL", head("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n") + "0\r\n\r\n"),
        ("duplicate CL", head("Content-Length: 2\r\nContent-Length: 12\r\n") + "{}"),
        ("bad chunk size", head("Transfer-Encoding: chunked\r\n") + "zz\r\n{\"a\":1}\r\n0\r\n\r\n"),
        ("chunk size overflow", head("Transfer-Encoding: chunked\r\n") + "ffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
        ("TE gzip,chunked", head("Transfer-Encoding: gzip, chunked\r\n") + "2\r\n{}\r\n0\r\n\r\n"),
        (
            "TE chunked twice",
            head("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n") + "2\r\n{}\r\n0\r\n\r\n",
        ),
        ("negative CL", head("Content-Length: -1\r\n") + "{}"),
    ];
    for (name, req) in cases {
        let before = total_hits(&sims);
        let (status, text, closed) = raw(gw.addr(), req.as_bytes()).await;
        assert_eq!(total_hits(&sims), before, "{name} reached an upstream: {text}");
        assert_eq!(status, 400, "{name}: {text}");
        assert!(closed, "{name}: the connection must be closed");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{name}: a smuggled second request was answered: {text}");
    }
    assert_eq!(total_hits(&sims), 0, "a smuggling attempt reached an upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_matrix() {
    let (sims, gw) = shipped().await;
    let viewer = bearer(&token(&["viewer"]));
    let get_with = |origin: &'static str| {
        let viewer = viewer.clone();
        let addr = gw.addr();
        async move {
            send(addr, Method::GET, "/api/v1/market/symbols", &[("authorization", &viewer), ("origin", origin)], "")
                .await
        }
    };
    let ok = get_with(TEST_ORIGIN).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["access-control-allow-origin"], TEST_ORIGIN);
    assert_eq!(ok.headers["access-control-allow-credentials"], "true");
    assert!(ok.headers.get_all("vary").iter().any(|v| v.to_str().unwrap().contains("Origin")));
    // By default a dashboard script may read the request id and its rate-limit budget.
    let exposed = ok.headers["access-control-expose-headers"].to_str().unwrap().to_string();
    for h in ["x-request-id", "retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(exposed.split(", ").any(|e| e == h), "{h} not in {exposed}");
    }
    for evil in [
        "https://evil.example",
        "null",
        "https://dashboard.b25.example.evil.com",
        "https://evildashboard.b25.example",
        "http://dashboard.b25.example",
        "https://dashboard.b25.example:444",
    ] {
        let r = get_with(evil).await;
        assert!(!r.headers.contains_key("access-control-allow-origin"), "{evil} got CORS access");
        assert!(!r.headers.contains_key("access-control-allow-credentials"), "{evil}");
    }
    let hits = total_hits(&sims);
    let preflight = |origin: &'static str, with_auth: bool| {
        let viewer = viewer.clone();
        let addr = gw.addr();
        async move {
            let mut h = vec![
                ("origin", origin),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "authorization, content-type"),
            ];
            if with_auth {
                h.push(("authorization", viewer.as_str()));
            }
            send(addr, Method::OPTIONS, "/api/v1/orders", &h, "").await
        }
    };
    for with_auth in [false, true] {
        let p = preflight(TEST_ORIGIN, with_auth).await;
        assert_eq!(p.status, 204, "preflight answered without requiring auth");
        assert_eq!(p.headers["access-control-allow-origin"], TEST_ORIGIN);
        assert!(p.headers["access-control-allow-methods"].to_str().unwrap().contains("POST"));
        assert!(p.headers["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
        assert!(p.headers.contains_key("access-control-max-age"));
    }
    let p = preflight("https://evil.example", false).await;
    p.assert_error(403, "cors_origin_not_allowed");
    assert!(!p.headers.contains_key("access-control-allow-origin"));
    let p = preflight("null", false).await;
    assert_eq!(p.status, 403);
    assert_eq!(total_hits(&sims), hits, "preflights never reach an upstream");
    // Errors readable by the allowed origin (a browser must see the 401 body).
    let r = send(gw.addr(), Method::GET, "/api/v1/market/symbols", &[("origin", TEST_ORIGIN)], "").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["access-control-allow-origin"], TEST_ORIGIN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_cors_headers_never_reach_a_disallowed_origin() {
    // A permissive upstream: `*`, or the caller's origin echoed, with credentials and the rest.
    let up = upstream(|req: http::Request<hyper::body::Incoming>| {
        let origin = req.headers().get("origin").cloned();
        let echo = req.uri().path() == "/echo";
        async move {
            let mut r = http::Response::builder()
                .header("access-control-allow-credentials", "true")
                .header("access-control-expose-headers", "x-secret")
                .header("access-control-allow-methods", "GET, POST, DELETE")
                .header("access-control-allow-headers", "*")
                .header("access-control-max-age", "86400")
                .header("content-type", "application/json");
            r = match (echo, origin) {
                (true, Some(o)) => r.header("access-control-allow-origin", o),
                _ => r.header("access-control-allow-origin", "*"),
            };
            r.body(full_body("{}")).unwrap()
        }
    })
    .await;
    let mut yaml = config_yaml(
        &[("up", format!("http://{up}"))],
        "  - { id: star, path: \"/star\", methods: [GET], service: up, public: true }\n  - { id: echo, path: \"/echo\", methods: [GET], service: up, public: true }\n",
    );
    yaml.push_str(&format!("cors: {{ allowed_origins: [\"{TEST_ORIGIN}\"], exposed_headers: [x-request-id] }}\n"));
    let gw = TestGateway::start(&yaml, &[]).await;
    let upstream_only = [
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-max-age",
    ];
    for path in ["/star", "/echo"] {
        for origin in [Some("https://evil.example"), Some("null"), None] {
            let h: Vec<(&str, &str)> = origin.iter().map(|o| ("origin", *o)).collect();
            let r = send(gw.addr(), Method::GET, path, &h, "").await;
            assert_eq!(r.status, 200);
            for name in upstream_only.iter().chain(&["access-control-expose-headers"]) {
                assert!(!r.headers.contains_key(*name), "{path} from {origin:?}: the upstream's {name} got through");
            }
        }
        // The allowed origin gets the gateway's answer, not the upstream's.
        let r = send(gw.addr(), Method::GET, path, &[("origin", TEST_ORIGIN)], "").await;
        assert_eq!(r.headers["access-control-allow-origin"], TEST_ORIGIN, "{path}");
        assert_eq!(r.headers["access-control-expose-headers"], "x-request-id", "{path}");
        for name in upstream_only.iter().skip(1) {
            assert!(!r.headers.contains_key(*name), "{path}: the upstream's {name} got through");
        }
    }
}

const VALIDATION_ROUTES: &str = "  - { id: v, path: \"/v\", methods: [POST], service: up, public: true, max_body: 1KiB, content_types: [application/json], required_headers: [x-client-id], json: true, max_json_depth: 4 }\n  - { id: s, path: \"/s\", methods: [POST], service: up, public: true, max_body: 1KiB }\n";

async fn validation_gateway() -> (b25_sim::SimServer, TestGateway) {
    let sim = b25_sim::start(b25_sim::Service::MarketData, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let yaml = config_yaml(&[("up", sim.url())], VALIDATION_ROUTES).replace(
        "  shutdown_grace: 5s\n",
        "  shutdown_grace: 5s\n  limits: { max_headers: 20, max_uri_length: 256, max_header_bytes: 8KiB, body_idle_timeout: 300ms }\n",
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    (sim, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_validation_statuses() {
    let (sim, gw) = validation_gateway().await;
    let json_h = [("content-type", "application/json"), ("x-client-id", "c1")];
    send(gw.addr(), Method::POST, "/v", &[("content-type", "text/plain"), ("x-client-id", "c1")], "{}")
        .await
        .assert_error(415, "unsupported_media_type");
    send(gw.addr(), Method::POST, "/v", &[("content-type", "application/json")], "{}")
        .await
        .assert_error(400, "bad_request");
    send(gw.addr(), Method::POST, "/v", &json_h, "{\"a\":").await.assert_error(400, "bad_request");
    send(gw.addr(), Method::POST, "/v", &json_h, "[[[[[1]]]]]").await.assert_error(400, "bad_request");
    // JSON is UTF-8: a stray byte inside a string is not JSON.
    send(gw.addr(), Method::POST, "/v", &json_h, &b"{\"a\":\"\xff\"}"[..]).await.assert_error(400, "bad_request");
    // Two Content-Type headers: the gateway would check one, the upstream might read the other.
    send(
        gw.addr(),
        Method::POST,
        "/v",
        &[("content-type", "application/json"), ("content-type", "text/plain"), ("x-client-id", "c1")],
        "{}",
    )
    .await
    .assert_error(400, "bad_request");
    send(gw.addr(), Method::POST, "/s", &[("content-type", "a/b"), ("content-type", "c/d")], "x")
        .await
        .assert_error(400, "bad_request");
    send(gw.addr(), Method::POST, "/v", &json_h, vec![b' '; 2048]).await.assert_error(413, "payload_too_large");
    assert_eq!(sim.hits(), 0);
    let ok = send(gw.addr(), Method::POST, "/v", &json_h, "{\"a\":[1,{\"b\":2}]}").await;
    assert_eq!(ok.headers["x-sim-service"], "market-data");
    assert_eq!(sim.hits(), 1);
    assert_eq!(sim.requests().pop().unwrap().body, "{\"a\":[1,{\"b\":2}]}");

    // Header count, header bytes, URI length.
    let many: Vec<(String, String)> = (0..30).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    send(gw.addr(), Method::POST, "/s", &many_ref, "").await.assert_error(431, "headers_too_large");
    let big = "x".repeat(9 * 1024);
    send(gw.addr(), Method::POST, "/s", &[("x-big", &big)], "").await.assert_error(431, "headers_too_large");
    let long = format!("/s?{}", "q".repeat(300));
    send(gw.addr(), Method::POST, &long, &[], "").await.assert_error(414, "uri_too_long");
    assert_eq!(sim.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_past_the_limit_is_413_without_reading_the_rest() {
    let (sim, gw) = validation_gateway().await;
    // JSON route: the body is read (bounded) before the upstream is contacted.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Client-Id: c\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for _ in 0..3 {
        s.write_all(format!("200\r\n{}\r\n", " ".repeat(0x200)).as_bytes()).await.unwrap();
    }
    // No terminating chunk: the gateway must answer without waiting for the rest.
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("answered and closed").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"));
    assert_eq!(sim.hits(), 0);
    // Streaming route: the same, the upstream never gets a complete request.
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /s HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for _ in 0..3 {
        let _ = s.write_all(format!("200\r\n{}\r\n", "a".repeat(0x200)).as_bytes()).await;
    }
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("answered and closed").unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 413"), "{}", String::from_utf8_lossy(&buf));
    assert!(sim.requests().iter().all(|r| r.body.len() <= 1024), "an oversized body reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_408() {
    let (sim, gw) = validation_gateway().await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Client-Id: c\r\nContent-Length: 100\r\n\r\n{\"a\":").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("the gateway gives up on a stalled body").unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"));
    assert_eq!(sim.hits(), 0);
}

#[test]
fn config_safety_refusals() {
    let route = "routes:\n  - { id: r, path: /r, methods: [GET], service: up, roles: [viewer] }\n";
    let svc = "services:\n  up: { instances: [\"http://127.0.0.1:9\"] }\n";
    let parse =
        |y: String| config::parse(&y, "t.yaml", &|_: &str| None).err().map(|e| e.to_string()).unwrap_or_default();
    // No auth configured and not public.
    assert!(parse(format!("{svc}{route}")).contains("needs authentication"));
    // Short HS secret (and it is not echoed).
    let short = format!(
        "auth:\n  jwt:\n    issuers:\n      - {{ issuer: i, audiences: [a], algorithms: [HS256], secret: tooshort-secret }}\n{svc}{route}"
    );
    let out = parse(short);
    assert!(out.contains("at least 32 bytes"), "{out}");
    assert!(!out.contains("tooshort-secret"), "secret leaked: {out}");
    // `none` in the allow-list.
    let none = format!(
        "auth:\n  jwt:\n    issuers:\n      - {{ issuer: i, audiences: [a], algorithms: [HS256, none], secret: 0123456789abcdef0123456789abcdef01 }}\n{svc}{route}"
    );
    assert!(parse(none).contains("\"none\" is never allowed"));
    // HS with a public key: confusion refused.
    let hs_pub = format!(
        "auth:\n  jwt:\n    issuers:\n      - {{ issuer: i, audiences: [a], algorithms: [HS256], public_key_file: /etc/hostname }}\n{svc}{route}"
    );
    assert!(parse(hs_pub).contains("HS algorithms need a secret"));
    // CORS * with credentials (checked when the snapshot is built, as `check` does).
    let cors = format!(
        "auth:\n  api_keys: {{ keys: [] }}\ncors: {{ allowed_origins: [\"*\"], allow_credentials: true }}\n{svc}{route}"
    );
    let cfg = config::parse(&cors, "t.yaml", &|_: &str| None).unwrap();
    let errs = b25_gateway::snapshot::Snapshot::build(cfg).err().unwrap();
    assert!(
        errs.iter().any(|e| e.path == "cors.allowed_origins" && e.message.contains("allow_credentials")),
        "{errs:?}"
    );
    // Principal headers may not take a name the gateway sets or strips, nor share one.
    let principal = |names: &str| {
        let yaml = format!("auth:\n  api_keys: {{ keys: [] }}\n  principal_headers: {{ {names} }}\n{svc}{route}");
        let cfg = config::parse(&yaml, "t.yaml", &|_: &str| None).unwrap();
        b25_gateway::snapshot::Snapshot::build(cfg).err().unwrap_or_default()
    };
    for reserved in ["X-Forwarded-For", "x-request-id", "host", "traceparent", "connection"] {
        let errs = principal(&format!("subject: {reserved}"));
        assert!(
            errs.iter().any(|e| e.path == "auth.principal_headers.subject" && e.message.contains("gateway itself")),
            "{reserved}: {errs:?}"
        );
    }
    let errs = principal("subject: x-who, roles: x-who");
    assert!(errs.iter().any(|e| e.path == "auth.principal_headers"), "{errs:?}");
    let errs = principal("subject: x-api-key");
    assert!(errs.iter().any(|e| e.path == "auth.principal_headers"), "{errs:?}");
    assert!(principal("subject: x-user, roles: x-user-roles, method: x-user-auth").is_empty());
}

#[test]
fn secrets_never_in_check_output_or_debug() {
    let secret = "super-secret-value-0123456789-abcdefghij";
    let yaml = format!(
        "auth:\n  jwt:\n    issuers:\n      - {{ issuer: i, audiences: [a], algorithms: [HS256], secret: \"{secret}\" }}\nservices:\n  up: {{ instances: [\"http://127.0.0.1:9\"] }}\nroutes:\n  - {{ id: r, path: /r, methods: [GET], service: up, roles: [viewer] }}\n"
    );
    let cfg = config::parse(&yaml, "t.yaml", &|_: &str| None).unwrap();
    assert!(!format!("{cfg:?}").contains(secret));
    assert!(!cfg.summary().contains(secret));
    let dir = temp_dir("secret");
    std::fs::write(dir.join("g.yaml"), &yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .arg("check")
        .arg(dir.join("g.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains(secret), "{all}");
}

#[test]
fn hash_key_prints_the_sha256_of_stdin() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"my-new-key\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), b25_gateway::auth::apikey::hash_hex("my-new-key"));
    let generated = std::process::Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .args(["hash-key", "--generate"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&generated.stdout).to_string();
    let key = text.lines().find_map(|l| l.strip_prefix("key:")).unwrap().trim();
    let hash = text.lines().find_map(|l| l.strip_prefix("sha256:")).unwrap().trim();
    assert_eq!(b25_gateway::auth::apikey::hash_hex(key), hash);
}
