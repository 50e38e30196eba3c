use std::process::ExitCode;

use clap::Parser;

use caretaker::cli::{BackupCommand, Cli, Command, ConfigCommand, RestoreCommand, StatusArgs, UpdateArgs, WalCommand};
use caretaker::config::{self, LogLevel, Sources};
use caretaker::control::client::{Client, ClientError};
use caretaker::{daemon, exit, logging};

fn main() -> ExitCode {
    caretaker::pageout::fix_mmap_threshold();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)))
}

async fn run(cli: Cli) -> u8 {
    let sources = Sources::from_arg(cli.config.as_deref());
    match cli.command {
        Command::Daemon => {
            let levels = logging::init(LogLevel::Info);
            match daemon::run(sources, levels).await {
                Ok(()) => exit::OK,
                Err(e @ daemon::DaemonError::Config(_)) => {
                    tracing::error!("{e}");
                    exit::CONFIG
                }
                Err(e) => {
                    tracing::error!("{e}");
                    exit::FAILURE
                }
            }
        }
        Command::Firstboot { json } => firstboot(&sources, json).await,
        Command::Status(args) => status(&cli_bus(&cli.bus_address, &sources), args).await,
        Command::Reload => reload(&cli_bus(&cli.bus_address, &sources)).await,
        Command::Backup(BackupCommand::Now { kind }) => backup_now(&cli_bus(&cli.bus_address, &sources), &kind).await,
        Command::Backup(BackupCommand::Prune { dry_run }) => {
            backup_prune(&cli_bus(&cli.bus_address, &sources), dry_run).await
        }
        Command::Backup(BackupCommand::Verify { id, kind }) => {
            let bus = cli_bus(&cli.bus_address, &sources);
            follow_job(&bus, "Verify", move |p| async move { p.verify(&kind, &id).await }).await
        }
        Command::Backup(BackupCommand::List { kind, json }) => backup_list(&sources, &kind, json).await,
        Command::Config(ConfigCommand::Check { path, json }) => config_check(path, sources, json),
        Command::Config(ConfigCommand::Show { json }) => config_show(&sources, json),
        Command::Restore(RestoreCommand::Postgres { to_time, to_latest, .. }) if to_time.is_some() || to_latest => {
            let target = to_time.unwrap_or_else(|| "latest".into());
            if let Err(e) = caretaker::backup::pitr::Target::parse(&target) {
                eprintln!("error: --to-time {e}");
                return exit::USAGE;
            }
            let bus = cli_bus(&cli.bus_address, &sources);
            follow_job(&bus, "Restore", move |p| async move { p.restore_to_time(&target).await }).await
        }
        Command::Restore(RestoreCommand::Postgres { backup, target_db, .. }) => {
            let bus = cli_bus(&cli.bus_address, &sources);
            let target = target_db.unwrap_or_default();
            follow_job(&bus, "Restore", move |p| async move { p.restore("postgres", &backup, &target).await }).await
        }
        Command::Restore(RestoreCommand::Redis { backup }) => {
            let bus = cli_bus(&cli.bus_address, &sources);
            follow_job(&bus, "Restore", move |p| async move { p.restore("redis", &backup, "").await }).await
        }
        Command::Restore(RestoreCommand::ListKept { json }) => restore_list_kept(&sources, json).await,
        Command::Restore(RestoreCommand::DropKept { name }) => restore_drop_kept(&sources, &name).await,
        Command::Migrate { source_ssm_param, source_url_file, swap } => {
            let bus = cli_bus(&cli.bus_address, &sources);
            let param = source_ssm_param.unwrap_or_default();
            let file = match source_url_file.map(|p| std::path::absolute(&p)) {
                Some(Ok(p)) => p.display().to_string(),
                Some(Err(e)) => {
                    eprintln!("error: --source-url-file: {e}");
                    return exit::USAGE;
                }
                None => String::new(),
            };
            if param.is_empty() == file.is_empty() {
                eprintln!("error: give exactly one of --source-ssm-param NAME and --source-url-file PATH");
                return exit::USAGE;
            }
            follow_job(&bus, "Migrate", move |p| async move { p.migrate(&param, &file, swap).await }).await
        }
        Command::Update(args) => update(&cli_bus(&cli.bus_address, &sources), args).await,
        Command::Doctor { json } => doctor(&sources, cli.bus_address.clone(), json).await,
        Command::Wal(cmd) => wal(cmd).await,
    }
}

