//! JWT verification: explicit algorithm allow-lists per issuer, keys from a secret, a PEM file,
//! a JWKS file or a JWKS URL (background refresh, refresh on unknown `kid`, keep last good).
//!
//! Refused always, before any signature work: tokens over the size limit, `alg: none` in any
//! case, an algorithm not allowed for the issuer or not matching the key's family (no HS/RS
//! confusion), a `crit` header (no extension is understood), and `jku`, `x5u`, `jwk` or `x5c`
//! headers (keys named by the token are never fetched or trusted). `exp` is required; `nbf`,
//! `iat` (not in the future beyond the leeway), `iss` and `aud` are checked.
//!
//! Verified tokens are cached (bounded, keyed by the whole token, valid until `exp`) so an
//! RS256 signature is not re-verified on every request.

use super::roles::{RoleModel, RoleSet};
use super::{AuthFailure, Principal};
use crate::config::security::{IssuerConfig, JwtConfig};
use crate::config::{AuthMethod, ConfigError};
use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{JwkSet, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Keys tried for a token without `kid` (bounds the work a crafted token can cause).
const MAX_KEYS_WITHOUT_KID: usize = 4;

struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
}

struct JwksSource {
    url: hyper::Uri,
    /// For an `https://` URL: the client TLS settings (the trusted CAs).
    tls: Option<tokio_rustls::TlsConnector>,
    refresh: Duration,
    min_refresh: Duration,
    timeout: Duration,
    last_fetch_ms: AtomicU64,
    fetch_lock: tokio::sync::Mutex<()>,
}

struct Issuer {
    iss: String,
    validations: Vec<(Algorithm, Validation)>,
    keys: ArcSwap<KeySet>,
    jwks: Option<JwksSource>,
}

/// Verifies bearer tokens for one config snapshot.
pub struct JwtVerifier {
    issuers: Vec<Arc<Issuer>>,
    leeway: u64,
    max_size: usize,
    roles_claim: String,
    cache: Option<quick_cache::sync::Cache<Box<str>, Arc<Principal>>>,
    roles: Arc<RoleModel>,
    /// Forward `Authorization` upstream.
    pub forward_token: bool,
    rate_claim: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("issuers", &self.issuers.len()).finish_non_exhaustive()
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Parses an algorithm name of the allow-list (`none` and unknown names are errors).
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err("\"none\" is never allowed".into());
    }
    Algorithm::from_str(name).map_err(|_| format!("unknown algorithm {name:?}"))
}

impl JwtVerifier {
    /// Builds the verifier; reads PEM and JWKS files. JWKS URLs are fetched by
    /// [`start_background`](Self::start_background).
    pub fn new(
        cfg: &JwtConfig,
        roles: Arc<RoleModel>,
        rate_claim: Option<String>,
        errors: &mut Vec<ConfigError>,
    ) -> Self {
        let leeway = cfg.leeway.get().as_secs();
        let mut issuers = Vec::new();
        for (i, ic) in cfg.issuers.iter().enumerate() {
            let p = format!("auth.jwt.issuers[{i}]");
            match Issuer::new(ic, leeway) {
                Ok(iss) => issuers.push(Arc::new(iss)),
                Err(e) => errors.push(ConfigError::new(p, e)),
            }
        }
        let cache = (cfg.cache_size > 0).then(|| quick_cache::sync::Cache::new(cfg.cache_size));
        Self {
            issuers,
            leeway,
            max_size: cfg.max_token_size.bytes() as usize,
            roles_claim: cfg.roles_claim.clone(),
            cache,
            roles,
            forward_token: cfg.forward_token,
            rate_claim,
        }
    }

    /// Takes the keys `prev` (the running snapshot's verifier) holds for each JWKS URL that this
    /// one fetches too (same issuer, same URL): the last good keys survive a reload during an
    /// outage of the URL ("a failed fetch keeps the last good keys").
    pub fn inherit_jwks_keys(&self, prev: &JwtVerifier) {
        for iss in &self.issuers {
            let Some(src) = &iss.jwks else { continue };
            let same =
                prev.issuers.iter().find(|p| p.iss == iss.iss && p.jwks.as_ref().is_some_and(|ps| ps.url == src.url));
            if let Some(p) = same {
                iss.keys.store(p.keys.load_full());
            }
        }
    }

