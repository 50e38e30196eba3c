//! `caretaker doctor`: checks everything the box depends on and prints one line per check — ✓ or
//! ✗ and, for a ✗, what to do. Things that are not configured (no backup bucket, no alert sender)
//! are skipped, not failed. Every network check has a short deadline, so a box with a broken
//! network still gets its answer in seconds.
//!
//! The checks only read: no file, unit or AWS resource is changed, and secret values never leave
//! memory (the SSM check reports parameter names only).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use serde::Serialize;

use crate::aws::imds::ImdsClient;
use crate::aws::sdk;
use crate::aws::ssm::{SsmClient, SsmError};
use crate::boot::volume::{MARKER, Marker};
use crate::config::{self, Config, Sources};
use crate::systemd::manager::{Systemd, SystemdError};

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

    let region = match (&cfg.aws.region, &imds_region) {
        (Some(r), Some(i)) if r != i => {
            checks.push(Check::ok("region", format!("{r} (aws.region; the instance itself is in {i})")));
            Some(r.clone())
        }
        (Some(r), _) => {
            checks.push(Check::ok("region", format!("{r} (aws.region)")));
            Some(r.clone())
        }
        (None, Some(i)) => {
            checks.push(Check::ok("region", format!("{i} (from IMDS)")));
            Some(i.clone())
        }
        (None, None) => match crate::boot::firstboot::instance_var("REGION") {
            Some(r) => {
                checks.push(Check::ok("region", format!("{r} (from /run/caretaker/instance.env)")));
                Some(r)
            }
            None => {
                checks.push(Check::fail(
                    "region",
                    "unknown: aws.region is not set and IMDS did not say",
                    "set aws.region in /etc/caretaker/caretaker.toml, or fix IMDS (above)",
                ));
                None
            }
        },
    };

    match &region {
        Some(region) => {
            let sdk = sdk::sdk_config(&cfg.aws, region).await;
            let date = DateCell::default();
            let (ssm, ses, buckets) = tokio::join!(
                check_ssm(cfg, &sdk, opts.aws_deadline),
                check_ses(cfg, &sdk, opts.aws_deadline),
                check_buckets(cfg, &sdk, opts, &date),
            );
            checks.push(ssm);
            checks.push(ses);
            checks.extend(buckets);
            checks.push(check_clock(cfg, &date, opts.clock_tolerance));
        }
        None => {
            for name in ["ssm", "ses", "backups", "releases", "clock"] {
                checks.push(Check::skip(name, "no AWS region (see above)"));
            }
        }
    }

    let mount_point = cfg.volume.mount_point.clone();
    let min_free = opts.min_free_percent;
    let instance = instance_id.clone();
    let volume = tokio::task::spawn_blocking(move || check_volume(&mount_point, min_free, instance.as_deref()))
        .await
        .unwrap_or_else(|e| vec![Check::fail("volume", format!("the check did not finish: {e}"), "run it again")]);
    checks.extend(volume);

    let bus = opts.bus_address.clone().or_else(|| cfg.daemon.bus_address.clone());
    checks.extend(check_units(cfg, bus.as_deref()).await);

    Report::new(checks, true)
}

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
async fn check_ssm(cfg: &Config, sdk: &SdkConfig, deadline: Duration) -> Check {
    let path = &cfg.secrets.ssm_path;
    let client = SsmClient::new(sdk::ssm_client(sdk, &cfg.aws))
        .with_deadline(deadline)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(1));
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
async fn check_ses(cfg: &Config, sdk: &SdkConfig, deadline: Duration) -> Check {
    let Some(sender) = &cfg.notify.sender else {
        return Check::skip("ses", "notify.sender is not set (no alert email)");
    };
    let domain = sender.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default();
    let client = sdk::ses_client(sdk, &cfg.aws);
    let call = client.get_identity_verification_attributes().identities(sender).identities(&domain).send();
    let out = match tokio::time::timeout(deadline, call).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let message = match e.as_service_error() {
                Some(se) => {
                    use aws_sdk_ses::error::ProvideErrorMetadata;
                    format!("{}: {}", se.code().unwrap_or("error"), se.message().unwrap_or(""))
                }
                None => crate::http::error_chain(&e),
            };
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
    let status = |identity: &str| {
        out.verification_attributes().get(identity).map(|a| a.verification_status().as_str().to_string())
    };
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

/// The `Date` header of the last S3 answer, whatever its status (an AccessDenied carries one too),
/// and the local time it arrived at (the other checks run meanwhile).
#[derive(Debug, Clone, Default)]
struct DateCell(Arc<Mutex<Option<(String, SystemTime)>>>);

impl DateCell {
    fn get(&self) -> Option<(String, SystemTime)> {
        self.0.lock().ok().and_then(|d| d.clone())
    }
}

impl aws_sdk_s3::config::Intercept for DateCell {
    fn name(&self) -> &'static str {
        "caretaker-doctor-date"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if let Some(date) = context.response().headers().get("date")
            && let Ok(mut cell) = self.0.lock()
        {
            *cell = Some((date.to_string(), SystemTime::now()));
        }
        Ok(())
    }
}

