#!/usr/bin/env bash
# Benchmark (not a test): what clients see during API updates. A load generator on loopback
# (bench/lib/load.py: 4 threads, a fresh connection per request, /health and /api/ping) runs while
# caretaker (release daemon) performs 10 updates through `caretaker update` (download, verify,
# switch, restart, health gate), once with the API listening itself and once behind
# systemd/zmanim-api.socket (socket activation: the port stays open across restarts). Printed per
# variant: requests, failed requests, longest gap without a successful response.
# Targets: 0 failed requests with the socket; longest gap ≤ 1 s without.
# Usage: bench/update.sh [UPDATES]   (as root, after dev/setup).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
updates=${1:-10}
(( EUID == 0 )) || { echo "run as root" >&2; exit 2; }
MOTO_PORT=5000
box="ct-bench-update-$$"
work=$(mktemp -d /tmp/caretaker-bench-update.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    dev/lab down "$box" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT

echo "building..." >&2
cargo build --release --workspace --bins --locked --quiet
cargo build --workspace --bins --locked --quiet
out=$(dev/lab up "$box" --owner $$ --no-services)
pid1=$(sed -n 's/^pid1=//p' <<<"$out")
in_box() { dev/lab exec "$box" "$@"; }
innet() { nsenter -t "$pid1" -n -- "$@"; }
innet .venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do innet curl -fsS -o /dev/null "http://127.0.0.1:$MOTO_PORT/moto-api/" 2>/dev/null && break; sleep 0.2; done
auth='Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0'
innet curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MOTO_PORT/releases" -H "$auth"
publish() {
    local f="$work/api-$1"
    cp target/release/test-api "$f"
    printf '\nTEST_API_VERSION=%s\n' "$1" >>"$f"
    printf '%s  zmanim-api\n' "$(sha256sum "$f" | cut -d' ' -f1)" >"$f.sums"
    innet curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MOTO_PORT/releases/zmanim-api/$1/zmanim-api" -H "$auth" -H 'Content-Type: application/octet-stream' --data-binary "@$f"
    innet curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$MOTO_PORT/releases/zmanim-api/$1/SHA256SUMS" -H "$auth" -H 'Content-Type: text/plain' --data-binary "@$f.sums"
}
for i in $(seq 2 $(( 2 * updates + 1 ))); do publish "v$i"; done
in_box sh -c 'mkdir -p /etc/caretaker/caretaker.d && cat > /etc/caretaker/caretaker.d/50-bench.toml' <<CONFIG
[aws]
region = "us-east-1"
s3-endpoint = "http://127.0.0.1:$MOTO_PORT"
[release]
bucket = "releases"
keep = 3
health-gate-consecutive = 3
health-gate-timeout = "20s"
CONFIG
in_box sh -c 'mkdir -p /run/systemd/system/caretaker.service.d && printf "[Service]\nExecStart=\nExecStart=/opt/target/release/caretaker daemon\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n" > /run/systemd/system/caretaker.service.d/60-bench.conf'
in_box sh -c "cp /opt/target/release/test-api /opt/zmanim/releases/v1/zmanim-api && printf '\nTEST_API_VERSION=v1\n' >> /opt/zmanim/releases/v1/zmanim-api && printf '{\"version\":\"v1\",\"sha256\":\"%s\",\"time\":\"2026-01-01T00:00:00.000000Z\"}' \$(sha256sum /opt/zmanim/releases/v1/zmanim-api | cut -d' ' -f1) > /opt/zmanim/releases/v1/.verified"
in_box cp "$repo/systemd/zmanim-api.socket" /etc/systemd/system/zmanim-api.socket 2>/dev/null \
    || dev/lab exec "$box" sh -c "cat > /etc/systemd/system/zmanim-api.socket" <systemd/zmanim-api.socket
in_box systemctl daemon-reload
in_box systemctl start zmanim-api.service caretaker.service
for _ in $(seq 50); do innet curl -fsS -o /dev/null http://127.0.0.1:8080/health 2>/dev/null && break; sleep 0.2; done

next=2
run_variant() { # NAME
    local stop="$work/stop-$1"
    rm -f "$stop"
    python3 bench/lib/load.py 8080 4 "$stop" >"$work/load-$1.json" &
    local lp=$!
    # The load generator runs in the box's network: start it there.
    sleep 1
    local fails=0
    for _ in $(seq "$updates"); do
        in_box caretaker update --version "v$next" >"$work/update.out" 2>&1 || { fails=$((fails + 1)); tail -3 "$work/update.out" >&2; }
        next=$((next + 1))
    done
    sleep 1
    touch "$stop"
    wait "$lp"
    printf '%-14s %s  (update failures: %s)\n' "$1" "$(cat "$work/load-$1.json")" "$fails"
}
# load.py must run inside the box's network namespace.
python3() { nsenter -t "$pid1" -n -- /usr/bin/python3 "$@"; }

echo "variant 1: the API listens itself (${updates} updates)..." >&2
plain=$(run_variant plain)
echo "variant 2: behind zmanim-api.socket (${updates} updates)..." >&2
in_box systemctl stop zmanim-api.service
in_box systemctl start zmanim-api.socket
in_box systemctl start zmanim-api.service
for _ in $(seq 50); do innet curl -fsS -o /dev/null http://127.0.0.1:8080/health 2>/dev/null && break; sleep 0.2; done
in_box sh -c 'tr "\0" "\n" < /proc/$(systemctl show -P MainPID zmanim-api.service)/environ | grep -q LISTEN_FDS=1' \
    || { echo "the API did not receive the socket (LISTEN_FDS)" >&2; exit 1; }
socket=$(run_variant socket)

echo
echo "clients during $updates API updates each (loopback, 4 threads, a new connection per request):"
echo "$plain"
echo "$socket"
echo "targets: 0 failed requests with the socket; longest gap ≤ 1 s without"
