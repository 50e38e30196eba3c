//! Supervision in lab boxes: real PostgreSQL, Redis, the stand-in API (test-api, made unhealthy
//! at will through its control file), systemd driven over D-Bus, and SES emails read back from
//! moto running in the box's network.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;

const SENDER: &str = "caretaker@example.com";

struct Rig {
    b: LabBox,
    moto: Moto,
}

fn verify_sender(moto: &Moto) {
    let body = format!("Action=VerifyEmailIdentity&EmailAddress={}&Version=2010-12-01", SENDER.replace('@', "%40"));
    let r = moto
        .request(
            "POST",
            "/",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/eu-west-1/ses/aws4_request, SignedHeaders=host, Signature=0",
                ),
            ],
            body.as_bytes(),
        )
        .expect("VerifyEmailIdentity");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A box with postgres and redis running (as after boot), the API stopped, caretaker configured to
/// supervise with short intervals, and SES on moto. `services` false: everything stopped.
fn rig(prefix: &str, services: bool, extra_config: &str) -> Rig {
    let b = LabBox::start(prefix, BoxOptions { services, ..Default::default() }).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    verify_sender(&moto);
    let config = format!(
        r#"
[aws]
region = "eu-west-1"
ses-endpoint = "{endpoint}"
cloudwatch-endpoint = "{endpoint}"

[notify]
sender = "{SENDER}"
recipients = ["ops@example.com"]

[supervise]
enabled = true
probe-interval = "1s"
probe-timeout = "800ms"
failures-before-restart = 2
max-restarts = 3
restart-backoff = "1s"
restart-backoff-max = "2s"
start-timeout = "6s"

[provision]
extensions = ["postgis"]
{extra_config}
"#,
        endpoint = moto.endpoint()
    );
    b.write_file("/etc/caretaker/caretaker.d/50-supervise.toml", config.as_bytes(), 0o644).unwrap();
    b.write_file(
        "/run/systemd/system/caretaker.service.d/50-lab.conf",
        b"[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n",
        0o644,
    )
    .unwrap();
    b.write_file("/run/caretaker/env/zmanim-api.env", b"DB_PASSWORD=\"s3cr3t-pw\"\n", 0o600).unwrap();
    b.sh_ok("systemctl daemon-reload");
    Rig { b, moto }
}

