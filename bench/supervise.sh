#!/usr/bin/env bash
# Benchmark (not a test): the daemon's cost while supervising, and how fast it brings back a hung
# API. In a lab box with postgres, redis and the stand-in API running and supervision at the
# default intervals (probe every 10 s):
#   1. CPU time and RSS of `caretaker daemon` over MINUTES of probing (default 10);
#   2. the median time from SIGSTOP on the API to healthy-again, over TRIALS (default 10).
# Usage: bench/supervise.sh [MINUTES] [TRIALS]. Run as root after dev/setup.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib/daemon-pid.sh
minutes=${1:-10}
trials=${2:-10}
cargo build --workspace --bins --locked --quiet
box="ct-bench-sup-$$"
trap 'dev/lab down "$box" >/dev/null 2>&1 || true' EXIT
pid1=$(dev/lab up "$box" --owner $$ | sed -n 's/^pid1=//p')
dev/lab exec "$box" sh -c 'mkdir -p /etc/caretaker/caretaker.d && printf "[supervise]\nenabled = true\n[provision]\nenabled = false\n" > /etc/caretaker/caretaker.d/50-bench.toml'
dev/lab exec "$box" systemctl start zmanim-api.service caretaker.service
status() { dev/lab exec "$box" caretaker status --json; }
api() { status | jq -r '.daemon.services[] | select(.name == "api") | "\(.state) \(.restarts)"'; }
for _ in $(seq 120); do [[ $(api) == "healthy "* ]] && break; sleep 1; done

host_pid=$(daemon_host_pid "$box" "$pid1")
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$host_pid/stat"; }
echo "probing for $minutes min at the default intervals…" >&2
t0=$(ticks); sleep $((minutes * 60)); t1=$(ticks)
awk -v t="$((t1 - t0))" -v hz="$hz" -v s="$((minutes * 60))" \
    -v rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$host_pid/status")" \
    -v hwm="$(awk '/^VmHWM:/ {print $2}' "/proc/$host_pid/status")" 'BEGIN {
  printf "supervising %d s: CPU %.2f s (%.3f %%), RSS %.1f MiB, peak %.1f MiB\n", s, t / hz, 100 * t / hz / s, rss / 1024, hwm / 1024 }'

times=()
for i in $(seq "$trials"); do
    read -r _ before < <(api)
    pid=$(dev/lab exec "$box" systemctl show -P MainPID zmanim-api.service)
    start=$(date +%s%N)
    dev/lab exec "$box" kill -STOP "$pid"
    for _ in $(seq 600); do
        read -r state restarts < <(api)
        [[ $state == healthy && $restarts -gt $before ]] && break
        sleep 0.2
    done
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    times+=("$ms")
    echo "trial $i: healthy again after $ms ms" >&2
    sleep 12   # let the restart window breathe; max-restarts is 3 per 10 min
    if (( i % 3 == 0 )); then dev/lab exec "$box" systemctl restart caretaker.service; sleep 5; fi
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR] = $1} END {
  m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2;
  printf "SIGSTOP → healthy again over %d trials: median %.1f s, min %.1f s, max %.1f s (probe interval 10 s, 2 failures before restart)\n", NR, m / 1000, a[1] / 1000, a[NR] / 1000 }'
