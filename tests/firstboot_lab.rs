//! `caretaker firstboot` in lab boxes with loop devices as EBS volumes, the IMDSv2 fake and moto's
//! SSM, all inside the box's private network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use caretaker_testkit::lab::{BoxImds, BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;

const IMDS_PORT: u16 = 1338;
const SECRET_CLERK: &str = "sk_live_9f8e7d6c5b4a";
const SECRET_DB: &str = "p4ss\"w$rd`x";

/// A booted box with one loop volume of `size` (backing file prepared by `prep`), the fakes, and
/// a caretaker config pointing at them.
struct Rig {
    b: LabBox,
    dev: String,
    img: PathBuf,
    _dir: tempfile::TempDir,
    _imds: BoxImds,
    _moto: Moto,
}

fn rig(prefix: &str, size: &str, prep: impl FnOnce(&Path)) -> Rig {
    rig_with(prefix, size, prep, None)
}

fn rig_with(prefix: &str, size: &str, prep: impl FnOnce(&Path), device_override: Option<&str>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.img");
    let out = Command::new("truncate").args(["-s", size]).arg(&img).output().unwrap();
    assert!(out.status.success());
    prep(&img);
    let b = LabBox::start(
        prefix,
        BoxOptions { volumes: vec![(img.clone(), size.into())], services: false, dropins: true, ..Default::default() },
    )
    .expect("lab box boots");
    let dev = b.volumes()[0].display().to_string();
    let imds = BoxImds::start(&b, IMDS_PORT);
    let moto = Moto::start_in_netns(b.pid1()).expect("moto in the box's network");
    moto.put_parameter("eu-west-1", "/zmanim/prod/clerk-secret-key", SECRET_CLERK, true).unwrap();
    moto.put_parameter("eu-west-1", "/zmanim/prod/db-password", SECRET_DB, true).unwrap();
    moto.put_parameter("eu-west-1", "/zmanim/prod/config", "LOG_LEVEL=info\nFEATURE_X=on\n", false).unwrap();
    let config = format!(
        r#"[aws]
region = "eu-west-1"
imds-endpoint = "http://127.0.0.1:{IMDS_PORT}"
imds-deadline = "5s"
ssm-endpoint = "{}"

[volume]
device = "{}"
attach-timeout = "2s"

[services.postgres]
initdb = "/usr/lib/postgresql/15/bin/initdb"
"#,
        moto.endpoint(),
        device_override.unwrap_or(&dev)
    );
    b.write_file("/etc/caretaker/caretaker.toml", config.as_bytes(), 0o644).unwrap();
    b.write_file(
        "/etc/systemd/system/caretaker-firstboot.service.d/50-lab.conf",
        b"[Service]\nEnvironment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n",
        0o644,
    )
    .unwrap();
    // Debian's generator makes postgresql.service want the host-style cluster; the lab's
    // postgresql.service runs the one on /data instead.
    b.sh_ok("systemctl mask --runtime postgresql@15-main.service && systemctl daemon-reload");
    Rig { b, dev, img, _dir: dir, _imds: imds, _moto: moto }
}

