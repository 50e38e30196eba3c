//! The IMDSv2 fake behaves like EC2's metadata service with "IMDSv2 required".

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caretaker_testkit::imds::{FakeImds, ImdsConfig, ImdsStats};
use caretaker_testkit::ports::{HttpResponse, http};

const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "X-aws-ec2-metadata-token";

fn put_token(base: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http("PUT", &format!("{base}/latest/api/token"), headers, b"").unwrap()
}

fn token(base: &str, ttl: u32) -> String {
    let r = put_token(base, &[(TTL, &ttl.to_string())]);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn get(base: &str, path: &str, token: Option<&str>) -> HttpResponse {
    let headers: Vec<(&str, &str)> = token.map(|t| (TOKEN, t)).into_iter().collect();
    http("GET", &format!("{base}{path}"), &headers, b"").unwrap()
}

fn fake() -> FakeImds {
    FakeImds::start(ImdsConfig::default()).unwrap()
}

#[test]
fn tokenless_get_is_401() {
    let imds = fake();
    let r = get(&imds.base_url(), "/latest/meta-data/instance-id", None);
    assert_eq!(r.status, 401);
    assert!(r.text().contains("401 - Unauthorized"), "{}", r.text());
    let r = get(&imds.base_url(), "/latest/meta-data/instance-id", Some("not-a-token"));
    assert_eq!(r.status, 401);
    let s = imds.stats();
    assert_eq!((s.gets_without_token, s.gets_bad_token, s.gets_ok), (1, 1, 0));
}

#[test]
fn token_put_checks_ttl_and_forwarding() {
    let imds = fake();
    let base = imds.base_url();
    assert_eq!(put_token(&base, &[]).status, 400, "no TTL");
    for bad in ["0", "21601", "abc", "-5", ""] {
        assert_eq!(put_token(&base, &[(TTL, bad)]).status, 400, "TTL {bad:?}");
    }
    let r = put_token(&base, &[(TTL, "21600"), ("X-Forwarded-For", "10.0.0.9")]);
    assert_eq!(r.status, 403);
    let r = put_token(&base, &[(TTL, "21600")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header(TTL), Some("21600"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let t = r.text();
    assert!(t.len() >= 40 && !t.contains(char::is_whitespace), "{t:?}");
    assert_ne!(t, token(&base, 60), "tokens are fresh");
    // GET on the token path and PUT elsewhere are not token requests.
    assert_eq!(http("PUT", &format!("{base}/latest/meta-data/instance-id"), &[(TTL, "60")], b"").unwrap().status, 405);
    let s = imds.stats();
    assert_eq!((s.token_puts, s.token_puts_rejected), (2, 7));
}

#[test]
fn serves_metadata_with_token() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 300);
    for (path, want) in [
        ("/latest/meta-data/instance-id", "i-0123456789abcdef0"),
        ("/latest/meta-data/placement/region", "eu-west-1"),
        ("/latest/meta-data/placement/availability-zone", "eu-west-1a"),
        ("/latest/meta-data/instance-type", "m7g.medium"),
        ("/latest/meta-data/local-ipv4", "10.0.1.23"),
        ("/latest/meta-data/block-device-mapping/", "ami\nebs1\nroot"),
        ("/latest/meta-data/block-device-mapping", "ami\nebs1\nroot"),
        ("/latest/meta-data/block-device-mapping/ami", "/dev/xvda"),
        ("/latest/meta-data/block-device-mapping/root", "/dev/xvda"),
        ("/latest/meta-data/block-device-mapping/ebs1", "sdf"),
        ("/latest/meta-data/placement/", "availability-zone\nregion"),
        ("/latest/", "dynamic/\nmeta-data/"),
    ] {
        let r = get(&base, path, Some(&t));
        assert_eq!((r.status, r.text().as_str()), (200, want), "{path}");
        assert_eq!(r.header("content-type"), Some("text/plain"), "{path}");
    }
    let listing = get(&base, "/latest/meta-data/", Some(&t)).text();
    for entry in ["instance-id", "placement/", "block-device-mapping/", "local-ipv4", "ami-id"] {
        assert!(listing.lines().any(|l| l == entry), "{entry} missing from {listing:?}");
    }
    let ttl_left: u64 = get(&base, "/latest/meta-data/instance-id", Some(&t)).header(TTL).unwrap().parse().unwrap();
    assert!((290..=300).contains(&ttl_left), "{ttl_left}");
    assert_eq!(imds.stats().gets_ok, 14);
}

#[test]
fn dated_versions_work() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 60);
    for v in ["2021-07-15", "2021-01-03", "2016-09-02", "1.0"] {
        let r = get(&base, &format!("/{v}/meta-data/instance-id"), Some(&t));
        assert_eq!((r.status, r.text().as_str()), (200, "i-0123456789abcdef0"), "{v}");
        let r = get(&base, &format!("/{v}/dynamic/instance-identity/document"), Some(&t));
        assert_eq!(r.status, 200, "{v}");
    }
}

