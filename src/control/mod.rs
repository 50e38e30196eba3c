//! The control plane: the daemon's own D-Bus interface and the CLI's client of it, the job table,
//! the job bodies and the schedule that starts them.

/// The job bodies: backup, drill, prune, restore, migrate, update.
pub mod bodies;
/// What the CLI calls.
pub mod client;
/// The interface the daemon serves (only that).
pub mod dbus;
/// Jobs: one mutating job at a time, with progress events.
pub mod jobs;
/// The last backup and drill that ran.
pub mod runs;
/// The daemon's schedule of backups, retention and drills.
pub mod scheduler;
/// The types that cross the bus.
pub mod wire;

/// Well-known name the daemon owns on the system bus.
pub const BUS_NAME: &str = "io.shtetl.Caretaker1";
/// Object path of the one object it serves.
pub const OBJECT_PATH: &str = "/io/shtetl/Caretaker1";
/// Interface name.
pub const INTERFACE: &str = "io.shtetl.Caretaker1";

/// Opens a connection to the bus named by `address`, or the system bus (which honours
/// `DBUS_SYSTEM_BUS_ADDRESS`) when there is none.
pub async fn connect(address: Option<&str>) -> zbus::Result<zbus::connection::Builder<'static>> {
    match address {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::system(),
    }
}