fn s3_message<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
{
    match e.as_service_error() {
        Some(se) => format!("{}: {}", se.code().unwrap_or("error"), se.message().unwrap_or("")),
        None => crate::http::error_chain(e),
    }
}

/// The backup bucket answers under our prefix, how old its newest backup of each kind is, and the
/// releases bucket answers under the application's prefix. Without a backup bucket but with
/// `aws.s3-endpoint`, one cheap call still fetches S3's clock for [`check_clock`].
async fn check_buckets(cfg: &Config, sdk: &SdkConfig, opts: &Options, date: &DateCell) -> Vec<Check> {
    let client = sdk::s3_client(sdk, &cfg.aws);
    let deadline = opts.aws_deadline;
    let mut checks = Vec::new();
    match &cfg.backup.bucket {
        None => {
            checks.push(Check::skip("backups", "backup.bucket is not set (no backups)"));
            if cfg.aws.s3_endpoint.is_some() {
                let call = client.list_buckets().customize().interceptor(date.clone()).send();
                let _ = tokio::time::timeout(deadline, call).await;
            }
        }
        Some(bucket) => {
            let prefix = format!("{}/", cfg.backup.prefix);
            let call = client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(&prefix)
                .max_keys(1)
                .customize()
                .interceptor(date.clone())
                .send();
            let reachable = match tokio::time::timeout(deadline, call).await {
                Ok(Ok(_)) => {
                    checks.push(Check::ok("backups", format!("s3://{bucket}/{prefix} can be listed")));
                    true
                }
                Ok(Err(e)) => {
                    checks.push(Check::fail(
                        "backups",
                        format!("s3://{bucket}/{prefix} cannot be listed: {}", s3_message(&e)),
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
                checks.push(last_backups(&client, bucket, &cfg.backup.prefix, opts.max_backup_age, deadline).await);
            } else {
                checks.push(Check::skip("last-backup", "the bucket cannot be listed"));
            }
        }
    }
    match &cfg.release.bucket {
        None => checks.push(Check::skip("releases", "release.bucket is not set (no updates)")),
        Some(bucket) => checks.push(
            check_releases(&client, bucket, &cfg.release.app, &cfg.services.api.install_dir, deadline, date).await,
        ),
    }
    checks
}

/// The releases bucket answers under the application's prefix; says which release is the newest
/// there (`APP/LATEST`) and which one this box runs (the `current` symlink).
async fn check_releases(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    app: &str,
    install_dir: &Path,
    deadline: Duration,
    date: &DateCell,
) -> Check {
    let prefix = format!("{app}/");
    let call = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&prefix)
        .max_keys(1)
        .customize()
        .interceptor(date.clone())
        .send();
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Check::fail(
                "releases",
                format!("s3://{bucket}/{prefix} cannot be listed: {}", s3_message(&e)),
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
    let s3 = crate::aws::s3::S3::new(client.clone());
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

/// `20261122T030000Z-a1b2c3` → its time.
fn id_time(id: &str) -> Option<SystemTime> {
    let t = id.split('-').next()?;
    if t.len() != 16 || !t.ends_with('Z') || t.as_bytes().get(8) != Some(&b'T') {
        return None;
    }
    let rfc = format!("{}-{}-{}T{}:{}:{}Z", &t[0..4], &t[4..6], &t[6..8], &t[9..11], &t[11..13], &t[13..15]);
    humantime::parse_rfc3339(&rfc).ok()
}

/// The newest backup (folder with a manifest) of each kind and the newest restore drill.
async fn last_backups(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    max_age: Duration,
    deadline: Duration,
) -> Check {
    let s3 = crate::aws::s3::S3::new(client.clone());
    let now = SystemTime::now();
    let mut parts = Vec::new();
    let mut stale = Vec::new();
    let mut drills: Option<SystemTime> = None;
    for kind in ["postgres", "redis"] {
        let keys = match tokio::time::timeout(deadline, s3.list_keys(bucket, &format!("{prefix}/{kind}/"))).await {
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
        match time_of(crate::backup::run::MANIFEST) {
            Some(t) => {
                let age = now.duration_since(t).unwrap_or_default();
                parts.push(format!("{kind} {} ago", human_age(age)));
                if age > max_age {
                    stale.push(format!("{kind} ({} old)", human_age(age)));
                }
            }
            None => stale.push(format!("{kind} (none yet)")),
        }
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
            format!("no recent backup of {} (limit {}); {drill}", stale.join(", "), human_age(max_age)),
            "`caretaker backup now`; if it fails, `journalctl -u caretaker` says why",
        )
    }
}

/// `1 env file`, `2 env files`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("{n} {noun}") } else { format!("{n} {noun}s") }
}

fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The local clock against the `Date` of an S3 answer.
fn check_clock(cfg: &Config, date: &DateCell, tolerance: Duration) -> Check {
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
    let remote =
        match aws_sdk_s3::primitives::DateTime::from_str(&header, aws_sdk_s3::primitives::DateTimeFormat::HttpDate) {
            Ok(t) => t.secs(),
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

/// One entry of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    mount_point: PathBuf,
    fstype: String,
    source: String,
}

/// Octal escapes (`\040` for a space) in mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape(f.get(sep + 2)?),
            })
        })
        .collect()
}

