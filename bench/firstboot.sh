#!/usr/bin/env bash
# Benchmark (not a test): wall time of `caretaker firstboot` on the every-boot path (volume already
# formatted and mounted) against the emulators, side by side with the seed's shell way: curl for the
# IMDSv2 token and instance-id, one `aws ssm get-parameter` per secret for four secrets, an env
# file written. Both run inside the same lab box against the same IMDS fake and moto.
# Target: caretaker ≤ 100 ms and ≥ 20× faster.
# Usage: bench/firstboot.sh [--release] [RUNS]. Run as root after dev/setup (needs Debian's awscli).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
profile=debug
if [[ ${1:-} == --release ]]; then profile=release; shift; fi
runs=${1:-10}
[ -x /usr/bin/aws ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends awscli >/dev/null
cargo build --workspace --bins --locked --quiet
[[ $profile == release ]] && cargo build -p caretaker --bins --release --locked --quiet

box="ct-bench-fb-$$"
work=$(mktemp -d /tmp/caretaker-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    dev/lab down "$box" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
truncate -s 512M "$work/data.img"
mkfs.xfs -q "$work/data.img"
out=$(dev/lab up "$box" --owner $$ --no-services --volume "$work/data.img:512M" 2>/dev/null)
pid1=$(sed -n 's/^pid1=//p' <<<"$out")
dev=$(sed -n 's/^volume=//p' <<<"$out")
nsenter -t "$pid1" -n -- target/debug/imds-fake --listen 127.0.0.1:1338 >"$work/imds.log" 2>&1 &
pids+=($!)
nsenter -t "$pid1" -n -- .venv/bin/moto_server -H 127.0.0.1 -p 5000 >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do nsenter -t "$pid1" -n -- curl -fsS -o /dev/null http://127.0.0.1:5000/moto-api/ 2>/dev/null && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=eu-west-1
for p in clerk-secret-key db-password sentry-dsn; do
    nsenter -t "$pid1" -n -- /usr/bin/aws --endpoint-url http://127.0.0.1:5000 ssm put-parameter \
        --name "/zmanim/prod/$p" --value "value-of-$p" --type SecureString --overwrite >/dev/null
done
nsenter -t "$pid1" -n -- /usr/bin/aws --endpoint-url http://127.0.0.1:5000 ssm put-parameter \
    --name /zmanim/prod/config --value $'LOG_LEVEL=info\nREGION_HINT=eu' --type String --overwrite >/dev/null

bin=/opt/target/$profile/caretaker
dev/lab exec "$box" sh -c "mkdir -p /etc/caretaker/caretaker.d && cat > /etc/caretaker/caretaker.d/50-bench.toml" <<EOF
[aws]
region = "eu-west-1"
imds-endpoint = "http://127.0.0.1:1338"
ssm-endpoint = "http://127.0.0.1:5000"

[volume]
device = "$dev"

[services.postgres]
data-dir = "/data/postgres"
initdb = "/usr/lib/postgresql/15/bin/initdb"

[services.redis]
data-dir = "/data/redis"

[[secrets.file]]
name = "zmanim-api"
vars = { CLERK_SECRET_KEY = "clerk-secret-key", DB_PASSWORD = "db-password", SENTRY_DSN = "sentry-dsn" }
expand = ["config"]
EOF
# The seed's way, as a script inside the box.
dev/lab exec "$box" sh -c 'cat > /root/seed-boot.sh && chmod +x /root/seed-boot.sh' <<'EOF'
#!/bin/sh
set -eu
TOKEN=$(curl -fsS -X PUT http://127.0.0.1:1338/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
INSTANCE_ID=$(curl -fsS -H "X-aws-ec2-metadata-token: $TOKEN" http://127.0.0.1:1338/latest/meta-data/instance-id)
get() { /usr/bin/aws --endpoint-url http://127.0.0.1:5000 ssm get-parameter --with-decryption --name "/zmanim/prod/$1" --query Parameter.Value --output text; }
{
  echo "INSTANCE_ID=$INSTANCE_ID"
  echo "CLERK_SECRET_KEY=$(get clerk-secret-key)"
  echo "DB_PASSWORD=$(get db-password)"
  echo "SENTRY_DSN=$(get sentry-dsn)"
  get config
} > /run/seed.env.tmp
chmod 600 /run/seed.env.tmp
mv /run/seed.env.tmp /run/seed.env
EOF
inbox() { dev/lab exec "$box" env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=eu-west-1 "$@"; }
inbox "$bin" firstboot >/dev/null 2>&1   # warm-up: mounts the volume, initialises postgres
inbox /root/seed-boot.sh

time_runs() {
    local t0 t1
    for _ in $(seq "$runs"); do
        t0=$(date +%s%N)
        inbox "$@" >/dev/null 2>&1
        t1=$(date +%s%N)
        echo $(( (t1 - t0) / 1000 ))
    done | sort -n
}
# `dev/lab exec` (nsenter) itself costs a few ms; measured and subtracted.
overhead=$(time_runs true | sed -n "$(( (runs + 1) / 2 ))p")
ours=$(time_runs "$bin" firstboot)
seed=$(time_runs /root/seed-boot.sh)
median() { sed -n "$(( (runs + 1) / 2 ))p"; }
ours_med=$(( $(median <<<"$ours") - overhead )); ours_min=$(( $(head -1 <<<"$ours") - overhead ))
seed_med=$(( $(median <<<"$seed") - overhead )); seed_min=$(( $(head -1 <<<"$seed") - overhead ))
awk -v om="$ours_med" -v on="$ours_min" -v sm="$seed_med" -v sn="$seed_min" -v runs="$runs" -v prof="$profile" \
    -v aws="$(/usr/bin/aws --version 2>&1 | cut -d' ' -f1)" 'BEGIN {
  printf "caretaker firstboot (%s build, volume mounted), %d runs: median %.1f ms, min %.1f ms (target ≤ 100 ms)\n", prof, runs, om / 1000, on / 1000
  printf "seed shell (curl + %s ssm get-parameter ×4), %d runs: median %.1f ms, min %.1f ms\n", aws, runs, sm / 1000, sn / 1000
  printf "ratio seed / caretaker: %.1f× (target ≥ 20×)\n", sm / om }'