/// archive_command / restore_command: one line on stderr (PostgreSQL's log), the exit status
/// PostgreSQL acts on.
async fn wal(cmd: WalCommand) -> u8 {
    use caretaker::backup::wal::client;
    use std::time::Duration;
    match cmd {
        WalCommand::Push { path, socket, timeout } => {
            match client::push(&socket, &path, Duration::from_secs(timeout)).await {
                Ok(_) => exit::OK,
                Err(e) => {
                    eprintln!("caretaker wal push: {e}");
                    exit::FAILURE
                }
            }
        }
        WalCommand::Fetch { name, dest, socket, timeout } => {
            match client::fetch(&socket, &name, &dest, Duration::from_secs(timeout)).await {
                Ok(true) => exit::OK,
                Ok(false) => client::NOT_FOUND,
                Err(e) => {
                    eprintln!("caretaker wal fetch {name}: {e}; recovery must not go on without it");
                    client::ABORT_RECOVERY
                }
            }
        }
    }
}

async fn doctor(sources: &Sources, bus_address: Option<String>, json: bool) -> u8 {
    let opts = caretaker::doctor::Options { bus_address, ..Default::default() };
    let report = caretaker::doctor::run(sources, &opts).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        for check in &report.checks {
            println!("{check}");
        }
    }
    match (report.config_valid, report.ok) {
        (false, _) => exit::USAGE,
        (true, true) => exit::OK,
        (true, false) => exit::FAILURE,
    }
}

async fn firstboot(sources: &Sources, json: bool) -> u8 {
    logging::init(LogLevel::Info);
    let loaded = match config::load(sources) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return exit::CONFIG;
        }
    };
    use caretaker::backup::at_boot::{self, AtBoot, AtBootError};
    use caretaker::boot::firstboot::{RecoverError, Recovered};
    let cfg = std::sync::Arc::new(loaded.config.clone());
    let recover = {
        let cfg = cfg.clone();
        move || {
            let cfg = cfg.clone();
            Box::pin(async move {
                let progress = |line: String| tracing::info!("recovery at boot: {line}");
                match at_boot::restore_newest(&cfg, &progress).await {
                    Ok(AtBoot::Restored { summary, details }) => Ok(Recovered::Restored { summary, details }),
                    Ok(AtBoot::NothingToRestore(why)) => Ok(Recovered::NothingToRestore(why)),
                    Err(AtBootError::Wait(e)) => Err(RecoverError::Wait(e)),
                    Err(AtBootError::Refused(e)) => Err(RecoverError::Refused(e)),
                }
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }
    };
    // One alert while the backups cannot be read (the box waits, nothing starts), resolved after.
    let alerts: std::sync::Arc<tokio::sync::OnceCell<caretaker::notify::Alerts>> = Default::default();
    let on_wait = {
        let (cfg, alerts) = (cfg.clone(), alerts.clone());
        let notifier = caretaker::systemd::notify::Notifier::from_env();
        move |why: Option<&str>| {
            notifier.status(why.unwrap_or("the wait is over: restoring the backups"));
            let (cfg, alerts, why) = (cfg.clone(), alerts.clone(), why.map(str::to_string));
            tokio::spawn(async move {
                let a = alerts.get_or_init(|| caretaker::daemon::build_alerts(&cfg)).await;
                match why {
                    Some(why) => {
                        a.open(
                            "boot:recovery",
                            caretaker::notify::Alert {
                                subject: "a new box waits to restore its backups: nothing is started".into(),
                                what_failed: format!("The data volume is blank and backups are configured; {why}"),
                                what_done: "PostgreSQL was not initialised and no data service was started: an empty \
                                            database never replaces the real one. caretaker-firstboot retries."
                                    .into(),
                                what_safe: "The backups in S3 are untouched.".into(),
                                next: "systemctl status caretaker-firstboot; journalctl -u caretaker-firstboot -n 50; \
                                       check S3 access (caretaker doctor)"
                                    .into(),
                            },
                        );
                    }
                    None => {
                        a.resolve("boot:recovery", "The wait is over: the restore at boot goes on.");
                    }
                }
            });
        }
    };
    match caretaker::boot::firstboot::run(&loaded.config, Some(&recover), &on_wait).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                let v = &report.volume;
                println!(
                    "instance {} in {}",
                    report.instance.identity.instance_id, report.instance.identity.availability_zone
                );
                println!(
                    "volume   {} ({} {}) at {}{}{}",
                    v.device.display(),
                    v.fstype,
                    v.uuid,
                    loaded.config.volume.mount_point.display(),
                    if v.formatted { ", formatted (was blank)" } else { "" },
                    if v.mounted_now { ", mounted now" } else { ", already mounted" },
                );
                println!(
                    "data     {} created, {} re-owned{}",
                    report.data_dirs.created.len(),
                    report.data_dirs.rechowned.len(),
                    if report.data_dirs.initialised { ", PostgreSQL initialised" } else { "" }
                );
                println!("secrets  {}", report.secrets);
                match &report.recovery.outcome {
                    Some(Recovered::Restored { summary, .. }) => println!("recovery {summary}"),
                    Some(Recovered::NothingToRestore(why)) => println!("recovery nothing to restore: {why}"),
                    None => {}
                }
                println!("done in {} ms", report.took_ms);
            }
            exit::OK
        }
        Err(e) => {
            tracing::error!("firstboot failed: {e}");
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": e.to_string() }));
            }
            exit::FAILURE
        }
    }
}

