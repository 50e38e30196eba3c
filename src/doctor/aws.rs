//! The AWS side: SSM, SES, the buckets, the newest backups, and the clock against S3's.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{Check, Options, human_age, plural};
use crate::aws::cloudwatch::CloudWatch;
use crate::aws::s3::{S3, ServerDate, http_date_secs};
use crate::aws::ses::SesClient;
use crate::aws::ssm::{SsmClient, SsmError};
use crate::config::Config;

fn ssm_fix(e: &SsmError) -> &'static str {
    match e {
        SsmError::AccessDenied { .. } | SsmError::Decrypt { .. } => {
            "attach caretaker's IAM policy (/usr/share/caretaker/iam/caretaker-policy.json, with this path) to the instance role"
        }
        SsmError::Deadline { .. } | SsmError::Request { .. } => {
            "check the way to SSM: aws.ssm-endpoint, the VPC endpoint for ssm (or a route to the internet), security groups, DNS"
        }
        _ => "see the message; `aws ssm get-parameters-by-path --path PATH --recursive` on the box shows what AWS says",
    }
}

/// The SSM path is readable (decrypted, all pages) and holds every parameter the env files need.
/// Only names are reported.
pub(super) async fn check_ssm(cfg: &Config, ssm: SsmClient, deadline: Duration) -> Check {
    let path = &cfg.secrets.ssm_path;
    let client = ssm.with_deadline(deadline).with_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let listing = match client.read_path(path).await {
        Ok(l) => l,
        Err(e) => return Check::fail("ssm", e.to_string(), ssm_fix(&e)),
    };
    let names: Vec<&str> =
        listing.parameters.iter().map(|p| p.name.strip_prefix(path.as_str()).unwrap_or(&p.name)).collect();
    let shown = if names.len() > 8 { format!("{}, …", names[..8].join(", ")) } else { names.join(", ") };
    let count = format!("{path}: {} parameters readable ({shown})", names.len());
    match crate::boot::secrets::render(&cfg.secrets, &listing.parameters) {
        Ok(files) => Check::ok("ssm", format!("{count}; none missing for {}", plural(files.len(), "env file"))),
        Err(e) => Check::fail(
            "ssm",
            format!("{count}, but {e}"),
            "put the parameter (`aws ssm put-parameter --type SecureString --name NAME --value …`), then `systemctl restart caretaker-firstboot`",
        ),
    }
}

/// The alert sender is verified in SES (the address itself or its domain).
pub(super) async fn check_ses(cfg: &Config, ses: &SesClient, deadline: Duration) -> Check {
    let Some(sender) = &cfg.notify.sender else {
        return Check::skip("ses", "notify.sender is not set (no alert email)");
    };
    let domain = sender.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default();
    let identities = [sender.as_str(), domain.as_str()];
    let call = ses.verification_statuses(&identities);
    let out = match tokio::time::timeout(deadline, call).await {
        Ok(Ok(out)) => out,
        Ok(Err(message)) => {
            return Check::fail(
                "ses",
                format!("cannot ask SES about {sender}: {message}"),
                "the instance role needs ses:GetIdentityVerificationAttributes (caretaker's IAM policy); check aws.ses-endpoint and the way to SES",
            );
        }
        Err(_) => {
            return Check::fail(
                "ses",
                format!("SES did not answer within {deadline:?}"),
                "check aws.ses-endpoint and the way to SES (VPC endpoint or internet)",
            );
        }
    };
    let status = |identity: &str| out.get(identity).cloned();
    let success = |s: &Option<String>| s.as_deref() == Some("Success");
    let (address, dom) = (status(sender), status(&domain));
    if success(&address) {
        Check::ok("ses", format!("sender {sender} is verified"))
    } else if success(&dom) {
        Check::ok("ses", format!("sender {sender} is verified through its domain {domain}"))
    } else {
        Check::fail(
            "ses",
            format!(
                "sender {sender} is not verified (address: {}, domain {domain}: {})",
                address.as_deref().unwrap_or("unknown to SES"),
                dom.as_deref().unwrap_or("unknown to SES")
            ),
            format!(
                "verify it: `aws ses verify-email-identity --email-address {sender}` (or verify the domain), and leave the SES sandbox for outside recipients"
            ),
        )
    }
}

