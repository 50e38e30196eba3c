#!/usr/bin/env bash
# Benchmark (not a test): RSS and CPU time of `caretaker daemon` idle in a lab box for 60 s.
# Targets: ≤ 12 MiB RSS, < 0.1 % CPU. Usage: bench/idle.sh [--release] [--metrics] [SECONDS]. Run as root after
# dev/setup. A debug build's RSS is mostly its (large, unoptimised) code pages; the line printed
# splits heap/stack from binary pages. --release measures the release build (a cold release build
# takes ~10 minutes here). --metrics turns CloudWatch metrics on (interval 60 s) into moto's
# CloudWatch in the box's network (moto's own CPU and memory are not counted), and prints how many
# publishes moto received.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
. bench/lib/daemon-pid.sh
profile=debug
if [[ ${1:-} == --release ]]; then profile=release; shift; fi
metrics=0
if [[ ${1:-} == --metrics ]]; then metrics=1; shift; fi
secs=${1:-60}
cargo build --bins --locked --quiet $([[ $profile == release ]] && echo --release)
box="ct-bench-idle-$$"
trap 'dev/lab down "$box" >/dev/null 2>&1 || true' EXIT
pid1=$(dev/lab up "$box" --owner $$ --no-services | sed -n 's/^pid1=//p')
[[ $profile == release ]] && dev/lab exec "$box" ln -sfn /opt/target/release/caretaker /usr/bin/caretaker
if ((metrics)); then
    port=5977
    nsenter -t "$pid1" -n -- .venv/bin/moto_server -H 127.0.0.1 -p "$port" >/tmp/ct-bench-idle-moto-$$.log 2>&1 &
    moto_pid=$!
    trap 'kill $moto_pid 2>/dev/null || true; dev/lab down "$box" >/dev/null 2>&1 || true' EXIT
    for _ in $(seq 150); do nsenter -t "$pid1" -n -- bash -c "echo > /dev/tcp/127.0.0.1/$port" 2>/dev/null && break; sleep 0.2; done
    dev/lab exec "$box" bash -c "mkdir -p /etc/caretaker/caretaker.d /run/systemd/system/caretaker.service.d && \
        printf '[aws]\nregion = \"us-east-1\"\ncloudwatch-endpoint = \"http://127.0.0.1:$port\"\n[metrics]\nenabled = true\ninterval = \"60s\"\ndeployment = \"bench\"\n' > /etc/caretaker/caretaker.d/55-metrics.toml && \
        printf '[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n' > /run/systemd/system/caretaker.service.d/50-bench.conf && \
        systemctl daemon-reload"
fi
dev/lab exec "$box" systemctl start caretaker.service
host_pid=$(daemon_host_pid "$box" "$pid1")
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$host_pid/stat"; }
t0=$(ticks); sleep "$secs"; t1=$(ticks)
rss_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$host_pid/status")
hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$host_pid/status")
anon_kib=$(awk '/^RssAnon:/ {print $2}' "/proc/$host_pid/status")
file_kib=$(awk '/^RssFile:/ {print $2}' "/proc/$host_pid/status")
awk -v t="$((t1 - t0))" -v hz="$hz" -v s="$secs" -v rss="$rss_kib" -v hwm="$hwm_kib" -v anon="$anon_kib" -v file="$file_kib" 'BEGIN {
  cpu = t / hz; pct = 100 * cpu / s;
  printf "caretaker daemon idle %d s: RSS %.1f MiB = %.1f MiB heap/stack + %.1f MiB binary pages (peak %.1f MiB; target ≤ 12), CPU %.3f s = %.4f %% (target < 0.1 %%)\n", s, rss/1024, anon/1024, file/1024, hwm/1024, cpu, pct }'
if ((metrics)); then
    puts=$(grep -c 'POST / HTTP' "/tmp/ct-bench-idle-moto-$$.log" || true)
    echo "  metrics on: $puts PutMetricData call(s) reached moto's CloudWatch in $secs s (one per minute expected)"
    rm -f "/tmp/ct-bench-idle-moto-$$.log"
fi
