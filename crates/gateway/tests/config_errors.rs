//! One test per class of config error: the message names the path. Plus `check` on the
//! shipped config (exit 0) and on a broken one (exit 2, every error listed).

use b25_gateway::config::{self, ConfigErrors};
use std::process::Command;

const BASE_SERVICES: &str = "services:\n  orders: { instances: [\"http://127.0.0.1:9\"] }\n";

fn parse(yaml: &str) -> Result<config::Config, ConfigErrors> {
    config::parse(yaml, "t.yaml", &|n: &str| (n == "SET_VAR").then(|| "http://127.0.0.1:1".to_string()))
}

fn errors_of(yaml: &str) -> Vec<(String, String)> {
    let e = parse(yaml).expect_err("config must be refused");
    e.errors.into_iter().map(|e| (e.path, e.message)).collect()
}

fn assert_error(yaml: &str, path: &str, needle: &str) {
    let errs = errors_of(yaml);
    assert!(
        errs.iter().any(|(p, m)| p == path && m.contains(needle)),
        "expected an error at {path} mentioning {needle:?}, got {errs:#?}"
    );
}

fn route(extra: &str) -> String {
    format!("routes:\n  - {{ id: r1, path: /a, methods: [GET], service: orders, public: true{extra} }}\n")
}

#[test]
fn unknown_field() {
    assert_error(&format!("{BASE_SERVICES}{}", route(", colour: blue")), "routes[0].colour", "unknown field");
    assert_error(
        &format!("server: {{ listne: \"x\" }}\n{BASE_SERVICES}{}", route("")),
        "server.listne",
        "unknown field",
    );
    assert_error(&format!("bogus: 1\n{BASE_SERVICES}{}", route("")), "bogus", "unknown field");
}

#[test]
fn bad_duration() {
    assert_error(&format!("{BASE_SERVICES}{}", route(", timeout: 5 parsecs")), "routes[0].timeout", "duration");
    assert_error(&format!("{BASE_SERVICES}{}", route(", timeout: 5")), "routes[0].timeout", "duration");
}

#[test]
fn bad_size() {
    assert_error(&format!("{BASE_SERVICES}{}", route(", max_body: 1 lots")), "routes[0].max_body", "size");
}

#[test]
fn unknown_service() {
    let yaml =
        format!("{BASE_SERVICES}routes:\n  - {{ id: r1, path: /a, methods: [GET], service: ordrs, public: true }}\n");
    assert_error(&yaml, "routes[0].service", "unknown service \"ordrs\"");
}

#[test]
fn duplicate_route_id() {
    let yaml = format!(
        "{BASE_SERVICES}routes:\n  - {{ id: r1, path: /a, methods: [GET], service: orders, public: true }}\n  - {{ id: r1, path: /b, methods: [GET], service: orders, public: true }}\n"
    );
    assert_error(&yaml, "routes[1].id", "duplicate route id \"r1\"");
}

#[test]
fn a_value_refused_by_the_expansion_is_reported_once() {
    let yaml = "logging: { format: \"${1BAD}\" }\nservices:\n  orders: { instances: [\"http://127.0.0.1:1\"] }\n"
        .to_string()
        + &route("");
    let errs = errors_of(&yaml);
    let at: Vec<_> = errs.iter().filter(|(p, _)| p == "logging.format").collect();
    assert_eq!(at.len(), 1, "{errs:#?}");
    assert!(at[0].1.contains("1BAD"), "{errs:#?}");
}

#[test]
fn unset_env_var() {
    let yaml = "services:\n  orders: { instances: [\"${UNSET_VAR_FOR_TEST}\"] }\n".to_string() + &route("");
    assert_error(&yaml, "services.orders.instances[0]", "UNSET_VAR_FOR_TEST");
    // With a default, or when set, it expands.
    let ok = "services:\n  orders: { instances: [\"${UNSET_VAR_FOR_TEST:-http://127.0.0.1:2}\", \"${SET_VAR}\"] }\n"
        .to_string()
        + &route("");
    let c = parse(&ok).unwrap();
    let urls: Vec<&str> = c.services["orders"].instances.iter().map(|i| i.url()).collect();
    assert_eq!(urls, ["http://127.0.0.1:2", "http://127.0.0.1:1"]);
}

#[test]
fn conflicting_routes() {
    let yaml = format!(
        "{BASE_SERVICES}routes:\n  - {{ id: a, path: \"/o/{{id}}\", methods: [GET], service: orders, public: true }}\n  - {{ id: b, path: \"/o/{{oid}}\", methods: [GET], service: orders, public: true }}\n"
    );
    assert_error(&yaml, "routes[1].path", "conflicts");
    let same = format!(
        "{BASE_SERVICES}routes:\n  - {{ id: a, path: /o, methods: [GET, POST], service: orders, public: true }}\n  - {{ id: b, path: /o, methods: [POST], service: orders, public: true }}\n"
    );
    assert_error(&same, "routes[1].methods", "already served by route \"a\"");
}

