//! Point-in-time recovery through the daemon in lab boxes: archiving set up by caretaker itself
//! (ALTER SYSTEM, one restart), a base backup, `caretaker restore postgres --to-time` swapping the
//! data directory under systemd with the API health-gated; and a box killed without warning
//! whose successor, on a blank cluster, restores `--to-latest` from S3 alone — the rows lost are
//! printed (the RPO) and, with the WAL tip, a few seconds although archive_timeout is minutes.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::proxy::Proxy;
use caretaker_testkit::wait_until;

const SEAL_KEY: &str = "0123456789abcdef0123456789abcdef-pitr";

fn psql(b: &LabBox, sql: &str) -> String {
    b.sh_ok(&format!("runuser -u postgres -- psql -d zmanim -XAtc \"{sql}\"")).trim().to_string()
}

/// caretaker with backups to `endpoint`, the identity and seal key in its env file, the API and
/// caretaker started.
fn configure(b: &LabBox, endpoint: &str, identity: &age::x25519::Identity, extra: &str) {
    let extra =
        format!("wal-archive = true\n{extra}\n[release]\nhealth-gate-consecutive = 2\nhealth-gate-timeout = \"20s\"\n");
    b.configure_backups(endpoint, Some(&identity.to_public().to_string()), &extra).unwrap();
    use age::secrecy::ExposeSecret;
    let env = format!("BACKUP_AGE_IDENTITY=\"{}\"\nBACKUP_SEAL_KEY={SEAL_KEY}\n", identity.to_string().expose_secret());
    b.write_file("/run/caretaker/env/caretaker.env", env.as_bytes(), 0o600).unwrap();
}

fn start_caretaker(b: &LabBox) {
    b.sh_ok("systemctl daemon-reload && systemctl start zmanim-api.service caretaker.service");
    // caretaker turns archiving on by itself (restarting PostgreSQL once).
    wait_until(
        "caretaker turned WAL archiving on",
        Duration::from_secs(90),
        Duration::from_millis(500),
        || {
            let out = b.sh("runuser -u postgres -- psql -XAtc 'show archive_mode' -c 'show archive_command'");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            out.status.success()
                && text.starts_with("on\n")
                && text.contains("wal push --socket /run/caretaker/wal.sock")
        },
        || b.journal("caretaker.service"),
    );
}

fn archived_through_current(b: &LabBox) {
    let current = psql(b, "select pg_walfile_name(pg_current_wal_lsn())");
    psql(b, "select pg_switch_wal()");
    wait_until(
        "the current segment archived",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || psql(b, "select coalesce(last_archived_wal, '') from pg_stat_archiver") >= current,
        || b.journal("caretaker.service"),
    );
}

fn run_ok(b: &LabBox, cmd: &str) -> String {
    let out = b.sh(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd}: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.journal("caretaker.service")
    );
    stdout
}

fn s3_keys(moto: &Moto, prefix: &str) -> String {
    moto.request("GET", &format!("/backups?list-type=2&prefix={prefix}"), &[Moto::s3_auth()], b"").unwrap().text()
}

#[test]
fn a_restore_to_a_second_swaps_the_data_directory_and_archiving_goes_on_on_the_new_timeline() {
    let b = LabBox::start("pitr-time", BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let identity = age::x25519::Identity::generate();
    configure(&b, &moto.endpoint(), &identity, "archive-timeout = \"10s\"\nwal-check-interval = \"5s\"");
    b.sh_ok(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc 'create table rows(id int primary key, at timestamptz default clock_timestamp())'",
    );
    start_caretaker(&b);
    psql(&b, "insert into rows(id) select generate_series(1, 20)");
    let out = run_ok(&b, "caretaker backup now --kind base");
    assert!(out.contains("ok: backed up: base"), "{out}");
    b.sh_ok(
        "runuser -u postgres -- psql -d zmanim -Xqc \
         'do $$ begin for i in 21..60 loop insert into rows(id) values (i); commit; perform pg_sleep(0.05); end loop; end $$'",
    );
    // Between row 40's commit and row 41's.
    let target = psql(
        &b,
        "select to_char((a + (c - a) / 2) at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || 'Z' from \
         (select (select at from rows where id = 40) a, (select at from rows where id = 41) c) t",
    );
    archived_through_current(&b);

    // Outside the window: refused, the window printed, nothing changed.
    let out = b.sh("caretaker restore postgres --to-time '2099-01-01 00:00:00Z'");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("the window is"), "{text}");
    assert_eq!(psql(&b, "select count(*) from rows"), "60");

    let out = run_ok(&b, &format!("caretaker restore postgres --to-time '{target}'"));
    assert!(out.contains("restored PostgreSQL to"), "{out}");
    assert!(out.contains("recovery stopping before commit"), "{out}");
    assert_eq!(
        psql(&b, "select count(*) || ' ' || max(id) from rows"),
        "40 40",
        "every row before the target, none after"
    );
    let kept = b.sh_ok("ls -d /var/lib/postgresql/15/main.before-pitr-*");
    assert!(!kept.trim().is_empty());
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active");
    // The restored cluster archives its new timeline through the live archive_command.
    psql(&b, "insert into rows(id) values (1000)");
    psql(&b, "select pg_switch_wal()");
    wait_until(
        "the new timeline's history archived",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || s3_keys(&moto, "caretaker/wal/00000002.history").contains("<Key>"),
        || b.journal("caretaker.service"),
    );
    let status = run_ok(&b, "caretaker status");
    assert!(status.contains("wal:") && status.contains("pitr:"), "{status}");
    // The WAL tip follows the swap onto the new timeline; doctor sees it streaming.
    wait_until(
        "the WAL tip streaming timeline 2",
        Duration::from_secs(90),
        Duration::from_millis(1000),
        || {
            let s: serde_json::Value = serde_json::from_str(&run_ok(&b, "caretaker status --json")).unwrap_or_default();
            s["daemon"]["wal_tip"]["streaming"] == true && s["daemon"]["wal_tip"]["timeline"] == 2
        },
        || b.journal("caretaker.service"),
    );
    let doctor = b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker doctor");
    let doctor = String::from_utf8_lossy(&doctor.stdout).to_string();
    let tip = doctor.lines().find(|l| l.contains("wal-tip")).unwrap_or_default();
    assert!(tip.starts_with('✓') && tip.contains("streaming"), "{doctor}");
}

