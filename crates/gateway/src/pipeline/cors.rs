//! CORS: exact origin allow-list, preflights answered here (no upstream, no authentication).
//!
//! Origins are compared whole (scheme, host, port; ASCII case-insensitive) — never by suffix or
//! substring, so `https://b25.example.evil.com` is not `https://b25.example`. `null` is allowed
//! only when listed literally. Responses carry `Vary: Origin` so caches keep origins apart.

use crate::config::{ConfigError, CorsConfig};
use crate::error::{ErrorKind, GatewayError};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

/// The CORS policy of a snapshot.
#[derive(Debug)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    headers: Vec<String>,
    allow_headers: HeaderValue,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

fn hv(s: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(s).ok()
}

impl Cors {
    /// Builds and checks the policy (`*` with credentials is refused).
    pub fn new(c: &CorsConfig, errors: &mut Vec<ConfigError>) -> Self {
        let any = c.allowed_origins.iter().any(|o| o == "*");
        if any && c.allow_credentials {
            errors.push(ConfigError::new(
                "cors.allowed_origins",
                "\"*\" cannot be combined with allow_credentials: list the origins",
            ));
        }
        for (i, o) in c.allowed_origins.iter().enumerate() {
            let ok = o == "*" || o == "null" || valid_origin(o);
            if !ok {
                errors.push(ConfigError::new(
                    format!("cors.allowed_origins[{i}]"),
                    format!("{o:?} is not an origin such as https://app.example.com (scheme://host[:port], no path)"),
                ));
            }
        }
        let mut methods = Vec::new();
        for (i, m) in c.allowed_methods.iter().enumerate() {
            match Method::from_bytes(m.as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => errors
                    .push(ConfigError::new(format!("cors.allowed_methods[{i}]"), format!("{m:?} is not a method"))),
            }
        }
        let headers: Vec<String> = c.allowed_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        Self {
            any,
            origins: c.allowed_origins.iter().filter(|o| *o != "*").map(|o| o.to_ascii_lowercase()).collect(),
            allow_methods: hv(&c.allowed_methods.join(", ")).unwrap_or(HeaderValue::from_static("GET")),
            allow_headers: hv(&headers.join(", ")).unwrap_or(HeaderValue::from_static("")),
            headers,
            methods,
            expose: (!c.exposed_headers.is_empty()).then(|| hv(&c.exposed_headers.join(", "))).flatten(),
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age.get().as_secs()),
        }
    }

    /// True when `origin` may read responses.
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        let Ok(o) = origin.to_str() else { return false };
        if o == "null" {
            return self.origins.iter().any(|x| x == "null");
        }
        self.any || self.origins.iter().any(|x| x.eq_ignore_ascii_case(o))
    }

    /// True for a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`).
    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// Answers a preflight whose path and requested method were found in the route table.
    pub fn preflight(&self, headers: &HeaderMap) -> Result<Response<crate::body::GatewayBody>, GatewayError> {
        let origin = headers.get(header::ORIGIN).expect("checked by is_preflight");
        if !self.allows(origin) {
            return Err(GatewayError::new(ErrorKind::CorsRejected, "origin not allowed"));
        }
        let m = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| Method::from_bytes(v.as_bytes()).ok())
            .ok_or_else(|| GatewayError::new(ErrorKind::BadRequest, "invalid Access-Control-Request-Method"))?;
        if !self.methods.contains(&m) {
            return Err(GatewayError::new(ErrorKind::CorsRejected, "method not allowed by the CORS policy"));
        }
        for v in headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let s = v.to_str().map_err(|_| GatewayError::new(ErrorKind::BadRequest, "invalid request headers list"))?;
            for h in s.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                if !self.headers.iter().any(|a| a.eq_ignore_ascii_case(h)) {
                    return Err(GatewayError::new(
                        ErrorKind::CorsRejected,
                        "request header not allowed by the CORS policy",
                    ));
                }
            }
        }
        let mut r = Response::new(crate::body::GatewayBody::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, self.allow_headers.clone());
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        h.append(
            header::VARY,
            HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
        );
        Ok(r)
    }

    /// Adds the response headers for an allowed origin (every response, errors included), and
    /// `Vary: Origin` in any case. The gateway owns CORS once it is configured: an upstream's
    /// own `Access-Control-*` answers (a `*`, an echoed origin) are removed first, so an origin
    /// that is not allowed never gets them.
    pub fn apply(&self, origin: Option<&HeaderValue>, preflight: bool, h: &mut HeaderMap) {
        if !preflight {
            // (A preflight's answer is the gateway's own.)
            for name in &UPSTREAM_CORS {
                h.remove(name);
            }
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin.filter(|o| self.allows(o)) else { return };
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if !preflight && let Some(e) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}

/// The CORS response headers, all set by the gateway alone when `cors` is configured.
const UPSTREAM_CORS: [header::HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else { return false };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' ', '*'])
        && o.parse::<http::Uri>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], creds: bool) -> (Cors, Vec<ConfigError>) {
        let c = CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_credentials: creds,
            ..Default::default()
        };
        let mut errors = Vec::new();
        (Cors::new(&c, &mut errors), errors)
    }

    #[test]
    fn exact_origins_only() {
        let (c, e) = cors(&["https://app.b25.example"], true);
        assert!(e.is_empty());
        assert!(c.allows(&HeaderValue::from_static("https://app.b25.example")));
        assert!(c.allows(&HeaderValue::from_static("https://APP.b25.example")));
        for bad in [
            "https://app.b25.example.evil.com",
            "https://evilapp.b25.example",
            "http://app.b25.example",
            "https://app.b25.example:8443",
            "null",
            "https://app.b25.example/",
        ] {
            assert!(!c.allows(&HeaderValue::from_static(bad)), "{bad}");
        }
        let (c, _) = cors(&["*"], false);
        assert!(c.allows(&HeaderValue::from_static("https://x.example")));
        assert!(!c.allows(&HeaderValue::from_static("null")), "null only when listed");
        let (c, _) = cors(&["null"], false);
        assert!(c.allows(&HeaderValue::from_static("null")));
    }

    #[test]
    fn config_errors() {
        assert_eq!(cors(&["*"], true).1.len(), 1);
        assert_eq!(cors(&["app.example", "https://a.example/path", "*.example.com"], false).1.len(), 3);
    }
}