/// Metrics are on, and the alarms on them exist in CloudWatch and are OK (deployed from
/// packaging/cloudwatch/alarms.json: their names start with `caretaker-DEPLOYMENT-`).
pub(super) async fn check_alarms(cfg: &Config, cloudwatch: &CloudWatch, deadline: Duration) -> Check {
    let deploy = "deploy them: aws cloudformation deploy --template-file /usr/share/caretaker/cloudwatch/alarms.json --stack-name caretaker-alarms --parameter-overrides Deployment=… DeploymentName=… AlertEmail=… (README: Metrics and alarms)";
    if !cfg.metrics.enabled {
        return Check::skip(
            "alarms",
            "metrics.enabled is false: if the box dies, nothing tells anyone (its own emails die with it); turn metrics on and deploy the alarms (README: Metrics and alarms)",
        );
    }
    let prefix = format!("caretaker-{}-", cfg.deployment());
    let alarms = match tokio::time::timeout(deadline, cloudwatch.alarms(&prefix)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return Check::fail(
                "alarms",
                e.to_string(),
                "the instance role needs cloudwatch:DescribeAlarms on caretaker-* alarms (caretaker's IAM policy); check aws.cloudwatch-endpoint and the way to CloudWatch",
            );
        }
        Err(_) => {
            return Check::fail(
                "alarms",
                format!("CloudWatch did not answer within {deadline:?}"),
                "check aws.cloudwatch-endpoint and the way to CloudWatch (the monitoring VPC endpoint or internet)",
            );
        }
    };
    let heartbeat = format!("{prefix}heartbeat");
    if !alarms.iter().any(|a| a.name == heartbeat) {
        let found = if alarms.is_empty() { "no alarm".to_string() } else { plural(alarms.len(), "other alarm") };
        return Check::fail("alarms", format!("{heartbeat} does not exist ({found} named {prefix}*)"), deploy);
    }
    let not_ok: Vec<String> = alarms
        .iter()
        .filter(|a| a.state != "OK")
        .map(|a| format!("{} is {}: {}", a.name, a.state, a.reason.chars().take(160).collect::<String>()))
        .collect();
    if not_ok.is_empty() {
        Check::ok("alarms", format!("{} named {prefix}*, all OK", plural(alarms.len(), "alarm")))
    } else {
        Check::fail(
            "alarms",
            format!("{} of {} not OK: {}", not_ok.len(), plural(alarms.len(), "alarm"), not_ok.join("; ")),
            "each alarm's description says what it means and what to run; INSUFFICIENT_DATA right after deploying clears within a few intervals, if it stays: `caretaker status` (metrics line)",
        )
    }
}

/// The backup bucket answers under our prefix, how old its newest backup of each kind is, and the
/// releases bucket answers under the application's prefix. Without a backup bucket but with
/// `aws.s3-endpoint`, one cheap call still fetches S3's clock for [`check_clock`].
pub(super) async fn check_buckets(cfg: &Config, s3: &S3, opts: &Options, date: &ServerDate) -> Vec<Check> {
    let deadline = opts.aws_deadline;
    let mut checks = Vec::new();
    match &cfg.backup.bucket {
        None => {
            checks.push(Check::skip("backups", "backup.bucket is not set (no backups)"));
            if cfg.aws.s3_endpoint.is_some() {
                let _ = tokio::time::timeout(deadline, s3.probe_date(date)).await;
            }
        }
        Some(bucket) => {
            let prefix = format!("{}/", cfg.backup.prefix);
            let reachable = match tokio::time::timeout(deadline, s3.probe_list(bucket, &prefix, date)).await {
                Ok(Ok(_)) => {
                    checks.push(Check::ok("backups", format!("s3://{bucket}/{prefix} can be listed")));
                    true
                }
                Ok(Err(e)) => {
                    checks.push(Check::fail(
                        "backups",
                        format!("s3://{bucket}/{prefix} cannot be listed: {}", e.message),
                        "check backup.bucket, that the bucket exists in this account, and that caretaker's IAM policy names it (s3:ListBucket with the prefix); check aws.s3-endpoint and the S3 gateway endpoint",
                    ));
                    false
                }
                Err(_) => {
                    checks.push(Check::fail(
                        "backups",
                        format!("S3 did not answer within {deadline:?}"),
                        "check aws.s3-endpoint and the way to S3 (gateway endpoint in the route table)",
                    ));
                    false
                }
            };
            if reachable {
                checks.push(last_backups(cfg, s3, bucket, opts.max_backup_age, deadline).await);
                checks.push(backup_history(s3, bucket, cfg.backup.keep_daily, deadline).await);
            } else {
                checks.push(Check::skip("last-backup", "the bucket cannot be listed"));
                checks.push(Check::skip("backup-history", "the bucket cannot be listed"));
            }
        }
    }
    match &cfg.release.bucket {
        None => checks.push(Check::skip("releases", "release.bucket is not set (no updates)")),
        Some(bucket) => checks
            .push(check_releases(s3, bucket, &cfg.release.app, &cfg.services.api.install_dir, deadline, date).await),
    }
    checks
}

