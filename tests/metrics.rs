//! CloudWatch metrics against moto's CloudWatch: the data arrive once per interval with the right
//! values (read back with ListMetrics and GetMetricStatistics); with CloudWatch unreachable the
//! publisher keeps a bounded queue (the oldest samples dropped and counted) and catches up when it
//! is back; a failed backup (real PostgreSQL, real pg_dump, moto's S3) leaves the backup's age
//! growing instead of resetting it; the alarm template's alarms watch exactly the metrics and
//! dimensions the daemon publishes, and `caretaker doctor` reads their states.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::types::Dimension;
use caretaker::aws::cloudwatch::CloudWatch;
use caretaker::config::{AwsConfig, MetricsConfig, Seconds};
use caretaker::metrics::{self, BackupAges, MetricsStatus, Sample, WalNumbers};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::proxy::{self, Proxy};

const NS: &str = "Caretaker";
const DEPLOYMENT: &str = "zmanim/test";

async fn client(endpoint: &str) -> aws_sdk_cloudwatch::Client {
    let aws = AwsConfig { cloudwatch_endpoint: Some(endpoint.into()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("eu-west-1", creds).await;
    caretaker::aws::sdk::cloudwatch_client(&sdk, &aws)
}

fn dims(pairs: &[(&str, &str)]) -> Vec<Dimension> {
    pairs.iter().map(|(k, v)| Dimension::builder().name(*k).value(*v).build()).collect()
}

/// `stat` of `name` with exactly `pairs` over the last ten minutes, one value per minute.
async fn statistic(cw: &aws_sdk_cloudwatch::Client, name: &str, pairs: &[(&str, &str)], stat: &str) -> Vec<f64> {
    use aws_sdk_cloudwatch::primitives::DateTime;
    use aws_sdk_cloudwatch::types::Statistic;
    let now = SystemTime::now();
    let out = cw
        .get_metric_statistics()
        .namespace(NS)
        .metric_name(name)
        .set_dimensions(Some(dims(pairs)))
        .start_time(DateTime::from(now - Duration::from_secs(600)))
        .end_time(DateTime::from(now + Duration::from_secs(60)))
        .period(60)
        .statistics(Statistic::from(stat))
        .send()
        .await
        .expect("GetMetricStatistics");
    out.datapoints()
        .iter()
        .filter_map(|d| match stat {
            "SampleCount" => d.sample_count(),
            "Maximum" => d.maximum(),
            "Minimum" => d.minimum(),
            _ => d.sum(),
        })
        .collect()
}

/// Every (metric name, dimensions) moto holds in the namespace.
async fn published(cw: &aws_sdk_cloudwatch::Client) -> Vec<(String, Vec<(String, String)>)> {
    let out = cw.list_metrics().namespace(NS).send().await.expect("ListMetrics");
    out.metrics()
        .iter()
        .map(|m| {
            let mut d: Vec<(String, String)> = m
                .dimensions()
                .iter()
                .map(|d| (d.name().unwrap_or_default().to_string(), d.value().unwrap_or_default().to_string()))
                .collect();
            d.sort();
            (m.metric_name().unwrap_or_default().to_string(), d)
        })
        .collect()
}

fn box_sample(backup_finished: SystemTime) -> Sample {
    Sample {
        at: SystemTime::now(),
        services: vec![("postgres".into(), true), ("redis".into(), true), ("api".into(), false)],
        restarts: 3,
        backups: ["postgres", "redis", "base"]
            .into_iter()
            .map(|kind| BackupAges {
                kind,
                newest: Some((backup_finished, 4096)),
                newest_verified: Some(backup_finished),
                oldest: Some(backup_finished),
            })
            .collect(),
        volume: Some((30 << 30, 100 << 30)),
        wal: Some(WalNumbers { lag_seconds: 0, lag_bytes: 0, rpo_seconds: 60, tip_lag_bytes: None }),
    }
}

struct Publisher {
    status: Arc<Mutex<Option<MetricsStatus>>>,
    cancel: tokio_util::sync::CancellationToken,
}

impl Publisher {
    fn start(cw: aws_sdk_cloudwatch::Client, max_queued: usize, backup_finished: SystemTime) -> Publisher {
        let cfg = MetricsConfig {
            enabled: true,
            interval: Seconds::from_secs(1),
            namespace: NS.into(),
            deployment: Some(DEPLOYMENT.into()),
            max_queued,
        };
        let status: Arc<Mutex<Option<MetricsStatus>>> = Arc::default();
        let cancel = tokio_util::sync::CancellationToken::new();
        let s = status.clone();
        tokio::spawn(metrics::run(
            cfg,
            DEPLOYMENT.into(),
            "i-0123456789abcdef0".into(),
            CloudWatch::new(cw),
            move || box_sample(backup_finished),
            move |m| *s.lock().unwrap() = Some(m),
            cancel.clone(),
        ));
        Publisher { status, cancel }
    }
    fn status(&self) -> MetricsStatus {
        self.status.lock().unwrap().clone().unwrap_or_default()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_arrive_each_interval_and_a_cloudwatch_outage_keeps_memory_bounded_then_catches_up() {
    let moto = Moto::start().unwrap();
    let gate = Proxy::start(moto.port());
    let reader = client(&moto.endpoint()).await;
    let backup_finished = SystemTime::now() - Duration::from_secs(7200);
    let p = Publisher::start(client(&format!("http://127.0.0.1:{}", gate.port)).await, 5, backup_finished);
    let beat = [("Deployment", DEPLOYMENT), ("InstanceId", "i-0123456789abcdef0")];

    // Once per interval, with the sample's values.
    let t0 = std::time::Instant::now();
    while statistic(&reader, "Heartbeat", &beat, "SampleCount").await.iter().sum::<f64>() < 3.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no three heartbeats in CloudWatch: {:?}", p.status());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let age =
        statistic(&reader, "LastBackupAgeSeconds", &[("Deployment", DEPLOYMENT), ("Kind", "postgres")], "Maximum")
            .await;
    assert!(age.iter().all(|a| (7200.0..7300.0).contains(a)) && !age.is_empty(), "{age:?}");
    for (svc, want) in [("postgres", 1.0), ("api", 0.0)] {
        let h = statistic(&reader, "ServiceHealthy", &[("Deployment", DEPLOYMENT), ("Service", svc)], "Maximum").await;
        assert!(!h.is_empty() && h.iter().all(|v| *v == want), "{svc}: {h:?}");
    }
    let free = statistic(&reader, "DataVolumeFreePercent", &[("Deployment", DEPLOYMENT)], "Minimum").await;
    assert!(free.iter().all(|f| *f == 30.0) && !free.is_empty(), "{free:?}");
    assert!(p.status().last_published_at.is_some() && p.status().failures == 0, "{:?}", p.status());

    // CloudWatch away: failures counted, the queue never above its bound, the oldest dropped.
    gate.set(proxy::DOWN);
    let mut max_queued = 0;
    let t0 = std::time::Instant::now();
    while !(p.status().failures >= 2 && p.status().dropped >= 2) {
        assert!(t0.elapsed() < Duration::from_secs(40), "no failures/drops seen: {:?}", p.status());
        max_queued = max_queued.max(p.status().queued);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = p.status();
    assert!(max_queued <= 5 && during.queued <= 5, "{during:?}");
    assert!(during.failing_since.is_some() && during.last_error.is_some(), "{during:?}");
    let before = statistic(&reader, "Heartbeat", &beat, "SampleCount").await.iter().sum::<f64>();

    // Back: what was kept is published (with its own timestamps) and the failure clears.
    gate.set(proxy::UP);
    let t0 = std::time::Instant::now();
    while !(p.status().failing_since.is_none() && p.status().queued <= 1) {
        assert!(t0.elapsed() < Duration::from_secs(60), "publishing did not resume: {:?}", p.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = statistic(&reader, "Heartbeat", &beat, "SampleCount").await.iter().sum::<f64>();
    assert!(after >= before + 4.0, "the kept samples were not published: {before} → {after}");
    drop(gate);
}

/// The CloudFormation template's alarms, each as (name suffix, metric, dimension names, treat missing data).
fn template_alarms() -> Vec<(String, String, Vec<String>, serde_json::Value, String)> {
    let path = caretaker_testkit::repo_root().join("packaging/cloudwatch/alarms.json");
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the template is JSON");
    t["Resources"]
        .as_object()
        .unwrap()
        .values()
        .filter(|r| r["Type"] == "AWS::CloudWatch::Alarm")
        .map(|r| {
            let p = &r["Properties"];
            let name = p["AlarmName"]["Fn::Sub"].as_str().unwrap().replace("caretaker-${Deployment}-", "");
            let dims: Vec<String> =
                p["Dimensions"].as_array().unwrap().iter().map(|d| d["Name"].as_str().unwrap().into()).collect();
            (
                name,
                p["MetricName"].as_str().unwrap().to_string(),
                dims,
                p.clone(),
                p["TreatMissingData"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alarm_watches_a_metric_the_daemon_publishes_and_doctor_reads_their_states() {
    let moto = Moto::start().unwrap();
    let cw = client(&moto.endpoint()).await;
    let p = Publisher::start(cw.clone(), 5, SystemTime::now() - Duration::from_secs(60));
    let t0 = std::time::Instant::now();
    while p.status().last_published_at.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing published: {:?}", p.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(p);
    let metrics = published(&cw).await;

    let alarms = template_alarms();
    assert!(alarms.len() >= 10, "{alarms:?}");
    let heartbeat = alarms.iter().find(|a| a.0 == "heartbeat").expect("a heartbeat alarm");
    assert_eq!(heartbeat.4, "breaching", "the dead man's switch fires when the data stop");
    for (name, metric, dims, props, _) in &alarms {
        // The alarm's metric with exactly its dimensions is one the daemon publishes: an alarm on
        // a series nobody writes never fires (or, breaching, never clears).
        let values: Vec<(String, String)> = props["Dimensions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let v = match &d["Value"] {
                    serde_json::Value::String(s) => s.clone(),
                    _ => DEPLOYMENT.to_string(), // {"Ref": "Deployment"}
                };
                (d["Name"].as_str().unwrap().to_string(), v)
            })
            .collect();
        let mut want = values.clone();
        want.sort();
        assert!(
            metrics.iter().any(|(m, d)| m == metric && *d == want),
            "alarm {name}: {metric} with {dims:?} = {values:?} is not published (published: {metrics:?})"
        );
        // And CloudWatch takes the definition as it stands (PutMetricAlarm with its properties).
        let mut put = cw
            .put_metric_alarm()
            .alarm_name(format!("caretaker-{DEPLOYMENT}-{name}"))
            .namespace(NS)
            .metric_name(metric)
            .set_dimensions(Some(dims_of(&values)))
            .statistic(aws_sdk_cloudwatch::types::Statistic::from(props["Statistic"].as_str().unwrap()))
            .period(props["Period"].as_i64().unwrap() as i32)
            .evaluation_periods(props["EvaluationPeriods"].as_i64().unwrap() as i32)
            .datapoints_to_alarm(props["DatapointsToAlarm"].as_i64().unwrap() as i32)
            .threshold(props["Threshold"].as_f64().unwrap())
            .comparison_operator(aws_sdk_cloudwatch::types::ComparisonOperator::from(
                props["ComparisonOperator"].as_str().unwrap(),
            ))
            .treat_missing_data(props["TreatMissingData"].as_str().unwrap());
        if name == "heartbeat" {
            put = put.alarm_description("test");
        }
        put.send().await.unwrap_or_else(|e| panic!("PutMetricAlarm {name}: {e:?}"));
    }

    // doctor: all OK → ✓; one in ALARM → ✗ naming it.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("caretaker.toml");
    std::fs::write(
        &conf,
        format!(
            "[aws]\nregion = \"eu-west-1\"\nimds-endpoint = \"http://127.0.0.1:9\"\nimds-deadline = \"1s\"\ncloudwatch-endpoint = \"{}\"\n[metrics]\nenabled = true\ndeployment = \"{DEPLOYMENT}\"\n",
            moto.endpoint()
        ),
    )
    .unwrap();
    let doctor = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_caretaker"))
            .args(["--config", conf.to_str().unwrap(), "doctor", "--json"])
            .envs([("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        report["checks"].as_array().unwrap().iter().find(|c| c["check"] == "alarms").cloned().expect("an alarms check")
    };
    for (name, ..) in &alarms {
        set_state(&cw, name, "OK").await;
    }
    let ok = doctor();
    assert_eq!(ok["status"], "ok", "{ok}");
    set_state(&cw, "heartbeat", "ALARM").await;
    let bad = doctor();
    assert_eq!(bad["status"], "fail", "{bad}");
    assert!(bad["detail"].as_str().unwrap().contains(&format!("caretaker-{DEPLOYMENT}-heartbeat is ALARM")), "{bad}");
}

fn dims_of(values: &[(String, String)]) -> Vec<Dimension> {
    values.iter().map(|(k, v)| Dimension::builder().name(k).value(v).build()).collect()
}

async fn set_state(cw: &aws_sdk_cloudwatch::Client, name: &str, state: &str) {
    cw.set_alarm_state()
        .alarm_name(format!("caretaker-{DEPLOYMENT}-{name}"))
        .state_value(aws_sdk_cloudwatch::types::StateValue::from(state))
        .state_reason("set by the test")
        .send()
        .await
        .expect("SetAlarmState");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_leaves_the_backup_age_growing_and_a_good_one_resets_it() {
    use caretaker::backup::run::{self, Kind};
    let moto = Moto::start().unwrap();
    let aws = AwsConfig { s3_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let s3client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    s3client.create_bucket().bucket("backups").send().await.unwrap();
    let s3 = caretaker::aws::s3::S3::new(s3client);
    let env = tempfile::tempdir().unwrap();
    std::fs::write(env.path().join("caretaker.env"), "BACKUP_PASSPHRASE=\"correct horse battery staple\"\n").unwrap();
    let mut pg = caretaker_testkit::pg::Cluster::init(15);
    pg.start();
    pg.sql("CREATE DATABASE app");
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    cfg.backup.database = "app".into();
    cfg.secrets.env_dir = env.path().to_path_buf();
    cfg.services.postgres.socket_dir = pg.socket_dir.clone();
    cfg.services.postgres.port = pg.port;
    cfg.services.postgres.data_dir = pg.data.clone();
    cfg.services.postgres.bin_dir = Some(caretaker_testkit::pg::bin_dir(15));

    let age_now = |newest: &[run::Newest]| {
        let n = newest.iter().find(|n| n.kind == Kind::Postgres).unwrap();
        let sample = Sample {
            at: SystemTime::now(),
            services: vec![],
            restarts: 0,
            backups: vec![BackupAges {
                kind: "postgres",
                newest: n.newest,
                newest_verified: n.newest_verified,
                oldest: n.oldest,
            }],
            volume: None,
            wal: None,
        };
        let data = metrics::data(&sample, DEPLOYMENT, "i-test");
        let value = |name: &str| {
            data.iter()
                .find(|d| d.name == name && d.dimensions.iter().any(|(k, v)| *k == "Kind" && v == "postgres"))
                .map(|d| d.value)
        };
        (value("LastBackupAgeSeconds"), value("LastVerifiedBackupAgeSeconds"))
    };
    // No backup yet: no age at all (the alarm's missing data breaches).
    assert_eq!(age_now(&run::newest(&cfg, &s3).await.unwrap()), (None, None));

    run::backup(&cfg, &s3, Kind::Postgres, "i-test", |_| {}).await.expect("a backup");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut broken = cfg.clone();
    broken.backup.database = "no_such_database".into();
    assert!(run::backup(&broken, &s3, Kind::Postgres, "i-test", |_| {}).await.is_err(), "the producer failed");
    let (age, unproven) = age_now(&run::newest(&cfg, &s3).await.unwrap());
    let age = age.expect("the good backup's age");
    assert!(age >= 3.0, "the failed backup reset the age to {age}");
    // Never drilled: unproven since the oldest (the only) backup.
    assert_eq!(unproven.map(|u| u >= 3.0), Some(true), "{unproven:?}");

    run::backup(&cfg, &s3, Kind::Postgres, "i-test", |_| {}).await.expect("a backup");
    let (age, _) = age_now(&run::newest(&cfg, &s3).await.unwrap());
    assert!(age.unwrap() < 3.0, "a good backup resets the age: {age:?}");
}

/// `cfn-lint` (AWS's resource schemas) on `template`: its exit status and output.
fn cfn_lint(template: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(caretaker_testkit::repo_root().join(".venv/bin/cfn-lint"))
        .arg(template)
        .output()
        .expect("cfn-lint is installed by dev/setup");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_alarm_template_is_valid_cloudformation_and_deploys() {
    let template = caretaker_testkit::repo_root().join("packaging/cloudwatch/alarms.json");
    let (ok, out) = cfn_lint(&template);
    assert!(ok, "cfn-lint packaging/cloudwatch/alarms.json:\n{out}");
    // The linter catches what it is here for: a property CloudWatch does not know.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    let text = std::fs::read_to_string(&template).unwrap();
    std::fs::write(
        &broken,
        text.replacen("\"TreatMissingData\": \"breaching\"", "\"TreatMissingData\": \"sometimes\"", 1),
    )
    .unwrap();
    assert!(!cfn_lint(&broken).0, "cfn-lint accepted TreatMissingData = sometimes");

    // The one deploy command of the README, against moto. (moto's CloudFormation creates the
    // topic and its subscription and skips AWS::CloudWatch::Alarm, which it does not implement:
    // the alarms themselves go through PutMetricAlarm in the test above.)
    let moto = Moto::start().unwrap();
    let aws = |args: &[&str]| {
        std::process::Command::new("aws")
            .args(["--endpoint-url", &moto.endpoint(), "--region", "eu-west-1"])
            .args(args)
            .envs([("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")])
            .output()
            .expect("the aws CLI")
    };
    let deploy = aws(&[
        "cloudformation",
        "deploy",
        "--template-file",
        template.to_str().unwrap(),
        "--stack-name",
        "caretaker-alarms",
        "--parameter-overrides",
        &format!("Deployment={DEPLOYMENT}"),
        "DeploymentName=zmanim-test",
        "AlertEmail=ops@example.com",
        "WalArchiving=true",
    ]);
    assert!(deploy.status.success(), "deploy: {}", String::from_utf8_lossy(&deploy.stderr));
    let stacks = aws(&["cloudformation", "describe-stacks", "--stack-name", "caretaker-alarms"]);
    let stacks: serde_json::Value = serde_json::from_slice(&stacks.stdout).unwrap();
    assert!(stacks["Stacks"][0]["StackStatus"].as_str().unwrap().ends_with("_COMPLETE"), "{stacks}");
    let topics = String::from_utf8_lossy(&aws(&["sns", "list-topics"]).stdout).to_string();
    assert!(topics.contains("caretaker-zmanim-test-alarms"), "{topics}");
}
