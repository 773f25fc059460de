//! Semantic validation: everything that parses but cannot work. Collects every problem.

use super::security::MIN_HS_SECRET_BYTES;
use super::{AuthMethod, Config, ConfigError, RouteConfig};
use crate::router::{RouteSpec, RouteTable};
use http::Method;
use std::collections::HashMap;
use std::net::SocketAddr;

/// Paths the gateway answers itself on the main listener.
pub const RESERVED_PATHS: [&str; 4] = ["/health", "/health/liveness", "/health/readiness", "/version"];
/// Longest upstream timeout accepted (a trading request waiting longer is a bug).
/// Worker threads beyond this are a typo, not a machine.
const MAX_WORKERS: usize = 1024;
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
/// hyper refuses HTTP/1 read buffers smaller than this.
const MIN_HEADER_BYTES: u64 = 8192;

/// What failed to deserialize, so semantic checks do not report its consequences again.
#[derive(Default)]
pub(super) struct Broken {
    /// `server` failed and was replaced by its default.
    pub server: bool,
    /// `auth` failed and was replaced by its default.
    pub auth: bool,
    /// Services left out.
    pub services: Vec<String>,
    /// `routes` as read item by item.
    pub routes: Items,
    /// `auth.jwt.issuers` as read item by item.
    pub issuers: Items,
    /// `auth.api_keys.keys` as read item by item.
    pub keys: Items,
}

/// A list read item by item: where each item read came from, and whether any was left out.
#[derive(Default)]
pub(super) struct Items {
    /// For each item read, its index in the file.
    pub index: Vec<usize>,
    /// An item could not be read and was left out (its errors are reported).
    pub dropped: bool,
}

impl Items {
    /// The index in the file of item `i` of the list as read.
    fn at(&self, i: usize) -> usize {
        self.index.get(i).copied().unwrap_or(i)
    }
}

/// Why a status may not be in `cache.statuses`: an entry is replayed to plain GETs, so it must
/// be a complete response to one (RFC 9111 §3.3, §3.4, §4.3.4).
fn unstorable_status(status: u16) -> Option<&'static str> {
    match status {
        100..=199 => Some("a 1xx is an interim response, not the answer"),
        206 => Some("a partial response (206) only answers a Range request"),
        304 => Some("a 304 is not a complete response; it only answers a conditional request"),
        200..=599 => None,
        _ => Some("not an HTTP status (100-599)"),
    }
}

