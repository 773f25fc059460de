//! A config snapshot: everything a request needs, resolved once when the config is loaded.
//!
//! Routes hold their upstream, timeout, rewrite and metric label directly; a request clones one
//! `Arc<Snapshot>` at its start and keeps it until it ends, so a reload (one `ArcSwap::store`)
//! never changes a live request.

use crate::auth::roles::RoleSet;
use crate::auth::{Authenticator, Methods};
use crate::config::{AuthMethod, Config, ConfigError, RouteConfig};
use crate::pipeline::cors::Cors;
use crate::pipeline::validate::Limits;
use crate::proxy::Upstream;
use crate::ratelimit::{RateLimiter, RouteLimits};
use crate::router::{RouteSpec, RouteTable};
use http::HeaderName;
use http::Method;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// One route, resolved.
#[derive(Debug)]
pub struct Route {
    /// The route id, also the metric label.
    pub id: Arc<str>,
    /// Where it goes.
    pub upstream: Arc<Upstream>,
    /// Upstream response-header timeout.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: u64,
    /// Reachable without credentials.
    pub public: bool,
    /// Principal roles that may use the route (resolved from the hierarchy).
    pub allowed: RoleSet,
    /// Authentication methods accepted.
    pub auth: Methods,
    /// Headers the request must carry.
    pub required_headers: Vec<HeaderName>,
    /// The route's rate limits.
    pub limits: RouteLimits,
    /// Position in the config (rate-limit keys).
    pub index: u32,
    /// Metric handles, resolved once (see [`Snapshot::resolve_metrics`]).
    pub metrics: std::sync::OnceLock<Arc<crate::observe::RouteMetrics>>,
    /// Headers set on or removed from the request sent upstream (`request_headers`).
    pub request_headers: Option<crate::proxy::headers::HeaderEdit>,
    /// Headers set on or removed from the upstream's response (`response_headers`).
    pub response_headers: Option<crate::proxy::headers::HeaderEdit>,
    /// The route as configured (content types, cache, idempotency for later layers).
    pub config: RouteConfig,
}

impl Route {
    /// The upstream path for the (normalised) client path: `strip_prefix` then `add_prefix`.
    pub fn rewrite<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        let c = &self.config;
        if c.strip_prefix.is_none() && c.add_prefix.is_none() {
            return path.into();
        }
        let mut rest = path;
        if let Some(p) = &c.strip_prefix {
            rest = rest.strip_prefix(p.as_str()).unwrap_or(rest);
        }
        let prefix = c.add_prefix.as_deref().unwrap_or("").trim_end_matches('/');
        let mut out = String::with_capacity(prefix.len() + rest.len() + 1);
        out.push_str(prefix);
        // `/api/v1/market/stream` stripped whole and prefixed with `/ws` is `/ws`, not `/ws/`.
        if !rest.is_empty() && !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        out.into()
    }
}

/// Everything derived from one config.
pub struct Snapshot {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Authentication and roles.
    pub auth: Authenticator,
    /// CORS policy, if configured.
    pub cors: Option<Cors>,
    /// Request limits.
    pub limits: Limits,
    /// Client body idle timeout.
    pub body_idle: Duration,
    /// Rate limits.
    pub ratelimit: RateLimiter,
    /// Path templates → routes.
    pub routes: RouteTable<Arc<Route>>,
    /// Services by name (for `/health`).
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Every route, in config order.
    pub all_routes: Vec<Arc<Route>>,
}

impl Snapshot {
    /// Resolves every route's metric handles (called before the snapshot serves traffic).
    pub fn resolve_metrics(&self, metrics: &crate::observe::Metrics) {
        for r in &self.all_routes {
            let _ = r.metrics.set(metrics.route(&r.id));
        }
    }

    /// Builds the snapshot from a validated config.
    pub fn build(config: Config) -> Result<Self, Vec<ConfigError>> {
        let mut upstreams = BTreeMap::new();
        let mut errors = Vec::new();
        let workers = config.server.worker_count();
        for (name, svc) in &config.services {
            match Upstream::new(name, svc, workers) {
                Ok(u) => {
                    upstreams.insert(name.clone(), Arc::new(u));
                }
                Err(e) => errors.push(ConfigError::new(format!("services.{name}"), e)),
            }
        }
        let auth = Authenticator::new(&config.auth, config.rate_limits.principal_claim.clone(), &mut errors);
        let ratelimit = RateLimiter::new(&config.rate_limits, &config.server.trusted_proxies, &mut errors);
        let cors = config.cors.as_ref().map(|c| Cors::new(c, &mut errors));
        let l = &config.server.limits;
        let limits = Limits {
            max_uri: l.max_uri_length.bytes() as usize,
            max_headers: l.max_headers,
            max_header_bytes: l.max_header_bytes.bytes() as usize,
        };
        let mut specs = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            let Some(upstream) = upstreams.get(&r.service) else {
                errors.push(ConfigError::new(format!("routes[{i}].service"), "unknown service"));
                continue;
            };
            // Validated before: an edit that cannot be parsed never gets here.
            let (request_headers, response_headers) = config.header_edits(r);
            let route = Arc::new(Route {
                request_headers: request_headers.ok().flatten(),
                response_headers: response_headers.ok().flatten(),
                id: r.id.as_str().into(),
                upstream: upstream.clone(),
                timeout: config.route_timeout(r).get(),
                max_body: r.max_body.unwrap_or(config.server.limits.max_body).bytes(),
                public: r.public,
                allowed: auth.roles.allowed_by(&r.roles),
                auth: match &r.auth {
                    Some(list) => Methods {
                        jwt: list.contains(&AuthMethod::Jwt) && auth.jwt.is_some(),
                        api_key: list.contains(&AuthMethod::ApiKey) && auth.api_key_header().is_some(),
                    },
                    None => auth.configured(),
                },
                required_headers: r
                    .required_headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
                limits: RouteLimits::new(r.rate_limit.as_ref(), r.principal_rate_limit.as_ref()),
                index: i as u32,
                metrics: std::sync::OnceLock::new(),
                config: r.clone(),
            });
            let methods = r.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect();
            specs.push((format!("routes[{i}]"), route, methods));
        }
        let routes = RouteTable::build(specs.iter().map(|(p, route, methods)| RouteSpec {
            config_path: p.clone(),
            id: &route.config.id,
            template: &route.config.path,
            methods: Vec::clone(methods),
            value: route.clone(),
        }));
        match routes {
            Ok(routes) if errors.is_empty() => Ok(Self {
                body_idle: config.server.limits.body_idle_timeout.get(),
                ratelimit,
                config: Arc::new(config),
                auth,
                cors,
                limits,
                routes,
                upstreams,
                all_routes: specs.iter().map(|(_, r, _)| r.clone()).collect(),
            }),
            Ok(_) => Err(errors),
            Err(e) => {
                errors.extend(e);
                Err(errors)
            }
        }
    }
}
