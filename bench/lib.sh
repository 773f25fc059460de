# shellcheck shell=bash
# Shared by bench/run.sh and bench/ab.sh (sourced).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# b25-sim listens on 7 consecutive ports from its base. A base taken from the ephemeral range
# (where free_port's come from) can collide with a client socket's port, and the sim exits:
# pick a base below that range with all 7 ports free.
sim_base_port() {
  python3 - <<'PY'
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    base = random.randrange(max(1024, lo - 12000), lo - 8)
    socks = []
    try:
        for p in range(base, base + 7):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks: s.close()
    print(base); break
PY
}

wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# Refuses to measure a target that does not answer 200 (a dead upstream answers 502 fast).
expect_200() { # URL [header]
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' ${2:+-H "$2"} "$1")
  [ "$code" = 200 ] || { echo "bench: $1 answered $code, not 200: not measuring it" >&2; exit 1; }
}

# Fails when wrk saw errors or non-2xx answers (figures of failing requests mean nothing).
wrk_clean() { # wrk output
  if grep -qE "Non-2xx|Socket errors" <<<"$1"; then
    echo "bench: errors during the run:" >&2; grep -E "Non-2xx|Socket errors" <<<"$1" >&2; exit 1
  fi
}

# TCP connections this machine has opened (the kernel's ActiveOpens): around a round, minus
# wrk's own connections, it is how many upstream connections the target opened under load.
active_opens() { awk '/^Tcp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ActiveOpens") c = i; h = 1 } else print $c }' /proc/net/snmp; }
