//! The command line. Help text is written for an operator at a shell on the box, or reading the
//! output of an SSM Run Command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "caretaker",
    version,
    about = "Looks after a single-box production stack: PostgreSQL, Redis and an HTTP API on one EC2 instance",
    long_about = "caretaker boots the box (EBS data volume, secrets from SSM), supervises PostgreSQL, Redis and the \
API through systemd, backs up to S3, and updates or restores on request.\n\n\
The daemon (`caretaker daemon`, run by caretaker.service) owns the D-Bus name io.shtetl.Caretaker1 on the \
system bus; the other commands are thin clients of it or one-shot tools.\n\n\
Configuration: /etc/caretaker/caretaker.toml, then drop-ins /etc/caretaker/caretaker.d/*.toml and \
/run/caretaker/caretaker.d/*.toml (later wins). See `caretaker config show` for the effective values.\n\n\
Exit status: 0 success; 1 failure; 2 bad usage or invalid configuration; 3 daemon unreachable; \
78 invalid configuration at daemon start.",
    after_help = "Run `caretaker COMMAND --help` for the details of each command."
)]
pub struct Cli {
    /// Read only this configuration file (no drop-ins). Default: the system layout.
    #[arg(long, global = true, value_name = "PATH", env = "CARETAKER_CONFIG")]
    pub config: Option<PathBuf>,

    /// D-Bus address of the bus to use instead of the system bus (e.g. a lab box's bus socket).
    #[arg(long, global = true, value_name = "ADDRESS")]
    pub bus_address: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what caretaker.service starts; Type=notify with watchdog).
    #[command(long_about = "Run the daemon in the foreground. It sends READY=1 to systemd once its configuration is \
valid and it owns io.shtetl.Caretaker1 on the bus, STATUS= lines as it works, and WATCHDOG=1 from its main loop. \
SIGHUP re-reads the configuration (an invalid one is refused and the old one kept); SIGTERM stops it \
within 5 seconds. An invalid configuration at start exits with status 78.")]
    Daemon,

    /// Prepare the box: instance identity, data volume, data directories, secrets (every boot).
    #[command(long_about = "Prepare the box; caretaker-firstboot.service runs this on every boot, before PostgreSQL, \
Redis and the API (their units Require= it). In order: read the instance identity with IMDSv2 and write \
/run/caretaker/instance.env; find the data volume (volume.device), format it only if it is blank (no signature of \
any kind and zeros in its first and last MiB), mount it at volume.mount-point, grow the filesystem to the volume \
and record the volume in its marker file; create the services' data directories with the right owners and run \
initdb for an empty PostgreSQL data directory; read the SSM parameters under secrets.ssm-path into env files under \
secrets.env-dir (mode 0600, or 0640 to a configured group). Idempotent: a second run changes nothing; an \
interrupted run is completed by the next. A volume with unrecognised contents is refused, never formatted.")]
    Firstboot {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },

    /// Show what the daemon is doing.
    #[command(long_about = "Ask the running daemon for its status over D-Bus and print it. Exits 3 when the daemon \
cannot be reached, with the command to investigate.")]
    Status(StatusArgs),

    /// Ask the running daemon to re-read its configuration.
    #[command(
        long_about = "Ask the running daemon to re-read its configuration (same as `systemctl reload caretaker`). \
If the new configuration is invalid the daemon keeps the old one and this command prints why and exits 2."
    )]
    Reload,

    /// Check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Take and list backups.
    #[command(subcommand)]
    Backup(BackupCommand),

    /// Update the API to a release from the releases bucket; roll back by itself if it is unhealthy.
    #[command(long_about = "Ask the daemon to update the API (a job; progress is printed as it goes). In order: \