#[test]
fn a_box_killed_without_warning_is_restored_on_a_new_box_from_s3_alone() {
    // Far beyond the 40 s of writes: whole segments alone would lose all of them; the WAL tip
    // (on by default) must bring the loss down to seconds.
    const ARCHIVE_TIMEOUT: u64 = 300;
    let a = LabBox::start("pitr-lost", BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(a.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let identity = age::x25519::Identity::generate();
    configure(&a, &moto.endpoint(), &identity, &format!("archive-timeout = \"{ARCHIVE_TIMEOUT}s\""));
    a.sh_ok(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc 'create table rows(id int primary key, at timestamptz default clock_timestamp())'",
    );
    start_caretaker(&a);
    run_ok(&a, "caretaker backup now --kind base");
    // A writer commits numbered rows at a steady rate; a row counts as committed once psql said
    // so (the writer runs on the host, so its record outlives the box).
    let commits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, f64)>::new()));
    let writer = {
        let (commits, pid1) = (commits.clone(), a.pid1());
        std::thread::spawn(move || {
            for i in 1i64.. {
                let out = std::process::Command::new("nsenter")
                    .args([
                        "-t",
                        &pid1.to_string(),
                        "-a",
                        "--",
                        "runuser",
                        "-u",
                        "postgres",
                        "--",
                        "psql",
                        "-d",
                        "zmanim",
                    ])
                    .args(["-XAtc", &format!("insert into rows(id) values ({i})")])
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .output();
                let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
                match out {
                    Ok(o) if o.status.success() => commits.lock().unwrap().push((i, at)),
                    _ => return,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(40));
    let status = run_ok(&a, "caretaker status");
    assert!(status.contains("wal-tip:  RPO"), "the tip streams: {status}");
    // Everything in the box dies at once: no shutdown, nothing flushed, nothing archived after.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.pid1() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    writer.join().unwrap();
    let commits = commits.lock().unwrap().clone();
    let (last_id, last_at) = *commits.last().expect("the writer committed rows");

    // A new box with a blank cluster reaches the same S3 (moto outlived box A in its network).
    let b = LabBox::start("pitr-new", BoxOptions::default()).expect("lab box boots");
    let moto_ns = std::fs::File::open(format!("/proc/{}/ns/net", moto.pid())).unwrap();
    let proxy = Proxy::across(std::path::Path::new(&format!("/proc/{}/ns/net", b.pid1())), moto_ns, moto.port());
    configure(
        &b,
        &format!("http://127.0.0.1:{}", proxy.port),
        &identity,
        &format!("archive-timeout = \"{ARCHIVE_TIMEOUT}s\""),
    );
    start_caretaker(&b);
    let out = run_ok(&b, "caretaker restore postgres --to-latest");
    assert!(out.contains("restored PostgreSQL to the end of the WAL archive"), "{out}");
    let restored: i64 = psql(&b, "select max(id) from rows").parse().unwrap();
    let restored_at =
        commits.iter().find(|(i, _)| *i == restored).map(|(_, t)| *t).expect("the restored row was committed");
    assert_eq!(psql(&b, "select count(*) from rows"), restored.to_string(), "no hole before the newest restored row");
    let lost_rows = last_id - restored;
    let lost_secs = last_at - restored_at;
    println!(
        "RPO (box and volume lost, WAL tip on, archive_timeout {ARCHIVE_TIMEOUT} s): {lost_rows} of {last_id} rows \
         lost, the last {lost_secs:.1} s of commits (rate {:.1}/s); restore took {:.0} s after the kill",
        last_id as f64 / 40.0,
        killed_at.elapsed().as_secs_f64()
    );
    // Loose (a loaded CI box): the tip's interval is 1 s.
    assert!(lost_secs <= 10.0, "lost {lost_secs:.1} s of commits with the WAL tip on");
    assert!(out.contains("served from the WAL tip"), "{out}");
    drop(a);
}

fn subjects(ses: &Moto, needle: &str) -> usize {
    ses.sent_emails().unwrap().into_iter().filter(|e| e.subject.contains(needle)).count()
}

fn ready_files(b: &LabBox) -> usize {
    b.sh_ok("ls /var/lib/postgresql/15/main/pg_wal/archive_status | grep -c '\\.ready$' || true")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// S3 down for a while: archiving stops acknowledging, one email says so, and when S3 is back
/// everything is archived, nothing skipped. The daemon SIGKILLed while it drains the backlog:
/// systemd restarts it and nothing is skipped either. A segment with other content under an
/// archived name: refused, not overwritten, one email.
#[test]
fn an_outage_a_killed_daemon_and_a_conflict_skip_nothing_and_alert_once_each() {
    let b = LabBox::start("pitr-faults", BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let ns = std::fs::File::open(format!("/proc/{}/ns/net", moto.pid())).unwrap();
    let proxy = Proxy::across(std::path::Path::new(&format!("/proc/{}/ns/net", b.pid1())), ns, moto.port());
    let ses = b.ses().expect("moto for SES");
    let identity = age::x25519::Identity::generate();
    configure(
        &b,
        &format!("http://127.0.0.1:{}", proxy.port),
        &identity,
        "archive-timeout = \"10s\"\nwal-backlog-alert = 3\nwal-lag-alert = \"5s\"",
    );
    b.sh_ok(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc 'create table rows(id serial primary key, pad text)' && \
         runuser -u postgres -- psql -qc \"alter system set wal_keep_size = '1GB'\" -c 'select pg_reload_conf()'",
    );
    start_caretaker(&b);
    run_ok(&b, "caretaker backup now --kind base");
    let segment = |b: &LabBox| {
        psql(b, "insert into rows(pad) select repeat('x', 100) from generate_series(1, 1000)");
        psql(b, "select pg_switch_wal()");
    };

    proxy.set(caretaker_testkit::proxy::DOWN);
    for _ in 0..5 {
        segment(&b);
    }
    wait_until(
        "one email about the backlog",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || subjects(&ses, "WAL archiving is behind") == 1,
        || format!("{} ready; {}", ready_files(&b), b.journal("caretaker.service")),
    );
    assert!(ready_files(&b) >= 3);
    let status = run_ok(&b, "caretaker status");
    assert!(status.contains("waiting"), "{status}");
    std::thread::sleep(Duration::from_secs(35));
    assert_eq!(subjects(&ses, "WAL archiving is behind"), 1, "one email while the outage lasts");

    // S3 back; the daemon killed while it drains the backlog.
    proxy.set(caretaker_testkit::proxy::UP);
    for _ in 0..3 {
        segment(&b);
    }
    b.sh_ok("systemctl kill --kill-whom=main -s KILL caretaker.service");
    wait_until(
        "the backlog archived after the restart",
        Duration::from_secs(180),
        Duration::from_secs(1),
        || ready_files(&b) == 0,
        || b.journal("caretaker.service"),
    );
    // Every segment from the base backup's on is there: no gap.
    let last = psql(&b, "select last_archived_wal from pg_stat_archiver");
    let keys = s3_keys(&moto, "caretaker/wal/0000000100000000");
    let first = 2u64;
    let last_n = u64::from_str_radix(&last[16..], 16).unwrap();
    for n in first..=last_n {
        let name = format!("0000000100000000{n:08X}");
        assert!(keys.contains(&format!("caretaker/wal/{name}.zst.age")), "{name} missing: {keys}");
    }
    wait_until(
        "the backlog alert resolved",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || !run_ok(&b, "caretaker status --json").contains("wal:backlog"),
        String::new,
    );

    // Other content under an archived name: refused, the archived object unchanged, one email.
    let key = format!("/backups/caretaker/wal/{last}.zst.age");
    let before = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().body;
    let out = b.sh(&format!(
        "cp /var/lib/postgresql/15/main/pg_wal/{last} /var/tmp/{last} && \
         printf 'X' | dd of=/var/tmp/{last} bs=1 seek=1048576 conv=notrunc 2>/dev/null && \
         chown postgres /var/tmp/{last} && runuser -u postgres -- caretaker wal push /var/tmp/{last}"
    ));
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not overwritten"), "{out:?}");
    assert_eq!(moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().body, before);
    wait_until(
        "one conflict email",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || subjects(&ses, "WAL archive conflict") == 1,
        || b.journal("caretaker.service"),
    );
}
