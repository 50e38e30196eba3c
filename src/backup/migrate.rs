//! `caretaker migrate`: copy an external PostgreSQL into a NEW local database and prove the copy
//! equals the source before anything live is touched.
//!
//! The source connection string comes from an SSM SecureString or a root-only file — never from a
//! command-line value (it would land in SSM command history and `ps`); the password reaches
//! pg_dump through `PGPASSWORD`, never its arguments. In order:
//! 1. one REPEATABLE READ snapshot on the source: exported, row counts taken in it;
//! 2. `pg_dump --snapshot` of the source piped straight into `pg_restore` (no file) into
//!    `DB_migrate_TS`;
//! 3. verification of the new database against the source *as it is now*: per-table row counts,
//!    per-table checksums (md5 over the rows' md5s, ordered by primary key) for tables that have
//!    one, and for PostGIS geometry columns the count of non-null and of valid geometries. A source
//!    written to after the dump shows as MISMATCH: stop writes before a go-live migration.
//! 4. the report (`table  source  target  [OK]|MISMATCH`) as text and JSON; any mismatch → error,
//!    no swap. With `swap`, the new database replaces the live one as a restore does.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use super::swap::SwapError;
use crate::config::Config;
use crate::pg::PgTarget;
use crate::pg::quote_ident;

/// Where the source connection string comes from.
#[derive(Debug, Clone)]
pub enum Source {
    SsmParameter(String),
    File(std::path::PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the source connection string: {0}")]
    Source(String),
    #[error("the source database: {0}")]
    SourceDb(String),
    #[error("the local database: {0}")]
    Local(String),
    /// pg_dump or pg_restore exited non-zero (its stderr is in the journal).
    #[error("{0}")]
    Tool(String),
    #[error(
        "the copy does not match the source ({} mismatches); nothing was swapped; the copy is kept as {database} for inspection (drop it with `caretaker restore drop-kept {database}`)",
        mismatches
    )]
    Mismatch { mismatches: usize, database: String, report: Box<Report> },
    #[error("{0}")]
    Swap(#[from] SwapError),
}

/// One line of the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// `schema.table`, `schema.table checksum`, `schema.table.column geometries`, …
    pub what: String,
    pub source: String,
    pub target: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub database: String,
    pub started_at: String,
    pub finished_at: String,
    pub checks: Vec<Check>,
    pub ok: bool,
    /// Set when the copy was swapped in: the previous database, kept.
    pub kept: Option<String>,
}

impl Report {
    /// The seeds' style: `table  source  target  [OK]` / `MISMATCH`.
    pub fn text(&self) -> String {
        let w = self.checks.iter().map(|c| c.what.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:<w$}  {:>34}  {:>34}\n", "table", "source", "target");
        for c in &self.checks {
            out.push_str(&format!(
                "{:<w$}  {:>34}  {:>34}  {}\n",
                c.what,
                c.source,
                c.target,
                if c.ok { "[OK]" } else { "MISMATCH" }
            ));
        }
        out
    }
}

/// Reads the connection string (never logged). A file must be owned by root and not readable by
/// group or others.
pub async fn read_source(cfg: &Config, source: &Source) -> Result<String, MigrateError> {
    let url = match source {
        Source::File(path) => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).map_err(|e| MigrateError::Source(format!("{}: {e}", path.display())))?;
            if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
                return Err(MigrateError::Source(format!(
                    "{} must be owned by root with mode 0600 or 0400 (it holds a password); it is uid {} mode {:o}",
                    path.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                )));
            }
            std::fs::read_to_string(path).map_err(|e| MigrateError::Source(format!("{}: {e}", path.display())))?
        }
        Source::SsmParameter(name) => {
            let (parent, _) = name
                .rsplit_once('/')
                .filter(|(p, _)| !p.is_empty())
                .ok_or_else(|| MigrateError::Source(format!("`{name}` is not a parameter name like /app/env/name")))?;
            let region = crate::aws::region::local(&cfg.aws).map_err(|e| MigrateError::Source(e.to_string()))?;
            let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region.name).await;
            let ssm = crate::aws::ssm::SsmClient::new(crate::aws::sdk::ssm_client(&sdk, &cfg.aws));
            let params = ssm.get_parameters_by_path(parent).await.map_err(|e| MigrateError::Source(e.to_string()))?;
            let p = params
                .into_iter()
                .find(|p| p.name == *name)
                .ok_or_else(|| MigrateError::Source(format!("no SSM parameter {name}")))?;
            p.value.expose().to_string()
        }
    };
    Ok(url.trim().to_string())
}

