//! The lab itself: boxes boot with a running systemd and working services, and leave nothing
//! behind. Needs root; run with `cargo test -p caretaker-testkit --test lab_smoke`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox, require_root_and_tools};

/// What a box leaves on the host, to check after teardown.
struct Traces {
    name: String,
    state_dir: PathBuf,
    nspawn_pid: u32,
}

fn traces(b: &LabBox) -> Traces {
    Traces {
        name: b.name().to_string(),
        state_dir: b.state_dir(),
        nspawn_pid: b.nspawn_pid().expect("a running box has an nspawn.pid"),
    }
}

/// Alive and not a zombie (PID 1 here reaps orphans late).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(true),
        Err(_) => false,
    }
}

fn assert_gone(t: &Traces) {
    assert!(!t.state_dir.exists(), "{}: state dir {} still exists", t.name, t.state_dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = t.state_dir.to_str().unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m == dir || m.starts_with(&format!("{dir}/"))))
        .collect();
    assert!(left.is_empty(), "{}: mounts left behind:\n{}", t.name, left.join("\n"));
    assert!(!process_alive(t.nspawn_pid), "{}: systemd-nspawn (pid {}) still runs", t.name, t.nspawn_pid);
}

fn assert_system_running(b: &LabBox) {
    let out = b.exec(&["systemctl", "is-system-running"]);
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(state == "running" || state == "degraded", "{}: system state {state:?}", b.name());
}

fn losetup_lists(file: &Path) -> bool {
    let out = Command::new("losetup").arg("-a").output().expect("losetup -a");
    String::from_utf8_lossy(&out.stdout).contains(file.to_str().unwrap())
}

fn unit_state(b: &LabBox, unit: &str) -> String {
    let out = b.exec(&["systemctl", "show", "-p", "ActiveState", "--value", unit]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn box_boots_with_services_and_leaves_nothing() {
    require_root_and_tools().unwrap();
    let t0 = Instant::now();
    let b = LabBox::start("smoke", BoxOptions::default()).unwrap();
    eprintln!("{}: up in {:?}", b.name(), t0.elapsed());

    assert_system_running(&b);
    assert_eq!(b.sh_ok("su postgres -c \"psql -Atc 'select 1'\"").trim(), "1");
    assert_eq!(b.sh_ok("redis-cli ping").trim(), "PONG");
    assert_eq!(b.sh_ok("hostname").trim(), b.name());
    // The build and the units are in place (the binaries themselves may not be built yet).
    assert_eq!(b.sh_ok("readlink /usr/bin/caretaker").trim(), "/opt/target/debug/caretaker");
    assert_eq!(b.sh_ok("readlink /opt/zmanim/current").trim(), "releases/v1");
    assert!(b.sh_ok("systemctl cat zmanim-api.service").contains("/opt/zmanim/current/zmanim-api"));
    assert_eq!(unit_state(&b, "zmanim-api.service"), "inactive");

    // The box's system bus, from the host.
    let out = Command::new("busctl")
        .arg(format!("--address={}", b.bus_address()))
        .args([
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "SystemState",
        ])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "busctl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(reply.contains("running") || reply.contains("degraded"), "SystemState: {reply}");
    let ping = Command::new("busctl")
        .arg(format!("--address={}", b.bus_address()))
        .args(["call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.DBus.Peer", "Ping"])
        .output()
        .unwrap();
    assert!(ping.status.success(), "busctl Ping: {}", String::from_utf8_lossy(&ping.stderr));

    // Files written from the host land inside, through symlinks as the box resolves them.
    b.write_file("/var/run/lab-smoke/hello", b"hi\n", 0o640).unwrap();
    assert_eq!(b.sh_ok("stat -c '%a %s' /run/lab-smoke/hello").trim(), "640 3");

    // A host process in the box's network namespace sees the box's loopback only.
    let out = b.netns_command("redis-cli").arg("ping").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PONG");

    b.wait_unit_state("redis-server.service", "active", Duration::from_secs(5)).unwrap();

    let t = traces(&b);
    let t1 = Instant::now();
    drop(b);
    eprintln!("{}: down in {:?}", t.name, t1.elapsed());
    assert_gone(&t);
}

#[test]
fn volume_is_a_block_device_inside_and_detached_after() {
    require_root_and_tools().unwrap();
    let img = std::env::temp_dir().join(format!("lab-smoke-vol-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&img);
    let opts = BoxOptions { volumes: vec![(img.clone(), "64M".into())], services: false, ..Default::default() };
    let b = LabBox::start("vol", opts).unwrap();
    assert_eq!(b.volumes().len(), 1);
    let dev = b.volumes()[0].to_str().unwrap().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    b.sh_ok(&format!("test -b {dev}"));
    assert_eq!(b.sh_ok(&format!("blockdev --getsize64 {dev}")).trim(), (64u64 << 20).to_string());
    assert!(losetup_lists(&img));

    let t = traces(&b);
    b.down().unwrap();
    assert_gone(&t);
    assert!(!losetup_lists(&img), "{} is still attached", img.display());
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn two_boxes_boot_in_parallel() {
    require_root_and_tools().unwrap();
    let t0 = Instant::now();
    let boxes: Vec<LabBox> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2).map(|_| s.spawn(|| LabBox::start("pair", BoxOptions::default()))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    eprintln!("two boxes up in {:?}", t0.elapsed());
    assert_ne!(boxes[0].name(), boxes[1].name());
    for b in &boxes {
        assert_system_running(b);
        assert_eq!(b.sh_ok("redis-cli ping").trim(), "PONG");
        assert_eq!(b.sh_ok("su postgres -c \"psql -Atc 'select 1'\"").trim(), "1");
    }
    // Separate systems: a table made in one is not in the other.
    boxes[0].sh_ok("su postgres -c \"psql -Atc 'create table only_here(x int)'\"");
    let other = boxes[1]
        .sh_ok("su postgres -c \"psql -Atc \\\"select count(*) from pg_tables where tablename = 'only_here'\\\"\"");
    assert_eq!(other.trim(), "0");

    let left: Vec<Traces> = boxes.iter().map(traces).collect();
    std::thread::scope(|s| {
        for b in boxes {
            s.spawn(move || b.down().unwrap());
        }
    });
    for t in &left {
        assert_gone(t);
    }
}

#[test]
fn no_services_leaves_postgres_and_redis_stopped() {
    require_root_and_tools().unwrap();
    let b = LabBox::start("nosvc", BoxOptions { services: false, ..Default::default() }).unwrap();
    assert_system_running(&b);
    assert_eq!(unit_state(&b, "postgresql@15-main.service"), "inactive");
    assert_eq!(unit_state(&b, "redis-server.service"), "inactive");
    // The cluster is there and clean, ready to be started by the test.
    b.sh_ok("test -f /etc/postgresql/15/main/postgresql.conf");
    let t = traces(&b);
    drop(b);
    assert_gone(&t);
}
