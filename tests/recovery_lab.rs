//! Recovery at boot in lab boxes with loop volumes: box A runs with data, WAL archiving and a base
//! backup, and is killed with its volume; box B boots with a new blank volume and the same
//! configuration. Its firstboot (the real unit) finds S3 unreachable first — it waits and retries,
//! PostgreSQL is not initialised and nothing starts — then, S3 back, restores the newest base
//! backup with its WAL before PostgreSQL starts (once box A's lease on the backup prefix ran out:
//! one writer per prefix), and PostgreSQL comes up on the restored data.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxImds, BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::proxy::{self, Proxy};
use caretaker_testkit::wait_until;

const IMDS_PORT: u16 = 1338;
const SEAL_KEY: &str = "0123456789abcdef0123456789abcdef-boot";

fn psql(b: &LabBox, sql: &str) -> String {
    b.sh_ok(&format!("runuser -u postgres -- psql -d zmanim -XAtc \"{sql}\"")).trim().to_string()
}

/// A box with a blank loop volume, the IMDS fake, and caretaker configured for backups with WAL
/// archiving into `endpoint` (S3 and SSM); the keys in caretaker's env file.
fn blank_box(
    prefix: &str,
    instance_id: &str,
    dir: &std::path::Path,
    endpoints: impl FnOnce(&LabBox) -> (String, String),
    identity: &age::x25519::Identity,
) -> (LabBox, BoxImds) {
    let img = dir.join(format!("{prefix}.img"));
    assert!(std::process::Command::new("truncate").args(["-s", "1G"]).arg(&img).status().unwrap().success());
    let b = LabBox::start(
        prefix,
        BoxOptions { volumes: vec![(img, "1G".into())], services: false, dropins: true, ..Default::default() },
    )
    .expect("lab box boots");
    let dev = b.volumes()[0].display().to_string();
    let imds = BoxImds::start_with(&b, IMDS_PORT, &["--instance-id", instance_id]);
    let (ssm, s3) = endpoints(&b);
    let config = format!(
        r#"[aws]
region = "us-east-1"
imds-endpoint = "http://127.0.0.1:{IMDS_PORT}"
imds-deadline = "5s"
ssm-endpoint = "{ssm}"
s3-endpoint = "{s3}"

[volume]
device = "{dev}"
attach-timeout = "2s"

[services.postgres]
initdb = "/usr/lib/postgresql/15/bin/initdb"

# Debian's Redis in the lab (its own dir; the image's is on /data).
[services.redis]
unit = "redis-server.service"
data-dir = "/var/lib/redis"

[supervise]
enabled = false

[backup]
bucket = "backups"
database = "zmanim"
recipients = ["{}"]
schedule = "off"
verify-schedule = "off"
wal-archive = true
archive-timeout = "10s"

[recovery]
retry-max = "5s"
lease-ttl = "30s"
"#,
        identity.to_public()
    );
    b.write_file("/etc/caretaker/caretaker.toml", config.as_bytes(), 0o644).unwrap();
    use age::secrecy::ExposeSecret;
    let env = format!("BACKUP_AGE_IDENTITY=\"{}\"\nBACKUP_SEAL_KEY={SEAL_KEY}\n", identity.to_string().expose_secret());
    b.write_file("/run/caretaker/env/caretaker.env", env.as_bytes(), 0o600).unwrap();
    for unit in ["caretaker-firstboot.service", "caretaker.service"] {
        b.set_unit_env(unit, caretaker_testkit::moto::TEST_CREDENTIALS).unwrap();
    }
    // Debian's generator makes postgresql.service want the host-style cluster; the lab's
    // postgresql.service runs the one on /data instead.
    b.sh_ok("systemctl mask --runtime postgresql@15-main.service && systemctl daemon-reload && rm -f /var/lib/redis/dump.rdb");
    (b, imds)
}

fn ssm_parameters(moto: &Moto) {
    for (name, value) in
        [("clerk-secret-key", "sk_test_boot"), ("db-password", "boot-pw"), ("config", "LOG_LEVEL=info\n")]
    {
        moto.put_parameter("us-east-1", &format!("/zmanim/prod/{name}"), value, true).unwrap();
    }
}

