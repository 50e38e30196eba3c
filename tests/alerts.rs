//! Alerts built before their mailer (the daemon's, at start): an incident opened while the
//! region and credentials are still resolving is emailed once the mailer arrives, never dropped.

use std::time::{Duration, Instant};

use caretaker::config::AwsConfig;
use caretaker::notify::{Alert, Alerts, Mailer};
use caretaker_testkit::moto::Moto;

fn alert(subject: &str) -> Alert {
    Alert {
        subject: subject.into(),
        what_failed: "it failed".into(),
        what_done: "nothing".into(),
        what_safe: "everything".into(),
        next: "caretaker status".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_opened_before_the_mailer_is_known_is_emailed_once_it_is() {
    let moto = Moto::start().unwrap();
    let aws = AwsConfig { ses_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let ses = caretaker::aws::sdk::ses_client(&sdk, &aws);
    ses.verify_email_identity().email_address("caretaker@example.com").send().await.unwrap();
    let mailer = Mailer {
        ses: caretaker::aws::ses::SesClient::new(ses),
        from: "caretaker@example.com".into(),
        to: vec!["ops@example.com".into()],
    };
    let subjects = || -> Vec<String> { moto.sent_emails().unwrap().into_iter().map(|e| e.subject).collect() };

    let alerts = Alerts::pending("[caretaker]", "test-box", 12).with_retry(Duration::from_millis(200));
    assert!(alerts.open("backup:postgres", alert("postgres backup failed: pg_dump was killed")));
    assert!(alerts.is_open("backup:postgres"), "the incident is open at once");
    assert!(!alerts.open("backup:postgres", alert("again")), "and deduplicated");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(subjects().is_empty(), "nothing can be sent without a mailer: {:?}", subjects());

    alerts.set_mailer(Some(mailer));
    let t0 = Instant::now();
    while subjects().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the waiting email never went out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = subjects();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].contains("test-box: postgres backup failed: pg_dump was killed"), "{sent:?}");

    // Without a sender: logged only, and nothing waits forever.
    let quiet = Alerts::pending("[caretaker]", "test-box", 12);
    quiet.open("x", alert("logged only"));
    quiet.set_mailer(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(subjects().len(), 1);
}
