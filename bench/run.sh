#!/usr/bin/env bash
# b25-gateway load benchmark: direct upstream, nginx, HAProxy and three gateway setups,
# loaded the same way in ONE run on loopback, results in bench/RESULTS.md.
#
#   bench/run.sh            # full run (≈ 16 minutes after the release and PGO builds)
#   ROUNDS=1 DURATION=5s bench/run.sh   # quick look
#   PGO=0 bench/run.sh      # the plain release build of the gateway instead of the PGO one
#   GW_BIN=target/pgo/b25-gateway GW_BUILD="profile-guided, jemalloc" bench/run.sh   # no build
#
# Installs what it needs (wrk, nginx, haproxy from Debian; oha with cargo), binds only to
# 127.0.0.1, and stops every process it started by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
RATE=${RATE:-5000}
RATE_DURATION=${RATE_DURATION:-10s}
LAT_ROUNDS=${LAT_ROUNDS:-5}
WORK=$(mktemp -d /tmp/b25-bench.XXXXXX)
# gw-full's access log goes to a file in memory where there is one: written to disk, its
# hundreds of MiB are flushed by kernel threads while the next targets are being measured.
LOGDIR=$(mktemp -d /dev/shm/b25-bench.XXXXXX 2>/dev/null || echo "$WORK")
PIDS=()
# Stops what it started, then removes the work directory (gw-full's access log grows to
# hundreds of MiB per run).
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK" "$LOGDIR"; }
trap cleanup EXIT

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
  [ "$(id -u)" = 0 ] || { echo "missing ${need[*]}: run as root to install" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  { service nginx stop; service haproxy stop; } >/dev/null 2>&1 || true
fi
command -v oha >/dev/null || cargo install oha --locked
echo "building release binaries…"
# b25-sim alone, as scripts/build-pgo.sh builds it (built together with the gateway, its
# dependencies' features would differ and it would be built twice).
cargo build --release --locked -q -p b25-sim
# The gateway measured is the profile-guided build the container image ships
# (scripts/build-pgo.sh, ≈ 8 minutes more); PGO=0 measures the plain release build instead.
if [ -n "${GW_BIN:-}" ]; then
  # A binary built before (e.g. by scripts/build-pgo.sh), measured as it is.
  GW=$GW_BIN; GW_BUILD=${GW_BUILD:-"$GW_BIN, built before the run"}
elif [ "${PGO:-1}" = 1 ]; then
  GW=target/pgo/b25-gateway; scripts/build-pgo.sh "$GW"; GW_BUILD="profile-guided (scripts/build-pgo.sh), jemalloc"
else
  cargo build --release --locked -q -p b25-gateway
  GW=target/release/b25-gateway; GW_BUILD="plain release (PGO=0), jemalloc"
fi

# shellcheck source=bench/lib.sh
source bench/lib.sh

UP=$(sim_base_port)
./target/release/b25-sim --host 127.0.0.1 --base-port "$UP" >"$WORK/sim.log" 2>&1 & PIDS+=($!); SIM_PID=$!
wait_port "$UP"
PATH_Q="/api/v1/market/ticker/BTCUSDT"

# nginx: one worker per core, upstream keep-alive (no request cap per connection), no access log.
# `nginx` does the per-request header work gw-bare does (the usual reverse-proxy headers
# X-Forwarded-For/-Proto/-Host, a request id sent upstream and returned to the client;
# gw-bare also sends `traceparent` and returns `Server-Timing`, which nginx does not);
# `nginx-min` only proxies, for reference.
nginx_conf() { # name port location-extras
  cat >"$WORK/$1.conf" <<NGINX
worker_processes 2;
pid $WORK/$1.pid;
error_log $WORK/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  # keepalive_requests: by default nginx closes a client connection, and an upstream one,
  # after 1000 requests (wrk then reconnects); the other targets set no such cap.
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; $3 }
  }
}
NGINX
}
NG=$(free_port); NM=$(free_port)
# shellcheck disable=SC2016 # nginx variables, not the shell's
nginx_conf nginx "$NG" 'proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Request-Id $request_id; add_header X-Request-Id $request_id always;'
nginx_conf nginx-min "$NM" ""
nginx -c "$WORK/nginx.conf" -g 'daemon off;' >"$WORK/nginx.out" 2>&1 & PIDS+=($!); NG_PID=$!
nginx -c "$WORK/nginx-min.conf" -g 'daemon off;' >"$WORK/nginx-min.out" 2>&1 & PIDS+=($!); NM_PID=$!

