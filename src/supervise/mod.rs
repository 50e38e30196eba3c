//! Supervision: systemd restarts what crashes; caretaker catches what hangs or degrades.

/// Health probes.
pub mod health;
/// Holds that pause supervision of a unit while a job works on it.
pub mod maintenance;
/// Idempotent provisioning of the application's role, database and extensions.
pub mod provision;
/// The per-service state machine and the ordered start.
pub mod supervisor;