/// The data volume is mounted, has room, and its marker belongs to it (and to this instance).
fn check_volume(mount_point: &Path, min_free_percent: u64, instance_id: Option<&str>) -> Vec<Check> {
    let mp = mount_point.display();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t)).unwrap_or_default();
    // The last mount at a path is the one that is seen.
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == mount_point) else {
        return vec![
            Check::fail(
                "volume",
                format!("{mp} is not mounted: the data volume is missing"),
                "PostgreSQL, Redis and the API must not run without it. Attach the EBS volume (volume.device), then `systemctl restart caretaker-firstboot` mounts it; `journalctl -u caretaker-firstboot -b` says what went wrong at boot",
            ),
            Check::skip("marker", format!("{mp} is not mounted")),
        ];
    };
    let mut checks = Vec::new();
    match nix::sys::statvfs::statvfs(mount_point) {
        Ok(s) => {
            // u64 on the 64-bit Linux targets (x86_64 for the lab, aarch64 for Graviton).
            let unit = s.fragment_size();
            let total = s.blocks() * unit;
            let free = s.blocks_available() * unit;
            let percent = (free * 100).checked_div(total).unwrap_or(0);
            let detail = format!(
                "{} ({}) at {mp}: {} free of {} ({percent}%)",
                m.source,
                m.fstype,
                crate::control::client::human_bytes(free),
                crate::control::client::human_bytes(total)
            );
            if percent < min_free_percent {
                checks.push(Check::fail(
                    "volume",
                    detail,
                    format!(
                        "less than {min_free_percent}% free: grow the EBS volume (`aws ec2 modify-volume --size …`), then `caretaker firstboot` grows the filesystem; or free space (old WAL, logs)"
                    ),
                ));
            } else {
                checks.push(Check::ok("volume", detail));
            }
        }
        Err(e) => checks.push(Check::fail("volume", format!("statvfs {mp}: {e}"), "check the mount (`findmnt {mp}`)")),
    }

    let marker_path = mount_point.join(MARKER);
    let marker: Marker = match std::fs::read(&marker_path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                checks.push(Check::fail(
                    "marker",
                    format!("{} is unreadable: {e}", marker_path.display()),
                    "`caretaker firstboot` writes a new one",
                ));
                return checks;
            }
        },
        Err(e) => {
            checks.push(Check::fail(
                "marker",
                format!("{}: {e}", marker_path.display()),
                "this volume was not prepared by caretaker on this boot: `systemctl restart caretaker-firstboot`",
            ));
            return checks;
        }
    };
    let uuid = crate::boot::volume::blkid_probe(Path::new(&m.source)).ok().and_then(|b| b.get("UUID").cloned());
    let volume = marker.volume_id.as_deref().unwrap_or("(no volume id)");
    match uuid {
        Some(u) if u != marker.filesystem_uuid => checks.push(Check::fail(
            "marker",
            format!("{} names filesystem {}, but {} is {u}", marker_path.display(), marker.filesystem_uuid, m.source),
            "a copied marker or a cloned volume: if this volume really holds the data, remove the marker and `systemctl restart caretaker-firstboot`",
        )),
        _ => match instance_id {
            Some(i) if !marker.instances.iter().any(|x| x == i) => checks.push(Check::fail(
                "marker",
                format!("volume {volume}: this instance {i} is not in the marker (it lists {})", marker.instances.join(", ")),
                "caretaker-firstboot did not run on this instance: `systemctl restart caretaker-firstboot`",
            )),
            _ => checks.push(Check::ok(
                "marker",
                format!(
                    "volume {volume}, filesystem {}, first formatted {}, {} instance(s)",
                    marker.filesystem_uuid,
                    marker.first_formatted_at,
                    marker.instances.len()
                ),
            )),
        },
    }
    checks
}

