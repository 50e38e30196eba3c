//! What the restore at boot makes of a bucket before any key is needed, against moto's S3: an
//! empty prefix is a new deployment (an empty cluster is right), objects without any backup stop
//! the boot, and backups the box has no key for stop it too — none of them ever waits or restores.

use caretaker::backup::at_boot::{AtBoot, AtBootError, restore_newest};
use caretaker_testkit::moto::Moto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_prefix_is_new_objects_without_a_backup_or_without_keys_stop_the_boot() {
    let moto = Moto::start().unwrap();
    // The default credential chain reads these (the only test in this binary).
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    moto.create_bucket("backups").unwrap();
    let env = tempfile::tempdir().unwrap();
    let mut cfg = caretaker::config::Config::default();
    cfg.aws.region = Some("us-east-1".into());
    cfg.aws.s3_endpoint = Some(moto.endpoint());
    cfg.backup.bucket = Some("backups".into());
    cfg.secrets.env_dir = env.path().to_path_buf(); // no caretaker.env: no keys at all
    let quiet = |_: String| {};

    match restore_newest(&cfg, &quiet).await {
        Ok(AtBoot::NothingToRestore(why)) => assert!(why.contains("empty"), "{why}"),
        other => panic!("an empty prefix: {other:?}"),
    }

    let put = |key: &str| {
        let r = moto.request("PUT", &format!("/backups/{key}"), &[Moto::s3_auth()], b"x").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    };
    put("caretaker/wal/000000010000000000000001.zst.age");
    match restore_newest(&cfg, &quiet).await {
        Err(AtBootError::Refused(why)) => assert!(why.contains("but no backup") && why.contains("wal/"), "{why}"),
        other => panic!("WAL without a backup: {other:?}"),
    }

    put("caretaker/postgres/2026/12/01/20261201T030000Z-abcdef/manifest.json");
    match restore_newest(&cfg, &quiet).await {
        Err(AtBootError::Refused(why)) => assert!(why.contains("cannot read them"), "{why}"),
        other => panic!("backups without keys: {other:?}"),
    }
}
