//! The daemon's lifecycle under a real systemd, in lab boxes: READY, watchdog, SIGTERM, SIGHUP,
//! configuration errors, the D-Bus policy, and `caretaker status` from the host over the box's bus.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};

fn boot(prefix: &str) -> LabBox {
    caretaker_testkit::lab::require_root_and_tools().expect("the lab needs root and systemd-nspawn");
    LabBox::start(prefix, BoxOptions { services: false, ..Default::default() }).expect("lab box boots")
}

fn caretaker_on(b: &LabBox, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caretaker"))
        .arg("--bus-address")
        .arg(b.bus_address())
        .args(args)
        .env_remove("CARETAKER_CONFIG")
        .output()
        .expect("run caretaker")
}

fn prop(b: &LabBox, unit: &str, name: &str) -> String {
    b.sh_ok(&format!("systemctl show -P {name} {unit}")).trim().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `check` until it is true or `timeout` passes; returns whether it became true.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Installs a runtime drop-in for caretaker.service and reloads systemd.
fn dropin(b: &LabBox, name: &str, body: &str) {
    b.write_file(&format!("/run/systemd/system/caretaker.service.d/{name}.conf"), body.as_bytes(), 0o644)
        .expect("write drop-in");
    b.sh_ok("systemctl daemon-reload");
}

#[test]
fn becomes_active_only_through_ready_and_answers_status_from_the_host() {
    let b = boot("ready");

    let before = caretaker_on(&b, &["status"]);
    assert_eq!(before.status.code(), Some(3), "status before start: {before:?}");
    let err = text(&before.stderr);
    assert!(err.contains("not running") && err.contains("systemctl status caretaker"), "{err}");

    assert_eq!(prop(&b, "caretaker.service", "Type"), "notify");
    // For Type=notify, `systemctl start` returns only once READY=1 arrived.
    b.sh_ok("systemctl start caretaker.service");
    assert_eq!(prop(&b, "caretaker.service", "ActiveState"), "active");
    assert_eq!(prop(&b, "caretaker.service", "SubState"), "running");
    assert!(prop(&b, "caretaker.service", "StatusText").starts_with("running"), "STATUS= mirrors the state");

    let out = caretaker_on(&b, &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["daemon"]["state"], "running");
    assert_eq!(v["daemon"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["daemon"]["config_files"][0], "/etc/caretaker/caretaker.toml");

    let human = caretaker_on(&b, &["status"]);
    assert!(human.status.success());
    assert!(text(&human.stdout).contains("running"), "{}", text(&human.stdout));
}

#[test]
fn a_stopped_main_loop_fails_the_watchdog_and_is_restarted() {
    let b = boot("watchdog");
    dropin(&b, "fast-watchdog", "[Service]\nWatchdogSec=2s\nRestartSec=1s\n");
    b.sh_ok("systemctl start caretaker.service");
    let pid = prop(&b, "caretaker.service", "MainPID");
    assert_ne!(pid, "0");
    // Healthy for a few watchdog periods: the main loop pings.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(prop(&b, "caretaker.service", "MainPID"), pid, "restarted although healthy");
    assert_eq!(prop(&b, "caretaker.service", "NRestarts"), "0");

    b.sh_ok(&format!("kill -STOP {pid}"));
    let restarted = eventually(Duration::from_secs(20), || {
        let now = prop(&b, "caretaker.service", "MainPID");
        now != pid && now != "0" && prop(&b, "caretaker.service", "ActiveState") == "active"
    });
    assert!(restarted, "not restarted after SIGSTOP; journal:\n{}", b.journal("caretaker.service"));
    assert!(
        eventually(Duration::from_secs(10), || {
            let j = b.journal("caretaker.service");
            j.contains("Watchdog timeout") && j.contains("'watchdog'")
        }),
        "{}",
        b.journal("caretaker.service")
    );
    assert!(prop(&b, "caretaker.service", "NRestarts").parse::<u32>().unwrap() >= 1);
}

#[test]
fn sigterm_stops_cleanly_and_sighup_with_a_broken_dropin_keeps_the_old_config() {
    let b = boot("signals");
    b.sh_ok("systemctl start caretaker.service");

    b.write_file("/etc/caretaker/caretaker.d/50-broken.toml", b"[daemon]\nlog-levle = \"debug\"\n", 0o644).unwrap();
    b.sh_ok("systemctl reload caretaker.service");
    assert!(
        eventually(Duration::from_secs(10), || b.journal("caretaker.service").contains("reload refused")),
        "{}",
        b.journal("caretaker.service")
    );
    let out = caretaker_on(&b, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["state"], "running");
    let last = v["daemon"]["last_reload"].as_str().unwrap();
    assert!(last.starts_with("failed") && last.contains("50-broken.toml:2:1"), "{last}");
    assert_eq!(v["daemon"]["config_files"].as_array().unwrap().len(), 1, "old config kept: {v}");

    // The CLI's reload reports the refusal too, with exit status 2.
    let cli = b.exec(&["caretaker", "reload"]);
    assert_eq!(cli.status.code(), Some(2), "{cli:?}");
    assert!(text(&cli.stderr).contains("log-levle"), "{cli:?}");

    // A valid drop-in is taken.
    b.sh_ok("rm /etc/caretaker/caretaker.d/50-broken.toml");
    b.write_file("/etc/caretaker/caretaker.d/50-debug.toml", b"[daemon]\nlog-level = \"debug\"\n", 0o644).unwrap();
    let cli = b.exec(&["caretaker", "reload"]);
    assert!(cli.status.success(), "{cli:?}");
    let v: serde_json::Value = serde_json::from_slice(&caretaker_on(&b, &["status", "--json"]).stdout).unwrap();
    assert!(v["daemon"]["last_reload"].as_str().unwrap().starts_with("ok"), "{v}");
    assert_eq!(v["daemon"]["config_files"].as_array().unwrap().len(), 2, "{v}");

    let started = Instant::now();
    b.sh_ok("systemctl stop caretaker.service");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    assert_eq!(prop(&b, "caretaker.service", "ExecMainStatus"), "0");
    assert_eq!(prop(&b, "caretaker.service", "Result"), "success");
    assert!(
        eventually(Duration::from_secs(10), || {
            let j = b.journal("caretaker.service");
            j.contains("SIGTERM received") && j.contains("stopping")
        }),
        "{}",
        b.journal("caretaker.service")
    );
}

#[test]
fn an_invalid_config_fails_the_unit_once_with_a_positioned_message() {
    let b = boot("badconfig");
    dropin(&b, "fast-restart", "[Service]\nRestartSec=1s\n");
    b.write_file(
        "/etc/caretaker/caretaker.toml",
        b"[services.api]\nunit = \"zmanim-api.service\"\nhealth-uri = \"x\"\n",
        0o644,
    )
    .unwrap();

    let check = b.exec(&["caretaker", "config", "check"]);
    assert_eq!(check.status.code(), Some(2), "{check:?}");
    let err = text(&check.stderr);
    assert!(err.contains("/etc/caretaker/caretaker.toml:3:1") && err.contains("health-uri"), "{err}");

    let start = b.sh("systemctl start caretaker.service");
    assert!(!start.status.success(), "a broken config must fail the start");
    assert!(
        eventually(Duration::from_secs(10), || prop(&b, "caretaker.service", "ActiveState") == "failed"),
        "not failed: {}",
        prop(&b, "caretaker.service", "ActiveState")
    );
    // RestartSec=1s: a restart would have happened within this time.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(prop(&b, "caretaker.service", "ActiveState"), "failed");
    assert_eq!(prop(&b, "caretaker.service", "ExecMainStatus"), "78");
    assert_eq!(prop(&b, "caretaker.service", "NRestarts"), "0", "restarted into the same error");
    assert!(
        eventually(Duration::from_secs(10), || {
            let j = b.journal("caretaker.service");
            j.contains("caretaker.toml:3:1") && j.contains("health-uri")
        }),
        "{}",
        b.journal("caretaker.service")
    );
}

#[test]
fn the_bus_policy_lets_anyone_read_but_only_root_act() {
    let b = boot("policy");
    b.sh_ok("systemctl start caretaker.service");
    let busctl = "busctl --system";
    let obj = "io.shtetl.Caretaker1 /io/shtetl/Caretaker1 io.shtetl.Caretaker1";

    let read = b.sh(&format!("runuser -u nobody -- {busctl} get-property {obj} State"));
    assert!(read.status.success(), "{read:?}");
    assert_eq!(text(&read.stdout).trim(), "s \"running\"");
    let status = b.sh("runuser -u nobody -- caretaker status --json");
    assert!(status.status.success(), "non-root status: {status:?}");

    let call = b.sh(&format!("runuser -u nobody -- {busctl} call {obj} Reload"));
    assert!(!call.status.success(), "non-root Reload must be refused");
    assert!(text(&call.stderr).contains("Access denied"), "{call:?}");

    let root = b.sh(&format!("{busctl} call {obj} Reload"));
    assert!(root.status.success(), "{root:?}");

    // A policy file on the box that lets everyone call (a mistake, or an attacker's): the daemon
    // still serves mutating methods to root only.
    b.write_file(
        "/etc/dbus-1/system.d/zz-too-open.conf",
        br#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy user="nobody"><allow send_destination="io.shtetl.Caretaker1"/></policy></busconfig>"#,
        0o644,
    )
    .unwrap();
    b.sh_ok("busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig");
    std::thread::sleep(std::time::Duration::from_millis(300));
    for method in ["Reload", "BackupNow s all", "Prune b false", "Update sbb v2 false false"] {
        let call = b.sh(&format!("runuser -u nobody -- {busctl} call {obj} {method}"));
        assert!(!call.status.success(), "{method} as nobody must be refused: {call:?}");
        assert!(text(&call.stderr).contains("only root"), "{method}: refused by the daemon itself: {call:?}");
    }
    assert!(b.sh(&format!("{busctl} call {obj} Reload")).status.success(), "root still can");
}

#[test]
fn every_shipped_unit_passes_systemd_analyze_verify() {
    let b = boot("verify");
    let units: Vec<String> = std::fs::read_dir(caretaker_testkit::repo_root().join("systemd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".socket") || n.ends_with(".timer"))
        .collect();
    assert!(units.iter().any(|u| u == "caretaker.service"), "{units:?}");
    for unit in units {
        let out = b.sh(&format!("systemd-analyze verify --man=no /etc/systemd/system/{unit}"));
        let err = text(&out.stderr);
        assert!(out.status.success() && !err.contains(&unit), "{unit}: {err}");
    }
}