#[test]
fn every_error_is_listed_not_just_the_first() {
    let yaml = "server: { listen: nope, extra: 1 }\nservices:\n  orders: { instances: [\"ftp://x\"], timeot: 1s }\nroutes:\n  - { id: a, path: /a, methods: [GET], service: ordrs, public: true }\n  - { id: a, path: b, methods: [FETCH], service: orders, roles: [god] }\n";
    let errs = errors_of(yaml);
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    for p in [
        "server.extra",
        "server.listen",
        "services.orders.timeot",
        "services.orders.instances[0]",
        "routes[0].service",
        "routes[1].id",
        "routes[1].path",
        "routes[1].methods[0]",
        "routes[1].roles[0]",
    ] {
        assert!(paths.contains(&p), "missing {p} in {errs:#?}");
    }
}

#[test]
fn shipped_config_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .current_dir(&root)
        .args(["check", "--config", "config/gateway.yaml"])
        .env_remove("B25_GATEWAY_CONFIG")
        .env("B25_JWT_SECRET", "a-long-enough-secret-for-hs256-0123456789")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("routes (35)"), "{stdout}");
    assert!(stdout.contains("configuration OK"));
    // As in the issue and like `nginx -t`: the file may also be given positionally, and the
    // shipped file validates with no environment at all (a warning names the placeholder
    // secret that `run` refuses).
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .current_dir(&root)
        .args(["check", "config/gateway.yaml"])
        .env_remove("B25_JWT_SECRET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("warning") && stdout.contains("B25_JWT_SECRET"), "{stdout}");
    // `run` refuses the placeholder, before binding anything.
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway"))
        .current_dir(&root)
        .args(["run", "config/gateway.yaml"])
        .env_remove("B25_JWT_SECRET")
        .env("B25_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("B25_GATEWAY_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("placeholder secret"));
}

#[test]
fn check_lists_every_error_with_file_and_path_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("b25-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "services:\n  orders: { instances: [\"http://127.0.0.1:9\"], timeout: soon }\nroutes:\n  - { id: a, path: /a, methods: [GET], service: nope, public: true }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway")).args(["check", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    assert!(stderr.contains(&format!("{f}: services.orders.timeout: ")), "{stderr}");
    assert!(stderr.contains(&format!("{f}: routes[0].service: unknown service \"nope\"")), "{stderr}");
    // `run` refuses the same file the same way, before binding anything.
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway")).args(["run", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].service"));
    // And so does `run`, the default subcommand, given the file alone: `b25-gateway FILE`.
    let out = Command::new(env!("CARGO_BIN_EXE_b25-gateway")).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{f}: routes[0].service")));
}

#[test]
fn absurd_durations_are_refused_not_overflowed_later() {
    assert_error(&format!("{BASE_SERVICES}{}", route(", timeout: 1000000h")), "routes[0].timeout", "at most 1h");
    let yaml = format!("server: {{ shutdown_grace: 1000000h }}\n{BASE_SERVICES}{}", route(""));
    assert_error(&yaml, "server.shutdown_grace", "at most");
}

#[test]
fn absurd_worker_counts_are_refused() {
    let yaml = format!("server: {{ workers: 100000 }}\n{BASE_SERVICES}{}", route(""));
    assert_error(&yaml, "server.workers", "more than 1024");
    let ok = format!("server: {{ workers: 3 }}\n{BASE_SERVICES}{}", route(""));
    assert_eq!(parse(&ok).unwrap().server.worker_count(), 3);
    let auto = format!("server: {{ workers: 0 }}\n{BASE_SERVICES}{}", route(""));
    assert!(parse(&auto).unwrap().server.worker_count() >= 1);
}

#[test]
fn cache_statuses_that_are_not_complete_answers_to_a_get_are_refused() {
    // A 206 or a 304 stored would be replayed to plain GETs (RFC 9111 §3.3, §4.3.4).
    let yaml = format!("{BASE_SERVICES}{}", route(", cache: { ttl: 1s, statuses: [200, 206, 304, 101, 404, 700] }"));
    let errs = errors_of(&yaml);
    for (i, needle) in
        [(1, "206 cannot be stored"), (2, "304 cannot be stored"), (3, "101 cannot be stored"), (5, "700")]
    {
        let path = format!("routes[0].cache.statuses[{i}]");
        assert!(errs.iter().any(|(p, m)| *p == path && m.contains(needle)), "{path} {needle:?}: {errs:#?}");
    }
    assert_eq!(errs.len(), 4, "200 and 404 are fine: {errs:#?}");
    let ok = format!("{BASE_SERVICES}{}", route(", cache: { ttl: 1s, statuses: [200, 203, 204, 301, 404, 500] }"));
    parse(&ok).unwrap();
}