#[test]
fn unknown_paths_are_404() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 60);
    for path in [
        "/latest/meta-data/nope",
        "/latest/meta-data/block-device-mapping/ebs9",
        "/latest/user-data",
        "/2021-7-15/meta-data/instance-id",
        "/bogus/meta-data/instance-id",
        "/latest/meta-data/instance-id/",
    ] {
        let r = get(&base, path, Some(&t));
        assert_eq!(r.status, 404, "{path}");
        assert!(r.text().contains("<title>404 - Not Found</title>"), "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("text/html"));
    }
    // Still a token check first, as with IMDSv2 required.
    assert_eq!(get(&base, "/latest/meta-data/nope", None).status, 401);
    assert_eq!(imds.stats().gets_not_found, 6);
}

#[test]
fn token_expires_after_its_ttl() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 1);
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 401);
    assert_eq!(imds.stats().gets_bad_token, 1);
}

#[test]
fn expire_tokens_now() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 21600);
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    imds.expire_tokens();
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 401);
    let t2 = token(&base, 21600);
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t2)).status, 200);
}

#[test]
fn fail_next_and_clear() {
    let imds = fake();
    let base = imds.base_url();
    let t = token(&base, 60);
    imds.fail_next(2);
    let statuses: Vec<u16> = (0..3).map(|_| get(&base, "/latest/meta-data/instance-id", Some(&t)).status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    imds.fail_next(u32::MAX);
    for _ in 0..5 {
        assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 500);
    }
    assert_eq!(put_token(&base, &[(TTL, "60")]).status, 500, "token PUTs fail too");
    imds.clear_faults();
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    let s = imds.stats();
    assert_eq!((s.served_500, s.gets_ok, s.token_puts), (8, 2, 1));
}

#[test]
fn delay_applies_to_every_answer() {
    let imds = fake();
    let base = imds.base_url();
    imds.set_delay(Duration::from_millis(300));
    let start = Instant::now();
    let t = token(&base, 60);
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    assert!(get(&base, "/latest/meta-data/instance-id", None).status == 401);
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    imds.clear_faults();
    let start = Instant::now();
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    assert!(start.elapsed() < Duration::from_millis(250), "{:?}", start.elapsed());
}

