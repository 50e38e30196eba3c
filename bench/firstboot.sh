#!/usr/bin/env bash
# Benchmark (not a test): wall time of `caretaker firstboot` on the every-boot path (volume already
# formatted and mounted) against the emulators, side by side with the seed's shell way: curl for the
# IMDSv2 token and instance-id, one `aws ssm get-parameter` per secret for four secrets, an env
# file written. Both run inside the same lab box against the same IMDS fake and moto (both in the
# box's private network). Target: caretaker ≤ 100 ms and ≥ 20× faster.
#
# Usage: bench/firstboot.sh [--release] [RUNS]   (RUNS default 10). Run as root after dev/setup.
# The caretaker measured is the debug build unless --release is given (then
# /opt/target/release/caretaker inside the box). Each run is timed twice: inside the box (date
# +%s%N around the command: the headline, what a boot pays) and from the host around
# `dev/lab exec` (adds nsenter and the dev/lab script, the same for both sides).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
profile=debug
if [[ ${1:-} == --release ]]; then profile=release; shift; fi
runs=${1:-10}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "usage: bench/firstboot.sh [--release] [RUNS]" >&2; exit 2; }
(( EUID == 0 )) || { echo "bench/firstboot.sh: run as root" >&2; exit 2; }
[ -x .venv/bin/moto_server ] || { echo "bench/firstboot.sh: no .venv/bin/moto_server: run dev/setup" >&2; exit 1; }
command -v mkfs.xfs >/dev/null || { echo "bench/firstboot.sh: mkfs.xfs missing (xfsprogs)" >&2; exit 1; }
# Debian's aws CLI; an `aws` earlier on PATH may be something else, so /usr/bin/aws by path.
[ -x /usr/bin/aws ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends awscli >/dev/null

IMDS_PORT=1338
MOTO_PORT=5000   # the box has its own network namespace: fixed ports are free there
box="ct-bench-fb-$$"
work=$(mktemp -d /tmp/caretaker-bench-fb.XXXXXX)
pids=()
cleaned=
cleanup() {
    [[ -n $cleaned ]] && return
    cleaned=1
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    dev/lab down "$box" >/dev/null 2>&1 || echo "bench/firstboot.sh: dev/lab down $box failed" >&2
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

echo "building ($profile)…" >&2
cargo build --workspace --bins --locked --quiet
[[ $profile == release ]] && cargo build --release -p caretaker --bin caretaker --locked --quiet

# The "volume already formatted" path: an xfs made before the box sees it.
truncate -s 512M "$work/data.img"
mkfs.xfs -q -L caretaker "$work/data.img"
if ! out=$(dev/lab up "$box" --owner $$ --no-services --volume "$work/data.img:512M" 2>"$work/lab-up.log"); then
    cat "$work/lab-up.log" >&2
    exit 1
fi
pid1=$(sed -n 's/^pid1=//p' <<<"$out")
dev=$(sed -n 's/^volume=//p' <<<"$out")
[[ -n $pid1 && -n $dev ]] || { echo "dev/lab up printed no pid1/volume: $out" >&2; exit 1; }

# The emulators, in the box's network namespace (nsenter -n execs them: $! is their own PID).
nsenter -t "$pid1" -n -- target/debug/imds-fake --listen "127.0.0.1:$IMDS_PORT" >"$work/imds.log" 2>&1 &
pids+=($!)
nsenter -t "$pid1" -n -- .venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$work/moto.log" 2>&1 &
pids+=($!)
netcurl() { nsenter -t "$pid1" -n -- curl -fsS --max-time 5 "$@"; }
ready() { # NAME CURL-ARGS...: wait up to 30 s for the emulator NAME to answer
    local what=$1
    shift
    for _ in $(seq 150); do
        netcurl -o /dev/null "$@" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "$what did not answer ($*); its log:" >&2
    tail -20 "$work/$what.log" >&2
    exit 1
}
ready moto "http://127.0.0.1:$MOTO_PORT/moto-api/"
ready imds -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "http://127.0.0.1:$IMDS_PORT/latest/api/token"

# Four parameters under /zmanim/prod/ (PutParameter straight to moto: it accepts any signature).
put_param() { # NAME VALUE TYPE
    local body
    body=$(jq -cn --arg n "/zmanim/prod/$1" --arg v "$2" --arg t "$3" '{Name: $n, Value: $v, Type: $t, Overwrite: true}')
    netcurl -o /dev/null -X POST "http://127.0.0.1:$MOTO_PORT/" \
        -H 'Content-Type: application/x-amz-json-1.1' -H 'X-Amz-Target: AmazonSSM.PutParameter' \
        -H 'Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/eu-west-1/ssm/aws4_request, SignedHeaders=host, Signature=0' \
        --data-binary "$body"
}
put_param clerk-secret-key sk_live_bench0123456789abcdef SecureString
put_param db-password 'b3nch-p4ss-w0rd' SecureString
put_param sentry-dsn 'https://abc123@o1.ingest.sentry.io/42' SecureString
put_param config $'LOG_LEVEL=info\nFEATURE_X=on\n' String

bin=/opt/target/$profile/caretaker
dev/lab exec "$box" test -x "$bin" || { echo "$bin is missing inside the box" >&2; exit 1; }
# A whole config (replaces the lab's default): the emulators, the loop volume, all four parameters.
dev/lab exec "$box" sh -c 'mkdir -p /etc/caretaker && cat > /etc/caretaker/caretaker.toml' <<EOF
[aws]
region = "eu-west-1"
imds-endpoint = "http://127.0.0.1:$IMDS_PORT"
imds-deadline = "5s"
ssm-endpoint = "http://127.0.0.1:$MOTO_PORT"

[volume]
device = "$dev"
attach-timeout = "2s"

[services.postgres]
initdb = "/usr/lib/postgresql/15/bin/initdb"

[secrets]
ssm-path = "/zmanim/prod/"

[[secrets.file]]
name = "zmanim-api"
vars = { CLERK_SECRET_KEY = "clerk-secret-key", DB_PASSWORD = "db-password", SENTRY_DSN = "sentry-dsn" }
expand = ["config"]
EOF

# The seed's way, as a script inside the box.
dev/lab exec "$box" sh -c 'cat > /root/seed-boot.sh && chmod 755 /root/seed-boot.sh' <<EOF
#!/bin/sh
set -eu
export AWS_DEFAULT_REGION=eu-west-1
IMDS=http://127.0.0.1:$IMDS_PORT
TOKEN=\$(curl -fsS -X PUT "\$IMDS/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
INSTANCE_ID=\$(curl -fsS -H "X-aws-ec2-metadata-token: \$TOKEN" "\$IMDS/latest/meta-data/instance-id")
get() {
    /usr/bin/aws --endpoint-url http://127.0.0.1:$MOTO_PORT ssm get-parameter --with-decryption \\
        --name "/zmanim/prod/\$1" --query Parameter.Value --output text
}
umask 077
{
    echo "INSTANCE_ID=\$INSTANCE_ID"
    echo "CLERK_SECRET_KEY=\$(get clerk-secret-key)"
    echo "DB_PASSWORD=\$(get db-password)"
    echo "SENTRY_DSN=\$(get sentry-dsn)"
    get config
} > /run/seed.env.tmp
mv /run/seed.env.tmp /run/seed.env
EOF

inbox() { dev/lab exec "$box" env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$@"; }
# Warm-up: the first run mounts the volume (and runs initdb); the second must find it mounted.
inbox "$bin" firstboot >"$work/warm1.out" 2>&1 || { echo "warm-up firstboot failed:" >&2; cat "$work/warm1.out" >&2; exit 1; }
inbox "$bin" firstboot >"$work/warm2.out" 2>&1 || { echo "second firstboot failed:" >&2; cat "$work/warm2.out" >&2; exit 1; }
grep -q "already mounted" "$work/warm2.out" || { echo "second firstboot did not take the already-mounted path:" >&2; cat "$work/warm2.out" >&2; exit 1; }
inbox /root/seed-boot.sh >"$work/seed.out" 2>&1 || { echo "seed script failed:" >&2; cat "$work/seed.out" >&2; exit 1; }
for f in /run/caretaker/env/zmanim-api.env /run/seed.env; do
    for k in CLERK_SECRET_KEY DB_PASSWORD SENTRY_DSN LOG_LEVEL; do
        dev/lab exec "$box" grep -q "^$k=" "$f" || { echo "$f lacks $k" >&2; exit 1; }
    done
done

# One line per run: "INSIDE_US OUTSIDE_US". Any failing run fails the benchmark.
time_runs() {
    local i t0 t1 inner
    for i in $(seq "$runs"); do
        t0=$(date +%s%N)
        if ! inner=$(inbox sh -c 't0=$(date +%s%N); "$@" >/dev/null 2>/tmp/bench-run.err || { cat /tmp/bench-run.err >&2; exit 1; }; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 ))' sh "$@"); then
            echo "run $i of $* failed" >&2
            return 1
        fi
        t1=$(date +%s%N)
        echo "$inner $(( (t1 - t0) / 1000 ))"
    done
}
echo "timing $runs runs each…" >&2
time_runs "$bin" firstboot >"$work/ours"
time_runs /root/seed-boot.sh >"$work/seed"

# stats FILE COLUMN: "MEDIAN MIN" in µs.
stats() { awk -v c="$2" '{print $c}' "$1" | sort -n | awk '{a[NR] = $1} END {
  m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; print m, a[1] }'; }
read -r om on < <(stats "$work/ours" 1)
read -r oxm oxn < <(stats "$work/ours" 2)
read -r sm sn < <(stats "$work/seed" 1)
read -r sxm sxn < <(stats "$work/seed" 2)
awscli=$(/usr/bin/aws --version 2>&1 | cut -d' ' -f1)
awk -v om="$om" -v on="$on" -v oxm="$oxm" -v oxn="$oxn" -v sm="$sm" -v sn="$sn" -v sxm="$sxm" -v sxn="$sxn" \
    -v runs="$runs" -v prof="$profile" -v bin="$bin" -v aws="$awscli" 'BEGIN {
  printf "build measured: %s (%s inside the box); %d runs each; volume xfs, already mounted\n", prof, bin, runs
  printf "caretaker firstboot: median %7.1f ms, min %7.1f ms   (via dev/lab exec: median %.1f, min %.1f)   target ≤ 100 ms: %s\n",
    om / 1000, on / 1000, oxm / 1000, oxn / 1000, (om <= 100000 ? "met" : "NOT met")
  printf "seed shell (curl + %s ssm get-parameter ×4): median %7.1f ms, min %7.1f ms   (via dev/lab exec: median %.1f, min %.1f)\n",
    aws, sm / 1000, sn / 1000, sxm / 1000, sxn / 1000
  printf "ratio seed / caretaker: %.1f× by median, %.1f× by min   target ≥ 20×: %s\n",
    sm / om, sn / on, (sm / om >= 20 ? "met" : "NOT met") }'
