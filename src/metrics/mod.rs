//! CloudWatch metrics: what caretaker knows about the box, published once per interval so that
//! CloudWatch itself raises the alarm when the numbers stop coming (the dead man's switch: a
//! caretaker that cannot send an email because the box is gone still stops sending `Heartbeat`).
//!
//! The daemon takes a [`Sample`] every `metrics.interval`; [`data`] turns it into CloudWatch data
//! (pure); a [`Queue`] keeps what is not yet published, bounded: while CloudWatch is unreachable the
//! oldest samples are dropped (and counted), never the daemon's memory. [`run`] publishes in its
//! own task with backoff: a failure is logged and counted and never holds up anything else.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::aws::cloudwatch::{CloudWatch, Datum, MAX_DATA_PER_CALL, Unit};
use crate::config::MetricsConfig;
use crate::units::rfc3339;

/// The newest backups of one kind, as far as caretaker knows.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupAges {
    /// `postgres`, `redis`, `base`.
    pub kind: &'static str,
    /// When the newest backup finished, and its stored size.
    pub newest: Option<(SystemTime, u64)>,
    /// When the newest backup that passed its restore drill finished.
    pub newest_verified: Option<SystemTime>,
    /// When the oldest backup finished.
    pub oldest: Option<SystemTime>,
}

/// WAL archiving's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WalNumbers {
    /// How long finished segments have waited for S3 (0 when none waits).
    pub lag_seconds: u64,
    /// Bytes of finished segments not yet in S3.
    pub lag_bytes: u64,
    /// An upper bound of the commits' age that a lost box would lose now: with the WAL tip
    /// streaming, how long the oldest WAL not in S3 has waited; without it, the wait above plus
    /// `archive_timeout` (the unfinished segment).
    pub rpo_seconds: u64,
    /// With the tip streaming: flushed WAL not yet in S3.
    pub tip_lag_bytes: Option<u64>,
}

/// What the box looks like at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: SystemTime,
    /// Each supervised service and whether it is healthy.
    pub services: Vec<(String, bool)>,
    /// Restarts of the supervised services by this daemon since it started.
    pub restarts: u64,
    pub backups: Vec<BackupAges>,
    /// The data volume's free and total bytes (none when it cannot be read).
    pub volume: Option<(u64, u64)>,
    pub wal: Option<WalNumbers>,
}

fn age(at: SystemTime, since: SystemTime) -> f64 {
    at.duration_since(since).unwrap_or_default().as_secs() as f64
}

/// The data of `sample`. Every datum carries `Deployment`; `Heartbeat` is also sent with
/// `InstanceId`, to see which instance beats (alarms watch the deployment's, which survives the
/// instance being replaced). A backup kind with no backup yet sends no age: its alarm treats the
/// missing data as breaching. Without a verified backup, `LastVerifiedBackupAgeSeconds` is the
/// oldest backup's age: nothing has been proven restorable for that long.
pub fn data(sample: &Sample, deployment: &str, instance_id: &str) -> Vec<Datum> {
    let at = sample.at;
    let dep = || vec![("Deployment", deployment.to_string())];
    let with = |k: &'static str, v: &str| {
        let mut d = dep();
        d.push((k, v.to_string()));
        d
    };
    let datum = |name, dimensions, value, unit| Datum { name, dimensions, value, unit, at };
    let mut out = vec![
        datum("Heartbeat", dep(), 1.0, Unit::Count),
        datum("Heartbeat", with("InstanceId", instance_id), 1.0, Unit::Count),
        datum("RestartsTotal", dep(), sample.restarts as f64, Unit::Count),
    ];
    for (service, healthy) in &sample.services {
        out.push(datum("ServiceHealthy", with("Service", service), if *healthy { 1.0 } else { 0.0 }, Unit::Count));
    }
    for b in &sample.backups {
        if let Some((finished, bytes)) = b.newest {
            out.push(datum("LastBackupAgeSeconds", with("Kind", b.kind), age(at, finished), Unit::Seconds));
            out.push(datum("BackupBytes", with("Kind", b.kind), bytes as f64, Unit::Bytes));
        }
        // No backup verified yet: every backup there is unproven, the oldest for this long.
        if let Some(finished) = b.newest_verified.or(b.oldest) {
            out.push(datum("LastVerifiedBackupAgeSeconds", with("Kind", b.kind), age(at, finished), Unit::Seconds));
        }
    }
    if let Some((free, total)) = sample.volume {
        out.push(datum("DataVolumeFreeBytes", dep(), free as f64, Unit::Bytes));
        if total > 0 {
            let percent = (free as f64 * 100.0 / total as f64 * 10.0).round() / 10.0;
            out.push(datum("DataVolumeFreePercent", dep(), percent, Unit::Percent));
        }
    }
    if let Some(w) = sample.wal {
        out.push(datum("ArchiveLagSeconds", dep(), w.lag_seconds as f64, Unit::Seconds));
        out.push(datum("ArchiveLagBytes", dep(), w.lag_bytes as f64, Unit::Bytes));
        out.push(datum("RpoSeconds", dep(), w.rpo_seconds as f64, Unit::Seconds));
        if let Some(b) = w.tip_lag_bytes {
            out.push(datum("WalTipLagBytes", dep(), b as f64, Unit::Bytes));
        }
    }
    out
}

