//! The CLI side of the control plane: a thin client of the daemon's D-Bus interface.

use zbus::proxy;

use super::dbus::DaemonStatus;

#[proxy(
    interface = "io.shtetl.Caretaker1",
    default_service = "io.shtetl.Caretaker1",
    default_path = "/io/shtetl/Caretaker1"
)]
pub trait Caretaker1 {
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status_json(&self) -> zbus::Result<String>;
    fn reload(&self) -> zbus::Result<()>;
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the system bus{}: {source}\n  check: systemctl status dbus",
        address.as_deref().map(|a| format!(" at {a}")).unwrap_or_default()
    )]
    Bus { address: Option<String>, source: zbus::Error },
    #[error(
        "the caretaker daemon is not running (nobody owns {name} on the bus)\n  check: systemctl status caretaker; journalctl -u caretaker -n 50"
    )]
    NotRunning { name: &'static str },
    #[error("the daemon refused {method}: {message}")]
    Refused { method: &'static str, message: String },
    #[error("calling {method} on the daemon failed: {source}")]
    Call { method: &'static str, source: zbus::Error },
    #[error("the daemon sent a status this CLI cannot read: {0}")]
    BadStatus(serde_json::Error),
}

/// A connected client.
pub struct Client {
    proxy: Caretaker1Proxy<'static>,
}

impl Client {
    pub async fn connect(address: Option<&str>) -> Result<Client, ClientError> {
        let bus_err = |source| ClientError::Bus { address: address.map(str::to_string), source };
        let conn = super::connect(address).await.map_err(bus_err)?.build().await.map_err(bus_err)?;
        let proxy = Caretaker1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(bus_err)?;
        Ok(Client { proxy })
    }

    fn classify(method: &'static str, e: zbus::Error) -> ClientError {
        match &e {
            zbus::Error::MethodError(name, msg, _) => {
                let name = name.as_str();
                if name == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name == "org.freedesktop.DBus.Error.NameHasNoOwner"
                {
                    ClientError::NotRunning { name: super::BUS_NAME }
                } else {
                    ClientError::Refused { method, message: msg.clone().unwrap_or_else(|| name.to_string()) }
                }
            }
            zbus::Error::FDO(fdo) => match **fdo {
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    ClientError::NotRunning { name: super::BUS_NAME }
                }
                _ => ClientError::Call { method, source: e },
            },
            _ => ClientError::Call { method, source: e },
        }
    }

    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        let json = self.proxy.status_json().await.map_err(|e| Self::classify("Get(StatusJson)", e))?;
        serde_json::from_str(&json).map_err(ClientError::BadStatus)
    }

    pub async fn reload(&self) -> Result<(), ClientError> {
        self.proxy.reload().await.map_err(|e| Self::classify("Reload", e))
    }
}
