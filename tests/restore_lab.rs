//! `caretaker restore` in lab boxes: real PostgreSQL (with PostGIS) and Redis, the API under
//! systemd, backups in moto's S3. The live data must never be at risk: a restore builds a new
//! copy, verifies it, and only then swaps; a damaged backup or a killed daemon changes nothing.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::wait_until;

/// postgres + redis + the API running, caretaker backing up to moto for an age recipient whose
/// identity is in the env file, and `rows` cities (with PostGIS points) in database zmanim.
/// The key that seals the rig's manifests (a test that changes a manifest seals it again).
const SEAL_KEY: &str = "0123456789abcdef0123456789abcdef-restore";

fn rig(prefix: &str, rows: u32) -> (LabBox, Moto) {
    let b = LabBox::start(prefix, BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.create_bucket("backups").unwrap();
    let identity = age::x25519::Identity::generate();
    let release = "[release]\nhealth-gate-consecutive = 2\nhealth-gate-timeout = \"10s\"\n\
                   [services.redis]\ndata-dir = \"/var/lib/redis\"\n";
    b.configure_backups(&moto.endpoint(), Some(&identity.to_public().to_string()), release).unwrap();
    use age::secrecy::ExposeSecret;
    let env = format!("BACKUP_AGE_IDENTITY=\"{}\"\nBACKUP_SEAL_KEY={SEAL_KEY}\n", identity.to_string().expose_secret());
    b.write_file("/run/caretaker/env/caretaker.env", env.as_bytes(), 0o600).unwrap();
    b.sh_ok(&format!(
        "runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc \"create extension postgis; \
           create table cities(id int primary key, name text, loc geometry(Point, 4326)); \
           insert into cities select g, 'city ' || g, st_setsrid(st_makepoint(g % 180, g % 90), 4326) from generate_series(1, {rows}) g\" && \
         redis-cli set a 1 >/dev/null && redis-cli set b 2 >/dev/null && \
         systemctl daemon-reload && systemctl start zmanim-api.service caretaker.service"
    ));
    (b, moto)
}

fn psql(b: &LabBox, db: &str, sql: &str) -> String {
    b.sh_ok(&format!("runuser -u postgres -- psql -d {db} -Atc \"{sql}\"")).trim().to_string()
}

/// Row count and an order-independent checksum of the table's content, ordered by primary key.
fn fingerprint(b: &LabBox, db: &str) -> String {
    psql(b, db, "select count(*) || ' ' || md5(string_agg(c::text, ',' order by id)) from cities c")
}

fn databases(b: &LabBox) -> String {
    psql(b, "postgres", "select string_agg(datname, ' ' order by datname) from pg_database")
}

fn backup(b: &LabBox) {
    let out = b.sh("caretaker backup now");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn restoring_the_latest_backup_after_rows_were_deleted_brings_them_back_and_keeps_the_old_database() {
    let (b, _moto) = rig("rs-pg", 3000);
    let before = fingerprint(&b, "zmanim");
    backup(&b);
    psql(&b, "zmanim", "delete from cities where id % 3 = 0");
    assert_ne!(fingerprint(&b, "zmanim"), before);

    let out = b.sh("caretaker restore postgres");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    for phase in ["restore:", "verify:", "swap:"] {
        assert!(stdout.contains(phase), "progress names the phase {phase}: {stdout}");
    }
    assert_eq!(fingerprint(&b, "zmanim"), before, "the live database equals the backup");
    let dbs = databases(&b);
    let kept = dbs.split(' ').find(|d| d.starts_with("zmanim_pre_restore_")).expect("old database kept").to_string();
    assert_eq!(psql(&b, &kept, "select count(*) from cities"), "2000", "the kept copy is the one before the restore");
    assert!(!dbs.contains("zmanim_restore_"), "{dbs}");
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active");
    assert_eq!(psql(&b, "zmanim", "select count(*) from cities where st_isvalid(loc)"), "3000");
    // pg_restore ran as caretaker_restore; everything it made now belongs to the live database's owner.
    assert_eq!(psql(&b, "zmanim", "select tableowner from pg_tables where tablename = 'cities'"), "postgres");
    assert_eq!(
        psql(&b, "postgres", "select pg_get_userbyid(datdba) from pg_database where datname = 'zmanim'"),
        "postgres"
    );
    let owned =
        "select count(*) from pg_class where relowner = (select oid from pg_roles where rolname = 'caretaker_restore')";
    assert_eq!(psql(&b, "zmanim", owned), "0");
    assert_eq!(
        psql(&b, "postgres", "select rolsuper::text from pg_roles where rolname = 'caretaker_restore'"),
        "false"
    );

    let listed = b.sh_ok("caretaker restore list-kept");
    assert!(listed.contains(&kept), "{listed}");
    let out = b.sh("caretaker restore drop-kept zmanim");
    assert_eq!(out.status.code(), Some(1), "only kept databases can be dropped: {out:?}");
    b.sh_ok(&format!("caretaker restore drop-kept {kept}"));
    assert!(!databases(&b).contains(&kept));
}

#[test]
fn a_backup_altered_by_one_byte_is_refused_during_the_stream_and_the_live_data_is_unchanged() {
    let (b, moto) = rig("rs-bad", 3000);
    backup(&b);
    psql(&b, "zmanim", "delete from cities where id > 100");
    let live = fingerprint(&b, "zmanim");
    let id = &b.backup_ids("postgres")[0];
    let key = format!("/backups/caretaker/postgres/{}/{}/{}/{id}/data.zst.age", &id[0..4], &id[4..6], &id[6..8]);
    let mut obj = moto.request("GET", &key, &[Moto::s3_auth()], b"").unwrap().body;
    let at = obj.len() * 2 / 3;
    obj[at] ^= 0x40;
    assert_eq!(moto.request("PUT", &key, &[Moto::s3_auth()], &obj).unwrap().status, 200);

    let out = b.sh("caretaker restore postgres --backup latest");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("damaged or was altered") && stdout.contains("unchanged"), "{stdout}");
    assert!(!stdout.contains("swap:"), "nothing was swapped: {stdout}");
    assert_eq!(fingerprint(&b, "zmanim"), live);
    let dbs = databases(&b);
    assert!(!dbs.contains("_restore_"), "the new database is dropped: {dbs}");
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active", "the API was never stopped");
}

#[test]
fn a_daemon_killed_mid_restore_leaves_the_live_database_alone_and_the_leftover_is_dropped_at_start() {
    let (b, _moto) = rig("rs-kill", 400_000);
    backup(&b);
    psql(&b, "zmanim", "delete from cities where id > 10");
    let live = fingerprint(&b, "zmanim");
    b.sh_ok("systemd-run --unit=rs-kill-cli --collect caretaker restore postgres");
    wait_until(
        "the restore never created its database",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || databases(&b).contains("zmanim_restore_"),
        || b.journal("caretaker.service"),
    );
    b.sh_ok("kill -KILL $(systemctl show -p MainPID --value caretaker.service)");
    assert_eq!(fingerprint(&b, "zmanim"), live, "the live database is untouched");
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active");
    // systemd restarts caretaker (Restart=on-failure, 5 s); it drops the leftover.
    wait_until(
        "leftover not dropped",
        Duration::from_secs(45),
        Duration::from_millis(500),
        || !databases(&b).contains("zmanim_restore_"),
        || format!("{}\n{}", databases(&b), b.journal("caretaker.service")),
    );
    assert_eq!(fingerprint(&b, "zmanim"), live);
    assert!(b.journal("caretaker.service").contains("left by an interrupted restore"));
}

#[test]
fn a_redis_restore_brings_back_the_keys_of_the_backup_and_keeps_the_old_rdb() {
    let (b, _moto) = rig("rs-redis", 10);
    let out = b.sh("caretaker backup now --kind redis");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    b.sh_ok("redis-cli flushall >/dev/null && redis-cli set c 3 >/dev/null && redis-cli set d 4 >/dev/null && redis-cli set e 5 >/dev/null");

    let out = b.sh("caretaker restore redis");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    assert_eq!(b.sh_ok("redis-cli --no-raw get a").trim(), "\"1\"");
    assert_eq!(b.sh_ok("redis-cli dbsize").trim(), "2");
    assert_eq!(b.sh_ok("redis-cli exists c").trim(), "0");
    let kept = b.sh_ok("ls /var/lib/redis");
    assert!(kept.contains("dump.rdb.pre-restore-"), "{kept}");
}

#[test]
fn the_restore_document_runs_a_redis_restore_and_rejects_bad_parameters() {
    let doc = caretaker_testkit::ssmdoc::Document::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/ssm/caretaker-restore.json"),
    )
    .unwrap();
    for bad in [
        vec![("Kind", "mysql")],
        vec![("Kind", "postgres"), ("Backup", "latest; rm -rf /")],
        vec![("Kind", "postgres"), ("TargetDb", "zmanim'; drop")],
        vec![("Kind", "postgres"), ("Backup", "$(id)")],
    ] {
        assert!(doc.render(&bad).is_err(), "{bad:?} must be rejected");
    }
    let (b, _moto) = rig("rs-doc", 10);
    let out = b.sh("caretaker backup now --kind redis");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    b.sh_ok("redis-cli set z 26 >/dev/null");
    let script = doc.render(&[("Kind", "redis")]).unwrap();
    let out = caretaker_testkit::ssmdoc::run_script(b.command(&[] as &[&str]), &script).unwrap();
    let text = caretaker_testkit::ssmdoc::ssm_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.trim_end().lines().last().unwrap().starts_with("caretaker-restore: OK (redis latest)"), "{text}");
    assert_eq!(b.sh_ok("redis-cli exists z").trim(), "0", "the backup's keys, not the later ones");
}