/// Samples not yet published, oldest first, at most `max` of them.
#[derive(Debug)]
pub struct Queue {
    samples: VecDeque<Vec<Datum>>,
    max: usize,
    /// Samples dropped because the queue was full, since the daemon started.
    pub dropped: u64,
    /// When the oldest dropped sample was taken (for the log line).
    pub dropped_last: Option<SystemTime>,
}

impl Queue {
    pub fn new(max: usize) -> Queue {
        Queue { samples: VecDeque::new(), max: max.max(1), dropped: 0, dropped_last: None }
    }

    /// Adds a sample; when full, drops the oldest and returns when it was taken.
    pub fn push(&mut self, data: Vec<Datum>) -> Option<SystemTime> {
        let mut dropped = None;
        while self.samples.len() >= self.max {
            let old = self.samples.pop_front();
            self.dropped += 1;
            dropped = old.and_then(|d| d.first().map(|d| d.at));
            self.dropped_last = dropped;
        }
        self.samples.push_back(data);
        dropped
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The oldest samples, whole, that fit in one call (at least one sample).
    pub fn next_call(&self) -> (usize, Vec<Datum>) {
        let mut out = Vec::new();
        let mut n = 0;
        for s in &self.samples {
            if n > 0 && out.len() + s.len() > MAX_DATA_PER_CALL {
                break;
            }
            out.extend(s.iter().take(MAX_DATA_PER_CALL).cloned());
            n += 1;
        }
        (n, out)
    }

    /// Forgets the `n` oldest samples (published).
    pub fn published(&mut self, n: usize) {
        for _ in 0..n.min(self.samples.len()) {
            self.samples.pop_front();
        }
    }
}

/// The wait after `failures` failed publishes in a row: the interval, doubled each time, at most
/// ten minutes (and never less than the interval).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let cap = Duration::from_secs(600).max(interval);
    interval.saturating_mul(1u32 << failures.min(10)).min(cap)
}

/// What `caretaker status` shows about publishing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsStatus {
    pub namespace: String,
    pub deployment: String,
    pub interval_seconds: u64,
    /// The last successful PutMetricData (RFC 3339).
    pub last_published_at: Option<String>,
    /// Failed publishes since the daemon started, and in a row now.
    pub failures: u64,
    pub failing_since: Option<String>,
    pub last_error: Option<String>,
    /// Samples waiting to be published, and dropped because they waited too long.
    pub queued: usize,
    pub dropped: u64,
}

