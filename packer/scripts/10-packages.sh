#!/usr/bin/env bash
# Packages from the Amazon Linux 2023 repositories: PostgreSQL 16, PostGIS, Redis 7 (Valkey) and
# the tools caretaker calls (xfsprogs for mkfs/growfs, e2fsprogs, util-linux for blkid/mount,
# nftables for the metadata-service guard).
# Run as root by Packer with POSTGRES_PACKAGES, POSTGIS_REPO_URL, POSTGIS_PACKAGE,
# POSTGIS_OPTIONAL and REDIS_PACKAGE in the environment.
set -euo pipefail

# AL2023 pins each image to a repository snapshot (deterministic upgrades); take the newest one
# at build time, so the image starts with current security fixes.
dnf -y upgrade --releasever=latest
dnf -y install xfsprogs e2fsprogs util-linux nftables
# shellcheck disable=SC2086 # a space-separated list
dnf -y install $POSTGRES_PACKAGES

if [[ -n $POSTGIS_REPO_URL ]]; then
    cat >/etc/yum.repos.d/postgis.repo <<REPO
[postgis]
name=PostGIS for PostgreSQL 16 (AL2023 aarch64)
baseurl=$POSTGIS_REPO_URL
enabled=1
gpgcheck=1
REPO
    dnf -y install "$POSTGIS_PACKAGE"
elif [[ $POSTGIS_OPTIONAL == true ]]; then
    echo "WARNING: no PostGIS (postgis_repo_url is empty); remove postgis from provision.extensions" >&2
else
    echo "error: AL2023's repositories have no PostGIS; set postgis_repo_url to a repository with $POSTGIS_PACKAGE for PostgreSQL 16 on aarch64 (or postgis_optional = true)" >&2
    exit 1
fi

if ! dnf -y install "$REDIS_PACKAGE"; then
    echo "error: $REDIS_PACKAGE is not in this AL2023 release. Available:" >&2
    dnf list --available 'valkey*' 'redis*' >&2 || true
    echo "Set redis_package, redis_unit, redis_user and redis_conf to one of them (redis6: redis6.service, redis6, /etc/redis6/redis6.conf)." >&2
    exit 1
fi