/// The releases bucket answers under the application's prefix; says which release is the newest
/// there (`APP/LATEST`) and which one this box runs (the `current` symlink).
async fn check_releases(
    s3: &S3,
    bucket: &str,
    app: &str,
    install_dir: &Path,
    deadline: Duration,
    date: &ServerDate,
) -> Check {
    let prefix = format!("{app}/");
    match tokio::time::timeout(deadline, s3.probe_list(bucket, &prefix, date)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Check::fail(
                "releases",
                format!("s3://{bucket}/{prefix} cannot be listed: {}", e.message),
                "check release.bucket and that caretaker's IAM policy names it (s3:ListBucket with the prefix, s3:GetObject)",
            );
        }
        Err(_) => {
            return Check::fail(
                "releases",
                format!("S3 did not answer within {deadline:?}"),
                "check aws.s3-endpoint and the way to S3",
            );
        }
    }
    let latest = match tokio::time::timeout(deadline, s3.get_object(bucket, &format!("{prefix}LATEST"))).await {
        Ok(Ok(Some(v))) => format!("LATEST is {}", String::from_utf8_lossy(&v).trim()),
        Ok(Ok(None)) => "no LATEST yet".to_string(),
        Ok(Err(e)) => format!("LATEST unreadable ({})", e.message),
        Err(_) => "LATEST: no answer".to_string(),
    };
    let running = std::fs::read_link(install_dir.join("current"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into());
    Check::ok("releases", format!("s3://{bucket}/{prefix} can be listed; {latest}; this box runs {running}"))
}

/// Whether a compromised box could destroy the backups' history: the bucket must keep versions
/// and lock each for a default retention (Object Lock), so that what the instance role can do —
/// delete (a delete marker), overwrite (a new version) — hides a backup at most, and the locked
/// versions stay restorable for that long. `packaging/aws/protect-backup-bucket` sets it up.
async fn backup_history(s3: &S3, bucket: &str, keep_daily: usize, deadline: Duration) -> Check {
    const FIX: &str = "run packaging/aws/protect-backup-bucket BUCKET DAYS with the bucket owner's credentials (not the \
                       instance role's); see README, \"Security model\"";
    let p = match tokio::time::timeout(deadline, s3.history_protection(bucket)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Check::fail(
                "backup-history",
                format!("cannot read the bucket's versioning and Object Lock settings: {}", e.message),
                "grant the instance role s3:GetBucketVersioning and s3:GetBucketObjectLockConfiguration on the bucket \
                 (packaging/iam/caretaker-policy.json)",
            );
        }
        Err(_) => return Check::fail("backup-history", format!("S3 did not answer within {deadline:?}"), "run again"),
    };
    let mut wrong = Vec::new();
    if p.versioning != "Enabled" {
        wrong.push(format!("versioning is {}", p.versioning));
    }
    match (p.lock_enabled, &p.mode, p.days) {
        (false, _, _) => wrong.push("Object Lock is off".into()),
        (true, Some(_), Some(days)) if days as usize >= keep_daily => {}
        (true, Some(_), Some(days)) => wrong.push(format!(
            "Object Lock keeps versions {days} days, fewer than backup.keep-daily ({keep_daily}): a compromised box could \
             wait out the lock"
        )),
        (true, _, _) => wrong.push("Object Lock has no default retention".into()),
    }
    if wrong.is_empty() {
        Check::ok(
            "backup-history",
            format!(
                "s3://{bucket}: versioning on, every version locked {} days ({}): a compromised box can hide backups, \
                 not destroy them",
                p.days.unwrap_or_default(),
                p.mode.unwrap_or_default()
            ),
        )
    } else {
        Check::fail(
            "backup-history",
            format!("s3://{bucket}: {}: a compromised box could delete every backup", wrong.join(", ")),
            FIX,
        )
    }
}

/// `20261122T030000Z-a1b2c3` → its time.
pub(super) fn id_time(id: &str) -> Option<SystemTime> {
    let t = id.split('-').next()?;
    if t.len() != 16 || !t.ends_with('Z') || t.as_bytes().get(8) != Some(&b'T') {
        return None;
    }
    let rfc = format!("{}-{}-{}T{}:{}:{}Z", &t[0..4], &t[4..6], &t[6..8], &t[9..11], &t[11..13], &t[13..15]);
    humantime::parse_rfc3339(&rfc).ok()
}

