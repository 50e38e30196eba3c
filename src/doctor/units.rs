//! caretaker's units and the supervised services, asked of systemd.

use super::Check;
use crate::config::Config;
use crate::systemd::manager::{Systemd, SystemdError};

/// caretaker's own units and the supervised services are active.
pub(super) async fn check_units(cfg: &Config, bus: Option<&str>) -> Vec<Check> {
    let mut units: Vec<String> = vec!["caretaker-firstboot.service".into(), "caretaker.service".into()];
    for u in [&cfg.services.postgres.unit, &cfg.services.redis.unit, &cfg.services.api.unit] {
        if !units.iter().any(|x| x == u.as_str()) {
            units.push(u.as_str().to_string());
        }
    }
    let connect = async {
        let conn =
            crate::control::connect(bus).await.map_err(|e| e.to_string())?.build().await.map_err(|e| e.to_string())?;
        Systemd::new(&conn).await.map_err(|e| e.to_string())
    };
    let systemd = match connect.await {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::fail(
                "units",
                format!("cannot ask systemd over D-Bus{}: {e}", bus.map(|b| format!(" at {b}")).unwrap_or_default()),
                "run doctor as root on the box (or pass --bus-address)",
            )];
        }
    };
    let mut checks = Vec::new();
    for unit in units {
        checks.push(match systemd.state(&unit).await {
            Ok(s) if s.is_active() => Check::ok(&unit, format!("{} ({})", s.active_state, s.sub_state)),
            Ok(s) => {
                let result = if s.result.is_empty() || s.result == "success" {
                    String::new()
                } else {
                    format!(", Result={}", s.result)
                };
                let fix = if unit == "caretaker-firstboot.service" {
                    "`journalctl -u caretaker-firstboot -b` says why; fix it, then `systemctl restart caretaker-firstboot`".to_string()
                } else {
                    format!("`systemctl status {unit}`, `journalctl -u {unit} -n 50`; fix the cause, then `systemctl start {unit}`")
                };
                Check::fail(&unit, format!("{} ({}{result})", s.active_state, s.sub_state), fix)
            }
            Err(SystemdError::NotLoaded { load_state, .. }) => Check::fail(
                &unit,
                format!("not installed (LoadState={load_state})"),
                "install its package, or fix the unit name in the services section of the configuration",
            ),
            Err(e) => Check::fail(&unit, e.to_string(), format!("`systemctl status {unit}`")),
        });
    }
    checks
}
