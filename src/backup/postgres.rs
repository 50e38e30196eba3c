//! PostgreSQL's side of a backup and of a verification: one snapshot for both the dump and exact
//! row counts, and the comparison of a restored copy with those counts.
//!
//! A REPEATABLE READ, READ ONLY transaction exports its snapshot (`pg_export_snapshot()`) and
//! stays open while `pg_dump --snapshot=…` dumps it and connections that import it count every
//! table's rows exactly; so the counts in the manifest describe the dump exactly and a restore can
//! be checked table by table.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::pg::{PgError, PgTarget, quote_ident, quote_literal};

/// A held-open, exported snapshot.
pub struct Snapshot {
    client: Client,
    pub id: String,
}

/// Tables whose rows are counted: ordinary and partitioned tables outside the system schemas
/// (partitions are counted through their parent only), largest first so that parallel counting
/// finishes together.
const TABLES: &str =
    concat!("SELECT n.nspname, c.relname ", counted_tables!(), " ORDER BY pg_relation_size(c.oid) DESC, 1, 2");

/// The FROM and WHERE of the tables whose rows are counted ([`TABLES`], [`TREES`]).
macro_rules! counted_tables {
    () => {
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
           AND n.nspname NOT LIKE 'pg_temp%'"
    };
}
use counted_tables;

/// How many connections count rows at once: one per core, 2 to 4.
pub fn count_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 4)
}

/// Exact row counts of every table of `database`, on `workers` connections at once (largest
/// tables first). With `snapshot`, every connection imports it (`SET TRANSACTION SNAPSHOT`), so
/// the counts describe exactly what the exporting transaction — and a `pg_dump --snapshot` — sees.
pub async fn row_counts(
    target: &PgTarget,
    database: &str,
    snapshot: Option<&str>,
    workers: usize,
) -> Result<BTreeMap<String, i64>, PgError> {
    let clients = counting_clients(target, database, snapshot, workers).await?;
    let tables = tables_to_count(&clients[0]).await?;
    count_rows(&clients, tables).await
}

