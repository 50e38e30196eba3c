#!/usr/bin/env bash
# caretaker (its RPM: binary, units, drop-ins, sysusers/tmpfiles, D-Bus policy, SSM documents),
# the API release, the image's caretaker settings and the services' places on the data volume;
# then every unit is enabled. Run as root by Packer.
set -euo pipefail

dnf -y install /tmp/caretaker.rpm
rm -f /tmp/caretaker.rpm
# The RPM's scriptlets do this too; repeated so the image is right whatever their version.
systemd-sysusers
systemd-tmpfiles --create /usr/lib/tmpfiles.d/caretaker.conf

# The API, laid out the way caretaker's updater switches releases.
release=/opt/zmanim/releases/$API_VERSION
install -d -m 0755 "$release"
# The release layout caretaker's updater reads (release.app/VERSION/release.artifact, SHA256SUMS).
aws s3 cp --only-show-errors --region "$AWS_REGION" \
    "s3://$RELEASES_BUCKET/zmanim-api/$API_VERSION/zmanim-api" "$release/zmanim-api"
aws s3 cp --only-show-errors --region "$AWS_REGION" \
    "s3://$RELEASES_BUCKET/zmanim-api/$API_VERSION/SHA256SUMS" /tmp/SHA256SUMS
grep -E '^[0-9a-f]{64} [ *]zmanim-api$' /tmp/SHA256SUMS | (cd "$release" && sha256sum --check --strict -)
rm -f /tmp/SHA256SUMS
chmod 0755 "$release/zmanim-api"
ln -sfn "releases/$API_VERSION" /opt/zmanim/current

# The image's settings, as a drop-in: /etc/caretaker/caretaker.toml stays the operator's.
toml_list() {
    local out="" x
    for x in "$@"; do out+="${out:+, }\"$x\""; done
    printf '[%s]' "$out"
}
install -d -m 0755 /etc/caretaker/caretaker.d
{
    echo "# Written by the image build (packer/caretaker.pkr.hcl)."
    echo "[secrets]"
    echo "ssm-path = \"$SSM_PATH\""
    echo
    echo "[release]"
    echo "bucket = \"$RELEASES_BUCKET\""
    echo
    echo "[services.redis]"
    echo "unit = \"$REDIS_UNIT\""
    echo "user = \"$REDIS_USER\""
    if [[ -n $BACKUP_BUCKET ]]; then
        echo
        echo "[backup]"
        echo "bucket = \"$BACKUP_BUCKET\""
    fi
    if [[ -n $ALERT_SENDER ]]; then
        echo
        echo "[notify]"
        echo "sender = \"$ALERT_SENDER\""
        # shellcheck disable=SC2086 # a space-separated list
        echo "recipients = $(toml_list $ALERT_RECIPIENTS)"
    fi
    if [[ $POSTGIS_PRESENT != yes ]]; then
        echo
        echo "[provision]"
        echo "extensions = []"
    fi
} >/etc/caretaker/caretaker.d/10-image.toml
caretaker config check

# PostgreSQL and Redis keep their data on the volume at /data (mounted by
# caretaker-firstboot.service; their drop-ins Require= it).
install -d -m 0755 /etc/systemd/system/postgresql.service.d
cat >/etc/systemd/system/postgresql.service.d/20-data-volume.conf <<CONF
# Written by the image build: the cluster lives on the data volume.
[Service]
Environment=PGDATA=/data/postgres
CONF
if [[ $REDIS_UNIT != redis.service ]]; then
    # caretaker ships its drop-in for redis.service; this image's server has another name.
    dropin=""
    for dir in /usr/lib/systemd/system /etc/systemd/system; do
        [[ -f $dir/redis.service.d/10-caretaker.conf ]] && dropin=$dir/redis.service.d/10-caretaker.conf
    done
    [[ -n $dropin ]] || { echo "error: caretaker's redis.service.d/10-caretaker.conf is not installed" >&2; exit 1; }
    install -d -m 0755 "/etc/systemd/system/$REDIS_UNIT.d"
    cp "$dropin" "/etc/systemd/system/$REDIS_UNIT.d/10-caretaker.conf"
fi
install -d -m 0755 "/etc/systemd/system/$REDIS_UNIT.d"
cat >"/etc/systemd/system/$REDIS_UNIT.d/20-data-volume.conf" <<CONF
# Written by the image build: the RDB file lives on the data volume.
[Service]
ReadWritePaths=/data/redis
CONF
sed -i -E 's|^dir .*|dir /data/redis|' "$REDIS_CONF"
grep -q '^dir /data/redis$' "$REDIS_CONF"

systemctl daemon-reload
systemctl enable caretaker-imds-guard.service caretaker-firstboot.service caretaker.service postgresql.service "$REDIS_UNIT" zmanim-api.service
for unit in caretaker-firstboot.service caretaker.service zmanim-api.service; do
    systemd-analyze verify "$unit"
done
