//! Authentication (JWT bearer tokens, API keys) and authorisation (route roles).
//!
//! Built once per config snapshot ([`Authenticator::new`]); per request the only work is
//! extracting the credential, a cache lookup or a signature check, and one AND of role bits.
//! No credential → 401 with `WWW-Authenticate`; a bad one → 401; valid but without an allowed
//! role → 403. A credential that is present but invalid never falls through to another method.

pub mod apikey;
pub mod jwt;
pub mod roles;

use crate::config::{AuthConfig, AuthMethod, ConfigError};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use roles::{RoleModel, RoleSet};
use std::sync::Arc;

/// True for a name a principal header may not take: one the gateway sets on the upstream
/// request itself (written into the head after the client's headers), or strips as
/// hop-by-hop or as a credential.
fn reserved_for_upstream(n: &HeaderName) -> bool {
    crate::proxy::headers::is_hop_by_hop(n)
        || crate::proxy::h1::HopHeaders::sets(n)
        || [header::HOST, header::AUTHORIZATION, header::CONTENT_LENGTH, header::EXPECT].contains(n)
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Principal {
    /// JWT `sub` or API key id.
    pub subject: Arc<str>,
    /// Roles held (bits of the snapshot's [`RoleModel`]).
    pub roles: RoleSet,
    /// How it authenticated.
    pub method: AuthMethod,
    /// Expiry (Unix seconds) for JWTs.
    pub exp: Option<u64>,
    /// Prepared upstream header values.
    pub subject_header: Option<HeaderValue>,
    /// Comma-separated role names.
    pub roles_header: Option<HeaderValue>,
    /// Key of the per-principal rate limits: the configured claim's value, else the subject.
    pub rate_key: Arc<str>,
    /// The verified JWT claims (for consistent hashing on a claim).
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
}

impl Principal {
    /// A principal with its header values prepared once.
    pub fn new(subject: &str, roles: RoleSet, model: &RoleModel, method: AuthMethod, exp: Option<u64>) -> Self {
        let subject_header = HeaderValue::from_str(subject).ok();
        let subject: Arc<str> = subject.into();
        Self {
            rate_key: subject.clone(),
            claims: None,
            subject,
            roles,
            method,
            exp,
            subject_header,
            roles_header: HeaderValue::from_str(&model.names(roles)).ok(),
        }
    }
}

/// Why authentication failed; `reason` is a fixed string (metrics label, log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// Stable reason code.
    pub reason: &'static str,
    /// No credential at all (as opposed to a bad one).
    pub missing: bool,
}

impl AuthFailure {
    /// A credential was presented and refused.
    pub fn invalid(reason: &'static str) -> Self {
        Self { reason, missing: false }
    }
    /// No credential was presented.
    pub fn missing() -> Self {
        Self { reason: "missing", missing: true }
    }
}

/// Which methods a route accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Methods {
    /// Bearer JWTs.
    pub jwt: bool,
    /// API keys.
    pub api_key: bool,
}

/// Everything authentication needs for one snapshot.
#[derive(Debug)]
pub struct Authenticator {
    /// The role hierarchy.
    pub roles: Arc<RoleModel>,
    /// JWT verification, if configured.
    pub jwt: Option<Arc<jwt::JwtVerifier>>,
    api_key_header: Option<HeaderName>,
    api_keys: apikey::ApiKeys,
    /// Upstream header carrying the subject.
    pub subject_header: HeaderName,
    /// Upstream header carrying the roles.
    pub roles_header: HeaderName,
    /// Upstream header carrying the method.
    pub method_header: HeaderName,
}