/// The tables [`row_counts`] counts, as `(schema, table)`, largest first.
pub async fn tables_to_count(client: &Client) -> Result<Vec<(String, String)>, PgError> {
    Ok(client.query(TABLES, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `workers` connections to `database`, each in a REPEATABLE READ, READ ONLY transaction (in
/// `snapshot` when given: once this returns, the exporter may end its transaction).
pub async fn counting_clients(
    target: &PgTarget,
    database: &str,
    snapshot: Option<&str>,
    workers: usize,
) -> Result<Vec<Client>, PgError> {
    let mut clients = Vec::new();
    for _ in 0..workers.max(1) {
        let client = target.connect(database, Duration::from_secs(30)).await?;
        let mut begin = String::from("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;");
        if let Some(id) = snapshot {
            begin.push_str(&format!(" SET TRANSACTION SNAPSHOT {};", quote_literal(id)));
        }
        client.batch_execute(&begin).await?;
        clients.push(client);
    }
    Ok(clients)
}

/// `count(*)` of each of `tables`, spread over `clients` (which then commit).
pub async fn count_rows(clients: &[Client], tables: Vec<(String, String)>) -> Result<BTreeMap<String, i64>, PgError> {
    let queue = std::sync::Mutex::new(tables.into_iter());
    let counted = futures_util::future::try_join_all(clients.iter().map(|client| {
        let queue = &queue;
        async move {
            let mut counts = Vec::new();
            loop {
                let next = queue.lock().expect("not poisoned").next();
                let Some((schema, table)) = next else { break };
                let sql = format!("SELECT count(*) FROM {}.{}", quote_ident(&schema), quote_ident(&table));
                let n: i64 = client.query_one(&sql, &[]).await?.get(0);
                counts.push((format!("{schema}.{table}"), n));
            }
            let _ = client.batch_execute("COMMIT").await;
            Ok::<_, PgError>(counts)
        }
    }))
    .await?;
    Ok(counted.into_iter().flatten().collect())
}

/// Each counted table (as [`TABLES`]) with every relation `count(*)` on it reads: itself and its
/// inheritance or partition descendants, each with its kind and whether an extension owns it.
const TREES: &str = concat!(
    "WITH RECURSIVE roots AS (SELECT c.oid ",
    counted_tables!(),
    "), \
     tree(root, rel) AS (SELECT oid, oid FROM roots \
       UNION SELECT t.root, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.rel) \
     SELECT rn.nspname, r.relname, n.nspname, c.relname, c.relkind::text, \
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid \
               AND d.deptype = 'e') \
     FROM tree t JOIN pg_class r ON r.oid = t.root JOIN pg_namespace rn ON rn.oid = r.relnamespace \
     JOIN pg_class c ON c.oid = t.rel JOIN pg_namespace n ON n.oid = c.relnamespace"
);

/// How a backup's row counts were taken.
#[derive(Debug, Default, PartialEq)]
pub struct Census {
    pub counts: BTreeMap<String, i64>,
    /// Tables counted from the dump's stream.
    pub from_dump: usize,
    /// Tables counted with `count(*)`: an extension's (pg_dump holds only the rows the
    /// extension did not make), or with a descendant the dump holds no rows of (a foreign table).
    pub by_sql: Vec<String>,
}

/// The exact row counts of every table of `database` in `snapshot`, from what pg_dump's stream
/// held (`dumped`: rows per `schema.table`, [`crate::backup::dump_scan`]) wherever that equals
/// `count(*)`: a table's count is the sum of its own rows and its descendants' (inheritance
/// children, partitions), as `count(*)` on it is. Tables the dump cannot answer for are counted
/// with SQL in the same snapshot (small: extension configuration tables such as PostGIS's
/// `spatial_ref_sys`).
pub async fn counts_with_dump(
    target: &PgTarget,
    database: &str,
    snapshot: &str,
    dumped: &crate::backup::dump_scan::DumpCounts,
) -> Result<Census, PgError> {
    let client = target.connect(database, Duration::from_secs(30)).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {};",
            quote_literal(snapshot)
        ))
        .await?;
    // root → (sum from the dump, or None once one member cannot be answered from it)
    let mut roots: BTreeMap<(String, String), Option<i64>> = BTreeMap::new();
    for row in client.query(TREES, &[]).await? {
        let root: (String, String) = (row.get(0), row.get(1));
        let (schema, name, kind, extension): (String, String, String, bool) =
            (row.get(2), row.get(3), row.get(4), row.get(5));
        let slot = roots.entry(root).or_insert(Some(0));
        let rows = match kind.as_str() {
            "p" => Some(0),
            "r" if !extension => dumped.get(&format!("{schema}.{name}")).map(|n| *n as i64),
            _ => None,
        };
        *slot = slot.zip(rows).map(|(a, b)| a + b);
    }
    let mut census = Census::default();
    for ((schema, table), rows) in roots {
        let key = format!("{schema}.{table}");
        let n = match rows {
            Some(n) => {
                census.from_dump += 1;
                n
            }
            None => {
                let sql = format!("SELECT count(*) FROM {}.{}", quote_ident(&schema), quote_ident(&table));
                census.by_sql.push(key.clone());
                client.query_one(&sql, &[]).await?.get(0)
            }
        };
        census.counts.insert(key, n);
    }
    let _ = client.batch_execute("COMMIT").await;
    Ok(census)
}

/// Lowers the CPU priority of the PostgreSQL backends whose `application_name` is `app` (the
/// one serving a backup's pg_dump) to `p`, once they appear (within ~5 s); returns their pids
/// with the priority the kernel then reports for each.
/// The backends belong to the postgres user: this takes CAP_SYS_NICE (the daemon's unit has it).
pub async fn lower_backends(
    target: &PgTarget,
    app: &str,
    p: crate::priority::Priority,
) -> Result<Vec<(u32, Option<crate::priority::Priority>)>, PgError> {
    if !p.lowers() {
        return Ok(vec![]);
    }
    let client = target.connect("postgres", Duration::from_secs(10)).await?;
    // Every 10 ms for the first second (a small database's dump is over in a few hundred ms and
    // its backend must be lowered while it runs), then every 100 ms: about 5 s in all.
    for attempt in 0..140 {
        let pids: Vec<u32> = client
            .query("SELECT pid FROM pg_stat_activity WHERE application_name = $1", &[&app])
            .await?
            .iter()
            .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
            .collect();
        if !pids.is_empty() {
            let mut lowered = Vec::with_capacity(pids.len());
            for pid in pids {
                if let Err(e) = crate::priority::lower(pid, p) {
                    tracing::warn!("cannot lower the priority of PostgreSQL backend {pid} ({app}) to {p}: {e}");
                }
                lowered.push((pid, crate::priority::Priority::of(pid).ok()));
            }
            return Ok(lowered);
        }
        tokio::time::sleep(Duration::from_millis(if attempt < 100 { 10 } else { 100 })).await;
    }
    Ok(vec![])
}

/// Runs `work` (a producer's stream: pg_dump's upload, pg_restore's load) while the PostgreSQL
/// backends serving `tool` (application name `app`) are lowered to `p` once they appear; work
/// that ends sooner does not wait for them. Says in the journal what ran at which priority, as
/// the kernel reported it.
pub async fn while_lowered<F: std::future::Future>(
    target: &PgTarget,
    tool: &str,
    app: &str,
    p: crate::priority::Priority,
    work: F,
) -> F::Output {
    let lowering = lower_backends(target, app, p);
    tokio::pin!(work, lowering);
    let mut lowered = None;
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            l = &mut lowering, if lowered.is_none() => lowered = Some(l),
        }
    };
    match lowered {
        _ if !p.lowers() => {}
        Some(Ok(backends)) if !backends.is_empty() => {
            let pids: Vec<u32> = backends.iter().map(|(pid, _)| *pid).collect();
            if backends.iter().all(|(_, seen)| *seen == Some(p)) {
                tracing::info!(backends = ?pids, "{tool} and its PostgreSQL backend run at {p}")
            } else {
                let seen: Vec<String> =
                    backends.iter().map(|(_, s)| s.map_or_else(|| "gone".to_string(), |s| s.to_string())).collect();
                tracing::info!(backends = ?pids, "{tool} runs at {p}, its PostgreSQL backend at {}", seen.join(", "))
            }
        }
        Some(Err(e)) => tracing::warn!("cannot find {tool}'s PostgreSQL backend to lower its priority: {e}"),
        _ => tracing::info!("{tool} ran at {p} (done before its PostgreSQL backend was seen)"),
    }
    out
}