struct SourceConn {
    config: tokio_postgres::Config,
}

impl SourceConn {
    fn parse(url: &str) -> Result<SourceConn, MigrateError> {
        // The error text of a bad URL may quote it: say only what is wrong in general.
        let config: tokio_postgres::Config = url.parse().map_err(|_| {
            MigrateError::Source("not a PostgreSQL connection string (postgres://USER:PASSWORD@HOST:PORT/DB)".into())
        })?;
        if config.get_dbname().is_none() || config.get_hosts().is_empty() {
            return Err(MigrateError::Source("the connection string must name a host and a database".into()));
        }
        Ok(SourceConn { config })
    }

    fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        format!(
            "{}@{host}:{}/{}",
            self.config.get_user().unwrap_or("?"),
            self.config.get_ports().first().copied().unwrap_or(5432),
            self.config.get_dbname().unwrap_or("?")
        )
    }

    async fn connect(&self) -> Result<Client, MigrateError> {
        let (client, conn) = tokio::time::timeout(Duration::from_secs(30), self.config.connect(NoTls))
            .await
            .map_err(|_| MigrateError::SourceDb(format!("{} did not answer within 30 s", self.describe())))?
            .map_err(|e| MigrateError::SourceDb(format!("{}: {e}", self.describe())))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// pg_dump's connection arguments and environment (the password only in the environment).
    fn pg_dump(&self, mut cmd: tokio::process::Command, snapshot: &str) -> tokio::process::Command {
        if let Some(tokio_postgres::config::Host::Tcp(h)) = self.config.get_hosts().first() {
            cmd.arg(format!("--host={h}"));
        }
        cmd.arg(format!("--port={}", self.config.get_ports().first().copied().unwrap_or(5432)));
        if let Some(u) = self.config.get_user() {
            cmd.arg(format!("--username={u}"));
        }
        cmd.arg(format!("--dbname={}", self.config.get_dbname().unwrap_or_default()));
        cmd.args(["--format=custom", "--compress=0", "--no-password", &format!("--snapshot={snapshot}")]);
        if let Some(p) = self.config.get_password() {
            cmd.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
        }
        cmd
    }
}

/// Tables (ordinary and partitioned roots) with their primary key columns.
const TABLES: &str = "SELECT n.nspname, c.relname, \
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}') \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
       AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1, 2";

/// Every check value of a database: rows, checksums, geometry counts (in its current snapshot).
async fn measure(client: &Client) -> Result<BTreeMap<String, String>, tokio_postgres::Error> {
    let mut out = BTreeMap::new();
    for row in client.query(TABLES, &[]).await? {
        let (schema, table, pk): (String, String, Vec<String>) = (row.get(0), row.get(1), row.get(2));
        let name = format!("{schema}.{table}");
        let q = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let n: i64 = client.query_one(&format!("SELECT count(*) FROM {q}"), &[]).await?.get(0);
        out.insert(format!("{name} rows"), n.to_string());
        if !pk.is_empty() {
            let order = pk.iter().map(|c| format!("t.{}", quote_ident(c))).collect::<Vec<_>>().join(", ");
            let sum: Option<String> = client
                .query_one(&format!("SELECT md5(string_agg(md5(t::text), '' ORDER BY {order})) FROM {q} t"), &[])
                .await?
                .get(0);
            out.insert(format!("{name} checksum"), sum.unwrap_or_else(|| "empty".into()));
        }
    }
    let has_postgis = client.query_opt("SELECT 1 FROM pg_extension WHERE extname = 'postgis'", &[]).await?.is_some();
    if has_postgis {
        let cols = client
            .query(
                "SELECT f_table_schema::text, f_table_name::text, f_geometry_column::text FROM geometry_columns ORDER BY 1, 2, 3",
                &[],
            )
            .await?;
        for c in cols {
            let (s, t, col): (String, String, String) = (c.get(0), c.get(1), c.get(2));
            let r = client
                .query_one(
                    &format!(
                        "SELECT count({c}), count(*) FILTER (WHERE ST_IsValid({c})) FROM {}.{}",
                        quote_ident(&s),
                        quote_ident(&t),
                        c = quote_ident(&col)
                    ),
                    &[],
                )
                .await?;
            let (nonnull, valid): (i64, i64) = (r.get(0), r.get(1));
            out.insert(format!("{s}.{t}.{col} geometries"), format!("{nonnull} non-null, {valid} valid"));
        }
    }
    Ok(out)
}

