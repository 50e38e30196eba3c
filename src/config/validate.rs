//! Rules across fields, checked on the merged configuration; errors name the file that set the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;

/// Parses `release.public-key`: 64 hex digits, the raw 32-byte Ed25519 public key. (From an
/// OpenSSL key: `openssl pkey -in key.pem -pubout -outform DER | tail -c 32 | xxd -p -c 64`.)
pub fn parse_public_key(text: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    let raw: [u8; 32] =
        bytes.as_slice().try_into().map_err(|_| format!("{} bytes, an Ed25519 public key has 32", bytes.len()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// Rules that span fields or need the merged picture.
pub(super) fn validate(config: &Config, origins: &BTreeMap<String, PathBuf>) -> Result<(), ConfigError> {
    let fail = |key: &str, message: String| ConfigError::Invalid {
        origin: origins.get(key).cloned().unwrap_or_else(|| PathBuf::from("(defaults)")),
        key: key.to_string(),
        message,
    };
    // A rule over several keys names the one a file set (the others are defaults), so that the
    // error points at the file to fix rather than at "(defaults)".
    let fail_among = |keys: &[&str], message: String| {
        let key = keys.iter().find(|k| origins.contains_key(**k)).unwrap_or(&keys[0]);
        fail(key, message)
    };
    let url_check = |key: &str, url: &str| -> Result<(), ConfigError> {
        match url.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
            _ => Err(fail(key, format!("`{url}` is not an http:// or https:// URL"))),
        }
    };
    url_check("aws.imds-endpoint", &config.aws.imds_endpoint)?;
    for (key, value) in [
        ("aws.s3-endpoint", &config.aws.s3_endpoint),
        ("aws.ssm-endpoint", &config.aws.ssm_endpoint),
        ("aws.ses-endpoint", &config.aws.ses_endpoint),
        ("aws.cloudwatch-endpoint", &config.aws.cloudwatch_endpoint),
    ] {
        if let Some(v) = value {
            url_check(key, v)?;
        }
    }
    if let Some(region) = &config.aws.region
        && (region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(fail("aws.region", format!("`{region}` is not a region name such as eu-west-1")));
    }
    if config.aws.imds_deadline.get() < Duration::from_secs(1) {
        return Err(fail("aws.imds-deadline", "must be at least 1s".into()));
    }
    if !(0..=19).contains(&config.jobs.nice) {
        return Err(fail("jobs.nice", format!("{} is not a nice value from 0 to 19", config.jobs.nice)));
    }
    for (key, weight) in [("jobs.cpu-weight", config.jobs.cpu_weight), ("jobs.io-weight", config.jobs.io_weight)] {
        if !(1..=10000).contains(&weight) {
            return Err(fail(key, format!("{weight} is not a weight from 1 to 10000 (systemd's default is 100)")));
        }
    }
    if !(Duration::from_secs(5)..=Duration::from_secs(3600)).contains(&config.recovery.retry_max.get()) {
        return Err(fail("recovery.retry-max", "must be between 5s and 1h".into()));
    }
    if !(Duration::from_secs(30)..=Duration::from_secs(86400)).contains(&config.recovery.lease_ttl.get()) {
        return Err(fail("recovery.lease-ttl", "must be between 30s and 24h".into()));
    }
    let m = &config.metrics;
    if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&m.interval.get()) {
        return Err(fail("metrics.interval", "must be between 10s and 1h".into()));
    }
    let dimension_ok = |v: &str| !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| (0x21..0x7f).contains(&b));
    if !dimension_ok(&m.namespace) || m.namespace.starts_with("AWS/") || m.namespace.contains(':') {
        return Err(fail(
            "metrics.namespace",
            format!("`{}`: 1 to 255 printable ASCII characters, no spaces or `:`, not starting with AWS/", m.namespace),
        ));
    }
    let deployment = config.deployment();
    if !dimension_ok(&deployment) {
        return Err(fail_among(
            &["metrics.deployment", "backup.prefix"],
            format!("the deployment `{deployment}` must be 1 to 255 printable ASCII characters without spaces"),
        ));
    }
    if !(1..=20_160).contains(&m.max_queued) {
        return Err(fail("metrics.max-queued", "must be between 1 and 20160 (two weeks of minutes)".into()));
    }
    url_check("services.api.health-url", &config.services.api.health_url)?;
    let redis = &config.services.redis.url;
    if !(redis.starts_with("redis://") || redis.starts_with("unix://") || redis.starts_with("rediss://")) {
        return Err(fail("services.redis.url", format!("`{redis}` is not a redis://, rediss:// or unix:// URL")));
    }
    if !config.volume.mount_point.is_absolute() || config.volume.mount_point == Path::new("/") {
        return Err(fail("volume.mount-point", "must be an absolute path other than /".into()));
    }
    let ssm = &config.secrets.ssm_path;
    if !ssm.starts_with('/') || !ssm.ends_with('/') {
        return Err(fail("secrets.ssm-path", format!("`{ssm}` must start and end with `/` (e.g. /zmanim/prod/)")));
    }
    if !config.secrets.env_dir.starts_with("/run") {
        return Err(fail("secrets.env-dir", "must be under /run (secrets are never written to disk)".into()));
    }
    let email_ok = |e: &str| {
        e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !e.contains(char::is_whitespace))
    };
    if let Some(sender) = &config.notify.sender
        && !email_ok(sender)
    {
        return Err(fail("notify.sender", format!("`{sender}` is not an email address")));
    }
    for r in &config.notify.recipients {
        if !email_ok(r) {
            return Err(fail("notify.recipients", format!("`{r}` is not an email address")));
        }
    }
    let sup = &config.supervise;
    if sup.probe_timeout >= sup.probe_interval {
        return Err(fail_among(
            &["supervise.probe-timeout", "supervise.probe-interval"],
            format!(
                "supervise.probe-timeout ({}s) must be shorter than supervise.probe-interval ({}s)",
                sup.probe_timeout.get().as_secs_f64(),
                sup.probe_interval.get().as_secs_f64()
            ),
        ));
    }
    if sup.failures_before_restart == 0 {
        return Err(fail("supervise.failures-before-restart", "must be at least 1".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    if !sup.order.iter().all(|k| seen.insert(*k)) {
        return Err(fail("supervise.order", "lists a service twice".into()));
    }
    if (config.services.api.health_json_field.is_some()) != (config.services.api.health_json_value.is_some()) {
        return Err(fail(
            "services.api.health-json-field",
            "set both health-json-field and health-json-value, or neither".into(),
        ));
    }
    let ident_ok = |s: &str| !s.is_empty() && s.len() < 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    // The backed-up database names the databases restores create (`DB_failed_restore_` + a
    // 15-byte stamp): at most 32 bytes, so none of them exceeds PostgreSQL's 63 and gets cut.
    let db = &config.backup.database;
    if db.is_empty() || db.len() > 32 || !db.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(fail(
            "backup.database",
            format!("`{}` must be 1–32 lowercase letters, digits and _", db.escape_debug()),
        ));
    }
    for (key, v) in [("provision.role", &config.provision.role), ("provision.database", &config.provision.database)] {
        if !ident_ok(v) {
            return Err(fail(key, format!("`{v}` must be letters, digits and _ (at most 63)")));
        }
    }
    for e in &config.provision.extensions {
        if !ident_ok(&e.replace('-', "_")) {
            return Err(fail("provision.extensions", format!("`{e}` is not an extension name")));
        }
    }
    let b = &config.backup;
    if let Some(bucket) = &b.bucket
        && (bucket.len() < 3
            || !bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'))
    {
        return Err(fail("backup.bucket", format!("`{bucket}` is not an S3 bucket name")));
    }
    if b.prefix.is_empty() || b.prefix.starts_with('/') || b.prefix.ends_with('/') || b.prefix.contains("..") {
        return Err(fail(
            "backup.prefix",
            format!("`{}` must be a relative key prefix without a trailing /", b.prefix),
        ));
    }
    if !(1..=19).contains(&b.zstd_level) {
        return Err(fail("backup.zstd-level", format!("{} is not a zstd level (1–19)", b.zstd_level)));
    }
    if b.part_size < 5 << 20 {
        return Err(fail(
            "backup.part-size",
            format!("{} is less than S3's minimum part of 5 MiB (5242880)", b.part_size),
        ));
    }
    if b.parts_in_flight == 0 || b.parts_in_flight > 32 {
        return Err(fail("backup.parts-in-flight", format!("{} is not 1–32", b.parts_in_flight)));
    }
    let t = b.archive_timeout.get().as_secs();
    if !(5..=3600).contains(&t) {
        return Err(fail("backup.archive-timeout", format!("{t} s is not 5–3600 seconds")));
    }
    let tip = b.wal_tip_interval.get();
    if tip < std::time::Duration::from_millis(200) || tip > std::time::Duration::from_secs(60) {
        return Err(fail(
            "backup.wal-tip-interval",
            format!("{} is not 200ms–60s (the RPO is about this plus one S3 upload)", humantime::format_duration(tip)),
        ));
    }
    let t = b.wal_tip_lag_alert.get().as_secs();
    if !(5..=86_400).contains(&t) {
        return Err(fail("backup.wal-tip-lag-alert", format!("{t} s is not 5 s–1 day")));
    }
    let t = b.restore_point_interval.get().as_secs();
    if !(300..=7 * 86_400).contains(&t) {
        return Err(fail("backup.restore-point-interval", format!("{t} s is not 5 minutes–7 days")));
    }
    if !b.wal_socket.is_absolute() || b.wal_socket.as_os_str().len() > 100 {
        return Err(fail("backup.wal-socket", "must be an absolute path of at most 100 bytes (a unix socket)".into()));
    }
    for (key, text) in [("backup.schedule", &b.schedule), ("backup.verify-schedule", &b.verify_schedule)] {
        if text != "off"
            && let Err(e) = crate::calendar::Calendar::parse(text)
        {
            return Err(fail(key, format!("`{text}` is not a calendar expression (or \"off\"): {e}")));
        }
    }
    for r in &b.recipients {
        if !r.starts_with("age1") {
            return Err(fail("backup.recipients", format!("`{r}` is not an age X25519 recipient (age1…)")));
        }
    }
    let r = &config.release;
    if let Some(bucket) = &r.bucket
        && (bucket.len() < 3
            || !bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'))
    {
        return Err(fail("release.bucket", format!("`{bucket}` is not an S3 bucket name")));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    for (key, v) in [("release.app", &r.app), ("release.artifact", &r.artifact)] {
        if !name_ok(v) {
            return Err(fail(key, format!("`{v}` must be letters, digits, . _ - (not starting with .), at most 64")));
        }
    }
    if let Some(k) = &r.public_key
        && let Err(e) =
            parse_public_key(k).and_then(|_| if k.len() == 64 { Ok(()) } else { Err("surrounding spaces".into()) })
    {
        return Err(fail("release.public-key", format!("must be an Ed25519 public key as 64 hex digits: {e}")));
    }
    if r.keep == 0 {
        return Err(fail("release.keep", "must be at least 1".into()));
    }
    if r.health_gate_consecutive == 0 {
        return Err(fail("release.health-gate-consecutive", "must be at least 1".into()));
    }
    if r.health_gate_timeout.get() < Duration::from_secs(1) {
        return Err(fail("release.health-gate-timeout", "must be at least 1s".into()));
    }
    if !config.notify.recipients.is_empty() && config.notify.sender.is_none() {
        return Err(fail("notify.recipients", "recipients are set but notify.sender is not".into()));
    }
    Ok(())
}
