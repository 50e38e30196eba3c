#!/usr/bin/env bash
# Benchmark (not a test): does caretaker's heavy work slow the API down on the production shape?
# A lab box with ONE CPU and 4 GiB (an m7g.medium), PostgreSQL with the Zmanim-like dataset
# (default 1 GiB), the stand-in API (release build) answering GET /api/zmanim?id=N with an indexed
# query on PostgreSQL (a 30-row join), and a fixed-rate open-loop load on it for the whole run
# (bench/lib/steady.py on the host's other CPU: like the load balancer, it is not on the box; so is
# the S3 server). Phases, each with the same load:
#   idle              nothing else running (IDLE_SECONDS, default 60), after 30 s of the same load
#                     unmeasured (the API's working set in PostgreSQL's buffers); again at the end
# then ROUNDS (default 3) rounds of, in turn:
#   idle              ROUND_IDLE_SECONDS (20) of nothing else
#   caretaker         caretaker backup now --kind postgres, resource controls as shipped ([jobs]
#                     nice = 10, sched-idle = true, cpu-weight = 10)
#   caretaker, nice   the same backup with [jobs] sched-idle = false (nice and weights only)
#   caretaker, none   the same backup with [jobs] nice = 0, sched-idle = false, cpu-weight = 100
# (each phase's requests pooled over the rounds: one backup is ~500 requests, whose p99 is its
# fifth-slowest, and idle p99 drifts over a run; interleaving and pooling answer both), then:
#   drill             caretaker backup verify (download, decrypt, pg_restore into a scratch database,
#                     compare row counts), resource controls as configured
#   restic            pg_dump -Fc | restic backup --stdin (Debian's restic, repository on the same S3)
#   pgbench           pgbench writes at PGBENCH_RATE tps for PGBENCH_SECONDS, WAL archived by caretaker
#                     (the streaming archive_command) — and the same writes with archiving off
# Printed per phase: seconds, requests, errors, p50/p99/max latency (ms, from each request's due
# time), p99 ÷ idle p99 (the rounds' phases ÷ the rounds' pooled idle, the others ÷ the first
# idle), and the slowest `caretaker status` (one a second, through dev/lab exec, which adds its
# own ~10 ms) during the phase; then each round's p99 ratios (the spread).
# Target: caretaker's backup p99 ≤ 1.25 × idle p99 with 0 errors.
# Usage: bench/contention.sh [GIB]   (as root, after dev/setup; 1 GiB: ~15 min)
# Environment: RATE (requests/s, default 50), THREADS (load threads, 32), IDLE_SECONDS (60),
#   PGBENCH_RATE (200), PGBENCH_SECONDS (60), BENCH_ROWS (zmanim rows instead of GIB's), ROUNDS (3),
#   ROUND_IDLE_SECONDS (20).
gb=${1:-1}
rate=${RATE:-50}
threads=${THREADS:-32}
idle_seconds=${IDLE_SECONDS:-60}
pgbench_rate=${PGBENCH_RATE:-200}
pgbench_seconds=${PGBENCH_SECONDS:-60}
rounds=${ROUNDS:-3}
round_idle=${ROUND_IDLE_SECONDS:-20}
export PGBOX_CPUS=1
source "$(dirname "$0")/lib/pgbox.sh" "$gb"
mkdir -p "$work/s3/restic"
load_dataset "$gb"
max_id=$(in_box runuser -u postgres -- psql -Atd zmanim -c 'select max(id) from zmanim')

# The API, the release build (a real one is an optimised Go binary), on the database.
in_box runuser -u postgres -- psql -q -d zmanim -c "create role zmanim login password 'bench'" \
    -c 'grant select on zmanim, cities to zmanim'
in_box sh -c 'cp /opt/target/release/test-api /opt/zmanim/current/zmanim-api.new && mv /opt/zmanim/current/zmanim-api.new /opt/zmanim/current/zmanim-api
  mkdir -p /run/systemd/system/zmanim-api.service.d
  printf "[Service]\nEnvironment=\"TEST_API_DATABASE_URL=host=127.0.0.1 user=zmanim password=bench dbname=zmanim\"\n" > /run/systemd/system/zmanim-api.service.d/60-bench.conf
  systemctl daemon-reload && systemctl restart zmanim-api.service'
