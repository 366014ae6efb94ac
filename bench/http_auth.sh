#!/usr/bin/env bash
# Forward-auth throughput of groupgate's HTTP service: /auth (a valid token) against /healthz.
#
# Starts a throwaway service (bench/http_auth_server.py: SQLite store in a temp dir, one token
# minted with the default argon2 settings, no directory, uvicorn on a free loopback port),
# checks that the token is accepted, then runs wrk against /healthz and /auth in turn with the
# same load and prints requests/s and p99 latency for both, and /auth as a share of /healthz.
# Target: /auth >= 50% of /healthz, i.e. verifying a token costs no more than the HTTP
# stack itself. The token reaches wrk through a Lua script reading a 0600 file, never argv.
#
# Usage: bench/http_auth.sh            (env: THREADS=2 CONNECTIONS=32 DURATION=10s PYTHON=...)
#        STRICT=1 bench/http_auth.sh   exit 3 when the ratio misses the target
# Needs: wrk and curl (apt-get install wrk curl), groupgate[http] in .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
TARGET=50

for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install $tool)" >&2; exit 1; }
done
[ -x "$PY" ] || { echo "no python at $PY (run scripts/test once, or set PYTHON)" >&2; exit 1; }

WORK="$(mktemp -d -t groupgate-bench.XXXXXX)"
SERVER_PID=""
WRK_PID=""
cleanup() {
    if [ -n "$WRK_PID" ] && kill -0 "$WRK_PID" 2>/dev/null; then
        kill -TERM "$WRK_PID" 2>/dev/null || true
        wait "$WRK_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

"$PY" "$ROOT/bench/http_auth_server.py" "$WORK" "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

deadline=$((SECONDS + 30))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/healthz" 2>/dev/null)" = 204 ]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the service exited during start-up:" >&2; cat "$WORK/server.log" >&2; exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "the service did not answer $BASE/healthz within 30 s:" >&2
        cat "$WORK/server.log" >&2; exit 1
    fi
    sleep 0.1
done

# The Authorization header for wrk, in a file only we can read.
umask 077
printf 'Basic %s' "$(tr -d '\n' <"$WORK/credentials" | base64 -w0)" >"$WORK/authorization"
cat >"$WORK/auth.lua" <<'LUA'
local f = assert(io.open(os.getenv("GG_AUTHORIZATION_FILE"), "r"))
wrk.headers["Authorization"] = f:read("*a")
f:close()
LUA

# One request first: the token must be accepted (this also runs argon2 once, as the first
# real request after a restart would; every later request takes the cached path).
code="$(curl -s -o /dev/null -w '%{http_code}' -K - <<EOF
url = "$BASE/auth"
header = "Authorization: $(cat "$WORK/authorization")"
EOF
)"
[ "$code" = 204 ] || { echo "/auth answered $code for the bench token, not 204" >&2; exit 1; }

cpu_ticks() {  # user + system CPU of the service so far, in clock ticks
    awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"
}
run() {  # run NAME PATH: wrk with the token header; output to $WORK/NAME.txt
    local before after
    before="$(cpu_ticks)"
    # in the background + wait, so that a signal to this script is acted on at once
    GG_AUTHORIZATION_FILE="$WORK/authorization" \
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/auth.lua" \
        "$BASE$2" >"$WORK/$1.txt" &
    WRK_PID=$!
    wait "$WRK_PID"
    WRK_PID=""
    after="$(cpu_ticks)"
    echo $((after - before)) >"$WORK/$1.cpu"
    if grep -q "Non-2xx or 3xx responses" "$WORK/$1.txt"; then
        echo "$2: some answers were not 2xx:" >&2; cat "$WORK/$1.txt" >&2; exit 1
    fi
}
rps() { awk '/^Requests\/sec:/ {print $2}' "$WORK/$1.txt"; }
# Service CPU time per request (microseconds): unlike requests/s, barely moved by other load
# on the machine, since it counts only what the service itself burns.
cpu_us() {
    awk -v t="$(cat "$WORK/$1.cpu")" -v hz="$(getconf CLK_TCK)" \
        '/ requests in / {printf "%.0f", t / hz * 1e6 / $1}' "$WORK/$1.txt"
}
p99() { awk '/^ +99%/ {print $2}' "$WORK/$1.txt"; }

echo "groupgate HTTP forward auth: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency," \
     "uvicorn (one process), SQLite, $(nproc) cores"
run healthz /healthz
run auth /auth

for name in healthz auth; do
    echo "--- wrk /$name"; grep -v -e '^Running' -e 'threads and' "$WORK/$name.txt"
done
echo "---"
printf '%-10s %12s %10s %18s\n' endpoint "requests/s" "p99" "service CPU/req"
for name in healthz auth; do
    printf '%-10s %12s %10s %16sus\n' "/$name" "$(rps $name)" "$(p99 $name)" "$(cpu_us $name)"
done
ratio="$(awk -v a="$(rps auth)" -v h="$(rps healthz)" 'BEGIN {printf "%.1f", 100 * a / h}')"
cpu_ratio="$(awk -v a="$(cpu_us auth)" -v h="$(cpu_us healthz)" 'BEGIN {printf "%.1f", 100 * h / a}')"
if awk -v r="$ratio" -v t="$TARGET" 'BEGIN {exit !(r >= t)}'; then verdict=met; else verdict=MISSED; fi
echo "/auth / /healthz = $ratio% of the requests/s (target >= $TARGET%): $verdict"
echo "  (by service CPU per request, /healthz cost / /auth cost = $cpu_ratio%;" \
     "load now: $(cut -d' ' -f1-3 /proc/loadavg))"
if [ -s "$WORK/server.log" ]; then
    echo "service log:"; sed 's/^/  /' "$WORK/server.log" | tail -n 20
fi
if [ "$verdict" = MISSED ] && [ "${STRICT:-0}" = 1 ]; then exit 3; fi