validate the version; fetch RELEASE-BUCKET/APP/VERSION/SHA256SUMS (and SHA256SUMS.sig, refused without a valid \
Ed25519 signature over the app, the version and SHA256SUMS when release.public-key is set); stream the artifact to services.api.install-dir/releases/VERSION/ under \
a temporary name, fsync it and check its SHA-256; switch the `current` link atomically; restart the API unit; \
health-gate it (release.health-gate-consecutive healthy probes within release.health-gate-timeout). When the gate \
fails, `current` goes back to the previous release, the API is restarted and confirmed healthy, one alert email is \
sent, and the command exits 1 with \"rolled back to OLD: REASON\". Updating to the running version does nothing \
and succeeds. A refused update (bad version, missing release — the available ones are listed —, wrong hash or \
signature, failed download) changes nothing. Exit 0 on success, 1 on refusal or roll back, 2 on bad usage, 3 when \
the daemon is unreachable.")]
    Update(UpdateArgs),

    /// Restore PostgreSQL or Redis from a backup: built new, verified, then swapped in.
    #[command(subcommand)]
    Restore(RestoreCommand),

    /// Copy an external PostgreSQL into a new local database, prove it equal, optionally swap it in.
    #[command(long_about = "Ask the daemon to migrate (a job) from an external PostgreSQL. The connection string \
(postgres://USER:PASSWORD@HOST:PORT/DB) comes from an SSM SecureString (--source-ssm-param NAME, read with the \
instance role) or a file owned by root with mode 0600 (--source-url-file PATH) — never from the command line, \
where it would land in SSM command history. The source is dumped in one snapshot (pg_dump --snapshot) straight \
into pg_restore, into a new database DB_migrate_TIMESTAMP; then the copy is compared with the source as it is \
now: per-table row counts, per-table checksums ordered by primary key, and for PostGIS geometry columns the \
non-null and valid geometries. The report (table  source  target  [OK]|MISMATCH) is printed and written as JSON \
under /var/lib/caretaker. Any mismatch (e.g. the source was written to after the dump: stop writes first) exits \
1 and swaps nothing. With --swap the copy replaces the live database as a restore does (API stopped, one \
transaction, health gate, swap back on failure).")]
    Migrate {
        /// The SSM parameter holding the source connection string (SecureString).
        #[arg(long, value_name = "NAME", group = "source")]
        source_ssm_param: Option<String>,
        /// A root-only file holding the source connection string.
        #[arg(long, value_name = "PATH", group = "source")]
        source_url_file: Option<std::path::PathBuf>,
        /// Swap the verified copy in as the live database.
        #[arg(long)]
        swap: bool,
    },

    /// PostgreSQL's archive_command and restore_command (run by the server, as its user).
    #[command(subcommand)]
    Wal(WalCommand),

    /// Check everything the box depends on: one line per check, ✓ or ✗ and what to do.
    #[command(long_about = "Check the box and print one line per check: ✓, ✗ with what to do, or - when it is \
