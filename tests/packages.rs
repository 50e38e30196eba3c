//! The packages: `packaging/build-packages` builds the .deb (cargo-deb) and the .rpm
//! (cargo-generate-rpm) from the debug binary, and their file lists must hold everything
//! caretaker ships — derived from the repository, so a new unit or SSM document that is not
//! packaged fails here — plus the man pages and completions generated from the CLI definition.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run dev/setup)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// What both packages must contain.
fn expected() -> BTreeSet<String> {
    let mut want = BTreeSet::new();
    want.insert("/usr/bin/caretaker".to_string());
    let units = repo().join("systemd");
    for f in files_under(&units) {
        want.insert(format!("/usr/lib/systemd/system/{}", f.strip_prefix(&units).unwrap().display()));
    }
    for f in files_under(&repo().join("packaging/ssm")) {
        want.insert(format!("/usr/share/caretaker/ssm/{}", f.file_name().unwrap().to_string_lossy()));
    }
    for f in [
        "/usr/share/dbus-1/system.d/io.shtetl.Caretaker1.conf",
        "/usr/lib/sysusers.d/caretaker.conf",
        "/usr/lib/tmpfiles.d/caretaker.conf",
        "/usr/share/caretaker/caretaker.toml.example",
        "/usr/share/caretaker/iam/caretaker-policy.json",
        "/usr/share/caretaker/cloudwatch/alarms.json",
        "/usr/share/caretaker/aws/protect-backup-bucket",
        "/usr/lib/caretaker/imds-guard.nft",
        "/usr/share/man/man1/caretaker.1.gz",
        "/usr/share/man/man1/caretaker-update.1.gz",
        "/usr/share/man/man1/caretaker-backup-now.1.gz",
        "/usr/share/man/man1/caretaker-restore-postgres.1.gz",
        "/usr/share/bash-completion/completions/caretaker",
        "/usr/share/fish/vendor_completions.d/caretaker.fish",
    ] {
        want.insert(f.to_string());
    }
    want
}

#[test]
fn the_deb_and_the_rpm_hold_everything_caretaker_ships() {
    // `cargo test` builds this package's binaries (caretaker, caretaker-gen) in target/debug.
    assert!(Path::new(env!("CARGO_BIN_EXE_caretaker")).exists());
    assert!(Path::new(env!("CARGO_BIN_EXE_caretaker-gen")).exists());
    let out = tempfile::tempdir().unwrap();
    let built = run(Command::new(repo().join("packaging/build-packages"))
        .args(["--profile", "dev", "--no-build", "--out"])
        .arg(out.path()));
    let deb = built.lines().find(|l| l.ends_with(".deb")).unwrap_or_else(|| panic!("no .deb: {built}"));
    let rpm = built.lines().find(|l| l.ends_with(".rpm")).unwrap_or_else(|| panic!("no .rpm: {built}"));

    // dpkg -c: "-rw-r--r-- root/root 123 2026-… ./usr/bin/caretaker"
    let deb_list = run(Command::new("dpkg-deb").args(["-c", deb]));
    let deb_files: BTreeSet<String> = deb_list
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let rpm_files: BTreeSet<String> =
        run(Command::new("rpm").args(["-qlp", rpm])).lines().map(str::to_string).collect();
    let want = expected();
    for (name, have) in [("deb", &deb_files), ("rpm", &rpm_files)] {
        let missing: Vec<_> = want.difference(have).collect();
        assert!(missing.is_empty(), "{name} lacks {missing:?}; it has {have:#?}");
        println!("{name}: {} files, all {} expected present", have.len(), want.len());
    }
    assert!(deb_list.contains("-rwxr-xr-x") && deb_list.contains("./usr/bin/caretaker"), "{deb_list}");

    let info = run(Command::new("dpkg-deb").args(["-f", deb, "Package", "Version", "Depends"]));
    assert!(info.contains("Package: caretaker") && info.contains("systemd"), "{info}");
    let rpm_info = run(Command::new("rpm").args(["-qip", rpm]));
    assert!(rpm_info.contains("caretaker") && rpm_info.contains("Apache-2.0"), "{rpm_info}");
    let requires = run(Command::new("rpm").args(["-qRp", rpm]));
    assert!(requires.contains("systemd"), "{requires}");

    // The generated documentation: a man page per command, completions naming the subcommands.
    let man = std::fs::read(repo().join("target/pkg-assets/man/caretaker-update.1.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut gunzip(&man), &mut text).unwrap();
    assert!(text.contains(".TH caretaker-update 1"), "{}", &text[..text.len().min(300)]);
    assert!(
        text.contains("SHA256SUMS") && text.contains(r"\-\-dry\-run"),
        "the long help and the options are in the page"
    );
    let bash = std::fs::read_to_string(repo().join("target/pkg-assets/completions/caretaker.bash")).unwrap();
    for sub in ["backup", "update", "restore", "migrate", "doctor"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
}

/// gunzip through the system's gzip (no extra crate for one test).
fn gunzip(data: &[u8]) -> std::io::Cursor<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    std::io::Cursor::new(out.stdout)
}