impl Rig {
    fn status(&self) -> serde_json::Value {
        let out = self.b.exec(&["caretaker", "status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn service(&self, name: &str) -> serde_json::Value {
        let s = self.status();
        // Null until supervision has listed its services (it starts right after READY).
        s["daemon"]["services"].as_array().unwrap().iter().find(|x| x["name"] == name).cloned().unwrap_or_default()
    }

    /// Waits until `check` holds on the status of service `name`.
    fn wait_service(&self, name: &str, what: &str, timeout: Duration, check: impl Fn(&serde_json::Value) -> bool) {
        let end = Instant::now() + timeout;
        loop {
            let s = self.service(name);
            if check(&s) {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "{name} never became {what}: {s:#}\njournal:\n{}",
                    self.b.sh_ok("journalctl -u caretaker --no-pager -o cat | tail -40")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_all_healthy(&self) {
        for name in ["postgres", "redis", "api"] {
            self.wait_service(name, "healthy", Duration::from_secs(60), |s| s["state"] == "healthy");
        }
    }

    fn prop(&self, unit: &str, name: &str) -> String {
        self.b.sh_ok(&format!("systemctl show -P {name} {unit}")).trim().to_string()
    }

    fn emails(&self) -> Vec<String> {
        self.moto.sent_emails().unwrap().into_iter().map(|e| e.subject).collect()
    }
}

#[test]
fn stopped_services_are_started_in_order_each_healthy_before_the_next_and_provisioned() {
    let r = rig("sv-order", false, "");
    for u in ["postgresql@15-main.service", "redis-server.service", "zmanim-api.service"] {
        assert_eq!(r.prop(u, "ActiveState"), "inactive", "{u} should start stopped");
    }
    // Every statement logged: the one that creates the role must not carry the password.
    r.b.sh_ok("mkdir -p /etc/postgresql/15/main/conf.d && echo \"log_statement = 'all'\" > /etc/postgresql/15/main/conf.d/99-test.conf");
    r.b.sh_ok("systemctl start caretaker.service");
    r.wait_all_healthy();
    let t = |u: &str| r.prop(u, "ActiveEnterTimestampMonotonic").parse::<u64>().unwrap();
    let (pg, redis, api) = (t("postgresql@15-main.service"), t("redis-server.service"), t("zmanim-api.service"));
    assert!(pg < redis && redis < api, "order: pg {pg}, redis {redis}, api {api}");

    // Provisioning created the role, database and extension; a second run changes nothing.
    let q = |sql: &str| r.b.sh_ok(&format!("runuser -u postgres -- psql -d zmanim -Atc \"{sql}\"")).trim().to_string();
    assert_eq!(q("select rolname from pg_roles where rolname = 'zmanim'"), "zmanim");
    assert_eq!(q("select extname from pg_extension where extname = 'postgis'"), "postgis");
    // The role got a SCRAM verifier computed by caretaker (the password never reached PostgreSQL),
    // and the password logs in with it over TCP (scram-sha-256 in Debian's pg_hba.conf).
    assert!(q("select rolpassword from pg_authid where rolname = 'zmanim'").starts_with("SCRAM-SHA-256$4096:"));
    r.b.sh_ok("PGPASSWORD=s3cr3t-pw psql -h 127.0.0.1 -U zmanim -d zmanim -Atc 'select 1'");
    let pg_log = r.b.sh_ok("cat /var/log/postgresql/postgresql-15-main.log");
    assert!(pg_log.contains("CREATE ROLE"), "statements are logged: {pg_log}");
    assert!(!pg_log.contains("s3cr3t-pw"), "the password is in PostgreSQL's log");
    r.b.sh_ok("systemctl restart caretaker.service");
    r.wait_all_healthy();
    std::thread::sleep(Duration::from_secs(1));
    let journal = r.b.journal("caretaker.service");
    assert!(journal.contains("provisioning: everything already exists"), "{journal}");
    assert!(journal.contains("already running: adopted"), "running units are adopted: {journal}");
    assert!(!journal.contains("s3cr3t-pw"), "password in the journal");
}

#[test]
fn provisioning_never_touches_an_existing_database() {
    let r = rig("sv-prov", true, "");
    r.b.sh_ok("runuser -u postgres -- psql -qc 'create database zmanim' && runuser -u postgres -- psql -d zmanim -qc 'create table keep(x int); insert into keep values (42)'");
    r.b.sh_ok("systemctl start caretaker.service");
    r.wait_all_healthy();
    std::thread::sleep(Duration::from_secs(1));
    let owner = r.b.sh_ok(
        "runuser -u postgres -- psql -Atc \"select pg_get_userbyid(datdba) from pg_database where datname = 'zmanim'\"",
    );
    assert_eq!(owner.trim(), "postgres", "the existing database's owner was changed");
    assert_eq!(r.b.sh_ok("runuser -u postgres -- psql -d zmanim -Atc 'select x from keep'").trim(), "42");
    assert!(r.b.journal("caretaker.service").contains("created the application role"));
}

#[test]
fn a_frozen_api_is_restarted_and_the_restart_shows_in_status() {
    let r = rig("sv-freeze", true, "[metrics]\nenabled = true\ninterval = \"10s\"\ndeployment = \"lab/sv\"\n");
    r.b.sh_ok("systemctl start zmanim-api.service caretaker.service");
    r.wait_all_healthy();
    let pid = r.prop("zmanim-api.service", "MainPID");
    let frozen = Instant::now();
    r.b.sh_ok(&format!("kill -STOP {pid}"));
    r.wait_service("api", "restarted", Duration::from_secs(30), |s| s["restarts"].as_u64() >= Some(1));
    r.wait_service("api", "healthy again", Duration::from_secs(30), |s| s["state"] == "healthy");
    let took = frozen.elapsed();
    assert_ne!(r.prop("zmanim-api.service", "MainPID"), pid);
    // 2 probe intervals (1 s) + probe timeouts + restart: well under 15 s.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let human = r.b.sh_ok("caretaker status");
    assert!(human.contains("api") && human.contains("restarts 1"), "{human}");

    // CloudWatch saw it: the restart counted, and the API healthy again.
    let now = std::time::SystemTime::now();
    let stat = |metric: &str, dims: &str, statistic: &str| {
        let body = format!(
            "Action=GetMetricStatistics&Version=2010-08-01&Namespace=Caretaker&MetricName={metric}\
             &Dimensions.member.1.Name=Deployment&Dimensions.member.1.Value=lab%2Fsv{dims}\
             &StartTime={}&EndTime={}&Period=60&Statistics.member.1={statistic}",
            humantime::format_rfc3339_seconds(now - Duration::from_secs(600)),
            humantime::format_rfc3339_seconds(now + Duration::from_secs(600)),
        );
        r.moto.query("monitoring", "eu-west-1", &body).unwrap()
    };
    let api = "&Dimensions.member.2.Name=Service&Dimensions.member.2.Value=api";
    let end = Instant::now() + Duration::from_secs(40);
    while !(stat("RestartsTotal", "", "Maximum").contains("<Maximum>1.0</Maximum>")
        && stat("ServiceHealthy", api, "Maximum").contains("<Maximum>1.0</Maximum>"))
    {
        assert!(
            Instant::now() < end,
            "CloudWatch has no restart or healthy api: {}\n{}",
            stat("RestartsTotal", "", "Maximum"),
            stat("ServiceHealthy", api, "Maximum")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn an_api_failing_forever_is_restarted_a_bounded_number_of_times_then_failed_with_one_email() {
    let r = rig("sv-fail", true, "");
    r.b.sh_ok("systemctl start zmanim-api.service caretaker.service");
    r.wait_all_healthy();
    r.b.sh_ok("mkdir -p /run/test-api && touch /run/test-api/unhealthy");
    r.wait_service("api", "failed", Duration::from_secs(90), |s| s["state"] == "failed");
    assert_eq!(r.service("api")["restarts"], 3, "restarts bounded by max-restarts");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(r.service("api")["restarts"], 3, "no restart storm after Failed");
    let failed: Vec<String> = r.emails().into_iter().filter(|s| s.contains("failed")).collect();
    assert_eq!(failed.len(), 1, "exactly one email: {:?}", r.emails());
    assert!(r.status()["daemon"]["incidents"].as_array().unwrap().iter().any(|i| i["key"] == "api:failed"));

    r.b.sh_ok("rm /run/test-api/unhealthy");
    r.wait_service("api", "healthy", Duration::from_secs(30), |s| s["state"] == "healthy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.emails().iter().any(|s| s.contains("resolved")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    let emails = r.emails();
    assert_eq!(emails.len(), 2, "{emails:?}");
    assert!(emails[1].contains("resolved"), "{emails:?}");
    let body = &r.moto.sent_emails().unwrap()[0].body;
    assert!(body.contains("What caretaker did") && body.contains("What to run next"), "{body}");
}

#[test]
fn postgres_stopped_behind_caretakers_back_is_restarted_and_the_api_recovers() {
    let r = rig("sv-pg", true, "");
    r.b.sh_ok("systemctl start zmanim-api.service caretaker.service");
    r.wait_all_healthy();
    r.b.sh_ok("systemctl stop postgresql@15-main.service");
    r.wait_service("postgres", "restarted", Duration::from_secs(30), |s| s["restarts"].as_u64() >= Some(1));
    r.wait_all_healthy();
    assert_eq!(r.prop("postgresql@15-main.service", "ActiveState"), "active");
}

#[test]
fn a_unit_stuck_at_systemds_start_limit_is_reset_and_started() {
    let r = rig("sv-limit", true, "");
    r.b.write_file(
        "/run/systemd/system/zmanim-api.service.d/50-limit.conf",
        b"[Unit]\nStartLimitIntervalSec=300\nStartLimitBurst=2\n[Service]\nRestart=no\n",
        0o644,
    )
    .unwrap();
    r.b.sh_ok("systemctl daemon-reload && systemctl start zmanim-api.service");
    // Burn the start limit, then stop it: systemd now refuses to start it.
    r.b.sh("systemctl restart zmanim-api.service; systemctl restart zmanim-api.service; systemctl restart zmanim-api.service; systemctl kill zmanim-api.service");
    std::thread::sleep(Duration::from_millis(500));
    let refused = r.b.sh("systemctl start zmanim-api.service");
    assert!(!refused.status.success(), "the start limit should refuse a start");
    assert_eq!(r.prop("zmanim-api.service", "Result"), "start-limit-hit");

    r.b.sh_ok("systemctl start caretaker.service");
    r.wait_all_healthy();
    assert_eq!(r.prop("zmanim-api.service", "ActiveState"), "active");
    assert!(
        r.b.journal("caretaker.service").contains("Result=start-limit-hit"),
        "{}",
        r.b.journal("caretaker.service")
    );
}

#[test]
fn redis_failing_bgsave_is_degraded_and_alerted_within_an_interval() {
    let r = rig("sv-redis", true, "");
    r.b.sh_ok("systemctl start zmanim-api.service caretaker.service");
    r.wait_all_healthy();
    r.b.sh_ok("chmod 0500 /var/lib/redis && redis-cli BGSAVE >/dev/null");
    r.wait_service("redis", "degraded", Duration::from_secs(10), |s| s["state"] == "degraded");
    let reason = r.service("redis")["last_probe"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("BGSAVE"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.emails().iter().any(|s| s.contains("degraded")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(r.emails().iter().filter(|s| s.contains("degraded")).count(), 1, "{:?}", r.emails());
    assert_eq!(r.service("redis")["restarts"], 0, "a degraded redis is not restarted");
}
