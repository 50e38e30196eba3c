//! `caretaker backup now` through the daemon in a lab box: real PostgreSQL and Redis, moto's S3 in
//! the box's network, and the result decrypted and checked from the test.

use std::io::Read;

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;

#[test]
fn a_backup_through_the_daemon_stores_both_kinds_with_manifests_that_describe_them() {
    let b = LabBox::start("bk-now", BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let identity = age::x25519::Identity::generate();
    b.configure_backups(&moto.endpoint(), Some(&identity.to_public().to_string()), "part-size = 5242880\n").unwrap();
    // This box holds only the public recipient, and the key that seals manifests.
    let seal_key = "BACKUP_SEAL_KEY=0123456789abcdef0123456789abcdef\n";
    b.write_file("/run/caretaker/env/caretaker.env", seal_key.as_bytes(), 0o600).unwrap();
    // CloudWatch metrics on, into the same moto.
    let metrics = format!(
        "[aws]\ncloudwatch-endpoint = \"{}\"\n[metrics]\nenabled = true\ninterval = \"10s\"\ndeployment = \"lab/bk-now\"\n",
        moto.endpoint()
    );
    b.write_file("/etc/caretaker/caretaker.d/55-metrics.toml", metrics.as_bytes(), 0o644).unwrap();
    b.sh_ok(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc \"create table cities(id int primary key, name text); \
           insert into cities select g, 'city ' || g from generate_series(1, 1234) g\" && \
         redis-cli set a 1 >/dev/null && redis-cli set b 2 >/dev/null && systemctl daemon-reload && systemctl start caretaker",
    );

    let out = b.sh("caretaker backup now");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok: backed up: postgres") && stdout.contains("redis"), "{stdout}");
    assert!(stdout.contains("job backup-"), "progress lines name the job: {stdout}");
    // Progress: elapsed time, bytes read and stored, and the rate (parts' lines come at most once
    // a second: this backup is quicker than that, so its completion line carries them).
    assert!(
        stdout.lines().any(|l| l.starts_with('[')
            && l.contains("postgres: backup ")
            && l.contains(" stored in ")
            && l.contains(" s of it S3 assembling ")
            && l.ends_with("/s")),
        "{stdout}"
    );
    // pg_dump and the PostgreSQL backend serving it ran at [jobs]'s priority (SCHED_IDLE, nice
    // 10), as the kernel reported it for the backend: another user's process, lowered with the
    // unit's CAP_SYS_NICE (RestrictRealtime= allows SCHED_IDLE); the encoder thread too; the
    // counts came from the dump's stream.
    let journal = b.journal("caretaker.service");
    assert!(journal.contains("pg_dump and its PostgreSQL backend run at SCHED_IDLE (nice 10)"), "{journal}");
    assert!(!journal.contains("cannot lower the"), "{journal}");
    assert!(journal.contains("table(s) from the dump's stream"), "{journal}");
    // The daemon's own share of the CPU: its unit's weights (systemd records them;
    // this lab's cgroup-v1 cpu hierarchy is read-only in a box, so only the real box's cgroup v2
    // enforces them) and its session's autogroup nice, which this kernel does enforce.
    let weights = b.sh_ok("systemctl show caretaker.service -p CPUWeight -p IOWeight");
    assert_eq!(weights.trim(), "CPUWeight=10\nIOWeight=10", "{journal}");
    assert!(journal.contains("caretaker.service runs at CPUWeight=10 IOWeight=10"), "{journal}");
    let autogroup = b.sh_ok("cat /proc/$(systemctl show caretaker.service -p MainPID --value)/autogroup");
    assert!(autogroup.trim().ends_with("nice 10"), "{autogroup}");
    // The unit's defaults are the configuration's: nothing is written, systemctl asks for no reload.
    assert_eq!(b.sh_ok("systemctl show caretaker.service -p NeedDaemonReload").trim(), "NeedDaemonReload=no");
    // Other values take effect on reload, without a restart.
    b.write_file(
        "/etc/caretaker/caretaker.d/70-jobs.toml",
        b"[jobs]\ncpu-weight = 30\nio-weight = 40\nnice = 5\n",
        0o644,
    )
    .unwrap();
    b.sh_ok("caretaker reload");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let w = b.sh_ok("systemctl show caretaker.service -p CPUWeight -p IOWeight");
        let g = b.sh_ok("cat /proc/$(systemctl show caretaker.service -p MainPID --value)/autogroup");
        if w.trim() == "CPUWeight=30\nIOWeight=40" && g.trim().ends_with("nice 5") {
            break;
        }
        assert!(std::time::Instant::now() < end, "after reload: {w} {g}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    b.sh_ok("rm /etc/caretaker/caretaker.d/70-jobs.toml && caretaker reload");

    let list = b.sh_ok("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json");
    let manifests: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(manifests.len(), 2, "{list}");
    let pg = manifests.iter().find(|m| m["kind"] == "postgres").unwrap();
    assert_eq!(pg["details"]["row_counts"]["public.cities"], 1234);
    assert_eq!(pg["producer_exit_status"], 0);
    assert_eq!(pg["encryption"]["kind"], "x25519");
    let redis = manifests.iter().find(|m| m["kind"] == "redis").unwrap();
    assert_eq!(redis["details"]["dbsize"], 2);

    // The stored object is the manifest's: hash, then decrypt + decompress to a custom-format dump.
    let id = pg["id"].as_str().unwrap();
    let key = format!("/backups/caretaker/postgres/{}/{}/{}/{id}/data.zst.age", &id[0..4], &id[4..6], &id[6..8]);
    let obj = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap();
    assert_eq!(obj.status, 200);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&obj.body)), pg["stored_sha256"].as_str().unwrap());
    let decryptor = age::Decryptor::new(&obj.body[..]).unwrap();
    let mut plain = Vec::new();
    let reader = decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity)).unwrap();
    zstd::stream::read::Decoder::new(reader).unwrap().read_to_end(&mut plain).unwrap();
    assert!(plain.starts_with(b"PGDMP"), "a pg_dump custom-format archive");
    assert_eq!(pg["schema"], 2);
    assert_eq!(caretaker::backup::digest::xxh3_128_hex(&plain), pg["plain_xxh3_128"].as_str().unwrap());
    assert!(pg.get("plain_sha256").is_none(), "schema 2 records no SHA-256 of the plaintext");
    assert!(!obj.body.windows(8).any(|w| w == b"city 123"), "plaintext in the stored object");

    // The daemon's metrics: the heartbeat, and the backups' ages once the backup was recorded.
    let list_metrics = |name: &str| {
        let body = format!("Action=ListMetrics&Version=2010-08-01&Namespace=Caretaker&MetricName={name}");
        moto.query("monitoring", "us-east-1", &body).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ages = list_metrics("LastBackupAgeSeconds");
        if ages.contains("<Value>postgres</Value>") && ages.contains("<Value>redis</Value>") {
            assert!(ages.contains("<Value>lab/bk-now</Value>"), "{ages}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no backup ages published: {ages}\n{}", b.journal("caretaker"));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(list_metrics("Heartbeat").contains("<Value>lab/bk-now</Value>"));
    // (Supervision is off and no volume is mounted in this box: no ServiceHealthy or
    // DataVolumeFree*; supervise_lab sees the services.)
    assert!(list_metrics("RestartsTotal").contains("<Value>lab/bk-now</Value>"));
    let status: serde_json::Value = serde_json::from_str(&b.sh_ok("caretaker status --json")).unwrap();
    let m = &status["daemon"]["metrics"];
    assert!(m["last_published_at"].is_string() && m["failures"] == 0, "{status}");
}

#[test]
fn uploads_left_by_a_killed_daemon_are_aborted_at_start() {
    let b = LabBox::start("bk-stale", BoxOptions { services: false, ..Default::default() }).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    // What a daemon killed mid-backup leaves: an upload with a part, never completed.
    let create = moto
        .request("POST", "/backups/caretaker/postgres/2026/11/22/x/data.zst.age?uploads", &[Moto::s3_auth()], b"")
        .unwrap();
    assert_eq!(create.status, 200, "{}", create.text());
    let listed = |m: &Moto| m.request("GET", "/backups?uploads", &[Moto::s3_auth()], b"").unwrap().text();
    assert!(listed(&moto).contains("<UploadId>"), "{}", listed(&moto));
    b.configure_backups(&moto.endpoint(), None, "").unwrap();
    b.sh_ok("systemctl daemon-reload && systemctl start caretaker");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while listed(&moto).contains("<UploadId>") {
        assert!(std::time::Instant::now() < end, "stale upload not aborted: {}", b.journal("caretaker.service"));
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.journal("caretaker.service").contains("aborted a stale multipart upload") {
        assert!(std::time::Instant::now() < end, "{}", b.journal("caretaker.service"));
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The key that seals manifests in the drill boxes (beside the identity: so that a test can change
/// the identity and still find its backups).
const SEAL_KEY: &str = "BACKUP_SEAL_KEY=fedcba9876543210fedcba9876543210\n";

/// A box with postgres/redis running, moto's S3, caretaker taking backups for an age recipient
/// whose identity is in the env file (as firstboot would write it from SSM), and a database.
fn drill_rig(prefix: &str) -> (LabBox, Moto) {
    let b = LabBox::start(prefix, BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let identity = age::x25519::Identity::generate();
    b.configure_backups(&moto.endpoint(), Some(&identity.to_public().to_string()), "").unwrap();
    use age::secrecy::ExposeSecret;
    let env = format!("BACKUP_AGE_IDENTITY=\"{}\"\n{SEAL_KEY}", identity.to_string().expose_secret());
    b.write_file("/run/caretaker/env/caretaker.env", env.as_bytes(), 0o600).unwrap();
    b.sh_ok(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc \"create extension postgis; \
           create table cities(id int primary key, name text, loc geometry(Point, 4326)); \
           insert into cities select g, 'city ' || g, st_setsrid(st_makepoint(g % 180, g % 90), 4326) from generate_series(1, 5000) g; \
           create table zmanim(city int references cities, day date, sunrise time, primary key (city, day)); \
           insert into zmanim select c, d::date, '06:00' from generate_series(1, 50) c, generate_series('2026-01-01'::date, '2026-03-01', '1 day') d\" && \
         redis-cli set a 1 >/dev/null && systemctl daemon-reload && systemctl start caretaker",
    );
    (b, moto)
}

/// SES for the box; caretaker restarted to mail through it.
fn ses_for(b: &LabBox) -> Moto {
    let ses = b.ses().expect("moto for SES");
    b.sh_ok("systemctl restart caretaker");
    ses
}

fn verify_json(moto: &Moto, kind: &str, id: &str) -> serde_json::Value {
    let key = format!("/backups/caretaker/{kind}/{}/{}/{}/{id}/verify.json", &id[0..4], &id[4..6], &id[6..8]);
    let r = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap();
    assert_eq!(r.status, 200, "{key}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn a_drill_restores_into_a_scratch_database_and_an_altered_byte_fails_it() {
    let (b, moto) = drill_rig("bk-drill");
    let ses = ses_for(&b);
    let out = b.sh("caretaker backup now");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let id = b.backup_ids("postgres")[0].clone();

    let out = b.sh("caretaker backup verify");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    // The drill's pg_restore and the backend loading the data ran at [jobs]'s priority too.
    let journal = b.journal("caretaker.service");
    assert!(
        journal.contains("pg_restore and its PostgreSQL backend run at SCHED_IDLE (nice 10)")
            || journal.contains("pg_restore ran at SCHED_IDLE (nice 10) (done before"),
        "{journal}"
    );
    assert!(!journal.contains("cannot lower the"), "{journal}");
    assert!(stdout.contains(&format!("postgres {id} verified")), "{stdout}");
    let v = verify_json(&moto, "postgres", &id);
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["tables"]["public.cities"], serde_json::json!([5000, 5000]), "{v:#}");
    assert_eq!(v["tables"]["public.zmanim"][1], 50 * 60, "{v:#}");
    let dbs = b.sh_ok("runuser -u postgres -- psql -Atc 'select datname from pg_database'");
    assert!(!dbs.contains("caretaker_verify"), "the scratch database is dropped: {dbs}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s: serde_json::Value = serde_json::from_str(&b.sh_ok("caretaker status --json")).unwrap();
        if s["daemon"]["schedule"]["last_verify_ok"] == true && s["daemon"]["schedule"]["last_verify"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < end, "status shows the last drill: {:#}", s["daemon"]["schedule"]);
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    // One byte altered in the stored object: the drill fails during the stream, says so, records it.
    let key = format!("/backups/caretaker/postgres/{}/{}/{}/{id}/data.zst.age", &id[0..4], &id[4..6], &id[6..8]);
    let mut obj = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().body;
    let mid = obj.len() / 2;
    obj[mid] ^= 0x01;
    assert_eq!(moto.request("PUT", &key, &[Moto::s3_auth()], &obj).unwrap().status, 200);
    let out = b.sh(&format!("caretaker backup verify {id}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAILED") && stdout.contains("damaged or was altered"), "{stdout}");
    let v = verify_json(&moto, "postgres", &id);
    assert_eq!(v["ok"], false, "{v:#}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let subjects: Vec<String> = ses.sent_emails().unwrap().into_iter().map(|e| e.subject).collect();
        if subjects.iter().filter(|s| s.contains("failed its restore drill")).count() == 1 {
            break;
        }
        assert!(std::time::Instant::now() < end, "one drill alert: {subjects:?}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let dbs = b.sh_ok("runuser -u postgres -- psql -Atc 'select datname from pg_database'");
    assert!(!dbs.contains("caretaker_verify"), "the scratch database is dropped after a failure too: {dbs}");
}

#[test]
fn a_missed_scheduled_backup_runs_soon_after_start_then_retention_and_status_shows_the_schedule() {
    let (b, moto) = drill_rig("bk-sched");
    // No backup exists yet, so the last scheduled moment was missed: caught up after 1 s.
    b.write_file(
        "/etc/caretaker/caretaker.d/60-schedule.toml",
        b"[backup]\nschedule = \"03:00\"\nverify-schedule = \"off\"\ncatch-up-delay = \"1s\"\n",
        0o644,
    )
    .unwrap();
    b.sh_ok("systemctl restart caretaker");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        let s: serde_json::Value = serde_json::from_str(&b.sh_ok("caretaker status --json")).unwrap();
        if s["daemon"]["schedule"]["last_backup_ok"] == true
            && s["daemon"]["recent_jobs"].as_array().is_some_and(|j| j.iter().any(|j| j["kind"] == "prune"))
        {
            break s;
        }
        assert!(std::time::Instant::now() < end, "no scheduled backup: {s:#}\n{}", b.journal("caretaker.service"));
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let schedule = &status["daemon"]["schedule"];
    assert_eq!(schedule["backup_schedule"], "03:00");
    assert!(schedule["next_backup"].as_str().unwrap().ends_with("03:00:00Z"), "{schedule:#}");
    assert!(schedule["next_verify"].is_null(), "verify is off: {schedule:#}");
    let list = moto.request("GET", "/backups?list-type=2&prefix=caretaker/", &[Moto::s3_auth()], b"").unwrap().text();
    assert_eq!(list.matches("manifest.json").count(), 2, "postgres and redis backed up: {list}");
    // Recorded: a restart does not back up again.
    b.sh_ok("systemctl restart caretaker");
    std::thread::sleep(std::time::Duration::from_secs(4));
    let list = moto.request("GET", "/backups?list-type=2&prefix=caretaker/", &[Moto::s3_auth()], b"").unwrap().text();
    assert_eq!(list.matches("manifest.json").count(), 2, "no second catch-up: {list}");
}

#[test]
fn pg_dump_killed_mid_stream_publishes_nothing_aborts_the_upload_and_sends_one_email() {
    let (b, moto) = drill_rig("bk-kill");
    let ses = ses_for(&b);
    b.sh_ok("caretaker backup now --kind postgres >/dev/null");
    let latest = || {
        let list = b.sh_ok(
            "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json --kind postgres",
        );
        let all: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
        (all.len(), all.last().map(|m| m["id"].as_str().unwrap().to_string()))
    };
    let before = latest();
    assert_eq!(before.0, 1);
    // Enough data that pg_dump runs for a while (incompressible text: the stream keeps uploading).
    b.sh_ok(
        "runuser -u postgres -- psql -d zmanim -qc \"create table blobs(id int primary key, body text); \
         insert into blobs select g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) from generate_series(1, 1500000) g\" && \
         systemctl restart caretaker",
    );
    b.sh_ok("systemd-run --unit=bk-kill-cli --collect -p StandardOutput=file:/run/bk.out caretaker backup now --kind postgres");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !b.sh("pgrep -x pg_dump").status.success() {
        assert!(std::time::Instant::now() < end, "pg_dump never ran: {}", b.journal("caretaker.service"));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    b.sh_ok("pkill -KILL -x pg_dump");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while b.sh_ok("systemctl is-active bk-kill-cli.service || true").trim() == "active" {
        assert!(std::time::Instant::now() < end, "the backup never ended");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = b.sh_ok("cat /run/bk.out");
    assert!(out.contains("FAILED") && out.contains("pg_dump"), "{out}");
    assert_eq!(latest(), before, "nothing was published: the previous latest is still the latest");
    let uploads = moto.request("GET", "/backups?uploads", &[Moto::s3_auth()], b"").unwrap().text();
    assert!(!uploads.contains("<UploadId>"), "the multipart upload was aborted: {uploads}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let subjects = loop {
        let subjects: Vec<String> = ses.sent_emails().unwrap().into_iter().map(|e| e.subject).collect();
        if !subjects.is_empty() || std::time::Instant::now() > end {
            break subjects;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert_eq!(subjects.iter().filter(|s| s.contains("postgres backup failed")).count(), 1, "{subjects:?}");

    // The next backup succeeds and resolves the incident (one recovery email).
    let out = b.sh("caretaker backup now --kind postgres");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let subjects: Vec<String> = ses.sent_emails().unwrap().into_iter().map(|e| e.subject).collect();
        if subjects.iter().any(|s| s.to_lowercase().contains("resolved")) {
            break;
        }
        assert!(std::time::Instant::now() < end, "no recovery email: {subjects:?}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn a_daemon_killed_mid_backup_leaves_no_stale_upload_after_restart_and_the_next_backup_succeeds() {
    let (b, moto) = drill_rig("bk-dkill");
    b.sh_ok(
        "runuser -u postgres -- psql -d zmanim -qc \"create table blobs(id int primary key, body text); \
         insert into blobs select g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) from generate_series(1, 1500000) g\"",
    );
    b.sh_ok("systemd-run --unit=bk-dkill-cli --collect caretaker backup now --kind postgres");
    let uploads = || moto.request("GET", "/backups?uploads", &[Moto::s3_auth()], b"").unwrap().text();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !uploads().contains("<UploadId>") {
        assert!(
            std::time::Instant::now() < end,
            "the backup never started uploading: {}",
            b.journal("caretaker.service")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    b.sh_ok("kill -KILL $(systemctl show -p MainPID --value caretaker.service)");
    // systemd restarts the daemon (Restart=on-failure after 5 s); it aborts what the dead one left.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while uploads().contains("<UploadId>") {
        assert!(std::time::Instant::now() < end, "a stale upload remains: {}", uploads());
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let list = moto.request("GET", "/backups?list-type=2&prefix=caretaker/", &[Moto::s3_auth()], b"").unwrap().text();
    assert!(!list.contains("manifest.json"), "the killed backup published nothing: {list}");
    let out = b.sh("caretaker backup now --kind postgres");
    assert!(out.status.success(), "the next backup succeeds: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn decrypt_errors_under_the_shipped_unit_say_what_is_wrong_and_never_panic() {
    let (b, moto) = drill_rig("bk-age");
    let out = b.sh("caretaker backup now --kind postgres");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let id = b.backup_ids("postgres")[0].clone();
    let key = format!("/backups/caretaker/postgres/{}/{}/{}/{id}/data.zst.age", &id[0..4], &id[4..6], &id[6..8]);
    let original = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().body;
    let verify = |b: &LabBox| {
        let out = b.sh(&format!("caretaker backup verify {id} --kind postgres"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(1), "{text}");
        for bad in ["LanguageNotAvailable", "poisoned", "panicked", "age.ftl"] {
            assert!(!text.contains(bad), "{bad} in: {text}\n{}", b.journal("caretaker.service"));
        }
        text
    };

    // A damaged header (the first line of an age file names its version).
    let mut damaged = original.clone();
    damaged[3] ^= 0x20;
    assert_eq!(moto.request("PUT", &key, &[Moto::s3_auth()], &damaged).unwrap().status, 200);
    let text = verify(&b);
    assert!(text.contains("damaged or was altered") && text.contains("age header"), "{text}");

    // The intact object, but the box holds another identity: a key problem, not damage; and the
    // same daemon still words it properly after the first error.
    assert_eq!(moto.request("PUT", &key, &[Moto::s3_auth()], &original).unwrap().status, 200);
    use age::secrecy::ExposeSecret;
    let other = age::x25519::Identity::generate();
    let env = format!("BACKUP_AGE_IDENTITY=\"{}\"\n{SEAL_KEY}", other.to_string().expose_secret());
    b.write_file("/run/caretaker/env/caretaker.env", env.as_bytes(), 0o600).unwrap();
    let text = verify(&b);
    assert!(text.contains("cannot decrypt") && text.contains("no matching key"), "{text}");
    assert!(!text.contains("damaged"), "a wrong identity is not damage: {text}");
    let journal = b.journal("caretaker.service");
    assert!(!journal.contains("panicked"), "{journal}");
}

/// A function that runs a shell command as whoever evaluates it, except in the databases named:
/// planted in a CHECK constraint, it runs when pg_restore loads the table's rows.
const PLANT: &str = "create function public.pwn(int) returns boolean language plpgsql as \\$f\\$ begin \
    if current_database() not in ('evil', 'zmanim') then \
      execute 'copy (select 1) to program ''touch /var/lib/postgresql/pwned'''; end if; return true; end \\$f\\$;";

fn pwned(b: &LabBox) -> bool {
    b.sh("test -e /var/lib/postgresql/pwned").status.success()
}

fn subjects(ses: &Moto, needle: &str) -> usize {
    ses.sent_emails().unwrap().into_iter().filter(|e| e.subject.contains(needle)).count()
}

#[test]
fn a_forged_backup_is_ignored_by_list_drill_restore_and_retention_and_reported_once() {
    let (b, moto) = drill_rig("bk-forged");
    let ses = ses_for(&b);
    b.sh_ok("caretaker backup now --kind postgres");
    let list = b.sh_ok("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json");
    let real: serde_json::Value = serde_json::from_str::<Vec<serde_json::Value>>(&list).unwrap().remove(0);
    let real_id = real["id"].as_str().unwrap().to_string();

    // The attacker knows the public recipient (it is in the configuration) and can write the
    // bucket: a valid age file of a real pg_dump archive with a hostile entry, and a manifest
    // with a later id and correct hashes — but no seal this box's keys make.
    let recipient = real["encryption"]["recipients"][0].as_str().unwrap();
    b.sh_ok(&format!(
        "runuser -u postgres -- psql -qc 'create database evil' && \
         runuser -u postgres -- psql -d evil -qc \"{PLANT} create table t(x int check (public.pwn(x))); insert into t values (1)\" && \
         runuser -u postgres -- pg_dump -Fc evil > /tmp/forged.dump && zstd -q < /tmp/forged.dump | age -r {recipient} > /tmp/forged.age"
    ));
    let plain = std::fs::read(b.root().join("tmp/forged.dump")).unwrap();
    let stored = std::fs::read(b.root().join("tmp/forged.age")).unwrap();
    use sha2::Digest;
    let sha = |d: &[u8]| hex::encode(sha2::Sha256::digest(d));
    let header = &stored[..caretaker::backup::stream::age_prefix_len(&stored).unwrap()];
    let forged_id =
        caretaker::backup::run::new_id(std::time::SystemTime::now() + std::time::Duration::from_secs(86400));
    let mut manifest = real.clone();
    manifest["id"] = forged_id.clone().into();
    manifest["plain_bytes"] = plain.len().into();
    manifest["plain_xxh3_128"] = caretaker::backup::digest::xxh3_128_hex(&plain).into();
    manifest["stored_bytes"] = stored.len().into();
    manifest["stored_sha256"] = sha(&stored).into();
    manifest["header_sha256"] = sha(header).into();
    manifest["details"]["row_counts"] = serde_json::json!({ "public.t": 1 });
    let folder =
        caretaker::backup::run::folder("/backups/caretaker", caretaker::backup::run::Kind::Postgres, &forged_id);
    for (name, body) in [("data.zst.age", stored.clone()), ("manifest.json", serde_json::to_vec(&manifest).unwrap())] {
        assert_eq!(moto.request("PUT", &format!("{folder}{name}"), &[Moto::s3_auth()], &body).unwrap().status, 200);
    }
    // And a copy of the real manifest (sealed) under the later id: sealed, but not about that id.
    let copy = caretaker::backup::run::new_id(std::time::SystemTime::now() + std::time::Duration::from_secs(2 * 86400));
    let real_key = format!(
        "{}manifest.json",
        caretaker::backup::run::folder("/backups/caretaker", caretaker::backup::run::Kind::Postgres, &real_id)
    );
    let real_body = moto.request("GET", &real_key, &[Moto::s3_auth()], b"").unwrap().body;
    let copy_folder =
        caretaker::backup::run::folder("/backups/caretaker", caretaker::backup::run::Kind::Postgres, &copy);
    assert_eq!(
        moto.request("PUT", &format!("{copy_folder}manifest.json"), &[Moto::s3_auth()], &real_body).unwrap().status,
        200
    );

    // list: only the real one, the others named on stderr.
    let out =
        b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json --kind postgres");
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.iter().map(|m| m["id"].as_str().unwrap()).collect::<Vec<_>>(), vec![real_id.as_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&forged_id) && stderr.contains("no seal") && stderr.contains(&copy), "{stderr}");

    // The drill and `restore latest` take the real one.
    let out = b.sh("caretaker backup verify latest --kind postgres");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && stdout.contains(&format!("postgres {real_id} verified")), "{stdout}");
    let out = b.sh("caretaker restore postgres --backup latest --target-db copied");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && stdout.contains(&format!("restored backup {real_id} as copied")), "{stdout}");

    // Retention neither counts nor deletes them; the report is one email, however often it runs.
    for _ in 0..2 {
        let out = b.sh("caretaker backup prune");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    for key in
        [format!("{folder}manifest.json"), format!("{folder}data.zst.age"), format!("{copy_folder}manifest.json")]
    {
        assert_eq!(moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().status, 200, "{key} kept");
    }
    caretaker_testkit::wait_until(
        "one report",
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(250),
        || subjects(&ses, "not backups this box wrote") == 1,
        || format!("{:?}", ses.sent_emails().unwrap().into_iter().map(|e| e.subject).collect::<Vec<_>>()),
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(subjects(&ses, "not backups this box wrote"), 1);
    assert!(!pwned(&b), "the forged archive ran");

    // doctor dates the last backup by sealed manifests only, and counts what it ignored.
    let doctor = b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker doctor --json");
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let last = report["checks"].as_array().unwrap().iter().find(|c| c["check"] == "last-backup").unwrap().clone();
    let detail = last["detail"].as_str().unwrap();
    assert!(detail.contains("2 objects ignored (not sealed by this box)") && !detail.contains("unchecked"), "{last}");
}

#[test]
fn a_function_the_api_planted_does_not_run_as_superuser_in_a_drill() {
    let (b, _moto) = drill_rig("bk-plant");
    // The API's role owns its database's objects: it can plant a CHECK that calls its function.
    b.sh_ok(&format!(
        "runuser -u postgres -- psql -d zmanim -qc \"{PLANT} create table planted(x int check (public.pwn(x))); insert into planted values (1)\""
    ));
    b.sh_ok("caretaker backup now --kind postgres");
    let out = b.sh("caretaker backup verify latest --kind postgres");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!pwned(&b), "the planted function ran as a superuser during the drill: {stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("pg_restore failed"), "{stdout}");
    let journal = b.journal("caretaker.service");
    assert!(journal.contains("pg_execute_server_program role to COPY"), "{journal}");
}