impl Snapshot {
    /// Opens the transaction and exports its snapshot; a backup then counts rows in it (with
    /// [`row_counts`] in [`Snapshot::id`]) while pg_dump streams it.
    pub async fn export(target: &PgTarget, database: &str) -> Result<Snapshot, PgError> {
        let client = target.connect(database, Duration::from_secs(30)).await?;
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
        let id: String = client.query_one("SELECT pg_export_snapshot()", &[]).await?.get(0);
        Ok(Snapshot { client, id })
    }

    /// Ends the transaction (after pg_dump has finished with the snapshot).
    pub async fn end(self) -> Result<(), PgError> {
        self.client.batch_execute("COMMIT").await?;
        Ok(())
    }
}

/// pg_dump's arguments for a custom-format, uncompressed dump of `database` in `snapshot`,
/// connecting over the unix socket as the OS user (peer authentication).
pub fn pg_dump_args(target: &PgTarget, database: &str, snapshot: &str) -> Vec<String> {
    vec![
        "--format=custom".into(),
        "--compress=0".into(),
        format!("--snapshot={snapshot}"),
        format!("--host={}", target.socket_dir.display()),
        format!("--port={}", target.port),
        format!("--username={}", target.user),
        format!("--dbname={database}"),
        "--no-password".into(),
    ]
}

/// Tables whose counts differ between `expected` and `actual`: (table, expected, actual), with
/// a missing table as -1.
pub fn compare_counts(expected: &BTreeMap<String, i64>, actual: &BTreeMap<String, i64>) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for (t, e) in expected {
        let a = actual.get(t).copied().unwrap_or(-1);
        if a != *e {
            out.push((t.clone(), *e, a));
        }
    }
    for (t, a) in actual {
        if !expected.contains_key(t) {
            out.push((t.clone(), -1, *a));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_compared_both_ways() {
        let e = BTreeMap::from([("public.a".to_string(), 3), ("public.b".to_string(), 5)]);
        let a = BTreeMap::from([("public.a".to_string(), 3), ("public.c".to_string(), 1)]);
        let d = compare_counts(&e, &a);
        assert_eq!(d, vec![("public.b".into(), 5, -1), ("public.c".into(), -1, 1)]);
        assert!(compare_counts(&e, &e).is_empty());
    }
}