impl Authenticator {
    /// Builds from config; problems are added to `errors` with their path.
    pub fn new(cfg: &AuthConfig, rate_claim: Option<String>, errors: &mut Vec<ConfigError>) -> Self {
        let roles = Arc::new(RoleModel::new(&cfg.roles).unwrap_or_else(|e| {
            errors.push(ConfigError::new("auth.roles", e));
            RoleModel::new(&Default::default()).expect("empty model")
        }));
        let jwt = cfg.jwt.as_ref().map(|j| Arc::new(jwt::JwtVerifier::new(j, roles.clone(), rate_claim, errors)));
        let mut api_keys = apikey::ApiKeys::default();
        let mut api_key_header = None;
        if let Some(ak) = &cfg.api_keys {
            match HeaderName::from_bytes(ak.header.as_bytes()) {
                Ok(h) => api_key_header = Some(h),
                Err(_) => errors.push(ConfigError::new("auth.api_keys.header", "not a valid header name")),
            }
            for (i, k) in ak.keys.iter().enumerate() {
                let set = roles.principal(k.roles.iter().map(String::as_str));
                if let Err(e) = api_keys.push(&k.id, &k.sha256, set) {
                    errors.push(ConfigError::new(format!("auth.api_keys.keys[{i}].sha256"), e));
                }
            }
        }
        let name = |path: &str, v: &str| {
            let n = HeaderName::from_bytes(v.as_bytes())
                .map_err(|_| ConfigError::new(path, format!("{v:?} is not a header name")))?;
            if reserved_for_upstream(&n) {
                return Err(ConfigError::new(path, format!("{v:?} is a header the gateway itself sets or strips")));
            }
            Ok(n)
        };
        let h = &cfg.principal_headers;
        let mut header = |path: &str, v: &str, fallback: &'static str| {
            name(path, v).unwrap_or_else(|e| {
                errors.push(e);
                HeaderName::from_static(fallback)
            })
        };
        let subject_header = header("auth.principal_headers.subject", &h.subject, "x-auth-subject");
        let roles_header = header("auth.principal_headers.roles", &h.roles, "x-auth-roles");
        let method_header = header("auth.principal_headers.method", &h.method, "x-auth-method");
        let distinct =
            subject_header != roles_header && subject_header != method_header && roles_header != method_header;
        if !distinct
            || api_key_header.as_ref().is_some_and(|k| [&subject_header, &roles_header, &method_header].contains(&k))
        {
            errors.push(ConfigError::new(
                "auth.principal_headers",
                "subject, roles and method need three different names, none the API key header",
            ));
        }
        Self { subject_header, roles_header, method_header, roles, jwt, api_key_header, api_keys }
    }

    /// The methods configured (a route's default).
    pub fn configured(&self) -> Methods {
        Methods { jwt: self.jwt.is_some(), api_key: self.api_key_header.is_some() }
    }

    /// The API key header name, if API keys are configured (removed before forwarding).
    pub fn api_key_header(&self) -> Option<&HeaderName> {
        self.api_key_header.as_ref()
    }

    /// Authenticates a request for a route accepting `methods`.
    pub async fn authenticate(&self, headers: &HeaderMap, methods: Methods) -> Result<Arc<Principal>, AuthFailure> {
        let mut authz = headers.get_all(header::AUTHORIZATION).iter();
        let bearer = match (authz.next(), authz.next()) {
            (None, _) => None,
            (Some(v), None) => Some(v),
            (Some(_), Some(_)) => return Err(AuthFailure::invalid("duplicate_credentials")),
        };
        let key = match &self.api_key_header {
            Some(h) => {
                let mut it = headers.get_all(h).iter();
                match (it.next(), it.next()) {
                    (None, _) => None,
                    (Some(v), None) => Some(v),
                    (Some(_), Some(_)) => return Err(AuthFailure::invalid("duplicate_credentials")),
                }
            }
            None => None,
        };
        if let Some(v) = bearer {
            let (Some(verifier), true) = (&self.jwt, methods.jwt) else {
                return Err(AuthFailure::invalid("method_not_accepted"));
            };
            let s = v.to_str().map_err(|_| AuthFailure::invalid("malformed"))?;
            let token = match s.split_once(' ') {
                Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
                _ => return Err(AuthFailure::invalid("unsupported_scheme")),
            };
            if token.is_empty() {
                return Err(AuthFailure::invalid("malformed"));
            }
            return verifier.verify(token).await;
        }
        if let Some(v) = key {
            if !methods.api_key {
                return Err(AuthFailure::invalid("method_not_accepted"));
            }
            let k = self.api_keys.find(v.as_bytes()).ok_or(AuthFailure::invalid("unknown_key"))?;
            return Ok(Arc::new(Principal::new(&k.id, k.roles, &self.roles, AuthMethod::ApiKey, None)));
        }
        Err(AuthFailure::missing())
    }
}
