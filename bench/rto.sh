#!/usr/bin/env bash
# Benchmark (not a test): the RTO of recovery at boot (issue 17) at real size, beside a restore of
# the same data by hand. One lab box with a blank loop volume as its EBS data volume, emulated AWS in
# its network (the IMDSv2 fake; moto for SSM; s3s-fs for S3: flat memory with GiB objects):
#   1. First boot: firstboot formats the volume, finds no backups, makes the empty cluster;
#      caretaker.service starts PostgreSQL, Redis and the stand-in API (test-api, answering
#      GET /api/zmanim?id=N from PostgreSQL). The Zmanim-like dataset (bench/lib/dataset.sh, GIB
#      GiB) is loaded, Redis gets keys, WAL archiving is on; a base backup, a logical backup and a
#      Redis backup are taken; then more rows are committed and archived (WAL to replay).
#   2. The volume is lost: every service stopped, /data unmounted, the volume zeroed (a new blank
#      EBS volume for the same instance: its own lease on the prefix, so no lease wait to subtract).
#   3. RTO: from `systemctl restart caretaker-firstboot.service` (what boot runs) through
#      `systemctl start caretaker.service` to the API's first correct answer on the restored data
#      (polled every 0.2 s from the box's network: the newest row committed before the loss).
#      firstboot's phases are printed from its journal.
#   4. By hand, the same data, the stock tools, in the same box after (on the same volume):
#      a. base backup + WAL: `aws s3 cp` of the base backup | age -d | zstd -d | tar -x, the WAL
#         segments from its start to the archive's end downloaded and unpacked the same way into a local
#         folder, then PostgreSQL started with `restore_command = cp` until it accepts connections
#         with recovery done (no checks of any kind, no API start).
#      b. the same base backup unpacked only (download, age, zstd, tar: the floor).
#      c. pg_restore of the logical backup into a new database (download | age -d | zstd -d |
#         pg_restore; one job, as on one vCPU), `RTO_DUMP=0` skips it.
# Target (the issue's): RTO ≤ 1.5 × 4a. The ratios to 4b and 4c are printed too.
# caretaker is the DEBUG build by default (its dependencies are built at opt-level 1; what the lab
# boxes run); RTO_PROFILE=release uses target/release/caretaker (build it first). The machine is
# shared: the run prints what else was running.
# Usage: bench/rto.sh [GIB]   (as root, after dev/setup; default 1: ~10 min). BENCH_ROWS overrides
# the zmanim rows (a small run: BENCH_ROWS=200000 bench/rto.sh 1). RTO_KEEP=1 keeps the work folder.
set -euo pipefail
gb=${1:-1}
[[ $gb =~ ^[1-9][0-9]*$ ]] || { echo "usage: bench/rto.sh [GIB] (a positive integer)" >&2; exit 2; }
rows=${BENCH_ROWS:-$(( gb * 5200000 ))}
[[ $rows =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_ROWS is a positive integer" >&2; exit 2; }
profile=${RTO_PROFILE:-debug}
[[ $profile == debug || $profile == release ]] || { echo "RTO_PROFILE is debug or release" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
(( EUID == 0 )) || { echo "run as root" >&2; exit 2; }
source bench/lib/dataset.sh
[ -x .venv/bin/moto_server ] || { echo "no .venv/bin/moto_server: run dev/setup" >&2; exit 2; }
[[ -x target/$profile/caretaker && -x target/debug/test-api && -x target/debug/imds-fake ]] \
    || { echo "build first: cargo build --workspace --bins${profile/debug/} (and --release for RTO_PROFILE=release)" >&2; exit 2; }
if [[ ! -x .tools/bin/s3s-fs ]]; then
    echo "installing s3s-fs into .tools (once, ~4 min)..." >&2
    cargo install --quiet --locked --root "$repo/.tools" s3s-fs@0.14.1 --features binary
fi
for p in bc jq awscli age zstd; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done

box="ct-bench-rto-$$"
bucket=bench-backups
work=$(mktemp -d /var/tmp/caretaker-bench.XXXXXX)
pids=()
cleaned=
cleanup() {
    [[ -n $cleaned ]] && return
    cleaned=1
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    dev/lab down "$box" >/dev/null 2>&1 || echo "dev/lab down $box failed" >&2
    if [[ -n ${RTO_KEEP:-} ]]; then echo "RTO_KEEP: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
calc() { echo "$1" | bc -l; }
fmt() { printf "%.${2:-1}f" "$(calc "$1")"; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
cores=$(nproc)
cpu() { awk '/^cpu / {printf "%.2f", ($2+$3+$4+$7+$8+$9)/100}' /proc/stat; }
c0=$(cpu); sleep 3; background=$(fmt "($(cpu) - $c0) / 3 / $cores * 100" 0)
others=$(dev/lab list 2>/dev/null | awk 'NR > 1 {print $1}' | tr '\n' ' ')
bin_note="target/$profile/caretaker of $(date -r "target/$profile/caretaker" '+%F %T'), HEAD $(git rev-parse --short HEAD)"
if [[ -n $(find src -newer "target/$profile/caretaker" -type f -print -quit) ]] || ! git diff --quiet HEAD -- src; then
    bin_note+=" (src/ has changes not in HEAD or newer than the binary)"
fi

# ---------------------------------------------------------------- the box and its emulators
# The volume: the database about 1.3 GiB per GiB asked, its WAL, the by-hand copies beside it.
vol_gb=$(( 3 + 4 * gb ))
log "booting lab box $box with a blank ${vol_gb} GiB volume..."
out=$(dev/lab up "$box" --owner $$ --no-services --dropins --volume "$work/data.img:${vol_gb}G")
pid1=$(sed -n 's/^pid1=//p' <<<"$out")
dev=$(sed -n 's/^volume=//p' <<<"$out")
[[ -n $pid1 && -n $dev ]] || { echo "dev/lab up printed no pid1/volume: $out" >&2; exit 1; }
bx() { dev/lab exec "$box" "$@"; }
innet() { nsenter -t "$pid1" -n -- "$@"; }
psql_box() { bx runuser -u postgres -- psql -X -Atq -v ON_ERROR_STOP=1 "$@"; }
# counts [PSQL-ARGS]: "ZMANIM AFTER_BACKUP CITIES" rows in database zmanim.
counts() { psql_box "$@" -d zmanim -c "select concat_ws(' ', (select count(*) from zmanim), (select count(*) from after_backup), (select count(*) from cities))"; }
# Started directly (nsenter execs them: $! is the process itself).
nsenter -t "$pid1" -n -- target/debug/imds-fake --listen 127.0.0.1:1338 >"$work/imds.log" 2>&1 &
pids+=($!)
nsenter -t "$pid1" -n -- .venv/bin/moto_server -H 127.0.0.1 -p 5001 >"$work/moto.log" 2>&1 &
pids+=($!)
mkdir -p "$work/s3/$bucket"
nsenter -t "$pid1" -n -- .tools/bin/s3s-fs --host 127.0.0.1 --port 5000 --access-key testing --secret-key testing "$work/s3" >"$work/s3s.log" 2>&1 &
pids+=($!)
for port in 5000 5001; do
    for _ in $(seq 150); do innet bash -c "echo > /dev/tcp/127.0.0.1/$port" 2>/dev/null && break; sleep 0.2; done
done
auth() { echo "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/eu-west-1/$1/aws4_request, SignedHeaders=host, Signature=0"; }
put_param() {
    innet curl -fsS -o /dev/null http://127.0.0.1:5001/ -H "$(auth ssm)" -H 'Content-Type: application/x-amz-json-1.1' \
        -H 'X-Amz-Target: AmazonSSM.PutParameter' \
        -d "{\"Name\":\"/zmanim/prod/$1\",\"Value\":\"$2\",\"Type\":\"$3\",\"Overwrite\":true}"
}
put_param clerk-secret-key sk_live_bench SecureString
put_param db-password bench-rto-pw SecureString
put_param config 'LOG_LEVEL=info' String

age-keygen -o "$work/identity.txt" 2>/dev/null
recipient=$(age-keygen -y "$work/identity.txt")
seal_key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
bx sh -c "mkdir -p /etc/caretaker/caretaker.d && cat > /etc/caretaker/caretaker.d/50-bench.toml" <<EOF
[aws]
region = "eu-west-1"
imds-endpoint = "http://127.0.0.1:1338"
ssm-endpoint = "http://127.0.0.1:5001"
s3-endpoint = "http://127.0.0.1:5000"

[backup]
bucket = "$bucket"
database = "zmanim"
recipients = ["$recipient"]
schedule = "off"
verify-schedule = "off"
wal-archive = true

[volume]
device = "$dev"

[services.postgres]
unit = "postgresql.service"
data-dir = "/data/postgres"
initdb = "/usr/lib/postgresql/15/bin/initdb"

[services.redis]
unit = "redis-server.service"
data-dir = "/data/redis"

[supervise]
enabled = true
probe-interval = "2s"
probe-timeout = "1s"
EOF
# AWS credentials for the emulators; Debian's own cluster stays off (the box's runs on /data); the
# API reads the dataset as the application's role (its password is the SSM parameter's).
bx sh -c 'for u in caretaker caretaker-firstboot; do mkdir -p /run/systemd/system/$u.service.d
    printf "[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n" > /run/systemd/system/$u.service.d/50-bench.conf; done
  mkdir -p /run/systemd/system/zmanim-api.service.d
  printf "[Service]\nEnvironment=\"TEST_API_DATABASE_URL=host=127.0.0.1 user=zmanim password=bench-rto-pw dbname=zmanim\"\n" > /run/systemd/system/zmanim-api.service.d/60-bench.conf
  systemctl mask --runtime postgresql@15-main.service >/dev/null 2>&1; systemctl daemon-reload'
[[ $profile == release ]] && bx ln -sfn /opt/target/release/caretaker /usr/bin/caretaker
bx caretaker config check >/dev/null

# ---------------------------------------------------------------- 1. the first box, with data
log "first boot: blank volume, no backups yet"
bx systemctl start caretaker-firstboot.service
# Manifests are sealed with a key only the box holds; drills and restores decrypt with the identity
# (in production both are SSM SecureStrings firstboot writes here).
bx sh -c "umask 077; printf 'BACKUP_SEAL_KEY=%s\nBACKUP_AGE_IDENTITY=\"%s\"\n' '$seal_key' '$(grep '^AGE-SECRET-KEY-' "$work/identity.txt")' > /run/caretaker/env/caretaker.env"
bx systemctl start caretaker.service
api() { innet curl -fsS --max-time 2 "http://127.0.0.1:8080/api/zmanim?id=$1"; }
healthy3() { caretaker_json=$(bx caretaker status --json 2>/dev/null) && jq -e '[.daemon.services[] | select(.state == "healthy")] | length == 3' <<<"$caretaker_json" >/dev/null; }
for _ in $(seq 120); do healthy3 && break; sleep 1; done
healthy3 || { bx journalctl -u caretaker -n 40 --no-pager >&2; echo "the services did not come up" >&2; exit 1; }
# caretaker turns WAL archiving on, which restarts PostgreSQL: before the load, not during it.
archiving() { [[ $(psql_box -c 'show archive_command' 2>/dev/null) == *' wal push '* ]] && healthy3; }
for _ in $(seq 90); do archiving && break; sleep 1; done
archiving || { bx journalctl -u caretaker -n 40 --no-pager >&2; echo "caretaker did not turn WAL archiving on" >&2; exit 1; }
log "loading the dataset: $rows zmanim rows (~${gb} GiB)..."
t=$(now)
zmanim_dataset_sql "$rows" | psql_box -d zmanim
psql_box -d zmanim -c 'grant select on all tables in schema public to zmanim' \
    -c 'create table after_backup(id bigint primary key, at timestamptz not null default clock_timestamp())' \
    -c 'grant select on after_backup to zmanim'
load_s=$(fmt "$(now) - $t" 0)
db_bytes=$(psql_box -c "select pg_database_size('zmanim')")
cluster_bytes=$(bx du -sb /data/postgres | cut -f1)
max_id=$(psql_box -d zmanim -c 'select max(id) from zmanim')
api "$max_id" >/dev/null || { bx journalctl -u zmanim-api -n 20 --no-pager >&2; echo "the API does not answer from the dataset" >&2; exit 1; }
bx sh -c 'for i in $(seq 1000); do echo "SET city:$i zmanim-$i"; done | redis-cli >/dev/null'
log "database zmanim: $(( db_bytes / 1048576 )) MiB ($load_s s to load); backups: base, logical, Redis..."
declare -A took
for kind in base postgres redis; do
    t=$(now)
    bx caretaker backup now --kind "$kind" >"$work/backup-$kind.out" 2>&1 || { cat "$work/backup-$kind.out" >&2; bx journalctl -u caretaker -n 40 --no-pager >&2; exit 1; }
    took[$kind]=$(fmt "$(now) - $t" 1)
done
# Commits after the base backup: WAL the restore replays (and the API's row to look for).
psql_box -d zmanim -c 'insert into after_backup(id) select generate_series(1, 200000)'
psql_box -d zmanim -c "insert into zmanim select id + 100000000, city, publisher, day, alot, sunrise, sof_zman_shema, chatzot, mincha, sunset, tzeit, 'after the base backup' from zmanim where id <= 200000"
probe=$(( 200000 + 100000000 ))
before=$(counts)
current=$(psql_box -c 'select pg_walfile_name(pg_current_wal_lsn())')
psql_box -c 'select pg_switch_wal()' >/dev/null
archived() { psql_box -c "select coalesce(last_archived_wal, '') >= '$current' from pg_stat_archiver"; }
for _ in $(seq 120); do [[ $(archived) == t ]] && break; sleep 0.5; done
[[ $(archived) == t ]] || { bx journalctl -u caretaker -n 40 --no-pager >&2; echo "segment $current was not archived" >&2; exit 1; }
list=$(bx env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json)
base_id=$(jq -r '[.[] | select(.kind == "base")][-1].id' <<<"$list")
dump_id=$(jq -r '[.[] | select(.kind == "postgres")][-1].id' <<<"$list")
base_stored=$(jq -r '[.[] | select(.kind == "base")][-1].stored_bytes // 0' <<<"$list")
# The WAL segment the base backup starts in (its details: start_lsn "HI/LO", timeline, segment size).
read -r start_lsn timeline seg_size < <(jq -r '[.[] | select(.kind == "base")][-1].details | "\(.start_lsn) \(.timeline) \(.segment_size)"' <<<"$list")
lsn=$(( (0x${start_lsn%/*} << 32) | 0x${start_lsn#*/} ))
per=$(( 0x100000000 / seg_size ))
first_segment=$(printf '%08X%08X%08X' "$timeline" $(( lsn / seg_size / per )) $(( lsn / seg_size % per )))
wal_objects=$(find "$work/s3/$bucket/caretaker/wal" -name '*.zst.age' | wc -l)
wal_bytes=$(find "$work/s3/$bucket/caretaker/wal" -name '*.zst.age' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
log "base backup $base_id (${took[base]} s), logical backup $dump_id (${took[postgres]} s), Redis (${took[redis]} s); $wal_objects WAL objects in S3"

# ---------------------------------------------------------------- 2. the volume is lost
log "the volume is lost: services stopped, /data unmounted, the volume zeroed"
bx systemctl stop zmanim-api.service caretaker.service postgresql.service redis-server.service
bx umount /data
blkdiscard -f "$dev" 2>/dev/null || dd if=/dev/zero of="$dev" bs=4M status=none conv=fsync || true
sync
echo 3 >/proc/sys/vm/drop_caches

# ---------------------------------------------------------------- 3. recovery at boot, timed
log "boot on the blank volume: firstboot restores, caretaker starts the services, the API answers"
since=$(bx date '+%F %T')
t0=$(now)
bx systemctl restart caretaker-firstboot.service
t_fb=$(now)
bx systemctl start caretaker.service
answer=
for _ in $(seq 3000); do
    answer=$(api "$probe" 2>/dev/null) && [[ $answer == *"\"id\":$probe,"* ]] && break
    answer=
    sleep 0.2
done
t_api=$(now)
[[ -n $answer ]] || { bx journalctl -u caretaker -n 40 --no-pager >&2; echo "the API never answered on the restored data" >&2; exit 1; }
rto=$(fmt "$t_api - $t0" 1)
fb_s=$(fmt "$t_fb - $t0" 1)
start_s=$(fmt "$t_api - $t_fb" 1)
after=$(counts)
[[ $after == "$before" ]] || { echo "the restored data differs: before '$before', after '$after'" >&2; exit 1; }
keys=$(bx redis-cli dbsize)
(( keys >= 1000 )) || { echo "Redis came back with $keys keys (1000 before)" >&2; exit 1; }
bx journalctl -u caretaker-firstboot.service --no-pager -o short-unix --since "$since" >"$work/firstboot.journal"
recovery=$(bx jq -c '.recovery | {verdict: .verdict.verdict, waited}' /run/caretaker/firstboot.json)
# The firstboot phases, from its journal: seconds since its start, and the line.
phases=$(awk -v t0="$t0" '/caretaker\[/ && /recovery at boot|restoring|restored|replay|verif|lease|Redis|formatting|mkfs|looking/ {
    t = $1; sub(/^[^:]*: /, ""); printf "    %6.1f s  %s\n", t - t0, substr($0, 1, 150) }' "$work/firstboot.journal")
lease_wait=$(grep -c "held by instance" "$work/firstboot.journal" || true)
log "RTO $rto s (firstboot $fb_s s, then services and API $start_s s)"

# ---------------------------------------------------------------- 4. by hand, the same data
s3cp() { bx env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing /usr/bin/aws --endpoint-url http://127.0.0.1:5000 --region eu-west-1 s3 "$@"; }
bx sh -c 'cat > /root/id.txt' <"$work/identity.txt"
bx chmod 600 /root/id.txt
# /root/plain KEY: an object of the bucket downloaded, decrypted and decompressed to stdout.
bx sh -c "cat > /root/plain && chmod 700 /root/plain" <<EOF
#!/bin/sh
set -e
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing /usr/bin/aws --endpoint-url http://127.0.0.1:5000 --region eu-west-1 \\
    s3 cp "s3://$bucket/\$1" - | age -d -i /root/id.txt | zstd -dq
EOF
day() { echo "${1:0:4}/${1:4:2}/${1:6:2}"; }
base_key="caretaker/base/$(day "$base_id")/$base_id/data.zst.age"
dump_key="caretaker/postgres/$(day "$dump_id")/$dump_id/data.zst.age"
bx systemctl stop zmanim-api.service caretaker.service
echo 3 >/proc/sys/vm/drop_caches
# b. unpack only.
log "by hand b: the base backup downloaded, decrypted, unpacked"
bx sh -c 'rm -rf /data/plain-b && mkdir -m 700 /data/plain-b && chown postgres: /data/plain-b'
t=$(now)
bx sh -c "/root/plain $base_key | runuser -u postgres -- tar -x -C /data/plain-b"
unpack_s=$(fmt "$(now) - $t" 1)
bx rm -rf /data/plain-b
echo 3 >/proc/sys/vm/drop_caches
# a. base backup + WAL, PostgreSQL started and recovered.
log "by hand a: the base backup and its WAL by hand, PostgreSQL recovers and accepts connections"
bx sh -c 'rm -rf /data/plain-a /data/plain-wal && mkdir -m 700 /data/plain-a /data/plain-wal && chown postgres: /data/plain-a /data/plain-wal'
t=$(now)
bx sh -c "/root/plain $base_key | runuser -u postgres -- tar -x -C /data/plain-a"
# The base backup's timeline's segments from its start on (what box 2 replayed; the new box's own
# timeline is archived there by now too, and left out), found with one listing, fetched with one command.
includes=()
while read -r f; do includes+=(--include "$f"); done < <(s3cp ls "s3://$bucket/caretaker/wal/" | awk -v first="$first_segment" '
    { f = $NF; s = substr(f, 1, 24) } f == s ".zst.age" && s ~ /^[0-9A-F]+$/ && substr(s, 1, 8) == substr(first, 1, 8) && s >= first { print f }')
s3cp cp --recursive --quiet "s3://$bucket/caretaker/wal/" /data/plain-wal/ --exclude '*' "${includes[@]}"
bx sh -c 'cd /data/plain-wal && for f in *.zst.age; do age -d -i /root/id.txt "$f" | zstd -dq > "${f%.zst.age}" && rm "$f"; done; chown postgres: /data/plain-wal/*'
bx runuser -u postgres -- sh -c "touch /data/plain-a/recovery.signal; rm -f /data/plain-a/postmaster.pid /data/plain-a/postgresql.auto.conf
  printf \"restore_command = 'cp /data/plain-wal/%%f %%p'\nrecovery_target_timeline = 'current'\nport = 5499\narchive_mode = off\nunix_socket_directories = '/tmp'\n\" >> /data/plain-a/postgresql.conf
  /usr/lib/postgresql/15/bin/pg_ctl -D /data/plain-a -l /tmp/plain-a.log -w -t 3600 start >/dev/null || { cat /tmp/plain-a.log >&2; exit 1; }"
for _ in $(seq 3000); do [[ $(bx runuser -u postgres -- psql -X -Atq -h /tmp -p 5499 -c 'select pg_is_in_recovery()' 2>/dev/null) == f ]] && break; sleep 0.2; done
byhand_s=$(fmt "$(now) - $t" 1)
byhand_rows=$(counts -h /tmp -p 5499)
bx runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /data/plain-a -m fast -w stop >/dev/null
bx rm -rf /data/plain-a /data/plain-wal
# c. pg_restore of the logical backup.
dump_s=-
if [[ ${RTO_DUMP:-1} != 0 ]]; then
    log "by hand c: pg_restore of the logical backup into a new database"
    echo 3 >/proc/sys/vm/drop_caches
    psql_box -c 'create database plain_c'
    t=$(now)
    bx sh -c "/root/plain $dump_key | runuser -u postgres -- pg_restore -d plain_c --no-owner"
    dump_s=$(fmt "$(now) - $t" 1)
    psql_box -c 'drop database plain_c'
fi

# ---------------------------------------------------------------- report
ratio() { if [[ $2 != - && $1 != - && $(calc "$2 > 0") == 1 ]]; then printf '%.2f' "$(calc "$1 / $2")"; else echo -; fi; }
echo
echo "Recovery at boot, RTO vs a restore by hand ($(date -u '+%F %H:%M UTC'))"
echo "  caretaker: $bin_note; PostgreSQL 15"
echo "  machine: $cores cores, $background % busy before the run; other lab boxes: ${others:-none}"
echo "  data: database zmanim $(( db_bytes / 1048576 )) MiB ($rows zmanim rows), cluster $(( cluster_bytes / 1048576 )) MiB;"
echo "        base backup $base_id $(( base_stored / 1048576 )) MiB stored; WAL in S3: $wal_objects objects, $(( wal_bytes / 1048576 )) MiB; Redis 1000 keys"
echo "        backups took: base ${took[base]} s, logical ${took[postgres]} s, Redis ${took[redis]} s"
echo
printf '  %-66s %8s %8s\n' "" "seconds" "÷ 4a"
printf '  %-66s %8s %8s\n' "RTO: boot (firstboot start) → the API answers on the restored data" "$rto" "$(ratio "$rto" "$byhand_s")"
printf '  %-66s %8s %8s\n' "  firstboot (format, SSM, lease, restore + replay + checks, Redis)" "$fb_s" ""
printf '  %-66s %8s %8s\n' "  caretaker.service: PostgreSQL, Redis, API started, health-gated" "$start_s" ""
printf '  %-66s %8s %8s\n' "4a by hand: base backup + WAL (aws, age, zstd, tar; recovery; no checks)" "$byhand_s" "1.00"
printf '  %-66s %8s %8s\n' "4b by hand: the base backup unpacked only (the floor)" "$unpack_s" "$(ratio "$unpack_s" "$byhand_s")"
printf '  %-66s %8s %8s\n' "4c by hand: pg_restore of the logical backup (one job)" "$dump_s" "$(ratio "$dump_s" "$byhand_s")"
echo
echo "  RTO ÷ 4b (the floor): $(ratio "$rto" "$unpack_s"); RTO ÷ 4c (pg_restore): $(ratio "$rto" "$dump_s")"
echo "  rows (zmanim, after_backup, cities) before the loss: $before; after recovery at boot: $after; by hand 4a: $byhand_rows"
echo "  firstboot's decision: $recovery; lease waits seen: $lease_wait"
echo "  firstboot's journal (seconds since the boot started):"
echo "$phases"
echo
if [[ $(calc "$rto <= 1.5 * $byhand_s") == 1 ]]; then mark="✓"; else mark="✗"; fi
echo "target: $mark RTO ≤ 1.5 × the restore by hand (4a): $rto s vs $(fmt "1.5 * $byhand_s" 1) s"