pub(super) fn validate(c: &Config, broken: &Broken, errors: &mut Vec<ConfigError>) {
    // A value that already failed to parse or expand is not reported again by the checks here.
    let seen: std::collections::HashSet<String> = errors.iter().map(|e| e.path.clone()).collect();
    let mut err = |path: String, msg: String| {
        if !seen.contains(&path) {
            errors.push(ConfigError::new(path, msg));
        }
    };

    // server
    let s = &c.server;
    if !broken.server && s.listen.parse::<SocketAddr>().is_err() {
        err("server.listen".into(), format!("{:?} is not an address such as 0.0.0.0:8080", s.listen));
    }
    if !s.admin_listen.is_empty() {
        if s.admin_listen.parse::<SocketAddr>().is_err() {
            err("server.admin_listen".into(), format!("{:?} is not an address such as 127.0.0.1:9901", s.admin_listen));
        } else if s.admin_listen == s.listen && !s.listen.ends_with(":0") {
            err("server.admin_listen".into(), "must differ from server.listen".into());
        } else if let Ok(a) = s.admin_listen.parse::<SocketAddr>()
            && !a.ip().is_loopback()
            && s.admin_token.is_none()
        {
            err(
                "server.admin_listen".into(),
                "a non-loopback admin listener needs server.admin_token (the admin API can halt trading)".into(),
            );
        }
    }
    if let Some(tls) = &s.tls {
        for (field, p) in [("cert", &tls.cert), ("key", &tls.key)] {
            match std::fs::metadata(p) {
                Err(e) => err(format!("server.tls.{field}"), format!("cannot read {}: {e}", p.display())),
                Ok(m) if !m.is_file() => {
                    err(format!("server.tls.{field}"), format!("{} is not a file", p.display()));
                }
                Ok(_) => {}
            }
        }
    }
    if s.limits.max_header_bytes.bytes() < MIN_HEADER_BYTES {
        err("server.limits.max_header_bytes".into(), "must be at least 8KiB".into());
    }
    if s.limits.max_headers == 0 {
        err("server.limits.max_headers".into(), "must be at least 1".into());
    }
    if s.workers > MAX_WORKERS {
        err("server.workers".into(), format!("{} is more than {MAX_WORKERS} (0 means one per CPU)", s.workers));
    }
    for (name, zero) in [
        ("header_timeout", s.limits.header_timeout.get().is_zero()),
        ("body_idle_timeout", s.limits.body_idle_timeout.get().is_zero()),
        ("max_uri_length", s.limits.max_uri_length.bytes() == 0),
        ("max_body", s.limits.max_body.bytes() == 0),
    ] {
        if zero {
            err(format!("server.limits.{name}"), "must be greater than 0".into());
        }
    }
    for (i, cidr) in s.trusted_proxies.iter().enumerate() {
        if let Err(e) = crate::net::Cidr::parse(cidr) {
            err(format!("server.trusted_proxies[{i}]"), e);
        }
    }
    if !["error", "warn", "info", "debug", "trace", "off"].contains(&c.logging.level.as_str()) {
        err(
            "logging.level".into(),
            format!("unknown level {:?} (error, warn, info, debug, trace, off)", c.logging.level),
        );
    }

    // services
    for (name, svc) in &c.services {
        let p = format!("services.{name}");
        if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
            err(p.clone(), "service names use only letters, digits, '-' and '_'".into());
        }
        if svc.instances.is_empty() {
            err(format!("{p}.instances"), "at least one instance is required".into());
        }
        for (i, url) in svc.instances.iter().enumerate() {
            if let Err(e) = crate::proxy::Instance::parse(url.url()) {
                err(format!("{p}.instances[{i}]"), e);
            }
        }
        for (field, d) in [("timeout", svc.timeout), ("connect_timeout", svc.connect_timeout)] {
            if d.get().is_zero() || d.get() > MAX_TIMEOUT {
                err(format!("{p}.{field}"), "must be greater than 0 and at most 1h".into());
            }
        }
        for (i, inst) in svc.instances.iter().enumerate() {
            if !(1..=100).contains(&inst.weight()) {
                err(format!("{p}.instances[{i}].weight"), "must be 1..=100".into());
            }
        }
        let lb = &svc.load_balancing;
        if lb.policy == super::resilience::Policy::ConsistentHash && lb.hash_header.is_none() && lb.hash_claim.is_none()
        {
            err(format!("{p}.load_balancing"), "consistent_hash needs hash_header or hash_claim".into());
        }
        if let Some(h) = &lb.hash_header
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            err(format!("{p}.load_balancing.hash_header"), format!("{h:?} is not a header name"));
        }
        let od = &svc.outlier_detection;
        if od.enabled
            && (od.consecutive_failures == 0 || od.base_ejection.get().is_zero() || od.max_ejection_percent > 100)
        {
            err(
                format!("{p}.outlier_detection"),
                "consecutive_failures and base_ejection must be > 0, max_ejection_percent ≤ 100".into(),
            );
        }
        let cb = &svc.circuit_breaker;
        if cb.enabled
            && (cb.consecutive_failures == 0
                || !(0.0..=1.0).contains(&cb.failure_ratio)
                || cb.window.get().is_zero()
                || cb.open_interval.get().is_zero()
                || cb.half_open_probes == 0)
        {
            err(
                format!("{p}.circuit_breaker"),
                "consecutive_failures, window, open_interval and half_open_probes must be > 0; failure_ratio in 0..=1"
                    .into(),
            );
        }
        let rt = &svc.retry;
        if rt.attempts == 0 || rt.attempts > 10 {
            err(format!("{p}.retry.attempts"), "must be 1..=10 (1 = no retry)".into());
        }
        if !(0.0..=1.0).contains(&rt.budget_ratio) {
            err(format!("{p}.retry.budget_ratio"), "must be in 0..=1".into());
        }
        for (i, st) in rt.retry_on_status.iter().enumerate() {
            if !(500..=599).contains(st) {
                err(format!("{p}.retry.retry_on_status[{i}]"), "only 5xx statuses are retried".into());
            }
        }
        let hc = &svc.health_check;
        if hc.enabled {
            if !hc.path.starts_with('/') {
                err(format!("{p}.health_check.path"), "must start with '/'".into());
            }
            if hc.interval.get().is_zero() {
                err(format!("{p}.health_check.interval"), "must be greater than 0".into());
            }
            if hc.timeout.get().is_zero() {
                err(format!("{p}.health_check.timeout"), "must be greater than 0".into());
            }
            if hc.healthy_threshold == 0 {
                err(format!("{p}.health_check.healthy_threshold"), "must be at least 1".into());
            }
            if hc.unhealthy_threshold == 0 {
                err(format!("{p}.health_check.unhealthy_threshold"), "must be at least 1".into());
            }
        }
    }

    validate_auth(c, broken, &mut err);
    validate_state(c, &mut err);
    // Durations that feed timers: an absurd value must be refused here rather than overflow a
    // deadline later (a panic at runtime).
    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    let mut long: Vec<(String, std::time::Duration, std::time::Duration)> = vec![
        ("server.shutdown_grace".into(), s.shutdown_grace.get(), DAY),
        ("server.shutdown_delay".into(), s.shutdown_delay.get(), DAY),
        ("server.limits.header_timeout".into(), s.limits.header_timeout.get(), DAY),
        ("server.limits.body_idle_timeout".into(), s.limits.body_idle_timeout.get(), DAY),
        ("websocket.idle_timeout".into(), c.websocket.idle_timeout.get(), 7 * DAY),
        ("websocket.max_lifetime".into(), c.websocket.max_lifetime.get(), 30 * DAY),
    ];
    for (name, svc) in &c.services {
        let p = format!("services.{name}");
        long.push((format!("{p}.health_check.interval"), svc.health_check.interval.get(), DAY));
        long.push((format!("{p}.health_check.timeout"), svc.health_check.timeout.get(), DAY));
        long.push((format!("{p}.pool_idle_timeout"), svc.pool_idle_timeout.get(), DAY));
        long.push((format!("{p}.response_idle_timeout"), svc.response_idle_timeout.get(), DAY));
        if svc.response_idle_timeout.get().is_zero() {
            err(format!("{p}.response_idle_timeout"), "must be greater than 0".into());
        }
        long.push((format!("{p}.circuit_breaker.window"), svc.circuit_breaker.window.get(), DAY));
        long.push((format!("{p}.circuit_breaker.max_open_interval"), svc.circuit_breaker.max_open_interval.get(), DAY));
        long.push((format!("{p}.outlier_detection.max_ejection"), svc.outlier_detection.max_ejection.get(), DAY));
        long.push((format!("{p}.retry.backoff_max"), svc.retry.backoff_max.get(), DAY));
    }
    if let Some(jwt) = &c.auth.jwt {
        for (i, iss) in jwt.issuers.iter().enumerate() {
            let i = broken.issuers.at(i);
            long.push((format!("auth.jwt.issuers[{i}].jwks_refresh"), iss.jwks_refresh.get(), 7 * DAY));
            long.push((format!("auth.jwt.issuers[{i}].jwks_timeout"), iss.jwks_timeout.get(), DAY));
        }
    }
    for (path, d, max) in long {
        if d > max {
            err(path, format!("at most {}", super::units::format_duration(max)));
        }
    }
    let jwt_on = c.auth.jwt.is_some();
    let keys_on = c.auth.api_keys.is_some();
    let known_roles = c.auth.roles.keys().cloned().collect::<Vec<_>>().join(", ");

    // routes
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut specs = Vec::new();
    for (k, r) in c.routes.iter().enumerate() {
        let i = broken.routes.at(k);
        let p = format!("routes[{i}]");
        if r.id.is_empty() || !r.id.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            err(format!("{p}.id"), format!("{:?}: ids use only letters, digits, '-', '_' and '.'", r.id));
        }
        if let Some(first) = ids.insert(&r.id, i) {
            err(format!("{p}.id"), format!("duplicate route id {:?} (first used by routes[{first}])", r.id));
        }
        if !c.services.contains_key(&r.service) && !broken.services.contains(&r.service) {
            let known: Vec<&str> = c.services.keys().map(String::as_str).collect();
            err(format!("{p}.service"), format!("unknown service {:?} (known: {})", r.service, known.join(", ")));
        }
        let path_ok = validate_template(r, &p, &mut err);
        let methods = validate_methods(r, &p, &mut err);
        if let Some(prefix) = &r.strip_prefix
            && (!prefix.starts_with('/') || !r.path.starts_with(prefix.as_str()))
        {
            err(
                format!("{p}.strip_prefix"),
                format!("{prefix:?} must start with '/' and be a prefix of the path {:?}", r.path),
            );
        }
        // Only characters a path may hold (RFC 3986 pchar and '/', '%' for escapes): anything
        // else (space, CR/LF, quotes) would make every request target on the route invalid.
        if let Some(prefix) = &r.add_prefix
            && (!prefix.starts_with('/')
                || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)))
        {
            err(format!("{p}.add_prefix"), format!("{prefix:?} must be a plain path starting with '/'"));
        }
        if let Some(t) = r.timeout
            && (t.get().is_zero() || t.get() > MAX_TIMEOUT)
        {
            err(format!("{p}.timeout"), "must be greater than 0 and at most 1h".into());
        }
        for (j, role) in r.roles.iter().enumerate() {
            if !c.auth.roles.contains_key(role) {
                err(format!("{p}.roles[{j}]"), format!("unknown role {role:?} (known: {known_roles})"));
            }
        }
        if r.public && !r.roles.is_empty() {
            err(format!("{p}.public"), "a public route cannot also list roles".into());
        }
        if r.roles.is_empty() && !r.public {
            err(format!("{p}.roles"), "a route needs roles, or `public: true` to be reachable without them".into());
        }
        if !r.public {
            let accepted = r.auth.clone().unwrap_or_else(|| {
                let mut v = Vec::new();
                if jwt_on {
                    v.push(AuthMethod::Jwt);
                }
                if keys_on {
                    v.push(AuthMethod::ApiKey);
                }
                v
            });
            if accepted.is_empty() && !broken.auth {
                err(
                    format!("{p}.roles"),
                    "the route needs authentication but auth.jwt and auth.api_keys are both absent".into(),
                );
            }
            for (j, m) in accepted.iter().enumerate() {
                let on = match m {
                    AuthMethod::Jwt => jwt_on,
                    AuthMethod::ApiKey => keys_on,
                };
                if r.auth.is_some() && !on && !broken.auth {
                    err(format!("{p}.auth[{j}]"), format!("{} is not configured in auth", m.as_str()));
                }
            }
        }
        let (request, response) = c.header_edits(r);
        for (k, m) in [request.err(), response.err()].into_iter().flatten().flatten() {
            err(format!("{p}.{k}"), m);
        }
        for (j, h) in r.required_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                err(format!("{p}.required_headers[{j}]"), format!("{h:?} is not a header name"));
            }
        }
        for (field, l) in [("rate_limit", &r.rate_limit), ("principal_rate_limit", &r.principal_rate_limit)] {
            if let Some(l) = l
                && (l.rate == 0 || l.per.get().is_zero() || l.burst == Some(0))
            {
                err(format!("{p}.{field}"), "rate, per and burst must be greater than 0".into());
            }
        }
        if r.retry_attempts.is_some_and(|a| a == 0 || a > 10) {
            err(format!("{p}.retry_attempts"), "must be 1..=10".into());
        }
        if r.idempotency.is_some() && methods.iter().all(|m| !matches!(*m, Method::POST | Method::PUT | Method::PATCH))
        {
            err(format!("{p}.idempotency"), "only POST, PUT and PATCH routes take idempotency keys".into());
        }
        if r.json && r.max_json_depth == 0 {
            err(format!("{p}.max_json_depth"), "must be at least 1".into());
        }
        if r.cache.is_some() && methods.iter().any(|m| m != Method::GET && m != Method::HEAD) {
            err(format!("{p}.cache"), "only GET and HEAD routes can be cached".into());
        }
        for (j, st) in r.cache.iter().flat_map(|c| c.statuses.iter().enumerate()) {
            if let Some(why) = unstorable_status(*st) {
                err(format!("{p}.cache.statuses[{j}]"), format!("{st} cannot be stored: {why}"));
            }
        }
        if r.websocket && methods.iter().any(|m| m != Method::GET) {
            err(format!("{p}.methods"), "a websocket route accepts only GET".into());
        }
        if path_ok && !methods.is_empty() {
            specs.push((p, r, methods));
        }
    }
    let table = RouteTable::build(specs.into_iter().map(|(config_path, r, methods)| RouteSpec {
        config_path,
        id: &r.id,
        template: &r.path,
        methods,
        value: (),
    }));
    if let Err(errs) = table {
        errors.extend(errs.into_iter().filter(|e| !seen.contains(&e.path)));
    }
}