/// caretaker's own units and the supervised services are active.
async fn check_units(cfg: &Config, bus: Option<&str>) -> Vec<Check> {
    let mut units: Vec<String> = vec!["caretaker-firstboot.service".into(), "caretaker.service".into()];
    for u in [&cfg.services.postgres.unit, &cfg.services.redis.unit, &cfg.services.api.unit] {
        if !units.iter().any(|x| x == u.as_str()) {
            units.push(u.as_str().to_string());
        }
    }
    let connect = async {
        let conn =
            crate::control::connect(bus).await.map_err(|e| e.to_string())?.build().await.map_err(|e| e.to_string())?;
        Systemd::new(&conn).await.map_err(|e| e.to_string())
    };
    let systemd = match connect.await {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "units",
                format!("cannot ask systemd over D-Bus{}: {e}", bus.map(|b| format!(" at {b}")).unwrap_or_default()),
                "run doctor as root on the box (or pass --bus-address)",
            )];
        }
    };
    let mut checks = Vec::new();
    for unit in units {
        checks.push(match systemd.state(&unit).await {
            Ok(s) if s.is_active() => Check::ok(&unit, format!("{} ({})", s.active_state, s.sub_state)),
            Ok(s) => {
                let result = if s.result.is_empty() || s.result == "success" {
                    String::new()
                } else {
                    format!(", Result={}", s.result)
                };
                let fix = if unit == "caretaker-firstboot.service" {
                    "`journalctl -u caretaker-firstboot -b` says why; fix it, then `systemctl restart caretaker-firstboot`".to_string()
                } else {
                    format!("`systemctl status {unit}`, `journalctl -u {unit} -n 50`; fix the cause, then `systemctl start {unit}`")
                };
                Check::fail(&unit, format!("{} ({}{result})", s.active_state, s.sub_state), fix)
            }
            Err(SystemdError::NotLoaded { load_state, .. }) => Check::fail(
                &unit,
                format!("not installed (LoadState={load_state})"),
                "install its package, or fix the unit name in the services section of the configuration",
            ),
            Err(e) => Check::fail(&unit, e.to_string(), format!("`systemctl status {unit}`")),
        });
    }
    checks
}

#[cfg(test)]
mod tests {
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
    fn mountinfo_is_parsed_with_escapes() {
        let text = "36 35 98:0 / /data rw,noatime shared:1 - xfs /dev/nvme1n1 rw,attr2\n\
                    37 35 98:1 / /mnt/with\\040space rw - ext4 /dev/loop3 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], Mount { mount_point: "/data".into(), fstype: "xfs".into(), source: "/dev/nvme1n1".into() });
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/with space"));
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