impl Rig {
    fn firstboot(&self) -> Output {
        self.b.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker firstboot")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha_head(img: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(img).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    use std::io::Read;
    let n = f.read(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn a_blank_volume_is_formatted_mounted_marked_and_initialised_and_a_second_run_changes_nothing() {
    let r = rig("fb-blank", "512M", |_| {});
    let out = r.firstboot();
    assert!(out.status.success(), "firstboot: {}\n{}", text(&out.stdout), text(&out.stderr));
    let b = &r.b;
    assert_eq!(b.sh_ok("findmnt -n -o FSTYPE /data").trim(), "xfs");
    assert_eq!(b.sh_ok("findmnt -n -o SOURCE /data").trim(), r.dev);
    assert_eq!(b.sh_ok(&format!("blkid -o value -s LABEL {}", r.dev)).trim(), "caretaker", "XFS labels hold 12 bytes");
    let marker: serde_json::Value = serde_json::from_str(&b.sh_ok("cat /data/.caretaker-volume")).unwrap();
    assert_eq!(marker["instances"][0], "i-0123456789abcdef0");
    assert!(b.sh("test -f /data/postgres/PG_VERSION").status.success(), "initdb ran");
    assert_eq!(b.sh_ok("stat -c %U:%a /data/postgres").trim(), "postgres:700");
    assert_eq!(b.sh_ok("stat -c %U /data/redis").trim(), "redis");
    // PostgreSQL (the lab's stand-in for Amazon Linux's unit, on /data) starts after firstboot.
    let pg = b.sh("systemctl start postgresql.service");
    assert!(
        pg.status.success(),
        "postgres: {}",
        b.sh_ok("journalctl --no-pager -n 30 -u postgresql.service -u caretaker-firstboot.service")
    );
    assert_eq!(b.sh_ok("runuser -u postgres -- psql -Atc 'show data_directory'").trim(), "/data/postgres");
    let journal = b.sh_ok("journalctl --no-pager -o verbose");
    assert!(journal.contains("firstboot complete"), "firstboot ran as a unit too");
    for secret in [SECRET_CLERK, SECRET_DB, "p4ss"] {
        assert!(!journal.contains(secret), "a secret value reached the journal");
    }
    assert!(b.sh_ok("cat /run/caretaker/instance.env").contains("INSTANCE_ID=i-0123456789abcdef0"));
    let env = b.sh_ok("cat /run/caretaker/env/zmanim-api.env");
    assert!(env.contains("CLERK_SECRET_KEY=") && env.contains(SECRET_CLERK), "{env}");
    assert!(env.contains("LOG_LEVEL="), "expanded config parameter: {env}");
    assert_eq!(b.sh_ok("stat -c %a /run/caretaker/env/zmanim-api.env").trim(), "600");
    for secret in [SECRET_CLERK, "p4ss"] {
        assert!(!text(&out.stdout).contains(secret) && !text(&out.stderr).contains(secret), "secret in output");
    }

    let stamp = "stat -c %Y.%i /data/.caretaker-volume /run/caretaker/env/zmanim-api.env /run/caretaker/instance.env";
    let uuid = b.sh_ok(&format!("blkid -o value -s UUID {}", r.dev));
    let before = b.sh_ok(stamp);
    std::thread::sleep(Duration::from_millis(1100));
    let again = r.firstboot();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("already mounted"), "{}", text(&again.stdout));
    assert_eq!(b.sh_ok(stamp), before, "a second run rewrote files");
    assert_eq!(b.sh_ok(&format!("blkid -o value -s UUID {}", r.dev)), uuid);
}

#[test]
fn an_existing_filesystem_is_mounted_as_it_is_never_reformatted_and_only_owners_are_fixed() {
    // A volume written by an older image, whose service users had other uids.
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("precious.txt"), "keep me\n").unwrap();
    let pg = files.path().join("postgres");
    std::fs::create_dir_all(&pg).unwrap();
    std::fs::write(pg.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(pg.join("postgresql.auto.conf"), "# from the old image\n").unwrap();
    std::fs::create_dir_all(files.path().join("redis")).unwrap();
    std::fs::write(files.path().join("redis/dump.rdb"), "REDIS0011").unwrap();
    let out =
        Command::new("chown").args(["-R", "4242:4242"]).arg(&pg).arg(files.path().join("redis")).output().unwrap();
    assert!(out.status.success());
    let src = files.path().to_path_buf();
    let r = rig("fb-ext4", "256M", move |img| {
        let out = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&src).arg(img).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    });
    let uuid = r.b.sh_ok(&format!("blkid -o value -s UUID {}", r.dev));
    let out = r.firstboot();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let b = &r.b;
    assert_eq!(b.sh_ok("findmnt -n -o FSTYPE /data").trim(), "ext4");
    assert_eq!(b.sh_ok("cat /data/precious.txt"), "keep me\n");
    assert_eq!(b.sh_ok(&format!("blkid -o value -s UUID {}", r.dev)), uuid, "filesystem UUID changed");
    // Owners follow this image's users; contents are untouched and initdb did not run.
    assert_eq!(
        b.sh_ok("stat -c %U /data/postgres /data/postgres/PG_VERSION /data/redis/dump.rdb")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["postgres", "postgres", "redis"]
    );
    assert_eq!(b.sh_ok("cat /data/postgres/postgresql.auto.conf"), "# from the old image\n");
    assert_eq!(b.sh_ok("ls /data/postgres | wc -l").trim(), "2", "initdb must not touch a non-empty data directory");
    assert!(text(&out.stdout).contains("2 re-owned"), "{}", text(&out.stdout));
}

fn assert_refused(prefix: &str, prep: impl FnOnce(&Path), needle: &str) {
    let r = rig(prefix, "256M", prep);
    let head = sha_head(&r.img);
    // Through systemd, as at boot: the API (and postgres) require firstboot, so they must not start.
    let start = r.b.sh("systemctl start zmanim-api.service");
    assert!(!start.status.success(), "the API started although firstboot failed");
    assert_eq!(r.b.sh_ok("systemctl show -P ActiveState zmanim-api.service").trim(), "inactive");
    assert_eq!(r.b.sh_ok("systemctl show -P ActiveState caretaker-firstboot.service").trim(), "failed");
    let journal = r.b.journal("caretaker-firstboot.service");
    assert!(journal.contains(&r.dev) && journal.contains(needle), "journal lacks device/cause:\n{journal}");
    assert!(!r.b.sh("mountpoint -q /data").status.success(), "/data is mounted");
    assert!(!r.b.sh("systemctl start postgresql.service").status.success(), "postgres started");

    let out = r.firstboot();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("refusing to use"), "{}", text(&out.stderr));
    assert_eq!(sha_head(&r.img), head, "the device was written to");
}