fn validate_template(r: &RouteConfig, p: &str, err: &mut impl FnMut(String, String)) -> bool {
    if !r.path.starts_with('/') {
        err(format!("{p}.path"), format!("{:?} must start with '/'", r.path));
        return false;
    }
    if r.path.contains(['?', '#', '%', '\\', ' ']) || r.path.contains("//") {
        err(format!("{p}.path"), format!("{:?} must be a plain path template", r.path));
        return false;
    }
    if r.path.split('/').any(|seg| seg == "." || seg == "..") {
        err(format!("{p}.path"), format!("{:?} must not contain '.' or '..' segments", r.path));
        return false;
    }
    if RESERVED_PATHS.contains(&r.path.as_str()) {
        err(format!("{p}.path"), format!("{:?} is reserved for the gateway's own endpoint", r.path));
        return false;
    }
    true
}

fn validate_methods(r: &RouteConfig, p: &str, err: &mut impl FnMut(String, String)) -> Vec<Method> {
    if r.methods.is_empty() {
        err(format!("{p}.methods"), "at least one method is required".into());
    }
    let mut out: Vec<Method> = Vec::new();
    for (j, m) in r.methods.iter().enumerate() {
        const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        if !KNOWN.contains(&m.as_str()) {
            err(format!("{p}.methods[{j}]"), format!("unknown method {m:?} (use upper case: {})", KNOWN.join(", ")));
            continue;
        }
        let method = Method::from_bytes(m.as_bytes()).expect("known method");
        if out.contains(&method) {
            err(format!("{p}.methods[{j}]"), format!("{m} listed twice"));
            continue;
        }
        out.push(method);
    }
    out
}

