//! caretaker's IMDSv2 client against the project's IMDSv2 fake (tokens enforced, faults injected).

use std::time::{Duration, Instant};

use caretaker::aws::imds::{ImdsClient, ImdsError};
use caretaker_testkit::imds::{FakeImds, ImdsConfig};

fn fake() -> FakeImds {
    FakeImds::start(ImdsConfig::default()).expect("fake IMDS starts")
}

#[tokio::test]
async fn reads_identity_with_one_token_and_never_without_one() {
    let f = fake();
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(10));
    let info = c.instance_info().await.unwrap();
    let want = ImdsConfig::default();
    assert_eq!(info.identity.instance_id, want.instance_id);
    assert_eq!(info.identity.region, want.region);
    assert_eq!(info.identity.availability_zone, want.availability_zone);
    assert!(info.block_devices.iter().any(|(n, d)| n == "ebs1" && d == "sdf"), "{:?}", info.block_devices);
    assert_eq!(c.get("meta-data/instance-id").await.unwrap().as_deref(), Some(want.instance_id.as_str()));
    let s = f.stats();
    assert_eq!(s.gets_without_token, 0, "token-less access attempted: {s:?}");
    assert_eq!(s.token_puts, 1, "the token is cached: {s:?}");
}

#[tokio::test]
async fn absent_paths_are_none_not_errors() {
    let f = fake();
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(5));
    assert_eq!(c.get("meta-data/no-such-thing").await.unwrap(), None);
    assert!(matches!(c.get_required("meta-data/no-such-thing").await, Err(ImdsError::Missing { .. })));
}

#[tokio::test]
async fn an_expired_token_is_renewed_once() {
    let f = fake();
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(10));
    c.get_required("meta-data/instance-id").await.unwrap();
    f.expire_tokens();
    c.get_required("meta-data/instance-id").await.unwrap();
    let s = f.stats();
    assert_eq!(s.gets_bad_token, 1, "{s:?}");
    assert_eq!(s.token_puts, 2, "{s:?}");
    assert_eq!(s.gets_without_token, 0);
}

#[tokio::test]
async fn a_short_lived_token_is_renewed_before_it_expires() {
    let f = fake();
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(10)).with_token_ttl(Duration::from_secs(2));
    c.get_required("meta-data/instance-id").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.get_required("meta-data/instance-id").await.unwrap();
    let s = f.stats();
    assert_eq!(s.gets_bad_token, 0, "used a token about to expire: {s:?}");
    assert_eq!(s.token_puts, 2, "{s:?}");
}

#[tokio::test]
async fn transient_500s_are_retried() {
    let f = fake();
    f.fail_next(3);
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(10));
    assert!(c.get_required("meta-data/instance-id").await.is_ok());
    assert_eq!(f.stats().served_500, 3);
}

#[tokio::test]
async fn imds_down_fails_within_the_deadline_with_a_clear_message() {
    let port = caretaker_testkit::ports::free_port();
    let deadline = Duration::from_secs(2);
    let c = ImdsClient::new(&format!("http://127.0.0.1:{port}"), deadline);
    let started = Instant::now();
    let err = c.get_required("meta-data/instance-id").await.unwrap_err();
    let took = started.elapsed();
    assert!(took <= deadline + Duration::from_millis(500), "took {took:?}");
    let msg = err.to_string();
    assert!(matches!(err, ImdsError::Deadline { .. }), "{msg}");
    assert!(msg.contains("meta-data/instance-id") && msg.contains("within 2s"), "{msg}");
}

#[tokio::test]
async fn an_imds_that_always_fails_or_hangs_is_bounded_too() {
    let f = fake();
    f.fail_next(u32::MAX);
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(2));
    let started = Instant::now();
    let err = c.get_required("meta-data/instance-id").await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_millis(2500));
    assert!(err.to_string().contains("500"), "{err}");

    f.clear_faults();
    f.set_delay(Duration::from_secs(5));
    let c = ImdsClient::new(&f.base_url(), Duration::from_secs(2)).with_attempt_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = c.get_required("meta-data/instance-id").await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_millis(2500), "{:?}", started.elapsed());
    assert!(matches!(err, ImdsError::Deadline { .. }), "{err}");
}
