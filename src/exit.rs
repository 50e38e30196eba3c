//! Exit codes. Scripts and SSM documents branch on these; they never change meaning.

/// Success.
pub const OK: u8 = 0;
/// The operation failed (the message says why).
pub const FAILURE: u8 = 1;
/// Bad command line, or `config check` found an invalid configuration.
pub const USAGE: u8 = 2;
/// The daemon could not be reached (`status` and other client commands).
pub const UNREACHABLE: u8 = 3;
/// The daemon's configuration is invalid at start. The unit lists this in
/// `RestartPreventExitStatus=` so that systemd does not restart it into the same error (EX_CONFIG).
pub const CONFIG: u8 = 78;
