//! `caretaker wal push` (archive_command) and `caretaker wal fetch` (restore_command): thin
//! clients of [`super::server`]. They load no configuration and hold no secret.
//!
//! Exit statuses, as PostgreSQL reads them: push 0 only once S3 holds the file; fetch 0 with the
//! file written, 1 when the archive does not have it (recovery may end there), and 126 on any
//! error — PostgreSQL aborts recovery on a status above 125 instead of taking it as the end of
//! the archive, which would promote early and silently lose data.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::server::{Answer, Request};

/// fetch: the archive does not have the file.
pub const NOT_FOUND: u8 = 1;
/// fetch: an error; recovery must stop, not end.
pub const ABORT_RECOVERY: u8 = 126;

async fn call(
    socket: &Path,
    req: &Request,
    body: Option<&[u8]>,
    deadline: Duration,
) -> Result<(Answer, Vec<u8>), String> {
    let work = async {
        let mut s = UnixStream::connect(socket).await.map_err(|e| {
            format!("cannot reach caretaker at {}: {e} (is caretaker.service running?)", socket.display())
        })?;
        let mut line = serde_json::to_vec(req).expect("a request serializes");
        line.push(b'\n');
        s.write_all(&line).await.map_err(|e| e.to_string())?;
        if let Some(b) = body {
            s.write_all(b).await.map_err(|e| e.to_string())?;
        }
        let mut r = BufReader::new(s);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
        let a: Answer = serde_json::from_slice(&line).map_err(|e| format!("caretaker's answer is not JSON: {e}"))?;
        let mut data = Vec::new();
        if a.ok && a.found {
            data.resize(a.bytes as usize, 0);
            r.read_exact(&mut data).await.map_err(|e| format!("reading the file from caretaker: {e}"))?;
        }
        Ok((a, data))
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("caretaker did not answer within {} s", deadline.as_secs()))?
}

/// archive_command: hands `path` to caretaker; Ok once S3 holds it.
pub async fn push(socket: &Path, path: &Path, deadline: Duration) -> Result<String, String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} does not name a WAL file", path.display()))?
        .to_string();
    let data = tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let req = Request::Push { name: name.clone(), bytes: data.len() as u64 };
    let (a, _) = call(socket, &req, Some(&data), deadline).await?;
    if a.ok {
        Ok(match a.pushed {
            Some(super::archive::Pushed::AlreadyArchived) => format!("{name}: already archived with the same content"),
            _ => format!("{name}: archived"),
        })
    } else {
        Err(a.error)
    }
}

/// restore_command: writes `name` to `dest`; Ok(false) when the archive does not have it.
pub async fn fetch(socket: &Path, name: &str, dest: &Path, deadline: Duration) -> Result<bool, String> {
    let req = Request::Fetch { name: name.to_string() };
    let (a, data) = call(socket, &req, None, deadline).await?;
    if !a.ok {
        return Err(a.error);
    }
    if !a.found {
        return Ok(false);
    }
    // Written beside the destination, then renamed: PostgreSQL never sees half a file.
    let tmp = dest.with_extension("caretaker-partial");
    tokio::fs::write(&tmp, &data).await.map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    tokio::fs::rename(&tmp, dest).await.map_err(|e| format!("cannot rename to {}: {e}", dest.display()))?;
    Ok(true)
}