/// The newest backup of each kind and the newest restore drill. With this box's seal keys the
/// backups are the sealed manifests the listing accepts (a forged one does not make a stale box
/// look fresh); without them, the manifests' key names, and the line says they are unchecked.
async fn last_backups(cfg: &Config, s3: &S3, bucket: &str, max_age: Duration, deadline: Duration) -> Check {
    let prefix = &cfg.backup.prefix;
    let sealed = crate::backup::seal::SealKeys::for_config(cfg).is_ok();
    let now = SystemTime::now();
    let mut parts = Vec::new();
    let mut stale = Vec::new();
    let mut drills: Option<SystemTime> = None;
    let mut ignored = 0;
    for kind in crate::backup::run::Kind::ALL {
        let kind_name = kind.as_str();
        let keys = match tokio::time::timeout(deadline, s3.list_keys(bucket, &format!("{prefix}/{kind_name}/"))).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => return Check::fail("last-backup", e.to_string(), "see the backups check above"),
            Err(_) => return Check::fail("last-backup", format!("S3 did not answer within {deadline:?}"), "run again"),
        };
        let time_of = |file: &str| {
            keys.iter()
                .filter_map(|k| k.strip_suffix(&format!("/{file}")))
                .filter_map(|folder| folder.rsplit('/').next().and_then(id_time))
                .max()
        };
        if let Some(d) = time_of(crate::backup::run::VERIFY) {
            drills = drills.max(Some(d));
        }
        let newest = if sealed {
            match tokio::time::timeout(deadline, crate::backup::run::listing(cfg, s3, kind)).await {
                Ok(Ok(l)) => {
                    ignored += l.ignored.len();
                    l.backups.last().and_then(|m| id_time(&m.id))
                }
                Ok(Err(e)) => return Check::fail("last-backup", e.to_string(), "see the backups check above"),
                Err(_) => {
                    return Check::fail("last-backup", format!("S3 did not answer within {deadline:?}"), "run again");
                }
            }
        } else {
            time_of(crate::backup::run::MANIFEST)
        };
        match newest {
            Some(t) => {
                let age = now.duration_since(t).unwrap_or_default();
                parts.push(format!("{kind_name} {} ago", human_age(age)));
                if age > max_age {
                    stale.push(format!("{kind_name} ({} old)", human_age(age)));
                }
            }
            None => stale.push(format!("{kind_name} (none yet)")),
        }
    }
    if ignored > 0 {
        parts.push(format!("{} ignored (not sealed by this box)", plural(ignored, "object")));
    }
    if !sealed {
        parts.push("seals unchecked: no seal key or identity on this box".into());
    }
    let drill = match drills {
        Some(d) => format!("last restore drill {} ago", human_age(now.duration_since(d).unwrap_or_default())),
        None => "no restore drill yet".to_string(),
    };
    if stale.is_empty() {
        Check::ok("last-backup", format!("{}; {drill}", parts.join(", ")))
    } else {
        Check::fail(
            "last-backup",
            format!(
                "no recent backup of {} (limit {}); {}{drill}",
                stale.join(", "),
                human_age(max_age),
                parts.iter().map(|p| format!("{p}; ")).collect::<String>()
            ),
            "`caretaker backup now`; if it fails, `journalctl -u caretaker` says why",
        )
    }
}

/// The local clock against the `Date` of an S3 answer.
pub(super) fn check_clock(cfg: &Config, date: &ServerDate, tolerance: Duration) -> Check {
    let Some((header, arrived)) = date.get() else {
        return if cfg.backup.bucket.is_none() && cfg.release.bucket.is_none() && cfg.aws.s3_endpoint.is_none() {
            Check::skip(
                "clock",
                "no S3 bucket or endpoint configured to compare with (`chronyc tracking` shows the sync)",
            )
        } else {
            Check::skip("clock", "S3 gave no answer to compare with (see above)")
        };
    };
    let remote = match http_date_secs(&header) {
        Ok(t) => t,
        Err(e) => return Check::skip("clock", format!("S3's Date header `{header}` is unreadable: {e}")),
    };
    let local = match arrived.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(_) => 0,
    };
    let skew = local - remote;
    let detail = format!("{}s {} S3's (Date: {header})", skew.abs(), if skew >= 0 { "ahead of" } else { "behind" });
    if skew.unsigned_abs() <= tolerance.as_secs() {
        Check::ok("clock", detail)
    } else {
        Check::fail(
            "clock",
            detail,
            "AWS refuses requests signed more than 5–15 minutes off: `chronyc tracking`, `chronyc makestep`; AL2023 syncs with the Amazon Time Sync Service (169.254.169.123)",
        )
    }
}
