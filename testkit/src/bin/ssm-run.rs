//! `ssm-run DOCUMENT.json [Name=Value ...]`: what the SSM agent would run for a Run Command of
//! DOCUMENT with these parameters — values checked against allowedPattern/allowedValues and
//! substituted — printed as one shell script on stdout (run it with `sh`). Exit 2 when a value is
//! rejected, naming the parameter. Used by the demo to drive caretaker the way operators do.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: ssm-run DOCUMENT.json [Name=Value ...]");
        return ExitCode::from(2);
    };
    let doc = match caretaker_testkit::ssmdoc::Document::load(std::path::Path::new(path)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ssm-run: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut values = Vec::new();
    for a in &args[1..] {
        match a.split_once('=') {
            Some((k, v)) => values.push((k, v)),
            None => {
                eprintln!("ssm-run: `{a}` is not Name=Value");
                return ExitCode::from(2);
            }
        }
    }
    match doc.render(&values) {
        Ok(script) => {
            print!("{script}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ssm-run: rejected as SSM would: {e:#}");
            ExitCode::from(2)
        }
    }
}
