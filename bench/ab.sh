#!/usr/bin/env bash
# A/B one change: the same gateway setup on two (or more) binaries, runs alternated.
#
#   cp target/release/b25-gateway /tmp/gw-before      # build, change, build again, then:
#   bench/ab.sh /tmp/gw-before target/release/b25-gateway
#   MODE=full ROUNDS=4 DURATION=6s bench/ab.sh /tmp/gw-a /tmp/gw-b
#
# MODE: bare (public route, no log), full (JWT + per-principal limit + access log), cache (a
# public cached route: every request after the first is a hit) or order (POST /api/v1/orders with
# a JSON order and a new Idempotency-Key each, as in full, to order-execution). WARMUP: the
# unmeasured load before the rounds (2s).
# Prints req/s, CPU µs per request (from /proc), peak RSS, and the connections open to the
# upstream after each run (all binaries together, from ss: a pool that churns shows here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6s}
CONNS=${CONNS:-64}
MODE=${MODE:-bare}
WORK=$(mktemp -d /tmp/b25-ab.XXXXXX)
# The gateways' output (gw-full's access log) goes to memory where it can: written to disk it
# is flushed by kernel threads during the next runs.
# SHM=0 keeps it on disk (a container's /dev/shm is 64 MiB).
LOGDIR=$({ [ "${SHM:-1}" = 1 ] && mktemp -d /dev/shm/b25-ab.XXXXXX 2>/dev/null; } || echo "$WORK")
PIDS=()
# Stops what it started, then removes the work directory (gw-full's access log grows to
# hundreds of MiB per run).
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK" "$LOGDIR"; }
trap cleanup EXIT
# shellcheck source=bench/lib.sh
source bench/lib.sh
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

UP=$(sim_base_port)
./target/release/b25-sim --host 127.0.0.1 --base-port "$UP" >"$WORK/sim.log" 2>&1 & PIDS+=($!)
wait_port "$UP"
SECRET="bench-secret-0123456789-0123456789-abcdef"
ROLE=viewer; [ "$MODE" = order ] && ROLE=operator
TOKEN=$(python3 bench/token.py "$SECRET" "$ROLE")
URL_PATH="/api/v1/market/ticker/BTCUSDT"; ROUTE_PATH="/api/v1/market/ticker/{s}"; SVC=$UP; METHODS="[GET]"; SCRIPT=""
if [ "$MODE" = order ]; then
  TOP="rate_limits: { per_principal: { rate: 10000000, burst: 10000000 } }"; LOG=true
  ROUTE="roles: [operator], idempotency: { required: true, ttl: 2s }, json: true, content_types: [application/json]"
  HDR="Authorization: Bearer $TOKEN"; URL_PATH="/api/v1/orders"; ROUTE_PATH=$URL_PATH; SVC=$((UP + 1)); METHODS="[POST]"
  # Records live 2 s: at this rate a longer TTL fills the in-memory store (200 000 live records;
  # beyond, new keys are refused, fail closed).
  # A new key per request (wrk's threads have a Lua state each: the thread's own table tells them apart).
  SCRIPT=$WORK/order.lua
  cat >"$SCRIPT" <<'LUA'
local n, me = 0, tostring({}):sub(8)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"symbol":"BTCUSDT","side":"buy","type":"limit","quantity":0.01,"price":50000}'
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = "ab-" .. me .. "-" .. n
  return wrk.format()
end
LUA
elif [ "$MODE" = full ]; then
  TOP="rate_limits: { per_principal: { rate: 10000000, burst: 10000000 } }"; ROUTE="roles: [viewer]"; LOG=true
  HDR="Authorization: Bearer $TOKEN"
elif [ "$MODE" = cache ]; then
  TOP=""; ROUTE="public: true, cache: { ttl: 1h, scope: public }"; LOG=false; HDR="X-Bench: 1"
else
  TOP=""; ROUTE="public: true"; LOG=false; HDR="X-Bench: 1"
fi

declare -A PORT PID
i=0
for bin in "$@"; do
  i=$((i + 1)); port=$(free_port)
  cat >"$WORK/$i.yaml" <<YAML
server: { listen: "127.0.0.1:$port", admin_listen: "127.0.0.1:$(free_port)" }
logging: { level: error, access_log: $LOG }
auth:
  jwt:
    issuers:
      - { issuer: b25-auth, audiences: [b25-gateway], algorithms: [HS256], secret: "$SECRET" }
$TOP
services:
  md:
    instances: ["http://127.0.0.1:$SVC"]
    health_check: { enabled: false }
routes:
  - { id: t, path: "$ROUTE_PATH", methods: $METHODS, service: md, $ROUTE }
YAML
  "$bin" run "$WORK/$i.yaml" >"$LOGDIR/$i.log" 2>&1 & PIDS+=($!); PID[$i]=$!; PORT[$i]=$port
  wait_port "$port"
done
if [ -z "$SCRIPT" ]; then
  for k in "${!PORT[@]}"; do expect_200 "http://127.0.0.1:${PORT[$k]}$URL_PATH" "$HDR"; done
fi
for k in "${!PORT[@]}"; do wrk ${SCRIPT:+-s "$SCRIPT"} -t2 -c"$CONNS" -d"${WARMUP:-2s}" -H "$HDR" "http://127.0.0.1:${PORT[$k]}$URL_PATH" >/dev/null; done
for r in $(seq 1 "$ROUNDS"); do
  for k in $(seq 1 "$i"); do
    c0=$(cpu_ticks "${PID[$k]}")
    out=$(wrk ${SCRIPT:+-s "$SCRIPT"} -t2 -c"$CONNS" -d"$DURATION" -H "$HDR" "http://127.0.0.1:${PORT[$k]}$URL_PATH")
    wrk_clean "$out"
    c1=$(cpu_ticks "${PID[$k]}")
    reqs=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    ups=$(ss -Htn state established "( dport = :$SVC )" | wc -l)
    rss=$(awk '/VmHWM/{print $2}' "/proc/${PID[$k]}/status")
    printf "round %d  %-40s %10s req/s  %5.1f µs/req  peak %5.1f MiB  upstream conns now %s\n" "$r" "${!k}" "$rps" \
      "$(python3 -c "print(($c1-$c0)/$HZ/$reqs*1e6)")" "$(python3 -c "print($rss/1024)")" "$ups"
  done
done