/// No message quotes a secret: not the `${…}` expansion's (an unterminated `${` in a secret),
/// not a type error on a secret, not an upstream URL's password from the environment.
#[test]
fn secrets_are_never_quoted_in_errors() {
    let all = |yaml: &str| format!("{:#?}", errors_of(yaml));
    let jwt = |secret: &str| {
        format!(
            "auth: {{ jwt: {{ issuers: [{{ issuer: i, audiences: [a], algorithms: [HS256], secret: {secret} }}] }} }}\n{BASE_SERVICES}{}",
            route("")
        )
    };
    for yaml in [
        jwt("\"TOPSECRET-jwt-0123456789abcdef0123${x\""),
        jwt("123456789012345678901234567890123"),
        format!("server: {{ admin_token: \"TOPSECRET-admin-token${{\" }}\n{BASE_SERVICES}{}", route("")),
        format!("server: {{ admin_token: 98765432109876543210 }}\n{BASE_SERVICES}{}", route("")),
        format!(
            "state: {{ backend: redis, redis: {{ url: \"redis://:TOPSECRET-redis@127.0.0.1:6379/0${{\" }} }}\n{BASE_SERVICES}{}",
            route("")
        ),
        format!("services:\n  orders: {{ instances: [\"http://svc:TOPSECRET-pw@127.0.0.1:9\"] }}\n{}", route("")),
    ] {
        let shown = all(&yaml);
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(!shown.contains("1234567890123") && !shown.contains("9876543210"), "{shown}");
    }
    for redis in ["\"redis://:TOPSECRET-redis@h:1\"", "{ url: 42, cluster: [\"redis://:TOPSECRET-c@h:1\", 7] }"] {
        let shown = all(&format!("state: {{ backend: redis, redis: {redis} }}\n{BASE_SERVICES}{}", route("")));
        assert!(!shown.contains("TOPSECRET"), "{shown}");
    }
    // The rest of the Redis section is not secret: a misspelt key is named, with the known ones.
    assert_error(
        &format!(
            "state: {{ backend: redis, redis: {{ url: \"redis://127.0.0.1:6379\", key_prefx: gw1 }} }}\n{BASE_SERVICES}{}",
            route("")
        ),
        "state.redis.key_prefx",
        "unknown field `key_prefx`, expected one of `url`",
    );
    assert_error(&jwt("\"abc${x\""), "auth.jwt.issuers[0].secret", "unterminated");
    assert_error(
        &format!("services:\n  orders: {{ instances: [\"http://svc:TOPSECRET-pw@127.0.0.1:9\"] }}\n{}", route("")),
        "services.orders.instances[0]",
        "credentials",
    );
}

/// Values that would make every request on a route fail are refused at `check`, not found by
/// clients: an instance without a host, a path prefix that is no path, a header list entry
/// that is no header name, a directory as the TLS certificate; the admin token's length is
/// counted in characters; a typo in an instance mapping is named.
#[test]
fn values_that_cannot_work_are_refused_by_name() {
    assert_error(
        &format!("services:\n  orders: {{ instances: [\"http://:9\"] }}\n{}", route("")),
        "services.orders.instances[0]",
        "a host is required",
    );
    for prefix in ["\"/a\\r\\nX-Injected: yes\"", "\"/a b\"", "\"/a\\\"\""] {
        assert_error(
            &format!("{BASE_SERVICES}{}", route(&format!(", add_prefix: {prefix}"))),
            "routes[0].add_prefix",
            "plain path",
        );
    }
    let ok = parse(&format!("{BASE_SERVICES}{}", route(", add_prefix: \"/v1/x~y_z.%20(1)\""))).map(|_| ());
    assert!(ok.is_ok(), "{ok:?}");
    for field in ["allowed_headers", "exposed_headers"] {
        assert_error(
            &format!(
                "cors: {{ allowed_origins: [\"https://a.example\"], {field}: [\"x-ok\", \"x-bad\\r\\nx: y\"] }}\n{BASE_SERVICES}{}",
                route("")
            ),
            &format!("cors.{field}[1]"),
            "not a header name",
        );
    }
    let dir = std::env::temp_dir();
    assert_error(
        &format!("server: {{ tls: {{ cert: {dir:?}, key: {dir:?} }} }}\n{BASE_SERVICES}{}", route("")),
        "server.tls.cert",
        "is not a file",
    );
    assert_error(
        &format!("server: {{ admin_token: \"ééééééééé\" }}\n{BASE_SERVICES}{}", route("")),
        "server.admin_token",
        "16 characters",
    );
    let errs = errors_of(&format!(
        "services:\n  orders: {{ instances: [{{ url: \"http://127.0.0.1:9\", weigth: 2 }}, 5, {{ url: \"http://127.0.0.1:8\", weight: 0 }}] }}\n{}",
        route("")
    ));
    assert!(
        errs.iter().any(|(p, m)| p.starts_with("services.orders.instances[0]")
            && m.contains("weigth")
            && m.contains("weight")),
        "{errs:#?}"
    );
}

