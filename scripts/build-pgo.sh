#!/usr/bin/env bash
# Profile-guided release build of b25-gateway: the binary bench/run.sh measures and the container
# image ships (deploy/Dockerfile). Why: bench/EXPERIMENTS.md, "Profile-guided optimisation".
#
#   scripts/build-pgo.sh [OUT]        # OUT defaults to target/pgo/b25-gateway
#
# 1. an instrumented release build (target/pgo/gen, RUSTFLAGS -Cprofile-generate);
# 2. a training load through it, with bench/ab.sh against b25-sim: a public route (gw-bare), JWT +
#    per-principal rate limit + JSON access log (gw-full), a cached route, and order entry (POST
#    with a JSON body and an Idempotency-Key, as gw-full); about 20 s;
# 3. the raw profiles merged by llvm-profdata of the LLVM major version rustc is built on;
# 4. the optimised release build (target/pgo/use, RUSTFLAGS -Cprofile-use), copied to OUT.
#
# The workspace's crates are rebuilt with each new profile; dependencies keep the profile of their
# first build in target/pgo/use (their code does not change between runs): PGO_CLEAN=1 rebuilds
# them too. Installs what it needs when missing (apt-get, as root): llvm-<N>, wrk, curl, python3, make (jemalloc),
# iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/pgo/b25-gateway}
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
PROFDATA=/usr/lib/llvm-$LLVM/bin/llvm-profdata
need=()
[ -x "$PROFDATA" ] || need+=("llvm-$LLVM")
for tool in wrk curl python3 make; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PGO=$PWD/target/pgo
RAW=$PGO/raw
rm -rf "$RAW" && mkdir -p "$RAW"
[ "${PGO_CLEAN:-0}" = 1 ] && rm -rf "$PGO/use"
# The upstream of the training load, built without instrumentation.
cargo build --release --locked -q -p b25-sim

echo "pgo: instrumented build" >&2
CARGO_TARGET_DIR=$PGO/gen RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW" \
  cargo build --release --locked -q -p b25-gateway --bin b25-gateway
# Build scripts ran instrumented too: only the gateway's own runs are kept.
rm -f "$RAW"/*.profraw

echo "pgo: training" >&2
for mode in bare full cache order; do
  # A mode that fails (wrk saw errors, a port was taken) still leaves the profile of what ran:
  # the build goes on with it rather than failing the image's build.
  MODE=$mode ROUNDS=1 WARMUP=1s DURATION=3s SHM=0 bash bench/ab.sh "$PGO/gen/release/b25-gateway" >/dev/null \
    || echo "pgo: training mode $mode failed; its profile so far is kept" >&2
done
ls "$RAW"/*.profraw >/dev/null 2>&1 || { echo "pgo: the training wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$PGO/merged.profdata" "$RAW"/*.profraw

echo "pgo: optimised build" >&2
for crate in b25-gateway b25-sim; do
  CARGO_TARGET_DIR=$PGO/use cargo clean --release -q -p "$crate" 2>/dev/null || true
done
CARGO_TARGET_DIR=$PGO/use RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PGO/merged.profdata" \
  cargo build --release --locked -q -p b25-gateway --bin b25-gateway
mkdir -p "$(dirname "$OUT")"
install -m 0755 "$PGO/use/release/b25-gateway" "$OUT"
echo "pgo: $OUT" >&2
