//! Supervision: systemd restarts what crashes; caretaker catches what hangs or degrades.

/// Idempotent provisioning of the application's role, database and extensions.
pub mod provision;
/// The per-service state machine and the ordered start.
pub mod supervisor;
