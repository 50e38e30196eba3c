//! `caretaker update` in a lab box, driven the way an operator drives it: through the shipped SSM
//! document (`packaging/ssm/caretaker-update.json`), its parameters substituted and checked against
//! their allowedPattern as the SSM agent does, the script run with `sh` in the box. The daemon
//! restarts the real `zmanim-api.service` through systemd; releases of the stand-in API live in
//! moto's S3 in the box's network; the roll-back email is read back from moto's SES.

use std::time::{Duration, Instant};

use caretaker_testkit::lab::{BoxOptions, LabBox};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::ssmdoc::{Document, run_script, ssm_output};
use sha2::{Digest, Sha256};

const SENDER: &str = "caretaker@example.com";
const CREDENTIALS: &[(&str, &str)] = &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];

fn auth(service: &str) -> (&'static str, String) {
    (
        "Authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
        ),
    )
}

fn moto_call(moto: &Moto, method: &str, path: &str, service: &str, extra: &[(&str, &str)], body: &[u8]) {
    let (k, v) = auth(service);
    let mut headers: Vec<(&str, &str)> = vec![(k, v.as_str())];
    headers.extend_from_slice(extra);
    let r = moto.request(method, path, &headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(r.status / 100 == 2, "{method} {path}: {} {}", r.status, r.text());
}

/// The stand-in API as release `label` (a trailer the binary reads), optionally failing /health.
fn artifact(label: &str, fail_health: bool) -> Vec<u8> {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(|d| d.parent()).unwrap().join("test-api");
    let mut bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (cargo build --workspace)", path.display()));
    bytes.extend_from_slice(format!("\nTEST_API_VERSION={label}\n").as_bytes());
    if fail_health {
        bytes.extend_from_slice(b"TEST_API_FAIL_HEALTH=1\n");
    }
    bytes
}

fn publish(moto: &Moto, version: &str, bytes: &[u8]) {
    let sums = format!("{}  zmanim-api\n", hex::encode(Sha256::digest(bytes)));
    moto_call(moto, "PUT", &format!("/releases/zmanim-api/{version}/zmanim-api"), "s3", &[], bytes);
    moto_call(moto, "PUT", &format!("/releases/zmanim-api/{version}/SHA256SUMS"), "s3", &[], sums.as_bytes());
}

fn health(b: &LabBox) -> String {
    let out = b.sh("curl -s --max-time 2 http://127.0.0.1:8080/health");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for_version(b: &LabBox, version: &str, within: Duration) {
    let end = Instant::now() + within;
    loop {
        let h = health(b);
        if h.contains(&format!("\"version\":\"{version}\"")) {
            return;
        }
        assert!(Instant::now() < end, "the API did not report {version} within {within:?}: {h}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A box with the API (v1) running under systemd and caretaker configured for updates from moto.
fn rig(prefix: &str) -> (LabBox, Moto) {
    let b = LabBox::start(prefix, BoxOptions::default()).expect("lab box boots");
    let moto = Moto::start_in_netns(b.pid1()).expect("moto");
    moto_call(&moto, "PUT", "/releases", "s3", &[], b"");
    let body = format!("Action=VerifyEmailIdentity&EmailAddress={}&Version=2010-12-01", SENDER.replace('@', "%40"));
    moto_call(&moto, "POST", "/", "ses", &[("Content-Type", "application/x-www-form-urlencoded")], body.as_bytes());
    let config = format!(
        r#"[aws]
region = "us-east-1"
s3-endpoint = "{e}"
ses-endpoint = "{e}"

[notify]
sender = "{SENDER}"
recipients = ["ops@example.com"]

[release]
bucket = "releases"
health-gate-consecutive = 3
health-gate-timeout = "8s"
"#,
        e = moto.endpoint()
    );
    b.write_file("/etc/caretaker/caretaker.d/50-update.toml", config.as_bytes(), 0o644).unwrap();
    b.set_unit_env("caretaker.service", CREDENTIALS).unwrap();
    b.sh_ok("systemctl daemon-reload && systemctl start zmanim-api.service caretaker.service");
    wait_for_version(&b, "v1", Duration::from_secs(10));
    (b, moto)
}

fn document() -> Document {
    Document::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/ssm/caretaker-update.json"))
        .expect("the update document parses")
}

/// Runs the document in the box as the SSM agent would; returns (exit code, output).
fn run_document(b: &LabBox, values: &[(&str, &str)]) -> (i32, String) {
    let script = document().render(values).expect("parameters pass their allowedPattern");
    let out = run_script(b.command(&[] as &[&str]), &script).expect("run the document");
    let text = ssm_output(&out);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn v1_to_v2_through_the_ssm_document_then_a_broken_v3_rolls_back_to_v2_with_one_email() {
    let (b, moto) = rig("upd-doc");
    publish(&moto, "v2", &artifact("v2", false));
    publish(&moto, "v3", &artifact("v3", true));

    let (code, out) = run_document(&b, &[("Version", "v2")]);
    assert_eq!(code, 0, "{out}\n{}", b.journal("zmanim-api.service"));
    assert!(out.trim_end().lines().last().unwrap().starts_with("caretaker-update: OK"), "{out}");
    assert!(out.contains("updated from v1 to v2"), "{out}");
    assert!(out.len() < 24_000);
    wait_for_version(&b, "v2", Duration::from_secs(5));
    assert_eq!(b.sh_ok("readlink /opt/zmanim/current").trim(), "releases/v2");
    b.sh_ok("test -x /opt/zmanim/releases/v1/zmanim-api && test -f /opt/zmanim/releases/v2/.verified");

    // The same version again: a successful no-op.
    let (code, out) = run_document(&b, &[("Version", "v2")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already running"), "{out}");

    // v3 never becomes healthy: rolled back to v2, which is healthy, one email, exit non-zero.
    let (code, out) = run_document(&b, &[("Version", "v3")]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("rolled back to v2"), "{out}");
    assert!(out.trim_end().lines().last().unwrap().starts_with("caretaker-update: FAILED"), "{out}");
    assert_eq!(b.sh_ok("readlink /opt/zmanim/current").trim(), "releases/v2");
    assert!(health(&b).contains("\"version\":\"v2\""), "{}", health(&b));
    let emails = moto.sent_emails().unwrap();
    let rollbacks: Vec<_> = emails.iter().filter(|e| e.subject.contains("v3")).collect();
    assert_eq!(rollbacks.len(), 1, "one email about the roll back: {emails:?}");
    assert!(b.sh_ok("systemctl is-active zmanim-api.service").trim() == "active");

    // A missing version: refused, the available ones listed, nothing changed.
    let (code, out) = run_document(&b, &[("Version", "v9")]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("v2") && out.contains("v3"), "lists the available versions: {out}");
    assert_eq!(b.sh_ok("readlink /opt/zmanim/current").trim(), "releases/v2");
}

#[test]
fn shell_metacharacters_are_rejected_by_the_documents_pattern_and_the_cli_refuses_bad_versions() {
    let doc = document();
    for bad in ["v2; rm -rf /", "$(reboot)", "v2`id`", "../v1", "v2 --dry-run"] {
        assert!(doc.render(&[("Version", bad)]).is_err(), "{bad:?} must fail the allowedPattern");
    }
    let b = LabBox::start("upd-bad", BoxOptions::default()).expect("lab box boots");
    b.sh_ok("systemctl start caretaker.service");
    let out = b.sh("caretaker update --version 'v2;id'");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("v2;id"), "{out:?}");
    let out = b.sh("caretaker update --version v2");
    assert_eq!(out.status.code(), Some(1), "no release bucket configured: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("release.bucket"), "{out:?}");
}

#[test]
fn a_daemon_killed_between_switch_and_gate_is_reconciled_on_restart() {
    let (b, moto) = rig("upd-kill");
    publish(&moto, "v2", &artifact("v2", true));
    // Start an update to a release that will not pass its gate, and kill the daemon once the
    // switch happened (current → v2) while the gate is still probing.
    b.sh_ok("systemd-run --unit=upd-kill-cli --collect caretaker update --version v2");
    let end = Instant::now() + Duration::from_secs(20);
    while b.sh_ok("readlink /opt/zmanim/current || true").trim() != "releases/v2" {
        assert!(Instant::now() < end, "the update never switched");
        std::thread::sleep(Duration::from_millis(100));
    }
    b.sh_ok("kill -KILL $(systemctl show -p MainPID --value caretaker.service)");
    // systemd restarts caretaker (Restart=on-failure); the new daemon puts current back at v1 and
    // restarts the API on it.
    let end = Instant::now() + Duration::from_secs(30);
    while b.sh_ok("readlink /opt/zmanim/current || true").trim() != "releases/v1" {
        assert!(Instant::now() < end, "not reconciled: {}", b.journal("caretaker.service"));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for_version(&b, "v1", Duration::from_secs(15));
    assert!(b.journal("caretaker.service").contains("an update was interrupted"));
}

#[test]
fn an_api_left_failed_by_its_start_limit_is_started_again_by_the_next_update() {
    let (b, moto) = rig("upd-limit");
    publish(&moto, "v2", &artifact("v2", false));
    b.write_file(
        "/run/systemd/system/zmanim-api.service.d/50-limit.conf",
        b"[Unit]\nStartLimitIntervalSec=300\nStartLimitBurst=2\n[Service]\nRestart=no\n",
        0o644,
    )
    .unwrap();
    b.sh_ok("systemctl daemon-reload");
    // What a daemon killed mid-update (or a crash loop) can leave: the API failed by the start
    // limit, so that systemd refuses to start it.
    b.sh("systemctl restart zmanim-api.service; systemctl restart zmanim-api.service; systemctl restart zmanim-api.service; systemctl kill zmanim-api.service");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!b.sh("systemctl start zmanim-api.service").status.success(), "the start limit should refuse a start");
    assert_eq!(b.sh_ok("systemctl show -p Result --value zmanim-api.service").trim(), "start-limit-hit");

    let out = b.sh("caretaker update --version v2");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n{}", b.journal("caretaker.service"));
    assert!(text.contains("updated from v1 to v2"), "{text}");
    wait_for_version(&b, "v2", Duration::from_secs(10));
    assert_eq!(b.sh_ok("systemctl is-active zmanim-api.service").trim(), "active");
    assert!(b.journal("caretaker.service").contains("Result=start-limit-hit"), "the reset is logged");
}
