//! PostgreSQL access for caretaker's own work (health probes, provisioning, backup row counts):
//! over the unix socket, as the database's OS user, with peer authentication — no password and
//! no pg_hba.conf changes.
//!
//! The daemon runs as root; peer authentication checks the credentials the kernel recorded when
//! the socket connected (the connecting *thread's* effective uid). So the connection is made on a
//! short-lived thread that switches only its own effective uid with the raw `setresuid` syscall
//! (glibc's wrapper would change every thread of the process) and then ends; the connected socket
//! is handed back to the async runtime. The rest of the process never changes identity.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::User;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("OS user `{0}` does not exist")]
    NoUser(String),
    #[error("cannot connect to {} as {user}: {source}", socket.display())]
    Socket { socket: PathBuf, user: String, source: std::io::Error },
    #[error("PostgreSQL at {} refused {user}@{dbname}: {}", socket.display(), server_says(source))]
    Connect { socket: PathBuf, user: String, dbname: String, source: tokio_postgres::Error },
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("query failed: {}", server_says(.0))]
    Query(#[from] tokio_postgres::Error),
    /// caretaker refused before asking PostgreSQL (the message says why).
    #[error("{0}")]
    Refused(String),
}

/// tokio_postgres's own text for a server error is only "db error": the server's severity, code,
/// message and hint instead (never its DETAIL, which can quote row values).
pub fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(hint) = db.hint() {
                s.push_str(&format!(" (hint: {hint})"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub socket_dir: PathBuf,
    pub port: u16,
    /// The OS user, also the database role (peer authentication).
    pub user: String,
    /// Where the client tools are (None: found on PATH).
    pub bin_dir: Option<PathBuf>,
}

impl PgTarget {
    /// The configured PostgreSQL service, as caretaker connects to it.
    pub fn new(p: &crate::config::PostgresService) -> Self {
        PgTarget { socket_dir: p.socket_dir.clone(), port: p.port, user: p.user.clone(), bin_dir: p.bin_dir.clone() }
    }

    /// Drops `database` if it exists, ending its sessions.
    pub async fn drop_database(&self, database: &str) -> Result<(), PgError> {
        let admin = self.connect("postgres", Duration::from_secs(30)).await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(database))).await?;
        Ok(())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// A connection to `dbname`; the connection's driver task is spawned on the runtime.
    pub async fn connect(&self, dbname: &str, timeout: Duration) -> Result<Client, PgError> {
        let work = async {
            let stream = connect_socket_as(&self.socket_path(), &self.user).await?;
            let (client, connection) = tokio_postgres::Config::new()
                .user(&self.user)
                .dbname(dbname)
                .application_name("caretaker")
                .connect_raw(stream, NoTls)
                .await
                .map_err(|source| PgError::Connect {
                    socket: self.socket_path(),
                    user: self.user.clone(),
                    dbname: dbname.into(),
                    source,
                })?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("postgres connection ended: {e}");
                }
            });
            Ok(client)
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| PgError::Timeout(timeout))?
    }
}

impl PgTarget {
    /// `program` (pg_dump, pg_restore) run as the database's OS user, from `/`, killed when
    /// dropped; stdout and stderr piped, stdin null (callers change what they need).
    pub fn tool(&self, program: &str) -> Result<tokio::process::Command, PgError> {
        let user = User::from_name(&self.user).ok().flatten().ok_or_else(|| PgError::NoUser(self.user.clone()))?;
        let mut cmd = tokio::process::Command::new(self.tool_path(program));
        cmd.uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// libpq arguments for `dbname` on this server, over the unix socket, peer authentication.
    /// `program` in `bin_dir`, or bare (found on PATH) without one.
    pub fn tool_path(&self, program: &str) -> std::path::PathBuf {
        self.bin_dir.as_ref().map_or_else(|| program.into(), |dir| dir.join(program))
    }

    pub fn tool_args(&self, dbname: &str) -> Vec<String> {
        vec![
            format!("--host={}", self.socket_dir.display()),
            format!("--port={}", self.port),
            format!("--username={}", self.user),
            format!("--dbname={dbname}"),
            "--no-password".into(),
        ]
    }
}

/// The first 64 KiB of a child's stderr, read in the background (so the child never blocks on a
/// full pipe); empty when there is none.
pub fn collect_stderr(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut s) = stderr {
            let _ = (&mut s).take(64 * 1024).read_to_end(&mut buf).await;
        }
        String::from_utf8_lossy(&buf).trim().to_string()
    })
}

