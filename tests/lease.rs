//! The backup prefix's lease against moto's S3 (conditional writes): one holder at a time, renewed
//! by its holder, taken over only once it ran out, exactly one winner of a race, and a lease the
//! deployment's keys did not seal never taken over.

use std::time::Duration;

use caretaker::aws::s3::S3;
use caretaker::backup::lease::{Held, LeaseError, acquire};
use caretaker::backup::seal::SealKeys;
use caretaker::config::AwsConfig;
use caretaker_testkit::moto::Moto;

async fn s3(moto: &Moto) -> S3 {
    let aws = AwsConfig { s3_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    client.create_bucket().bucket("backups").send().await.unwrap();
    S3::new(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_renewals_takeover_after_expiry_one_winner_and_no_forgeries() {
    let moto = Moto::start().unwrap();
    let s3 = s3(&moto).await;
    let keys = SealKeys::from_secrets([b"the deployment's seal key".as_slice()]);
    let long = Duration::from_secs(300);

    assert_eq!(acquire(&s3, "backups", "zmanim", &keys, "i-a", long).await, Ok(Held::Taken));
    assert_eq!(acquire(&s3, "backups", "zmanim", &keys, "i-a", long).await, Ok(Held::Renewed));
    match acquire(&s3, "backups", "zmanim", &keys, "i-b", long).await {
        Err(e @ LeaseError::Busy(..)) => assert!(e.to_string().contains("held by instance i-a"), "{e}"),
        other => panic!("i-b got {other:?}"),
    }

    // A lease not renewed for its time to live is taken over, and its old holder learns it.
    let short = Duration::from_secs(1);
    assert_eq!(acquire(&s3, "backups", "other", &keys, "i-a", short).await, Ok(Held::Taken));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // i-b's own lease lives long (the expiry that counts is the stored lease's): i-a's next
    // attempt finds it held however slow the server is.
    match acquire(&s3, "backups", "other", &keys, "i-b", long).await {
        Ok(Held::TakenOver(old)) => assert_eq!(old.holder, "i-a"),
        other => panic!("i-b got {other:?}"),
    }
    assert!(
        matches!(acquire(&s3, "backups", "other", &keys, "i-a", long).await, Err(LeaseError::Busy(l, _)) if l.holder == "i-b")
    );

    // Two boxes racing for a fresh prefix: exactly one wins, each time.
    for round in 0..5 {
        let prefix = format!("race{round}");
        let (a, b) = tokio::join!(
            acquire(&s3, "backups", &prefix, &keys, "i-a", long),
            acquire(&s3, "backups", &prefix, &keys, "i-b", long)
        );
        let won = [&a, &b].iter().filter(|r| matches!(r, Ok(Held::Taken))).count();
        let lost = [&a, &b].iter().filter(|r| matches!(r, Err(LeaseError::Busy(..)))).count();
        assert_eq!((won, lost), (1, 1), "round {round}: {a:?} / {b:?}");
    }

    // A lease the deployment's keys did not seal (someone else's, or forged) is never taken over.
    s3.put_object(
        "backups",
        "forged/lease.json",
        br#"{"holder":"i-x","acquired_at":"2020-01-01T00:00:00Z","renewed_at":"2020-01-01T00:00:00Z","ttl_seconds":1}"#
            .to_vec(),
    )
    .await
    .unwrap();
    assert!(matches!(acquire(&s3, "backups", "forged", &keys, "i-a", long).await, Err(LeaseError::Foreign(..))));
    let other_keys = SealKeys::from_secrets([b"another deployment".as_slice()]);
    assert!(matches!(acquire(&s3, "backups", "zmanim", &other_keys, "i-c", long).await, Err(LeaseError::Foreign(..))));
}