not configured. Checked: the configuration; IMDSv2, the instance identity and the region; the SSM path (parameter \
names only, never values) and that it holds every parameter the env files need; the SES sender; the backup bucket \
and the age of the newest backup of each kind; the clock against S3's; the data volume (mounted, free space, its \
marker); the state of caretaker's units and of the supervised services. Nothing is changed. Exit status 0 when no \
check failed, 1 when one did, 2 when the configuration is invalid.")]
    Doctor {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Archive one WAL file: exits 0 only once S3 holds it (archive_command = 'caretaker wal push %p').
    #[command(long_about = "Hand one WAL file to the caretaker daemon over its WAL socket; the daemon checks the \
file's first page against the cluster (system identifier, timeline, position), compresses and encrypts it as \
backups are, and stores it under BACKUP-PREFIX/wal/ only if no object has that name. Exit 0 once S3 acknowledged \
it, or when the archive already holds the same content; non-zero otherwise (PostgreSQL keeps the file and tries \
again). Set by caretaker as PostgreSQL's archive_command; not for interactive use.")]
    Push {
        /// The file, as PostgreSQL's %p gives it (relative to the data directory).
        path: std::path::PathBuf,
        /// The daemon's WAL socket.
        #[arg(long, default_value = crate::backup::wal::server::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Fetch one WAL file for recovery (restore_command = 'caretaker wal fetch %f %p').
    #[command(long_about = "Ask caretaker over its WAL socket for one archived WAL file and write it to DEST. \
Exit 0 with the file written; 1 when the archive does not have it (PostgreSQL may end recovery there); 126 on any \
error — a seal or hash that does not verify, S3 unreachable after retries — so that PostgreSQL aborts recovery \
rather than take an error for the end of the archive.")]
    Fetch {
        /// The file's name (%f).
        name: String,
        /// Where to write it (%p).
        dest: std::path::PathBuf,
        #[arg(long, default_value = crate::backup::wal::server::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup now (a job in the daemon); follow its progress; exit 0 only on success.
    #[command(
        long_about = "Ask the daemon to take a backup now and follow it. PostgreSQL is dumped with pg_dump in one \
exported snapshot (exact row counts recorded), Redis after a fresh BGSAVE; the stream is compressed (zstd), encrypted \
(age) and uploaded to S3 as it is produced, without temporary files. The backup exists only once its manifest is \
written, after the producer exited 0 and every part was uploaded; a failed backup leaves nothing and earlier \
backups are untouched. Progress lines go to stdout (plain lines when it is not a terminal, as SSM Run Command \
captures). Exit 0 on success, 1 on failure, 3 when the daemon is unreachable."
    )]
    Now {
        /// What to back up: all (postgres, redis, and base when backup.wal-archive is on), or one
        /// kind. base: a physical base backup (pg_basebackup), the start of point-in-time recovery.
        #[arg(long, default_value = "all", value_parser = ["all", "postgres", "redis", "base"])]
        kind: String,
    },
    /// Delete backups beyond retention (backup.keep-daily, keep-weekly); --dry-run only lists them.
    #[command(
        long_about = "Apply retention: keep the newest backup of each of the last backup.keep-daily days and of \
each of the last backup.keep-weekly weeks; the newest backup and the newest verified backup are always kept. A \
backup is deleted manifest first (it stops existing at once), then its data. With --dry-run nothing is deleted; \
each backup is listed with keep or would-delete and the reason."
    )]
    Prune {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run a restore drill now: download, check both hashes, restore into a scratch database, compare row counts.
    #[command(long_about = "Ask the daemon to run a restore drill (a job) of backup ID, or of the newest backup of \
each kind: download it, check the SHA-256 of the stored object and of the plaintext against the manifest, and for \
PostgreSQL restore it with pg_restore into a scratch database (caretaker_verify_ID), compare every table's row count \
with the counts taken in the dump's snapshot, and drop the scratch database. Redis backups are checked by hash and \
RDB header. The result is stored beside the backup as verify.json (retention never deletes the newest verified \
backup). Decrypting needs the age identity (backup.identity-var) when backups are made for recipients. A failure \
sends one alert email. Exit 0 when every drill passed.")]
    Verify {
        /// The backup id (from `caretaker backup list`), or latest.
        #[arg(default_value = "latest", value_name = "ID|latest")]
        id: String,
        #[arg(long, default_value = "all", value_parser = ["all", "postgres", "redis", "base"])]
        kind: String,
    },
    /// List backups (those with a manifest), oldest first.
    List {
        #[arg(long, default_value = "all", value_parser = ["all", "postgres", "redis", "base"])]
        kind: String,
        /// Print JSON (the manifests).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RestoreCommand {
    /// Restore a PostgreSQL backup into a new database, verify it, then swap it in.
    #[command(long_about = "Ask the daemon to restore a PostgreSQL backup (a job; progress per phase: download, \
restore, verify, swap). The backup is streamed from S3 through age and zstd into pg_restore, into a NEW database \
DB_restore_TIMESTAMP; the hashes of what was read are checked against the manifest and every table's row count \
against the counts taken in the dump's snapshot. Any mismatch or error drops the new database and changes nothing. \
Only then: the API is stopped, sessions on DB are ended, DB is renamed DB_pre_restore_TIMESTAMP (kept) and the new \
database renamed DB in one transaction, the API is started and health-gated; if the gate fails the swap is undone. \
Kept databases: `caretaker restore list-kept`, `caretaker restore drop-kept NAME`. Exit 0 on success.

With --to-time TIME or --to-latest (point-in-time recovery; needs backup.wal-archive and a base backup): the \
newest base backup that ended before TIME on the archive's timeline ancestry is chosen and the whole WAL chain from \
it checked present in S3 — a gap, or a TIME outside the window (printed), is refused before anything is touched. \
The cluster is rebuilt in a new data directory beside the live one (DATA.pitr-TIMESTAMP; room is checked first), \
recovered by a PostgreSQL of caretaker's own (restore_command = caretaker wal fetch; an S3 error is retried and \
then aborts recovery, never ends it early), and checked: where recovery stopped, the last replayed commit, and the \
application's tables answering. Only then are the API and PostgreSQL stopped, DATA renamed DATA.before-pitr-\
TIMESTAMP (kept), the new directory renamed DATA, PostgreSQL started (on a new timeline) and the API \
health-gated; a failed gate puts the old directory back.")]
    Postgres {
        /// The backup id (from `caretaker backup list`), or latest.
        #[arg(long, default_value = "latest", value_name = "ID|latest", conflicts_with_all = ["to_time", "to_latest"])]
        backup: String,
        /// The database to replace (default: backup.database).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["to_time", "to_latest"])]
        target_db: Option<String>,
        /// Point-in-time recovery of the whole cluster: every transaction committed at or before
        /// this UTC time ("2026-12-01 14:03:07Z"), none after. See below.
        #[arg(long, value_name = "TIME", conflicts_with = "to_latest")]
        to_time: Option<String>,
        /// Point-in-time recovery of the whole cluster to the newest archived WAL.
        #[arg(long)]
        to_latest: bool,
    },
    /// Restore a Redis backup: verify the RDB, keep the current one aside, swap, check DBSIZE.
    #[command(long_about = "Ask the daemon to restore a Redis backup (a job): the RDB is downloaded next to the \
live one and checked against the manifest's hashes; then Redis is stopped, its RDB kept aside as \
FILE.pre-restore-TIMESTAMP, the restored file renamed into place, Redis started and its DBSIZE compared with the \
manifest. On any failure the previous RDB is put back and Redis started on it. Refused when Redis uses AOF.")]
    Redis {
        /// The backup id, or latest.
        #[arg(long, default_value = "latest", value_name = "ID|latest")]
        backup: String,
    },
    /// List the databases earlier restores kept (DB_pre_restore_TIMESTAMP).
    ListKept {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop a database an earlier restore kept (only those listed by list-kept).
    DropKept {
        /// A name from `caretaker restore list-kept`.
        name: String,
    },
}

#[derive(Debug, Args)]
#[group(id = "target", required = true, multiple = false)]
pub struct UpdateArgs {
    /// The release to install, e.g. v1.4.2 or 1.4.2-rc.1 (letters, digits, dots, dashes; at most 3 numbers).
    #[arg(long, value_name = "VERSION", group = "target")]
    pub version: Option<String>,
    /// Install the release that APP/LATEST in the releases bucket names.
    #[arg(long, group = "target")]
    pub latest: bool,
    /// Fetch and verify only; switch and restart nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Install a version older than the running one (refused otherwise: a re-published old
    /// release may carry a hole that was fixed since).
    #[arg(long)]
    pub allow_downgrade: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (for scripts) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a file, or the whole effective configuration; exit 0 if valid, 2 if not.
    #[command(long_about = "Validate the configuration. With PATH, check that one file (a main file or a drop-in) on \
its own; without, check the effective configuration: the main file and every drop-in, merged. Errors name the \
file, line:column and key. Exit status 0 when valid, 2 when not.")]
    Check {
        /// A file to check on its own.
        path: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (secret-looking values redacted).
    Show {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