/// A child's stdout up to `max` bytes, read in the background (the rest is drained, unread).
pub fn collect_stdout(stdout: Option<tokio::process::ChildStdout>, max: u64) -> tokio::task::JoinHandle<String> {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut s) = stdout {
            let _ = (&mut s).take(max).read_to_end(&mut buf).await;
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The one line a failed pg_dump/pg_restore leaves in job summaries, errors and emails: what
/// failed, never its stderr — that can quote row data (`invalid input syntax … "value"`, `Key
/// (email)=(…) already exists`) and job summaries are readable by every local user over D-Bus.
/// The whole stderr goes to the journal (root and adm only).
pub fn tool_failure(tool: &str, status: &str, stderr: &str) -> String {
    if !stderr.is_empty() {
        tracing::error!("{tool} failed ({status}); its messages:\n{stderr}");
    }
    // The first error's kind: its text up to the first quote or colon ("COPY failed for table").
    let kind = stderr
        .lines()
        .find_map(|l| l.split_once("error: ").map(|(_, rest)| rest))
        .map(|rest| rest.split(['"', ':']).next().unwrap_or_default().trim().to_string())
        .filter(|k| !k.is_empty())
        .map(|k| format!(", first: {k}"))
        .unwrap_or_default();
    format!(
        "{tool} failed ({status}{kind}); its messages are in the journal (`journalctl -u caretaker`), kept out of \
         summaries because they can quote data"
    )
}

/// Connects to a unix socket with the effective uid/gid of `user` (see the module comment).
pub async fn connect_socket_as(socket: &Path, user: &str) -> Result<tokio::net::UnixStream, PgError> {
    let u = User::from_name(user).ok().flatten().ok_or_else(|| PgError::NoUser(user.into()))?;
    let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
    let socket = socket.to_path_buf();
    let sock_err = {
        let (socket, user) = (socket.clone(), user.to_string());
        move |source| PgError::Socket { socket, user, source }
    };
    let std_stream = if nix::unistd::geteuid().as_raw() == uid || !nix::unistd::geteuid().is_root() {
        StdUnixStream::connect(&socket).map_err(sock_err)?
    } else {
        std::thread::spawn(move || -> std::io::Result<StdUnixStream> {
            // SAFETY: raw syscalls changing only this thread's credentials; the thread ends
            // right after connecting, so no other code ever runs with them. The saved uid stays
            // 0, as it must for nothing: the credentials die with the thread.
            let r = unsafe { nix::libc::syscall(nix::libc::SYS_setresgid, -1i64, gid as i64, -1i64) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, -1i64, uid as i64, -1i64) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            StdUnixStream::connect(&socket)
        })
        .join()
        .map_err(|_| std::io::Error::other("connect thread panicked"))
        .and_then(|r| r)
        .map_err(sock_err)?
    };
    std_stream.set_nonblocking(true).map_err(|e| PgError::Socket {
        socket: PathBuf::new(),
        user: user.into(),
        source: e,
    })?;
    tokio::net::UnixStream::from_std(std_stream).map_err(|e| PgError::Socket {
        socket: PathBuf::new(),
        user: user.into(),
        source: e,
    })
}

/// `"name"` with embedded quotes doubled: safe to splice as an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled (standard_conforming_strings is on since 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_failure_names_the_error_but_not_the_data() {
        let stderr = "pg_restore: error: COPY failed for table \"users\": ERROR:  invalid input syntax for type integer: \"s3cret-value\"\nCONTEXT:  COPY users, line 1, column id: \"s3cret-value\"";
        let line = tool_failure("pg_restore", "exit status: 1", stderr);
        assert!(!line.contains("s3cret"), "{line}");
        assert!(line.contains("COPY failed for table") && line.contains("exit status: 1"), "{line}");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
