//! `auth:` and `cors:` sections, and the per-route security settings' types.

use super::{ByteSize, HumanDuration};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// JWT clock leeway: a few seconds of skew between hosts, far below jsonwebtoken's 60 s default
/// (a minute of extra life for a revoked trading token is too long).
pub const DEFAULT_JWT_LEEWAY: HumanDuration = HumanDuration::from_secs(5);
/// Tokens above this size are refused before any parsing (a JWT with a few roles is < 1 KiB).
pub const DEFAULT_MAX_TOKEN_SIZE: ByteSize = ByteSize::kib(8);
/// Verified tokens remembered (until their `exp`) so RS/ES signatures are not re-verified on
/// every request; bounded so a flood of distinct tokens cannot grow memory.
pub const DEFAULT_TOKEN_CACHE_SIZE: usize = 10_000;
/// JWKS URL refresh period.
pub const DEFAULT_JWKS_REFRESH: HumanDuration = HumanDuration::from_secs(300);
/// Shortest time between two JWKS fetches triggered by unknown `kid`s (abuse protection).
pub const DEFAULT_JWKS_MIN_REFRESH: HumanDuration = HumanDuration::from_secs(10);
/// Time allowed for one JWKS fetch.
pub const DEFAULT_JWKS_TIMEOUT: HumanDuration = HumanDuration::from_secs(2);
/// Shortest HS secret accepted (RFC 7518 §3.2: a key at least as long as the hash output).
pub const MIN_HS_SECRET_BYTES: usize = 32;
/// CORS preflight cache time.
pub const DEFAULT_CORS_MAX_AGE: HumanDuration = HumanDuration::from_secs(600);

/// The shipped config's stand-in secret: `check` accepts it with a warning, `run` refuses it.
pub const PLACEHOLDER_SECRET: &str = "change-me-set-B25_JWT_SECRET-to-a-real-secret";

/// A secret value: never printed by `Debug`, `check`, logs or the admin API.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `auth:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// JWT bearer tokens.
    pub jwt: Option<JwtConfig>,
    /// API keys.
    pub api_keys: Option<ApiKeysConfig>,
    /// Role hierarchy: each role and the roles it includes (admin ⊃ operator ⊃ viewer).
    pub roles: BTreeMap<String, Vec<String>>,
    /// Names of the headers that carry the principal upstream.
    pub principal_headers: PrincipalHeaders,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt: None,
            api_keys: None,
            roles: BTreeMap::from([
                ("admin".to_string(), vec!["operator".to_string()]),
                ("operator".to_string(), vec!["viewer".to_string()]),
                ("viewer".to_string(), vec![]),
            ]),
            principal_headers: PrincipalHeaders::default(),
        }
    }
}

/// Headers that carry the authenticated principal to the upstream. Client-sent headers with
/// these names are always removed first.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrincipalHeaders {
    /// Subject (JWT `sub` or API key id).
    pub subject: String,
    /// Comma-separated roles.
    pub roles: String,
    /// `jwt` or `api_key`.
    pub method: String,
}

impl Default for PrincipalHeaders {
    fn default() -> Self {
        Self { subject: "x-auth-subject".into(), roles: "x-auth-roles".into(), method: "x-auth-method".into() }
    }
}

/// `auth.jwt:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Trusted issuers and their keys.
    pub issuers: Vec<IssuerConfig>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Largest token accepted.
    #[serde(default = "default_max_token_size")]
    pub max_token_size: ByteSize,
    /// Claim holding the roles: a list of strings or a space-separated string.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Verified tokens cached until `exp` (0 disables the cache).
    #[serde(default = "default_token_cache")]
    pub cache_size: usize,
    /// Forward the `Authorization` header upstream (false strips it).
    #[serde(default = "default_true")]
    pub forward_token: bool,
}

fn default_leeway() -> HumanDuration {
    DEFAULT_JWT_LEEWAY
}
fn default_max_token_size() -> ByteSize {
    DEFAULT_MAX_TOKEN_SIZE
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_token_cache() -> usize {
    DEFAULT_TOKEN_CACHE_SIZE
}
fn default_true() -> bool {
    true
}
fn default_jwks_refresh() -> HumanDuration {
    DEFAULT_JWKS_REFRESH
}
fn default_jwks_min_refresh() -> HumanDuration {
    DEFAULT_JWKS_MIN_REFRESH
}
fn default_jwks_timeout() -> HumanDuration {
    DEFAULT_JWKS_TIMEOUT
}

/// One trusted issuer. Exactly one key source: `secret`, `public_key_file`, `jwks_file` or
/// `jwks_url`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// Allowed algorithms (explicit allow-list; `none` is never allowed).
    pub algorithms: Vec<String>,
    /// HMAC secret (HS256/384/512), at least 32 bytes.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM public key (RSA, EC or Ed25519).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// JWKS document on disk.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (`http://` or `https://`), fetched in the background.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM bundle of the CAs trusted for an `https://` JWKS URL (default: the system's bundle).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// JWKS refresh period.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: HumanDuration,
    /// Minimum time between refreshes triggered by an unknown `kid`.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh: HumanDuration,
    /// Timeout of one JWKS fetch.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_timeout: HumanDuration,
}

/// `auth.api_keys:`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Header carrying the key.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Known keys, by SHA-256 hash only.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

/// One API key: `b25-gateway hash-key` prints the hash of a new key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Principal id (sent upstream as the subject).
    pub id: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
    /// Roles of this key.
    pub roles: Vec<String>,
}

/// Authentication methods a route may accept.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Bearer <jwt>`.
    Jwt,
    /// The API key header.
    ApiKey,
}

impl AuthMethod {
    /// Name used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
        }
    }

    /// [`Self::as_str`] as a header value.
    pub fn header_value(self) -> &'static http::HeaderValue {
        static JWT: http::HeaderValue = http::HeaderValue::from_static("jwt");
        static API_KEY: http::HeaderValue = http::HeaderValue::from_static("api_key");
        match self {
            Self::Jwt => &JWT,
            Self::ApiKey => &API_KEY,
        }
    }
}

/// `cors:` section. Origins are compared exactly (scheme, host and port), never by suffix.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Allowed origins, exactly as browsers send them (`https://app.b25.example`); `*` allows
    /// any origin (not with credentials); `null` only if listed.
    pub allowed_origins: Vec<String>,
    /// Methods allowed in preflights.
    pub allowed_methods: Vec<String>,
    /// Request headers allowed in preflights (case-insensitive).
    pub allowed_headers: Vec<String>,
    /// Response headers exposed to scripts.
    pub exposed_headers: Vec<String>,
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// Preflight cache time.
    pub max_age: HumanDuration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].map(String::from).to_vec(),
            allowed_headers: ["authorization", "content-type", "x-api-key", "x-request-id", "idempotency-key"]
                .map(String::from)
                .to_vec(),
            // What a dashboard script needs to pace itself and report errors.
            exposed_headers: [
                "x-request-id",
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
            ]
            .map(String::from)
            .to_vec(),
            allow_credentials: false,
            max_age: DEFAULT_CORS_MAX_AGE,
        }
    }
}
