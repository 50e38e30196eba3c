#!/usr/bin/env bash
# Benchmark (not a test): streaming backups of a Zmanim-like PostgreSQL database to S3 (s3s-fs in
# the box's network), side by side in one run, at each size asked (GiB on disk; default 1 and 4):
#   limit      pg_dump -Fc --compress=0 > /dev/null          (the producer alone)
#   zstd -3    pg_dump -Fc --compress=0 | zstd -3 -T1 > /dev/null   (the floor of any compressed pipeline)
#   caretaker  caretaker backup now --kind postgres           (release daemon: zstd, age, multipart, hashes, manifest)
#   aws        pg_dump -Fc | aws s3 cp - s3://…              (the seed's shell way, Debian's aws-cli v2)
#   restic     pg_dump -Fc | restic backup --stdin            (Debian's restic, repository on the same S3)
# Printed: wall time, ratio to the limit, the consumer's peak RSS (caretaker: the daemon's VmHWM,
# the daemon restarted before; others: /usr/bin/time of the consumer process).
# Targets: caretaker's wall ≤ 1.05 × the zstd -3 floor's and its CPU-seconds ≤ 1.10 × the floor's
# (the floor is what any compressed pipeline costs: issue 18), ≥ 1.5× faster than restic, peak RSS
# ≤ 40 MiB and the same (±10 %) at every size.
# caretaker reaches S3 over TLS, as on AWS (PGBOX_TLS=0: plain HTTP, where the SDK also hashes
# every part for SigV4); aws and restic over plain HTTP. The S3 side (s3s-fs, stunnel) stands for
# AWS: its CPU is not counted, and the time it takes to assemble the parts once the last one is up
# (CompleteMultipartUpload: s3s-fs copies and MD5s every byte there, AWS does not) is shown apart.
# The limit, the floor and caretaker run RUNS rounds (default 3), interleaved; medians printed,
# with each run's walls and caretaker's own clock (the manifest's duration) beside.
# BACKUP_OTHERS=0 leaves out aws and restic (minutes at 4 GiB).
# Usage: bench/backup.sh [GIB ...]   (as root, after dev/setup). 1 GiB takes a few minutes.
sizes=("$@")
export PGBOX_TLS=${PGBOX_TLS:-1}
others=${BACKUP_OTHERS:-1}
runs=${RUNS:-3}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "RUNS is a positive integer" >&2; exit 2; }
[[ ${#sizes[@]} -gt 0 ]] || sizes=(1 4)
source "$(dirname "$0")/lib/pgbox.sh" "${sizes[@]}"
mkdir -p "$work/s3/restic"
in_box systemctl start caretaker.service
results=()
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
for gb in "${sizes[@]}"; do
    load_dataset "$gb"
    # The three close ones, RUNS rounds interleaved (a round: limit, floor, caretaker), medians
    # reported: they differ by a few per cent, about one run's noise.
    lims=(); limcs=(); zfs=(); zfcs=(); cts=(); ctcs=(); ctins=(); ctass=(); ctnet=()
    in_box systemctl restart caretaker.service
    for _ in $(seq 50); do in_box caretaker status >/dev/null 2>&1 && break; sleep 0.2; done
    hostpid=$(daemon_host_pid "$box" "$pid1")
    for round in $(seq "$runs"); do
        echo "round $round of $runs: limit, zstd floor, caretaker..." >&2
        c=$(cpu); t=$(now); in_box sh -c 'runuser -u postgres -- pg_dump -Fc --compress=0 -d zmanim > /dev/null'; lims+=("$(elapsed "$t")"); limcs+=("$(cpu_since "$c")")
        c=$(cpu); t=$(now); in_box sh -c 'runuser -u postgres -- pg_dump -Fc --compress=0 -d zmanim | zstd -q -3 -T1 > /dev/null'; zfs+=("$(elapsed "$t")"); zfcs+=("$(cpu_since "$c")")
        c=$(cpu); t=$(now); in_box caretaker backup now --kind postgres > "$work/caretaker.out" || { cat "$work/caretaker.out" >&2; in_box journalctl -u caretaker -n 30 --no-pager >&2; exit 1; }; cts+=("$(elapsed "$t")"); ctcs+=("$(cpu_since "$c")")
        # The daemon's own clock (manifest duration: snapshot to manifest written; the rest of
        # the wall is the CLI, D-Bus and the progress lines).
        ctins+=("$(grep -o 'stored in [0-9.]* s' "$work/caretaker.out" | tail -1 | awk '{print $3}')")
        # S3's assembling of the parts (the daemon times CompleteMultipartUpload).
        ctass+=("$(grep -o '[0-9.]* s of it S3 assembling' "$work/caretaker.out" | tail -1 | awk '{print $1}')")
        ctnet+=("$(echo "${cts[-1]} - ${ctass[-1]}" | bc -l)")
    done
    limit=$(median "${lims[@]}"); limit_cpu=$(median "${limcs[@]}")
    zf=$(median "${zfs[@]}"); zf_cpu=$(median "${zfcs[@]}")
    ct=$(median "${cts[@]}"); ct_cpu=$(median "${ctcs[@]}"); ct_in=$(median "${ctins[@]}")
    ct_ass=$(median "${ctass[@]}"); ct_net=$(printf '%.2f' "$(median "${ctnet[@]}")")
    ct_rss=$(( $(awk '/^VmHWM:/ {print $2}' "/proc/$hostpid/status") / 1024 ))
    stored=$(grep -o '([^)]*stored)' "$work/caretaker.out" | head -1 || true)

    others_lines=
    if [[ $others == 1 ]]; then
        echo "aws s3 cp..." >&2
        c=$(cpu); t=$(now)
        in_box sh -c "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
          runuser -u postgres -- pg_dump -Fc -d zmanim | /usr/bin/time -f %M -o /root/aws.rss \
            /usr/bin/aws --endpoint-url http://127.0.0.1:$S3_PORT s3 cp - s3://$bucket/aws/zmanim.dump"
        aw=$(elapsed "$t"); aw_cpu=$(cpu_since "$c"); aw_rss=$(( $(in_box cat /root/aws.rss) / 1024 ))

        echo "restic..." >&2
        renv="export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing RESTIC_PASSWORD=bench RESTIC_REPOSITORY=s3:http://127.0.0.1:$S3_PORT/restic/$gb"
        in_box sh -c "$renv; restic init -q"
        c=$(cpu); t=$(now)
        in_box sh -c "$renv; runuser -u postgres -- pg_dump -Fc -d zmanim | /usr/bin/time -f %M -o /root/restic.rss restic backup -q --stdin --stdin-filename zmanim.dump"
        rs=$(elapsed "$t"); rs_cpu=$(cpu_since "$c"); rs_rss=$(( $(in_box cat /root/restic.rss) / 1024 ))
        others_lines=$(printf '  %-10s %7ss %12s %10s %10s %10s %6s MiB\n' aws "$aw" "$(ratio "$aw" "$limit")" "$(ratio "$aw" "$zf")" "$aw_cpu" "$(ratio "$aw_cpu" "$zf_cpu")" "$aw_rss"
            printf '  %-10s %7ss %12s %10s %10s %10s %6s MiB   caretaker is %s× faster' restic "$rs" "$(ratio "$rs" "$limit")" "$(ratio "$rs" "$zf")" "$rs_cpu" "$(ratio "$rs_cpu" "$zf_cpu")" "$rs_rss" "$(ratio "$rs" "$ct")")
    fi

    results+=("$(printf '%s GiB (%d MiB on disk, %d MiB dump; caretaker %s\n' "$gb" $(( db_size / 1048576 )) $(( dump_bytes / 1048576 )) "${stored#(}")
$(printf '  %-10s %8s %12s %10s %10s %10s %10s\n' way wall "× the limit" "× floor" "CPU-s" "CPU × floor" "peak RSS")
$(printf '  %-10s %7ss %12s %10s %10s %10s %10s\n' limit "$limit" 1.00 - "$limit_cpu" - -)
$(printf '  %-10s %7ss %12s %10s %10s %10s %10s   (pg_dump | zstd -3 -T1 > /dev/null: the floor of any compressed pipeline)\n' "zstd -3" "$zf" "$(ratio "$zf" "$limit")" 1.00 "$zf_cpu" 1.00 -)
$(printf '  %-10s %7ss %12s %10s %10s %10s %6s MiB\n' caretaker "$ct" "$(ratio "$ct" "$limit")" "$(ratio "$ct" "$zf")" "$ct_cpu" "$(ratio "$ct_cpu" "$zf_cpu")" "$ct_rss")
$(printf '  %-10s %7ss %12s %10s   (the daemon clock: snapshot to manifest written)\n' "  in daemon" "$ct_in" "$(ratio "$ct_in" "$limit")" "$(ratio "$ct_in" "$zf")")
$(printf '  %-10s %7ss %12s %10s   (the wall less S3 assembling the parts, median %s s: caretaker'"'"'s own part)\n' "  less S3" "$ct_net" "$(ratio "$ct_net" "$limit")" "$(ratio "$ct_net" "$zf")" "$ct_ass")
$(printf '  runs (%s rounds): limit %s; floor %s; caretaker %s s (S3 assembling %s s)\n' "$runs" "${lims[*]}" "${zfs[*]}" "${cts[*]}" "${ctass[*]}")
$others_lines
$(printf '  CPU-s: busy time of the whole machine (%s cores) during the run less that of the S3 server (it stands for AWS); a run cannot take less than CPU-s / %s\n' "$cores" "$cores")")
done
echo
printf '%s\n' "${results[@]}"
echo "targets: caretaker wall ≤ 1.05 × the zstd -3 floor (S3's assembling apart), CPU-s ≤ 1.10 × the floor's, ≥ 1.5× faster than restic, peak RSS ≤ 40 MiB at every size"
