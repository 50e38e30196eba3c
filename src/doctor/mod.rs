//! `caretaker doctor`: checks everything the box depends on and prints one line per check — ✓ or
//! ✗ and, for a ✗, what to do. Things that are not configured (no backup bucket, no alert sender)
//! are skipped, not failed. Every network check has a short deadline, so a box with a broken
//! network still gets its answer in seconds.
//!
//! The checks only read: no file, unit or AWS resource is changed, and secret values never leave
//! memory (the SSM check reports parameter names only).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::aws::imds::ImdsClient;
use crate::aws::region::{RegionSource, pick};
use crate::aws::s3::{S3, ServerDate};
use crate::aws::sdk;
use crate::aws::ses::SesClient;
use crate::aws::ssm::SsmClient;
use crate::config::{self, Sources};

mod aws;
mod units;
mod volume;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not configured, or depends on something that failed.
    Skip,
}

impl Status {
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Ok => "✓",
            Status::Fail => "✗",
            Status::Skip => "-",
        }
    }
}

/// One check: what was looked at, what was found, and for a failure what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn skip(check: impl Into<String>, why: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Skip, detail: format!("skipped: {}", why.into()), fix: None }
    }
}

impl fmt::Display for Check {
    /// `✗ volume       /data is not mounted → what to do`, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:<12} {}", self.status.symbol(), self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " → {fix}")?;
        }
        Ok(())
    }
}

/// Every check, in the order they were made.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    /// Whether the configuration itself loaded (when not, nothing else was checked).
    pub config_valid: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>, config_valid: bool) -> Report {
        Report { ok: checks.iter().all(|c| c.status != Status::Fail), config_valid, checks }
    }
}

/// Limits of the checks.
#[derive(Debug, Clone)]
pub struct Options {
    /// The bus systemd is reached on; unset: `daemon.bus-address`, else the system bus.
    pub bus_address: Option<String>,
    /// All IMDS work (capped by `aws.imds-deadline`).
    pub imds_deadline: Duration,
    /// Each AWS check, retries included.
    pub aws_deadline: Duration,
    /// A clock further off than this from S3's is a failure.
    pub clock_tolerance: Duration,
    /// Less free space than this share of the data volume is a failure.
    pub min_free_percent: u64,
    /// A newest backup older than this is a failure.
    pub max_backup_age: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bus_address: None,
            imds_deadline: Duration::from_secs(5),
            aws_deadline: Duration::from_secs(10),
            clock_tolerance: Duration::from_secs(60),
            min_free_percent: 10,
            max_backup_age: Duration::from_secs(2 * 24 * 3600),
        }
    }
}

