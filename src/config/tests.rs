use super::redact::redact_value;
use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn sources(dir: &Path) -> Sources {
    Sources {
        main: dir.join("caretaker.toml"),
        main_required: false,
        dropin_dirs: vec![dir.join("etc.d"), dir.join("run.d")],
    }
}

#[test]
fn defaults_are_the_zmanim_profile_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load(&sources(dir.path())).unwrap();
    let c = loaded.config;
    assert!(loaded.files.is_empty());
    assert_eq!(c.services.api.unit.as_str(), "zmanim-api.service");
    assert_eq!(c.services.api.health_url, "http://127.0.0.1:8080/health");
    assert_eq!(c.volume.mount_point, Path::new("/data"));
    assert_eq!(c.secrets.ssm_path, "/zmanim/prod/");
    assert_eq!(c.aws.region, None, "region comes from IMDS by default");
    assert_eq!(c.volume.filesystem, Filesystem::Xfs);
}

#[test]
fn dropins_merge_in_order_and_run_wins() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "caretaker.toml", "[daemon]\nlog-level = \"warn\"\n[aws]\nregion = \"eu-west-1\"\n");
    write(dir.path(), "etc.d/10-a.toml", "[daemon]\nlog-level = \"debug\"\n");
    write(dir.path(), "etc.d/20-b.toml", "[aws]\nregion = \"us-east-1\"\n");
    write(dir.path(), "run.d/20-b.toml", "[aws]\nregion = \"eu-central-1\"\n");
    write(dir.path(), "etc.d/ignored.conf", "garbage");
    let loaded = load(&sources(dir.path())).unwrap();
    assert_eq!(loaded.config.daemon.log_level, LogLevel::Debug);
    assert_eq!(loaded.config.aws.region.as_deref(), Some("eu-central-1"));
    assert_eq!(loaded.files.len(), 3, "{:?}", loaded.files);
    assert!(loaded.files[2].ends_with("run.d/20-b.toml"));
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "etc.d/50-bad.toml", "# comment\n[daemon]\nlog-level = \"info\"\nlog-levle = \"x\"\n");
    let err = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(err.contains("50-bad.toml:4:1"), "{err}");
    assert!(err.contains("log-levle"), "{err}");
    assert!(err.contains("daemon"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "caretaker.toml", "[services.postgres]\nport = \"fivefour\"\n");
    let err = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(err.contains("caretaker.toml:2:8"), "{err}");
    assert!(err.contains("key `services.postgres.port`"), "{err}");
}

#[test]
fn syntax_error_is_positioned() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "caretaker.toml", "[daemon]\nlog-level = \n");
    let err = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(err.contains("caretaker.toml:2:"), "{err}");
}

#[test]
fn cross_field_error_names_the_file_that_set_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "caretaker.toml", "[notify]\nsender = \"ops@example.com\"\n");
    write(dir.path(), "run.d/x.toml", "[secrets]\nssm-path = \"/zmanim/prod\"\n");
    let err = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(err.contains("run.d/x.toml: key `secrets.ssm-path`"), "{err}");
}