for _ in $(seq 100); do netcurl -o /dev/null "http://127.0.0.1:8080/api/zmanim?id=1" 2>/dev/null && break; sleep 0.2; done
netcurl -o /dev/null "http://127.0.0.1:8080/api/zmanim?id=1" || { in_box journalctl -u zmanim-api -n 20 --no-pager >&2; exit 1; }

# load_during NAME CMD...: the steady load for as long as CMD runs; its JSON line into $work/NAME.json.
load_during() {
    local name=$1 t
    shift
    rm -f "$work/stop"
    STEADY_MAX_ID=$max_id STEADY_RAW=$work/$name.raw on_host nsenter -t "$pid1" -n -- python3 bench/lib/steady.py 127.0.0.1 8080 "$rate" "$threads" "$work/stop" >"$work/$name.json" &
    local loader=$!
    # Beside it, once a second: how long `caretaker status` takes (the daemon stays responsive).
    ( max=0; while [[ ! -e $work/stop ]]; do s=$(now); in_box caretaker status >/dev/null 2>&1 || true
        ms=$(echo "($(now) - $s) * 1000 / 1" | bc); (( ms > max )) && max=$ms; echo "$max" >"$work/$name.status"; sleep 1; done ) &
    local prober=$!
    t=$(now)
    if ! "$@" >"$work/$name.out" 2>&1; then
        touch "$work/stop"; wait "$loader" || true
        echo "$name failed:" >&2; cat "$work/$name.out" >&2
        in_box journalctl -u caretaker -n 30 --no-pager >&2
        exit 1
    fi
    echo "$(elapsed "$t")" >"$work/$name.seconds"
    touch "$work/stop"
    wait "$loader"
    wait "$prober" || true
}
restart_daemon() {
    in_box systemctl restart caretaker.service
    for _ in $(seq 50); do in_box caretaker status >/dev/null 2>&1 && break; sleep 0.2; done
}

echo "warming up (a backup, unmeasured: the page cache holds what it will hold)..." >&2
in_box caretaker backup now --kind postgres >/dev/null
echo "warming up the API's working set (the load for 30 s, unmeasured)..." >&2
load_during warm sleep 30
echo "idle (${idle_seconds} s)..." >&2
load_during idle sleep "$idle_seconds"
# with_jobs NAME TOML: the daemon restarted with [jobs] TOML (empty: as shipped).
with_jobs() {
    if [[ -n $1 ]]; then
        in_box sh -c "printf '[jobs]\n$1\n' > /etc/caretaker/caretaker.d/70-bench-jobs.toml"
    else
        in_box rm -f /etc/caretaker/caretaker.d/70-bench-jobs.toml
    fi
    restart_daemon
    sleep 3
}
for r in $(seq "$rounds"); do
    echo "round $r of $rounds: idle ${round_idle} s, then the backup as shipped, with nice only, without controls..." >&2
    load_during "r$r-idle" sleep "$round_idle"
    load_during "r$r-caretaker" in_box caretaker backup now --kind postgres
    with_jobs 'sched-idle = false'
    load_during "r$r-nice" in_box caretaker backup now --kind postgres
    with_jobs 'nice = 0\nsched-idle = false\ncpu-weight = 100\nio-weight = 100'
    load_during "r$r-none" in_box caretaker backup now --kind postgres
    with_jobs ''
done
echo "drill..." >&2
load_during drill in_box caretaker backup verify
echo "restic..." >&2
renv="export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing RESTIC_PASSWORD=bench RESTIC_REPOSITORY=s3:http://127.0.0.1:$S3_PORT/restic/$gb"
in_box sh -c "$renv; restic init -q"
load_during restic in_box sh -c "$renv; runuser -u postgres -- pg_dump -Fc -d zmanim | restic backup -q --stdin --stdin-filename zmanim.dump"

echo "pgbench writes, WAL not archived..." >&2
in_box runuser -u postgres -- createdb bench
in_box runuser -u postgres -- pgbench -q -i -s 10 bench >/dev/null 2>&1
pgb="runuser -u postgres -- pgbench -n -c 4 -j 1 -R $pgbench_rate -T $pgbench_seconds bench"
load_during pgbench-plain in_box sh -c "$pgb"
echo "pgbench writes, WAL archived by caretaker..." >&2
in_box sh -c 'printf "[backup]\nwal-archive = true\nwal-socket = \"/run/caretaker/wal.sock\"\n" > /etc/caretaker/caretaker.d/60-pitr.toml'
restart_daemon
archiving_on() { [[ $(in_box runuser -u postgres -- psql -Atc "show archive_command" 2>/dev/null) == *' wal push '* ]]; }
for _ in $(seq 90); do archiving_on && break; sleep 1; done
if archiving_on && in_box caretaker backup now --kind base >"$work/base.out" 2>&1; then
    load_during pgbench-archived in_box sh -c "$pgb"
    archived=1
