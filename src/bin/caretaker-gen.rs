//! `caretaker-gen man DIR | completions DIR`: the man pages (caretaker.1 and one page per
//! subcommand, e.g. caretaker-backup-now.1) and the bash, zsh and fish completions, generated from
//! the same clap definition the CLI parses with. Run by `packaging/build-packages`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;

fn man_pages(cmd: &clap::Command, prefix: &str, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let name = if prefix.is_empty() { cmd.get_name().to_string() } else { format!("{prefix}-{}", cmd.get_name()) };
    // clap names are &'static without its `string` feature; this tool runs once and exits.
    let page = cmd.clone().name(&*Box::leak(name.clone().into_boxed_str()));
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        man_pages(sub, &name, dir, written)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, dir) = match args.as_slice() {
        [what, dir] if what == "man" || what == "completions" => (what.as_str(), PathBuf::from(dir)),
        _ => {
            eprintln!("usage: caretaker-gen man DIR | caretaker-gen completions DIR");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("caretaker-gen: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let mut cmd = caretaker::cli::Cli::command();
    cmd.build();
    let mut written = Vec::new();
    let result = match what {
        "man" => man_pages(&cmd, "", &dir, &mut written),
        _ => (|| {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                written.push(clap_complete::generate_to(shell, &mut cmd, "caretaker", &dir)?);
            }
            Ok(())
        })(),
    };
    match result {
        Ok(()) => {
            for p in written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("caretaker-gen: writing to {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