/// Two forwarders from box `b`'s network to moto's (SSM, then S3), kept in `keep`; their
/// endpoints as seen from the box.
fn forward_to(moto: &Moto, b: &LabBox, keep: &std::cell::RefCell<Vec<Proxy>>) -> (String, String) {
    let ns = format!("/proc/{}/ns/net", b.pid1());
    let moto_ns = || std::fs::File::open(format!("/proc/{}/ns/net", moto.pid())).unwrap();
    let ssm = Proxy::across(std::path::Path::new(&ns), moto_ns(), moto.port());
    let s3 = Proxy::across(std::path::Path::new(&ns), moto_ns(), moto.port());
    let e = (format!("http://127.0.0.1:{}", ssm.port), format!("http://127.0.0.1:{}", s3.port));
    keep.borrow_mut().extend([ssm, s3]);
    e
}

#[test]
fn a_new_box_on_a_blank_volume_waits_for_s3_then_restores_itself_before_postgresql_starts() {
    let dir = tempfile::tempdir().unwrap();
    let identity = age::x25519::Identity::generate();
    let moto_cell = std::cell::RefCell::new(None);
    let (a, _imds_a) = blank_box(
        "rb-a",
        "i-0aaaaaaaaaaaaaaaa",
        dir.path(),
        |b| {
            let moto = Moto::start_in_netns(b.pid1()).expect("moto");
            moto.create_bucket("backups").unwrap();
            ssm_parameters(&moto);
            let e = moto.endpoint();
            *moto_cell.borrow_mut() = Some(moto);
            (e.clone(), e)
        },
        &identity,
    );
    let moto = moto_cell.into_inner().unwrap();

    // Box A: a fresh deployment (no backups yet): firstboot makes an empty cluster.
    a.sh_ok("systemctl start caretaker-firstboot.service");
    let report: serde_json::Value = serde_json::from_str(&a.sh_ok("cat /run/caretaker/firstboot.json")).unwrap();
    assert!(report["recovery"]["outcome"]["NothingToRestore"].is_string(), "{report:#}");
    a.sh_ok(
        "systemctl start postgresql.service && \
         runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc 'create table rows(id int primary key, at timestamptz default now())' && \
         runuser -u postgres -- psql -d zmanim -qc 'insert into rows(id) select generate_series(1, 500)' && \
         systemctl start redis-server.service && redis-cli set city:1 Jerusalem >/dev/null && \
         redis-cli set city:2 Safed >/dev/null && systemctl start caretaker.service",
    );
    wait_until(
        "caretaker turned WAL archiving on",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            String::from_utf8_lossy(&a.sh("runuser -u postgres -- psql -XAtc 'show archive_mode'").stdout).trim()
                == "on"
        },
        || a.journal("caretaker.service"),
    );
    let out = a.sh("caretaker backup now --kind redis");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), a.journal("caretaker.service"));
    let base = || {
        let out = a.sh("caretaker backup now --kind base");
        assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), a.journal("caretaker.service"));
    };
    base();
    psql(&a, "insert into rows(id) select generate_series(501, 800)");
    // A second base backup, whose data then rots in S3: box B must fall back on the first one
    // (and replay more WAL), never start on a half-restored cluster.
    base();
    psql(&a, "insert into rows(id) select generate_series(801, 1000)");
    let list = a.sh_ok("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json");
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let bases: Vec<String> =
        list.iter().filter(|m| m["kind"] == "base").map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(bases.len(), 2, "{list:?}");
    let (older, newer) = (bases[0].clone(), bases[1].clone());
    let key =
        format!("/backups/caretaker/base/{}/{}/{}/{newer}/data.zst.age", &newer[0..4], &newer[4..6], &newer[6..8]);
    let put = moto.request("PUT", &key, &[Moto::s3_auth()], b"age-encryption.org/v1\nnot the backup any more").unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let current = psql(&a, "select pg_walfile_name(pg_current_wal_lsn())");
    psql(&a, "select pg_switch_wal()");
    wait_until(
        "the last rows archived",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || psql(&a, "select coalesce(last_archived_wal, '') from pg_stat_archiver") >= current,
        || a.journal("caretaker.service"),
    );
    // Box A and its volume are gone without warning.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.pid1() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    // Box B: a new blank volume, the same configuration; SSM through one forwarder, S3 through
    // another that starts switched off.
    let forwarders = std::cell::RefCell::new(vec![]);
    let (b, _imds_b) =
        blank_box("rb-b", "i-0bbbbbbbbbbbbbbbb", dir.path(), |b| forward_to(&moto, b, &forwarders), &identity);
    let forwarders = forwarders.into_inner();
    let ses = b.ses().expect("moto for SES in box B");
    let gate = &forwarders[1];
    gate.set(proxy::DOWN);
    let booted = Instant::now();
    b.sh_ok("systemctl start --no-block caretaker-firstboot.service");
    wait_until(
        "firstboot waits for S3",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || b.journal("caretaker-firstboot.service").contains("the backups in S3 cannot be read"),
        || b.journal("caretaker-firstboot.service"),
    );
    std::thread::sleep(Duration::from_secs(6));
    assert!(b.sh("test -e /data/postgres/PG_VERSION").status.code() == Some(1), "an empty cluster was made");
    assert_eq!(b.sh_ok("systemctl is-active caretaker-firstboot.service || true").trim(), "activating");
    assert_ne!(b.sh_ok("systemctl is-active postgresql.service || true").trim(), "active");
    gate.set(proxy::UP);
    let s3_back = Instant::now();
    // Box A's lease (its daemon renewed it every 10 s until the kill) runs out 30 s after: until
    // then box B waits, naming A; then it takes the prefix over.
    wait_until(
        "firstboot waits for box A's lease",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let j = b.journal("caretaker-firstboot.service");
            j.contains("held by instance i-0aaaaaaaaaaaaaaaa") || j.contains("took over the backup prefix's lease")
        },
        || b.journal("caretaker-firstboot.service"),
    );
    wait_until(
        "firstboot restored and finished",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || b.sh_ok("systemctl is-active caretaker-firstboot.service || true").trim() == "active",
        || b.journal("caretaker-firstboot.service"),
    );
    let journal = b.journal("caretaker-firstboot.service");
    assert!(journal.contains("restored base backup"), "{journal}");
    assert!(journal.contains("took over the backup prefix's lease from instance i-0aaaaaaaaaaaaaaaa"), "{journal}");
    assert!(
        journal.contains(&format!("base backup {newer} failed")) && journal.contains("1 older one(s) left to try"),
        "{journal}"
    );
    assert!(journal.contains(&format!("restored base backup {older}")), "{journal}");
    let report: serde_json::Value = serde_json::from_str(&b.sh_ok("cat /run/caretaker/firstboot.json")).unwrap();
    assert!(report["recovery"]["waited"].as_u64() >= Some(1), "{report:#}");
    assert!(report["recovery"]["outcome"]["Restored"]["summary"].is_string(), "{report:#}");
    let marker: serde_json::Value = serde_json::from_str(&b.sh_ok("cat /data/.caretaker-volume")).unwrap();
    assert_eq!(marker["held_cluster"], true, "{marker}");

    let restore = s3_back.elapsed();
    b.sh_ok("systemctl start postgresql.service redis-server.service");
    let rto = booted.elapsed();
    assert_eq!(b.sh_ok("redis-cli get city:2").trim(), "Safed", "Redis restored from its newest RDB");
    assert!(report["recovery"]["outcome"]["Restored"]["summary"].as_str().unwrap().contains("2 keys"), "{report:#}");
    assert_eq!(psql(&b, "select count(*) from rows"), "1000", "every archived row is back");
    assert_eq!(b.sh_ok("runuser -u postgres -- psql -XAtc 'show data_directory'").trim(), "/data/postgres");
    // The floor a restore by hand has: the same base backup downloaded, decrypted and unpacked
    // with the stock tools (no replay, no checks).
    use age::secrecy::ExposeSecret;
    b.write_file("/root/id.txt", identity.to_string().expose_secret().as_bytes(), 0o600).unwrap();
    let key = format!("caretaker/base/{}/{}/{}/{older}/data.zst.age", &older[0..4], &older[4..6], &older[6..8]);
    let t0 = Instant::now();
    b.sh_ok(&format!(
        "mkdir -p /tmp/plain && AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws --endpoint-url \
         http://127.0.0.1:{} --region us-east-1 s3 cp s3://backups/{key} - | age -d -i /root/id.txt | zstd -d | \
         tar -x -C /tmp/plain",
        gate.port
    ));
    let plain = t0.elapsed();
    println!(
        "recovery at boot: box B's firstboot start to PostgreSQL up on the restored data {:.1} s (S3 down for part \
         of it); from S3 back to firstboot done {:.1} s; the same base backup by hand (download, age, zstd, tar; no \
         replay, no checks) {:.1} s",
        rto.as_secs_f64(),
        restore.as_secs_f64(),
        plain.as_secs_f64()
    );

    // The daemon reports it once: what came back, and from what.
    b.sh_ok("systemctl start caretaker.service");
    let report_mail =
        || ses.sent_emails().unwrap().into_iter().find(|e| e.subject.contains("restored itself from backup"));
    wait_until(
        "the restore-at-boot report email",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || report_mail().is_some(),
        || b.journal("caretaker.service"),
    );
    let mail = report_mail().unwrap();
    assert!(
        mail.body.contains("rows in zmanim") && mail.body.contains("Redis holds 2 keys, as its backup did"),
        "{}",
        mail.body
    );
    assert!(mail.subject.contains("i-0bbbbbbbbbbbbbbbb"), "{}", mail.subject);
    let waits: Vec<String> = ses
        .sent_emails()
        .unwrap()
        .into_iter()
        .map(|e| e.subject)
        .filter(|s| s.contains("waits to restore its backups"))
        .collect();
    assert_eq!(
        waits.len(),
        2,
        "one email while it waited (S3 down, then box A's lease), one when it went on: {waits:?}"
    );
    assert!(waits[1].contains("resolved:"), "{waits:?}");

    // Box C comes up blank against the same prefix while box B lives: it restores nothing,
    // initialises nothing, starts nothing, and says which instance holds the prefix.
    let forwarders_c = std::cell::RefCell::new(vec![]);
    let (c, _imds_c) =
        blank_box("rb-c", "i-0cccccccccccccccc", dir.path(), |c| forward_to(&moto, c, &forwarders_c), &identity);
    c.sh_ok("systemctl start --no-block caretaker-firstboot.service");
    wait_until(
        "box C waits for box B's lease",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || c.journal("caretaker-firstboot.service").contains("held by instance i-0bbbbbbbbbbbbbbbb"),
        || c.journal("caretaker-firstboot.service"),
    );
    assert!(c.sh("test -e /data/postgres/PG_VERSION").status.code() == Some(1), "box C made a cluster");
    assert_eq!(c.sh_ok("systemctl is-active caretaker-firstboot.service || true").trim(), "activating");
    assert_ne!(c.sh_ok("systemctl is-active postgresql.service || true").trim(), "active");
    let status = c.sh_ok("systemctl status --no-pager caretaker-firstboot.service || true");
    let line = status.lines().find(|l| l.trim_start().starts_with("Status:")).unwrap_or_default();
    assert!(line.contains("held by instance i-0bbbbbbbbbbbbbbbb"), "systemctl status names the holder: {status}");
    drop(c);
    drop(forwarders_c);

    // Then a fresh base backup: the new timeline's first.
    wait_until(
        "a base backup on the new timeline",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || {
            let out = b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json");
            let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            list.iter().any(|m| m["kind"] == "base" && m["details"]["timeline"].as_u64() >= Some(2))
        },
        || b.journal("caretaker.service"),
    );

    // A second run on the same boot: the data directory holds data, so S3 is not even read (it is
    // switched off: the run does not wait for it).
    gate.set(proxy::DOWN);
    let t0 = Instant::now();
    let again = b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker firstboot --json");
    assert!(again.status.success() && t0.elapsed() < Duration::from_secs(20), "{again:?}");
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["recovery"]["verdict"]["verdict"], "start-normally", "{again:#}");
    drop(a);
}

