#!/usr/bin/env bash
# Benchmark (not a test): does caretaker's heavy work slow the API down on the production shape?
# A lab box with ONE CPU and 4 GiB (an m7g.medium), PostgreSQL with the Zmanim-like dataset
# (default 1 GiB), the stand-in API (release build) answering GET /api/zmanim?id=N with an indexed
# query on PostgreSQL (a 30-row join), and a fixed-rate open-loop load on it for the whole run
# (bench/lib/steady.py on the host's other CPU: like the load balancer, it is not on the box; so is
# the S3 server). Phases, each with the same load:
#   idle              nothing else running (IDLE_SECONDS, default 60), after 30 s of the same load
#                     unmeasured (the API's working set in PostgreSQL's buffers); again at the end
#   caretaker         caretaker backup now --kind postgres, resource controls as configured ([jobs])
#   caretaker, none   the same backup with [jobs] nice = 0, cpu-weight = 100: no resource controls
#   drill             caretaker backup verify (download, decrypt, pg_restore into a scratch database,
#                     compare row counts), resource controls as configured
#   restic            pg_dump -Fc | restic backup --stdin (Debian's restic, repository on the same S3)
#   pgbench           pgbench writes at PGBENCH_RATE tps for PGBENCH_SECONDS, WAL archived by caretaker
#                     (the streaming archive_command) — and the same writes with archiving off
# Printed per phase: seconds, requests, errors, p50/p99/max latency (ms, from each request's due
# time), p99 ÷ idle p99, and the slowest `caretaker status` (one a second, through dev/lab exec,
# which adds its own ~10 ms) during the phase. Target: caretaker's backup p99 ≤ 1.25 × idle p99 with 0 errors.
# Usage: bench/contention.sh [GIB]   (as root, after dev/setup; 1 GiB: ~15 min)
# Environment: RATE (requests/s, default 50), THREADS (load threads, 32), IDLE_SECONDS (60),
#   PGBENCH_RATE (200), PGBENCH_SECONDS (60), BENCH_ROWS (zmanim rows instead of GIB's).
gb=${1:-1}
rate=${RATE:-50}
threads=${THREADS:-32}
idle_seconds=${IDLE_SECONDS:-60}
pgbench_rate=${PGBENCH_RATE:-200}
pgbench_seconds=${PGBENCH_SECONDS:-60}
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
    STEADY_MAX_ID=$max_id on_host nsenter -t "$pid1" -n -- python3 bench/lib/steady.py 127.0.0.1 8080 "$rate" "$threads" "$work/stop" >"$work/$name.json" &
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
echo "caretaker backup (resource controls as configured)..." >&2
load_during caretaker in_box caretaker backup now --kind postgres
echo "caretaker backup without resource controls..." >&2
in_box sh -c 'printf "[jobs]\nnice = 0\ncpu-weight = 100\nio-weight = 100\n" > /etc/caretaker/caretaker.d/70-no-controls.toml'
restart_daemon
load_during no-controls in_box caretaker backup now --kind postgres
in_box rm /etc/caretaker/caretaker.d/70-no-controls.toml
restart_daemon
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
idle_p99=$(field idle p99_ms)
row() {
    local name=$1 label=$2 p99
    [[ -s $work/$name.json ]] || return 0
    p99=$(field "$name" p99_ms)
    printf '  %-26s %7ss %9s %7s %8s %8s %8s %9s %10s\n' "$label" "$(cat "$work/$name.seconds")" "$(field "$name" requests)" \
        "$(field "$name" errors)" "$(field "$name" p50_ms)" "$p99" "$(field "$name" max_ms)" "$(ratio "$p99" "$idle_p99")" \
        "$(cat "$work/$name.status" 2>/dev/null || echo -)"
}
echo
printf 'contention: 1 CPU, %s memory; %s MiB database, %s req/s on GET /api/zmanim (30-row indexed join), %s threads\n' \
    "${PGBOX_MEMORY:-4G}" $(( db_size / 1048576 )) "$rate" "$threads"
printf '  %-26s %8s %9s %7s %8s %8s %8s %9s %10s\n' phase time requests errors "p50 ms" "p99 ms" "max ms" "p99÷idle" "status ms"
row idle idle
row caretaker "caretaker backup"
row no-controls "caretaker, no controls"
row drill "caretaker drill"
row restic "pg_dump | restic"
row pgbench-plain "pgbench $pgbench_rate tps"
[[ -n $archived ]] && row pgbench-archived "pgbench + WAL archiving"
row idle-after "idle, at the end"
echo "target: caretaker backup p99 ≤ 1.25 × idle p99, 0 errors"