async fn backup_now(bus: &Option<String>, kind: &str) -> u8 {
    let kind = kind.to_string();
    follow_job(bus, "BackupNow", move |p| async move { p.backup_now(&kind).await }).await
}

async fn update(bus: &Option<String>, args: UpdateArgs) -> u8 {
    let version = match (args.version, args.latest) {
        (Some(v), _) => {
            if let Err(e) = caretaker::release::validate_version(&v) {
                eprintln!("error: {e}");
                return exit::USAGE;
            }
            v
        }
        (None, _) => "latest".to_string(),
    };
    let (dry_run, allow_downgrade) = (args.dry_run, args.allow_downgrade);
    follow_job(bus, "Update", move |p| async move { p.update(&version, dry_run, allow_downgrade).await }).await
}

async fn restore_list_kept(sources: &Sources, json: bool) -> u8 {
    let cfg = match config::load(sources) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    match caretaker::backup::restore::list_kept(&cfg).await {
        Ok(kept) if json => {
            println!("{}", serde_json::to_string_pretty(&kept).unwrap_or_default());
            exit::OK
        }
        Ok(kept) => {
            if kept.is_empty() {
                println!("no databases kept by restores");
            }
            for k in kept {
                println!("{}  {}  {}", k.name, caretaker::units::human_bytes(k.bytes.max(0) as u64), k.comment);
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}

async fn restore_drop_kept(sources: &Sources, name: &str) -> u8 {
    let cfg = match config::load(sources) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    match caretaker::backup::restore::drop_kept(&cfg, name).await {
        Ok(()) => {
            println!("dropped {name}");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}

async fn backup_prune(bus: &Option<String>, dry_run: bool) -> u8 {
    follow_job(bus, "Prune", move |p| async move { p.prune(dry_run).await }).await
}

/// Starts a job with `start`, prints its progress, and maps its outcome to the exit status.
async fn follow_job<F, Fut>(bus: &Option<String>, method: &'static str, start: F) -> u8
where
    F: FnOnce(caretaker::control::client::Caretaker1Proxy<'static>) -> Fut,
    Fut: std::future::Future<Output = zbus::Result<String>>,
{
    let client = match Client::connect(bus.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return client_exit(&e);
        }
    };
    match client.run_job(method, start, |line| println!("{line}")).await {
        Ok(info) if info.state == caretaker::control::jobs::JobState::Succeeded => {
            println!("ok: {}", info.summary);
            exit::OK
        }
        Ok(info) => {
            println!("FAILED: {}", info.summary);
            exit::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            client_exit(&e)
        }
    }
}

async fn backup_list(sources: &Sources, kind: &str, json: bool) -> u8 {
    let cfg = match config::load(sources) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    use caretaker::backup::run::{self, Kind};
    let kinds: Vec<Kind> = if kind == "all" { Kind::all_for(&cfg) } else { Kind::parse_set(kind).unwrap_or_default() };
    let s3 = match run::s3_for(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    let mut all = Vec::new();
    for k in kinds {
        match run::listing(&cfg, &s3, k).await {
            Ok(mut l) => {
                all.append(&mut l.backups);
                for i in &l.ignored {
                    eprintln!("ignored: {}: {} (not a backup this box sealed)", i.key, i.why);
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return exit::FAILURE;
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all).expect("json"));
    } else if all.is_empty() {
        println!("no backups");
    } else {
        for m in &all {
            println!(
                "{:<8} {}  {:>10} → {:>10}  {}",
                m.kind.as_str(),
                m.id,
                caretaker::units::human_bytes(m.plain_bytes),
                caretaker::units::human_bytes(m.stored_bytes),
                m.finished_at
            );
        }
    }
    exit::OK
}

/// The bus to reach the daemon on: `--bus-address`, else the configuration's, else the system bus.
fn cli_bus(flag: &Option<String>, sources: &Sources) -> Option<String> {
    flag.clone().or_else(|| config::load(sources).ok().and_then(|l| l.config.daemon.bus_address))
}

fn client_exit(e: &ClientError) -> u8 {
    match e {
        ClientError::NotRunning { .. } | ClientError::Bus { .. } => exit::UNREACHABLE,
        _ => exit::FAILURE,
    }
}

async fn status(bus: &Option<String>, args: StatusArgs) -> u8 {
    let result = match Client::connect(bus.as_deref()).await {
        Ok(c) => c.status().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(s) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "daemon": s })).expect("json"));
            } else {
                println!("caretaker {} — {}", s.version, s.state);
                println!("  started:  {}", s.started_at);
                println!(
                    "  config:   {}",
                    if s.config_files.is_empty() { "(defaults only)".to_string() } else { s.config_files.join(", ") }
                );
                if !s.last_reload.is_empty() {
                    println!("  reload:   {}", s.last_reload);
                }
                if !s.services.is_empty() {
                    println!("  services:");
                    for svc in &s.services {
                        let state = serde_json::to_value(svc.state)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default();
                        let probe = match &svc.last_probe {
                            Some(p) => format!("{} ms", p.latency_ms),
                            None => "-".into(),
                        };
                        println!(
                            "    {:<9} {:<28} {:<10} probe {:>7}  restarts {}  {}",
                            svc.name, svc.unit, state, probe, svc.restarts, svc.note
                        );
                    }
                }
                if let Some(sc) = &s.schedule {
                    let last = |at: &Option<String>, ok: Option<bool>| match (at, ok) {
                        (Some(at), Some(true)) => format!("last {at} ok"),
                        (Some(at), Some(false)) => format!("last {at} FAILED"),
                        (Some(at), None) => format!("last {at}"),
                        (None, _) => "never".to_string(),
                    };
                    println!(
                        "  backups:  {} — next {}, {}",
                        sc.backup_schedule,
                        sc.next_backup.as_deref().unwrap_or("-"),
                        last(&sc.last_backup, sc.last_backup_ok)
                    );
                    println!(
                        "  drills:   {} — next {}, {}",
                        sc.verify_schedule,
                        sc.next_verify.as_deref().unwrap_or("-"),
                        last(&sc.last_verify, sc.last_verify_ok)
                    );
                }
                if let Some(w) = &s.wal {
                    let lag = w.lag_seconds.map(|l| format!(", newest archived {l} s ago")).unwrap_or_default();
                    println!(
                        "  wal:      {} archived ({} already there), {} failed; last {} at {}; {} waiting{lag}",
                        w.archived,
                        w.already_archived,
                        w.failed,
                        w.last_archived.as_deref().unwrap_or("-"),
                        w.last_archived_at.as_deref().unwrap_or("-"),
                        w.ready
                    );
                    match (&w.window_oldest, &w.window_newest, &w.window_error) {
                        (Some(o), Some(n), _) => println!(
                            "  pitr:     restorable {o} … {n}{} (checked {})",
                            w.window_gap.as_ref().map(|g| format!("; GAP: {g}")).unwrap_or_default(),
                            w.window_checked_at.as_deref().unwrap_or("-")
                        ),
                        (_, _, Some(e)) => println!("  pitr:     window unknown: {e}"),
                        _ => {
                            println!("  pitr:     no base backup with its WAL yet (`caretaker backup now --kind base`)")
                        }
                    }
                }
                if let Some(t) = &s.wal_tip {
                    if t.streaming {
                        let every = match (t.interval_p50_ms, t.interval_p99_ms) {
                            (Some(a), Some(b)) => format!(", every {a} ms (p99 {b} ms)"),
                            _ => String::new(),
                        };
                        println!(
                            "  wal-tip:  RPO {:.1} s ({} flushed, not yet in S3); S3 holds WAL to {} (PostgreSQL at {}); \
                             {} chunks{every}",
                            t.lag_seconds,
                            caretaker::units::human_bytes(t.lag_bytes),
                            t.stored.as_deref().unwrap_or("-"),
                            t.server_flush.as_deref().unwrap_or("-"),
                            t.chunks
                        );
                    } else {
                        let since =
                            t.failing_since.as_ref().map(|s| format!(" (failing since {s})")).unwrap_or_default();
                        println!("  wal-tip:  not streaming{since}: {}", t.last_error.as_deref().unwrap_or("starting"));
                    }
                }
                if let Some(m) = &s.metrics {
                    let failing = match (&m.failing_since, &m.last_error) {
                        (Some(since), Some(e)) => format!("; FAILING since {since}: {e}"),
                        _ => String::new(),
                    };
                    println!(
                        "  metrics:  {} (Deployment={}) every {} s; last published {}; {} failure(s), {} queued, {} dropped{failing}",
                        m.namespace,
                        m.deployment,
                        m.interval_seconds,
                        m.last_published_at.as_deref().unwrap_or("never"),
                        m.failures,
                        m.queued,
                        m.dropped
                    );
                }
                if let Some(job) = &s.current_job {
                    println!("  job:      {} ({}) since {}: {}", job.description, job.id, job.started_at, job.progress);
                }
                if s.incidents.is_empty() {
                    println!("  incidents: none");
                } else {
                    println!("  incidents:");
                    for i in &s.incidents {
                        println!("    since {}  {}  ({})", i.since, i.subject, i.key);
                    }
                }
            }
            exit::OK
        }
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "error": e.to_string(), "reachable": false }));
            }
            eprintln!("error: {e}");
            client_exit(&e)
        }
    }
}

