//! Build identity for `/version` and the `build_info` metric, set by `build.rs`.

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("B25_GIT_COMMIT");
/// Build time, RFC 3339 UTC (honours `SOURCE_DATE_EPOCH` for reproducible builds).
pub const BUILD_TIME: &str = env!("B25_BUILD_TIME");

/// The `/version` JSON.
pub fn json() -> serde_json::Value {
    serde_json::json!({"name": "b25-gateway", "version": VERSION, "git_commit": GIT_COMMIT, "build_time": BUILD_TIME})
}
