#!/usr/bin/env bash
# Benchmark (not a test): what the WAL tip (backup.wal-tip, src/backup/wal/tip.rs) gives and what
# it costs, on Debian's PostgreSQL 15 in lab boxes, with the tip on and with it off
# (`wal-tip = false`), archive_timeout 60 s (the default) both times:
#   1. Rows lost when the box dies: a writer on the HOST (pgbench -c 1 -R RATE, one numbered row
#      per transaction; its per-transaction log holds each commit's acknowledgement time and
#      outlives the box) commits for WRITE_SECS after a base backup; then the box's PID 1 is
#      SIGKILLed (no shutdown, nothing flushed or archived after: tests/pitr_lab.rs
#      a_box_killed_without_warning_…); a new box with a blank cluster restores `caretaker restore
#      postgres --to-latest` from the same S3. Rows lost = acknowledged rows missing after the
#      restore; seconds lost = the acknowledgement time of the newest acknowledged row less that
#      of the newest restored one. (Box B's own archiving and tip wait for box A's lease on the
#      prefix to expire, recovery.lease-ttl = 5 min; its restore does not.)
#   2. Cost at a steady WAL rate (WAL_KIB_PER_S, default 1 MiB/s; pgbench -R inserting rows of
#      hex text, which zstd halves, rate calibrated first; the rate reached is measured with
#      pg_current_wal_lsn deltas) for LOAD_SECS, one box, tip on then off (the daemon restarted
#      with a drop-in in between, the same load): the tip's upload interval p50/p99 (caretaker
#      status --json .daemon.wal_tip), its chunks and lag, the daemon's CPU-seconds per hour
#      (/proc/PID/stat utime+stime of caretaker.service's main process; its waited-for children
#      apart) and S3 requests per hour by kind (PUT/GET/HEAD/LIST/DELETE, counted from the S3
#      server's own request log: s3s-fs with RUST_LOG=s3s::service=debug logs every request's
#      method and URI). The tip's own cost is the difference.
# S3: s3s-fs on the host's network (so it outlives a killed box), reached from each box's
# 127.0.0.1:5000 through bench/lib/nsforward.py (a byte-for-byte TCP forwarder across network
# namespaces). caretaker is the DEBUG build by default (target/debug/caretaker, copied first so a
# rebuild during the run changes nothing); TIP_BIN=target/release/caretaker for the release build.
# The machine is shared (other lab tests, compiles): CPU figures are indicative; the run prints what
# else was running.
# Targets: with the tip on, ≤ 5 s of commits lost (the issue's target); with it off the bound is
# archive_timeout (60 s) + one upload. The tip's cost at 1 MiB/s: printed, no target.
# Usage: bench/tip.sh [WRITE_SECS [LOAD_SECS [WAL_KIB_PER_S]]]   (as root; default 90 180 1024:
# ~13 min on an idle 2-core box). Short: bench/tip.sh 40 60. TIP_RATE=200 commits/s in part 1;
# TIP_PARTS=1 or TIP_PARTS=2 runs one part only; TIP_KEEP=1 keeps the work folder (logs).
set -euo pipefail
write_secs=${1:-90}
load_secs=${2:-180}
wal_kib=${3:-1024}
rate=${TIP_RATE:-200}
parts=${TIP_PARTS:-12}
for a in "$write_secs" "$load_secs" "$wal_kib" "$rate"; do
    [[ $a =~ ^[1-9][0-9]*$ ]] || { echo "usage: bench/tip.sh [WRITE_SECS [LOAD_SECS [WAL_KIB_PER_S]]] (positive integers)" >&2; exit 2; }