else
    echo "PITR could not be enabled here (skipping the archiving phase):" >&2
    cat "$work/base.out" >&2
    archived=
fi

echo "idle again (${idle_seconds} s)..." >&2
load_during idle-after sleep "$idle_seconds"

field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print("-" if v is None else v)' "$work/$1.json" "$2"; }
# pooled NAME...: "seconds requests errors p50 p99 max status" over the phases NAME (their raw
# latencies together; seconds and errors summed, status the slowest).
pooled() {
    python3 - "$work" "$@" <<'PY'
import json, sys
work, names = sys.argv[1], sys.argv[2:]
lat, errors, seconds, status = [], 0, 0.0, 0
for n in names:
    try:
        lat += [float(x) for x in open(f"{work}/{n}.raw")]
        errors += json.load(open(f"{work}/{n}.json"))["errors"]
        seconds += float(open(f"{work}/{n}.seconds").read())
        status = max(status, int(open(f"{work}/{n}.status").read() or 0))
    except FileNotFoundError:
        pass
lat.sort()
pct = lambda p: "%.2f" % lat[min(len(lat) - 1, int(len(lat) * p))] if lat else "-"
print("%.1f %d %d %s %s %s %d" % (seconds, len(lat) + errors, errors, pct(0.5), pct(0.99), pct(1.0), status))
PY
}
# row LABEL IDLE_P99 NAME...: one line for the phases NAME pooled.
row() {
    local label=$1 base=$2 secs reqs errs p50 p99 max status
    shift 2
    read -r secs reqs errs p50 p99 max status <<<"$(pooled "$@")"
    [[ $reqs == 0 ]] && return 0
    printf '  %-28s %7ss %9s %7s %8s %8s %8s %9s %10s\n' "$label" "$secs" "$reqs" "$errs" "$p50" "$p99" "$max" \
        "$(ratio "$p99" "$base")" "$status"
}
p99_of() { local v; read -r _ _ _ _ v _ _ <<<"$(pooled "$@")"; echo "$v"; }
idle_p99=$(p99_of idle)
round_names() { local r; for r in $(seq "$rounds"); do echo "r$r-$1"; done; }
rounds_idle_p99=$(p99_of $(round_names idle))
echo
printf 'contention: 1 CPU, %s memory; %s MiB database, %s req/s on GET /api/zmanim (30-row indexed join), %s threads\n' \
    "${PGBOX_MEMORY:-4G}" $(( db_size / 1048576 )) "$rate" "$threads"
printf '  %-28s %8s %9s %7s %8s %8s %8s %9s %10s\n' phase time requests errors "p50 ms" "p99 ms" "max ms" "p99÷idle" "status ms"
row "idle" "$idle_p99" idle
echo "  $rounds rounds, pooled (p99 ÷ the rounds' idle):"
row "idle (rounds)" "$rounds_idle_p99" $(round_names idle)
row "caretaker backup" "$rounds_idle_p99" $(round_names caretaker)
row "caretaker, nice only" "$rounds_idle_p99" $(round_names nice)
row "caretaker, no controls" "$rounds_idle_p99" $(round_names none)
echo "  then (p99 ÷ the first idle):"
row "caretaker drill" "$idle_p99" drill
row "pg_dump | restic" "$idle_p99" restic
row "pgbench $pgbench_rate tps" "$idle_p99" pgbench-plain
[[ -n $archived ]] && row "pgbench + WAL archiving" "$idle_p99" pgbench-archived
row "idle, at the end" "$idle_p99" idle-after
echo "  each round's p99 ÷ its own idle p99 (backup as shipped / nice only / no controls):"
for r in $(seq "$rounds"); do
    i=$(p99_of "r$r-idle")
    printf '    round %d: idle %s ms; %s / %s / %s\n' "$r" "$i" "$(ratio "$(p99_of "r$r-caretaker")" "$i")" \
        "$(ratio "$(p99_of "r$r-nice")" "$i")" "$(ratio "$(p99_of "r$r-none")" "$i")"
done
echo "target: caretaker backup p99 ≤ 1.25 × idle p99, 0 errors"
