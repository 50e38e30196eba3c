# Sourced by bench/backup.sh and bench/restore.sh: a lab box with PostgreSQL and Redis, s3s-fs (an
# S3 server on a folder, flat memory: see ../shared/lab-notes.md; installed once into .tools) in
# its network, caretaker's RELEASE daemon configured for backups to it (age recipient; identity in
# the env file so restores can decrypt). `load_dataset GB` fills database zmanim with a Zmanim-like
# schema that compresses like real data: ~163k cities with names and PostGIS points, publishers,
# and zmanim rows with times and text, as many as GB asks. Sets: box, pid1, work, bucket,
# recipient, identity_file, S3_PORT; defines in_box, on_host, netcurl, now, elapsed, ratio,
# load_dataset.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
(( EUID == 0 )) || { echo "run as root" >&2; exit 2; }
if [[ ! -x .tools/bin/s3s-fs ]]; then
    echo "installing s3s-fs into .tools (once, ~4 min)..." >&2
    cargo install --quiet --locked --root "$repo/.tools" s3s-fs@0.14.1 --features binary
fi
source bench/lib/daemon-pid.sh
source bench/lib/dataset.sh
S3_PORT=5000
bucket=bench-backups
box="ct-bench-$(basename "$0" .sh)-$$"
work=$(mktemp -d /var/tmp/caretaker-bench.XXXXXX)
pids=()
cleaned=
cleanup() {
    [[ -n $cleaned ]] && return
    cleaned=1
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # on_host runs in a subshell when backgrounded: its PID is not the S3 server's.
    pkill -f -- "s3s-fs .*$work/s3" 2>/dev/null || true
    pkill -f -- "stunnel4 $work/stunnel.conf" 2>/dev/null || true
    dev/lab down "$box" >/dev/null 2>&1 || echo "dev/lab down $box failed" >&2
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for p in restic time awscli bc stunnel4 openssl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
echo "building (release: what an image ships)..." >&2
cargo build --release --workspace --bins --locked --quiet
cargo build --workspace --bins --locked --quiet

# The box lives on a tmpfs: room for the largest dataset asked (about 1.3 GiB of PostgreSQL files
# and WAL per GiB asked, plus the local dump restore.sh keeps).
biggest=1
for a in "$@"; do [[ $a =~ ^[0-9]+$ ]] && (( a > biggest )) && biggest=$a; done
# PGBOX_CPUS=N: the box gets the production shape (N CPUs, PGBOX_MEMORY, default 4G) and what
# stands outside the real box (the S3 server, load generators: on_host) runs on the other CPUs.
shape=()
on_host() { "$@"; }
if [[ -n ${PGBOX_CPUS:-} ]]; then
    (( PGBOX_CPUS < $(nproc) )) || { echo "PGBOX_CPUS=$PGBOX_CPUS leaves no CPU outside the box" >&2; exit 2; }
    shape=(--cpus "$PGBOX_CPUS" --memory "${PGBOX_MEMORY:-4G}")
    on_host() { taskset -c "$PGBOX_CPUS-$(( $(nproc) - 1 ))" "$@"; }
fi
out=$(LAB_BOX_SIZE="$(( 4 + 2 * (biggest - 1) ))G" dev/lab up "$box" --owner $$ "${shape[@]}")
pid1=$(sed -n 's/^pid1=//p' <<<"$out")
in_box() { dev/lab exec "$box" "$@"; }
netcurl() { nsenter -t "$pid1" -n -- curl -fsS "$@"; }
mkdir -p "$work/s3/$bucket"
on_host nsenter -t "$pid1" -n -- .tools/bin/s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key testing --secret-key testing "$work/s3" >"$work/s3s.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do nsenter -t "$pid1" -n -- bash -c "echo > /dev/tcp/127.0.0.1/$S3_PORT" 2>/dev/null && break; sleep 0.2; done
# PGBOX_TLS=1: caretaker reaches S3 over TLS, as on AWS (stunnel on S3_TLS_PORT in front of the
# same server, with a CA of its own the daemon trusts through SSL_CERT_FILE). Over TLS caretaker
# sends parts with UNSIGNED-PAYLOAD; over plain HTTP the SDK hashes every part for SigV4 too.
S3_TLS_PORT=5443
s3_url=http://127.0.0.1:$S3_PORT
tls_env=
if [[ ${PGBOX_TLS:-0} == 1 ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n' > "$work/tls.ext"
    openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
        -extfile "$work/tls.ext" -out "$work/tls.crt" 2>/dev/null
    printf 'foreground = yes\npid =\n[s3]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
        "$S3_TLS_PORT" "$S3_PORT" "$work/tls.crt" "$work/tls.key" > "$work/stunnel.conf"
    on_host nsenter -t "$pid1" -n -- stunnel4 "$work/stunnel.conf" >"$work/stunnel.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 150); do nsenter -t "$pid1" -n -- bash -c "echo > /dev/tcp/127.0.0.1/$S3_TLS_PORT" 2>/dev/null && break; sleep 0.2; done
    in_box sh -c 'cat > /run/bench-ca.crt' < "$work/ca.crt"
    s3_url=https://127.0.0.1:$S3_TLS_PORT
    tls_env=" SSL_CERT_FILE=/run/bench-ca.crt"
fi

identity_file=$work/identity.txt
age-keygen -o "$identity_file" 2>/dev/null
recipient=$(age-keygen -y "$identity_file")
in_box sh -c 'mkdir -p /etc/caretaker/caretaker.d && cat > /etc/caretaker/caretaker.d/50-bench.toml' <<CONFIG
[aws]
region = "us-east-1"
s3-endpoint = "$s3_url"
[backup]
bucket = "$bucket"
database = "zmanim"
recipients = ["$recipient"]
CONFIG
in_box sh -c "umask 077; mkdir -p /run/caretaker/env; printf 'BACKUP_AGE_IDENTITY=\"%s\"\n' '$(grep '^AGE-SECRET-KEY-' "$identity_file")' > /run/caretaker/env/caretaker.env"
# The release daemon, with credentials for the S3 server.
in_box sh -c 'mkdir -p /run/systemd/system/caretaker.service.d && printf "[Service]\nExecStart=\nExecStart=/opt/target/release/caretaker daemon\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing'"$tls_env"'\n" > /run/systemd/system/caretaker.service.d/60-bench.conf && systemctl daemon-reload'

# load_dataset GB: (re)creates database zmanim at about GB GiB on disk.
load_dataset() {
    local gb=$1 rows
    rows=${BENCH_ROWS:-$(( gb * 5200000 ))}
    echo "loading the dataset: ${gb} GiB (163,000 cities, $rows zmanim rows)..." >&2
    in_box runuser -u postgres -- psql -q -c 'drop database if exists zmanim with (force)' -c 'create database zmanim'
    zmanim_dataset_sql "$rows" | in_box runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d zmanim
    db_size=$(in_box runuser -u postgres -- psql -Atc "select pg_database_size('zmanim')")
    dump_bytes=$(in_box sh -c 'runuser -u postgres -- pg_dump -Fc --compress=0 -d zmanim | wc -c')
    echo "database zmanim: $(( db_size / 1048576 )) MiB on disk, $(( dump_bytes / 1048576 )) MiB dump" >&2
}
in_box systemctl start caretaker.service
for _ in $(seq 50); do in_box caretaker status >/dev/null 2>&1 && break; sleep 0.2; done

# Seconds since the epoch with nanoseconds; seconds elapsed since $1.
now() { date +%s.%N; }
elapsed() { printf '%.2f' "$(echo "$(now) - $1" | bc -l)"; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
# The machine's busy CPU time so far in seconds, all cores together (the box's processes and
# everything else: the machine is otherwise idle while a benchmark runs) less the S3 server's
# (it stands for AWS, whose CPU is not the box's), and the CPU used since.
# With TLS, stunnel is the S3 side too.
s3_pids=$(pgrep -d ' ' -f "^[^ ]*(s3s-fs .*$work/s3|stunnel4 $work/stunnel.conf)" || true)
cpu() {
    local s3=0 p t
    for p in $s3_pids; do
        [[ -r /proc/$p/stat ]] && t=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat") && s3=$(( s3 + t ))
    done
    awk -v s3="$s3" '/^cpu / {printf "%.2f", ($2+$3+$4+$7+$8+$9 - s3)/100}' /proc/stat
}
cpu_since() { printf '%.1f' "$(echo "$(cpu) - $1" | bc -l)"; }
cores=$(nproc)