#[test]
fn a_failed_redis_restore_puts_the_old_data_back() {
    let (b, moto) = rig("rs-redis-bad", 10);
    let out = b.sh("caretaker backup now --kind redis");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    b.sh_ok("redis-cli flushall >/dev/null && redis-cli set live 1 >/dev/null && redis-cli set keep 2 >/dev/null && redis-cli set me 3 >/dev/null");
    // The manifest now disagrees with what Redis will hold after loading the backup (2 keys).
    let list =
        b.sh_ok("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json --kind redis");
    let manifests: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let mut m = manifests[0].clone();
    let id = m["id"].as_str().unwrap().to_string();
    m["details"]["dbsize"] = serde_json::json!(999);
    // Sealed again with the box's key: a manifest caretaker wrote, that disagrees with its data.
    let resealed = caretaker::backup::seal::SealKeys::from_secrets([SEAL_KEY.as_bytes()]).seal(&m);
    let key = format!("/backups/caretaker/redis/{}/{}/{}/{id}/manifest.json", &id[0..4], &id[4..6], &id[6..8]);
    assert_eq!(moto.request("PUT", &key, &[Moto::s3_auth()], &resealed).unwrap().status, 200);

    let out = b.sh("caretaker restore redis");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("999") && stdout.contains("previous data is back"), "{stdout}");
    assert_eq!(b.sh_ok("redis-cli dbsize").trim(), "3", "the live keys are back");
    assert_eq!(b.sh_ok("redis-cli exists live").trim(), "1");
    assert_eq!(b.sh_ok("systemctl is-active redis-server.service").trim(), "active");
}