#[test]
fn a_partition_table_is_refused() {
    assert_refused(
        "fb-gpt",
        |img| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("echo 'label: gpt' | sfdisk -q {}", img.display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        },
        "gpt",
    );
}

/// Writes `bytes` at `offset` of the image file `img`.
fn write_at(img: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn a_luks_header_is_refused() {
    assert_refused(
        "fb-luks",
        |img| {
            let mut hdr = b"LUKS\xba\xbe\x00\x01aes\0\0\0\0".to_vec();
            hdr.resize(592, 0);
            write_at(img, 0, &hdr);
        },
        "LUKS",
    );
}

#[test]
fn unrecognised_data_without_a_signature_is_refused() {
    assert_refused(
        "fb-junk",
        |img| {
            write_at(img, 200_000, &[0x5a; 4096]);
        },
        "non-zero data",
    );
}

#[test]
fn a_missing_volume_is_refused_after_the_timeout_and_nothing_starts() {
    let r = rig_with("fb-missing", "64M", |_| {}, Some("/dev/loop250"));
    let out = r.firstboot();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no data volume matching /dev/loop250") && err.contains("Nothing was started"), "{err}");
    assert!(!r.b.sh("systemctl start zmanim-api.service").status.success());
    assert!(!r.b.sh("mountpoint -q /data").status.success());
}

#[test]
fn a_grown_volume_is_grown_on_the_next_run() {
    let r = rig("fb-grow", "300M", |_| {});
    assert!(r.firstboot().status.success());
    let size = |b: &LabBox| b.sh_ok("df --output=size -B1M /data | tail -1").trim().parse::<u64>().unwrap();
    let before = size(&r.b);
    let out = Command::new("truncate").args(["-s", "600M"]).arg(&r.img).output().unwrap();
    assert!(out.status.success());
    let out = Command::new("losetup").args(["-c", &r.dev]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let again = r.firstboot();
    assert!(again.status.success(), "{}", text(&again.stderr));
    let after = size(&r.b);
    assert!(after > before + 200, "not grown: {before} → {after} MiB");
}

#[test]
fn a_format_interrupted_by_a_crash_is_completed_by_the_next_run() {
    // The previous run proved the device blank, recorded its intent, and was killed inside mkfs
    // after the superblock magic was written; it also left a temporary env file behind.
    let r = rig("fb-intr", "512M", |img| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all(b"XFSB\0\0\x10\0half-made").unwrap();
    });
    let (maj, min) = {
        let out = r.b.sh_ok(&format!("stat -c '%t %T' {}", r.dev));
        let mut it = out.split_whitespace().map(|h| u64::from_str_radix(h, 16).unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    let rdev = nix::sys::stat::makedev(maj, min);
    let size: u64 = r.b.sh_ok(&format!("blockdev --getsize64 {}", r.dev)).trim().parse().unwrap();
    let intent = serde_json::json!({
        "device": r.dev, "rdev": rdev, "started_at": "2026-11-22T03:00:00Z", "volume_id": null, "size": size
    });
    r.b.write_file("/var/lib/caretaker/format-intent.json", intent.to_string().as_bytes(), 0o600).unwrap();
    r.b.write_file("/run/caretaker/env/.zmanim-api.env.tmp-999999", b"half", 0o600).unwrap();

    let out = r.firstboot();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted while formatting"), "{}", text(&out.stderr));
    assert_eq!(r.b.sh_ok("findmnt -n -o FSTYPE /data").trim(), "xfs");
    assert!(!r.b.sh("test -e /var/lib/caretaker/format-intent.json").status.success(), "intent cleared");
    assert!(!r.b.sh("test -e /run/caretaker/env/.zmanim-api.env.tmp-999999").status.success(), "stale temp removed");

    // Without the intent, the same half-made device is refused: nobody else's data is formatted.
    let other = rig("fb-nointr", "256M", |img| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all(b"XFSB\0\0\x10\0half-made").unwrap();
    });
    let out = other.firstboot();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("refusing to use"), "{}", text(&out.stderr));
}
