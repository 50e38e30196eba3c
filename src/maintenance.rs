//! Maintenance holds: while a job deliberately stops or restarts a unit (an update restarts the
//! API, a restore stops it, WAL archiving restarts PostgreSQL once), the supervisor must neither
//! restart it behind the job's back nor count its downtime as an incident. A job takes a
//! [`Hold`] on the unit; the unit's watch keeps probing (status stays truthful) but does not act
//! until the hold is dropped.
//!
//! A hold is also exclusive: one lifecycle operation per unit at a time. A restore that wants
//! PostgreSQL stopped waits until the archiving restart has finished instead of stopping the unit
//! in the middle of its start (systemd then replaces one job with the other, and the unit's state
//! is whatever the interrupted `ExecStart` left).
//!
//! Holds are process-wide: there is one daemon per process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Per unit: the lock a hold owns, and the current holder's reason (for status and for waiters).
type Units = BTreeMap<String, (Arc<AsyncMutex<()>>, Option<String>)>;

static UNITS: Mutex<Units> = Mutex::new(BTreeMap::new());

fn units() -> std::sync::MutexGuard<'static, Units> {
    UNITS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Released on drop (also when the job's future is cancelled or panics).
#[must_use = "the hold ends when this is dropped"]
#[derive(Debug)]
pub struct Hold {
    unit: String,
    _lock: OwnedMutexGuard<()>,
}

/// Pauses supervision of `unit` until the returned hold is dropped; `reason` shows in status.
/// Waits (and says so) while another job holds the unit.
pub async fn hold(unit: &str, reason: &str) -> Hold {
    let lock = units().entry(unit.to_string()).or_default().0.clone();
    let guard = match lock.clone().try_lock_owned() {
        Ok(g) => g,
        Err(_) => {
            let other = held(unit).unwrap_or_default();
            tracing::info!(unit, "{reason}: waiting until {unit} is released by: {other}");
            lock.lock_owned().await
        }
    };
    units().entry(unit.to_string()).or_default().1 = Some(reason.to_string());
    tracing::info!(unit, "supervision of {unit} paused: {reason}");
    Hold { unit: unit.to_string(), _lock: guard }
}

/// Why `unit` is held, if it is.
pub fn held(unit: &str) -> Option<String> {
    units().get(unit).and_then(|(_, reason)| reason.clone())
}

impl Drop for Hold {
    fn drop(&mut self) {
        // The reason goes before the lock (dropped after this body), so a waiter that takes the
        // lock next always writes its own reason after this one is cleared.
        if let Some(entry) = units().get_mut(&self.unit) {
            entry.1 = None;
        }
        tracing::info!(unit = %self.unit, "supervision of {} resumed", self.unit);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn a_hold_lasts_until_dropped() {
        assert_eq!(super::held("maint-test.service"), None);
        let h = super::hold("maint-test.service", "update to v2").await;
        assert_eq!(super::held("maint-test.service").as_deref(), Some("update to v2"));
        drop(h);
        assert_eq!(super::held("maint-test.service"), None);
    }

    #[tokio::test]
    async fn a_second_hold_on_a_unit_waits_for_the_first_and_others_do_not() {
        let first = super::hold("maint-excl.service", "restart for archive_mode").await;
        let other = tokio::time::timeout(Duration::from_secs(5), super::hold("maint-other.service", "update")).await;
        assert!(other.is_ok(), "another unit is not blocked");
        let second = tokio::spawn(async { super::hold("maint-excl.service", "restore").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "the second hold waits while the first is held");
        assert_eq!(super::held("maint-excl.service").as_deref(), Some("restart for archive_mode"));
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.expect("taken once released").unwrap();
        assert_eq!(super::held("maint-excl.service").as_deref(), Some("restore"));
        drop(second);
        assert_eq!(super::held("maint-excl.service"), None);
    }
}