/// Runs every check. Never fails itself: every problem is a ✗ line.
pub async fn run(sources: &Sources, opts: &Options) -> Report {
    let loaded = match config::load(sources) {
        Ok(l) => l,
        Err(e) => {
            let check = Check::fail(
                "config",
                format!("invalid: {e}"),
                "fix the file and key named, check with `caretaker config check`; nothing else was checked",
            );
            return Report::new(vec![check], false);
        }
    };
    let cfg = &loaded.config;
    let mut checks = Vec::new();
    let files: Vec<String> = loaded.files.iter().map(|p| p.display().to_string()).collect();
    checks.push(Check::ok(
        "config",
        if files.is_empty() {
            "valid (no files: the defaults apply)".to_string()
        } else {
            format!("valid: {}", files.join(", "))
        },
    ));

    // Identity first: the region (when not configured) comes from it.
    let imds_deadline = opts.imds_deadline.min(cfg.aws.imds_deadline.get());
    let identity = ImdsClient::new(&cfg.aws.imds_endpoint, imds_deadline).identity_document().await;
    let instance_id = identity.as_ref().ok().map(|d| d.instance_id.clone());
    let imds_region = identity.as_ref().ok().map(|d| d.region.clone());
    checks.push(match &identity {
        Ok(d) => Check::ok(
            "imds",
            format!(
                "IMDSv2 answers at {}: instance {} ({}) in {}, account {}",
                cfg.aws.imds_endpoint,
                d.instance_id,
                if d.instance_type.is_empty() { "?" } else { &d.instance_type },
                d.availability_zone,
                if d.account_id.is_empty() { "?" } else { &d.account_id }
            ),
        ),
        Err(e) => Check::fail(
            "imds",
            format!("no instance identity from {}: {e}", cfg.aws.imds_endpoint),
            "enable the instance metadata service with IMDSv2 (`aws ec2 modify-instance-metadata-options --instance-id ID --http-endpoint enabled --http-tokens required --http-put-response-hop-limit 1`); on a box that is not EC2, set aws.imds-endpoint",
        ),
    });

    let found = [
        (RegionSource::Imds, imds_region.clone()),
        (RegionSource::InstanceEnv, crate::envfile::instance_var("REGION")),
    ];
    let region = match pick(cfg.aws.region.as_deref(), found) {
        Some(r) => {
            let elsewhere = match &imds_region {
                Some(i) if r.source == RegionSource::Config && *i != r.name => {
                    format!("; the instance itself is in {i}")
                }
                _ => String::new(),
            };
            checks.push(Check::ok("region", format!("{} ({}{elsewhere})", r.name, r.source)));
            Some(r.name)
        }
        None => {
            checks.push(Check::fail(
                "region",
                "unknown: aws.region is not set and IMDS did not say",
                "set aws.region in /etc/caretaker/caretaker.toml, or fix IMDS (above)",
            ));
            None
        }
    };

    match &region {
        Some(region) => {
            let sdk = sdk::sdk_config(&cfg.aws, region).await;
            let date = ServerDate::default();
            let ssm = SsmClient::new(sdk::ssm_client(&sdk, &cfg.aws));
            let ses = SesClient::new(sdk::ses_client(&sdk, &cfg.aws));
            let s3 = S3::new(sdk::s3_client(&sdk, &cfg.aws))
                .with_unsigned_parts(crate::aws::s3::tls_endpoint(cfg.aws.s3_endpoint.as_deref()));
            let cloudwatch = crate::aws::cloudwatch::CloudWatch::new(sdk::cloudwatch_client(&sdk, &cfg.aws));
            let (ssm, ses, alarms, buckets) = tokio::join!(
                aws::check_ssm(cfg, ssm, opts.aws_deadline),
                aws::check_ses(cfg, &ses, opts.aws_deadline),
                aws::check_alarms(cfg, &cloudwatch, opts.aws_deadline),
                aws::check_buckets(cfg, &s3, opts, &date),
            );
            checks.push(ssm);
            checks.push(ses);
            checks.push(alarms);
            checks.extend(buckets);
            checks.push(aws::check_clock(cfg, &date, opts.clock_tolerance));
        }
        None => {
            for name in ["ssm", "ses", "alarms", "backups", "releases", "clock"] {
                checks.push(Check::skip(name, "no AWS region (see above)"));
            }
        }
    }

    let mount_point = cfg.volume.mount_point.clone();
    let min_free = opts.min_free_percent;
    let instance = instance_id.clone();
    let volume = tokio::task::spawn_blocking(move || volume::check_volume(&mount_point, min_free, instance.as_deref()))
        .await
        .unwrap_or_else(|e| vec![Check::fail("volume", format!("the check did not finish: {e}"), "run it again")]);
    checks.extend(volume);

    let bus = opts.bus_address.clone().or_else(|| cfg.daemon.bus_address.clone());
    checks.extend(units::check_units(cfg, bus.as_deref()).await);
    checks.push(check_wal_tip(cfg).await);

    Report::new(checks, true)
}

