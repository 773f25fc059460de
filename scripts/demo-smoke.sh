#!/usr/bin/env bash
# Runs the README's demo command exactly as written (taken from between the demo markers in
# README.md), waits until it says it is ready, and checks that a proxied request answers.
# Ports: the command is unchanged; free loopback ports are passed through the environment
# variables the shipped config reads, so a busy 8080 on a developer machine does not fail it.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=$(awk '/<!-- demo-command:start -->/{f=1; next} /<!-- demo-command:end -->/{f=0} f && !/^```/' README.md | sed '/^\s*$/d')
[ -n "$cmd" ] || { echo "demo command not found in README.md" >&2; exit 1; }
echo "demo command: $cmd"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
gw=$(free_port); admin=$(free_port)
export B25_GATEWAY_LISTEN="127.0.0.1:$gw" B25_GATEWAY_ADMIN_LISTEN="127.0.0.1:$admin" B25_GATEWAY_LOG_LEVEL=warn
for v in MARKET_DATA_URL ORDER_EXECUTION_URL STRATEGY_ENGINE_URL ACCOUNT_MONITOR_URL RISK_MANAGER_URL CONFIGURATION_URL DASHBOARD_URL; do
  export "$v=http://127.0.0.1:$(free_port)"
done

out=$(mktemp)
setsid bash -c "$cmd" >"$out" 2>&1 &
pid=$!
cleanup() { kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$out"; }
trap cleanup EXIT

# The demo prints "is ready" once the gateway reports ready (cargo may compile first).
for _ in $(seq 1 1800); do
  grep -q "is ready" "$out" && break
  kill -0 "$pid" 2>/dev/null || { cat "$out"; echo "demo exited early" >&2; exit 1; }
  sleep 0.2
done
grep -q "is ready" "$out" || { cat "$out"; echo "demo never became ready" >&2; exit 1; }

# Without credentials: 401. With the viewer token the demo printed: the simulated ticker.
unauth=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw/api/v1/market/ticker/BTCUSDT")
[ "$unauth" = 401 ] || { echo "expected 401 without credentials, got $unauth" >&2; exit 1; }
viewer=$(sed -n 's/^ *export VIEWER=//p' "$out" | head -n1)
[ -n "$viewer" ] || { cat "$out"; echo "the demo printed no viewer token" >&2; exit 1; }
body=$(curl -sS --max-time 5 -w ' %{http_code}' -H "Authorization: Bearer $viewer" "http://127.0.0.1:$gw/api/v1/market/ticker/BTCUSDT")
echo "proxied answer: $body"
case "$body" in
  *'"symbol":"BTCUSDT"'*' 200') ;;
  *) echo "unexpected answer from the demo" >&2; exit 1 ;;
esac

# A reload of the demo's own file succeeds (it is read with the demo's secrets, as at start),
# and the demo's API key still works after it.
reload=$(curl -sS --max-time 10 -X POST "http://127.0.0.1:$admin/admin/reload")
case "$reload" in
  *'"success"'*) ;;
  *) echo "the demo refused a reload of its own config: $reload" >&2; exit 1 ;;
esac
key=$(sed -n 's/^ *export API_KEY=\([^ ]*\).*/\1/p' "$out" | head -n1)
[ -n "$key" ] || { cat "$out"; echo "the demo printed no API key" >&2; exit 1; }
code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -H "X-API-Key: $key" "http://127.0.0.1:$gw/api/v1/market/ticker/BTCUSDT")
[ "$code" = 200 ] || { echo "the demo API key got $code after a reload" >&2; exit 1; }
echo "demo smoke test passed" 