#[test]
fn bad_values_are_rejected() {
    for (text, needle) in [
        ("[volume]\ndevice = \"vol-xyz\"\n", "volume id"),
        ("[volume]\ndevice = \"nvme1n1\"\n", "not a volume id"),
        ("[volume]\nattach-timeout = \"soon\"\n", "not a duration"),
        ("[services.api]\nunit = \"zmanim api\"\n", "not a systemd unit name"),
        ("[aws]\ns3-endpoint = \"localhost:9000\"\n", "not an http"),
        ("[notify]\nrecipients = [\"ops@example.com\"]\n", "sender is not"),
        ("[secrets]\nenv-dir = \"/etc/caretaker/env\"\n", "under /run"),
        ("[daemon]\nlog-level = \"loud\"\n", "unknown variant"),
        ("[release]\npublic-key = \"abc\"\n", "64 hex digits"),
        ("[release]\nartifact = \"../bin/sh\"\n", "release.artifact"),
        ("[release]\nhealth-gate-consecutive = 0\n", "at least 1"),
        ("[aws]\ncloudwatch-endpoint = \"monitoring\"\n", "aws.cloudwatch-endpoint"),
        ("[metrics]\ninterval = \"1s\"\n", "between 10s and 1h"),
        ("[metrics]\nnamespace = \"AWS/EC2\"\n", "metrics.namespace"),
        ("[metrics]\ndeployment = \"zmanim prod\"\n", "without spaces"),
        ("[metrics]\nmax-queued = 0\n", "metrics.max-queued"),
        ("[metrics]\nenabled = \"yes\"\n", "metrics.enabled"),
        ("[jobs]\nnice = 20\n", "jobs.nice"),
        ("[jobs]\ncpu-weight = 0\n", "jobs.cpu-weight"),
        ("[jobs]\nio-weight = 10001\n", "jobs.io-weight"),
        ("[backup]\nwal-tip-interval = \"10ms\"\n", "backup.wal-tip-interval"),
        ("[backup]\nwal-tip-interval = \"5m\"\n", "200ms–60s"),
        ("[backup]\nwal-tip-lag-alert = 1\n", "backup.wal-tip-lag-alert"),
        ("[backup]\nrestore-point-interval = \"1m\"\n", "backup.restore-point-interval"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "caretaker.toml", text);
        let err = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} → {err}");
    }
}

#[test]
fn explicit_file_must_exist() {
    let err = load(&Sources::file("/nonexistent/caretaker.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn volume_selector_forms() {
    assert_eq!(
        VolumeSelector::parse("vol-0123456789abcdef0").unwrap(),
        VolumeSelector::VolumeId("vol-0123456789abcdef0".into())
    );
    assert_eq!(VolumeSelector::parse("/dev/sdf").unwrap(), VolumeSelector::DeviceName("sdf".into()));
    assert_eq!(VolumeSelector::parse("xvdg").unwrap(), VolumeSelector::DeviceName("xvdg".into()));
    assert_eq!(VolumeSelector::parse("/dev/loop3").unwrap(), VolumeSelector::Path("/dev/loop3".into()));
    assert!(VolumeSelector::parse("/dev/../etc/passwd").is_err());
}

#[test]
fn redaction_hides_secret_looking_values() {
    let mut v =
        serde_json::json!({"a": {"db-password": "hunter2", "url": "postgres://app:hunter2@db/x", "unit": "x.service"}});
    redact_value(&mut v, "");
    let s = v.to_string();
    assert!(!s.contains("hunter2"), "{s}");
    assert!(s.contains("x.service"));
}

#[test]
fn default_config_round_trips_through_toml() {
    let text = toml::to_string(&Config::default()).unwrap();
    let back: Config = toml::from_str(&text).unwrap();
    assert_eq!(back, Config::default());
}

#[test]
fn a_rule_over_two_keys_names_the_file_that_set_one_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let dropin = write(dir.path(), "etc.d/10-fast.toml", "[supervise]\nprobe-interval = \"2s\"\n");
    let e = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(e.starts_with(&dropin.display().to_string()), "{e}");
    assert!(e.contains("supervise.probe-interval") && !e.contains("(defaults)"), "{e}");
    let dropin = write(dir.path(), "etc.d/10-fast.toml", "[backup]\nparts-in-flight = 0\n");
    let e = load(&sources(dir.path())).unwrap_err().to_string();
    assert!(e.starts_with(&dropin.display().to_string()) && e.contains("backup.parts-in-flight"), "{e}");
}

#[test]
fn the_backed_up_database_is_a_plain_name_short_enough_for_the_names_derived_from_it() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["host=evil dbname=x", "zmanim'", "Zmanim", &"a".repeat(33)] {
        write(dir.path(), "caretaker.toml", &format!("[backup]\ndatabase = \"{bad}\"\n"));
        let e = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(e.contains("backup.database"), "{bad}: {e}");
    }
    write(dir.path(), "caretaker.toml", &format!("[backup]\ndatabase = \"{}\"\n", "a".repeat(32)));
    assert!(load(&sources(dir.path())).is_ok());
}