# HAProxy: two threads, connection reuse, no logging.
HA=$(free_port)
cat >"$WORK/haproxy.cfg" <<HAP
global
  nbthread 2
  maxconn 8192
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
  # The same header work as gw-bare and nginx: X-Forwarded-*, a request id both ways.
  option forwardfor
  unique-id-format %{+X}o%ci%cp%fi%fp%Ts%rt%pid
  unique-id-header X-Request-Id
frontend f
  bind 127.0.0.1:$HA
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response set-header X-Request-Id %[unique-id]
  default_backend b
backend b
  server s1 127.0.0.1:$UP maxconn 1024
HAP
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.out" 2>&1 & PIDS+=($!); HA_PID=$!

SECRET="bench-secret-0123456789-0123456789-abcdef"
TOKEN=$(python3 bench/token.py "$SECRET")

gw_config() { # name port extra-top-level route-extras
  cat >"$WORK/$1.yaml" <<YAML
server: { listen: "127.0.0.1:$2", admin_listen: "127.0.0.1:$(free_port)" }
logging: { level: error, access_log: $5 }
auth:
  jwt:
    issuers:
      - { issuer: b25-auth, audiences: [b25-gateway], algorithms: [HS256], secret: "$SECRET" }
$3
services:
  md:
    instances: ["http://127.0.0.1:$UP"]
    health_check: { enabled: false }
routes:
  - { id: t, path: "/api/v1/market/ticker/{s}", methods: [GET], service: md, $4 }
YAML
}
GB=$(free_port); GF=$(free_port); GC=$(free_port)
gw_config gw-bare "$GB" "" "public: true" false
gw_config gw-full "$GF" "rate_limits: { per_principal: { rate: 10000000, burst: 10000000 } }" "roles: [viewer]" true
gw_config gw-cache "$GC" "" "public: true, cache: { ttl: 1h, scope: public }" false
"$GW" run "$WORK/gw-bare.yaml" >"$WORK/gw-bare.log" 2>&1 & PIDS+=($!); GB_PID=$!
# Appended (O_APPEND), so the file can be emptied after each count (see access_lines).
"$GW" run "$WORK/gw-full.yaml" >>"$LOGDIR/gw-full-access.log" 2>&1 & PIDS+=($!); GF_PID=$!
"$GW" run "$WORK/gw-cache.yaml" >"$WORK/gw-cache.log" 2>&1 & PIDS+=($!); GC_PID=$!
for p in "$NG" "$NM" "$HA" "$GB" "$GF" "$GC"; do wait_port "$p"; done
idle_mib() { python3 -c "print(f'{$(awk '/VmRSS/{print $2}' "/proc/$1/status")/1024:.1f}')"; }
IDLE_BARE=$(idle_mib "$GB_PID"); IDLE_FULL=$(idle_mib "$GF_PID")

declare -A PORT=([direct]=$UP [nginx]=$NG [nginx-min]=$NM [haproxy]=$HA [gw-bare]=$GB [gw-full]=$GF [gw-cache-hit]=$GC)
declare -A PIDOF=([direct]=$SIM_PID [nginx]=$NG_PID [nginx-min]=$NM_PID [haproxy]=$HA_PID [gw-bare]=$GB_PID [gw-full]=$GF_PID [gw-cache-hit]=$GC_PID)
TARGETS=(direct nginx nginx-min haproxy gw-bare gw-full gw-cache-hit)
hdr() { [ "$1" = gw-full ] && echo "Authorization: Bearer $TOKEN" || echo "X-Bench: 1"; }

