#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs exactly this).
# Installs what the tests need when missing (as root, with apt-get), then runs formatting and
# lint gates, the whole test suite over real sockets, and the README demo smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# jemalloc (the gateway's allocator) is built from source with make.
command -v make >/dev/null 2>&1 || need_apt+=(make)
# Rate-limit tests start their own redis-server processes (standalone and cluster).
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
# promtool checks /metrics, the alert rules and their unit tests.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
python3 -c 'import venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian starts the packaged service where it can; the tests run their own servers.
    { command -v service >/dev/null 2>&1 && service redis-server stop; } >/dev/null 2>&1 || true
    { command -v service >/dev/null 2>&1 && service prometheus stop; } >/dev/null 2>&1 || true
  else
    echo "missing tools: ${need_apt[*]} (install them, or run this script as root on Debian/Ubuntu)" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings

echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --all-features 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$status" -ne 0 ]; then
  echo "cargo test failed"
  echo "summary: ${passed} passed, $((failed > 0 ? failed : 1)) failed"
  exit "$status"
fi

echo "== README demo smoke test"
extra=0
if scripts/demo-smoke.sh; then passed=$((passed + 1)); else extra=$((extra + 1)); fi

echo "== deployment files (hadolint, kubernetes-validate, promtool rules, OpenAPI)"
if scripts/check-deploy.sh; then passed=$((passed + 1)); else extra=$((extra + 1)); fi

echo "summary: ${passed} passed, $((failed + extra)) failed"
[ "$extra" -eq 0 ]
