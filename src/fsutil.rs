//! Files written so that a reader never sees half of them and a crash never leaves half of them:
//! a temporary file in the same folder, written, fsynced, given its mode (and owner), renamed over
//! the target, then the folder fsynced (as afterburn's `write_ssh_keys` does).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner to give a written file (uid, gid); `None` keeps the writer's.
pub type Owner = Option<(u32, u32)>;

#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError { action, path: path.to_path_buf(), source }
}

/// Writes `contents` to `path` atomically with `mode` (and `owner`). The temporary file is created
/// with `mode` from the start, so secrets are never readable by others, not even for a moment.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Owner) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| FsError {
        action: "write",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err("create", &tmp))?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(err("chmod", &tmp))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err("chown", &tmp))?;
        }
        f.write_all(contents).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(err("rename into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Like [`write_atomic`], but leaves the file alone when its content and mode are already
/// right. Returns whether it wrote.
pub fn write_if_changed(path: &Path, contents: &[u8], mode: u32, owner: Owner) -> Result<bool, FsError> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(meta), Ok(existing)) = (fs::symlink_metadata(path), fs::read(path))
        && meta.is_file()
        && meta.mode() & 0o7777 == mode
        && owner.is_none_or(|(u, g)| meta.uid() == u && meta.gid() == g)
        && existing == contents
    {
        return Ok(false);
    }
    write_atomic(path, contents, mode, owner)?;
    Ok(true)
}

/// Removes temporary files [`write_atomic`] left in `dir` when its process was killed before the
/// rename (`.NAME.tmp-PID` of a PID that is no longer running). Errors are ignored.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let alive = pid == std::process::id() as i32 || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// fsyncs a folder so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync folder", dir))
}

/// Grows a pipe's kernel buffer to 1 MiB (best effort): a producer writing small blocks (pg_dump
/// writes 4 KiB at a time) then fills it while the consumer works, and the consumer drains it in
/// few large reads instead of many small wake-ups.
pub fn grow_pipe(fd: &impl std::os::fd::AsFd) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::fcntl(fd.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_exact_mode_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.env");
        write_atomic(&p, b"A=1\n", 0o600, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"A=1\n");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        write_atomic(&p, b"A=2\n", 0o640, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"A=2\n");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left");
    }

    #[test]
    fn unchanged_files_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.env");
        assert!(write_if_changed(&p, b"X=1\n", 0o644, None).unwrap());
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap());
        assert!(!write_if_changed(&p, b"X=1\n", 0o644, None).unwrap());
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&fs::metadata(&p).unwrap()), ino);
        assert!(write_if_changed(&p, b"X=1\n", 0o600, None).unwrap(), "mode change rewrites");
        assert!(write_if_changed(&p, b"X=2\n", 0o600, None).unwrap());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(".x.env.tmp-999999999");
        let mine = dir.path().join(format!(".y.env.tmp-{}", std::process::id()));
        let other = dir.path().join("z.env");
        for p in [&dead, &mine, &other] {
            fs::write(p, b"x").unwrap();
        }
        remove_stale_temps(dir.path());
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.env");
        write_atomic(&p, b"old", 0o600, None).unwrap();
        let e = write_atomic(&p, b"new", 0o600, Some((u32::MAX - 1, u32::MAX - 1)));
        // As root chown to an unmapped id may succeed; either way the target is whole.
        let now = fs::read(&p).unwrap();
        assert!(now == b"old" || (e.is_ok() && now == b"new"));
    }
}