/// Samples every `cfg.interval` with `sample` and publishes until `cancel`; `status` receives the
/// publisher's state after every turn.
pub async fn run(
    cfg: MetricsConfig,
    deployment: String,
    instance_id: String,
    cloudwatch: CloudWatch,
    mut sample: impl FnMut() -> Sample,
    mut status: impl FnMut(MetricsStatus),
    cancel: CancellationToken,
) {
    let interval = cfg.interval.get().max(Duration::from_secs(1));
    let mut queue = Queue::new(cfg.max_queued);
    let mut st = MetricsStatus {
        namespace: cfg.namespace.clone(),
        deployment: deployment.clone(),
        interval_seconds: interval.as_secs(),
        ..Default::default()
    };
    let mut in_a_row = 0u32;
    let mut next_attempt = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        namespace = %cfg.namespace, deployment = %deployment, interval_s = interval.as_secs(),
        "publishing metrics to CloudWatch"
    );
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(when) = queue.push(data(&sample(), &deployment, &instance_id)) {
            warn!(
                "CloudWatch has not taken metrics for a while: dropped the sample of {} ({} dropped so far; at most {} are kept)",
                rfc3339(when),
                queue.dropped,
                queue.len()
            );
        }
        if tokio::time::Instant::now() >= next_attempt {
            while !queue.is_empty() {
                let (n, call) = queue.next_call();
                let put = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = cloudwatch.put(&cfg.namespace, &call) => r,
                };
                match put {
                    Ok(()) => {
                        queue.published(n);
                        if in_a_row > 0 {
                            info!("CloudWatch takes metrics again after {in_a_row} failed attempt(s)");
                        }
                        in_a_row = 0;
                        st.failing_since = None;
                        st.last_published_at = Some(rfc3339(SystemTime::now()));
                    }
                    Err(e) => {
                        in_a_row += 1;
                        st.failures += 1;
                        st.failing_since.get_or_insert_with(|| rfc3339(SystemTime::now()));
                        let wait = backoff(interval, in_a_row);
                        warn!(
                            "{e}; {} sample(s) kept, next attempt in {}",
                            queue.len(),
                            humantime::format_duration(wait)
                        );
                        st.last_error = Some(e.to_string());
                        next_attempt = tokio::time::Instant::now() + wait;
                        break;
                    }
                }
            }
        }
        st.queued = queue.len();
        st.dropped = queue.dropped;
        status(st.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn sample() -> Sample {
        Sample {
            at: t(1000),
            services: vec![("postgres".into(), true), ("api".into(), false)],
            restarts: 2,
            backups: vec![
                BackupAges {
                    kind: "postgres",
                    newest: Some((t(400), 1234)),
                    newest_verified: Some(t(100)),
                    oldest: Some(t(0)),
                },
                BackupAges { kind: "redis", newest: None, newest_verified: None, oldest: None },
                BackupAges { kind: "base", newest: Some((t(900), 5)), newest_verified: None, oldest: Some(t(300)) },
            ],
            volume: Some((25, 200)),
            wal: Some(WalNumbers { lag_seconds: 0, lag_bytes: 0, rpo_seconds: 60, tip_lag_bytes: Some(4096) }),
        }
    }

    fn value(d: &[Datum], name: &str, dim: Option<(&str, &str)>) -> Option<f64> {
        d.iter()
            .find(|x| {
                x.name == name
                    && match dim {
                        Some((k, v)) => x.dimensions.iter().any(|(a, b)| *a == k && b == v),
                        None => x.dimensions.len() == 1,
                    }
            })
            .map(|x| x.value)
    }

    #[test]
    fn a_sample_becomes_the_metrics_the_alarms_watch() {
        let d = data(&sample(), "zmanim/prod", "i-0abc");
        assert!(d.iter().all(|x| x.dimensions[0] == ("Deployment", "zmanim/prod".to_string()) && x.at == t(1000)));
        assert_eq!(value(&d, "Heartbeat", None), Some(1.0));
        assert_eq!(value(&d, "Heartbeat", Some(("InstanceId", "i-0abc"))), Some(1.0));
        assert_eq!(value(&d, "ServiceHealthy", Some(("Service", "postgres"))), Some(1.0));
        assert_eq!(value(&d, "ServiceHealthy", Some(("Service", "api"))), Some(0.0));
        assert_eq!(value(&d, "RestartsTotal", None), Some(2.0));
        assert_eq!(value(&d, "LastBackupAgeSeconds", Some(("Kind", "postgres"))), Some(600.0));
        assert_eq!(value(&d, "LastVerifiedBackupAgeSeconds", Some(("Kind", "postgres"))), Some(900.0));
        assert_eq!(value(&d, "BackupBytes", Some(("Kind", "postgres"))), Some(1234.0));
        // No redis backup yet: no age at all (the alarm treats missing data as breaching), never 0.
        assert_eq!(value(&d, "LastBackupAgeSeconds", Some(("Kind", "redis"))), None);
        assert_eq!(value(&d, "LastVerifiedBackupAgeSeconds", Some(("Kind", "redis"))), None);
        // Never verified: unproven since the oldest backup.
        assert_eq!(value(&d, "LastVerifiedBackupAgeSeconds", Some(("Kind", "base"))), Some(700.0));
        assert_eq!(value(&d, "DataVolumeFreeBytes", None), Some(25.0));
        assert_eq!(value(&d, "DataVolumeFreePercent", None), Some(12.5));
        assert_eq!(value(&d, "RpoSeconds", None), Some(60.0));
        assert_eq!(value(&d, "WalTipLagBytes", None), Some(4096.0));
    }

    #[test]
    fn the_queue_is_bounded_and_drops_the_oldest() {
        let mut q = Queue::new(3);
        for i in 0..5 {
            let mut s = sample();
            s.at = t(i * 60);
            let dropped = q.push(data(&s, "d", "i"));
            assert_eq!(dropped, if i >= 3 { Some(t((i - 3) * 60)) } else { None });
        }
        assert_eq!((q.len(), q.dropped), (3, 2));
        let (n, call) = q.next_call();
        assert_eq!(n, 3);
        assert_eq!(call.first().unwrap().at, t(120));
        q.published(2);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_call_never_holds_more_than_cloudwatch_takes() {
        let mut q = Queue::new(1000);
        for _ in 0..200 {
            q.push(data(&sample(), "d", "i"));
        }
        let per = data(&sample(), "d", "i").len();
        let (n, call) = q.next_call();
        assert!(call.len() <= MAX_DATA_PER_CALL);
        assert_eq!(n, MAX_DATA_PER_CALL / per);
        assert_eq!(call.len(), n * per);
    }

    #[test]
    fn backoff_doubles_up_to_ten_minutes() {
        let m = Duration::from_secs(60);
        assert_eq!(backoff(m, 1), Duration::from_secs(120));
        assert_eq!(backoff(m, 3), Duration::from_secs(480));
        assert_eq!(backoff(m, 4), Duration::from_secs(600));
        assert_eq!(backoff(m, 40), Duration::from_secs(600));
        assert_eq!(backoff(Duration::from_secs(900), 2), Duration::from_secs(900));
    }
}
