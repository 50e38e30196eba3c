//! pg_restore runs without superuser: as the OS user and database role `caretaker_restore`
//! (peer authentication, from sysusers.d/caretaker.conf), into a new database that role owns.
//!
//! A dump is SQL that pg_restore executes. Run as a superuser, a planted object in it — a CHECK
//! constraint or domain calling a function the API's role wrote, a hostile TOC entry in a forged
//! archive — runs with superuser rights (`COPY … TO PROGRAM` is a shell). As `caretaker_restore`
//! it runs with the rights of a role that owns only the new database and is a member of nothing.
//!
//! What only a superuser may do is done by caretaker itself, around pg_restore: creating the new
//! database (owned by the role), creating the extensions the archive's table of contents names
//! (they are then skipped in the restore list, with their comments), and — for a restore, after
//! every check — handing every object to the live database's owner (`REASSIGN OWNED`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::pg::{PgError, PgTarget, quote_ident};

/// The role and OS user pg_restore runs as.
pub const ROLE: &str = "caretaker_restore";

/// Makes sure the role exists as a login role with no privilege at all (whatever someone made of
/// it since) and returns the target to run pg_restore as. Refused when the OS user is missing.
pub async fn prepare(admin: &PgTarget) -> Result<PgTarget, PgError> {
    if nix::unistd::User::from_name(ROLE).ok().flatten().is_none() {
        return Err(PgError::Refused(format!(
            "the OS user {ROLE} does not exist: drills and restores run pg_restore as it (the package's \
             sysusers.d/caretaker.conf creates it: run `systemd-sysusers`)"
        )));
    }
    let client = admin.connect("postgres", std::time::Duration::from_secs(30)).await?;
    let role = quote_ident(ROLE);
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN CREATE ROLE {role} LOGIN; END IF;
             END $$;
             ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT
               PASSWORD NULL CONNECTION LIMIT 4;"
        ))
        .await?;
    // Memberships someone granted it (pg_execute_server_program, pg_write_server_files, …); it
    // inherits only the implicit pg_database_owner of the database it owns.
    let granted = client
        .query(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
             JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = $1",
            &[&ROLE],
        )
        .await?;
    for row in granted {
        let name: String = row.get(0);
        tracing::warn!("revoking {name} from {ROLE}: it must hold no privilege");
        client.batch_execute(&format!("REVOKE {} FROM {role}", quote_ident(&name))).await?;
    }
    Ok(PgTarget { user: ROLE.into(), ..admin.clone() })
}

/// The extensions a `pg_restore --list` output creates (`N; 3079 OID EXTENSION - NAME OWNER`).
pub fn extensions(toc: &str) -> Vec<String> {
    toc.lines().filter_map(|l| entry(l).and_then(|e| e.strip_prefix("EXTENSION - "))).filter_map(name).collect()
}