async fn reload(bus: &Option<String>) -> u8 {
    let result = match Client::connect(bus.as_deref()).await {
        Ok(c) => c.reload().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            println!("configuration reloaded");
            exit::OK
        }
        Err(e @ ClientError::Refused { .. }) => {
            eprintln!("error: {e}");
            exit::USAGE
        }
        Err(e) => {
            eprintln!("error: {e}");
            client_exit(&e)
        }
    }
}

fn config_check(path: Option<std::path::PathBuf>, sources: Sources, json: bool) -> u8 {
    let sources = path.map(Sources::file).unwrap_or(sources);
    match config::load(&sources) {
        Ok(loaded) => {
            let files: Vec<String> = loaded.files.iter().map(|p| p.display().to_string()).collect();
            if json {
                println!("{}", serde_json::json!({ "valid": true, "files": files }));
            } else if files.is_empty() {
                println!("ok: no configuration files; the defaults apply");
            } else {
                println!("ok: {}", files.join(", "));
            }
            exit::OK
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "valid": false, "error": e.to_string() }));
            }
            eprintln!("error: {e}");
            exit::USAGE
        }
    }
}

fn config_show(sources: &Sources, json: bool) -> u8 {
    match config::load(sources) {
        Ok(loaded) => {
            let mut value = config::redacted(&loaded.config);
            if json {
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            } else {
                for f in &loaded.files {
                    println!("# from {}", f.display());
                }
                config::without_nulls(&mut value);
                match toml::to_string(&value) {
                    Ok(t) => print!("{t}"),
                    Err(e) => {
                        eprintln!("error: cannot render the configuration as TOML: {e}");
                        return exit::FAILURE;
                    }
                }
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::USAGE
        }
    }
}
