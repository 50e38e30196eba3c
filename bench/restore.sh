#!/usr/bin/env bash
# Benchmark (not a test): `caretaker restore postgres` of the backup benchmark's dataset (GIB on
# disk, default 1), side by side with
#   local file  pg_restore from a local file of the same dump (no download, no decryption, no
#               checks, no swap): the floor a restore can reach on this box
#   restic      restic dump … | pg_restore   (repository on the same S3 server, s3s-fs)
# caretaker's time includes what the others do not: download from S3 (moto), age and zstd, both
# hashes, every table's row count, and the swap. Printed: wall time, and speed relative to the local
# file. Target: caretaker ≥ 0.9 × the local-file speed.
# Usage: bench/restore.sh [GIB]   (as root, after dev/setup). Takes a few minutes.
gb=${1:-1}
source "$(dirname "$0")/lib/pgbox.sh" "$gb"
mkdir -p "$work/s3/restic"
in_box systemctl start caretaker.service
load_dataset "$gb"
renv="export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing RESTIC_PASSWORD=bench RESTIC_REPOSITORY=s3:http://127.0.0.1:$S3_PORT/restic/r"

echo "preparing: a caretaker backup, a local dump file, a restic snapshot..." >&2
in_box caretaker backup now --kind postgres >/dev/null
in_box sh -c 'runuser -u postgres -- pg_dump -Fc --compress=0 -d zmanim > /var/tmp/zmanim.dump && chmod 644 /var/tmp/zmanim.dump'
in_box sh -c "$renv; restic init -q
  runuser -u postgres -- pg_dump -Fc --compress=0 -d zmanim | restic backup -q --stdin --stdin-filename zmanim.dump"

echo "caretaker restore..." >&2
c=$(cpu); t=$(now); in_box caretaker restore postgres > "$work/restore.out"; ct=$(elapsed "$t"); ct_cpu=$(cpu_since "$c")
tail -1 "$work/restore.out" >&2
# The box lives on a 4 GiB tmpfs: make room (the kept database and, below, each copy once measured).
kept=$(in_box caretaker restore list-kept --json | jq -r '.[0].name')
in_box caretaker restore drop-kept "$kept" >/dev/null

echo "pg_restore from a local file..." >&2
in_box runuser -u postgres -- createdb bench_local
c=$(cpu); t=$(now); in_box runuser -u postgres -- pg_restore --exit-on-error -d bench_local /var/tmp/zmanim.dump; lf=$(elapsed "$t"); lf_cpu=$(cpu_since "$c")

in_box runuser -u postgres -- dropdb bench_local
in_box rm -f /var/tmp/zmanim.dump
echo "restic dump | pg_restore..." >&2
in_box runuser -u postgres -- createdb bench_restic
c=$(cpu); t=$(now)
in_box sh -c "$renv; restic dump -q latest zmanim.dump | runuser -u postgres -- pg_restore --exit-on-error -d bench_restic"
rs=$(elapsed "$t"); rs_cpu=$(cpu_since "$c")

echo
echo "restore of database zmanim ($(( db_size / 1048576 )) MiB on disk)"
printf '%-11s %9s %7s   %s\n' way wall CPU-s "speed vs local file"
printf '%-11s %8ss %7s   %s\n' caretaker "$ct" "$ct_cpu" "$(ratio "$lf" "$ct")  (download, decrypt, hashes, row counts, swap; no API in this box, so no health gate)"
printf '%-11s %8ss %7s   %s\n' "local file" "$lf" "$lf_cpu" "1.00"
printf '%-11s %8ss %7s   %s\n' restic "$rs" "$rs_cpu" "$(ratio "$lf" "$rs")"
echo "caretaker's phases (seconds from the start):"
sed -n 's/^/  /p' "$work/restore.out" | grep -E 'restor|count|swap|gate|healthy|done' | head -20 || true
echo "target: caretaker ≥ 0.90 × the local-file speed"