fn compare(source: &BTreeMap<String, String>, target: &BTreeMap<String, String>) -> Vec<Check> {
    let mut keys: Vec<&String> = source.keys().chain(target.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let s = source.get(k).cloned().unwrap_or_else(|| "missing".into());
            let t = target.get(k).cloned().unwrap_or_else(|| "missing".into());
            Check { what: k.clone(), ok: s == t, source: s, target: t }
        })
        .collect()
}

/// Runs a migration; see the module docs. Returns the report (also written to `report_path`).
pub async fn migrate(
    cfg: &Config,
    source: &Source,
    swap: Option<&crate::systemd::manager::Systemd>,
    report_path: &Path,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Report, MigrateError> {
    let url = read_source(cfg, source).await?;
    let src = SourceConn::parse(&url)?;
    drop(url);
    let live = cfg.backup.database.clone();
    let (ts, new) =
        super::swap::unused_name(&PgTarget::new(&cfg.services.postgres), |ts| format!("{live}_migrate_{ts}"))
            .await
            .map_err(|e| MigrateError::Local(e.to_string()))?;
    let started_at = crate::units::now_rfc3339();

    // 1. The snapshot.
    progress(format!("dump: connecting to {}", src.describe()));
    let snap = src.connect().await?;
    snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(|e| MigrateError::SourceDb(e.to_string()))?;
    let snapshot: String = snap
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| MigrateError::SourceDb(e.to_string()))?
        .get(0);

    // 2. pg_dump | pg_restore into the new database.
    let target = PgTarget::new(&cfg.services.postgres);
    let source_bytes: Option<i64> =
        snap.query_one("SELECT pg_database_size(current_database())", &[]).await.ok().map(|r| r.get(0));
    let need = super::room::estimate(source_bytes.and_then(|b| u64::try_from(b).ok()), 0);
    let plan = super::room::check(
        &target,
        &cfg.services.postgres.data_dir,
        cfg.backup.restore_reserve,
        need,
        &format!("the copy of {}", src.describe()),
    )
    .await
    .map_err(MigrateError::Local)?;
    // pg_restore runs as the unprivileged restore role: the source is another server, and what it
    // holds (a CHECK calling a function, an index expression) runs while the copy is loaded.
    let restorer = super::unprivileged::prepare(&target).await.map_err(|e| MigrateError::Local(e.to_string()))?;
    super::leftovers::create_database(&target, &new, Some(super::unprivileged::ROLE))
        .await
        .map_err(|e| MigrateError::Local(e.to_string()))?;
    progress(format!("restore: pg_dump of {} streaming into the new database {new}", src.describe()));
    let copied = tokio::select! {
        r = copy(&src, &snapshot, cfg, &new, &restorer, progress) => r,
        why = super::room::until_short(&plan) => Err(MigrateError::Local(why)),
    };
    let _ = snap.batch_execute("COMMIT").await;
    // Every object to the owner of the database it will replace (else the server's superuser).
    let copied = match copied {
        Ok(()) => super::unprivileged::hand_to_owner_of(&target, &new, &live, None)
            .await
            .map(drop)
            .map_err(|e| MigrateError::Local(e.to_string())),
        Err(e) => Err(e),
    };
    if let Err(e) = copied {
        let _ = super::verify::drop_database(cfg, &new).await;
        return Err(e);
    }

    // 3. Verify against the source as it is now.
    progress("verify: rows, checksums and geometries, source against the copy".into());
    let source_now = measure(&src.connect().await?).await.map_err(|e| MigrateError::SourceDb(e.to_string()))?;
    let copy_client =
        target.connect(&new, Duration::from_secs(30)).await.map_err(|e| MigrateError::Local(e.to_string()))?;
    let target_now = measure(&copy_client).await.map_err(|e| MigrateError::Local(e.to_string()))?;
    drop(copy_client);
    let checks = compare(&source_now, &target_now);
    let ok = checks.iter().all(|c| c.ok);
    let mut report =
        Report { database: new.clone(), started_at, finished_at: crate::units::now_rfc3339(), ok, checks, kept: None };
    for line in report.text().lines() {
        progress(format!("verify: {line}"));
    }
    let write = |r: &Report| {
        let json = serde_json::to_vec_pretty(r).expect("report serializes");
        if let Some(dir) = report_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = crate::fsutil::write_atomic(report_path, &json, 0o644, None) {
            tracing::warn!("cannot write the migration report: {e}");
        }
    };
    write(&report);
    if !ok {
        let mismatches = report.checks.iter().filter(|c| !c.ok).count();
        return Err(MigrateError::Mismatch { mismatches, database: new, report: Box::new(report) });
    }

    // 4. Swap.
    if let Some(systemd) = swap {
        progress(format!("swap: {new} → {live}"));
        let kept = super::swap::swap_in(cfg, systemd, &live, &new, &ts, progress).await?;
        report.kept = kept;
        report.database = live;
        write(&report);
    }
    Ok(report)
}