fn validate_auth(c: &Config, broken: &Broken, err: &mut impl FnMut(String, String)) {
    if let Some(jwt) = &c.auth.jwt {
        if jwt.issuers.is_empty() && !broken.issuers.dropped {
            err("auth.jwt.issuers".into(), "at least one issuer is required".into());
        }
        if jwt.leeway.get() > std::time::Duration::from_secs(300) {
            err("auth.jwt.leeway".into(), "more than 5m of clock skew is not accepted".into());
        }
        for (i, iss) in jwt.issuers.iter().enumerate() {
            let p = format!("auth.jwt.issuers[{}]", broken.issuers.at(i));
            if iss.issuer.is_empty() {
                err(format!("{p}.issuer"), "must not be empty".into());
            }
            if iss.audiences.is_empty() {
                err(format!("{p}.audiences"), "at least one audience is required (aud is always checked)".into());
            }
            if iss.algorithms.is_empty() {
                err(format!("{p}.algorithms"), "an explicit algorithm allow-list is required".into());
            }
            let mut families = Vec::new();
            for (j, a) in iss.algorithms.iter().enumerate() {
                match crate::auth::jwt::parse_algorithm(a) {
                    Ok(alg) => families.push(alg.family()),
                    Err(e) => err(format!("{p}.algorithms[{j}]"), e),
                }
            }
            let sources =
                [iss.secret.is_some(), iss.public_key_file.is_some(), iss.jwks_file.is_some(), iss.jwks_url.is_some()];
            if sources.iter().filter(|x| **x).count() != 1 {
                err(p.clone(), "exactly one of secret, public_key_file, jwks_file, jwks_url is required".into());
            }
            let has_hs = families.contains(&jsonwebtoken::AlgorithmFamily::Hmac);
            if let Some(secret) = &iss.secret {
                if secret.expose().len() < MIN_HS_SECRET_BYTES {
                    err(format!("{p}.secret"), format!("an HS secret must be at least {MIN_HS_SECRET_BYTES} bytes"));
                }
                if families.iter().any(|f| *f != jsonwebtoken::AlgorithmFamily::Hmac) {
                    err(format!("{p}.algorithms"), "a secret only verifies HS256/HS384/HS512".into());
                }
            } else if has_hs {
                err(
                    format!("{p}.algorithms"),
                    "HS algorithms need a secret; with public keys they would allow HS/RS confusion".into(),
                );
            }
            for (field, path) in [
                ("public_key_file", &iss.public_key_file),
                ("jwks_file", &iss.jwks_file),
                ("jwks_ca_file", &iss.jwks_ca_file),
            ] {
                if let Some(path) = path
                    && let Err(e) = std::fs::metadata(path)
                {
                    err(format!("{p}.{field}"), format!("cannot read {}: {e}", path.display()));
                }
            }
            for (field, d) in [("jwks_refresh", iss.jwks_refresh), ("jwks_timeout", iss.jwks_timeout)] {
                if d.get().is_zero() {
                    err(format!("{p}.{field}"), "must be greater than 0".into());
                }
            }
            let https = iss.jwks_url.as_deref().is_some_and(|u| u.starts_with("https://"));
            if let Some(url) = &iss.jwks_url
                && !https
                && !url.starts_with("http://")
            {
                err(format!("{p}.jwks_url"), "must be an http:// or https:// URL".into());
            }
            if iss.jwks_ca_file.is_some() && !https {
                err(format!("{p}.jwks_ca_file"), "only used with an https:// jwks_url".into());
            }
        }
    }
    if let Some(ak) = &c.auth.api_keys {
        let mut ids = std::collections::HashSet::new();
        for (i, k) in ak.keys.iter().enumerate() {
            let p = format!("auth.api_keys.keys[{}]", broken.keys.at(i));
            if !ids.insert(&k.id) {
                err(format!("{p}.id"), format!("duplicate key id {:?}", k.id));
            }
            if let Err(e) = crate::auth::apikey::parse_hash(&k.sha256) {
                err(format!("{p}.sha256"), e);
            }
            for (j, role) in k.roles.iter().enumerate() {
                if !c.auth.roles.contains_key(role) {
                    err(format!("{p}.roles[{j}]"), format!("unknown role {role:?}"));
                }
            }
        }
    }
}

