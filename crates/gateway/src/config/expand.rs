//! `${VAR}` and `${VAR:-default}` expansion inside YAML string values.
//!
//! Expansion runs on the parsed YAML tree, not on the raw text, so a variable's value can never
//! inject YAML structure (a newline or `: ` in a secret stays inside its string), and every error
//! names the config path where the variable is used. `$$` is a literal `$`.

use super::ConfigError;
use serde_json::Value;

/// Where variable values come from; tests pass a closure instead of touching the process env.
pub trait Env {
    /// The variable's value, or `None` when unset.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Expands every string in `value` in place; returns every error found (not just the first).
pub fn expand_tree(value: &mut Value, path: &mut String, env: &dyn Env, errors: &mut Vec<ConfigError>) {
    match value {
        Value::String(s) if s.contains('$') => match expand_str(s, env) {
            Ok(out) => *s = out,
            Err(msgs) => {
                for message in msgs {
                    errors.push(ConfigError::new(path.clone(), message));
                }
            }
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_tree(item, path, env, errors);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_tree(v, path, env, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Expands one string; on failure returns one message per problem.
pub fn expand_str(input: &str, env: &dyn Env) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(input.len());
    let mut errors = Vec::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                // The value is not quoted: it may be a secret (or hold one from the environment).
                errors.push("unterminated \"${\": no closing \"}\"".to_string());
                return Err(errors);
            };
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                errors.push(format!("invalid variable name {name:?} in \"${{{expr}}}\""));
            } else {
                match (env.get(name), default) {
                    (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => errors.push(format!(
                        "environment variable {name} is not set (use ${{{name}:-default}} to give a default)"
                    )),
                }
            }
            rest = &body[end + 1..];
        } else {
            // A lone `$` not followed by `{` or `$` is kept as written.
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands() {
        assert_eq!(expand_str("http://${HOST}:80", &env).unwrap(), "http://10.0.0.1:80");
        assert_eq!(expand_str("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(expand_str("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand_str("$$HOME $x", &env).unwrap(), "$HOME $x");
        let e = expand_str("${NOPE}", &env).unwrap_err();
        assert!(e[0].contains("NOPE"), "{e:?}");
        assert!(expand_str("${HOST", &env).is_err());
        assert!(expand_str("${1X}", &env).is_err());
    }

    #[test]
    fn tree_errors_name_the_path() {
        let mut v: Value = serde_json::json!({"routes": [{"service": "a"}, {"service": "${MISSING}"}]});
        let mut errors = Vec::new();
        expand_tree(&mut v, &mut String::new(), &env, &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "routes[1].service");
        assert!(errors[0].message.contains("MISSING"));
    }
}
