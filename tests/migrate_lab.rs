//! `caretaker migrate` in a lab box: the source is a second PostgreSQL cluster in the same box
//! (port 5433, password authentication over TCP, PostGIS data), its connection string in an SSM
//! SecureString on moto or in a root-only file. The copy must be proven equal to the source before
//! it may replace the live database.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;

const URL: &str = "postgres://migrator:m1gr8-pw@127.0.0.1:5433/zsrc";

fn psql(b: &LabBox, port: u16, db: &str, sql: &str) -> String {
    b.sh_ok(&format!("runuser -u postgres -- psql -p {port} -d {db} -Atc \"{sql}\"")).trim().to_string()
}

fn databases(b: &LabBox) -> String {
    psql(b, 5432, "postgres", "select string_agg(datname, ' ' order by datname) from pg_database")
}

fn fingerprint(b: &LabBox, port: u16, db: &str) -> String {
    psql(b, port, db, "select count(*) || ' ' || md5(string_agg(c::text, ',' order by id)) from cities c")
}

/// The box: live postgres with its own `zmanim`, a source cluster on 5433 with `rows` cities.
fn rig(prefix: &str, rows: u32) -> (LabBox, Moto) {
    let b = LabBox::start(prefix, BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto.put_parameter("us-east-1", "/zmanim/prod/migrate-source", URL, true).unwrap();
    let config = format!(
        "[aws]\nregion = \"us-east-1\"\nssm-endpoint = \"{}\"\n[backup]\ndatabase = \"zmanim\"\n",
        moto.endpoint()
    );
    b.write_file("/etc/caretaker/caretaker.d/50-migrate.toml", config.as_bytes(), 0o644).unwrap();
    b.set_unit_env("caretaker.service", &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")])
        .unwrap();
    b.sh_ok(&format!(
        "pg_createcluster 15 src --port 5433 --start >/dev/null && \
         runuser -u postgres -- psql -p 5433 -qc \"create role migrator login password 'm1gr8-pw'\" && \
         runuser -u postgres -- psql -p 5433 -qc 'create database zsrc owner migrator' && \
         runuser -u postgres -- psql -p 5433 -d zsrc -qc \"create extension postgis; set role migrator; \
           create table cities(id int primary key, name text, loc geometry(Point, 4326)); \
           insert into cities select g, 'city ' || g, st_setsrid(st_makepoint(g % 180, g % 90), 4326) from generate_series(1, {rows}) g; \
           update cities set loc = null where id % 10 = 0; \
           create table zones(name text, area geometry(Polygon, 4326)); \
           insert into zones values ('ok', 'SRID=4326;POLYGON((0 0,1 0,1 1,0 1,0 0))'), ('bowtie', 'SRID=4326;POLYGON((0 0,1 1,1 0,0 1,0 0))'); \
           create table notes(body text); insert into notes values ('no primary key here')\" && \
         runuser -u postgres -- psql -qc 'create database zmanim' && \
         runuser -u postgres -- psql -d zmanim -qc 'create table cities(id int primary key, name text); insert into cities values (1, $$old$$)' && \
         mkdir -p /run/caretaker && printf '%s\\n' '{URL}' > /run/caretaker/migrate-source.url && chmod 600 /run/caretaker/migrate-source.url && \
         systemctl daemon-reload && systemctl start zmanim-api.service caretaker.service"
    ));
    (b, moto)
}

#[test]
fn a_migration_from_a_second_cluster_reports_all_ok_then_swaps_the_copy_in() {
    let (b, _moto) = rig("mg-ok", 2000);
    let source = fingerprint(&b, 5433, "zsrc");

    let out = b.sh("caretaker migrate --source-ssm-param /zmanim/prod/migrate-source");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    for line in [
        "public.cities rows",
        "public.cities checksum",
        "public.cities.loc geometries",
        "public.zones.area geometries",
        "public.notes rows",
    ] {
        let l =
            stdout.lines().find(|l| l.contains(line)).unwrap_or_else(|| panic!("no `{line}` in the report: {stdout}"));
        assert!(l.ends_with("[OK]"), "{l}");
    }
    assert!(stdout.contains("1800 non-null, 1800 valid"), "geometries counted: {stdout}");
    assert!(stdout.contains("2 non-null, 1 valid"), "the invalid bowtie is counted as such on both sides: {stdout}");
    assert!(
        !stdout.contains("m1gr8-pw") && !b.journal("caretaker.service").contains("m1gr8-pw"),
        "the password never shows"
    );
    assert!(stdout.contains("not swapped"), "{stdout}");
    assert_eq!(psql(&b, 5432, "zmanim", "select name from cities"), "old", "without --swap the live database stays");
    let report = b.sh_ok("cat /var/lib/caretaker/migrate-*.json");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["ok"], true);

    let out = b.sh("caretaker migrate --source-url-file /run/caretaker/migrate-source.url --swap");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", b.journal("caretaker.service"));
    assert_eq!(fingerprint(&b, 5432, "zmanim"), source, "the live database is now the source's copy");
    let dbs = databases(&b);
    assert!(dbs.contains("zmanim_pre_restore_"), "the old live database is kept: {dbs}");
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active");
}

#[test]
fn a_source_changed_after_the_dump_is_a_mismatch_and_nothing_is_swapped() {
    let (b, _moto) = rig("mg-bad", 300_000);
    b.sh_ok("systemd-run --unit=mg-cli --collect -p StandardOutput=file:/run/mg.out caretaker migrate --source-url-file /run/caretaker/migrate-source.url --swap");
    let end = Instant::now() + Duration::from_secs(60);
    while !databases(&b).contains("zmanim_migrate_") {
        assert!(Instant::now() < end, "no copy started: {}", b.journal("caretaker.service"));
        std::thread::sleep(Duration::from_millis(30));
    }
    // The snapshot is exported before the copy database exists: this write is not in the dump.
    psql(&b, 5433, "zsrc", "update cities set name = 'changed' where id = 7");
    let end = Instant::now() + Duration::from_secs(120);
    while b.sh_ok("systemctl is-active mg-cli.service || true").trim() == "active" {
        assert!(Instant::now() < end, "the migration never ended");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = b.sh_ok("cat /run/mg.out");
    assert!(out.contains("MISMATCH") && out.contains("public.cities checksum"), "{out}");
    assert!(out.contains("FAILED") && out.contains("nothing was swapped"), "{out}");
    assert_eq!(psql(&b, 5432, "zmanim", "select name from cities"), "old", "the live database is untouched");
    assert!(
        b.sh_ok("systemctl show -p Result --value mg-cli.service || true").trim() != "success"
            || out.contains("FAILED")
    );
}

#[test]
fn a_source_file_readable_by_others_is_refused() {
    let (b, _moto) = rig("mg-perm", 10);
    b.sh_ok("chmod 644 /run/caretaker/migrate-source.url");
    let out = b.sh("caretaker migrate --source-url-file /run/caretaker/migrate-source.url");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("mode 0600"), "{stdout}");
    let out = b.sh("caretaker migrate");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_function_planted_in_the_source_does_not_run_as_superuser_while_the_copy_loads() {
    let (b, _moto) = rig("mg-plant", 10);
    // The source's owner (no superuser there) plants a CHECK calling a function that runs a shell
    // command in any database but its own.
    b.sh_ok(
        "runuser -u postgres -- psql -p 5433 -d zsrc -qc \"set role migrator; \
         create function public.pwn(int) returns boolean language plpgsql as \\$f\\$ begin \
           if current_database() <> 'zsrc' then \
             execute 'copy (select 1) to program ''touch /var/lib/postgresql/pwned'''; end if; return true; end \\$f\\$; \
         create table planted(x int check (public.pwn(x))); insert into planted values (1)\"",
    );
    let out = b.sh("caretaker migrate --source-url-file /run/caretaker/migrate-source.url");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !b.sh("test -e /var/lib/postgresql/pwned").status.success(),
        "the planted function ran as a superuser: {stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("pg_restore failed"), "{stdout}");
    assert!(!databases(&b).contains("zmanim_migrate_"), "the failed copy is dropped: {}", databases(&b));
    assert_eq!(psql(&b, 5432, "zmanim", "select name from cities"), "old");
}