    /// Fetches every JWKS URL once, then keeps refreshing in the background for as long as
    /// this verifier (its snapshot) lives.
    pub async fn start_background(self: &Arc<Self>) {
        for iss in &self.issuers {
            if iss.jwks.is_some() {
                iss.refresh(true).await;
                let weak: Weak<Issuer> = Arc::downgrade(iss);
                let period = iss.jwks.as_ref().map(|j| j.refresh).unwrap_or(Duration::from_secs(300));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(period);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let Some(iss) = weak.upgrade() else { return };
                        iss.refresh(true).await;
                    }
                });
            }
        }
    }

    /// Verifies `token` and returns its principal.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthFailure> {
        if token.len() > self.max_size {
            return Err(AuthFailure::invalid("token_too_large"));
        }
        if let Some(cache) = &self.cache
            && let Some(p) = cache.get(token)
            && p.exp.is_some_and(|exp| exp + self.leeway > now())
        {
            return Ok(p);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(payload), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthFailure::invalid("malformed"));
        };
        let header = decode_segment(h).ok_or(AuthFailure::invalid("malformed"))?;
        let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(AuthFailure::invalid("alg_none"));
        }
        if header.contains_key("crit") {
            return Err(AuthFailure::invalid("crit_header"));
        }
        if ["jku", "x5u", "jwk", "x5c"].iter().any(|k| header.contains_key(*k)) {
            return Err(AuthFailure::invalid("forbidden_header"));
        }
        let alg = Algorithm::from_str(alg_name).map_err(|_| AuthFailure::invalid("alg_not_allowed"))?;
        let kid = header.get("kid").and_then(Value::as_str);

        let issuer = if self.issuers.len() == 1 {
            &self.issuers[0]
        } else {
            let claims = decode_segment(payload).ok_or(AuthFailure::invalid("malformed"))?;
            let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
            self.issuers.iter().find(|i| i.iss == iss).ok_or(AuthFailure::invalid("wrong_issuer"))?
        };
        let validation = issuer
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(AuthFailure::invalid("alg_not_allowed"))?;

        let mut keys = issuer.keys.load_full();
        if let Some(kid) = kid
            && issuer.jwks.is_some()
            && !keys.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
        {
            issuer.refresh(false).await;
            keys = issuer.keys.load_full();
        }
        let candidates: Vec<&Key> = keys
            .keys
            .iter()
            .filter(|k| match (kid, &k.kid) {
                // A key without a kid (a secret or PEM file) serves any kid the token names.
                (Some(kid), Some(key_kid)) => key_kid == kid,
                _ => true,
            })
            .filter(|k| k.key.family() == alg.family() && k.alg.is_none_or(|a| a == alg))
            .take(MAX_KEYS_WITHOUT_KID)
            .collect();
        if candidates.is_empty() {
            return Err(AuthFailure::invalid(if kid.is_some() { "unknown_kid" } else { "no_key" }));
        }
        let mut last = AuthFailure::invalid("bad_signature");
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.accept(token, data.claims),
                Err(e) => {
                    last = AuthFailure::invalid(match e.kind() {
                        JwtErrorKind::ExpiredSignature => "expired",
                        JwtErrorKind::ImmatureSignature => "not_yet_valid",
                        JwtErrorKind::InvalidIssuer => "wrong_issuer",
                        JwtErrorKind::InvalidAudience => "wrong_audience",
                        JwtErrorKind::MissingRequiredClaim(_) => "missing_claim",
                        JwtErrorKind::InvalidSignature => "bad_signature",
                        JwtErrorKind::InvalidAlgorithm => "alg_not_allowed",
                        _ => "invalid",
                    });
                    if !matches!(e.kind(), JwtErrorKind::InvalidSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn accept(&self, token: &str, claims: Map<String, Value>) -> Result<Arc<Principal>, AuthFailure> {
        let now = now();
        if claims.get("iat").and_then(Value::as_f64).is_some_and(|iat| iat > (now + self.leeway) as f64) {
            return Err(AuthFailure::invalid("iat_in_future"));
        }
        let exp = claims.get("exp").and_then(Value::as_f64).map(|e| e as u64);
        let roles = match claims.get(&self.roles_claim) {
            Some(Value::Array(a)) => self.roles.principal(a.iter().filter_map(Value::as_str)),
            Some(Value::String(s)) => self.roles.principal(s.split_whitespace()),
            _ => RoleSet::default(),
        };
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(AuthFailure::invalid("missing_claim"))?;
        let mut p = Principal::new(subject, roles, &self.roles, AuthMethod::Jwt, exp);
        if let Some(claim) = &self.rate_claim {
            match claims.get(claim) {
                Some(Value::String(s)) => p.rate_key = s.as_str().into(),
                Some(Value::Number(n)) => p.rate_key = n.to_string().into(),
                _ => {}
            }
        }
        p.claims = Some(Arc::new(claims));
        let p = Arc::new(p);
        if let Some(cache) = &self.cache {
            cache.insert(token.into(), p.clone());
        }
        Ok(p)
    }
}

fn decode_segment(seg: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(seg.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Issuer {
    fn new(ic: &IssuerConfig, leeway: u64) -> Result<Self, String> {
        let mut algs = Vec::new();
        for a in &ic.algorithms {
            algs.push(parse_algorithm(a)?);
        }
        let sources =
            [ic.secret.is_some(), ic.public_key_file.is_some(), ic.jwks_file.is_some(), ic.jwks_url.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
        if sources != 1 {
            return Err("exactly one of secret, public_key_file, jwks_file, jwks_url is required".into());
        }
        let mut keys = KeySet::default();
        if let Some(secret) = &ic.secret {
            keys.keys.push(Key { kid: None, alg: None, key: DecodingKey::from_secret(secret.expose().as_bytes()) });
        }
        if let Some(path) = &ic.public_key_file {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| format!("{}: not an RSA, EC or Ed25519 public key in PEM", path.display()))?;
            keys.keys.push(Key { kid: None, alg: None, key });
        }
        if let Some(path) = &ic.jwks_file {
            let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            keys = parse_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        for k in &keys.keys {
            if !algs.iter().any(|a| a.family() == k.key.family()) {
                return Err("no allowed algorithm fits the configured key (e.g. HS256 with a public key)".into());
            }
        }
        let mut validations = Vec::new();
        for alg in algs {
            let mut v = Validation::new(alg);
            v.leeway = leeway;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.set_issuer(&[&ic.issuer]);
            v.set_audience(&ic.audiences);
            // `sub` is required: private cache entries, idempotency records and per-principal
            // limits are keyed by it, so tokens without one must not share a principal.
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validations.push((alg, v));
        }
        let jwks = match &ic.jwks_url {
            Some(url) => {
                let uri: hyper::Uri = url.parse().map_err(|e| format!("jwks_url: {e}"))?;
                if uri.host().is_none_or(str::is_empty) {
                    return Err("jwks_url: no host".into());
                }
                let tls = match uri.scheme_str() {
                    Some("http") => None,
                    Some("https") => Some(jwks_tls(ic.jwks_ca_file.as_deref())?),
                    _ => return Err("jwks_url: must be an http:// or https:// URL".into()),
                };
                Some(JwksSource {
                    url: uri,
                    tls,
                    refresh: ic.jwks_refresh.get(),
                    min_refresh: ic.jwks_min_refresh.get(),
                    timeout: ic.jwks_timeout.get(),
                    last_fetch_ms: AtomicU64::new(0),
                    fetch_lock: tokio::sync::Mutex::new(()),
                })
            }
            None => None,
        };
        Ok(Self { iss: ic.issuer.clone(), validations, keys: ArcSwap::from_pointee(keys), jwks })
    }

    /// Fetches the JWKS; `scheduled` refreshes always run, others (unknown `kid`) at most once
    /// per `min_refresh`. A failed fetch keeps the last good keys.
    async fn refresh(&self, scheduled: bool) {
        let Some(src) = &self.jwks else { return };
        let _guard = src.fetch_lock.lock().await;
        let now_ms = crate::unix_ms();
        let last = src.last_fetch_ms.load(Ordering::Relaxed);
        if !scheduled && last != 0 && now_ms.saturating_sub(last) < src.min_refresh.as_millis() as u64 {
            return;
        }
        src.last_fetch_ms.store(now_ms, Ordering::Relaxed);
        match tokio::time::timeout(src.timeout, fetch(src)).await {
            Ok(Ok(set)) => {
                tracing::info!(issuer = %self.iss, keys = set.keys.len(), "JWKS loaded");
                self.keys.store(Arc::new(set));
            }
            Ok(Err(e)) => {
                tracing::warn!(issuer = %self.iss, error = %e, "JWKS fetch failed; keeping the last good keys")
            }
            Err(_) => tracing::warn!(issuer = %self.iss, "JWKS fetch timed out; keeping the last good keys"),
        }
    }
}

/// Where the system's CA bundle usually is: Debian/Ubuntu/Alpine, RHEL/Fedora, SUSE, and
/// Alpine/BSD/macOS, after `SSL_CERT_FILE` (the variable OpenSSL and rustls-native-certs read).
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The TLS client settings of an `https://` JWKS URL: the CAs of `ca_file`, or of the system's
/// bundle when none is configured. HTTP/1.1 only; certificates are verified (name and chain).
fn jwks_tls(ca_file: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = match ca_file {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .or_else(|| SYSTEM_CA_BUNDLES.iter().map(std::path::PathBuf::from).find(|p| p.is_file()))
            .ok_or(
                "jwks_url: no CA bundle to verify https with (install ca-certificates, set SSL_CERT_FILE, or set jwks_ca_file)",
            )?,
    };
    let what = if ca_file.is_some() { "jwks_ca_file" } else { "jwks_url: the system CA bundle" };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{what} {}: no CA certificate in PEM", path.display()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// One GET of the JWKS on a new connection (fetches are minutes apart: nothing to pool).
async fn fetch(src: &JwksSource) -> Result<KeySet, String> {
    let url = &src.url;
    let host = url.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_u16().unwrap_or(if src.tls.is_some() { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((bare, port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let body = match &src.tls {
        Some(tls) => {
            let name = rustls_pki_types::ServerName::try_from(bare.to_string()).map_err(|e| format!("{host}: {e}"))?;
            let stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
            get_body(stream, url).await?
        }
        None => get_body(tcp, url).await?,
    };
    parse_jwks(&body)
}

/// Sends `GET url` on `io` (HTTP/1.1) and reads a 2xx answer's body, at most [`MAX_JWKS_BYTES`].
async fn get_body<I>(io: I, url: &hyper::Uri) -> Result<Bytes, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    let request = async move {
        let req = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string())
        // `tx` dropped here: the connection below then ends.
    };
    // The connection is driven here, not spawned: a fetch that times out leaves nothing behind.
    let (body, _) = tokio::join!(request, conn);
    body
}

fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("invalid JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        // Only keys meant for verifying signatures (RFC 7517 §4.2–4.4): `use` other than `sig`,
        // `key_ops` without `verify`, or an `alg` that is not a signature algorithm (e.g.
        // `RSA-OAEP-256`) make an encryption key, which must never verify a token.
        let common = &jwk.common;
        if common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature)
            || common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
        {
            continue;
        }
        let alg = match common.key_algorithm {
            Some(a) => match Algorithm::try_from(a) {
                Ok(alg) => Some(alg),
                Err(_) => continue,
            },
            None => None,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        keys.push(Key { kid: common.key_id.clone(), alg, key });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable key".into());
    }
    Ok(KeySet { keys })
}

#[cfg(test)]
mod tests {
    use super::parse_jwks;

    const N: &str = "2PZjANYDXh4HcnHKMrOQlP5TMJWOyS6yQWUxAP8fzmdIOxemsEzcsgP3Liu2mRquk7Pk0A6jT_5Prc47-pY_3Dm_VgCXdGsc_B0tj-vKPV-HxXyyBAvMKabx4Oyu0hsqDAisuZsz4X_eFYzTAWmWXzwacQ24ucT5dLlqquvYGBzPkh5bv0TUZJCurGZqnliER_7HPHUJ23uXYXNCHwFg-JkyO-8J8TY3Co9w96wySCN3RK_eOagqo-QXH8r1aw2lsJypSl8nxtsgK8mGCn9oNl4RxU-4tjxBExgi6epUY_YuffphnhhpW0RevtMCMGVaMwo0YSW2jIBFjyYOX0eqnw";

    #[test]
    fn only_signature_keys_are_taken_from_a_jwks() {
        let key = |kid: &str, extra: &str| format!(r#"{{"kty":"RSA","kid":"{kid}","n":"{N}","e":"AQAB"{extra}}}"#);
        let set = format!(
            r#"{{"keys":[{},{},{},{},{},{}]}}"#,
            key("sig", r#","use":"sig","alg":"RS256""#),
            key("plain", ""),
            key("enc-use", r#","use":"enc""#),
            key("enc-alg", r#","alg":"RSA-OAEP-256""#),
            key("enc-ops", r#","key_ops":["encrypt"]"#),
            key("verify-ops", r#","key_ops":["verify"]"#),
        );
        let keys = parse_jwks(set.as_bytes()).unwrap();
        let kids: Vec<_> = keys.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, ["sig", "plain", "verify-ops"]);
        let only_enc = format!(r#"{{"keys":[{}]}}"#, key("enc", r#","use":"enc""#));
        assert!(parse_jwks(only_enc.as_bytes()).is_err(), "a JWKS of encryption keys holds no usable key");
    }
}