/// A config path that is not a regular file, or a huge one, is refused without reading it whole.
#[test]
fn the_config_file_must_be_a_regular_file_of_bounded_size() {
    let e = config::load(std::path::Path::new("/dev/zero")).expect_err("a device");
    assert!(e.errors[0].message.contains("not a regular file"), "{e:?}");
    let big = std::env::temp_dir().join(format!("b25-big-{}.yaml", std::process::id()));
    std::fs::write(&big, vec![b'#'; 5 * 1024 * 1024]).unwrap();
    let e = config::load(&big).expect_err("too large");
    std::fs::remove_file(&big).unwrap();
    assert!(e.errors[0].message.contains("too large"), "{e:?}");
}

/// The YAML library's hints to programmers are not shown to operators.
#[test]
fn yaml_errors_speak_to_operators() {
    let dup = format!("{BASE_SERVICES}{}", route(", public: true"));
    let multi = format!("{BASE_SERVICES}{}---\nservices: {{}}\n", route(""));
    // A `!!binary` value that is not UTF-8 where a string belongs.
    let binary = format!(
        "{BASE_SERVICES}routes:\n  - {{ id: r1, path: !!binary L/8=, methods: [GET], service: orders, public: true }}\n"
    );
    for yaml in [dup, multi, binary] {
        let shown = format!("{:?}", errors_of(&yaml));
        assert!(!shown.contains("Options") && !shown.contains("from_str_multiple"), "{shown}");
        assert!(!shown.contains("If you just use") && !shown.contains("ignore_binary"), "{shown}");
    }
}

#[test]
fn zero_rate_limits_on_a_route_are_refused() {
    // A zero would otherwise count as 1 (rate, burst) or remove the limit (per).
    for (limit, field) in [
        (", rate_limit: { rate: 0 }", "rate_limit"),
        (", rate_limit: { rate: 5, burst: 0 }", "rate_limit"),
        (", principal_rate_limit: { rate: 5, per: 0s }", "principal_rate_limit"),
    ] {
        assert_error(
            &format!("{BASE_SERVICES}{}", route(limit)),
            &format!("routes[0].{field}"),
            "rate, per and burst must be greater than 0",
        );
    }
    parse(&format!("{BASE_SERVICES}{}", route(", rate_limit: { rate: 5, per: 1s, burst: 1 }")))
        .expect("a positive limit is accepted");
}

#[test]
fn jwks_urls_are_http_or_https_and_a_ca_file_goes_with_https() {
    let yaml = |url: &str, extra: &str| {
        format!(
            "auth:\n  jwt:\n    issuers:\n      - {{ issuer: i, audiences: [a], algorithms: [ES256], jwks_url: \"{url}\"{extra} }}\n{BASE_SERVICES}routes:\n  - {{ id: r1, path: /a, methods: [GET], service: orders, roles: [viewer] }}\n"
        )
    };
    assert_error(&yaml("ftp://idp.example/jwks", ""), "auth.jwt.issuers[0].jwks_url", "http:// or https://");
    assert_error(
        &yaml("http://idp.example/jwks", ", jwks_ca_file: /etc/hostname"),
        "auth.jwt.issuers[0].jwks_ca_file",
        "only used with an https:// jwks_url",
    );
    assert_error(
        &yaml("https://idp.example/jwks", ", jwks_ca_file: /nonexistent/ca.pem"),
        "auth.jwt.issuers[0].jwks_ca_file",
        "cannot read",
    );
    parse(&yaml("https://idp.example/jwks", "")).expect("an https JWKS URL is accepted");
}