fn validate_state(c: &Config, err: &mut impl FnMut(String, String)) {
    use super::state::Backend;
    if c.state.backend == Backend::Redis {
        match &c.state.redis {
            None => err("state.redis".into(), "backend redis needs state.redis with url or cluster".into()),
            Some(r) => {
                if r.url.is_some() != r.cluster.is_empty() {
                    err("state.redis".into(), "set exactly one of url (single Redis) or cluster (seed nodes)".into());
                }
                let urls = r.url.iter().map(|u| ("state.redis.url".to_string(), u));
                let nodes = r.cluster.iter().enumerate().map(|(i, u)| (format!("state.redis.cluster[{i}]"), u));
                for (path, u) in urls.chain(nodes) {
                    if !u.starts_with("redis://") {
                        let u = super::state::redact_url(u);
                        err(path, format!("{u:?} is not a redis:// URL (TLS to Redis is not built in)"));
                    }
                }
                if r.timeout.get().is_zero() {
                    err("state.redis.timeout".into(), "must be greater than 0".into());
                }
            }
        }
    }
    for (i, s) in c.server.required_services.iter().enumerate() {
        if !c.services.contains_key(s) {
            err(format!("server.required_services[{i}]"), format!("unknown service {s:?}"));
        }
    }
    // CORS header lists hold header names only (RFC 9110 §5.1 tokens): a CR/LF or a space would
    // make the joined list an invalid header value, and the whole list would be dropped.
    if let Some(cors) = &c.cors {
        for (field, list) in [("allowed_headers", &cors.allowed_headers), ("exposed_headers", &cors.exposed_headers)] {
            for (i, h) in list.iter().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    err(format!("cors.{field}[{i}]"), format!("{h:?} is not a header name"));
                }
            }
        }
    }
    if let Some(t) = &s_admin_token(c)
        && t.chars().count() < 16
    {
        err("server.admin_token".into(), "must be at least 16 characters".into());
    }
    if c.trading.halt_sync_interval.is_some_and(|d| d.get().is_zero()) {
        err("trading.halt_sync_interval".into(), "must be greater than 0".into());
    }
    if c.websocket.max_connections == 0 || c.websocket.max_per_principal == 0 {
        err("websocket".into(), "max_connections and max_per_principal must be at least 1".into());
    }
    for (name, d) in [("idle_timeout", c.websocket.idle_timeout), ("max_lifetime", c.websocket.max_lifetime)] {
        if d.get().is_zero() {
            err(format!("websocket.{name}"), "must be greater than 0".into());
        }
    }
    if c.rate_limits.max_keys == 0 {
        err("rate_limits.max_keys".into(), "must be at least 1".into());
    }
}

fn s_admin_token(c: &Config) -> Option<String> {
    c.server.admin_token.as_ref().map(|t| t.expose().to_string())
}
