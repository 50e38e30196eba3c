//! Test support for caretaker. Real parts wherever they can run here:
//! a booted systemd in a container ([`lab`]), moto's server for S3/SSM/SES ([`moto`]),
//! and an IMDSv2 fake that enforces tokens ([`imds`]), since moto does not.

/// An IMDSv2 fake: tokens required, TTLs enforced, faults on request.
pub mod imds;
/// A throw-away box with a real systemd (systemd-nspawn over an overlay of the host root).
pub mod lab;
/// moto's server from the project venv, started on a free port, stopped by PID.
pub mod moto;
/// Throw-away PostgreSQL clusters of each tested version.
pub mod pg;
/// Free TCP ports on loopback and other small helpers.
pub mod ports;
/// A TCP forwarder that can fail on request.
pub mod proxy;
/// SSM Run Command simulated: document parameters checked and substituted as SSM does, run with `sh`.
pub mod ssmdoc;

/// The repository root (the folder holding the workspace Cargo.toml).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in the repo").to_path_buf()
}

/// Polls `done` every `every` until it holds; panics naming `what` (and `detail()`) after `within`.
pub fn wait_until(
    what: &str,
    within: std::time::Duration,
    every: std::time::Duration,
    mut done: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let end = std::time::Instant::now() + within;
    while !done() {
        assert!(std::time::Instant::now() < end, "{what} (after {within:?}): {}", detail());
        std::thread::sleep(every);
    }
}
