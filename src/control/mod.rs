//! The control plane: the daemon's own D-Bus interface and the CLI's client of it.

/// What the CLI calls.
pub mod client;
/// The interface the daemon serves.
pub mod dbus;
/// Jobs: one mutating job at a time, with progress signals.
pub mod jobs;

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