#[test]
fn identity_document_matches_config() {
    let config = ImdsConfig {
        instance_id: "i-0fedcba9876543210".into(),
        region: "us-east-2".into(),
        availability_zone: "us-east-2c".into(),
        instance_type: "c7i.large".into(),
        account_id: "210987654321".into(),
        image_id: "ami-0aaaabbbbccccdddd".into(),
        ..ImdsConfig::default()
    };
    let imds = FakeImds::start(config).unwrap();
    let base = imds.base_url();
    let t = token(&base, 60);
    let r = get(&base, "/latest/dynamic/instance-identity/document", Some(&t));
    assert_eq!(r.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(doc["accountId"], "210987654321");
    assert_eq!(doc["architecture"], "x86_64");
    assert_eq!(doc["availabilityZone"], "us-east-2c");
    assert_eq!(doc["imageId"], "ami-0aaaabbbbccccdddd");
    assert_eq!(doc["instanceId"], "i-0fedcba9876543210");
    assert_eq!(doc["instanceType"], "c7i.large");
    assert_eq!(doc["privateIp"], "10.0.1.23");
    assert_eq!(doc["region"], "us-east-2");
    assert_eq!(doc["version"], "2017-09-30");
    assert!(doc["pendingTime"].as_str().unwrap().ends_with('Z'));
    assert!(doc["kernelId"].is_null() && doc["billingProducts"].is_null());
    assert_eq!(get(&base, "/latest/meta-data/placement/region", Some(&t)).text(), "us-east-2");

    let imds = fake();
    let t = token(&imds.base_url(), 60);
    let doc = get(&imds.base_url(), "/latest/dynamic/instance-identity/document", Some(&t)).text();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!((doc["architecture"].as_str(), doc["region"].as_str()), (Some("arm64"), Some("eu-west-1")));
}

#[tokio::test]
async fn works_from_a_tokio_test() {
    let imds = fake();
    let base = imds.base_url();
    let body = tokio::task::spawn_blocking(move || {
        let t = token(&base, 60);
        get(&base, "/latest/meta-data/instance-id", Some(&t)).text()
    })
    .await
    .unwrap();
    assert_eq!(body, "i-0123456789abcdef0");
    assert_eq!(imds.stats().gets_ok, 1);
}

/// Kills and reaps the child on drop, by PID.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn binary_serves_and_obeys_control_endpoints() {
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_imds-fake"))
            .args(["--listen", "127.0.0.1:0", "--instance-id", "i-0bbbbbbbbbbbbbbbb", "--region", "ap-south-1"])
            .args([
                "--availability-zone",
                "ap-south-1b",
                "--block-device",
                "ami=/dev/sda1",
                "--block-device",
                "ebs2=sdg",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}"));
    let base = format!("http://{addr}");
    let ctl = |method: &str, path: &str| {
        let r = http(method, &format!("{base}/_fake/{path}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r
    };

    assert_eq!(get(&base, "/latest/meta-data/instance-id", None).status, 401);
    let t = token(&base, 60);
    for (path, want) in [
        ("/latest/meta-data/instance-id", "i-0bbbbbbbbbbbbbbbb"),
        ("/latest/meta-data/placement/region", "ap-south-1"),
        ("/latest/meta-data/placement/availability-zone", "ap-south-1b"),
        ("/latest/meta-data/block-device-mapping/", "ami\nebs2"),
        ("/2021-07-15/meta-data/block-device-mapping/ebs2", "sdg"),
    ] {
        let r = get(&base, path, Some(&t));
        assert_eq!((r.status, r.text().as_str()), (200, want), "{path}");
    }

    ctl("POST", "fail?count=2");
    let statuses: Vec<u16> = (0..3).map(|_| get(&base, "/latest/meta-data/instance-id", Some(&t)).status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    ctl("POST", "fail?count=all");
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 500);
    ctl("POST", "clear");
    ctl("POST", "delay?ms=300");
    let start = Instant::now();
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
    ctl("POST", "clear");
    ctl("POST", "expire-tokens");
    assert_eq!(get(&base, "/latest/meta-data/instance-id", Some(&t)).status, 401);
    assert_eq!(http("POST", &format!("{base}/_fake/fail?count=x"), &[], b"").unwrap().status, 400);

    let r = ctl("GET", "stats");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let stats: ImdsStats = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        stats,
        ImdsStats {
            token_puts: 1,
            token_puts_rejected: 0,
            gets_ok: 7,
            gets_not_found: 0,
            gets_without_token: 1,
            gets_bad_token: 1,
            served_500: 3,
        }
    );

    // SIGTERM → clean exit.
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "imds-fake ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn binary_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_imds-fake")).args(["--listen"]).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_imds-fake"))
        .args(["--listen", "127.0.0.1:0", "--block-device", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=DEV"));
}
