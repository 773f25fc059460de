//! Demo credentials: an HS256 secret and an API key that exist only in demo mode, and the
//! tokens printed for each role. `run` never uses these: the shipped config requires
//! `B25_JWT_SECRET` from the environment and fails closed without it.

use b25_gateway::config::Config;
use b25_gateway::config::security::ApiKeyConfig;
use std::net::SocketAddr;

/// The demo HS256 secret (≥ 32 bytes). Public knowledge: demo only.
pub const DEMO_JWT_SECRET: &str = "b25-demo-secret-do-not-use-in-production-0123456789";
/// The demo API key (operator).
pub const DEMO_API_KEY: &str = "b25-demo-operator-key";

/// `${VAR}` source for the demo: the process environment, with demo values for the secrets.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().or_else(|| match name {
        "B25_JWT_SECRET" => Some(DEMO_JWT_SECRET.into()),
        _ => None,
    })
}

/// Adds the demo operator API key.
pub fn add_api_key(config: &mut Config) {
    if let Some(ak) = config.auth.api_keys.as_mut() {
        ak.keys.push(ApiKeyConfig {
            id: "demo-operator-key".into(),
            sha256: b25_gateway::auth::apikey::hash_hex(DEMO_API_KEY),
            roles: vec!["operator".into()],
        });
    }
}

fn token(config: &Config, sub: &str, roles: &[&str]) -> Option<String> {
    let iss = config.auth.jwt.as_ref()?.issuers.first()?;
    let secret = iss.secret.as_ref()?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "sub": sub, "roles": roles, "iss": iss.issuer, "aud": iss.audiences.first()?,
        "iat": now, "exp": now + 12 * 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .ok()
}

/// Prints the demo banner with credentials and curl commands.
pub fn print(config: &Config, addr: SocketAddr, admin: Option<SocketAddr>) {
    let host = if addr.ip().is_unspecified() { format!("127.0.0.1:{}", addr.port()) } else { addr.to_string() };
    let base = format!("{}://{host}", if config.server.tls.is_some() { "https" } else { "http" });
    println!("\nb25-gateway demo is ready: {} simulated services behind {base}\n", config.services.len());
    let viewer = token(config, "demo-viewer", &["viewer"]).unwrap_or_default();
    let operator = token(config, "demo-operator", &["operator"]).unwrap_or_default();
    let admin_t = token(config, "demo-admin", &["admin"]).unwrap_or_default();
    println!("Demo credentials (HS256 demo secret, valid 12 h):");
    println!("  export VIEWER={viewer}");
    println!("  export OPERATOR={operator}");
    println!("  export ADMIN={admin_t}");
    println!("  export API_KEY={DEMO_API_KEY}   # operator\n");
    println!("Try:");
    println!("  curl -s {base}/health");
    println!("  curl -s {base}/api/v1/market/ticker/BTCUSDT                       # 401: no credentials");
    println!("  curl -s {base}/api/v1/market/ticker/BTCUSDT -H \"Authorization: Bearer $VIEWER\"");
    println!(
        "  curl -s -X POST {base}/api/v1/orders -H \"Authorization: Bearer $OPERATOR\" -H 'content-type: application/json' \\\n       -d '{{\"symbol\":\"BTCUSDT\",\"side\":\"buy\",\"quantity\":0.5,\"price\":65000}}'"
    );
    println!("  curl -s {base}/api/v1/orders/ord-1 -H \"X-API-Key: $API_KEY\"");
    println!("  curl -s -X POST {base}/api/v1/risk/emergency-stop -H \"Authorization: Bearer $OPERATOR\"   # 403");
    println!("  curl -s {base}/api/v1/account/balance -H \"Authorization: Bearer $ADMIN\"");
    if let Some(a) = admin {
        println!("  curl -s http://{a}/metrics");
    }
    println!("\nCtrl-C stops it.\n");
}