#[test]
fn a_restore_into_another_database_leaves_the_api_running_and_a_kill_leaves_nothing_behind() {
    let (b, _moto) = rig("rs-other", 400_000);
    backup(&b);
    let api_pid = || b.sh_ok("systemctl show -p MainPID --value zmanim-api.service").trim().to_string();
    let pid = api_pid();

    // PostgreSQL's own databases are never a target.
    for system in ["template1", "postgres", "template0"] {
        let out = b.sh(&format!("caretaker restore postgres --target-db {system}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_ne!(out.status.code(), Some(0), "{system}: {text}");
        assert!(text.contains("PostgreSQL's own databases"), "{system}: {text}");
    }

    // Nor a name so long that the names derived from it would pass PostgreSQL's 63 bytes.
    let long = "r".repeat(33);
    let out = b.sh(&format!("caretaker restore postgres --target-db {long}"));
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 32"), "{out:?}");

    // A daemon killed while restoring into `reports`: its `reports_restore_*` is dropped at the
    // next start, although `reports` is not the configured database.
    b.sh_ok("systemd-run --unit=rs-other-cli --collect caretaker restore postgres --target-db reports");
    wait_until(
        "the restore never created its database",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || databases(&b).contains("reports_restore_"),
        || b.journal("caretaker.service"),
    );
    b.sh_ok("kill -KILL $(systemctl show -p MainPID --value caretaker.service)");
    wait_until(
        "leftover not dropped",
        Duration::from_secs(45),
        Duration::from_millis(500),
        || !databases(&b).contains("reports_restore_"),
        || format!("{}\n{}", databases(&b), b.journal("caretaker.service")),
    );
    assert!(b.journal("caretaker.service").contains("left by an interrupted restore"));

    // The same restore, to its end: the API (whose database is zmanim) is never stopped.
    let end = Instant::now() + Duration::from_secs(30);
    while !b.sh("caretaker status").status.success() {
        assert!(Instant::now() < end, "the daemon did not come back");
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = b.sh("caretaker restore postgres --target-db reports");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    assert!(stdout.contains("the API keeps running"), "{stdout}");
    assert!(databases(&b).split(' ').any(|d| d == "reports"), "{}", databases(&b));
    assert_eq!(api_pid(), pid, "the API was not restarted");
}

#[test]
fn a_restore_without_room_is_refused_or_stopped_and_postgres_never_panics() {
    let (b, _moto) = rig("rs-room", 800_000);
    backup(&b);
    let live = fingerprint(&b, "zmanim");
    // Leave `keep_mib` free on the filesystem of PostgreSQL's data (the box's root) with `file`.
    let fill = |file: &str, keep_mib: u64| {
        b.sh_ok(&format!(
            "avail=$(df -B1 --output=avail /var/lib/postgresql | tail -1); \
             fallocate -l $((avail - {keep_mib} * 1048576)) /var/tmp/{file}"
        ));
    };

    // Up front: 300 MiB free is less than the new database (~117 MiB) + as much WAL + the reserve
    // (256 MiB).
    fill("filler", 300);
    let out = b.sh("caretaker restore postgres");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("not enough room") && stdout.contains("reserve") && stdout.contains("free"), "{stdout}");
    assert!(!stdout.contains("swap:"), "{stdout}");
    assert!(!databases(&b).contains("_restore_"), "nothing was created: {}", databases(&b));

    // While it runs: there was room at the start (WAL allowance 64 MB, ~117 MiB new database,
    // 256 MiB reserve, 800 MiB free), then something else takes it: 200 MiB are left.
    b.sh_ok("rm -f /var/tmp/filler");
    psql(&b, "postgres", "alter system set max_wal_size = '64MB'");
    psql(&b, "postgres", "select pg_reload_conf()");
    fill("filler", 800);
    b.sh_ok("systemd-run --unit=rs-room-cli --collect --property=StandardOutput=file:/var/tmp/rs-room.out caretaker restore postgres");
    wait_until(
        "the restore never created its database",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || databases(&b).contains("zmanim_restore_"),
        || b.journal("caretaker.service"),
    );
    fill("filler2", 200);
    let end = Instant::now() + Duration::from_secs(60);
    while b.sh("systemctl is-active rs-room-cli.service").status.success() {
        assert!(Instant::now() < end, "the restore did not stop: {}", b.journal("caretaker.service"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = b.sh_ok("cat /var/tmp/rs-room.out");
    b.sh_ok("rm -f /var/tmp/filler /var/tmp/filler2");
    assert!(out.contains("stopped: only"), "{out}");
    assert!(!out.contains("restored backup"), "{out}");
    // PostgreSQL stayed up the whole time, all rows there, no PANIC; the new database is gone.
    assert_eq!(fingerprint(&b, "zmanim"), live);
    assert!(!databases(&b).contains("_restore_"), "{}", databases(&b));
    let pg_log =
        b.sh_ok("journalctl -q --no-pager -u 'postgresql*' ; cat /var/log/postgresql/*.log 2>/dev/null || true");
    assert!(!pg_log.contains("PANIC") && !pg_log.contains("No space left"), "{pg_log}");
}

#[test]
fn links_the_redis_user_prepares_in_its_folder_never_make_root_write_elsewhere() {
    let (b, _moto) = rig("rs-link", 10);
    let out = b.sh("caretaker backup now --kind redis");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    b.sh_ok("printf precious > /var/lib/caretaker/victim && chmod 0600 /var/lib/caretaker/victim");
    // The redis user, owner of /var/lib/redis, points every download name of the next minute at a
    // root-owned file.
    b.sh_ok(
        "runuser -u redis -- sh -c 'for i in $(seq 0 60); do \
           ln -sf /var/lib/caretaker/victim /var/lib/redis/.dump.rdb.restore-$(date -u -d \"+$i sec\" +%Y%m%d_%H%M%S); \
         done'",
    );
    let out = b.sh("caretaker restore redis");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    assert_eq!(b.sh_ok("cat /var/lib/caretaker/victim"), "precious", "root wrote through a link");
    assert_eq!(b.sh_ok("stat -c %U:%a /var/lib/caretaker/victim").trim(), "root:600");

    // The RDB itself replaced by a link: refused, nothing followed.
    b.sh_ok(
        "mv /var/lib/redis/dump.rdb /var/lib/redis/real.rdb && ln -s /var/lib/caretaker/victim /var/lib/redis/dump.rdb",
    );
    let out = b.sh("caretaker restore redis");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("not a plain file"), "{stdout}");
    assert_eq!(b.sh_ok("cat /var/lib/caretaker/victim"), "precious");
}