/// The list pg_restore is given: the table of contents with the extensions caretaker created and
/// their comments commented out (only an extension's owner may comment on it). The order is kept:
/// the archive arrives on a pipe and cannot be read out of order.
pub fn restore_list(toc: &str, created: &[String]) -> String {
    let mut out = String::with_capacity(toc.len());
    for line in toc.lines() {
        let skip = entry(line).is_some_and(|e| {
            let ext = e.strip_prefix("EXTENSION - ").or_else(|| e.strip_prefix("COMMENT - EXTENSION "));
            ext.and_then(name).is_some_and(|n| created.contains(&n))
        });
        if skip {
            out.push(';');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// An entry's description onwards (`EXTENSION - postgis postgres`), without id and OIDs.
fn entry(line: &str) -> Option<&str> {
    if line.starts_with(';') {
        return None;
    }
    let (_, rest) = line.split_once("; ")?;
    let mut parts = rest.splitn(3, ' ');
    let (_tableoid, _oid) = (parts.next()?, parts.next()?);
    parts.next()
}

/// The extension name at the start of `rest`, when it is a plain one (what CREATE EXTENSION
/// takes without quoting surprises).
fn name(rest: &str) -> Option<String> {
    let n = rest.split_whitespace().next()?;
    (n.len() <= 63 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'))
        .then(|| n.to_string())
}

/// Creates `names` in `database` as the superuser, and lets the restore role load the rows of
/// their configuration tables (pg_dump dumps those: PostGIS's `spatial_ref_sys`, for example).
async fn create_extensions(admin: &PgTarget, database: &str, names: &[String]) -> Result<Vec<String>, PgError> {
    let client = admin.connect(database, std::time::Duration::from_secs(30)).await?;
    let mut created = Vec::new();
    for n in names {
        client.batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS {} CASCADE", quote_ident(n))).await?;
        created.push(n.clone());
    }
    let config = client
        .query(
            "SELECT c.oid::regclass::text, c.relkind::text FROM pg_extension e, unnest(e.extconfig) AS t(oid)
             JOIN pg_class c ON c.oid = t.oid WHERE e.extname = ANY($1)",
            &[&created],
        )
        .await?;
    let role = quote_ident(ROLE);
    for row in config {
        let (relation, kind): (String, String) = (row.get(0), row.get(1));
        let grant = match kind.as_str() {
            "S" => format!("GRANT USAGE, SELECT, UPDATE ON SEQUENCE {relation} TO {role}"),
            _ => format!("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {relation} TO {role}"),
        };
        client.batch_execute(&grant).await?;
    }
    Ok(created)
}

/// Gives every object in `database` (and the database) that the restore role owns to `owner`, and
/// takes back what it was granted there.
async fn hand_over(admin: &PgTarget, database: &str, owner: &str) -> Result<(), PgError> {
    let client = admin.connect(database, std::time::Duration::from_secs(30)).await?;
    let role = quote_ident(ROLE);
    client.batch_execute(&format!("REASSIGN OWNED BY {role} TO {}; DROP OWNED BY {role}", quote_ident(owner))).await?;
    Ok(())
}

/// Before pass 2 of a load into `database`: creates the extensions the table of contents `toc`
/// names (as the superuser, with `progress` told which) and writes the list pg_restore is given.
pub async fn prepare_load(
    admin: &PgTarget,
    database: &str,
    toc: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<ListFile, PgError> {
    let created = create_extensions(admin, database, &extensions(toc)).await?;
    if !created.is_empty() {
        progress(format!("postgres: created the extensions {} in {database}", created.join(", ")));
    }
    ListFile::write(&std::env::temp_dir(), &restore_list(toc, &created))
        .map_err(|e| PgError::Refused(format!("cannot write the restore list: {e}")))
}

/// After a load's checks: gives `new` and everything in it to the owner of `live` (else
/// `fallback`, else the server's superuser, `admin`'s user); returns that owner.
pub async fn hand_to_owner_of(
    admin: &PgTarget,
    new: &str,
    live: &str,
    fallback: Option<&str>,
) -> Result<String, PgError> {
    let owner = match owner_of(admin, live).await? {
        Some(o) => o,
        None => fallback.unwrap_or(&admin.user).to_string(),
    };
    hand_over(admin, new, &owner).await?;
    Ok(owner)
}

/// The owner of `database`, when it exists.
async fn owner_of(admin: &PgTarget, database: &str) -> Result<Option<String>, PgError> {
    let client = admin.connect("postgres", std::time::Duration::from_secs(30)).await?;
    let row = client
        .query_opt("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1", &[&database])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The list file for `pg_restore -L`: created new (never through a link), 0600, owned by the
/// restore role's OS user; removed when dropped.
pub struct ListFile(PathBuf);

impl ListFile {
    pub fn write(dir: &Path, text: &str) -> std::io::Result<ListFile> {
        let user = nix::unistd::User::from_name(ROLE)
            .ok()
            .flatten()
            .ok_or_else(|| std::io::Error::other(format!("no OS user {ROLE}")))?;
        let salt = crate::calendar::random_delay(std::time::Duration::from_secs(1 << 30), "list").as_nanos();
        let path = dir.join(format!("caretaker-restore-{}-{salt}.list", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)?;
        let file = ListFile(path);
        nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&f), Some(user.uid), Some(user.gid))
            .map_err(std::io::Error::from)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ListFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOC: &str = ";
; Archive created at 2026-12-02 03:00:00 UTC
;     dbname: zmanim
;
2; 3079 16385 EXTENSION - postgis
4321; 0 0 COMMENT - EXTENSION postgis
3; 3079 16400 EXTENSION - \"weird name\"
215; 1259 16390 TABLE public cities postgres
4320; 0 16390 TABLE DATA public cities postgres
";

    #[test]
    fn extensions_are_created_by_caretaker_and_skipped_with_their_comments_in_order() {
        assert_eq!(extensions(TOC), vec!["postgis".to_string()], "a quoted name is not taken");
        let list = restore_list(TOC, &["postgis".into()]);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines[4], ";2; 3079 16385 EXTENSION - postgis");
        assert_eq!(lines[5], ";4321; 0 0 COMMENT - EXTENSION postgis");
        assert_eq!(lines[6], "3; 3079 16400 EXTENSION - \"weird name\"");
        assert_eq!(lines[7], "215; 1259 16390 TABLE public cities postgres");
        assert_eq!(lines.len(), TOC.lines().count());
    }
}
