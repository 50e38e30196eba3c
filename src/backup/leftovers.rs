//! What jobs create beside the live data — a restore's new database, a drill's scratch database,
//! a migration's copy — is recorded before it is created and forgotten once it is dropped or
//! renamed into place (`/var/lib/caretaker/created.json`). A job killed at any moment therefore
//! leaves a record of what it left, whatever the database it worked on: the next daemon start
//! drops what the record still names. Only names of the shapes caretaker creates are ever dropped
//! from the record, and never the configured live databases.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::pg::{PgError, PgTarget, quote_ident};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    databases: BTreeSet<String>,
    /// The daemon process that created each database: cleanup at start leaves alone what this
    /// very process created (a job may already be running when the cleanup gets to it).
    #[serde(default)]
    creators: std::collections::BTreeMap<String, u64>,
}

static LOCK: Mutex<()> = Mutex::new(());

/// This daemon process, as the record names it: a random number drawn once (a pid can be reused by
/// the next daemon).
fn this_process() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    })
}

fn path() -> PathBuf {
    #[cfg(test)]
    if let Some(p) = TEST_PATH.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return p;
    }
    Path::new(crate::envfile::STATE_DIR).join("created.json")
}

#[cfg(test)]
static TEST_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

fn load() -> Record {
    std::fs::read(path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn change(f: impl FnOnce(&mut Record)) -> Result<(), PgError> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut r = load();
    f(&mut r);
    let json = serde_json::to_vec_pretty(&r).expect("record serializes");
    let p = path();
    if let Some(dir) = p.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    crate::fsutil::write_atomic(&p, &json, 0o600, None)
        .map_err(|e| PgError::Refused(format!("cannot record what this job creates ({}): {e}", p.display())))
}

/// Whether `name` has a shape caretaker gives the databases it creates.
pub fn is_ours(name: &str) -> bool {
    name.starts_with("caretaker_verify_")
        || ["_restore_", "_migrate_"]
            .iter()
            .any(|infix| name.rsplit_once(infix).is_some_and(|(head, stamp)| !head.is_empty() && is_stamp(stamp)))
}

/// Whether `s` has the shape of [`super::swap::stamp`]: `YYYYMMDD_HHMMSS`.
pub(super) fn is_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 15 && b[8] == b'_' && b.iter().enumerate().all(|(i, c)| i == 8 || c.is_ascii_digit())
}

/// Records `name`, then creates it (empty, from template0). Refused when the record cannot be
/// written: nothing is created that a killed job could leave behind unrecorded.
/// With `owner`, the new database belongs to that role.
pub async fn create_database(target: &PgTarget, name: &str, owner: Option<&str>) -> Result<(), PgError> {
    change(|r| {
        r.databases.insert(name.to_string());
        r.creators.insert(name.to_string(), this_process());
    })?;
    let owner = owner.map(|o| format!(" OWNER {}", quote_ident(o))).unwrap_or_default();
    let created = async {
        let admin = target.connect("postgres", std::time::Duration::from_secs(30)).await?;
        admin.batch_execute(&format!("CREATE DATABASE {} TEMPLATE template0{owner}", quote_ident(name))).await?;
        Ok::<(), PgError>(())
    }
    .await;
    if created.is_err() {
        // Nothing was created — or the name was someone else's (a kept copy of the same second):
        // the record must not make the next start drop it.
        forget(name);
    }
    created
}

/// Drops `name` if it exists and forgets it.
pub async fn drop_database(target: &PgTarget, name: &str) -> Result<(), PgError> {
    target.drop_database(name).await?;
    forget(name);
    Ok(())
}

/// `name` was renamed into place (or is otherwise no longer ours to clean up).
pub fn forget(name: &str) {
    if let Err(e) = change(|r| {
        r.databases.remove(name);
        r.creators.remove(name);
    }) {
        tracing::warn!("{e}");
    }
}

/// The databases the record names that an earlier daemon process created: what killed jobs left
/// behind. What this process created belongs to a job that may be running now.
pub fn recorded() -> Vec<String> {
    let r = load();
    let me = this_process();
    r.databases.into_iter().filter(|d| r.creators.get(d) != Some(&me)).collect()
}

/// The databases this daemon process created and has not dropped or renamed yet: a running job's.
pub fn created_here() -> Vec<String> {
    let r = load();
    let me = this_process();
    r.databases.into_iter().filter(|d| r.creators.get(d) == Some(&me)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shapes_caretaker_creates_are_ours() {
        assert!(is_ours("zmanim_restore_20261122_170501"));
        assert!(is_ours("other_db_restore_20261122_170501"));
        assert!(is_ours("zmanim_migrate_20261122_170501"));
        assert!(is_ours("caretaker_verify_20261122t030000z_a1b2c3"));
        for not in ["zmanim", "postgres", "template1", "_restore_20261122_170501", "zmanim_restore_2026", "x_restore_"]
        {
            assert!(!is_ours(not), "{not}");
        }
    }

    #[test]
    fn what_this_process_created_is_not_a_leftover_of_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("created.json");
        std::fs::write(&file, r#"{"databases": ["zmanim_restore_20261122_170501"]}"#).unwrap();
        *TEST_PATH.lock().unwrap() = Some(file);
        change(|r| {
            r.databases.insert("reports_restore_20261122_170502".into());
            r.creators.insert("reports_restore_20261122_170502".into(), this_process());
        })
        .unwrap();
        assert_eq!(recorded(), vec!["zmanim_restore_20261122_170501".to_string()]);
        assert_eq!(created_here(), vec!["reports_restore_20261122_170502".to_string()]);
        forget("reports_restore_20261122_170502");
        assert!(created_here().is_empty());
        *TEST_PATH.lock().unwrap() = None;
    }
}