/// Issuers and API keys are read item by item, as routes are: an item that cannot be read at
/// all (a required field missing) is reported and left out, and every other item is still
/// checked, with its own index in the file.
#[test]
fn every_bad_issuer_and_api_key_is_listed() {
    let h = "0".repeat(64);
    let yaml = format!(
        r#"auth:
  jwt:
    issuers:
      - {{ issuer: a, algorithms: [HS256], secret: "0123456789abcdef0123456789abcdef" }}
      - {{ issuer: b, audiences: [x], algorithms: [HS256], secret: short }}
  api_keys:
    keys:
      - {{ id: k0, sha256: "{h}" }}
      - {{ id: k1, sha256: "{h}", roles: [god] }}
      - {{ id: k2, roles: [viewer] }}
      - {{ id: k3, sha256: nothex, roles: [viewer] }}
{BASE_SERVICES}routes:
  - {{ id: r1, path: /a, methods: [GET], service: orders, roles: [viewer], auth: [api_key] }}
"#
    );
    let errs = errors_of(&yaml);
    for (path, needle) in [
        ("auth.jwt.issuers[0]", "missing field `audiences`"),
        ("auth.jwt.issuers[1].secret", "at least 32 bytes"),
        ("auth.api_keys.keys[0]", "missing field `roles`"),
        ("auth.api_keys.keys[1].roles[0]", "unknown role"),
        ("auth.api_keys.keys[2]", "missing field `sha256`"),
        ("auth.api_keys.keys[3].sha256", ""),
    ] {
        assert!(errs.iter().any(|(p, m)| p == path && m.contains(needle)), "{path} {needle:?}: {errs:#?}");
    }
    // Nothing is blamed on the items that were left out, nor on the route (api_key is on).
    assert!(!errs.iter().any(|(p, _)| p == "auth.jwt.issuers" || p.starts_with("routes")), "{errs:#?}");
}

/// An unknown key does not hide a required one that is missing (a Go-style `url:` instead of
/// `instances:` gets both errors), while a required key whose value is bad is reported once,
/// not again as missing.
#[test]
fn a_missing_field_is_reported_next_to_an_unknown_one() {
    let routes = "routes:\n  - { id: r1, path: /a, methods: [GET], service: orders, public: true }\n";
    let errors = errors_of(&format!("services:\n  orders: {{ url: \"http://127.0.0.1:1\" }}\n{routes}"));
    assert!(errors.iter().any(|(p, m)| p == "services.orders.url" && m.contains("unknown field")), "{errors:?}");
    assert!(
        errors.iter().any(|(p, m)| p == "services.orders" && m.contains("missing field `instances`")),
        "{errors:?}"
    );
    let errors = errors_of(&format!("services:\n  orders: {{ instances: 5 }}\n{routes}"));
    assert!(errors.iter().any(|(p, _)| p == "services.orders.instances"), "{errors:?}");
    assert!(!errors.iter().any(|(_, m)| m.contains("missing field")), "reported twice: {errors:?}");
}

/// Header edits: names the gateway owns, names with `_`, a name set twice in another case,
/// values that are not plain visible ASCII (a trailing space is malformed over HTTP/2), each
/// reported with its path; request values are never quoted (they may be credentials).
#[test]
fn header_edits_are_checked() {
    let yaml = format!(
        "{BASE_SERVICES}routes:\n  - {{ id: r1, path: /a, methods: [GET], service: orders, public: true, request_headers: {{ set: {{ X-A: \"secret \", x-b: \"\u{00e9}\", x_c: v, sec-websocket-key: k, x-d: \"1\", X-D: \"2\", x-forwarded-for: f }}, remove: [connection] }}, response_headers: {{ set: {{ x-request-id: r }}, remove: [access-control-allow-origin] }} }}\n"
    );
    let errors = errors_of(&yaml);
    for (path, needle) in [
        ("routes[0].request_headers.set.X-A", "not a valid header value"),
        ("routes[0].request_headers.set.x-b", "not a valid header value"),
        ("routes[0].request_headers.set.x_c", "'_'"),
        ("routes[0].request_headers.set.sec-websocket-key", "sets or strips"),
        ("routes[0].request_headers.set.x-forwarded-for", "sets or strips"),
        ("routes[0].request_headers.remove[0]", "sets or strips"),
        ("routes[0].response_headers.set.x-request-id", "sets or strips"),
        ("routes[0].response_headers.remove[0]", "sets or strips"),
    ] {
        assert!(errors.iter().any(|(p, m)| p == path && m.contains(needle)), "{path}: {errors:#?}");
    }
    assert!(errors.iter().any(|(_, m)| m.contains("set twice")), "{errors:#?}");
    assert!(!errors.iter().any(|(_, m)| m.contains("secret")), "a request value quoted: {errors:#?}");
}