done
[[ $parts =~ ^[12]+$ ]] || { echo "TIP_PARTS is 1, 2 or 12" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
(( EUID == 0 )) || { echo "run as root" >&2; exit 2; }
source bench/lib/daemon-pid.sh

bin=${TIP_BIN:-target/debug/caretaker}
[[ -x $bin ]] || { echo "$bin is missing: build it first (cargo build)" >&2; exit 2; }
if [[ ! -x .tools/bin/s3s-fs ]]; then
    echo "installing s3s-fs into .tools (once, ~4 min)..." >&2
    cargo install --quiet --locked --root "$repo/.tools" s3s-fs@0.14.1 --features binary
fi
for p in bc jq; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
[[ -x /usr/lib/postgresql/15/bin/postgres && -x /usr/bin/pgbench ]] || { echo "needs Debian's PostgreSQL 15 (postgresql-15)" >&2; exit 2; }
PY=/usr/bin/python3 # not a pyenv shim

bucket=bench-backups
work=$(mktemp -d /var/tmp/caretaker-bench.XXXXXX)
PGDATA=/var/lib/postgresql/15/main
boxes=()
pids=()
cleaned=
cleanup() {
    [[ -n $cleaned ]] && return
    cleaned=1
    local p b
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    for b in "${boxes[@]}"; do dev/lab down "$b" >/dev/null 2>&1 || echo "dev/lab down $b failed" >&2; done
    if [[ -n ${TIP_KEEP:-} ]]; then echo "TIP_KEEP: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
calc() { echo "$1" | bc -l; }
fmt() { printf "%.${2:-1}f" "$(calc "$1")"; }
ratio() { if [[ $1 != - && $2 != - && $(calc "$2 > 0") == 1 ]]; then printf '%.2f' "$(calc "$1 / $2")"; else echo -; fi; }
cpu() { awk '/^cpu / {printf "%.2f", ($2+$3+$4+$7+$8+$9)/100}' /proc/stat; }
cores=$(nproc)
hz=$(getconf CLK_TCK)
# CPU seconds of host PID $1: "own children" (utime+stime, cutime+cstime).
proc_cpu2() { awk -v hz="$hz" '{ sub(/^.*\) /, ""); printf "%.2f %.2f", ($12+$13)/hz, ($14+$15)/hz }' "/proc/$1/stat"; }
declare -A others=()
note_others() {
    local b
    for b in $(dev/lab list 2>/dev/null | awk 'NR > 1 {print $1}'); do
        [[ " ${boxes[*]} " == *" $b "* ]] || others[$b]=1
    done
}
log() { note_others; printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
wait_for() { # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
    local limit=$1 what=$2 t
    shift 2
    t=$(now)
    until "$@" >/dev/null 2>&1; do
        (( $(printf '%.0f' "$(calc "$(now) - $t")") < limit )) || { log "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.5
    done
}
note_others
c0=$(cpu); sleep 3; background=$(fmt "($(cpu) - $c0) / 3 / $cores * 100" 0)

mkdir -p "$work/target/debug"
cp "$bin" "$work/target/debug/caretaker"
bin_note="$bin of $(date -r "$bin" '+%F %T'), HEAD $(git rev-parse --short HEAD)"
if [[ -n $(find src -newer "$bin" -type f -print -quit) ]] || ! git diff --quiet HEAD -- src || [[ -n $(git ls-files --others --exclude-standard src) ]]; then
    bin_note+=" (src/ has changes not in HEAD or newer than the binary)"
fi

# ---------------------------------------------------------------- S3 on the host
s3port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/$bucket"
RUST_LOG=s3s::service=debug .tools/bin/s3s-fs --host 127.0.0.1 --port "$s3port" --access-key testing --secret-key testing "$work/s3" >"$work/s3s.log" 2>&1 &
s3pid=$!
pids+=("$s3pid")
wait_for 30 "s3s-fs" bash -c "echo > /dev/tcp/127.0.0.1/$s3port"
# s3_counts FROM TO (epoch seconds): "PUT GET HEAD LIST DELETE OTHER" requests the S3 server logged.
s3_counts() {
    local a b
    a=$(date -u -d "@$1" +%Y-%m-%dT%H:%M:%S.%6NZ)
    b=$(date -u -d "@$2" +%Y-%m-%dT%H:%M:%S.%6NZ)
    awk -v a="$a" -v b="$b" '
        /s3s::service: req: Request \{ method: / {
            t = $1; if (t < a || t > b) next
            m = $0; sub(/.*method: /, "", m); sub(/,.*/, "", m)
            u = $0; sub(/.*uri: /, "", u); sub(/,.*/, "", u)
            path = u; sub(/\?.*/, "", path)
            if (m == "GET" && (u ~ /[?&]list-type=/ || path ~ /^\/[^\/]*\/?$/)) m = "LIST"
            else if (m == "POST" && u ~ /[?&]delete/) m = "DELETE"
            n[m]++
        }
        END { printf "%d %d %d %d %d %d\n", n["PUT"], n["GET"], n["HEAD"], n["LIST"], n["DELETE"], n["POST"] + n["OPTIONS"] + n["PATCH"] }' "$work/s3s.log"
}

identity_file=$work/identity.txt
age-keygen -o "$identity_file" 2>/dev/null
recipient=$(age-keygen -y "$identity_file")
seal_key=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')

# ---------------------------------------------------------------- boxes
# boot NAME: a lab box with the private build, S3 at its 127.0.0.1:5000; sets pid1.
declare -A fwd=()
boot() {
    local name=$1 out f
    log "booting lab box $name..."
    out=$(dev/lab up "$name" --owner $$ --target "$work/target")
    boxes+=("$name")
    pid1=$(sed -n 's/^pid1=//p' <<<"$out")
    $PY bench/lib/nsforward.py "/proc/$pid1/ns/net" 5000 127.0.0.1 "$s3port" >"$work/fwd-$name.log" 2>&1 &
    f=$!
    pids+=("$f")
    fwd[$name]=$f
    wait_for 10 "the S3 forwarder in $name" grep -q ready "$work/fwd-$name.log"
}
down() {
    local name=$1 b keep=()
    [[ -n ${fwd[$name]:-} ]] && { kill "${fwd[$name]}" 2>/dev/null || true; wait "${fwd[$name]}" 2>/dev/null || true; }
    dev/lab down "$name" >/dev/null 2>&1 || log "dev/lab down $name failed"
    for b in "${boxes[@]}"; do [[ $b == "$name" ]] || keep+=("$b"); done
    boxes=("${keep[@]}")
}
bx() { local name=$1; shift; dev/lab exec "$name" "$@"; }
bsql() { bx "$1" runuser -u postgres -- env PGOPTIONS='-c client_min_messages=warning' psql -X -Atq -v ON_ERROR_STOP=1 -d "${3:-postgres}" -c "$2"; }
status_json() { bx "$1" caretaker status --json; }
# configure NAME TIP(true|false) PREFIX: caretaker backs up to the shared S3 under PREFIX, archiving
# on, the tip as asked. Each scenario has a prefix of its own: a killed box's lease on its prefix
# (recovery.lease-ttl, 5 min) would otherwise stop the next scenario's archiving until it expires.
configure() {
    local name=$1 tip=$2 prefix=$3
    bx "$name" sh -c 'mkdir -p /etc/caretaker/caretaker.d && cat > /etc/caretaker/caretaker.d/50-bench.toml' <<CONFIG
[aws]
region = "us-east-1"
s3-endpoint = "http://127.0.0.1:5000"
[backup]
bucket = "$bucket"
prefix = "$prefix"
database = "bench"
recipients = ["$recipient"]
wal-archive = true
archive-timeout = "60s"
CONFIG
    set_tip "$name" "$tip"
    bx "$name" sh -c "umask 077; mkdir -p /run/caretaker/env; printf 'BACKUP_AGE_IDENTITY=\"%s\"\nBACKUP_SEAL_KEY=%s\n' '$(grep '^AGE-SECRET-KEY-' "$identity_file")' '$seal_key' > /run/caretaker/env/caretaker.env"
    bx "$name" sh -c 'mkdir -p /run/systemd/system/caretaker.service.d && printf "[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n" > /run/systemd/system/caretaker.service.d/60-bench.conf && systemctl daemon-reload'
}
set_tip() { printf '[backup]\nwal-tip = %s\n' "$2" | bx "$1" sh -c 'cat > /etc/caretaker/caretaker.d/60-tip.toml'; }
archiving_on() { [[ $(bsql "$1" "show archive_mode") == on && $(bsql "$1" "show archive_command") == *' wal push '* ]]; }
tip_streaming() { [[ $(status_json "$1" | jq -r '.daemon.wal_tip.streaming // false') == true ]]; }
start_caretaker() { # start_caretaker NAME WAIT_FOR_TIP(true|false)
    local name=$1 tip=$2
    bx "$name" systemctl restart caretaker.service
    wait_for 60 "caretaker status in $name" bx "$name" caretaker status
    wait_for 90 "caretaker's archiving in $name" archiving_on "$name" || { bx "$name" journalctl -u caretaker -n 40 --no-pager >&2; return 1; }
    if [[ $tip == true ]]; then
        wait_for 60 "the WAL tip streaming in $name" tip_streaming "$name" || { bx "$name" journalctl -u caretaker -n 40 --no-pager >&2; return 1; }
    fi
}
# The host's pgbench reaches the box's PostgreSQL through its socket as role root (peer auth:
# host root is root in the box too).
host_pgbench() { local p=$1; shift; pgbench -h "/proc/$p/root/run/postgresql" -U root "$@"; }

declare -A R

# ---------------------------------------------------------------- part 1: rows lost
printf 'insert into rows default values;\n' >"$work/insert.sql"
# lost TAG TIP: box A, writer, SIGKILL, box B restores --to-latest; results in R[TAG.*].
lost() {
    local tag=$1 tip=$2 a="ct-bench-tip-$$-$1-a" b="ct-bench-tip-$$-$1-b" apid wpid t0 tkill t out rc
    boot "$a"
    apid=$pid1
    configure "$a" "$tip" "lost-$tag"
    bsql "$a" "create database bench"
    bsql "$a" "create role root superuser login"
    bsql "$a" "create table rows(id bigserial primary key, at timestamptz not null default clock_timestamp())" bench
    start_caretaker "$a" "$tip"
    bx "$a" caretaker backup now --kind base >"$work/base-$tag.out" 2>&1 || { cat "$work/base-$tag.out" >&2; bx "$a" journalctl -u caretaker -n 40 --no-pager >&2; return 1; }
    log "tip $tag: base backup done; writer at $rate commits/s for $write_secs s, then SIGKILL of the box's PID 1"
    t0=$(now)
    (cd "$work" && exec pgbench -h "/proc/$apid/root/run/postgresql" -U root -n -c 1 -j 1 -R "$rate" -T $(( write_secs + 600 )) \
        -l --log-prefix="$work/commits-$tag" -f "$work/insert.sql" bench) >"$work/writer-$tag.out" 2>&1 &
    wpid=$!
    pids+=("$wpid")
    sleep "$write_secs"
    R[$tag.status_at_kill]=$(status_json "$a" | jq -c '.daemon.wal_tip // "off" | if type == "object" then {streaming, lag_bytes, lag_seconds, chunks, interval_p50_ms, interval_p99_ms, last_error} else . end' 2>/dev/null || echo '?')
    R[$tag.archived_age]=$(bsql "$a" "select coalesce(last_archived_wal, '-') || ' ' || coalesce(round(extract(epoch from now() - last_archived_time)::numeric, 1)::text, '-') from pg_stat_archiver")
    kill -KILL "$apid"
    tkill=$(now)
    wait "$wpid" 2>/dev/null || true
    R[$tag.write_s]=$(fmt "$tkill - $t0" 1)
    down "$a"
    cat "$work"/commits-"$tag".* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {printf "%d %s.%06d\n", $2, $5, $6}' | sort -n | awk '{print NR, $2}' >"$work/acks-$tag"
    R[$tag.acked]=$(wc -l <"$work/acks-$tag")
    (( ${R[$tag.acked]} > 0 )) || { cat "$work/writer-$tag.out" >&2; log "the writer committed nothing"; return 1; }
    R[$tag.rate]=$(awk 'NR == 1 {a = $2} {b = $2} END {if (NR > 1) printf "%.1f", (NR - 1) / (b - a); else print "-"}' "$work/acks-$tag")

    boot "$b"
    configure "$b" "$tip" "lost-$tag"
    # Not waiting for the new box's own tip: it may wait for the dead box's lease to expire.
    start_caretaker "$b" false
    log "tip $tag: box $b (blank cluster) restores --to-latest from S3..."
    t=$(now)
    set +e
    bx "$b" caretaker restore postgres --to-latest >"$work/restore-$tag.out" 2>&1
    rc=$?
    set -e
    R[$tag.restore_s]=$(fmt "$(now) - $t" 1)
    R[$tag.kill_to_restored_s]=$(fmt "$(now) - $tkill" 1)
    if (( rc != 0 )); then
        cat "$work/restore-$tag.out" >&2
        bx "$b" journalctl -u caretaker -n 60 --no-pager >&2
        return 1
    fi
    wait_for 60 "PostgreSQL after the swap in $b" bsql "$b" "select 1 from rows limit 0" bench
    out=$(bsql "$b" "select count(*) || ' ' || coalesce(max(id), 0) from rows" bench)
    read -r "R[$tag.count]" "R[$tag.max]" <<<"$out"
    R[$tag.holes]=$(( ${R[$tag.max]} - ${R[$tag.count]} ))
    local n=${R[$tag.acked]} m=${R[$tag.max]} tl tr
    if (( m >= n )); then
        R[$tag.lost]=0
        R[$tag.lost_s]=0.0
        R[$tag.unacked_restored]=$(( m - n ))
    else
        R[$tag.lost]=$(( n - m ))
        R[$tag.unacked_restored]=0
        tl=$(awk -v n="$n" '$1 == n {print $2}' "$work/acks-$tag")
        if (( m > 0 )); then tr=$(awk -v m="$m" '$1 == m {print $2}' "$work/acks-$tag"); else tr=$(awk 'NR == 1 {print $2}' "$work/acks-$tag"); fi
        R[$tag.lost_s]=$(fmt "$tl - $tr" 2)
    fi
    R[$tag.newest_ack_before_kill]=$(fmt "$tkill - $(awk -v n="$n" '$1 == n {print $2}' "$work/acks-$tag")" 2)
    R[$tag.from_tip]=$(grep -o '[0-9]* fetch(es) past the archive.s end were served from the WAL tip' "$work/restore-$tag.out" | head -1 || true)
    log "tip $tag: ${R[$tag.lost]} of $n acknowledged rows lost (${R[$tag.lost_s]} s of commits); restore ${R[$tag.restore_s]} s"
    down "$b"
}

# ---------------------------------------------------------------- part 2: the cost
cat >"$work/pad.sql" <<'SQL'
insert into pad(b) select (select string_agg(md5(random()::text || o.g || i.k), '') from generate_series(1, 32) i(k)) from generate_series(1, 10) o(g);
SQL
lsn_diff() { bsql "$1" "select pg_wal_lsn_diff('$2', '$3')::bigint"; }
# cost TAG TIP BOX: the load at $tx_rate for $load_secs after 10 s of warm-up; results in R[TAG.*].
cost() {
    local tag=$1 tip=$2 c=$3 lpid dpid la lb ta tb ca cb s3a n lagmax=0 lagb=0 st i
    set_tip "$c" "$tip"
    start_caretaker "$c" "$tip"
    bsql "$c" "truncate pad" bench
    bsql "$c" "checkpoint"
    dpid=$(daemon_host_pid "$c" "$cpid")
    log "cost, tip $tag: pgbench -R $tx_rate (~$wal_kib KiB/s of WAL) for 10 s + $load_secs s..."
    # exec: $! is pgbench itself, so the kill below stops it (not only a subshell around it).
    (exec pgbench -h "/proc/$cpid/root/run/postgresql" -U root -n -c 2 -j 1 -R "$tx_rate" -T $(( load_secs + 40 )) -f "$work/pad.sql" bench) >"$work/load-$tag.out" 2>&1 &
    lpid=$!
    pids+=("$lpid")
    sleep 10
    ta=$(now)
    la=$(bsql "$c" "select pg_current_wal_lsn()")
    ca=$(proc_cpu2 "$dpid")
    st=$(status_json "$c")
    R[$tag.chunks_a]=$(jq '.daemon.wal_tip.chunks // 0' <<<"$st")
    R[$tag.bytes_a]=$(jq '.daemon.wal_tip.chunk_bytes // 0' <<<"$st")
    R[$tag.deleted_a]=$(jq '.daemon.wal_tip.deleted // 0' <<<"$st")
    R[$tag.arch_a]=$(jq '.daemon.wal.archived // 0' <<<"$st")
    R[$tag.rows_a]=$(bsql "$c" "select count(*) from pad" bench)
    # The tip's lag every 10 s (one status call each: the same in both runs).
    for (( i = 10; i <= load_secs; i += 10 )); do
        sleep 10
        st=$(status_json "$c" 2>/dev/null || echo '{}')
        lagmax=$(jq -r --argjson m "$lagmax" '[(.daemon.wal_tip.lag_seconds // 0), $m] | max' <<<"$st")
        lagb=$(jq -r --argjson m "$lagb" '[(.daemon.wal_tip.lag_bytes // 0), $m] | max' <<<"$st")
    done
    sleep $(( load_secs % 10 ))
    tb=$(now)
    lb=$(bsql "$c" "select pg_current_wal_lsn()")
    cb=$(proc_cpu2 "$dpid")
    st=$(status_json "$c")
    R[$tag.rows_b]=$(bsql "$c" "select count(*) from pad" bench)
    kill "$lpid" 2>/dev/null || true
    wait "$lpid" 2>/dev/null || true
    local secs
    secs=$(calc "$tb - $ta")
    R[$tag.secs]=$(fmt "$secs" 1)
    R[$tag.wal_kib_s]=$(fmt "$(lsn_diff "$c" "$lb" "$la") / 1024 / $secs" 0)
    R[$tag.tps]=$(fmt "(${R[$tag.rows_b]} - ${R[$tag.rows_a]}) / 10 / $secs" 1)
    read -r own_a kids_a <<<"$ca"
    read -r own_b kids_b <<<"$cb"
    R[$tag.cpu_h]=$(fmt "($own_b - $own_a) * 3600 / $secs" 1)
    R[$tag.cpu_pct]=$(fmt "($own_b - $own_a) * 100 / $secs" 2)
    R[$tag.kids_h]=$(fmt "($kids_b - $kids_a) * 3600 / $secs" 1)
    R[$tag.p50]=$(jq -r '.daemon.wal_tip.interval_p50_ms // "-"' <<<"$st")
    R[$tag.p99]=$(jq -r '.daemon.wal_tip.interval_p99_ms // "-"' <<<"$st")
    R[$tag.chunks_h]=$(fmt "($(jq '.daemon.wal_tip.chunks // 0' <<<"$st") - ${R[$tag.chunks_a]}) * 3600 / $secs" 0)
    R[$tag.tip_mib_h]=$(fmt "($(jq '.daemon.wal_tip.chunk_bytes // 0' <<<"$st") - ${R[$tag.bytes_a]}) * 3600 / $secs / 1048576" 0)
    R[$tag.deleted_h]=$(fmt "($(jq '.daemon.wal_tip.deleted // 0' <<<"$st") - ${R[$tag.deleted_a]}) * 3600 / $secs" 0)
    R[$tag.archived_h]=$(fmt "($(jq '.daemon.wal.archived // 0' <<<"$st") - ${R[$tag.arch_a]}) * 3600 / $secs" 0)
    R[$tag.lag_max]=$lagmax
    R[$tag.lag_bytes_max]=$lagb
    R[$tag.last_error]=$(jq -r '.daemon.wal_tip.last_error // "-"' <<<"$st")
    R[$tag.status]=$(jq -c '.daemon.wal_tip // "off"' <<<"$st")
    read -r s3put s3get s3head s3list s3del s3other <<<"$(s3_counts "$ta" "$tb")"
    local k v
    for k in put get head list del other; do
        v=s3$k
        R[$tag.s3$k]=$(fmt "${!v} * 3600 / $secs" 0)
    done
    R[$tag.s3all]=$(fmt "($s3put + $s3get + $s3head + $s3list + $s3del + $s3other) * 3600 / $secs" 0)
    log "cost, tip $tag: ${R[$tag.wal_kib_s]} KiB/s of WAL, daemon ${R[$tag.cpu_h]} CPU-s/h, ${R[$tag.s3all]} S3 requests/h"
}

if [[ $parts == *1* ]]; then
    lost on true
    lost off false
fi
if [[ $parts == *2* ]]; then
    cbox="ct-bench-tip-$$-cost"
    boot "$cbox"
    cpid=$pid1
    configure "$cbox" true cost
    bsql "$cbox" "create database bench"
    bsql "$cbox" "create role root superuser login"
    bsql "$cbox" "create table pad(b text not null)" bench
    bsql "$cbox" "alter system set autovacuum = off"
    bsql "$cbox" "select pg_reload_conf()" >/dev/null
    start_caretaker "$cbox" true
    # Calibration: WAL bytes per transaction at a low rate, then the rate for $wal_kib KiB/s.
    l0=$(bsql "$cbox" "select pg_current_wal_lsn()")
    r0=$(bsql "$cbox" "select count(*) from pad" bench)
    host_pgbench "$cpid" -n -c 1 -j 1 -R 40 -T 8 -f "$work/pad.sql" bench >"$work/calibrate.out" 2>&1
    per_tx=$(fmt "$(lsn_diff "$cbox" "$(bsql "$cbox" "select pg_current_wal_lsn()")" "$l0") / (($(bsql "$cbox" "select count(*) from pad" bench) - $r0) / 10)" 0)
    tx_rate=$(fmt "$wal_kib * 1024 / $per_tx" 0)
    log "calibration: $per_tx bytes of WAL per transaction (10 rows of 1 KiB of hex): -R $tx_rate for $wal_kib KiB/s"
    cost on true "$cbox"
    cost off false "$cbox"
    R[wal_objects]=$(find "$work/s3/$bucket" -path '*/wal-tip/*' -type f ! -name '*.s3s-fs-*' | wc -l)
    down "$cbox"
fi

# ---------------------------------------------------------------- report
row() { printf '  %-50s %14s %14s %10s\n' "$@"; }
mark() { [[ $(calc "$1") == 1 ]] && echo "✓" || echo "✗"; }
note_others
echo
echo "WAL tip: on vs off, PostgreSQL 15, archive_timeout 60 s ($(date -u '+%F %H:%M UTC'))"
echo "  caretaker: $bin_note"
echo "  S3: s3s-fs on the host (plain HTTP), each box's 127.0.0.1:5000 forwarded to it; requests counted from its log"
echo "  machine: $cores cores, $background % busy just before the run; other lab boxes seen during it: ${#others[@]}${others[*]:+ (${!others[*]})}"
(( ${#others[@]} > 0 || background > 10 )) && echo "           (shared: other work ran beside this; CPU figures are indicative)"
echo
if [[ $parts == *1* ]]; then
    echo "  1. a box SIGKILLed after ${write_secs} s of commits (pgbench -c 1 -R $rate on the host), a new box restores --to-latest"
    row "" "tip on" "tip off" "off/on"
    row "commits acknowledged before the kill (rows)" "${R[on.acked]}" "${R[off.acked]}" ""
    row "  at (commits/s, measured)" "${R[on.rate]}" "${R[off.rate]}" ""
    row "rows restored (newest id; holes)" "${R[on.max]} (${R[on.holes]})" "${R[off.max]} (${R[off.holes]})" ""
    row "ROWS LOST" "${R[on.lost]}" "${R[off.lost]}" "$(ratio "${R[off.lost]}" "${R[on.lost]}")"
    row "SECONDS OF COMMITS LOST" "${R[on.lost_s]}" "${R[off.lost_s]}" "$(ratio "${R[off.lost_s]}" "${R[on.lost_s]}")"
    row "restored rows never acknowledged (in flight)" "${R[on.unacked_restored]}" "${R[off.unacked_restored]}" ""
    row "newest archived segment's age at the kill (s)" "${R[on.archived_age]#* }" "${R[off.archived_age]#* }" ""
    row "restore --to-latest on the new box (s)" "${R[on.restore_s]}" "${R[off.restore_s]}" ""
    row "kill → restored (s, incl. booting the new box)" "${R[on.kill_to_restored_s]}" "${R[off.kill_to_restored_s]}" ""
    echo "     newest archived segment at the kill: tip on ${R[on.archived_age]%% *}, tip off ${R[off.archived_age]%% *}"
    echo "     tip at the kill: ${R[on.status_at_kill]}"
    echo "     restore (tip on): ${R[on.from_tip]:-no fetch served from the WAL tip}"
    echo
fi
if [[ $parts == *2* ]]; then
    echo "  2. steady load, ${load_secs} s each (after 10 s of warm-up): pgbench -c 2 -R $tx_rate, 10 rows of 1 KiB hex text a transaction ($per_tx B of WAL each)"
    row "" "tip on" "tip off" "on − off"
    row "WAL rate (KiB/s, pg_current_wal_lsn)" "${R[on.wal_kib_s]}" "${R[off.wal_kib_s]}" ""
    row "transactions/s" "${R[on.tps]}" "${R[off.tps]}" ""
    row "tip upload interval p50 / p99 (ms)" "${R[on.p50]} / ${R[on.p99]}" "-" ""
    row "tip lag max, sampled every 10 s (s / KiB)" "$(fmt "${R[on.lag_max]}" 2) / $(( ${R[on.lag_bytes_max]} / 1024 ))" "-" ""
    row "tip chunks per hour / MiB of WAL in them per hour" "${R[on.chunks_h]} / ${R[on.tip_mib_h]}" "-" ""
    row "tip chunks deleted per hour (segment archived)" "${R[on.deleted_h]}" "-" ""
    row "segments archived per hour" "${R[on.archived_h]}" "${R[off.archived_h]}" ""
    row "DAEMON CPU-s per hour (utime+stime)" "${R[on.cpu_h]}" "${R[off.cpu_h]}" "$(fmt "${R[on.cpu_h]} - ${R[off.cpu_h]}" 1)"
    row "  = % of one core" "${R[on.cpu_pct]}" "${R[off.cpu_pct]}" "$(fmt "${R[on.cpu_pct]} - ${R[off.cpu_pct]}" 2)"
    row "  per GiB of WAL (the two loads' rates differ)" "$(fmt "${R[on.cpu_h]} / (${R[on.wal_kib_s]} * 3600 / 1048576)" 1)" "$(fmt "${R[off.cpu_h]} / (${R[off.wal_kib_s]} * 3600 / 1048576)" 1)" ""
    row "  its waited-for children, CPU-s per hour" "${R[on.kids_h]}" "${R[off.kids_h]}" ""
    row "S3 PUT per hour" "${R[on.s3put]}" "${R[off.s3put]}" "$(( ${R[on.s3put]} - ${R[off.s3put]} ))"
    row "S3 GET per hour" "${R[on.s3get]}" "${R[off.s3get]}" "$(( ${R[on.s3get]} - ${R[off.s3get]} ))"
    row "S3 HEAD per hour" "${R[on.s3head]}" "${R[off.s3head]}" "$(( ${R[on.s3head]} - ${R[off.s3head]} ))"
    row "S3 LIST per hour" "${R[on.s3list]}" "${R[off.s3list]}" "$(( ${R[on.s3list]} - ${R[off.s3list]} ))"
    row "S3 DELETE per hour" "${R[on.s3del]}" "${R[off.s3del]}" "$(( ${R[on.s3del]} - ${R[off.s3del]} ))"
    (( ${R[on.s3other]} + ${R[off.s3other]} > 0 )) && row "S3 other per hour" "${R[on.s3other]}" "${R[off.s3other]}" ""
    row "S3 REQUESTS per hour, all" "${R[on.s3all]}" "${R[off.s3all]}" "$(( ${R[on.s3all]} - ${R[off.s3all]} )) ($(ratio "${R[on.s3all]}" "${R[off.s3all]}")×)"
    echo "     tip objects left in S3 at the end: ${R[wal_objects]}; tip's last_error: ${R[on.last_error]}"
    echo "     tip status at the end of its run: ${R[on.status]}"
    echo
fi
echo "targets:"
if [[ $parts == *1* ]]; then
    echo "  $(mark "${R[on.lost_s]} <= 5") tip on: ≤ 5 s of commits lost: ${R[on.lost_s]} s (${R[on.lost]} rows)"
    echo "  $(mark "${R[off.lost_s]} <= 65") tip off: bound archive_timeout (60 s) + one upload: ${R[off.lost_s]} s (${R[off.lost]} rows; the newest archived segment was ${R[off.archived_age]#* } s old at the kill)"
fi
[[ $parts == *2* ]] && echo "  (part 2: no target; the tip's cost at ${R[on.wal_kib_s]} KiB/s is the on − off column)"
exit 0