/// The WAL tip: PostgreSQL lets caretaker stream (pg_hba `replication`, `max_wal_senders`), and
/// the daemon's tip is streaming now.
async fn check_wal_tip(cfg: &config::Config) -> Check {
    let b = &cfg.backup;
    if b.bucket.is_none() || !b.wal_archive || !b.wal_tip {
        return Check::skip("wal-tip", "off (needs backup.bucket, backup.wal-archive and backup.wal-tip)");
    }
    let target = crate::pg::PgTarget::new(&cfg.services.postgres);
    let Ok(c) = target.connect("postgres", std::time::Duration::from_secs(5)).await else {
        return Check::skip("wal-tip", "PostgreSQL is not accepting connections");
    };
    // The tip runs beside the daemon's archiving: none yet (a daemon that has not loaded this
    // configuration, or is not running) is for the units' checks above to say.
    let archiving = c.query_one("SELECT current_setting('archive_command')", &[]).await.map(|r| r.get::<_, String>(0));
    if !archiving.as_deref().is_ok_and(|a| a.contains("wal push")) {
        return Check::skip("wal-tip", "PostgreSQL does not archive through caretaker yet (the daemon sets it up)");
    }
    let probe = crate::replication::Replication::connect(
        &target.socket_path(),
        &target.user,
        "caretaker-doctor",
        std::time::Duration::from_secs(5),
    )
    .await;
    let system = match probe {
        Ok(mut r) => r.identify().await,
        Err(e) => Err(e),
    };
    if let Err(e) = system {
        return Check::fail(
            "wal-tip",
            format!("PostgreSQL refuses a replication connection: {e}"),
            format!(
                "allow it: `local replication {} peer` in pg_hba.conf (initdb's default) and max_wal_senders ≥ 2, then \
                 reload PostgreSQL",
                target.user
            ),
        );
    }
    let row = c
        .query_opt(
            "SELECT state, flush_lsn::text, (pg_current_wal_flush_lsn() - flush_lsn)::bigint FROM pg_stat_replication \
             WHERE application_name = $1",
            &[&crate::backup::wal::tip::APPLICATION],
        )
        .await;
    match row {
        Ok(Some(r)) => {
            let (state, flush, behind): (String, Option<String>, Option<i64>) = (r.get(0), r.get(1), r.get(2));
            Check::ok(
                "wal-tip",
                format!(
                    "streaming ({state}); S3 holds WAL to {} ({} behind PostgreSQL's flush)",
                    flush.unwrap_or_else(|| "-".into()),
                    crate::units::human_bytes(behind.unwrap_or(0).max(0) as u64)
                ),
            )
        }
        Ok(None) => Check::fail(
            "wal-tip",
            "PostgreSQL accepts replication, but the daemon's tip is not streaming: commits since the last archived \
             segment are on this box only",
            "caretaker status (wal-tip line); journalctl -u caretaker | grep 'WAL tip'",
        ),
        Err(e) => Check::fail("wal-tip", format!("cannot read pg_stat_replication: {e}"), "check PostgreSQL's log"),
    }
}

/// `1 env file`, `2 env files`.
pub(super) fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("{n} {noun}") } else { format!("{n} {noun}s") }
}

pub(super) fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::aws::id_time;
    use super::*;

    #[test]
    fn lines_carry_symbol_name_detail_and_fix() {
        let ok = Check::ok("imds", "IMDSv2 answers");
        assert_eq!(ok.to_string(), "✓ imds         IMDSv2 answers");
        let bad = Check::fail("volume", "/data is not mounted", "attach it");
        assert_eq!(bad.to_string(), "✗ volume       /data is not mounted → attach it");
        let skip = Check::skip("ses", "notify.sender is not set");
        assert_eq!(skip.to_string(), "- ses          skipped: notify.sender is not set");
        assert!(!bad.to_string().contains('\n'));
    }

    #[test]
    fn a_skip_does_not_fail_the_report_but_a_failure_does() {
        let r = Report::new(vec![Check::ok("a", "x"), Check::skip("b", "y")], true);
        assert!(r.ok);
        let r = Report::new(vec![Check::ok("a", "x"), Check::fail("b", "y", "z")], true);
        assert!(!r.ok);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "z");
        assert!(json["checks"][0].get("fix").is_none());
    }

    #[test]
    fn backup_ids_give_their_time() {
        let t = id_time("20261122T030000Z-a1b2c3").unwrap();
        assert_eq!(humantime::format_rfc3339_seconds(t).to_string(), "2026-11-22T03:00:00Z");
        assert!(id_time("not-an-id").is_none());
        assert!(id_time("20261122X030000Z-a").is_none());
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(human_age(Duration::from_secs(42)), "42s");
        assert_eq!(human_age(Duration::from_secs(600)), "10m");
        assert_eq!(human_age(Duration::from_secs(5 * 3600)), "5h");
        assert_eq!(human_age(Duration::from_secs(3 * 86_400)), "3d");
    }

    #[tokio::test]
    async fn an_invalid_configuration_is_the_only_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[volume]\nmount-piont = \"/data\"\n").unwrap();
        let r = run(&Sources::file(&file), &Options::default()).await;
        assert!(!r.ok && !r.config_valid);
        assert_eq!(r.checks.len(), 1);
        assert!(r.checks[0].detail.contains("mount-piont"), "{}", r.checks[0].detail);
    }
}