# CPU seconds of a target: its process and children (nginx workers), from /proc.
# With a second argument, only that field of /proc/PID/stat (15: system time).
cpu_ticks() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    [ -r "/proc/$p/stat" ] && total=$((total + $(awk -v f="${2:-0}" '{print f ? $f : $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
rss_kib() { local m=0 p v; for p in $1 $(pgrep -P "$1" || true); do v=$(awk '/VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0); m=$((m + v)); done; echo "$m"; }
HZ=$(getconf CLK_TCK)

declare -A RPS CPU SYS OPENED STEADY SHARE
# The whole host's CPU time from /proc/stat, in ticks: idle (with iowait), steal, and all.
host_ticks() { awk '/^cpu / { print $5 + $6, $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
# CPU time of this shell's finished children (wrk, once waited for), in ticks.
child_ticks() { awk '{ print $16 + $17 }' "/proc/$$/stat"; }
# gw-full's access lines so far; the file is then emptied (it would reach hundreds of MiB).
ACCESS_LINES=0
access_lines() {
  ACCESS_LINES=$((ACCESS_LINES + $(grep -c '"target":"access"' "$LOGDIR/gw-full-access.log" || true)))
  : >"$LOGDIR/gw-full-access.log"
}
echo "warming up…"
for t in "${TARGETS[@]}"; do expect_200 "http://127.0.0.1:${PORT[$t]}$PATH_Q" "$(hdr "$t")"; done
for t in "${TARGETS[@]}"; do wrk -t2 -c"$CONNS" -d2s -H "$(hdr "$t")" "http://127.0.0.1:${PORT[$t]}$PATH_Q" >/dev/null; done
for r in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round so no target always runs first or last.
  order=("${TARGETS[@]:$(( (r - 1) % ${#TARGETS[@]} ))}" "${TARGETS[@]:0:$(( (r - 1) % ${#TARGETS[@]} ))}")
  for t in "${order[@]}"; do
    c0=$(cpu_ticks "${PIDOF[$t]}"); s0=$(cpu_ticks "${PIDOF[$t]}" 15); o0=$(active_opens)
    u0=$(cpu_ticks "$SIM_PID"); h0=$(host_ticks); w0=$(child_ticks)
    wrk -t2 -c"$CONNS" -d"$DURATION" -H "$(hdr "$t")" "http://127.0.0.1:${PORT[$t]}$PATH_Q" >"$WORK/wrk.out" & WRK=$!
    # After a second every client connection is open and the proxies' pools are warm: what
    # opens after that is opened under steady load.
    sleep 1; o_mid=$(active_opens)
    wait "$WRK"; w1=$(child_ticks); h1=$(host_ticks); u1=$(cpu_ticks "$SIM_PID"); out=$(cat "$WORK/wrk.out")
    wrk_clean "$out"
    c1=$(cpu_ticks "${PIDOF[$t]}"); s1=$(cpu_ticks "${PIDOF[$t]}" 15); o1=$(active_opens)
    OPENED[$t]="${OPENED[$t]:-} $((o1 - o0 - CONNS - 1))" # wrk opens one more than -c
    STEADY[$t]="${STEADY[$t]:-} $((o1 - o_mid))"
    [ "$t" != gw-full ] || access_lines
    reqs=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/{print $NF}')
    [ -z "$non2xx" ] || echo "warning: $t had $non2xx non-2xx responses" >&2
    RPS[$t]="${RPS[$t]:-} $rps"
    CPU[$t]="${CPU[$t]:-} $(python3 -c "print(($c1-$c0)/$HZ/$reqs*1e6)")"
    SYS[$t]="${SYS[$t]:-} $(python3 -c "print(($s1-$s0)/$HZ/$reqs*1e6)")"
    # Where both cores went (µs per request): wrk, the upstream (direct: it is the target),
    # the target, idle, steal, and the rest (other processes, kernel threads).
    SHARE[$t]="${SHARE[$t]:-}$(python3 - "$reqs" "$HZ" "$t" "$((w1 - w0))" "$((u1 - u0))" "$((c1 - c0))" "$h0" "$h1" <<'PY'
import sys
n, hz, t = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
wrk, up, tgt = (int(x) for x in sys.argv[4:7])
h = [int(b) - int(a) for a, b in zip(sys.argv[7].split(), sys.argv[8].split())]
us = lambda ticks: ticks / hz / n * 1e6
if t == "direct":
    up = 0
idle, steal, total = us(h[0]), us(h[1]), us(h[2])
print(f"{us(wrk):.2f},{us(up):.2f},{us(tgt):.2f},{idle:.2f},{steal:.2f},{total - us(wrk) - us(up) - us(tgt) - idle - steal:.2f},{total:.2f}", end=" ")
PY
)"
    echo "round $r $t: $rps req/s"
  done
done

# The host's own stalls, for reading the tails below: one busy loop per core reads the clock for
# STALL_SECONDS; a gap of more than 1 ms between two reads is time the core was taken from this
# machine (another tenant, the hypervisor), which every target's tail pays alike.
STALL_SECONDS=${STALL_SECONDS:-5}
stall_probe() {
  python3 - "$STALL_SECONDS" <<'PY'
import sys, time
t = time.perf_counter_ns
end = t() + int(float(sys.argv[1]) * 1e9); prev = t(); over = 0; longest = 0
while prev < end:
    now = t(); g = now - prev; prev = now
    if g > 1_000_000:
        over += 1
        longest = max(longest, g)
print(over, f"{longest / 1e6:.2f}")
PY
}
read -r STALLS STALL_MAX < <(for _ in $(seq 1 "$(nproc)"); do stall_probe & done | awk '{ n += $1; if ($2 > m) m = $2 } END { print n + 0, m + 0 }')
echo "host stalls: $STALLS over 1 ms in $(nproc) x $STALL_SECONDS s, longest $STALL_MAX ms"

# Latency at a fixed rate: LAT_ROUNDS rounds, order rotated as above. A target's added latency
# is taken within each round (its percentile minus direct's of the same round), then the median
# over the rounds: one oha run's tail moves by tenths of a millisecond with the host.
declare -A P50 P99 P999
for r in $(seq 1 "$LAT_ROUNDS"); do
  order=("${TARGETS[@]:$(( (r - 1) % ${#TARGETS[@]} ))}" "${TARGETS[@]:0:$(( (r - 1) % ${#TARGETS[@]} ))}")
  for t in "${order[@]}"; do
    j=$(oha -z "$RATE_DURATION" -q "$RATE" --latency-correction -c 32 --no-tui --output-format json \
          -H "$(hdr "$t")" "http://127.0.0.1:${PORT[$t]}$PATH_Q" 2>/dev/null || true)
    read -r p50 p99 p999 < <(echo "$j" | python3 -c 'import json,sys
j=json.load(sys.stdin)
codes=j.get("statusCodeDistribution", {})
if set(codes) != {"200"}: sys.exit(f"bench: latency run saw statuses {codes}")
d=j["latencyPercentiles"]
print(*(f"{d[k]*1000:.3f}" for k in ("p50","p99","p99.9")))' || echo "nan nan nan")
    P50[$t]="${P50[$t]:-} $p50"; P99[$t]="${P99[$t]:-} $p99"; P999[$t]="${P999[$t]:-} $p999"
    echo "latency round $r $t: p50 $p50 p99 $p99 p99.9 $p999 ms"
  done
done

# gw-full must really have written its access log (a filter once dropped every line).
access_lines
if [ "${ACCESS_LINES:-0}" -lt 1000 ]; then
  echo "bench: gw-full wrote ${ACCESS_LINES:-0} access-log lines; its figures would not include logging" >&2
  exit 1
fi

# $1 is a space-separated list of figures, split on purpose.
# shellcheck disable=SC2086
median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f})')" $1; }
# shellcheck disable=SC2086
med() { python3 -c "import statistics,sys; print(statistics.median([float(x) for x in sys.argv[1:]]))" $1; }
# shellcheck disable=SC2086
med3() { python3 -c "import statistics,sys; print(f'{statistics.median([float(x) for x in sys.argv[1:]]):.3f}')" $1; }
NG_RPS=$(med "${RPS[nginx]}"); NG_CPU=$(med "${CPU[nginx]}")
{
  echo "# Benchmark results"
  echo
  echo "Run on $(date -u +%Y-%m-%dT%H:%MZ) on this machine ($(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)); load generator on the same cores."
  echo "wrk -t2 -c$CONNS -d$DURATION, $ROUNDS rounds, order rotated, median (min–max); latency: oha -c 32 at $RATE req/s for $RATE_DURATION with latency correction, $LAT_ROUNDS rounds, order rotated, median."
  echo "Versions: $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR==1{print $3}'), b25-gateway $("$GW" --version | awk '{print $2}'), wrk $(wrk -v 2>&1 | awk 'NR==1{print $2}'), $(oha --version). b25-gateway build: $GW_BUILD."
  echo
  echo "| target | req/s | × nginx | CPU µs/req | × nginx | p50 ms | p99 ms | p99.9 ms | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for t in "${TARGETS[@]}"; do
    r=$(med "${RPS[$t]}"); c=$(med "${CPU[$t]}")
    printf "| %s | %s | %.2f | %.1f | %.2f | %s | %s | %s | %.1f |\n" "$t" "$(median "${RPS[$t]}")" \
      "$(python3 -c "print($r/$NG_RPS)")" "$c" "$(python3 -c "print($c/$NG_CPU)")" "$(med3 "${P50[$t]}")" "$(med3 "${P99[$t]}")" "$(med3 "${P999[$t]}")" \
      "$(python3 -c "print($(rss_kib "${PIDOF[$t]}")/1024)")"
  done
  echo
  echo "Ratios to nginx within each round (the targets of a round run back to back, so a slower or"
  echo "faster stretch of this shared host moves both sides), median (min–max) over the rounds:"
  echo
  echo "| target | req/s × nginx | CPU × nginx |"
  echo "|---|---|---|"
  for t in "${TARGETS[@]}"; do
    [ "$t" != nginx ] || continue
    python3 - "${RPS[$t]}" "${RPS[nginx]}" "${CPU[$t]}" "${CPU[nginx]}" "$t" <<'PY'
import statistics, sys
rps, ng_rps, cpu, ng_cpu = ([float(x) for x in a.split()] for a in sys.argv[1:5])
def paired(a, b):
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})"
print(f"| {sys.argv[5]} | {paired(rps, ng_rps)} | {paired(cpu, ng_cpu)} |")
PY
  done
  echo
  echo "CPU per request in user space and in the kernel (system time of the target's processes), µs, median over the rounds:"
  echo
  echo "| target | user | system |"
  echo "|---|---|---|"
  for t in "${TARGETS[@]}"; do
    c=$(med "${CPU[$t]}"); k=$(med "${SYS[$t]}")
    printf "| %s | %.1f | %.1f |\n" "$t" "$(python3 -c "print($c-$k)")" "$k"
  done
  echo
  echo "Where the two cores went per request at saturation, µs, median over the rounds: the load generator (wrk), the"
  echo "upstream (b25-sim; for \`direct\` it is the target), the target's processes, the host idle or stolen by the hypervisor,"
  echo "and the rest (kernel threads, other processes); the total is the cores' time divided by the requests (≈ 2 cores ÷ req/s)."
  echo "Process times include the kernel's work done on their behalf (system time, loopback softirqs):"
  echo
  echo "| target | load generator | upstream | target | idle | steal | rest | total |"
  echo "|---|---|---|---|---|---|---|---|"
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086 # one argument per round
    python3 - "$t" ${SHARE[$t]} <<'PY'
import statistics, sys
rows = [[float(x) for x in r.split(",")] for r in sys.argv[2:]]
cols = [statistics.median(c) for c in zip(*rows)]
up = "—" if sys.argv[1] == "direct" else f"{cols[1]:.1f}"
print(f"| {sys.argv[1]} | {cols[0]:.1f} | {up} | {cols[2]:.1f} | {cols[3]:.1f} | {cols[4]:.1f} | {cols[5]:.1f} | {cols[6]:.1f} |")
PY
  done
  echo
  echo "Latency added to the upstream's own at $RATE req/s: within each latency round the target's"
  echo "percentile minus direct's of the same round, median (min–max) over the $LAT_ROUNDS rounds, ms:"
  echo
  echo "| target | added p50 | added p99 | added p99.9 |"
  echo "|---|---|---|---|"
  for t in "${TARGETS[@]}"; do
    [ "$t" != direct ] || continue
    python3 - "${P50[$t]}" "${P50[direct]}" "${P99[$t]}" "${P99[direct]}" "${P999[$t]}" "${P999[direct]}" "$t" <<'PY'
import statistics, sys
a = [[float(x) for x in s.split()] for s in sys.argv[1:7]]
def added(t, d):
    v = [x - y for x, y in zip(t, d)]
    return f"{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})"
print(f"| {sys.argv[7]} | {added(a[0], a[1])} | {added(a[2], a[3])} | {added(a[4], a[5])} |")
PY
  done
  echo
  echo "Host stalls, measured before the latency rounds: $STALLS gaps of more than 1 ms (the longest $STALL_MAX ms) in"
  echo "$STALL_SECONDS s of one busy loop per core reading the clock, i.e. time the cores were taken from this VM. At $RATE req/s"
  echo "such a stall holds every request that arrives during it (latency correction counts them), so a few per second"
  echo "are enough to set the p99 of every target alike; on a quiet host there are none."
  echo
  echo "Idle RSS (after start, before any load): gw-bare $IDLE_BARE MiB, gw-full $IDLE_FULL MiB."
  echo
  echo "New upstream connections per saturation round (the kernel's TCP ActiveOpens: in the whole round minus wrk's $CONNS + 1; after its first second), median (min–max):"
  echo
  echo "| target | whole round | after the first second |"
  echo "|---|---|---|"
  for t in "${TARGETS[@]}"; do echo "| $t | $(median "${OPENED[$t]}") | $(median "${STEADY[$t]}") |"; done
  echo
  echo "gw-full access log: $ACCESS_LINES JSON lines written to its file during the run (one per request; counted, then the file emptied, after each round)."
  echo
  echo "Targets: \`direct\` b25-sim itself; \`nginx\` and \`haproxy\` as keep-alive reverse proxies (2 workers/threads, no logs)"
  echo "doing the per-request header work gw-bare does: X-Forwarded-For/-Proto/-Host and a request id sent upstream and returned"
  echo "(gw-bare also sends \`traceparent\` and returns \`Server-Timing\`); \`nginx-min\` the same nginx without that header work, for reference;"
  echo "\`gw-bare\` a public route, no policies, access log off; \`gw-full\` JWT HS256 + per-principal rate limit + metrics +"
  echo "JSON access log to a file (in $(dirname "$LOGDIR")); \`gw-cache-hit\` a public cached route. CPU is the target's own processes (from /proc),"
  echo "divided by the requests it served."
  echo
  echo "Single-change A/B measurements (allocators, hot-path changes): [EXPERIMENTS.md](EXPERIMENTS.md)."
} >bench/RESULTS.md
python3 bench/targets.py bench/RESULTS.md >/dev/null
cat bench/RESULTS.md
