//! The IMDSv2 fake as a process, e.g. inside a container's network namespace.
//!
//! ```text
//! imds-fake --listen ADDR [--instance-id ID] [--region R] [--availability-zone AZ]
//!           [--instance-type T] [--account-id N] [--image-id AMI] [--local-ipv4 IP]
//!           [--block-device NAME=DEV]...
//! ```
//! `--block-device` given at least once replaces the default mapping. Prints `listening on ADDR`
//! (the bound address, so `--listen 127.0.0.1:0` works) once bound. Control endpoints: see
//! `caretaker_testkit::imds`. Exits 0 on SIGTERM or SIGINT.

use std::io::Write;

use anyhow::{Context, bail};
use caretaker_testkit::imds::{ImdsConfig, ImdsControl, serve};

const USAGE: &str = "usage: imds-fake --listen ADDR [--instance-id ID] [--region R] [--availability-zone AZ] \
[--instance-type T] [--account-id N] [--image-id AMI] [--local-ipv4 IP] [--block-device NAME=DEV]...";

fn parse_args() -> anyhow::Result<(String, ImdsConfig)> {
    let mut listen = None;
    let mut config = ImdsConfig::default();
    let mut devices: Vec<(String, String)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = match inline {
            Some(v) => v,
            None => args.next().with_context(|| format!("{flag} needs a value\n{USAGE}"))?,
        };
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--instance-id" => config.instance_id = value,
            "--region" => config.region = value,
            "--availability-zone" => config.availability_zone = value,
            "--instance-type" => config.instance_type = value,
            "--account-id" => config.account_id = value,
            "--image-id" => config.image_id = value,
            "--local-ipv4" => config.local_ipv4 = value,
            "--block-device" => {
                let (name, dev) =
                    value.split_once('=').with_context(|| format!("--block-device wants NAME=DEV, got {value:?}"))?;
                devices.push((name.to_string(), dev.to_string()));
            }
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    if !devices.is_empty() {
        config.block_devices = devices;
    }
    Ok((listen.with_context(|| format!("--listen is required\n{USAGE}"))?, config))
}

fn main() -> anyhow::Result<()> {
    let (listen, config) = parse_args()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut out = std::io::stdout();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
        serve(listener, ImdsControl::new(config), async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await
    })
}
