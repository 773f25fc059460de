//! The route table: path templates (matchit) → per-method routes.
//!
//! matchit gives static segments priority over parameters (`/orders/active` beats
//! `/orders/{id}`) and refuses ambiguous templates at insert time, which is how the config
//! validation finds conflicting routes. Several routes may share one template with different
//! methods; the `Allow` header for a 405 is precomputed per template.

use crate::config::ConfigError;
use http::{HeaderValue, Method};

/// What the table says about a request's method and path.
pub enum Match<'t, 'p, T> {
    /// A route serves this method on this path.
    Found {
        /// The route.
        route: &'t T,
        /// Path parameters, by name.
        params: matchit::Params<'t, 'p>,
    },
    /// The path exists but not with this method.
    MethodNotAllowed {
        /// Value for the `Allow` header.
        allow: &'t HeaderValue,
    },
    /// No template matches the path.
    NotFound,
}

struct PathEntry<T> {
    template: String,
    methods: Vec<(Method, T)>,
    allow: HeaderValue,
}

/// Immutable once built; shared by every request of one config snapshot.
pub struct RouteTable<T> {
    router: matchit::Router<usize>,
    entries: Vec<PathEntry<T>>,
}

/// One route to insert: its config path (for errors), id, template, methods and payload.
pub struct RouteSpec<'a, T> {
    /// `routes[3]`, for error messages.
    pub config_path: String,
    /// The route id.
    pub id: &'a str,
    /// The path template.
    pub template: &'a str,
    /// Methods served.
    pub methods: Vec<Method>,
    /// Payload returned on a match.
    pub value: T,
}

impl<T: Clone> RouteTable<T> {
    /// Builds the table, reporting every conflict (template or method) with its config path.
    pub fn build<'a>(specs: impl IntoIterator<Item = RouteSpec<'a, T>>) -> Result<Self, Vec<ConfigError>> {
        let mut router = matchit::Router::new();
        let mut entries: Vec<PathEntry<T>> = Vec::new();
        // (entry index, route id per method) to name the first owner in conflict messages.
        let mut owners: Vec<Vec<(Method, String)>> = Vec::new();
        let mut errors = Vec::new();
        for spec in specs {
            let idx = match entries.iter().position(|e| e.template == spec.template) {
                Some(i) => i,
                None => {
                    let i = entries.len();
                    if let Err(e) = router.insert(spec.template, i) {
                        let msg = match &e {
                            matchit::InsertError::Conflict { with } => {
                                let other = entries
                                    .iter()
                                    .zip(&owners)
                                    .find(|(en, _)| &en.template == with)
                                    .and_then(|(_, o)| o.first().map(|(_, id)| id.clone()))
                                    .unwrap_or_default();
                                format!(
                                    "path {:?} conflicts with {:?} of route {:?}: matchit cannot tell them apart",
                                    spec.template, with, other
                                )
                            }
                            other => format!("invalid path template {:?}: {other}", spec.template),
                        };
                        errors.push(ConfigError::new(format!("{}.path", spec.config_path), msg));
                        continue;
                    }
                    entries.push(PathEntry {
                        template: spec.template.to_string(),
                        methods: Vec::new(),
                        allow: HeaderValue::from_static(""),
                    });
                    owners.push(Vec::new());
                    i
                }
            };
            for m in spec.methods {
                if let Some((_, other)) = owners[idx].iter().find(|(om, _)| *om == m) {
                    errors.push(ConfigError::new(
                        format!("{}.methods", spec.config_path),
                        format!("{m} {} is already served by route {other:?} (conflicting routes)", spec.template),
                    ));
                    continue;
                }
                owners[idx].push((m.clone(), spec.id.to_string()));
                entries[idx].methods.push((m, spec.value.clone()));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for e in &mut entries {
            let allow: Vec<&str> = e.methods.iter().map(|(m, _)| m.as_str()).collect();
            e.allow = HeaderValue::from_str(&allow.join(", ")).unwrap_or(HeaderValue::from_static(""));
        }
        Ok(Self { router, entries })
    }

    /// Looks up `path` (already normalised) and `method`. No allocation.
    pub fn lookup<'t, 'p>(&'t self, method: &Method, path: &'p str) -> Match<'t, 'p, T> {
        let Ok(m) = self.router.at(path) else {
            return Match::NotFound;
        };
        let entry = &self.entries[*m.value];
        match entry.methods.iter().find(|(em, _)| em == method) {
            Some((_, route)) => Match::Found { route, params: m.params },
            None => Match::MethodNotAllowed { allow: &entry.allow },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(id: &'a str, t: &'a str, m: &[Method]) -> RouteSpec<'a, &'a str> {
        RouteSpec { config_path: format!("routes.{id}"), id, template: t, methods: m.to_vec(), value: id }
    }

    #[test]
    fn static_beats_param_and_405_lists_methods() {
        let t = RouteTable::build([
            spec("get", "/orders/{id}", &[Method::GET]),
            spec("del", "/orders/{id}", &[Method::DELETE]),
            spec("active", "/orders/active", &[Method::GET]),
        ])
        .unwrap();
        match t.lookup(&Method::GET, "/orders/active") {
            Match::Found { route, .. } => assert_eq!(*route, "active"),
            _ => panic!("no match"),
        }
        match t.lookup(&Method::GET, "/orders/42") {
            Match::Found { route, params } => {
                assert_eq!(*route, "get");
                assert_eq!(params.get("id"), Some("42"));
            }
            _ => panic!("no match"),
        }
        match t.lookup(&Method::POST, "/orders/42") {
            Match::MethodNotAllowed { allow } => assert_eq!(allow, "GET, DELETE"),
            _ => panic!("expected 405"),
        }
        assert!(matches!(t.lookup(&Method::GET, "/nope"), Match::NotFound));
    }

    #[test]
    fn conflicts_are_errors() {
        let errs = RouteTable::build([
            spec("a", "/orders/{id}", &[Method::GET]),
            spec("b", "/orders/{oid}", &[Method::GET]),
            spec("c", "/orders/{id}", &[Method::GET]),
        ])
        .err()
        .unwrap();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].path == "routes.b.path" && errs[0].message.contains("conflicts"));
        assert!(errs[1].path == "routes.c.methods" && errs[1].message.contains("\"a\""));
    }
}