async fn copy(
    src: &SourceConn,
    snapshot: &str,
    cfg: &Config,
    new: &str,
    restorer: &PgTarget,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), MigrateError> {
    let target = PgTarget::new(&cfg.services.postgres);
    let local = |e: crate::pg::PgError| MigrateError::Local(e.to_string());
    let dump = || -> Result<(tokio::process::Child, Stdio), MigrateError> {
        let mut dump = src
            .pg_dump(target.tool("pg_dump").map_err(local)?, snapshot)
            .spawn()
            .map_err(|e| MigrateError::Local(format!("cannot run pg_dump: {e}")))?;
        let out: Stdio = dump
            .stdout
            .take()
            .expect("piped")
            .try_into()
            .map_err(|e: std::io::Error| MigrateError::Local(e.to_string()))?;
        Ok((dump, out))
    };

    // Pass 1: the table of contents of the same snapshot (same dump ids), for the extensions.
    let (mut head, head_out) = dump()?;
    let listed = restorer
        .tool("pg_restore")
        .map_err(local)?
        .arg("--list")
        .stdin(head_out)
        .output()
        .await
        .map_err(|e| MigrateError::Local(format!("cannot run pg_restore: {e}")))?;
    let _ = head.kill().await;
    if !listed.status.success() {
        let stderr = String::from_utf8_lossy(&listed.stderr);
        return Err(MigrateError::Tool(crate::pg::tool_failure(
            "pg_restore --list",
            &listed.status.to_string(),
            &stderr,
        )));
    }
    let toc = String::from_utf8_lossy(&listed.stdout).into_owned();
    let list = super::unprivileged::prepare_load(&target, new, &toc, progress).await.map_err(local)?;

    // Pass 2: the whole copy, as the restore role.
    let (mut dump, dump_out) = dump()?;
    let mut restore = restorer
        .tool("pg_restore")
        .map_err(local)?
        .args(restorer.tool_args(new))
        .args(["--exit-on-error", "--no-owner", "--no-privileges"])
        .arg(format!("--use-list={}", list.path().display()))
        .stdin(dump_out)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| MigrateError::Local(format!("cannot run pg_restore: {e}")))?;
    let d_err = crate::pg::collect_stderr(dump.stderr.take());
    let r_err = crate::pg::collect_stderr(restore.stderr.take());
    let (d, r) = tokio::join!(dump.wait(), restore.wait());
    let (d_err, r_err) = (d_err.await.unwrap_or_default(), r_err.await.unwrap_or_default());
    let d = d.map_err(|e| MigrateError::Local(e.to_string()))?;
    let r = r.map_err(|e| MigrateError::Local(e.to_string()))?;
    if !d.success() {
        return Err(MigrateError::Tool(crate::pg::tool_failure("pg_dump", &d.to_string(), &d_err)));
    }
    if !r.success() {
        return Err(MigrateError::Tool(crate::pg::tool_failure("pg_restore", &r.to_string(), &r_err)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_marks_mismatches_and_missing_tables() {
        let s: BTreeMap<String, String> =
            [("public.a rows", "3"), ("public.b rows", "1")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let t: BTreeMap<String, String> =
            [("public.a rows", "3"), ("public.c rows", "2")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let checks = compare(&s, &t);
        assert_eq!(checks.iter().filter(|c| c.ok).count(), 1);
        let r = Report {
            database: "x".into(),
            started_at: String::new(),
            finished_at: String::new(),
            ok: false,
            checks,
            kept: None,
        };
        let text = r.text();
        assert!(text.contains("public.a rows") && text.contains("[OK]"), "{text}");
        assert!(text.contains("public.b rows") && text.contains("missing") && text.contains("MISMATCH"), "{text}");
    }

    #[test]
    fn bad_connection_strings_are_refused_without_echoing_them() {
        let e = SourceConn::parse("postgres://u:hunter2@").err().unwrap().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(SourceConn::parse("postgres://u:pw@db.example:5432/app").is_ok());
    }
}