/// Without WAL archiving there is no base backup, only logical dumps: box B builds a new cluster
/// from the newest dump that verifies (the newest is rotted in S3: the one before it is used),
/// beside the empty data directory, and PostgreSQL starts on it with the application's role
/// owning the restored database.
#[test]
fn without_base_backups_a_new_box_restores_the_newest_logical_backup_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let identity = age::x25519::Identity::generate();
    let moto_cell = std::cell::RefCell::new(None);
    let no_archiving = |b: &LabBox| {
        b.sh_ok("sed -i 's/^wal-archive = true/wal-archive = false/' /etc/caretaker/caretaker.toml");
    };
    let (a, _imds_a) = blank_box(
        "rd-a",
        "i-0dddddddddddddddd",
        dir.path(),
        |b| {
            let moto = Moto::start_in_netns(b.pid1()).expect("moto");
            moto.create_bucket("backups").unwrap();
            ssm_parameters(&moto);
            let e = moto.endpoint();
            *moto_cell.borrow_mut() = Some(moto);
            (e.clone(), e)
        },
        &identity,
    );
    no_archiving(&a);
    let moto = moto_cell.into_inner().unwrap();
    a.sh_ok("systemctl start caretaker-firstboot.service");
    a.sh_ok(
        "systemctl start postgresql.service && \
         runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc \"create table rows(id int primary key, note text); \
           insert into rows select g, 'line ' || g || E'\\\\n\\\\tsecond' from generate_series(1, 700) g\" && \
         systemctl start redis-server.service && redis-cli set city:1 Jerusalem >/dev/null && \
         systemctl start caretaker.service",
    );
    let backup = |kind: &str| {
        let out = a.sh(&format!("caretaker backup now --kind {kind}"));
        assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), a.journal("caretaker.service"));
    };
    backup("redis");
    backup("postgres");
    psql(&a, "insert into rows select g, 'late' from generate_series(701, 900) g");
    backup("postgres");
    let list = a.sh_ok("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json");
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let dumps: Vec<String> =
        list.iter().filter(|m| m["kind"] == "postgres").map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(dumps.len(), 2, "{list:?}");
    assert!(!list.iter().any(|m| m["kind"] == "base"), "{list:?}");
    let (older, newer) = (dumps[0].clone(), dumps[1].clone());
    let key = |id: &str| format!("caretaker/postgres/{}/{}/{}/{id}/data.zst.age", &id[0..4], &id[4..6], &id[6..8]);
    let put = moto
        .request("PUT", &format!("/backups/{}", key(&newer)), &[Moto::s3_auth()], b"age-encryption.org/v1\nrotted")
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.pid1() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let forwarders = std::cell::RefCell::new(vec![]);
    let (b, _imds_b) =
        blank_box("rd-b", "i-0eeeeeeeeeeeeeeee", dir.path(), |b| forward_to(&moto, b, &forwarders), &identity);
    no_archiving(&b);
    let forwarders = forwarders.into_inner();
    let booted = Instant::now();
    b.sh_ok("systemctl start --no-block caretaker-firstboot.service");
    wait_until(
        "firstboot restored the logical backup and finished",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || b.sh_ok("systemctl is-active caretaker-firstboot.service || true").trim() == "active",
        || b.journal("caretaker-firstboot.service"),
    );
    let firstboot_done = booted.elapsed();
    let journal = b.journal("caretaker-firstboot.service");
    assert!(
        journal.contains(&format!("logical backup {newer} failed")) && journal.contains("1 older one(s) left to try"),
        "{journal}"
    );
    assert!(journal.contains(&format!("restored logical backup {older}")), "{journal}");
    assert!(b.sh("ls -d /data/postgres.pitr-* 2>/dev/null").stdout.is_empty(), "no build left beside the data");
    b.sh_ok("systemctl start postgresql.service redis-server.service");
    let rto = booted.elapsed();
    assert_eq!(psql(&b, "select count(*) from rows"), "700", "the older dump's rows");
    assert_eq!(psql(&b, "select note from rows where id = 3"), "line 3\n\tsecond");
    assert_eq!(psql(&b, "select pg_get_userbyid(datdba) from pg_database where datname = 'zmanim'"), "zmanim");
    assert_eq!(psql(&b, "select tableowner from pg_tables where tablename = 'rows'"), "zmanim");
    assert_eq!(b.sh_ok("redis-cli get city:1").trim(), "Jerusalem");
    let report: serde_json::Value = serde_json::from_str(&b.sh_ok("cat /run/caretaker/firstboot.json")).unwrap();
    let summary = report["recovery"]["outcome"]["Restored"]["summary"].as_str().unwrap_or_default().to_string();
    assert!(summary.contains(&format!("restored logical backup {older}")) && summary.contains("1 keys"), "{report:#}");

    // The floor by hand: the same dump downloaded, decrypted and loaded with the stock tools.
    use age::secrecy::ExposeSecret;
    b.write_file("/root/id.txt", identity.to_string().expose_secret().as_bytes(), 0o600).unwrap();
    let t0 = Instant::now();
    b.sh_ok(&format!(
        "runuser -u postgres -- createdb plain && AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws \
         --endpoint-url http://127.0.0.1:{} --region us-east-1 s3 cp s3://backups/{} - | age -d -i /root/id.txt | \
         zstd -d | runuser -u postgres -- pg_restore -d plain",
        forwarders[1].port,
        key(&older)
    ));
    let plain = t0.elapsed();
    println!(
        "recovery at boot from a logical backup: firstboot {:.1} s (box A's lease ran out on the way), to PostgreSQL \
         up {:.1} s; the same dump by hand (download, age, zstd, pg_restore; no checks) {:.1} s",
        firstboot_done.as_secs_f64(),
        rto.as_secs_f64(),
        plain.as_secs_f64()
    );
    drop(a);
}
